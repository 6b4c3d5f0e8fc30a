"""A sample's scores do not depend on the number of Ray workers or on the order of the shards."""

import shutil

import numpy as np
import pyarrow.parquet as pq
import ray

from pipeline.data.shards import resolve_shards
from pipeline.score.config import ScoreConfig
from pipeline.score.driver import run_scoring

METHODS = ["diffin", "tracin", "loss", "random"]


def _score(tiny_run, tmp_path, name, data, workers):
    run = tmp_path / name
    shutil.copytree(tiny_run["run"], run)
    shutil.rmtree(run / "scores", ignore_errors=True)
    (run / "scores.parquet").unlink(missing_ok=True)
    try:
        run_scoring(
            ScoreConfig(data=data, run=str(run), methods=METHODS, workers=workers, batch_size=16)
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
    table = pq.read_table(run / "scores.parquet").to_pandas()
    return table.set_index("uid").sort_index()


def test_scores_do_not_depend_on_worker_count_or_shard_order(tiny_run, tmp_path):
    shards = resolve_shards(tiny_run["data"])
    one = _score(tiny_run, tmp_path, "one", tiny_run["data"], workers=1)
    two = _score(tiny_run, tmp_path, "two", "::".join(reversed(shards)), workers=2)
    assert len(one) == len(two) and (one.index == two.index).all()
    for col in METHODS:
        a, b = one[col].to_numpy(), two[col].to_numpy()
        assert np.allclose(a, b, rtol=1e-5, atol=1e-12, equal_nan=True), col
