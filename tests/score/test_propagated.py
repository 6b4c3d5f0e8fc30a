"""The propagated form through the scoring stage: direction files, engine, refusals.

The toy-model accuracy of the recursion itself is tests/influence/test_propagate.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.reader import iter_shard
from pipeline.errors import ConfigError
from pipeline.influence.directions import load_directions
from pipeline.influence.functional import ClipFunctions
from pipeline.influence.reference import per_sample_gradient
from pipeline.influence.vectors import dot
from pipeline.model import factory
from pipeline.model.batches import encode
from pipeline.rundir import RunDir
from pipeline.score.config import ScoreConfig
from pipeline.score.directions import (
    ensure_directions,
    load_set,
    propagated_url,
    resolve_form,
    sgd_dynamics,
)
from pipeline.score.trajectory import load_state_dict, load_trajectory
from pipeline.score.worker import ShardScorer
from pipeline.tensors import load_tensors
from tests.conftest import copy_run


def as_adamw(src: str, dst: Path) -> str:
    """A copy of the run whose trajectory says it was trained with AdamW."""
    run = copy_run(src, dst)
    path = Path(run) / "trajectory" / "trajectory.json"
    record = json.loads(path.read_text())
    record["optimizer"]["name"] = "adamw"
    path.write_text(json.dumps(record))
    return run


@pytest.fixture(scope="module")
def prop(tiny_run, tmp_path_factory):
    run = copy_run(tiny_run["run"], tmp_path_factory.mktemp("propagated") / "run")
    cfg = ScoreConfig(
        data=tiny_run["data"],
        run=run,
        workers=1,
        threads=1,
        dtype="float64",
        methods=["diffin", "tracin"],
        second_order="propagated",
        objective="final",  # the tests below switch to the checkpoint mean where they mean it
    )
    ensure_directions(cfg, RunDir(run), load_trajectory(RunDir(run)))
    return {"run": run, "cfg": cfg, "data": tiny_run["data"]}


def test_direction_files_are_written_once(prop):
    run = RunDir(prop["run"])
    traj = load_trajectory(run)
    urls = [propagated_url(run, c.step) for c in traj.checkpoints]
    metas = [load_tensors(u)[1] for u in urls]
    assert len({m["fingerprint"] for m in metas}) == 1
    before = [os.stat(u).st_mtime_ns for u in urls]
    ensure_directions(prop["cfg"], run, traj)  # everything is there: nothing recomputed
    assert [os.stat(u).st_mtime_ns for u in urls] == before


def test_engine_equals_per_sample_gradients_dotted_with_r(prop):
    """diffin = sum_t <r_t, g_z(theta_t)>, first-order part = TracIn's, in float64 against
    autograd per-sample gradients (no forward-mode in the check)."""
    run = RunDir(prop["run"])
    traj = load_trajectory(run)
    scorer = ShardScorer(prop["run"], dataclasses.replace(prop["cfg"], batch_size=5))
    shard = prop["data"].replace("{00000..00002}", "00000")
    samples = [s for s in iter_shard(shard) if s.ok][:6]
    got = scorer.score_samples(samples)

    bundle = factory.create(traj.model, dtype=torch.float64)
    ref_images, ref_tokens, _ = load_set(run, "reference", torch.float64)
    # g_z as the scorer defines it (--sample-gradient, default: the removal gradient)
    removal = scorer.cfg.sample_gradient == "removal"
    fns = ClipFunctions(bundle.model, ref_images, ref_tokens, removal=removal)
    images, tokens = encode(samples, bundle)
    images = images.double()
    names = [n for n, _ in bundle.model.named_parameters()]
    want = np.zeros(len(samples))
    for c in traj.checkpoints:
        state = load_state_dict(run, traj, c.step)
        params = {k: state[k].double() for k in names}
        r, _ = load_tensors(propagated_url(run, c.step))
        g_V = load_directions(run.directions(c.step)).g_V
        w_first = scorer.ctx.weights()[traj.checkpoints.index(c)].first
        for i in range(len(samples)):
            g = per_sample_gradient(fns, params, images, tokens, i)
            want[i] += float(dot(r, g))
            first = float(dot(g_V, g))
            assert got[f"diffin_first_t{c.step}"][i] == pytest.approx(w_first * first, rel=1e-6)
    np.testing.assert_allclose(got["diffin"], want, rtol=1e-6)
    np.testing.assert_allclose(
        got["diffin"],
        sum(
            got[f"diffin_first_t{c.step}"] + got[f"diffin_second_t{c.step}"]
            for c in traj.checkpoints
        ),
        rtol=1e-10,
    )
    np.testing.assert_allclose(
        got["tracin"], sum(got[f"diffin_first_t{c.step}"] for c in traj.checkpoints), rtol=1e-10
    )
    # the propagation did something: the second-order part is not zero
    assert np.abs(got[f"diffin_second_t{traj.checkpoints[0].step}"]).max() > 0


def test_the_checkpoint_mean_objective_through_the_stage(prop, tmp_path):
    """--objective checkpoint-mean: its own direction files (recorded as such; the final
    loss's stay beside them, and each objective reuses its own after the other), equal to
    the final loss's over m in the last checkpoint's block, which no earlier endpoint
    reaches, and other before it; the diffin column follows them."""
    src = RunDir(prop["run"])
    run = copy_run(prop["run"], tmp_path / "mean")
    cfg = dataclasses.replace(prop["cfg"], run=run, objective="checkpoint-mean")
    traj = load_trajectory(RunDir(run))
    steps = [c.step for c in traj.checkpoints]
    ensure_directions(cfg, RunDir(run), traj)
    final = [load_tensors(propagated_url(src, t)) for t in steps]
    mean = [load_tensors(propagated_url(RunDir(run), t, "checkpoint-mean")) for t in steps]
    assert all(Path(propagated_url(RunDir(run), t)).exists() for t in steps)  # kept
    assert {m["objective"] for _, m in mean} == {"checkpoint-mean"}
    assert mean[0][1]["fingerprint"] != final[0][1]["fingerprint"]
    for k in final[-1][0]:
        torch.testing.assert_close(mean[-1][0][k], final[-1][0][k] / len(steps))
    assert any(not torch.allclose(mean[0][0][k], final[0][0][k] / len(steps)) for k in final[0][0])
    shard = prop["data"].replace("{00000..00002}", "00000")
    samples = [s for s in iter_shard(shard) if s.ok][:4]
    got = ShardScorer(run, dataclasses.replace(cfg, batch_size=4)).score_samples(samples)
    base = ShardScorer(prop["run"], dataclasses.replace(prop["cfg"], batch_size=4))
    want = base.score_samples(samples)
    np.testing.assert_allclose(got["tracin"], want["tracin"], rtol=1e-10)  # g_V untouched
    assert not np.allclose(got["diffin"], want["diffin"])
    # what reached the sweep: each checkpoint's own g_V over m, the last one as the start
    # (review: a g_V of the last checkpoint for every endpoint passed the checks above)
    import pipeline.score.directions as directions

    seen = {}

    def spy(hvp, steps, rate, g_V, n_train, momentum, weight_decay, progress, earlier):
        seen.update(g_V=g_V, earlier=earlier)
        raise RuntimeError("seen")

    for f in (Path(run) / "directions").glob("*-propagated-checkpoint-mean.safetensors"):
        f.unlink()
    with pytest.MonkeyPatch.context() as mp, pytest.raises(RuntimeError, match="seen"):
        mp.setattr(directions, "propagated_directions", spy)
        ensure_directions(cfg, RunDir(run), traj)
    assert sorted(seen["earlier"]) == steps[:-1]
    assert steps[0] in seen["earlier"] and steps[-1] not in seen["earlier"]
    for t in steps:
        got = seen["g_V"] if t == steps[-1] else seen["earlier"][t]
        want = load_directions(src.directions(t)).g_V
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k].cpu(), want[k] / len(steps))
    ensure_directions(cfg, RunDir(run), traj)  # the files again, for what follows
    # one objective after the other: neither sweeps again (the spy would say so)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(directions, "propagated_directions", spy)
        ensure_directions(dataclasses.replace(cfg, objective="final"), RunDir(run), traj)
        ensure_directions(cfg, RunDir(run), traj)
    again = load_tensors(propagated_url(RunDir(run), steps[0]))
    assert again[1]["fingerprint"] == final[0][1]["fingerprint"]
    for k in final[0][0]:
        torch.testing.assert_close(again[0][k], final[0][0][k])
    # the default objective ("auto") is the checkpoint mean here (SGD, propagated, first
    # order): with only that objective's files left, nothing sweeps
    for t in steps:
        Path(propagated_url(RunDir(run), t)).unlink()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(directions, "propagated_directions", spy)
        ensure_directions(dataclasses.replace(cfg, objective="auto"), RunDir(run), traj)


def test_the_default_objective_is_resolved_per_run_before_scoring(prop, tmp_path, monkeypatch):
    """--objective auto (the default): the checkpoint mean where diffin is scored with the
    propagated form and its first-order term, the final loss elsewhere (an AdamW trajectory,
    --no-first-order, no diffin): resolved once, before the workers, the directions and the
    fingerprint see it, and recorded as resolved."""
    import pipeline.score.driver as driver
    from pipeline.score.directions import resolve_objective

    seen = []
    monkeypatch.setattr(driver, "_score", lambda cfg, *rest: seen.append(cfg) or {})
    adamw = as_adamw(prop["run"], tmp_path / "adamw")
    base = ScoreConfig(data=prop["data"], run=prop["run"], workers=1, threads=1)
    assert base.objective == "auto" and base.second_order == "auto"
    cases = [
        ({}, "checkpoint-mean"),
        ({"methods": ["loss", "diffin"]}, "checkpoint-mean"),
        ({"first_order": False}, "final"),
        ({"methods": ["tracin", "loss"]}, "final"),
        ({"second_order": "derived"}, "final"),
        ({"run": adamw}, "final"),  # auto scores AdamW with the derived form
        ({"objective": "final"}, "final"),
        ({"objective": "checkpoint-mean"}, "checkpoint-mean"),
    ]
    for options, want in cases:
        cfg = dataclasses.replace(base, **options)
        driver.run_scoring(cfg)
        assert seen[-1].objective == want, options
        request = json.loads(Path(cfg.run, "scores", "request.json").read_text())
        assert request["objective"] == want, options
        traj = load_trajectory(RunDir(cfg.run))
        assert resolve_objective(cfg, resolve_form(cfg.second_order, traj)) == want


def test_the_checkpoint_mean_objective_needs_the_propagated_form(prop, tmp_path):
    """Refused before any work: with an expansion form asked for, and on a trajectory that
    --second-order auto scores with the expansion (AdamW)."""
    from pipeline.score.driver import run_scoring

    with pytest.raises(ConfigError, match="objective: checkpoint-mean needs the propagated"):
        dataclasses.replace(
            prop["cfg"], objective="checkpoint-mean", second_order="derived"
        ).validate()
    with pytest.raises(ConfigError, match="objective: must be one of"):
        dataclasses.replace(prop["cfg"], objective="mean").validate()
    with pytest.raises(ConfigError, match="objective: checkpoint-mean scores diffin with its"):
        dataclasses.replace(prop["cfg"], objective="checkpoint-mean", first_order=False).validate()
    # the objective is diffin's: without diffin, nothing to refuse (review)
    for other in ({"second_order": "derived"}, {"first_order": False}):
        dataclasses.replace(
            prop["cfg"], methods=["tracin"], objective="checkpoint-mean", **other
        ).validate()
    run = as_adamw(prop["run"], tmp_path / "adamw")

    def files():  # the lock files of runlock stay, as after any stage
        return sorted(str(p) for p in Path(run).rglob("*") if "locks" not in p.parts)

    before = files()
    cfg = dataclasses.replace(
        prop["cfg"], run=run, objective="checkpoint-mean", second_order="auto"
    )
    with pytest.raises(ConfigError, match="objective checkpoint-mean: needs the propagated"):
        run_scoring(cfg)
    assert files() == before


def test_rates_follow_the_recorded_schedule(prop):
    traj = load_trajectory(RunDir(prop["run"]))
    momentum, weight_decay, rate = sgd_dynamics(traj)
    c = traj.record["config"]
    assert (momentum, weight_decay) == (c["momentum"], c["weight_decay"])
    assert rate(0) == pytest.approx(c["lr"] / c["warmup"])  # inside the warm-up
    assert [rate(ck.step) for ck in traj.checkpoints] == [ck.lr for ck in traj.checkpoints]


def test_a_schedule_the_checkpoints_disagree_with_is_not_used_by_the_propagation(
    prop, tmp_path, caplog
):
    """As for the other forms, each checkpoint's own rate stands for its block, with the
    log saying why; the propagated form alone refused the run."""
    run = copy_run(prop["run"], tmp_path / "other-schedule")
    path = Path(run) / "trajectory" / "trajectory.json"
    record = json.loads(path.read_text())
    record["config"]["lr"] *= 2  # the schedule says twice what the checkpoints recorded
    path.write_text(json.dumps(record))
    with caplog.at_level("WARNING"):
        traj = load_trajectory(RunDir(run))
    assert "recorded schedule gives lr" in caplog.text
    rate = sgd_dynamics(traj)[2]
    steps = [c.step for c in traj.checkpoints]
    assert [rate(s) for s in steps[:-1]] == [c.lr for c in traj.checkpoints[:-1]]


def test_an_adamw_trajectory_is_refused_before_any_work(prop, tmp_path):
    run = as_adamw(prop["run"], tmp_path / "adamw")
    for f in (Path(run) / "directions").iterdir():
        f.unlink()
    cfg = dataclasses.replace(prop["cfg"], run=run)
    with pytest.raises(ConfigError, match="propagated form models SGD"):
        ensure_directions(cfg, RunDir(run), load_trajectory(RunDir(run)))
    assert not any((Path(run) / "directions").iterdir())


def test_auto_picks_the_propagated_form_for_sgd_and_the_expansion_otherwise(prop, tmp_path):
    """The default (--second-order auto): an SGD trajectory gets the propagated form, an AdamW
    one (every imported open_clip_train run) the derived expansion, without an error."""
    traj = load_trajectory(RunDir(prop["run"]))
    assert resolve_form("auto", traj) == "propagated"
    assert resolve_form("method", traj) == "method"
    run = as_adamw(prop["run"], tmp_path / "adamw")
    cfg = dataclasses.replace(prop["cfg"], run=run, second_order="auto")
    scorer = ShardScorer(run, cfg)
    assert scorer.cfg.second_order == scorer.ctx.second_order == "derived"
    assert "hz" in scorer.need[scorer.traj.checkpoints[0].step]


def test_a_diverging_propagation_is_refused_with_its_fix(prop, tmp_path):
    """Unstable linearised dynamics (here a rate 1e30 times the recorded one) gave every
    sample a NaN score and no word; now the sweep stops and names the option to change."""
    run = copy_run(prop["run"], tmp_path / "unstable")
    for f in (Path(run) / "directions").glob("*-propagated.safetensors"):
        f.unlink()
    path = Path(run) / "trajectory" / "trajectory.json"
    record = json.loads(path.read_text())
    recorded = record["config"]["lr"]
    record["config"]["lr"] *= 1e30  # the schedule and the checkpoints' rates still agree
    for c in record["checkpoints"]:
        c["lr"] *= 1e30
    path.write_text(json.dumps(record))
    traj = load_trajectory(RunDir(run))
    assert sgd_dynamics(traj)[2](traj.checkpoints[-1].step - 1) > 0.5e30 * recorded
    for curvature, fix in (
        ("ggn", "--second-order derived"),
        ("hessian", "--propagate-curvature ggn"),
    ):
        cfg = dataclasses.replace(prop["cfg"], run=run, propagate_curvature=curvature)
        with pytest.raises(ConfigError, match=f"not finite at training step \\d+.*{fix}"):
            ensure_directions(cfg, RunDir(run), traj)
        assert not list((Path(run) / "directions").glob("*-propagated.safetensors"))


def test_stored_nan_directions_are_computed_again(prop, tmp_path):
    """A version without the divergence check may have stored NaN directions under the same
    fingerprint: they are not reused (here the dynamics are stable, so they come back finite)."""
    from pipeline.tensors import save_tensors

    run = RunDir(copy_run(prop["run"], tmp_path / "stale"))
    traj = load_trajectory(run)
    urls = [propagated_url(run, c.step) for c in traj.checkpoints]
    for url in urls:
        r, meta = load_tensors(url)
        save_tensors(url, {k: v * float("nan") for k, v in r.items()}, meta)
    ensure_directions(dataclasses.replace(prop["cfg"], run=run.url), run, traj)
    for url in urls:
        r, _ = load_tensors(url)
        assert all(torch.isfinite(v).all() for v in r.values()), url


def test_a_new_directions_version_propagates_again(prop, tmp_path, monkeypatch):
    """The sweep starts from (and adds) the g_V of the direction files: when those are
    computed again by a new version, the propagated files are not reused (review: the
    propagated fingerprint lacked the directions' version)."""
    import pipeline.score.directions as directions

    run = RunDir(copy_run(prop["run"], tmp_path / "newer"))
    traj = load_trajectory(run)
    cfg = dataclasses.replace(prop["cfg"], run=run.url)
    swept = []
    real = directions.propagated_directions

    def counting(*args, **kwargs):
        swept.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(directions, "propagated_directions", counting)
    ensure_directions(cfg, run, traj)
    assert swept == []  # the same version: reused
    monkeypatch.setattr(directions, "DIRECTIONS_VERSION", "directions-next")
    ensure_directions(cfg, run, traj)
    assert swept == [1]


def test_a_long_propagation_logs_how_far_it_has_got(prop, tmp_path, monkeypatch, caplog):
    """A line a minute for logs and Ray jobs, where the bar is disabled (was: "0 of N steps")."""
    import logging
    import shutil

    run = RunDir(copy_run(prop["run"], tmp_path / "slow"))
    traj = load_trajectory(run)
    for c in traj.checkpoints:  # computed again
        Path(propagated_url(run, c.step)).unlink()
    clock = iter(range(0, 10**6, 61))  # every call a minute later
    monkeypatch.setattr("pipeline.score.directions.time.monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="pipeline.score.directions"):
        ensure_directions(dataclasses.replace(prop["cfg"], run=run.url), run, traj)
    lines = [r.getMessage() for r in caplog.records if "propagating g_V:" in r.getMessage()]
    last = traj.checkpoints[-1].step
    assert lines[0] == f"propagating g_V: 1 of {last} steps"
    assert lines[-1] == f"propagating g_V: {last} of {last} steps"
    shutil.rmtree(run.url)


def test_the_propagation_takes_the_recorded_momentum_and_weight_decay(prop, tmp_path, monkeypatch):
    """Test audit: the fixture trains without weight decay, so a weight decay dropped on
    the way (read as 0) compared 0 with 0; nothing checked what reaches the propagation."""
    import pipeline.score.directions as directions

    run = copy_run(prop["run"], tmp_path / "wd")
    path = Path(run) / "trajectory" / "trajectory.json"
    record = json.loads(path.read_text())
    record["optimizer"].update(momentum=0.8, weight_decay=0.01)
    path.write_text(json.dumps(record))
    for f in (Path(run) / "directions").glob("*-propagated.safetensors"):
        f.unlink()
    traj = load_trajectory(RunDir(run))
    assert sgd_dynamics(traj)[:2] == (0.8, 0.01)
    seen = []

    class Reached(Exception):
        pass

    def spy(hvp, steps, rate, g_V, n_train, momentum, weight_decay, progress=None, earlier=None):
        seen.append((momentum, weight_decay))
        raise Reached

    monkeypatch.setattr(directions, "propagated_directions", spy)
    with pytest.raises(Reached):
        ensure_directions(dataclasses.replace(prop["cfg"], run=run), RunDir(run), traj)
    assert seen == [(0.8, 0.01)]


def test_the_directions_chunk_and_kept_pairs_change_memory_not_the_vectors(prop, tmp_path):
    """--directions-chunk and --ggn-kept-pairs reach the directions stage (each pass takes
    at most that many pairs, no batch graph kept) and give the same stored vectors."""
    src = RunDir(prop["run"])
    run = copy_run(prop["run"], tmp_path / "chunked")
    for f in (Path(run) / "directions").glob("*.safetensors"):
        f.unlink()
    # 8 of the batches of 32: chunked (4 passes a batch), and 4 times fewer passes than 2
    cfg = dataclasses.replace(prop["cfg"], run=run, directions_chunk=8, ggn_kept_pairs=0)
    import pipeline.influence.directions as directions

    sizes, kept = [], []
    embed = directions.ClipFunctions.embed
    init = directions.GaussNewton.__init__

    def counted(self, p, images, tokens):
        sizes.append(images.shape[0])
        return embed(self, p, images, tokens)

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        kept.append(len(self.ops))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(directions.ClipFunctions, "embed", counted)
        mp.setattr(directions.GaussNewton, "__init__", spy)
        ensure_directions(cfg, RunDir(run), load_trajectory(RunDir(run)))
    assert max(sizes) == 8 and kept and set(kept) == {0}
    new = RunDir(run)
    for c in load_trajectory(src).checkpoints:
        for a, b in [
            (src.directions(c.step), new.directions(c.step)),
            (propagated_url(src, c.step), propagated_url(new, c.step)),
        ]:
            want, got = load_tensors(a)[0], load_tensors(b)[0]
            assert set(got) == set(want)
            for k in want:
                scale = float(want[k].abs().max()) or 1.0
                assert float((got[k] - want[k]).abs().max()) / scale < 1e-9, (b, k)


def test_the_actor_says_what_its_checkpoints_hold_on_its_device(prop, caplog):
    """m checkpoints stay resident for the whole run (25 by default): the actor says how much,
    and that is the parameters, r_t - W g_V (diffin) and g_V (tracin) per checkpoint."""
    with caplog.at_level("INFO", logger="pipeline.score.worker"):
        scorer = ShardScorer(prop["run"], prop["cfg"])
    m = len(load_trajectory(RunDir(prop["run"])).checkpoints)
    model = sum(p.numel() * 8 for p in next(iter(scorer.params.values())).values())  # float64
    assert scorer.resident_bytes == m * 3 * model
    said = [r.getMessage() for r in caplog.records if "actor holds" in r.getMessage()]
    assert said == [f"actor holds {m} checkpoints on cpu: {m * 3 * model / 2**20:.1f} MB of "
                    "parameters and direction vectors"]  # fmt: skip
