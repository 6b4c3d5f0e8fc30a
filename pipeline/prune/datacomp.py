"""DataComp's subset format: a sorted structured array of dtype ``u8,u8`` (uid hex split in two)."""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np

from pipeline.rundir import read_bytes, write_bytes_atomic

UID_DTYPE = np.dtype("u8,u8")


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
