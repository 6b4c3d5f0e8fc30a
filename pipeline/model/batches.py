"""Samples to model inputs: the model's own eval transform and tokenizer, nothing else."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.data.sample import Sample
from pipeline.model.factory import ClipBundle


def encode(samples: Sequence[Sample], bundle: ClipBundle) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, tokens) for ok samples, in order. Deterministic: no augmentation.

    An image the reader already transformed (``iter_shard(transform=bundle.preprocess)``)
    is taken as it is.
    """
    if not samples:
        raise ValueError("encode needs at least one sample")
    images = torch.stack(
        [s.image if torch.is_tensor(s.image) else bundle.preprocess(s.image) for s in samples]
    )
    tokens = bundle.tokenizer([s.caption for s in samples])
    return images, tokens
