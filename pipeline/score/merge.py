"""Merge per-shard parts into RUN/scores.parquet, streaming, refusing tables that do not add up."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import pyarrow.parquet as pq

from pipeline.rundir import write_bytes_atomic
from pipeline.score.table import read_table


class MergeError(RuntimeError):
    pass


def merge_parts(parts: Sequence[str], out_url: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """Concatenate parts in shard order (one part per shard: exactly once by construction).

    Memory holds one part at a time plus the output buffer; the counts are
    checked before the table is published.
    """
    import json

    rows = ok = errors = 0
    seen: set[tuple[str, int]] = set()
    uids: set[str] = set()
    dup_uids = 0
    buf = io.BytesIO()
    writer = None
    for url in parts:
        table = read_table(url)
        for shard, index in zip(
            table.column("shard").to_pylist(), table.column("index").to_pylist(), strict=True
        ):
            if (shard, index) in seen:
                raise MergeError(f"row {shard}#{index} appears twice (part {url})")
            seen.add((shard, index))
        for u in table.column("uid").to_pylist():
            dup_uids += u in uids
            uids.add(u)
        status = table.column("status").to_pylist()
        rows += len(status)
        ok += status.count("ok")
        errors += status.count("error")
        if writer is None:
            schema = table.schema.with_metadata(
                {b"diffin": json.dumps(metadata, default=str).encode()}
            )
            writer = pq.ParquetWriter(buf, schema)
        writer.write_table(table.cast(writer.schema))
    if writer is None:
        raise MergeError("no parts to merge")
    writer.close()
    if ok + errors != rows or len(seen) != rows:
        raise MergeError(f"rows do not add up: {rows} rows, {ok} ok, {errors} errors")
    write_bytes_atomic(out_url, buf.getvalue())
    return {
        "rows": rows,
        "rows_ok": ok,
        "rows_error": errors,
        "duplicate_uids": dup_uids,
        "table": out_url,
    }
