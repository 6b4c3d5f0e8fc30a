"""CLIP losses: the in-batch training loss and the per-sample loss of METHOD.md section 2.

Pure functions of embeddings; the caller normalises nothing twice: inputs are
the L2-normalised image and text features open_clip returns.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# open_clip_train clamps the logit_scale parameter to [0, ln 100] in place after
# each optimiser step; the training loop does the same.
MAX_LOGIT_SCALE = math.log(100.0)


def scale_of(logit_scale: torch.Tensor) -> torch.Tensor:
    """s = exp(logit_scale), exactly as open_clip's forward computes it.

    No clamp here: the parameter is clamped after each step, and a clamp in
    the differentiated function would zero d/d logit_scale at either bound
    (where float32 ln 100 sits), freezing the scale in training and dropping
    its component from every gradient the scorers use.
    """
    return logit_scale.exp()


def batch_clip_loss(
    img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric in-batch contrastive loss, as the proxy training computes it."""
    s = scale_of(logit_scale)
    logits = s * img @ txt.T
    labels = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def per_sample_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    ref_img: torch.Tensor,
    ref_txt: torch.Tensor,
    logit_scale: torch.Tensor,
    exclude: torch.Tensor | None = None,
    removal: bool = False,
) -> torch.Tensor:
    """l_z for each row z against fixed reference negatives R (shape (B,)).

    Each sample's loss depends only on itself and R, never on the other
    samples of its batch, so scores do not depend on batching or sharding.
    ``exclude`` (B, K) marks references that are the pair z itself (R is drawn
    from the pool, so its members are scored too): those are left out of z's
    negatives, or z would be its own negative and its loss would gain up to ln 2.

    ``removal``: z's removal loss from R used as a batch, (K+1) L(R + z) - K L(R)
    (K L(R) - (K-1) L(R - z) when z is one of R): l_z plus what z adds, as one
    more negative, to each reference pair's loss. Its gradient is what taking z
    out of an in-batch contrastive batch changes (docs/accuracy.md, section 1g).
    """
    s = scale_of(logit_scale)
    pos = s * (img * txt).sum(-1, keepdim=True)  # (B, 1)
    neg_t = s * img @ ref_txt.T  # image z vs t_R
    neg_i = s * txt @ ref_img.T  # text z vs x_R
    raw_t, raw_i = neg_t, neg_i
    if exclude is not None:
        neg_t = neg_t.masked_fill(exclude, -math.inf)
        neg_i = neg_i.masked_fill(exclude, -math.inf)
    i2t = torch.cat([pos, neg_t], dim=1)
    t2i = torch.cat([pos, neg_i], dim=1)
    own = 0.5 * (torch.logsumexp(i2t, 1) + torch.logsumexp(t2i, 1)) - pos[:, 0]
    if not removal:
        return own
    return own + _as_negative(s, ref_img, ref_txt, raw_t, raw_i, exclude)


def _as_negative(
    s: torch.Tensor,
    ref_img: torch.Tensor,
    ref_txt: torch.Tensor,
    z_img_vs_t: torch.Tensor,
    z_txt_vs_x: torch.Tensor,
    exclude: torch.Tensor | None,
) -> torch.Tensor:
    """sum over r in R of what z adds to r's loss as one more negative (shape (B,)).

    z's text joins r's image-to-text row and z's image joins r's text-to-image
    row: each adds 1/2 log(1 + exp(a - LSE_R(r))) = 1/2 softplus(a - LSE_R(r)).
    When z is R's member k it is already in every row, so its removal takes
    -1/2 log(1 - exp(a - LSE_R(r))) from each other row, and row k (z's own
    loss) is not a batch mate's.
    """
    rr = s * ref_img @ ref_txt.T  # (K, K): x_r . t_c
    d_i2t = z_txt_vs_x - torch.logsumexp(rr, 1)[None]  # z's text in row r's image-to-text
    d_t2i = z_img_vs_t - torch.logsumexp(rr, 0)[None]  # z's image in row r's text-to-image
    added = 0.5 * (F.softplus(d_i2t) + F.softplus(d_t2i)).sum(1)
    if exclude is None:
        return added
    inside = exclude.any(1, keepdim=True)
    others = inside & ~exclude
    # Clamp what is not used before exp and log1p: a NaN in the unused branch of a
    # where() still poisons its derivative.
    far = torch.full_like(d_i2t, -30.0)
    in_i2t, in_t2i = torch.where(others, d_i2t, far), torch.where(others, d_t2i, far)
    taken = -0.5 * (torch.log1p(-torch.exp(in_i2t)) + torch.log1p(-torch.exp(in_t2i)))
    taken = taken.masked_fill(~others, 0.0).sum(1)
    return torch.where(inside[:, 0], taken, added)
