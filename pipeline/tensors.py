"""Tensor files: safetensors only (never pickle), with JSON metadata, on any fsspec path."""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load, save

from pipeline.rundir import read_bytes, write_bytes_atomic


def save_tensors(
    url: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
) -> None:
    data = save(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        metadata={"meta": json.dumps(meta or {}, sort_keys=True, default=str)},
    )
    write_bytes_atomic(url, data)


def load_tensors(url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    raw = read_bytes(url)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header.get("__metadata__", {}).get("meta", "{}"))
    return load(raw), meta


def tensor_shapes(url: str) -> dict[str, list[int]]:
    """The shapes in a tensor file, from its header alone (no tensor is read)."""
    import fsspec

    with fsspec.open(url, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}
