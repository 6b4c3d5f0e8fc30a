"""Direction vectors are prepared only for scorers that read them."""

from __future__ import annotations

import dataclasses
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.reader import iter_shard
from pipeline.rundir import RunDir
from pipeline.score.config import ScoreConfig
from pipeline.score.directions import ensure_directions, needs_directions
from pipeline.score.trajectory import load_trajectory
from pipeline.score.worker import ShardScorer
from tests.conftest import copy_run

NO_DIRECTIONS = ["loss", "loss_mean", "clip_score", "el2n", "random"]


def test_which_methods_need_directions(tiny_run):
    traj = load_trajectory(RunDir(tiny_run["run"]))
    cfg = ScoreConfig(data=tiny_run["data"], run=tiny_run["run"], methods=NO_DIRECTIONS)
    assert not needs_directions(cfg, traj)
    for method in ("diffin", "tracin", "diffin_self", "tracin_self", "grand"):
        with_it = dataclasses.replace(cfg, methods=[*NO_DIRECTIONS, method])
        assert needs_directions(with_it, traj), method


def test_scorers_without_directions_compute_none_and_score_the_same(
    tiny_run, tiny_scored, tmp_path
):
    run_url = copy_run(tiny_run["run"], tmp_path / "run")
    run = RunDir(run_url)
    cfg = ScoreConfig(
        data=tiny_run["data"], run=run_url, methods=NO_DIRECTIONS, batch_size=64, threads=1
    )
    traj = load_trajectory(run)
    # no scorer points toward a target, so none is read (a garbage one is not even opened)
    # and none is in the fingerprint (walkthrough: `--methods loss` encoded it all the same)
    garbage = tmp_path / "target.tar"
    garbage.write_bytes(b"not a tar")
    assert ensure_directions(dataclasses.replace(cfg, target=str(garbage)), run, traj) is None
    assert ensure_directions(cfg, run, traj) is None
    assert not any((tmp_path / "run" / "directions").glob("*"))

    samples = list(islice(iter_shard(tiny_scored["shards"][0]), 10))
    without = ShardScorer(run_url, cfg).score_samples(samples)
    full_cfg = dataclasses.replace(tiny_scored["config"], methods=[*NO_DIRECTIONS, "diffin"])
    with_dirs = ShardScorer(tiny_scored["run"], full_cfg).score_samples(samples)
    for column, values in without.items():
        np.testing.assert_array_equal(values, with_dirs[column], err_msg=column)


def test_direction_files_belong_to_the_architecture_not_only_the_checkpoint_bytes(
    tiny_run, tmp_path
):
    """Before: a re-import naming another architecture with the same parameter layout
    (open_clip's X and X-quickgelu) reused the direction files of the first."""
    import json

    from pipeline.tensors import load_tensors

    run_url = copy_run(tiny_run["run"], tmp_path / "run")
    run = RunDir(run_url)
    cfg = ScoreConfig(data=tiny_run["data"], run=run_url, methods=["tracin"], threads=1)
    ensure_directions(cfg, run, load_trajectory(run))
    step = load_trajectory(run).checkpoints[-1].step
    before = load_tensors(run.directions(step))[1]["fingerprint"]
    ensure_directions(cfg, run, load_trajectory(run))  # nothing changed: kept
    assert load_tensors(run.directions(step))[1]["fingerprint"] == before
    path = Path(run.trajectory_json)
    record = json.loads(path.read_text())
    record["model_config"] = {**record["model_config"], "quick_gelu": True}
    path.write_text(json.dumps(record))
    ensure_directions(cfg, run, load_trajectory(run))
    assert load_tensors(run.directions(step))[1]["fingerprint"] != before


def test_a_target_rewritten_in_place_gets_another_fingerprint(tiny_run, tiny_scored, tmp_path):
    """The fingerprint hashed the target's uids only: new pairs under the same path and keys
    (so the same uids) reused the old directions and score parts (review)."""
    import io
    import tarfile

    import torch

    from pipeline.model import factory
    from pipeline.score.directions import target_set

    def rewrite(src: str, dst: Path, suffix: bytes) -> None:
        out = io.BytesIO()
        with tarfile.open(src) as tin, tarfile.open(fileobj=out, mode="w") as tout:
            for m in tin.getmembers():
                data = tin.extractfile(m).read()
                if m.name.endswith(".txt"):
                    data += suffix
                info = tarfile.TarInfo(m.name)
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))
        dst.write_bytes(out.getvalue())

    target = tmp_path / "target" / "00000.tar"
    target.parent.mkdir()
    run = RunDir(tiny_run["run"])
    bundle = factory.create(load_trajectory(run).model)
    cfg = ScoreConfig(data=tiny_run["data"], run=run.url, target=str(target), target_max=16)
    prints = []
    for suffix in (b"", b" at dusk"):
        rewrite(tiny_scored["shards"][0], target, suffix)
        images, tokens, info = target_set(cfg, run, bundle, torch.float32)
        prints.append((info["target_fingerprint"], info["target_size"]))
    assert prints[0][1] == prints[1][1] == 16  # the same pairs by uid ...
    assert prints[0][0] != prints[1][0]  # ... with other captions


