"""Downstream metrics of a CLIP from its embeddings: zero-shot accuracy and retrieval recall.

Pure torch on given features, so they are tested on hand-made embeddings.
Retrieval counts a retrieved item as a match when its caption is the query's
caption: generated (and many web) captions repeat, and which of several
identical captions is "the" right one is arbitrary. The caller passes the
captions as the model sees them (token rows): two strings with one
tokenisation have equal features, and which of them ranks first would be
arbitrary.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F


def zero_shot_accuracy(
    image_features: torch.Tensor, class_features: torch.Tensor, labels: torch.Tensor
) -> float:
    """Top-1 accuracy of argmax cosine similarity between images and class embeddings."""
    img = F.normalize(image_features.double(), dim=-1)
    cls = F.normalize(class_features.double(), dim=-1)
    pred = (img @ cls.T).argmax(dim=1)
    return float((pred == labels).double().mean())


def caption_ids(captions: Sequence[Hashable]) -> torch.Tensor:
    """Equal captions share one id (so duplicates count as matches)."""
    ids: dict[Hashable, int] = {}
    return torch.tensor([ids.setdefault(c, len(ids)) for c in captions])


def recall_at_k(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    captions: Sequence[Hashable],
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k over one paired set.

    Row i of both feature matrices is pair i; ``captions[i]`` is its caption
    (a string, or the token row as a tuple). A query is a hit at k when one
    of its k nearest candidates has the query's caption. Equal captions have
    equal text features, so how torch.topk orders such ties does not change
    the figure.
    """
    n = len(captions)
    if image_features.shape[0] != n or text_features.shape[0] != n:
        raise ValueError("recall_at_k: features and captions must have one row per pair")
    ids = caption_ids(captions)
    sim = (
        F.normalize(image_features.double(), dim=-1) @ F.normalize(text_features.double(), dim=-1).T
    )
    out: dict[str, float] = {}
    for k in ks:
        kk = min(k, n)
        i2t = ids[sim.topk(kk, dim=1).indices]  # caption ids of each image's top texts
        t2i = ids[sim.T.topk(kk, dim=1).indices]
        out[f"i2t_r{k}"] = float((i2t == ids[:, None]).any(dim=1).double().mean())
        out[f"t2i_r{k}"] = float((t2i == ids[:, None]).any(dim=1).double().mean())
    return out
