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
    """Top-1 accuracy of the nearest class embedding (cosine similarity).

    A class tied with the true one at the top counts as a random tie-break would
    (1/t for t tied): argmax gave the lowest index, so a collapsed model scored the
    share of class 0, not chance (review).
    """
    img = F.normalize(image_features.double(), dim=-1)
    cls = F.normalize(class_features.double(), dim=-1)
    sim = img @ cls.T
    if not torch.isfinite(sim).all():
        return float("nan")  # a diverged model: no accuracy to report (not 1/0)
    true = sim.gather(1, labels.long()[:, None])
    above = (sim > true).sum(dim=1)
    tied = (sim == true).sum(dim=1)
    return float(torch.where(above == 0, 1.0 / tied.double(), 0.0).mean())


def _hit_probability(sim: torch.Tensor, match: torch.Tensor, k: int) -> torch.Tensor:
    """For each query (row), the probability that a matching candidate is among its k
    nearest when ties are broken at random: exact, so tied scores earn chance, not the
    luck of candidate order."""
    best = torch.where(match, sim, torch.tensor(float("-inf"), dtype=sim.dtype)).amax(dim=1)
    above = (sim > best[:, None]).sum(dim=1)
    at_best = sim == best[:, None]
    tied = at_best.sum(dim=1)
    hits = (match & at_best).sum(dim=1)
    slots = k - above  # places left in the top k for the candidates tied at ``best``
    # P(no match among the first ``slots`` of ``tied`` in random order) = C(t-m, r) / C(t, r)
    t, m, r = tied.double(), hits.double(), slots.clamp(min=0).double()
    possible = (t - m) >= r
    lg = torch.lgamma
    miss = torch.where(
        possible,
        torch.exp(
            lg((t - m + 1).clamp(min=1))
            - lg((t - m - r + 1).clamp(min=1))
            - lg(t + 1)
            + lg((t - r + 1).clamp(min=1))
        ),
        torch.zeros_like(t),
    )
    return torch.where(slots <= 0, torch.zeros_like(t), 1.0 - miss)


def caption_ids(captions: Sequence[Hashable]) -> torch.Tensor:
    """Equal captions share one id (so duplicates count as matches)."""
    ids: dict[Hashable, int] = {}
    return torch.tensor([ids.setdefault(c, len(ids)) for c in captions])


def recall_at_k(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    captions: Sequence[Hashable],
    ks: Sequence[int] = (1, 5),
    block: int = 1024,
) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k over one paired set.

    Row i of both feature matrices is pair i; ``captions[i]`` is its caption
    (a string, or the token row as a tuple). A query is a hit at k when one
    of its k nearest candidates has the query's caption; candidates tied in
    similarity count as a random tie-break would (a collapsed model scores
    chance, k/n), and equal captions, whose text features are equal, all match.
    """
    n = len(captions)
    if image_features.shape[0] != n or text_features.shape[0] != n:
        raise ValueError("recall_at_k: features and captions must have one row per pair")
    ids = caption_ids(captions)
    img = F.normalize(image_features.double(), dim=-1)
    txt = F.normalize(text_features.double(), dim=-1)
    # ``block`` queries at a time: memory grows with block x n, not n x n (a 100k-pair eval
    # set would need 80 GB for its similarity matrix alone)
    hits = {(d, k): torch.zeros(n, dtype=torch.double) for d in ("i2t", "t2i") for k in ks}
    for start in range(0, n, block):
        rows = slice(start, start + block)
        match = ids[rows, None] == ids[None, :]
        for d, queries, candidates in (("i2t", img, txt), ("t2i", txt, img)):
            sim = queries[rows] @ candidates.T
            if not torch.isfinite(sim).all():  # a diverged model: NaN, not a perfect score
                return {f"{d}_r{k}": float("nan") for k in ks for d in ("i2t", "t2i")}
            for k in ks:
                hits[d, k][rows] = _hit_probability(sim, match, k)
    return {f"{d}_r{k}": float(hits[d, k].mean()) for k in ks for d in ("i2t", "t2i")}
