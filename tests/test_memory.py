"""The memory a stage may still take, as stages check it before reading a pool."""

from __future__ import annotations

import os

from pipeline.memory import available_bytes, human_bytes


def test_available_memory_is_known_here_and_below_the_machine_total():
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    room = available_bytes()
    assert room is not None and 0 < room <= total
    big = b"\x01" * (512 << 20)  # written, so resident: the room seen shrinks by as much
    try:
        assert available_bytes() < room - (256 << 20)
    finally:
        del big


def test_sizes_read_in_mib_below_a_gib():
    assert human_bytes(5 << 20) == "5.0 MiB"
    assert human_bytes(3 << 30) == "3.0 GiB"
