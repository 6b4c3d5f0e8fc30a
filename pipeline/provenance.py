"""What produced a result: package versions and the machine, recorded beside it."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

PACKAGES = ("diffin", "torch", "open_clip_torch", "ray", "webdataset", "pyarrow", "fsspec", "numpy")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def provenance() -> dict[str, Any]:
    return {"versions": versions(), "machine": platform.machine(), "node": platform.node()}
