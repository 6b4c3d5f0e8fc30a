"""The memory a stage may still take, as stages check it before reading a pool."""

from __future__ import annotations

import os

import pytest

import pipeline.memory as memory
from pipeline.memory import available_bytes, cgroup_room, human_bytes

GIB = 1 << 30


def test_available_memory_is_known_here_and_within_the_machine():
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    room = available_bytes()
    assert room is not None and 0 < room <= total


def test_the_smaller_of_the_machine_and_the_container_counts(monkeypatch):
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 8 * GIB)
    monkeypatch.setattr(memory, "cgroup_room", lambda: 2 * GIB)
    assert available_bytes() == 2 * GIB
    monkeypatch.setattr(memory, "cgroup_room", lambda: None)  # no limit
    assert available_bytes() == 8 * GIB
    monkeypatch.setattr(memory, "_meminfo_available", lambda: None)
    assert available_bytes() is None  # unknown: the callers do not refuse


def _v2(root, limit: str, current: int, inactive_file: int) -> None:
    (root / "memory.max").write_text(limit + "\n")
    (root / "memory.current").write_text(f"{current}\n")
    (root / "memory.stat").write_text(f"anon 1\ninactive_file {inactive_file}\nactive_file 5\n")


def test_cgroup_v2_room_counts_reclaimable_page_cache_as_free(tmp_path):
    """Review: memory.current includes page cache, near the limit in a pod that read shards."""
    _v2(tmp_path, str(16 * GIB), current=15 * GIB, inactive_file=10 * GIB)
    assert cgroup_room(tmp_path) == 11 * GIB
    _v2(tmp_path, "max", current=15 * GIB, inactive_file=0)
    assert cgroup_room(tmp_path) is None


@pytest.mark.parametrize(
    "limit, expected", [(4 * GIB, 3 * GIB), ((1 << 63) - 4096, None)], ids=["limit", "unlimited"]
)
def test_cgroup_v1_room(tmp_path, limit, expected):
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{2 * GIB}\n")
    (v1 / "memory.stat").write_text(f"inactive_file 7\ntotal_inactive_file {GIB}\n")
    assert cgroup_room(tmp_path) == expected


def test_no_cgroup_files_means_no_limit_known(tmp_path):
    assert cgroup_room(tmp_path) is None


def test_sizes_read_in_mib_below_a_gib():
    assert human_bytes(5 << 20) == "5.0 MiB"
    assert human_bytes(3 * GIB) == "3.0 GiB"
