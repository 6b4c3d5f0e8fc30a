"""How much memory this process may still take: to refuse, before reading a pool, a stage
that would hold more of it than the machine (or its container) has.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _stat(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def cgroup_room(root: Path = CGROUP_ROOT) -> int | None:
    """What the container's memory limit leaves (a Ray pod's limit, not the node's memory),
    or None without a limit. Page cache the kernel can reclaim counts as free: a pod
    that has read shards sits with its usage, cache included, near the limit.

    cgroup v2 (``memory.max``) or v1 (``memory/memory.limit_in_bytes``), as mounted
    for this process's namespace.
    """
    try:
        if (root / "memory.max").exists():
            limit = (root / "memory.max").read_text().strip()
            if limit == "max":
                return None
            used = int((root / "memory.current").read_text())
            cache = _stat(root / "memory.stat", "inactive_file")
            return max(0, int(limit) - (used - cache))
        v1 = root / "memory"
        limit = int((v1 / "memory.limit_in_bytes").read_text())
        if limit >= 1 << 62:  # v1 writes "no limit" as a page-rounded 2**63 - 1
            return None
        used = int((v1 / "memory.usage_in_bytes").read_text())
        cache = _stat(v1 / "memory.stat", "total_inactive_file")
        return max(0, limit - (used - cache))
    except (OSError, ValueError):
        return None


def available_bytes() -> int | None:
    """Bytes this process can still allocate without swapping or being killed; None if unknown."""
    known = [b for b in (_meminfo_available(), cgroup_room()) if b is not None]
    return min(known) if known else None


def human_bytes(n: float) -> str:
    """``n`` bytes as MiB below a GiB, else GiB, one decimal."""
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"
