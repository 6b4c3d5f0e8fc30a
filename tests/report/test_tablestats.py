"""The report's batch-wise statistics equal the same statistics over the whole table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.data.reader import shard_row_uid
from pipeline.report.tablestats import (
    BINS,
    Extremes,
    ShardErrors,
    column_histogram,
    histogram,
)


def _table(rows: int = 500, seed: int = 0) -> pa.Table:
    """Rows of 4 shards: error rows, NaN and infinite scores on ok rows, scores tied in
    few values, duplicate uids, and one shard's own damage row."""
    rng = np.random.default_rng(seed)
    shard = np.array([f"/p/{i:05d}.tar" for i in rng.integers(0, 4, rows)], object)
    uid = np.array([f"{u:032x}" for u in rng.integers(0, rows // 2, rows)], object)
    status = np.where(rng.random(rows) < 0.1, "error", "ok").astype(object)
    error = np.array(
        [
            rng.choice(["decode: truncated", "pixels: over the cap"]) if s == "error" else None
            for s in status
        ],
        object,
    )
    score = rng.integers(-5, 6, rows).astype(np.float64) / 3
    score[rng.random(rows) < 0.05] = np.nan
    score[rng.random(rows) < 0.02] = np.inf
    score[status == "error"] = np.nan
    # the damage row of shard 2, in the middle of the table
    shard[rows // 2], uid[rows // 2] = "/p/00002.tar", shard_row_uid("/p/00002.tar")
    status[rows // 2], error[rows // 2] = "error", "unreadable shard: truncated tar"
    return pa.table(
        {
            "uid": pa.array(uid, pa.string()),
            "shard": pa.array(shard, pa.string()),
            "index": pa.array(np.arange(rows), pa.int64()),
            "status": pa.array(status, pa.string()),
            "error": pa.array(error, pa.string()),
            "diffin": pa.array(score, mask=np.isnan(score) & (status == "error")),
        }
    )


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize("n", [1, 5, 40])
def test_extremes_equal_a_full_sort_by_score_uid_and_position(chunk, n):
    table = _table()
    ext = Extremes("diffin", n)
    for batch in table.to_batches(max_chunksize=chunk):
        ext.add(batch)
    frame = table.to_pandas()
    frame["position"] = np.arange(len(frame))
    ok = frame[(frame.status == "ok") & np.isfinite(frame.diffin)]
    for lowest, got in ((True, ext.lowest), (False, ext.highest)):
        want = ok.sort_values(
            ["diffin", "uid", "position"], ascending=[lowest, True, True], kind="stable"
        ).head(n)
        assert got.position.tolist() == want.position.tolist()
        assert got.diffin.tolist() == want.diffin.tolist()
        assert got.shard.tolist() == want.shard.tolist()


def test_extremes_of_no_rows_or_none_asked_are_empty():
    table = _table()
    none_asked = Extremes("diffin", 0)
    for batch in table.to_batches(max_chunksize=64):
        none_asked.add(batch)
    assert len(none_asked.lowest) == len(none_asked.highest) == 0
    errors_only = Extremes("diffin", 3)
    errors_only.add(table.filter(pa.compute.equal(table.column("status"), "error")).to_batches()[0])
    assert len(errors_only.lowest) == 0


@pytest.mark.parametrize("chunk", [1, 13, 10_000])
def test_shard_errors_equal_a_groupby_of_the_whole_table(chunk):
    table = _table()
    errors = ShardErrors()
    for batch in table.to_batches(max_chunksize=chunk):
        errors.add(batch)
    frame = table.to_pandas()
    own = frame.uid == frame.shard.map(shard_row_uid)
    assert errors.rows == len(frame) and errors.errors == int((frame.status != "ok").sum())
    assert sorted(errors.shards) == sorted(frame.shard.unique())
    for shard, g in frame.groupby("shard"):
        counts, samples = errors.shards[shard], g[~own[g.index]]
        bad = samples[samples.status != "ok"]
        assert counts.samples == len(samples)
        assert counts.errors == len(bad)
        assert dict(counts.reasons) == bad.error.value_counts().to_dict()
        damage = g[own[g.index]].error
        assert counts.damage == (damage.iloc[0] if len(damage) else "")
    assert errors.shards["/p/00002.tar"].damage == "unreadable shard: truncated tar"


@pytest.mark.parametrize("chunk", [1, 50, 10_000])
@pytest.mark.parametrize("marked", [False, True])
def test_histogram_of_batches_equals_the_clipped_histogram_of_the_column(chunk, marked):
    table = _table(rows=2_000, seed=1)
    rng = np.random.default_rng(2)
    scores = rng.standard_cauchy(table.num_rows)  # long tails: the clip matters
    scores[rng.random(table.num_rows) < 0.03] = np.nan
    table = table.set_column(5, "diffin", pa.array(scores))
    bad_uids = set(table.column("uid").to_pylist()[::3])

    def defect(uids: pd.Series) -> np.ndarray:
        return uids.isin(bad_uids).to_numpy()

    columns = ["status", "diffin"] + (["uid"] if marked else [])
    got = column_histogram(
        table.select(columns).to_batches(max_chunksize=chunk),
        "diffin",
        table.num_rows,
        defect if marked else None,
    )
    frame = table.to_pandas()
    ok = frame[frame.status == "ok"]
    v = ok.diffin.to_numpy()
    finite = np.isfinite(v)
    lo, hi = np.percentile(v[finite], [1, 99])
    edges = np.linspace(lo, hi, BINS + 1)
    inside = finite & (v >= lo) & (v <= hi)
    np.testing.assert_array_equal(got.edges, edges)
    assert got.outside == int((finite & ~inside).sum()) > 0
    if marked:
        is_bad = ok.uid.isin(bad_uids).to_numpy()
        np.testing.assert_array_equal(got.counts, np.histogram(v[inside & ~is_bad], edges)[0])
        np.testing.assert_array_equal(got.marked, np.histogram(v[inside & is_bad], edges)[0])
    else:
        assert got.marked is None
        np.testing.assert_array_equal(got.counts, np.histogram(v[inside], edges)[0])


def test_histogram_of_no_scores_or_one_value_has_a_range():
    empty = histogram(np.array([]))
    assert empty.edges[0] == 0.0 and empty.edges[-1] == 1.0 and empty.counts.sum() == 0
    flat = histogram(np.full(10, 2.0))
    assert (flat.edges[0], flat.edges[-1]) == (1.5, 2.5)
    assert flat.counts.sum() == 10 and flat.outside == 0


def test_a_table_longer_than_declared_is_refused_not_overrun():
    table = _table(rows=50)
    with pytest.raises(ValueError, match="more rows"):
        column_histogram(table.to_batches(), "diffin", 10)
