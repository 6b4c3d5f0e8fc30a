"""Fixtures for the scoring tests: a tiny run ready to score, and a real Ray cluster (raycluster.py)."""

from __future__ import annotations

from typing import Any

import pytest
from raycluster import Cluster

POOL = {"samples": 576, "shard_size": 8, "eval_samples": 16, "seed": 4}
TRAIN = dict(
    model="diffin-tiny",
    steps=10,
    warmup=2,
    checkpoints=2,
    batch_size=32,
    target_size=32,
    reference_size=31,
)


@pytest.fixture(scope="session")
def score_run(tmp_path_factory) -> dict[str, Any]:
    """A tiny pool of many small shards, a trained trajectory and its direction vectors."""
    from pipeline.data.synth import SynthConfig, make_pool
    from pipeline.rundir import RunDir
    from pipeline.score.config import ScoreConfig
    from pipeline.score.directions import ensure_directions
    from pipeline.score.trajectory import load_trajectory
    from pipeline.train.config import TrainConfig
    from pipeline.train.trajectory import train

    base = tmp_path_factory.mktemp("score_run")
    pool = make_pool(str(base / "pool"), SynthConfig(**POOL))
    run = str(base / "run")
    train(TrainConfig(data=pool["train_data"], run=run, threads=1, **TRAIN))
    cfg = ScoreConfig(data=pool["train_data"], run=run, methods=["diffin", "random"])
    ensure_directions(cfg, RunDir(run), load_trajectory(RunDir(run)))
    return {"run": run, "data": pool["train_data"], "samples": pool["samples"], "base": base}


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray head on 127.0.0.2 with the dashboard on 127.0.0.1 (nodes are added by tests)."""
    cluster = Cluster()
    try:
        cluster.start_head(num_cpus=2)
        yield cluster
    finally:
        cluster.stop()
