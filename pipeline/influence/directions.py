"""Per-checkpoint direction vectors of METHOD.md section 5: g_B, g_V, w = H_B g_V and u = H_V g_B.

u feeds the target-Hessian term <g_z, H_V g_B> = <u, g_z> of the derived
second-order weights (``pipeline.influence.estimator``).

They do not depend on the scored sample, so they are computed once per
checkpoint, stored in ``RUN/directions/STEP.safetensors`` with what produced
them, and broadcast to every scoring worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vjp

from pipeline.influence.estimator import CURVATURES
from pipeline.influence.functional import ClipFunctions, Params, derivative_mode
from pipeline.influence.vectors import dot
from pipeline.model.loss import per_sample_loss, scale_of
from pipeline.tensors import load_tensors, save_tensors

Batch = tuple[torch.Tensor, torch.Tensor]  # (images, tokens)
KINDS = ("g_B", "g_V", "w", "u")


@dataclass
class Directions:
    g_B: Params  # mean gradient of the in-batch training loss over k batches
    g_V: Params  # gradient of the target loss L_V (reference-negative per-sample loss, mean over V)
    w: Params  # H_B g_V, with H_B the Hessian of the same batch losses
    u: Params  # H_V g_B, with H_V the Hessian of the target loss L_V
    meta: dict[str, Any] = field(default_factory=dict)

    def as_flat(self) -> dict[str, torch.Tensor]:
        return {
            f"{kind}/{k}": v.contiguous() for kind in KINDS for k, v in getattr(self, kind).items()
        }

    def combined(self, a: float, b: float) -> Params:
        """a w + b u: one direction whose JVP gives a <w, g_z> + b <u, g_z> in one pass."""
        return {k: a * self.w[k] + b * self.u[k] for k in self.w}

    def ordered(self, names: list[str]) -> Directions:
        """Same vectors with keys in ``names`` order (torch.func matches dicts by structure)."""
        return Directions(
            *({k: getattr(self, kind)[k] for k in names} for kind in KINDS), self.meta
        )

    @classmethod
    def from_flat(cls, flat: dict[str, torch.Tensor], meta: dict[str, Any]) -> Directions:
        parts: dict[str, Params] = {kind: {} for kind in KINDS}
        for name, t in flat.items():
            kind, _, key = name.partition("/")
            parts[kind][key] = t
        if not parts["u"]:
            raise ValueError("direction file without u = H_V g_B (written before it existed)")
        return cls(parts["g_B"], parts["g_V"], parts["w"], parts["u"], meta)


def _leaves(params: Params) -> Params:
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def batch_gradient_and_hvp(
    fns: ClipFunctions, params: Params, batches: Sequence[Batch], vector: Params | None
) -> tuple[Params, Params | None]:
    """Mean over batches of grad L(B) and, if ``vector`` is given, of H_B @ vector (double backward)."""
    g_sum = {k: torch.zeros_like(v) for k, v in params.items()}
    h_sum = {k: torch.zeros_like(v) for k, v in params.items()} if vector is not None else None
    for images, tokens in batches:
        p = _leaves(params)
        with derivative_mode():
            loss = fns.batch_loss(p, images, tokens)
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=vector is not None)
            if vector is not None:
                gv = sum((g * vector[k]).sum() for g, k in zip(grads, p, strict=True))
                hv = torch.autograd.grad(gv, list(p.values()), allow_unused=True)
        for g, k in zip(grads, p, strict=True):
            g_sum[k] += g.detach()
        if h_sum is not None:
            for h, k in zip(hv, p, strict=True):
                if h is not None:
                    h_sum[k] += h.detach()
    n = len(batches)
    g = {k: v / n for k, v in g_sum.items()}
    h = {k: v / n for k, v in h_sum.items()} if h_sum is not None else None
    return g, h


class GaussNewton:
    """v -> mean over batches of G_B v, G_B = J' H_logits J the Gauss-Newton part of H_B.

    The in-batch loss is a convex function (two cross-entropies) of the b x b
    logit matrix, so G_B is positive semi-definite: it keeps the curvature that
    damps a displacement and drops the negative curvature of the network
    itself, along which a linearised trajectory grows without bound.

    Built once per checkpoint: the forward pass and its pullback J' are kept,
    and J v is the pullback's own transpose (a VJP of the linear map u -> J' u),
    so each product costs two backward passes and no forward pass (1.8 times
    faster than a JVP plus a VJP per product on diffin-small).
    """

    def __init__(self, fns: ClipFunctions, params: Params, batches: Sequence[Batch]) -> None:
        self.names = list(params)
        self.ops = []
        with derivative_mode():
            for images, tokens in batches:
                labels = torch.arange(images.shape[0], device=images.device)

                def logits_of(p: Params, images=images, tokens=tokens) -> torch.Tensor:
                    img, txt = fns.embed(p, images, tokens)
                    return scale_of(p["logit_scale"]) * img @ txt.T

                def loss_of(logits: torch.Tensor, labels=labels) -> torch.Tensor:
                    return 0.5 * (
                        F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)
                    )

                logits, pull = vjp(logits_of, params)
                _, push = vjp(lambda u, pull=pull: pull(u)[0], torch.zeros_like(logits))
                self.ops.append((logits.detach(), pull, push, grad(loss_of)))

    def __call__(self, vector: Params) -> Params:
        vector = {k: vector[k] for k in self.names}  # torch.func matches dicts by key order
        out = {k: torch.zeros_like(v) for k, v in vector.items()}
        with derivative_mode():
            for logits, pull, push, loss_grad in self.ops:
                (j_v,) = push(vector)
                _, h_j_v = jvp(loss_grad, (logits,), (j_v.detach(),))
                (g,) = pull(h_j_v.detach())
                for k in out:
                    out[k] += g[k].detach()
        return {k: v / len(self.ops) for k, v in out.items()}


def curvature_operator(
    fns: ClipFunctions, params: Params, batches: Sequence[Batch], kind: str
) -> Callable[[Params], Params]:
    """v -> C v with C the mean over batches of the Gauss-Newton part (``ggn``) or the exact
    Hessian (``hessian``) of the in-batch loss: the propagated form's curvature."""
    if kind == "ggn":
        return GaussNewton(fns, params, batches)
    if kind != "hessian":
        raise ValueError(f"curvature {kind!r}: expected one of {CURVATURES}")

    def exact(v: Params) -> Params:
        _, h = batch_gradient_and_hvp(fns, params, batches, v)
        assert h is not None
        return h

    return exact


