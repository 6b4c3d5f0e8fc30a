"""Rank metrics for validating scorers: Spearman, AUROC and the linear datamodeling score.

Pure numpy, ties handled by average ranks, so results do not depend on scipy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rankdata(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank (as scipy.stats.rankdata 'average').

    Any NaN makes every rank NaN (scipy's ``nan_policy='propagate'``), so a
    figure computed from a score with a NaN is NaN rather than a number that
    depends on where the sort happened to put it.
    """
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError("rankdata needs a 1-d array")
    n = len(a)
    if np.isnan(a).any():
        return np.full(n, np.nan)
    if n == 0:
        return np.empty(0, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    starts_group = np.r_[True, sorted_a[1:] != sorted_a[:-1]]
    first = np.flatnonzero(starts_group)
    last = np.r_[first[1:], n] - 1
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = (0.5 * (first + last) + 1.0)[np.cumsum(starts_group) - 1]
    return ranks


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"pearson needs two 1-d arrays of one length, got {a.shape} and {b.shape}")
    if len(a) < 2:
        return float("nan")
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation; nan when either side is constant or holds a NaN."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"spearman needs two 1-d arrays of one length, got {a.shape} and {b.shape}"
        )
    return pearson(rankdata(a), rankdata(b))


def auroc(scores: Sequence[float] | np.ndarray, positive: Sequence[bool] | np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2.

    For "low score => defect" pass ``-scores`` (or use :func:`auroc_low_is_positive`).
    """
    s = np.asarray(scores, dtype=np.float64)
    p = np.asarray(positive, dtype=bool)
    if s.shape != p.shape or s.ndim != 1:
        raise ValueError("auroc needs two 1-d arrays of one length")
    n_pos = int(p.sum())
    n_neg = len(p) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[p].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_low_is_positive(scores, positive) -> float:
    """AUROC of the rule "low score => positive" (a defect should get a low keep-score)."""
    return auroc(-np.asarray(scores, dtype=np.float64), positive)


def subset_predictions(scores: np.ndarray, removed_masks: np.ndarray) -> np.ndarray:
    """Predicted effect of removing each subset: the sum of the scores of its removed samples.

    ``removed_masks``: bool (n_subsets, n_samples); ``scores``: (n_samples,).
    """
    masks = np.asarray(removed_masks, dtype=bool)
    return masks.astype(np.float64) @ np.asarray(scores, dtype=np.float64)


def lds(scores: np.ndarray, removed_masks: np.ndarray, actual: np.ndarray) -> float:
    """Linear datamodeling score: Spearman(sum of removed scores, actual change) across subsets."""
    return spearman(subset_predictions(scores, removed_masks), np.asarray(actual, dtype=np.float64))


def bootstrap_ci(
    fn, *arrays: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.9
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``fn(*arrays)`` resampling rows jointly."""
    rng = np.random.default_rng(seed)
    m = len(arrays[0])
    vals = []
    for _ in range(n):
        idx = rng.integers(0, m, m)
        v = fn(*(np.asarray(a)[idx] for a in arrays))
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
