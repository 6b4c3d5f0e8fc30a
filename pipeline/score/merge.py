"""Merge per-shard parts into RUN/scores.parquet, streaming, refusing tables that do not add up.

Exactly once, from the reader's side:

* a part is trusted only with its completion record (``RUN/scores/done/NAME.json``,
  written after the part): the part's sha256 and row count must match it;
* within a part the rows of its shard are positions ``0..rows-1``, each once;
  an exact repeat of a row (same shard, position and uid) is dropped and
  counted, a conflicting one is an error;
* no shard appears in two parts;
* rows in (the completion records) = rows out (the table), or nothing is
  published.

Memory holds one part being merged and the next ``FETCH_AHEAD`` being read
(on an object store, requests in flight), plus 8 bytes per row (a uid hash,
to count duplicate uids); the table is streamed to a file beside its place
and renamed into it when whole and checked (locally; on an object store an
upload completed only then), so a failed merge leaves the earlier table.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.rundir import (
    exists,
    open_atomic,
    read_bytes,
    read_json,
    remove,
    write_bytes_atomic,
    write_json,
)
from pipeline.score.table import BASE_FIELDS, table_from_bytes


class MergeError(RuntimeError):
    pass


def done_url(part_url: str) -> str:
    """RUN/scores/parts/NAME.parquet -> RUN/scores/done/NAME.json (the part's completion record)."""
    parent, _, fname = part_url.rpartition("/")
    base = parent.rpartition("/")[0]
    name = fname[: -len(".parquet")] if fname.endswith(".parquet") else fname
    return f"{base}/done/{name}.json"


def write_part(table: pa.Table, part_url: str, record: dict[str, Any]) -> dict[str, Any]:
    """Write a part atomically, then its completion record (the commit marker); returns the record.

    An older record goes first: a crash between the part and its new record
    must leave the part unrecorded, not described by a record of other bytes.
    """
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    record = {
        **record,
        "rows": table.num_rows,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    remove(done_url(part_url))
    write_bytes_atomic(part_url, data)
    write_json(done_url(part_url), record)
    return record


def recorded_stamps(part_url: str, fingerprint: str) -> dict[str, dict[str, Any]]:
    """{shard URL: stamp} from the completion records beside ``part_url``'s written for
    ``fingerprint`` (those behind the current table; older ones may name the same shard).

    Each record is read by its own name: ``fs.cat`` of a list would expand a run
    path holding ``[`` as a glob, and read another run's records.
    """
    done = done_url(part_url).rpartition("/")[0]
    try:
        fs, path = fsspec.core.url_to_fs(done)
        files = [f for f in fs.ls(path, detail=False) if f.endswith(".json")]
    except FileNotFoundError:
        return {}

    def read(file: str) -> Any:
        try:
            return json.loads(fs.cat_file(file))
        except (OSError, ValueError):  # gone or torn: that shard is not checked
            return None

    out: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=16) as pool:  # object stores: requests in flight
        for rec in pool.map(read, files):
            if (
                isinstance(rec, dict)
                and rec.get("fingerprint") == fingerprint
                and isinstance(rec.get("stamp"), dict)
                and "shard" in rec
            ):
                out[rec["shard"]] = rec["stamp"]
    return out


def read_record(part_url: str) -> dict[str, Any] | None:
    """The completion record of a part, or None when there is none (or it is unreadable)."""
    return record_or_problem(part_url)[0]


def record_or_problem(part_url: str) -> tuple[dict[str, Any] | None, str | None]:
    """:func:`read_record`, and why a record that is there is not one (for the log); the
    same requests."""
    url = done_url(part_url)
    try:
        if not exists(url):
            return None, None
        rec = read_json(url)
    except Exception as exc:  # a torn or foreign file is the same as no record
        return None, f"its completion record cannot be read ({type(exc).__name__})"
    if isinstance(rec, dict) and "rows" in rec and "sha256" in rec:
        return rec, None
    return None, "its completion record is not one diffin wrote"


def _check_part(url: str, data: bytes, table: pa.Table, rec: dict[str, Any] | None) -> int:
    """Validate one part; returns how many exact duplicate rows it holds (to drop)."""
    if rec is not None:
        sha = hashlib.sha256(data).hexdigest()
        if sha != rec["sha256"]:
            raise MergeError(
                f"part {url}: sha256 {sha[:12]} != completion record {rec['sha256'][:12]}"
            )
        if table.num_rows != rec["rows"]:
            raise MergeError(
                f"part {url}: {table.num_rows} rows != completion record {rec['rows']}"
            )
    return 0


# Parts fetched ahead of the one being merged: on an object store each part is two
# or three requests, and 10,000 shards read one after another would take about half an
# hour at 50 ms a request.
FETCH_AHEAD = 16


def _fetch(url: str) -> tuple[dict[str, Any] | None, bytes | BaseException]:
    rec = read_record(url)
    try:
        return rec, read_bytes(url)
    except Exception as exc:  # raised where the merge reaches this part, as before
        return rec, exc


def _fetched(parts: Sequence[str]) -> Iterator[tuple[str, dict[str, Any] | None, bytes]]:
    """(url, record, bytes) of each part in order, up to FETCH_AHEAD of them in flight."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        ahead: deque = deque()
        todo = iter(parts)
        while True:
            while len(ahead) < FETCH_AHEAD and (url := next(todo, None)) is not None:
                ahead.append((url, pool.submit(_fetch, url)))
            if not ahead:
                return
            url, future = ahead.popleft()
            rec, data = future.result()
            yield url, rec, data  # type: ignore[misc]


def merge_parts(
    parts: Sequence[str],
    out_url: str,
    metadata: dict[str, Any],
    *,
    require_records: bool = False,
    fingerprint: str | None = None,
    columns: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Concatenate parts (one per shard, in shard order) into ``out_url``; returns the counts.

    With ``require_records`` every part needs a completion record (and, with
    ``fingerprint``, one written for that fingerprint); without it, records
    are checked where present. ``columns``: the score columns of the table (a part
    may hold more: those of scorers an earlier run asked for); default: a part's all.
    """
    rows_in = rows_out = ok = errors = dropped = 0
    nonfinite: dict[str, int] = {}
    shards_seen: set[str] = set()
    uid_hashes: list[np.ndarray] = []
    # Streamed into its final place (open_atomic: beside it and renamed, fsynced; an
    # upload completed only at the end on an object store): any error below leaves
    # no table and the earlier one as it was. (It was first written whole to the
    # system's temporary directory, then copied: twice its size on disk.)
    with open_atomic(out_url) as sink:
        writer: pq.ParquetWriter | None = None
        try:
            for url, rec, data in _fetched(parts):
                if rec is None and require_records:
                    raise MergeError(f"part {url} has no completion record: not trusted")
                if (
                    rec is not None
                    and fingerprint is not None
                    and rec.get("fingerprint") != fingerprint
                ):
                    raise MergeError(f"part {url} was written for another configuration")
                if isinstance(data, BaseException):
                    raise data
                table = table_from_bytes(data)
                _check_part(url, data, table, rec)
                if columns is not None:
                    missing = [c for c in columns if c not in table.column_names]
                    if missing:
                        raise MergeError(f"part {url} has no column {missing[0]!r}")
                    table = table.select([f.name for f in BASE_FIELDS] + list(columns))
                rows_in += rec["rows"] if rec is not None else table.num_rows
                table, n_dropped = _dedupe(url, table, shards_seen)
                dropped += n_dropped
                status = table.column("status").to_numpy(zero_copy_only=False)
                rows_out += table.num_rows
                ok += int((status == "ok").sum())
                errors += int((status == "error").sum())
                for name, n in _nonfinite(table, status == "ok").items():
                    nonfinite[name] = nonfinite.get(name, 0) + n
                uid_hashes.append(_uid_hash(table.column("uid").to_pylist()))
                if writer is None:
                    schema = table.schema.with_metadata(
                        {b"diffin": json.dumps(metadata, default=str).encode()}
                    )
                    writer = pq.ParquetWriter(sink, schema)
                writer.write_table(table.cast(writer.schema))
                del table, data
            if writer is None:
                raise MergeError("no parts to merge")
        finally:
            if writer is not None:
                writer.close()  # its footer; the file itself is open_atomic's
        if ok + errors != rows_out:
            raise MergeError(f"rows do not add up: {rows_out} rows, {ok} ok, {errors} errors")
        if rows_out + dropped != rows_in:
            raise MergeError(
                f"rows do not add up: {rows_in} rows in, {rows_out} out, {dropped} duplicates dropped"
            )
    hashes = np.sort(np.concatenate(uid_hashes)) if uid_hashes else np.zeros(0, np.uint64)
    dup_uids = int((hashes[1:] == hashes[:-1]).sum()) if len(hashes) else 0
    return {
        "rows": rows_out,
        "rows_in": rows_in,
        "rows_ok": ok,
        "rows_error": errors,
        "duplicate_rows_dropped": dropped,
        "duplicate_uids": dup_uids,
        # ok rows whose score is NaN or infinite, per column (none expected: a user must see it)
        "nonfinite_scores": {k: v for k, v in sorted(nonfinite.items()) if v},
        "table": out_url,
    }


def _nonfinite(table: pa.Table, ok: np.ndarray) -> dict[str, int]:
    """Per floating-point column, the ok rows whose value is missing, NaN or infinite."""
    out = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        if pa.types.is_floating(column.type):
            values = column.to_numpy(zero_copy_only=False)  # nulls come back as NaN
            out[name] = int((~np.isfinite(values[ok])).sum())
    return out


def _dedupe(url: str, table: pa.Table, shards_seen: set[str]) -> tuple[pa.Table, int]:
    """Check a part covers positions 0..n-1 of one shard each once; drop exact repeats."""
    if table.num_rows == 0:
        return table, 0
    shards = set(table.column("shard").to_pylist())
    again = shards & shards_seen
    if again:
        raise MergeError(f"part {url}: shard {sorted(again)[0]} already merged from another part")
    shards_seen |= shards
    shard = table.column("shard").to_pylist()
    index = table.column("index").to_pylist()
    uid = table.column("uid").to_pylist()
    first: dict[tuple[str, int], str] = {}
    keep = np.ones(table.num_rows, dtype=bool)
    for i, (s, j, u) in enumerate(zip(shard, index, uid, strict=True)):
        prev = first.get((s, j))
        if prev is None:
            first[(s, j)] = u
        elif prev == u:
            keep[i] = False
        else:
            raise MergeError(f"part {url}: row {s}#{j} appears twice with different uids")
    for s in shards:
        idx = sorted(j for (t, j) in first if t == s)
        if idx != list(range(len(idx))):
            raise MergeError(f"part {url}: rows of {s} are not positions 0..{len(idx) - 1}")
    n_dropped = int((~keep).sum())
    if n_dropped:
        table = table.filter(pa.array(keep))
    return table, n_dropped


def _uid_hash(uids: list[str]) -> np.ndarray:
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little")
            for u in uids
        ],
        dtype=np.uint64,
    )
