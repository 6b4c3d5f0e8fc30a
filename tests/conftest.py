"""Session fixtures shared across test packages: a tiny generated pool and a tiny trained run.

Treat both as read-only: a test that writes into a run copies it first
(``copy_run``), so tests never see each other's outputs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

# One Ray authentication mode for every Ray this test process starts or joins:
# the embedded instances (run_scoring, the demo, Ray Train) and the loopback
# clusters of tests/score/raycluster.py (started with auth disabled). A process
# that has used a token-auth Ray and then joins an auth-disabled one (or the
# reverse) gets actors that die at start-up ("died unexpectedly").
os.environ["RAY_AUTH_MODE"] = "disabled"

TINY_TRAIN = dict(
    model="diffin-tiny",
    steps=30,
    checkpoints=2,
    batch_size=32,
    warmup=5,
    target_size=32,
    reference_size=31,
    grad_batches=2,
    threads=1,
    seed=0,
)


@pytest.fixture(scope="session")
def tiny_pool(tmp_path_factory) -> dict[str, Any]:
    """300 generated pairs in 3 shards of 100 (make_pool's summary, ``train_data`` included)."""
    from pipeline.data.synth import SynthConfig, make_pool

    out = tmp_path_factory.mktemp("tiny_pool")
    cfg = SynthConfig(samples=300, shard_size=100, eval_samples=20, image_size=32, seed=0)
    return make_pool(str(out), cfg)


@pytest.fixture(scope="session")
def tiny_run(tiny_pool, tmp_path_factory) -> dict[str, Any]:
    """A diffin-tiny proxy trained for 30 steps with 2 checkpoints: {"run", "data", "config", "record"}."""
    from pipeline.train.config import TrainConfig
    from pipeline.train.trajectory import train

    run = str(tmp_path_factory.mktemp("tiny_run"))
    cfg = TrainConfig(data=tiny_pool["train_data"], run=run, **TINY_TRAIN)
    record = train(cfg)
    return {"run": run, "data": tiny_pool["train_data"], "config": cfg, "record": record}


def copy_run(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


@pytest.fixture(scope="session")
def tiny_scored(tiny_run, tmp_path_factory) -> dict[str, Any]:
    """A copy of ``tiny_run`` with directions, one part per shard and the merged scores.parquet.

    Scored in-process with ShardScorer (no Ray): methods diffin, tracin, loss, random.
    """
    from pipeline.data.shards import resolve_shards, shard_names
    from pipeline.rundir import RunDir
    from pipeline.score.config import ScoreConfig
    from pipeline.score.directions import ensure_directions
    from pipeline.score.merge import merge_parts
    from pipeline.score.trajectory import load_trajectory
    from pipeline.score.worker import ShardScorer

    run_url = copy_run(tiny_run["run"], tmp_path_factory.mktemp("tiny_scored") / "run")
    cfg = ScoreConfig(
        data=tiny_run["data"],
        run=run_url,
        methods=["diffin", "tracin", "loss", "random"],
        batch_size=64,
        threads=1,
    )
    run = RunDir(run_url)
    ensure_directions(cfg, run, load_trajectory(run))
    scorer = ShardScorer(run_url, cfg)
    shards = resolve_shards(cfg.data)
    names = shard_names(shards)
    for url, name in zip(shards, names, strict=True):
        scorer.score_shard(url, name)
    merge_parts([run.part(n) for n in names], run.scores, metadata={"score": cfg.to_dict()})
    return {"run": run_url, "data": cfg.data, "config": cfg, "shards": shards, "names": names}
