"""Resuming an interrupted training: the same checkpoints as a run that was never interrupted."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.rundir import RunDir
from pipeline.train.state import load_resume
from pipeline.train.trajectory import train


def _copy(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _killed_at(run: str) -> int:
    raw = torch.load(Path(run) / "trajectory" / "resume.pt", weights_only=True)
    return int(raw["step"])


def _kill_before_trajectory_json(cfg, monkeypatch) -> None:
    """Train ``cfg`` and kill it after its last resume state, before trajectory.json."""

    from pipeline.train import trajectory

    real = trajectory.write_json

    def killed(url, obj):
        if url.endswith("/trajectory.json"):
            raise KeyboardInterrupt("killed before trajectory.json")
        real(url, obj)  # request.json, at the start

    with monkeypatch.context() as m:
        m.setattr("pipeline.train.trajectory.write_json", killed)
        with pytest.raises(KeyboardInterrupt):
            train(cfg)


def test_killed_training_resumes_to_byte_identical_checkpoints(
    interrupted, tiny_run, tmp_path, caplog
):
    run = _copy(interrupted["run"], tmp_path / "run")
    step = _killed_at(run)
    total = interrupted["config"].steps
    first = tiny_run["record"]["checkpoints"][0]["step"]
    assert first < step < total  # killed after the first checkpoint, before the end
    with caplog.at_level(logging.INFO, logger="pipeline.train.trajectory"):
        rec = train(dataclasses.replace(interrupted["config"], run=run))  # resume is the default
    assert rec["resumed_at"] == [step]
    # what this run trained, not the whole run's count (it said "trained 30 steps")
    assert f"trained steps {step} to {total} on " in caplog.text
    want = tiny_run["record"]["checkpoints"]  # the same config, never interrupted
    assert [(c["step"], c["lr"], c["sha256"]) for c in rec["checkpoints"]] == [
        (c["step"], c["lr"], c["sha256"]) for c in want
    ]
    for c in want:
        a = Path(RunDir(tiny_run["run"]).checkpoint(c["step"])).read_bytes()
        assert Path(RunDir(run).checkpoint(c["step"])).read_bytes() == a
    assert rec["loss_curve"] == tiny_run["record"]["loss_curve"]  # continued, not restarted
    assert not (Path(run) / "trajectory" / "resume.pt").exists()  # a finished run has none
    # every option of the training, for `diffin status` to print the command that resumes it
    request = json.loads((Path(run) / "trajectory" / "request.json").read_text())
    assert request == json.loads(json.dumps({**interrupted["config"].to_dict(), "run": run}))
    on_disk = json.loads(Path(RunDir(run).trajectory_json).read_text())
    assert on_disk["checkpoints"] == rec["checkpoints"]


def test_resume_refuses_another_config_and_no_resume_starts_over(interrupted, tiny_run, tmp_path):
    run = _copy(interrupted["run"], tmp_path / "run")
    step = _killed_at(run)
    other = dataclasses.replace(interrupted["config"], run=run, lr=0.05, seed=1)
    sets = {p: p.read_bytes() for p in sorted((Path(run) / "sets").iterdir())}
    # the refusal names what changed (walkthrough: it did not)
    with pytest.raises(ConfigError, match=r"^resume: .*another config.*\(changed: lr, seed, "):
        train(other)
    assert _killed_at(run) == step  # left as it was
    # refused before anything is written (the seed would redraw the sets)
    assert {p: p.read_bytes() for p in sorted((Path(run) / "sets").iterdir())} == sets
    # fields that do not change the trajectory may change (here: how often state is saved)
    rec = train(dataclasses.replace(interrupted["config"], run=run, resume=False, resume_every=0))
    assert rec["resumed_at"] == []
    assert [c["sha256"] for c in rec["checkpoints"]] == [
        c["sha256"] for c in tiny_run["record"]["checkpoints"]
    ]


def test_resume_refuses_a_state_of_another_training_version(interrupted, tmp_path, monkeypatch):
    """A run interrupted under another version of the update rule starts over, not mixed."""
    run = _copy(interrupted["run"], tmp_path / "run")
    step = _killed_at(run)
    monkeypatch.setattr("pipeline.train.state.TRAINING_VERSION", "train-v999")
    with pytest.raises(ConfigError, match="^resume: .*version of diffin.*train-v999"):
        train(dataclasses.replace(interrupted["config"], run=run))
    assert _killed_at(run) == step  # left as it was


def test_resume_refuses_a_changed_checkpoint(interrupted, tmp_path):
    run = _copy(interrupted["run"], tmp_path / "run")
    raw = torch.load(Path(run) / "trajectory" / "resume.pt", weights_only=True)
    assert raw["checkpoints"]  # killed after the first checkpoint (conftest)
    path = Path(run) / "trajectory" / raw["checkpoints"][0]["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="missing or changed"):
        load_resume(RunDir(run), raw["fingerprint"])


def test_a_run_killed_after_its_last_state_finishes_when_rerun(
    interrupted, tiny_run, tmp_path, monkeypatch, caplog
):
    """Killed between the final resume state and trajectory.json: every rerun used to fail."""
    run = _copy(interrupted["run"], tmp_path / "run")
    cfg = dataclasses.replace(interrupted["config"], run=run)
    _kill_before_trajectory_json(cfg, monkeypatch)
    assert _killed_at(run) == cfg.steps
    with caplog.at_level(logging.INFO, logger="pipeline.train.trajectory"):
        rec = train(cfg)
    assert "the last resume state holds all 30 steps: nothing left to train" in caplog.text
    assert rec["resumed_at"][-1] == cfg.steps  # this run resumed at the end
    assert [c["sha256"] for c in rec["checkpoints"]] == [
        c["sha256"] for c in tiny_run["record"]["checkpoints"]
    ]
    assert not (Path(run) / "trajectory" / "resume.pt").exists()


def _rewrite_captions(shard: Path) -> None:
    """The same members under the same names (so the same uids), other captions."""
    import io
    import tarfile

    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name.endswith(".txt"):
                data += b" (edited)"
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def test_resume_refuses_a_pool_or_pretrained_file_rewritten_in_place(tmp_path, monkeypatch):
    """Same paths, same uids, other bytes: the saved state belongs to other inputs (was: resumed)."""
    from pipeline.data.synth import SynthConfig, make_pool
    from pipeline.model import factory
    from pipeline.train.config import TrainConfig
    from tests.conftest import TINY_TRAIN

    pool = make_pool(
        str(tmp_path / "pool"),
        SynthConfig(samples=120, shard_size=60, eval_samples=10, image_size=32, seed=0),
    )
    weights = tmp_path / "weights.pt"
    torch.save(factory.create("diffin-tiny").model.state_dict(), weights)
    small = {"steps": 6, "warmup": 1, "batch_size": 16, "target_size": 16, "reference_size": 15}
    cfg = TrainConfig(
        data=pool["train_data"],
        run=str(tmp_path / "run"),
        pretrained=str(weights),
        **{**TINY_TRAIN, **small},
    )
    _kill_before_trajectory_json(cfg, monkeypatch)
    assert _killed_at(cfg.run) == cfg.steps
    saved = torch.load(Path(cfg.run) / "trajectory" / "resume.pt", weights_only=True)

    original = weights.read_bytes()
    state = torch.load(weights, weights_only=True)
    state["logit_scale"] += 1.0
    torch.save(state, weights)
    with pytest.raises(ConfigError, match="^resume: .*another config, pool"):
        train(cfg)
    weights.write_bytes(original)

    shard = Path(tmp_path / "pool" / "00000.tar")
    kept = shard.read_bytes()
    _rewrite_captions(shard)
    with pytest.raises(ConfigError, match="^resume: .*another config, pool"):
        train(cfg)
    assert _killed_at(cfg.run) == cfg.steps  # left as it was

    shard.write_bytes(kept)  # the inputs it was saved with: it finishes from its state
    rec = train(cfg)
    assert [c["sha256"] for c in rec["checkpoints"]] == [c["sha256"] for c in saved["checkpoints"]]
    assert not (Path(cfg.run) / "trajectory" / "resume.pt").exists()


def test_stale_checkpoints_are_found_by_listing_not_by_a_glob_of_the_run_path(tmp_path):
    """A run path with "[1]" globbed as a character class: it matched runs/exp1's files."""
    from pipeline.train.state import remove_stale_checkpoints

    for name in ("exp[1]", "exp1"):
        traj = tmp_path / name / "trajectory"
        traj.mkdir(parents=True)
        for step in (10, 20):
            (traj / f"ckpt-{step:06d}.pt").write_bytes(b"x")
        (traj / "trajectory.json").write_text("{}")
    removed = remove_stale_checkpoints(
        RunDir(str(tmp_path / "exp[1]")), [{"path": "ckpt-000020.pt"}]
    )
    assert removed == ["ckpt-000010.pt"]
    assert sorted(p.name for p in (tmp_path / "exp[1]" / "trajectory").iterdir()) == [
        "ckpt-000020.pt",
        "trajectory.json",
    ]
    assert len(list((tmp_path / "exp1" / "trajectory").iterdir())) == 3  # another run: untouched


