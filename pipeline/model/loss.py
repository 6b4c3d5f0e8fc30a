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
    from each other row -1/2 log(1 - exp(a - LSE_R(r))), which is the same
    1/2 softplus(a - LSE_{R-z}(r)) with z left out of the row's sum; row k
    (z's own loss) is not a batch mate's. The second spelling is the one
    computed: the first is -inf or NaN once z's logit dominates a row (a
    mismatched reference pair at a large logit scale), where a - LSE rounds
    to 0 or above.
    """
    rr = s * ref_img @ ref_txt.T  # (K, K): x_r . t_c
    # sums over K terms in float32 at least (bfloat16 autocast leaves rr in bf16)
    rr = rr.to(torch.promote_types(rr.dtype, torch.float32))
    d_i2t = z_txt_vs_x - torch.logsumexp(rr, 1)[None]  # z's text in row r's image-to-text
    d_t2i = z_img_vs_t - torch.logsumexp(rr, 0)[None]  # z's image in row r's text-to-image
    added = 0.5 * (F.softplus(d_i2t) + F.softplus(d_t2i)).sum(1)
    if exclude is None:
        return added
    inside = exclude.any(1)
    if rr.shape[0] < 2:  # z is all of R: no other row to take from
        return torch.where(inside, torch.zeros_like(added), added)
    k = exclude.to(torch.uint8).argmax(1)  # z's place in R (its first, if R repeats it)
    without_i2t = _logsumexp_leaving_out(rr, 1).T[k]  # (B, K): row r's sum without column k
    without_t2i = _logsumexp_leaving_out(rr, 0)[k]  # (B, K): column r's sum without row k
    taken = 0.5 * (F.softplus(z_txt_vs_x - without_i2t) + F.softplus(z_img_vs_t - without_t2i))
    taken = taken.masked_fill(~(inside[:, None] & ~exclude), 0.0).sum(1)
    return torch.where(inside, taken, added)


def _logsumexp_leaving_out(x: torch.Tensor, dim: int) -> torch.Tensor:
    """out[..., k, ...] = logsumexp of ``x`` along ``dim`` with entry k left out (size >= 2).

    Shifted by the top entry t: for k != t the sum without k still holds exp(0) = 1,
    so S - exp(x_k - x_t) >= 1 and nothing cancels to zero; for k = t, a logsumexp
    with t masked. (Not logcumsumexp: torch 2.14's forward-mode derivative of it is
    wrong once entries lie some 30 below the maximum, pytorch/pytorch#196705.)
    """
    x = x.movedim(dim, -1)
    top = x.detach().max(-1, keepdim=True).values  # a shift: the sums do not depend on it
    is_top = F.one_hot(x.detach().argmax(-1), x.shape[-1]).bool()
    e = torch.exp(x - top)
    rest = e.sum(-1, keepdim=True) - e
    # the top's own entry comes from the masked sum; 1 keeps log's derivative finite there
    rest = torch.where(is_top, torch.ones_like(rest), rest)
    without_top = x.masked_fill(is_top, -math.inf).logsumexp(-1, keepdim=True)
    out = torch.where(is_top, without_top.expand_as(rest), top + torch.log(rest))
    return out.movedim(-1, dim)
