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
) -> torch.Tensor:
    """l_z for each row z against fixed reference negatives R (shape (B,)).

    Each sample's loss depends only on itself and R, never on the other
    samples of its batch, so scores do not depend on batching or sharding.
    ``exclude`` (B, K) marks references that are the pair z itself (R is drawn
    from the pool, so its members are scored too): those are left out of z's
    negatives, or z would be its own negative and its loss would gain up to ln 2.
    """
    s = scale_of(logit_scale)
    pos = s * (img * txt).sum(-1, keepdim=True)  # (B, 1)
    neg_t = s * img @ ref_txt.T  # image z vs t_R
    neg_i = s * txt @ ref_img.T  # text z vs x_R
    if exclude is not None:
        neg_t = neg_t.masked_fill(exclude, -math.inf)
        neg_i = neg_i.masked_fill(exclude, -math.inf)
    i2t = torch.cat([pos, neg_t], dim=1)
    t2i = torch.cat([pos, neg_i], dim=1)
    return 0.5 * (torch.logsumexp(i2t, 1) + torch.logsumexp(t2i, 1)) - pos[:, 0]
