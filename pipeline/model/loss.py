"""CLIP losses: the in-batch training loss and the per-sample loss of METHOD.md section 2.

Pure functions of embeddings; the caller normalises nothing twice: inputs are
the L2-normalised image and text features open_clip returns.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100.0)  # open_clip clamps logit_scale to [0, ln 100]


def scale_of(logit_scale: torch.Tensor) -> torch.Tensor:
    """s = exp(logit_scale) as open_clip clamps it (ln s in [0, ln 100])."""
    return logit_scale.clamp(0.0, MAX_LOGIT_SCALE).exp()


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
) -> torch.Tensor:
    """l_z for each row z against fixed reference negatives R (shape (B,)).

    Each sample's loss depends only on itself and R, never on the other
    samples of its batch, so scores do not depend on batching or sharding.
    """
    s = scale_of(logit_scale)
    pos = s * (img * txt).sum(-1, keepdim=True)  # (B, 1)
    i2t = torch.cat([pos, s * img @ ref_txt.T], dim=1)  # image z vs [t_z, t_R]
    t2i = torch.cat([pos, s * txt @ ref_img.T], dim=1)  # text z vs [x_z, x_R]
    return 0.5 * (torch.logsumexp(i2t, 1) + torch.logsumexp(t2i, 1)) - pos[:, 0]
