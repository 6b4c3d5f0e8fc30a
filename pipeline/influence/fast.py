"""The fast form (METHOD.md section 5): per-sample terms for a whole batch by forward-mode AD.

For the vector of per-sample losses f(theta) = (l_z(theta))_z of a batch:

    first = D f [g_V]           = <g_V, g_z>           (one JVP)
    hz    = D^2 f [g_V, g_B]    = <g_V, H_z g_B>       (the same JVP, nested along g_B)
    hb    = D f [w]             = <w, g_z> = <g_V, H_B g_z>   (one JVP; w = H_B g_V)

No per-sample backward pass and no per-sample gradient is ever formed.
"""

from __future__ import annotations

import torch
from torch.func import jvp

from pipeline.influence.directions import Directions
from pipeline.influence.functional import ClipFunctions, Params, derivative_mode
from pipeline.model.loss import MAX_LOGIT_SCALE

TERMS = ("loss", "first", "hb", "hz", "cosine", "el2n")


def fast_terms(
    fns: ClipFunctions,
    params: Params,
    directions: Directions | None,
    images: torch.Tensor,
    tokens: torch.Tensor,
    need: set[str],
) -> dict[str, torch.Tensor]:
    """The requested per-sample terms (each a tensor of shape (batch,))."""
    unknown = need - set(TERMS)
    if unknown:
        raise ValueError(f"unknown terms {sorted(unknown)}")
    out: dict[str, torch.Tensor] = {}

    def f(p: Params) -> torch.Tensor:
        return fns.sample_losses(p, images, tokens)

    with torch.no_grad(), derivative_mode():
        if need & {"first", "hz", "hb"} and directions is None:
            raise ValueError("first/hb/hz need the direction vectors")
        if "hz" in need:
            assert directions is not None
            g_V, g_B = directions.g_V, directions.g_B
            out["first"], out["hz"] = jvp(lambda q: jvp(f, (q,), (g_V,))[1], (params,), (g_B,))
        elif "first" in need:
            assert directions is not None
            out["loss"], out["first"] = jvp(f, (params,), (directions.g_V,))
        if "hb" in need:
            assert directions is not None
            out["loss"], out["hb"] = jvp(f, (params,), (directions.w,))
        if "loss" in need and "loss" not in out:
            out["loss"] = f(params)
        if need & {"cosine", "el2n"}:
            img, txt = fns.embed(params, images, tokens)
            out["cosine"] = (img * txt).sum(-1)
            if "el2n" in need:
                out["el2n"] = _el2n(fns, params, img, txt)
    return {k: v for k, v in out.items() if k in need}


def _el2n(fns: ClipFunctions, params: Params, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """Error-vector L2 norm: || softmax(logits) - onehot(positive) ||, mean of both directions,
    over the same candidates as the per-sample loss (the pair and the K references)."""
    assert fns.ref_images is not None and fns.ref_tokens is not None
    ref_img, ref_txt = fns.embed(params, fns.ref_images.to(img), fns.ref_tokens)
    s = params["logit_scale"].clamp(0, MAX_LOGIT_SCALE).exp()
    pos = s * (img * txt).sum(-1, keepdim=True)
    norms = []
    for negs in (s * img @ ref_txt.T, s * txt @ ref_img.T):
        p = torch.cat([pos, negs], 1).softmax(1)
        p[:, 0] -= 1
        norms.append(p.norm(dim=1))
    return 0.5 * (norms[0] + norms[1])
