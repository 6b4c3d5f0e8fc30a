"""Keep an earlier part's score columns when a rerun asks for other scorers.

A part's completion record names, per scorer, the fingerprint its columns
were computed under (``methods``: {scorer: hash}; a scorer's hash covers the
inputs and options that scorer depends on, see ``driver.method_hashes``). A
rerun keeps the columns of every scorer whose hash is unchanged and computes
only the others: adding ``loss`` to a ``diffin`` run must not pay for Diff-In
again, which is most of the cost of scoring.

Two cases:

* the earlier part holds every scorer asked for: only its record is written
  again, for the new fingerprint (:func:`rerecord`); the shard is not read;
* it holds some of them: the shard is read and scored for the others, and
  the kept columns are taken row by row from the earlier part, provided the
  rows are the same (:func:`kept_scores`); otherwise everything is scored.

A part keeps the columns of scorers no longer asked for (:func:`carried`),
with their hashes in its record; the merge puts only the columns asked for
in the table. Dropping a scorer for one run and asking for it again later
recomputes nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.data.sample import Sample
from pipeline.rundir import RunDir, read_bytes, write_json
from pipeline.score.merge import done_url
from pipeline.score.table import table_from_bytes


def reusable(record: dict[str, Any] | None, hashes: dict[str, str]) -> list[str]:
    """The scorers of ``hashes`` whose columns ``record``'s part holds, in ``hashes``' order.

    Only a part scored whole (status "ok") is a source: a partial or failed
    one is scored again in full.
    """
    if record is None or record.get("status") != "ok":
        return []
    held = record.get("methods")
    if not isinstance(held, dict):  # written before records named their scorers
        return []
    return [m for m, h in hashes.items() if held.get(m) == h]


def read_part(run: RunDir, name: str, record: dict[str, Any]) -> pa.Table | None:
    """The part of shard ``name`` if its bytes are still those ``record`` describes."""
    try:
        data = read_bytes(run.part(name))
    except (OSError, ValueError):
        return None
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        return None
    return table_from_bytes(data)


def kept_scores(
    earlier: pa.Table, samples: Sequence[Sample], columns: Sequence[str]
) -> dict[str, np.ndarray] | None:
    """``columns`` of ``earlier`` for the ok rows of ``samples``, in order (what
    ``build_part`` takes), or None when the rows are not the same: another row count,
    uid, position or status means the shard did not read as it did then."""
    if earlier.num_rows != len(samples) or any(c not in earlier.column_names for c in columns):
        return None
    same = (
        earlier.column("uid").to_pylist() == [s.uid for s in samples]
        and earlier.column("index").to_pylist() == [s.index for s in samples]
        and earlier.column("status").to_pylist() == ["ok" if s.ok else "error" for s in samples]
    )
    if not same:
        return None
    ok = np.array([s.ok for s in samples], dtype=bool)
    return {
        c: earlier.column(c).to_numpy(zero_copy_only=False).astype(np.float64)[ok] for c in columns
    }


def carried(record: dict[str, Any] | None, hashes: dict[str, str]) -> dict[str, str]:
    """{scorer: hash} of the scorers ``record``'s part holds that this run does not ask
    for: their columns stay in the part (not in the table), so asking for them again
    later costs nothing while their inputs are unchanged."""
    if (
        record is None
        or record.get("status") != "ok"
        or not isinstance(record.get("methods"), dict)
    ):
        return {}
    return {m: h for m, h in record["methods"].items() if m not in hashes}


def rerecord(
    run: RunDir, name: str, record: dict[str, Any], fingerprint: str, asked: list[str]
) -> dict[str, Any]:
    """The record of an earlier part that holds every scorer ``asked`` for, written again
    for the new fingerprint; the part's bytes stay as they are (the merge takes the columns
    asked for), so nothing is read or rewritten but the record. Atomic: a crash leaves the
    old record or the new one, each true of the part."""
    new = {**record, "fingerprint": fingerprint, "kept": list(asked), "seconds": 0.0}
    write_json(done_url(run.part(name)), new)
    return new