# Pairs per double backward in the target's gradient and Hessian-vector product: the
# memory of those passes grows with it (ViT-B-32: about 0.24 GiB a pair), not with K.
TARGET_CHUNK = 64


def target_gradient(
    fns: ClipFunctions,
    params: Params,
    images: torch.Tensor,
    tokens: torch.Tensor,
    chunk: int = TARGET_CHUNK,
) -> Params:
    """grad of L_V = mean_v l_v (see :func:`target_gradient_and_hvp`)."""
    return target_gradient_and_hvp(fns, params, images, tokens, None, chunk)[0]


def target_gradient_and_hvp(
    fns: ClipFunctions,
    params: Params,
    images: torch.Tensor,
    tokens: torch.Tensor,
    vector: Params | None,
    chunk: int = TARGET_CHUNK,
) -> tuple[Params, Params | None]:
    """grad L_V and, if ``vector`` is given, H_V @ vector, exactly, ``chunk`` pairs at a time.

    L_V depends on theta through the embeddings E of the targets and of the K
    references, and through the logit scale s: L_V = F(E(theta), s). So

        grad L_V = J' a + (dF/ds) e_s                  with a = dF/dE
        H_V v    = J' (d a) + sum_i a_i H_{E_i} v + (d dF/ds) e_s

    where d a is F's Hessian (in E and s, a few numbers a pair) applied to
    (J v, v_s). E and J v come from forward passes (no graph), a and d a from
    F alone, and each chunk of pairs then needs one double backward of
    <E_c, a_c>, whatever K. Differentiating the whole loss at once instead
    took every chunk of targets together with all K references (88 GiB for
    ViT-B-32 at the defaults).
    """
    if fns.ref_images is None or fns.ref_tokens is None:
        raise ValueError("the target loss needs reference negatives")
    n = images.shape[0]
    ref_images = fns.ref_images.to(images)
    ref_tokens = fns.ref_tokens.to(tokens.device)
    exclude = fns.self_mask(images, tokens)
    all_images = torch.cat([images, ref_images])
    all_tokens = torch.cat([tokens, ref_tokens])
    spans = [slice(i, i + chunk) for i in range(0, all_images.shape[0], chunk)]

    def embed(p: Params, span: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return fns.embed(p, all_images[span], all_tokens[span])

    with torch.no_grad(), derivative_mode():
        emb = [embed(params, span) for span in spans]
        d_emb = (
            [jvp(lambda p, span=span: embed(p, span), (params,), (vector,))[1] for span in spans]
            if vector is not None
            else None
        )
    e_img = torch.cat([e[0] for e in emb]).requires_grad_(True)
    e_txt = torch.cat([e[1] for e in emb]).requires_grad_(True)
    scale = params["logit_scale"].detach().requires_grad_(True)
    loss = per_sample_loss(e_img[:n], e_txt[:n], e_img[n:], e_txt[n:], scale, exclude).sum() / n
    a_img, a_txt, a_s = torch.autograd.grad(
        loss, (e_img, e_txt, scale), create_graph=vector is not None
    )
    if vector is not None:
        assert d_emb is not None
        along = (
            (a_img * torch.cat([d[0] for d in d_emb])).sum()
            + (a_txt * torch.cat([d[1] for d in d_emb])).sum()
            + (a_s * vector["logit_scale"]).sum()
        )
        da_img, da_txt, da_s = torch.autograd.grad(along, (e_img, e_txt, scale))
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    h_total = {k: torch.zeros_like(v) for k, v in params.items()} if vector is not None else None
    for span in spans:
        p = _leaves(params)
        with derivative_mode():
            img, txt = embed(p, span)
            pulled = (img * a_img[span].detach()).sum() + (txt * a_txt[span].detach()).sum()
            grads = torch.autograd.grad(
                pulled, list(p.values()), allow_unused=True, create_graph=vector is not None
            )
            if vector is not None:
                second = sum(
                    (g * vector[k]).sum() for g, k in zip(grads, p, strict=True) if g is not None
                )
                second = second + (img * da_img[span]).sum() + (txt * da_txt[span]).sum()
                hv = torch.autograd.grad(second, list(p.values()), allow_unused=True)
        for g, k in zip(grads, p, strict=True):
            if g is not None:
                total[k] += g.detach()
        if h_total is not None:
            for h, k in zip(hv, p, strict=True):
                if h is not None:
                    h_total[k] += h.detach()
    total["logit_scale"] += a_s.detach()
    if h_total is not None:
        h_total["logit_scale"] += da_s.detach()
    return total, h_total


def compute_directions(
    fns: ClipFunctions,
    params: Params,
    grad_batches: Sequence[Batch],
    target: Batch,
    meta: dict[str, Any] | None = None,
) -> Directions:
    g_V = target_gradient(fns, params, *target)
    g_B, w = batch_gradient_and_hvp(fns, params, grad_batches, g_V)
    assert w is not None
    _, u = target_gradient_and_hvp(fns, params, *target, g_B)
    assert u is not None
    info = dict(meta or {})
    info.update(
        k_batches=len(grad_batches),
        batch_size=int(grad_batches[0][0].shape[0]) if grad_batches else 0,
        target_size=int(target[0].shape[0]),
        norm_g_B=float(dot(g_B, g_B).sqrt()),
        norm_g_V=float(dot(g_V, g_V).sqrt()),
        norm_w=float(dot(w, w).sqrt()),
        norm_u=float(dot(u, u).sqrt()),
    )
    return Directions(g_B, g_V, w, u, info)


def save_directions(directions: Directions, path: str) -> None:
    save_tensors(path, directions.as_flat(), directions.meta)


def load_directions(path: str, device: str | torch.device = "cpu") -> Directions:
    flat, meta = load_tensors(path)
    return Directions.from_flat({k: v.to(device) for k, v in flat.items()}, meta)
