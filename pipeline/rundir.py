"""The run directory: every stage reads and writes here (a local path or an fsspec URL).

RUN/run.json                      config, versions, seeds, timing of each stage
RUN/trajectory/ckpt-STEP.pt       checkpoints (+ trajectory.json: step, lr, sha256)
RUN/sets/*.safetensors            reference negatives R, target V, gradient batches
RUN/directions/STEP.safetensors   g_B, g_V, w per checkpoint
RUN/scores/parts/SHARD.parquet    one part per input shard
RUN/scores.parquet                the merged table
RUN/prune/NAME/                   one manifest per keep rule
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def is_local(url: str) -> bool:
    fs, _ = fsspec.core.url_to_fs(url)
    return isinstance(fs, LocalFileSystem)


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path, exist_ok=True)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Readers never see a half-written file.

    Local: temporary name then rename. Object stores have no rename, but an
    object becomes visible only when its upload completes, so a direct write
    is already all-or-nothing.
    """
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def write_json(url: str, obj: Any) -> None:
    write_bytes_atomic(
        url, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
    )


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def sha256(url: str) -> str:
    h = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class RunDir:
    """Named paths inside one run directory."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def path(self, *parts: str) -> str:
        return join(self.url, *parts)

    @property
    def run_json(self) -> str:
        return self.path("run.json")

    @property
    def trajectory_json(self) -> str:
        return self.path("trajectory", "trajectory.json")

    def checkpoint(self, step: int) -> str:
        return self.path("trajectory", f"ckpt-{step:06d}.pt")

    def set_file(self, name: str) -> str:
        return self.path("sets", f"{name}.safetensors")

    def directions(self, step: int) -> str:
        return self.path("directions", f"{step:06d}.safetensors")

    @property
    def parts_dir(self) -> str:
        return self.path("scores", "parts")

    def part(self, shard_name: str) -> str:
        return self.path("scores", "parts", f"{shard_name}.parquet")

    @property
    def scores(self) -> str:
        return self.path("scores.parquet")

    def prune_dir(self, name: str) -> str:
        return self.path("prune", name)

    def update_run_json(self, section: str, value: Any) -> None:
        """Record one stage's config and outcome in run.json (read-modify-write)."""
        data = read_json(self.run_json) if exists(self.run_json) else {}
        data[section] = value
        write_json(self.run_json, data)
