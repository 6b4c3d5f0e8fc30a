"""The fast form (METHOD.md section 5): per-sample terms for a whole batch by forward-mode AD.

For the vector of per-sample losses f(theta) = (l_z(theta))_z of a batch:

    first = D f [g_V]           = <g_V, g_z>           (one JVP)
    hz    = D^2 f [g_V, g_B]    = <g_V, H_z g_B>       (the same JVP, nested along g_B)
    hb    = D f [w]             = <w, g_z> = <g_V, H_B g_z>   (one JVP; w = H_B g_V)
    hv    = D f [u]             = <u, g_z> = <g_z, H_V g_B>   (one JVP; u = H_V g_B)
    hlin  = D f [a w + b u]     = a hb + b hv                 (one JVP for both)

``hlin`` is what the scoring engine asks for: the estimator needs hb and hv
only in the fixed combination W_hb hb + W_hv hv of each checkpoint, and a
JVP is linear in its tangent, so one JVP along W_hb w + W_hv u replaces two.
The propagated form (``propagate.py``, the default) uses the same slot with
the tangent r_t - W_first g_V, which makes ``hlin`` its I_t directly.
The separate terms stay for validation and the leave-one-out harness.

No per-sample backward pass and no per-sample gradient is ever formed.

The K reference negatives enter every l_z through their embeddings R(theta).
Their value and derivatives along the fixed directions (R, D R[g_V],
D R[g_B], D^2 R[g_V, g_B], D R[w], D R[u]) do not depend on the batch, so they are
computed once per checkpoint (``ReferenceJets``) and fed to the JVPs as
inputs with tangents: a batch then embeds only its own samples. The result is
the same function, derivatives included (the float64 tests check it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import jvp

from pipeline.influence.directions import Directions
from pipeline.influence.functional import ClipFunctions, Params, derivative_mode
from pipeline.model.loss import per_sample_loss, scale_of

TERMS = ("loss", "first", "hb", "hz", "hv", "hlin", "cosine", "el2n")
DIRECTIONAL = frozenset(
    {"first", "hb", "hz", "hv", "hlin"}
)  # the terms that need direction vectors
Emb = tuple[torch.Tensor, torch.Tensor]  # (image, text) embeddings of the references


@dataclass
class ReferenceJets:
    """R and its directional derivatives at one checkpoint (``None`` where not needed)."""

    value: Emb
    d_gV: Emb | None = None
    d_gB: Emb | None = None
    d2_gV_gB: Emb | None = None
    d_w: Emb | None = None
    d_u: Emb | None = None
    d_lin: Emb | None = None


def reference_jets(
    fns: ClipFunctions,
    params: Params,
    directions: Directions | None,
    need: set[str],
    lin: Params | None = None,
) -> ReferenceJets:
    assert fns.ref_images is not None and fns.ref_tokens is not None
    ref_images, ref_tokens = fns.ref_images, fns.ref_tokens

    def emb(p: Params) -> Emb:
        return fns.embed(p, ref_images, ref_tokens)

    with torch.no_grad(), derivative_mode():
        jets = ReferenceJets(emb(params))
        if need & DIRECTIONAL:
            assert directions is not None
            g_V, g_B = directions.g_V, directions.g_B
            if "hz" in need:
                jets.d_gV, jets.d2_gV_gB = jvp(
                    lambda q: jvp(emb, (q,), (g_V,))[1], (params,), (g_B,)
                )
                jets.d_gB = jvp(emb, (params,), (g_B,))[1]
            else:
                jets.d_gV = jvp(emb, (params,), (g_V,))[1]
            if "hb" in need:
                jets.d_w = jvp(emb, (params,), (directions.w,))[1]
            if "hv" in need:
                jets.d_u = jvp(emb, (params,), (directions.u,))[1]
            if "hlin" in need:
                if lin is None:
                    raise ValueError("hlin needs its direction (lin = a w + b u)")
                jets.d_lin = jvp(emb, (params,), (lin,))[1]
    return jets


def fast_terms(
    fns: ClipFunctions,
    params: Params,
    directions: Directions | None,
    images: torch.Tensor,
    tokens: torch.Tensor,
    need: set[str],
    jets: ReferenceJets | None = None,
    lin: Params | None = None,
) -> dict[str, torch.Tensor]:
    """The requested per-sample terms (each a tensor of shape (batch,)).

    Pass ``jets`` (from ``reference_jets`` with at least the same ``need``) to
    reuse the references' derivatives across batches of one checkpoint.
    ``lin`` (``Directions.combined``) is the direction of ``hlin``.
    """
    unknown = need - set(TERMS)
    if unknown:
        raise ValueError(f"unknown terms {sorted(unknown)}")
    if need & DIRECTIONAL and directions is None:
        raise ValueError("first/hb/hz/hv need the direction vectors")
    if "hlin" in need and lin is None:
        raise ValueError("hlin needs its direction (lin = a w + b u)")
    if jets is None:
        jets = reference_jets(fns, params, directions, need, lin)
    out: dict[str, torch.Tensor] = {}

    exclude = fns.self_mask(images, tokens)

    def f(p: Params, ref: Emb) -> torch.Tensor:  # whose gradient is g_z
        img, txt = fns.embed(p, images, tokens)
        return per_sample_loss(img, txt, ref[0], ref[1], p["logit_scale"], exclude, fns.removal)

    with torch.no_grad(), derivative_mode():
        if "hz" in need:
            assert directions is not None and jets.d_gV is not None
            g_V, g_B = directions.g_V, directions.g_B

            def first_along_gv(q: Params, ref: Emb, d_ref: Emb) -> torch.Tensor:
                return jvp(f, (q, ref), (g_V, d_ref))[1]

            out["first"], out["hz"] = jvp(
                first_along_gv, (params, jets.value, jets.d_gV), (g_B, jets.d_gB, jets.d2_gV_gB)
            )
        elif "first" in need:
            assert directions is not None
            out["loss"], out["first"] = jvp(f, (params, jets.value), (directions.g_V, jets.d_gV))
        if "hb" in need:
            assert directions is not None
            out["loss"], out["hb"] = jvp(f, (params, jets.value), (directions.w, jets.d_w))
        if "hv" in need:
            assert directions is not None
            out["loss"], out["hv"] = jvp(f, (params, jets.value), (directions.u, jets.d_u))
        if "hlin" in need:
            assert lin is not None and jets.d_lin is not None
            out["loss"], out["hlin"] = jvp(f, (params, jets.value), (lin, jets.d_lin))
        if "loss" in need and ("loss" not in out or fns.removal):
            # the loss scorers' l_z, whatever g_z is the gradient of
            img, txt = fns.embed(params, images, tokens)
            ref_img, ref_txt = jets.value
            out["loss"] = per_sample_loss(
                img, txt, ref_img, ref_txt, params["logit_scale"], exclude
            )
        if need & {"cosine", "el2n"}:
            img, txt = fns.embed(params, images, tokens)
            out["cosine"] = (img * txt).sum(-1)
            if "el2n" in need:
                out["el2n"] = _el2n(params, img, txt, jets.value, exclude)
    return {k: v for k, v in out.items() if k in need}


def _el2n(
    params: Params, img: torch.Tensor, txt: torch.Tensor, ref: Emb, exclude: torch.Tensor | None
) -> torch.Tensor:
    """Error-vector L2 norm: || softmax(logits) - onehot(positive) ||, mean of both directions,
    over the same candidates as the per-sample loss (the pair and the K references)."""
    ref_img, ref_txt = ref
    s = scale_of(params["logit_scale"])
    pos = s * (img * txt).sum(-1, keepdim=True)
    norms = []
    for negs in (s * img @ ref_txt.T, s * txt @ ref_img.T):
        if exclude is not None:
            negs = negs.masked_fill(exclude, -torch.inf)
        p = torch.cat([pos, negs], 1).softmax(1)
        p[:, 0] -= 1
        norms.append(p.norm(dim=1))
    return 0.5 * (norms[0] + norms[1])
