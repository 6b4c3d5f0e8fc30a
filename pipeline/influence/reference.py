"""Slow references for validation (METHOD.md section 4): per sample, with backward passes.

- ``exact_terms``: double-backward Hessian-vector products, exact up to rounding.
- ``finite_difference_terms``: the authors' form, first-order gradients only,
  H v ~= (grad f(theta + s v) - grad f(theta)) / s with s = eps / ||v||.

Both return the same terms as the fast form so that tests can compare them
one to one. Cost: several backward passes per sample: small data only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pipeline.influence.directions import (
    Batch,
    Directions,
    batch_gradient_and_hvp,
    target_gradient,
)
from pipeline.influence.functional import ClipFunctions, Params, derivative_mode
from pipeline.influence.vectors import axpy, dot, norm


def _grad(fn: Callable[[Params], torch.Tensor], params: Params, create_graph: bool = False):
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    with derivative_mode():
        out = fn(p)
        grads = torch.autograd.grad(
            out, list(p.values()), create_graph=create_graph, allow_unused=True
        )
    g = {
        k: (gi if gi is not None else torch.zeros_like(p[k]))
        for k, gi in zip(p, grads, strict=True)
    }
    return p, out, g


def _hvp(fn: Callable[[Params], torch.Tensor], params: Params, v: Params) -> Params:
    p, _, g = _grad(fn, params, create_graph=True)
    with derivative_mode():
        gv = sum((g[k] * v[k]).sum() for k in p if g[k].requires_grad)
        hv = torch.autograd.grad(gv, list(p.values()), allow_unused=True)
    return {
        k: (h.detach() if h is not None else torch.zeros_like(p[k]))
        for k, h in zip(p, hv, strict=True)
    }


def _sample_fn(fns: ClipFunctions, images: torch.Tensor, tokens: torch.Tensor, i: int):
    return lambda p: fns.training_losses(p, images[i : i + 1], tokens[i : i + 1])[0]


def per_sample_gradient(fns: ClipFunctions, params: Params, images, tokens, i: int) -> Params:
    _, _, g = _grad(_sample_fn(fns, images, tokens, i), params)
    return {k: v.detach() for k, v in g.items()}


def exact_terms(
    fns: ClipFunctions,
    params: Params,
    directions: Directions,
    grad_batches: Sequence[Batch],
    images: torch.Tensor,
    tokens: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """first = <g_V, g_z>, hb = <g_V, H_B g_z>, hz = <g_V, H_z g_B>, by double backward;
    hv = <g_z, H_V g_B> = <g_z, u> with the u of ``directions`` (which
    ``directions.target_gradient_and_hvp`` computes exactly, by the chain rule through
    the embeddings and a double backward per chunk of pairs; the tests check u
    against a difference of target gradients and the whole loss differentiated twice)."""
    return _exact(fns, params, directions, grad_batches, images, tokens, self_influence=False)


def _exact(fns, params, directions, grad_batches, images, tokens, self_influence: bool):
    """<a, g_z>, <a, H_B g_z>, <a, H_z g_B> per sample, with a = g_V, or a = g_z itself."""
    first, hb, hz, hv = [], [], [], []
    for i in range(images.shape[0]):
        fz = _sample_fn(fns, images, tokens, i)
        g_z = per_sample_gradient(fns, params, images, tokens, i)
        if not self_influence:
            hv.append(dot(g_z, directions.u))
        _, h_b_gz = batch_gradient_and_hvp(fns, params, grad_batches, g_z)
        assert h_b_gz is not None
        h_z_gb = _hvp(fz, params, directions.g_B)
        a = g_z if self_influence else directions.g_V
        first.append(dot(a, g_z))
        hb.append(dot(a, h_b_gz))
        hz.append(dot(a, h_z_gb))
    prefix = "self_" if self_influence else ""
    out = {
        f"{prefix}first": torch.stack(first),
        f"{prefix}hb": torch.stack(hb),
        f"{prefix}hz": torch.stack(hz),
    }
    if hv:
        out["hv"] = torch.stack(hv)
    return out


def finite_difference_terms(
    fns: ClipFunctions,
    params: Params,
    directions: Directions,
    grad_batches: Sequence[Batch],
    images: torch.Tensor,
    tokens: torch.Tensor,
    eps: float = 1e-3,
    target: Batch | None = None,
) -> dict[str, torch.Tensor]:
    """The authors' reference form: 2 per-sample and 2 batch gradients per sample.

    With ``target`` (the images and tokens of V) also hv = <g_z, H_V g_B>, with
    H_V g_B ~= (grad L_V(theta + s g_B) - grad L_V(theta)) / s (once, not per sample).
    """
    first, hb, hz, hv = [], [], [], []
    h_v_gb = None
    if target is not None:
        s3 = eps / float(norm(directions.g_B))
        shifted = target_gradient(fns, axpy(s3, directions.g_B, params), *target)
        h_v_gb = {k: (shifted[k] - directions.g_V[k]) / s3 for k in params}
    for i in range(images.shape[0]):
        fz = _sample_fn(fns, images, tokens, i)
        g_z = per_sample_gradient(fns, params, images, tokens, i)
        s = eps / float(norm(g_z))
        g_b_shift, _ = batch_gradient_and_hvp(
            fns, params=axpy(s, g_z, params), batches=grad_batches, vector=None
        )
        h_b_gz = {k: (g_b_shift[k] - directions.g_B[k]) / s for k in params}
        s2 = eps / float(norm(directions.g_B))
        _, _, g_z_shift = _grad(fz, axpy(s2, directions.g_B, params))
        h_z_gb = {k: (g_z_shift[k].detach() - g_z[k]) / s2 for k in params}
        first.append(dot(directions.g_V, g_z))
        hb.append(dot(directions.g_V, h_b_gz))
        hz.append(dot(directions.g_V, h_z_gb))
        if h_v_gb is not None:
            hv.append(dot(g_z, h_v_gb))
    out = {"first": torch.stack(first), "hb": torch.stack(hb), "hz": torch.stack(hz)}
    if hv:
        out["hv"] = torch.stack(hv)
    return out


def exact_self_terms(
    fns: ClipFunctions,
    params: Params,
    directions: Directions,
    grad_batches: Sequence[Batch],
    images: torch.Tensor,
    tokens: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Self-influence terms with nothing approximated: full g_z (through the references too),
    self_first = ||g_z||^2, self_hb = g_z' H_B g_z, self_hz = g_z' H_z g_B (double backward)."""
    return _exact(fns, params, directions, grad_batches, images, tokens, self_influence=True)
