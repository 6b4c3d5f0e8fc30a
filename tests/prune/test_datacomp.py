"""DataComp's subset format: sorted structured ``u8,u8`` arrays of split uids."""

from __future__ import annotations

import hashlib

import numpy as np

from pipeline.prune.datacomp import (
    UID_DTYPE,
    array_to_uids,
    load_uids,
    save_uids,
    uids_to_array,
)


def _uids(n: int) -> list[str]:
    return [hashlib.md5(str(i).encode()).hexdigest() for i in range(n)]


def test_dtype_is_two_unsigned_64_bit_fields():
    arr = uids_to_array(_uids(5))
    assert arr.dtype == np.dtype("u8,u8") == UID_DTYPE
    assert arr.dtype.names == ("f0", "f1")
    assert arr.shape == (5,)


def test_split_is_the_two_hex_halves():
    uid = "0123456789abcdeffedcba9876543210"
    arr = uids_to_array([uid])
    assert int(arr[0]["f0"]) == 0x0123456789ABCDEF
    assert int(arr[0]["f1"]) == 0xFEDCBA9876543210
    top = "ffffffffffffffff" + "0" * 16  # the high bit set: must stay unsigned
    assert int(uids_to_array([top])[0]["f0"]) == 2**64 - 1


def test_sorted_like_datacomp_and_round_trips():
    uids = _uids(200)
    arr = uids_to_array(uids)
    pairs = arr.tolist()
    assert pairs == sorted(set(pairs))  # strictly increasing (f0, f1)
    assert np.array_equal(arr, np.sort(arr))
    assert array_to_uids(arr) == sorted(uids)
    member = uids_to_array([uids[17]])
    pos = np.searchsorted(arr, member)[0]  # the lookup sorted order allows
    assert arr[pos] == member[0]


def test_duplicates_collapse_and_empty_works():
    uids = _uids(3)
    assert len(uids_to_array(uids + uids[:2])) == 3
    empty = uids_to_array([])
    assert empty.shape == (0,) and empty.dtype == UID_DTYPE
    assert array_to_uids(empty) == []


def test_save_and_load_without_pickle(tmp_path):
    uids = _uids(50)
    url = str(tmp_path / "sub" / "uids.npy")
    assert save_uids(url, uids + uids[:5]) == 50
    back = np.load(url, allow_pickle=False)  # what DataComp's tooling does
    assert back.dtype == UID_DTYPE
    assert np.array_equal(back, load_uids(url))
    assert array_to_uids(back) == sorted(uids)
