"""Score tables of several proxy runs read as one: each score column the mean over the runs.

One proxy trajectory is one draw (docs/accuracy.md, sections 2c and 2d): the same pool
scored on proxies trained with other seeds ranks it differently, and the mean over a few
of them ranks it better than any one does. :class:`EnsembleTable` reads the runs' tables
side by side, a batch at a time, like :class:`pipeline.prune.select.Table`: the rows are
the first table's, each column the rule ranks by is replaced by its mean over the
tables, and a row is ``ok`` only where it is ok in every table (elsewhere its status
reads ``error``: it is counted with the error rows, not ranked).

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
from pipeline.prune.select import BATCH_ROWS, Table, _floats, _ok


class EnsembleTable(Table):
    """The first table's rows with the ``averaged`` columns' means over ``others`` too.

    Every other column (``balance_by``'s, the captions, ...) is the first table's.
    """

    def __init__(
        self,
        url: str,
        others: Sequence[str],
        averaged: Sequence[str],
        batch_rows: int = BATCH_ROWS,
    ) -> None:
        super().__init__(url, batch_rows)
        self.others = [Table(u, batch_rows) for u in others]
        for other in self.others:
            if other.num_rows != self.num_rows:
                raise ConfigError(
                    f"ensemble: {other.url} holds {other.num_rows} rows, {url} {self.num_rows}: "
                    "an ensemble averages the scores of one pool, scored with the same --data"
                )
        # a column --run's table lacks is refused by the rule, as without an ensemble
        self.averaged = [c for c in dict.fromkeys(averaged) if c in self.columns]
        for table in [self, *self.others]:
            for c in self.averaged:
                if c not in table.columns:
                    raise ConfigError(
                        f"ensemble: no column {c!r} in {table.url}: score every run of the "
                        f"ensemble with {c}"
                    )
                kind = table.schema.field(c).type
                if not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
                    raise ConfigError(
                        f"ensemble: column {c!r} of {table.url} is not numeric ({kind})"
                    )
        # the mean of integer scores is no integer
        self.schema = pa.schema(
            [pa.field(f.name, pa.float64()) if f.name in self.averaged else f for f in self.schema],
            metadata=self.schema.metadata,
        )

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        columns = list(columns)
        mean = [c for c in columns if c in self.averaged]
        need = list(dict.fromkeys([*columns, "uid", "status"]))
        others = [
            _rechunked(t.batches(list(dict.fromkeys(["uid", "status", *mean]))))
            for t in self.others
        ]
        for batch in Table.batches(self, need):
            n = batch.num_rows
            if n == 0:
                continue
            # string and large_string uids are the same uids
            uid = batch.column("uid").cast(pa.string())
            ok = _ok(batch)
            sums = {c: _floats(batch.column(c)) for c in mean}
            for table, stream in zip(self.others, others, strict=True):
                part = stream.take(n)
                if not part.column("uid").cast(pa.string()).equals(uid):
                    raise ConfigError(
                        f"ensemble: {table.url} holds other rows, or the same rows in another "
                        f"order, than {self.url}: score every run of the ensemble with the "
                        "same --data"
                    )
                ok = ok & _ok(part)  # a row another run could not score is not ranked
                for c in mean:
                    sums[c] = sums[c] + _floats(part.column(c))
            out = {name: batch.column(name) for name in batch.schema.names}
            for c in mean:
                out[c] = pa.array(sums[c] / (1 + len(self.others)))
            out["status"] = pa.array(np.where(ok, "ok", "error"))
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
        rest = whole.slice(n)
        self._held = rest.to_batches() if rest.num_rows else []
        self._rows = rest.num_rows
        return whole.slice(0, n).to_batches()[0]

    def end(self) -> None:
        """Refuse a table with rows left over, then close its file."""
        left = self._rows + sum(b.num_rows for b in self._batches)
        if left:
            raise ConfigError("ensemble: a table of the ensemble holds more rows than the first")
