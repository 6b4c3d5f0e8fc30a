"""Reading a trajectory back: the rates each checkpoint stands for come from the schedule."""

from __future__ import annotations

import logging

import pytest

from pipeline.influence.estimator import checkpoint_weights
from pipeline.rundir import RunDir, write_json
from pipeline.score.trajectory import load_trajectory
from pipeline.train.schedule import lr_at


def _record(lr_of_checkpoint, schedule="cosine", **config):
    steps = [25, 50, 75, 100]
    conf = {"lr": 0.1, "warmup": 10, "steps": 100, "schedule": schedule, **config}
    return {
        "model": "diffin-tiny",
        "n_train": 500,
        "checkpoints": [
            {"step": s, "lr": lr_of_checkpoint(s), "sha256": "0" * 64, "path": f"ckpt-{s:06d}.pt"}
            for s in steps
        ],
        "config": conf,
    }


def _rate(s):
    return lr_at(s, 0.1, 10, 100, "cosine")


def test_checkpoints_carry_the_rates_of_their_blocks(tmp_path):
    run = RunDir(str(tmp_path))
    write_json(run.trajectory_json, _record(_rate))
    traj = load_trajectory(run)
    assert traj.checkpoints[-1].lr == pytest.approx(0.0, abs=1e-15)
    weights = checkpoint_weights(traj.checkpoints, traj.n_train)
    blocks = [range(0, 25), range(25, 50), range(50, 75), range(75, 100)]
    want = [sum(_rate(s) for s in b) / 500 for b in blocks]
    assert [w.first for w in weights] == pytest.approx(want, rel=1e-12)
    assert weights[-1].first > 0  # a cosine schedule's last block still counts


def test_a_schedule_that_disagrees_with_the_checkpoints_is_not_used(tmp_path, caplog):
    """A record whose checkpoints say other rates than its schedule: the checkpoints'
    rates stand for their blocks, as before, and the log says why."""
    run = RunDir(str(tmp_path))
    write_json(run.trajectory_json, _record(lambda s: 0.05))
    with caplog.at_level(logging.WARNING):
        traj = load_trajectory(run)
    assert all(c.block is None for c in traj.checkpoints)
    assert "recorded schedule gives lr" in caplog.text
    assert [w.first for w in checkpoint_weights(traj.checkpoints, 500)] == pytest.approx(
        [0.05 * 25 / 500] * 4
    )


def test_no_schedule_on_record_keeps_each_checkpoint_rate(tmp_path):
    record = _record(_rate)
    del record["config"]["schedule"]
    run = RunDir(str(tmp_path))
    write_json(run.trajectory_json, record)
    assert all(c.block is None for c in load_trajectory(run).checkpoints)
