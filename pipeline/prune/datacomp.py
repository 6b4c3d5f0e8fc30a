"""DataComp's subset format: a sorted structured array of dtype ``u8,u8`` (uid hex split in two)."""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence

import numpy as np

from pipeline.rundir import read_bytes, write_bytes_atomic

UID_DTYPE = np.dtype("u8,u8")
_HEX32 = re.compile(r"[0-9a-f]{32}")


def uids_to_array(uids: Iterable[str]) -> np.ndarray:
    pairs = sorted({(int(u[:16], 16), int(u[16:32], 16)) for u in uids})
    return np.array(pairs, dtype=UID_DTYPE)


def array_to_uids(arr: np.ndarray) -> list[str]:
    return [f"{int(a):016x}{int(b):016x}" for a, b in arr.tolist()]


def save_uids(url: str, uids: Iterable[str]) -> int:
    arr = uids_to_array(uids)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    write_bytes_atomic(url, buf.getvalue())
    return len(arr)


def load_uids(url: str) -> np.ndarray:
    return np.load(io.BytesIO(read_bytes(url)), allow_pickle=False)


def uid_halves(uids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """32-hex uids as two uint64 arrays; sorting by (hi, lo) sorts the lowercase hex strings.

    Raises ValueError for any other uid (``int`` alone would take ``0x``, ``_``, spaces).
    """
    bad = next((u for u in uids if not _HEX32.fullmatch(u)), None)
    if bad is not None:
        raise ValueError(f"not a uid of 32 lowercase hex digits: {bad!r}")
    hi = np.fromiter((int(u[:16], 16) for u in uids), dtype=np.uint64, count=len(uids))
    lo = np.fromiter((int(u[16:32], 16) for u in uids), dtype=np.uint64, count=len(uids))
    return hi, lo


def save_uid_halves(url: str, hi: list[np.ndarray], lo: list[np.ndarray]) -> int:
    """Like :func:`save_uids`, from uids already split into their two 64-bit halves."""
    arr = np.empty(sum(len(h) for h in hi), dtype=UID_DTYPE)
    if len(arr):
        arr["f0"] = np.concatenate(hi)
        arr["f1"] = np.concatenate(lo)
    arr = np.unique(arr)  # sorted by (f0, f1), duplicates dropped
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    write_bytes_atomic(url, buf.getvalue())
    return len(arr)
