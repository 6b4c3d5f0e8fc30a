"""Score tables of several proxy runs read as one: each score column the mean over the runs.

One proxy trajectory is one draw (docs/accuracy.md, sections 2c and 2d): the same pool
scored on proxies trained with other seeds ranks it differently, and the mean over a few
of them ranks it better than any one does. :class:`EnsembleTable` reads the runs' tables
side by side, a batch at a time, like :class:`pipeline.prune.select.Table`: the rows are
the first table's, each float score column is replaced by its mean over the tables, and a
row is ``ok`` only where it is ok in every table (elsewhere its status reads ``error``
and its error names the run that could not score it).

The tables must hold the same rows in the same order, which is what scoring the same
``--data`` gives (rows follow the shards and each shard's sample order, whatever the
workers). A table with another row count is refused when it is opened; one whose uids
differ, in the first pass over the rows, before a rule has kept anything.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from pipeline.errors import ConfigError
from pipeline.prune.config import NON_SCORE_COLUMNS
from pipeline.prune.select import BATCH_ROWS, Table, _floats, _ok


class EnsembleTable(Table):
    """The first table's rows with each float score column averaged over ``others`` too."""

    def __init__(self, url: str, others: Sequence[str], batch_rows: int = BATCH_ROWS) -> None:
        super().__init__(url, batch_rows)
        self.others = [Table(u, batch_rows) for u in others]
        for other in self.others:
            if other.num_rows != self.num_rows:
                raise ConfigError(
                    f"ensemble: {other.url} holds {other.num_rows} rows, {url} {self.num_rows}: "
                    "an ensemble averages the scores of one pool, scored with the same --data"
                )
        # a score column the ensemble cannot average is no column of the ensemble
        shared = set.intersection(*(set(t.columns) for t in self.others))
        self.averaged = [
            c
            for c in self.columns
            if c not in NON_SCORE_COLUMNS and pa.types.is_floating(self.schema.field(c).type)
        ]
        self.missing = {
            c: [t.url for t in self.others if c not in t.columns] for c in self.averaged
        }
        self.missing = {c: urls for c, urls in self.missing.items() if urls}
        self.columns = [c for c in self.columns if c in shared or c in NON_SCORE_COLUMNS]

    def require(self, columns: Sequence[str]) -> None:
        """Refuse ranking by a column some table lacks, naming that table."""
        for c in columns:
            if c in self.missing:
                raise ConfigError(
                    f"ensemble: no column {c!r} in {', '.join(self.missing[c])}: score every "
                    f"run of the ensemble with {c}"
                )

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        columns = list(columns)
        mean = [c for c in columns if c in self.averaged]
        need = list(dict.fromkeys([*columns, "uid", "status", "error"]))
        need = [c for c in need if c in self.schema.names]
        others = [
            _rechunked(t.batches(list(dict.fromkeys(["uid", "status", *mean]))))
            for t in self.others
        ]
        for batch in Table.batches(self, need):
            n = batch.num_rows
            if n == 0:
                continue
            uid = batch.column("uid")
            ok = _ok(batch)
            sums = {c: _floats(batch.column(c)) for c in mean}
            failed_in: list[str | None] = [None] * n
            for table, stream in zip(self.others, others, strict=True):
                part = stream.take(n)
                if not part.column("uid").equals(uid):
                    raise ConfigError(
                        f"ensemble: {table.url} holds other rows, or the same rows in another "
                        f"order, than {self.url}: score every run of the ensemble with the "
                        "same --data"
                    )
                their_ok = _ok(part)
                for i in np.flatnonzero(ok & ~their_ok):
                    failed_in[i] = table.url
                ok = ok & their_ok
                for c in mean:
                    sums[c] = sums[c] + _floats(part.column(c))
            out = {name: batch.column(name) for name in batch.schema.names}
            for c in mean:
                out[c] = pa.array(sums[c] / (1 + len(self.others)))
            out["status"] = pa.array(np.where(ok, "ok", "error"))
            if "error" in out:
                errors = out["error"].to_pylist()
                out["error"] = pa.array(
                    [
                        f"not scored in the ensemble's run {u}" if u is not None else e
                        for e, u in zip(errors, failed_in, strict=True)
                    ],
                    pa.string(),
                )
            yield pa.record_batch([out[c] for c in columns], names=columns)
        for stream in others:
            stream.end()


class _rechunked:
    """Record batches taken ``n`` rows at a time, whatever the sizes they come in."""

    def __init__(self, batches: Iterator[pa.RecordBatch]) -> None:
        self._batches = batches
        self._held: list[pa.RecordBatch] = []
        self._rows = 0

    def take(self, n: int) -> pa.RecordBatch:
        while self._rows < n:
            nxt = next(self._batches, None)
            if nxt is None:
                break
            self._held.append(nxt)
            self._rows += nxt.num_rows
        if self._rows < n:
            raise ConfigError("ensemble: a table of the ensemble ended before the first one")
        whole = pa.Table.from_batches(self._held).combine_chunks()
        head, rest = whole.slice(0, n), whole.slice(n)
        self._held = rest.to_batches() if rest.num_rows else []
        self._rows = rest.num_rows
        return head.combine_chunks().to_batches()[0]

    def end(self) -> None:
        """Refuse a table with rows left over, then close its file."""
        left = self._rows + sum(b.num_rows for b in self._batches)
        if left:
            raise ConfigError("ensemble: a table of the ensemble holds more rows than the first")
