"""The report's figures, drawn with matplotlib (Agg) and returned as PNG bytes."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def score_histograms(scores: dict[str, np.ndarray], marked: np.ndarray | None = None) -> bytes:
    """One histogram per scorer; with ``marked`` (bool per row) the marked rows are drawn apart.

    Influence scores span orders of magnitude with long tails, so each panel
    is clipped to its 1st-99th percentile range (the count outside is printed).
    """
    names = list(scores)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        v = np.asarray(scores[name], dtype=np.float64)
        finite = np.isfinite(v)
        lo, hi = np.percentile(v[finite], [1, 99]) if finite.any() else (0.0, 1.0)
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 41)
        inside = finite & (v >= lo) & (v <= hi)
        if marked is not None:
            ax.hist(v[inside & ~marked], bins=bins, alpha=0.7, label="clean")
            ax.hist(v[inside & marked], bins=bins, alpha=0.7, label="injected defect")
            ax.legend(fontsize=7, loc="upper left")
        else:
            ax.hist(v[inside], bins=bins)
        ax.set_title(
            f"{name} ({int((~inside & finite).sum())} outside the 1-99% range)", fontsize=9
        )
        ax.set_xlabel("score (higher = keep)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def metric_vs_keep(results: pd.DataFrame, metric: str) -> bytes:
    """``metric`` against the keep fraction, one line per scorer; the full pool at keep 1."""
    fig, ax = plt.subplots(figsize=(6, 4))
    full = results[results.method == "full"]
    for method, rows in results[results.method != "full"].groupby("method", sort=True):
        rows = pd.concat([rows, full]).sort_values("keep")
        ax.plot(rows.keep, rows[metric], marker="o", label=method)
    if len(full):
        ax.axhline(float(full[metric].iloc[0]), color="gray", linestyle=":", label="full pool")
    ax.set_xlabel("fraction of the pool kept")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)