def test_the_same_training_again_is_not_trained_twice(tiny_run, tmp_path, caplog):
    """Walkthrough: rerunning a finished `diffin train` trained it all again (hours on a
    real proxy) to the same bytes."""
    run = _copy(tiny_run["run"], tmp_path / "run")
    cfg = dataclasses.replace(tiny_run["config"], run=run)
    ckpts = sorted((Path(run) / "trajectory").glob("ckpt-*.pt"))
    mtimes = [p.stat().st_mtime_ns for p in ckpts]
    with caplog.at_level("INFO", logger="pipeline.train.trajectory"):
        rec = train(cfg)
    assert "already trained" in caplog.text
    # flagged: its "seconds" are the earlier training's (walkthrough)
    assert rec == {
        **json.loads(Path(RunDir(run).trajectory_json).read_text()),
        "already_trained": True,
    }
    assert rec["checkpoints"] == tiny_run["record"]["checkpoints"]
    assert [p.stat().st_mtime_ns for p in ckpts] == mtimes  # nothing rewritten
    # another config, or --no-resume, trains
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline.train.trajectory"):
        again = train(dataclasses.replace(cfg, resume=False))
    assert "already trained" not in caplog.text
    assert "another config" not in caplog.text  # the same training again (review)
    assert [c["sha256"] for c in again["checkpoints"]] == [
        c["sha256"] for c in tiny_run["record"]["checkpoints"]
    ]
    Path(RunDir(run).checkpoint(again["checkpoints"][0]["step"])).unlink()
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline.train.trajectory"):
        train(cfg)  # a checkpoint gone: trained again, not "already trained"
    assert "already trained" not in caplog.text


