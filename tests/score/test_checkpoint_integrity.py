"""Scoring trusts only the checkpoints training recorded: sha256-checked, loaded without pickle."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.rundir import RunDir
from pipeline.score.config import ScoreConfig
from pipeline.score.directions import ensure_directions
from pipeline.score.trajectory import load_state_dict, load_trajectory
from pipeline.score.worker import ShardScorer


def _copy(tiny_run, dst: Path) -> tuple[str, RunDir]:
    shutil.copytree(tiny_run["run"], dst)
    return str(dst), RunDir(str(dst))


def _tamper(run: RunDir, step: int) -> None:
    path = Path(run.checkpoint(step))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _cfg(tiny_run, run: str) -> ScoreConfig:
    return ScoreConfig(data=tiny_run["data"], run=run, methods=["diffin", "tracin"], threads=1)


def test_a_changed_checkpoint_is_refused_before_directions(tiny_run, tmp_path):
    url, run = _copy(tiny_run, tmp_path / "run")
    traj = load_trajectory(run)
    _tamper(run, traj.checkpoints[0].step)
    with pytest.raises(ConfigError, match="sha256 .* does not match the recorded"):
        ensure_directions(_cfg(tiny_run, url), run, traj)


def test_a_checkpoint_changed_after_directions_is_refused_by_the_scorer(tiny_run, tmp_path):
    url, run = _copy(tiny_run, tmp_path / "run")
    cfg = _cfg(tiny_run, url)
    traj = load_trajectory(run)
    ensure_directions(cfg, run, traj)
    _tamper(run, traj.checkpoints[-1].step)
    with pytest.raises(ConfigError, match="the file changed since training"):
        ShardScorer(url, cfg)


def test_a_checkpoint_with_pickled_objects_is_not_unpickled(tiny_run, tmp_path):
    """Even with a matching (re-recorded) sha256, loading runs no arbitrary unpickling."""
    _, run = _copy(tiny_run, tmp_path / "run")
    traj = load_trajectory(run)
    step = traj.checkpoints[0].step
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1), "payload": datetime.date(2020, 1, 1)}, buf)
    Path(run.checkpoint(step)).write_bytes(buf.getvalue())
    record = json.loads(Path(run.trajectory_json).read_text())
    record["checkpoints"][0]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    Path(run.trajectory_json).write_text(json.dumps(record))
    with pytest.raises(pickle.UnpicklingError, match="datetime"):
        load_state_dict(run, load_trajectory(run), step)
