"""Model-sized vectors as dicts of tensors: dot products, norms, axpy."""

from __future__ import annotations

import torch

Params = dict[str, torch.Tensor]


def dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k].double() * b[k].double()).sum() for k in a)  # type: ignore[return-value]


def norm(a: Params) -> torch.Tensor:
    return dot(a, a).sqrt()


def axpy(alpha: float, x: Params, y: Params) -> Params:
    """y + alpha * x."""
    return {k: y[k] + alpha * x[k] for k in y}


def scale(alpha: float, x: Params) -> Params:
    return {k: alpha * v for k, v in x.items()}


def zeros_like(x: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in x.items()}


def to(x: Params, **kwargs) -> Params:
    return {k: v.to(**kwargs) for k, v in x.items()}