def test_the_same_pool_spelled_otherwise_or_hashed_as_before_is_the_same_training(
    tiny_run, tmp_path, monkeypatch, caplog
):
    """Walkthrough: `--data` given as a `::` list, a directory or a glob of the same shards
    trained the run again (and refused to resume it): the typed string was hashed. Runs
    recorded under that older hash are still found trained, or resumed."""
    from pipeline.data.shards import resolve_shards
    from pipeline.train import state as state_module

    cfg = dataclasses.replace(tiny_run["config"], run=_copy(tiny_run["run"], tmp_path / "a"))
    listed = dataclasses.replace(cfg, data="::".join(resolve_shards(cfg.data)))
    assert train(listed).get("already_trained")

    def as_before(*args, **kwargs):
        return state_module.fingerprint(*args, **kwargs, with_data=True)

    def trained_as_before(run: str, killed: bool) -> dict:
        c = dataclasses.replace(tiny_run["config"], run=run)
        with monkeypatch.context() as m:
            m.setattr("pipeline.train.trajectory.fingerprint", as_before)
            if killed:
                _kill_before_trajectory_json(c, monkeypatch)
            else:
                train(c)
        return c

    finished = trained_as_before(str(tmp_path / "finished"), killed=False)
    old = json.loads(Path(RunDir(finished.run).trajectory_json).read_text())["fingerprint"]
    assert old != tiny_run["record"]["fingerprint"]  # the older hash
    assert train(finished).get("already_trained")  # not trained again
    now = json.loads(Path(RunDir(finished.run).trajectory_json).read_text())["fingerprint"]
    assert now == tiny_run["record"]["fingerprint"]  # recorded as hashed now

    killed = trained_as_before(str(tmp_path / "killed"), killed=True)
    step = _killed_at(killed.run)
    with caplog.at_level("INFO", logger="pipeline.train.runner"):
        rec = train(killed)  # resumed, not refused as another config
    assert f"resuming training at step {step} of" in caplog.text
    assert [c["sha256"] for c in rec["checkpoints"]] == [
        c["sha256"] for c in tiny_run["record"]["checkpoints"]
    ]


def test_no_resume_starts_over_past_a_resume_state_it_cannot_read(interrupted, tiny_run, tmp_path):
    """Review: reading the resume state's fingerprint first made `--no-resume`, the way out
    the refusals name, fail on a cut-short resume.pt."""
    run = _copy(interrupted["run"], tmp_path / "run")
    state = Path(run) / "trajectory" / "resume.pt"
    state.write_bytes(state.read_bytes()[:100])
    cfg = dataclasses.replace(interrupted["config"], run=run)
    with pytest.raises(Exception):  # noqa: B017 (torch's unpickling error, whatever its type)
        train(cfg)
    rec = train(dataclasses.replace(cfg, resume=False))
    assert rec["resumed_at"] == []
    assert [c["sha256"] for c in rec["checkpoints"]] == [
        c["sha256"] for c in tiny_run["record"]["checkpoints"]
    ]
