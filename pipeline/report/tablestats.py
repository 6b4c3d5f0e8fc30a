"""What the report shows of a score table, gathered one record batch at a time.

A pool of millions of pairs gives a score table of millions of rows. The report
read all of them into pandas (about 425 bytes a row: 0.85 GB at 2 million rows,
``benchmarks/report_memory.py``). It now holds a few counts per shard, the
gallery's candidate rows, and one scorer's finite scores at a time for that
scorer's histogram (8 bytes a row, so its 1st and 99th percentiles stay exact).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.reader import shard_row_uid

BINS = 40
SHARD_COLUMNS = ["uid", "shard", "status", "error"]


def _ok_finite(batch: pa.RecordBatch, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(mask of the ok rows with a finite score, those scores as float64)."""
    ok = pc.fill_null(pc.equal(batch.column("status"), "ok"), False).to_numpy(zero_copy_only=False)
    as_float = pc.cast(batch.column(column), pa.float64(), safe=False)
    values = np.asarray(pc.fill_null(as_float, np.nan).to_numpy(zero_copy_only=False))
    keep = np.asarray(ok) & np.isfinite(values)
    return keep, values[keep]


@dataclass
class ShardCounts:
    samples: int = 0
    errors: int = 0
    reasons: Counter = field(default_factory=Counter)
    damage: str = ""  # the error of the shard's own row: it could not be read to its end


class ShardErrors:
    """Rows and error rows per shard, fed batches of :data:`SHARD_COLUMNS`.

    A shard's own row (the reader's ``__shard__`` row) is no sample: it is kept as the
    shard's damage, not counted (walkthrough: a garbage tar of 30 pairs showed "rows 1,
    errors 1"). ``rows`` and ``errors`` count every row, as the table holds them.
    """

    def __init__(self) -> None:
        self.shards: dict[str, ShardCounts] = {}
        self.rows = 0
        self.errors = 0
        self._own_uid: dict[str, str] = {}

    def add(self, batch: pa.RecordBatch) -> None:
        frame = batch.select(SHARD_COLUMNS).to_pandas()
        self.rows += len(frame)
        for shard in frame.shard.unique():  # in table order: the listing's ties follow it
            if shard not in self.shards:
                self.shards[shard] = ShardCounts()
                self._own_uid[shard] = shard_row_uid(shard)
        own = (frame.uid == frame.shard.map(self._own_uid)).to_numpy()
        bad = (frame.status != "ok").to_numpy()
        self.errors += int(bad.sum())
        for shard, n in frame.shard[~own].value_counts(sort=False).items():
            self.shards[shard].samples += int(n)
        failed = frame[bad & ~own]
        for shard, n in failed.shard.value_counts(sort=False).items():
            self.shards[shard].errors += int(n)
        for (shard, reason), n in failed.groupby(["shard", "error"], sort=False).size().items():
            self.shards[shard].reasons[reason] += int(n)
        for shard, error in zip(frame.shard[own], frame.error[own], strict=True):
            if not self.shards[shard].damage:
                self.shards[shard].damage = error or ""


class Extremes:
    """The ``n`` lowest and highest ok rows of one column, ties broken by uid and then table
    position (as the prune stage breaks them), fed batches of :meth:`columns`."""

    def __init__(self, column: str, n: int) -> None:
        self.column = column
        self.n = max(int(n), 0)
        self._seen = 0
        self.lowest = self.highest = pd.DataFrame()

    def columns(self) -> list[str]:
        return list(dict.fromkeys(["uid", "shard", "index", "status", self.column]))

    def add(self, batch: pa.RecordBatch) -> None:
        keep, values = _ok_finite(batch, self.column)
        position = np.flatnonzero(keep) + self._seen
        self._seen += batch.num_rows
        if not self.n or not len(values):
            return
        rows = pd.DataFrame(
            {
                "uid": np.asarray(batch.column("uid").filter(pa.array(keep)).to_pylist(), object),
                "shard": batch.column("shard").filter(pa.array(keep)).to_pylist(),
                "index": batch.column("index").filter(pa.array(keep)).to_numpy(),
                self.column: values,
                "position": position,
            }
        )
        self.lowest = self._best(self.lowest, rows, lowest=True)
        self.highest = self._best(self.highest, rows, lowest=False)

    def _best(self, held: pd.DataFrame, rows: pd.DataFrame, lowest: bool) -> pd.DataFrame:
        v = rows[self.column].to_numpy()
        if len(v) > self.n:  # every row tied with the n-th is a candidate: the uid decides
            nth = np.partition(v if lowest else -v, self.n - 1)[self.n - 1]
            rows = rows[v <= nth] if lowest else rows[-v <= nth]
        both = pd.concat([held, rows], ignore_index=True) if len(held) else rows
        both = both.sort_values(
            [self.column, "uid", "position"], ascending=[lowest, True, True], kind="stable"
        )
        return both.head(self.n).reset_index(drop=True)


@dataclass
class Histogram:
    """Counts over :data:`BINS` bins between the 1st and 99th percentile of the finite
    scores (influence scores have long tails); ``outside``: finite scores beyond them."""

    edges: np.ndarray
    counts: np.ndarray  # every row inside, or the unmarked ones when ``marked`` is set
    marked: np.ndarray | None
    outside: int


def histogram(values: np.ndarray, marked: np.ndarray | None = None) -> Histogram:
    """The histogram of finite ``values``; with ``marked`` (bool per value) its rows apart.

    Without ``marked``, ``values`` is reordered in place (its percentiles are taken
    there: no copy of a column of millions)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values):
        if marked is None:
            lo, hi = np.percentile(values, [1, 99], overwrite_input=True)
        else:
            lo, hi = np.percentile(values, [1, 99])
    else:
        lo, hi = 0.0, 1.0
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, BINS + 1)
    # np.histogram leaves out what lies beyond the edges, as the clipped panel does
    if marked is None:
        counts, split = np.histogram(values, edges)[0], None
    else:
        marked = np.asarray(marked, dtype=bool)
        counts = np.histogram(values[~marked], edges)[0]
        split = np.histogram(values[marked], edges)[0]
    inside = int(counts.sum()) + (int(split.sum()) if split is not None else 0)
    return Histogram(edges, counts, split, len(values) - inside)


def column_histogram(
    batches: Iterable[pa.RecordBatch],
    column: str,
    rows: int,
    defect: Callable[[pd.Series], np.ndarray] | None = None,
) -> Histogram:
    """The histogram of ``column``'s finite scores over the ok rows of ``batches``
    (``rows``: at most how many; one float64 each). ``defect``: uids -> bool (an injected
    defect), read from a ``uid`` column the batches then hold."""
    values = np.empty(rows, dtype=np.float64)
    marked = np.empty(rows, dtype=bool) if defect is not None else None
    n = 0
    for batch in batches:
        keep, v = _ok_finite(batch, column)
        if n + len(v) > rows:
            raise ValueError(f"{column}: more rows than the {rows} the table declares")
        values[n : n + len(v)] = v
        if marked is not None:
            uids = pd.Series(batch.column("uid").filter(pa.array(keep)).to_pylist(), dtype=object)
            marked[n : n + len(v)] = defect(uids)
        n += len(v)
    return histogram(values[:n], None if marked is None else marked[:n])