def test_unusable_target_rows_and_damaged_target_shards_are_counted_and_said(
    tiny_run, tiny_scored, tmp_path, caplog
):
    """Review: a --target holding error rows and damaged shards recorded only its size; the
    rows it could not use were dropped without a word."""
    import io
    import tarfile

    import torch

    from pipeline.errors import ConfigError
    from pipeline.model import factory
    from pipeline.score.directions import target_set

    good = tmp_path / "good.tar"
    out = io.BytesIO()
    with tarfile.open(tiny_scored["shards"][0]) as tin, tarfile.open(fileobj=out, mode="w") as tout:
        spoilt = 0
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name.endswith(".jpg") and spoilt < 3:  # three samples without an image
                data, spoilt = b"not an image", spoilt + 1
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    good.write_bytes(out.getvalue())
    (tmp_path / "html.tar").write_bytes(b"<html>404</html>" * 64)
    run = RunDir(tiny_run["run"])
    bundle = factory.create(load_trajectory(run).model)
    cfg = ScoreConfig(
        data=tiny_run["data"], run=run.url, target=f"{good}::{tmp_path}/html.tar", target_max=999
    )
    with caplog.at_level("WARNING", logger="pipeline.score.directions"):
        _, _, info = target_set(cfg, run, bundle, torch.float32)
    assert info["target_rows_error"] == 3
    assert info["target_error_reasons"] == {"undecodable image": 3}
    assert list(info["target_shards_damaged"]) == [f"{tmp_path}/html.tar"]
    assert "not a tar file" in info["target_shards_damaged"][f"{tmp_path}/html.tar"]
    assert "3 rows unusable (3 undecodable image); 1 shard(s) not read to the end" in caplog.text
    bad = dataclasses.replace(cfg, target=f"{tmp_path}/html.tar")
    with pytest.raises(ConfigError, match=r"no decodable pairs .*not read to the end.*not a tar"):
        target_set(bad, run, bundle, torch.float32)


def test_direction_files_a_rerun_does_not_recompute_are_said(tiny_scored, tmp_path, caplog):
    """Walkthrough: a rerun reused its direction files without a word."""
    run_url = copy_run(tiny_scored["run"], tmp_path / "run")
    run = RunDir(run_url)
    traj = load_trajectory(run)
    cfg = dataclasses.replace(tiny_scored["config"], run=run_url)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "directions").glob("*")}
    with caplog.at_level("INFO", logger="pipeline.score.directions"):
        ensure_directions(cfg, run, traj)
    n = len(traj.checkpoints)
    assert f"directions: reused for {n} of {n} checkpoints" in caplog.text
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}  # not written again


def test_a_target_cut_at_target_max_is_said(tiny_run, tiny_scored, caplog):
    """Walkthrough: the first 1024 target pairs were used without a word, and no option of
    `diffin score` changed it."""
    import torch

    from pipeline.cli import build_parser, command_for
    from pipeline.model import factory
    from pipeline.score.directions import target_set

    run = RunDir(tiny_run["run"])
    bundle = factory.create(load_trajectory(run).model)
    shard = tiny_scored["shards"][0]  # 100 pairs
    args = build_parser().parse_args(
        ["score", "--data", tiny_run["data"], "--run", run.url, "--target", shard]
    )
    assert args.target_max == ScoreConfig.target_max  # the flag's default is the config's
    args = build_parser().parse_args(
        ["score", "--data", tiny_run["data"], "--run", run.url, "--target-max", "16"]
    )
    assert args.target_max == 16
    assert "--target-max 16" in command_for("score", {"run": run.url, "target_max": 16})
    for cap, said in ((16, True), (100, False)):
        cfg = ScoreConfig(data=tiny_run["data"], run=run.url, target=shard, target_max=cap)
        caplog.clear()
        with caplog.at_level("INFO", logger="pipeline.score.directions"):
            _, _, info = target_set(cfg, run, bundle, torch.float32)
        assert info["target_size"] == cap
        assert (f"the first {cap} decodable pairs of {shard} are used" in caplog.text) == said
