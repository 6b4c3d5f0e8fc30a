"""The report's figures, drawn with matplotlib (Agg) and returned as PNG bytes."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.report.tablestats import Histogram  # noqa: E402


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def score_histograms(hists: dict[str, Histogram]) -> bytes:
    """One panel per scorer (:func:`~pipeline.report.tablestats.histogram`: clipped to the
    1st-99th percentile range, the count outside printed); marked rows are drawn apart."""
    names = list(hists)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        h = hists[name]
        left = h.edges[:-1]  # one weighted point per bin: the counts were taken already
        if h.marked is not None:
            ax.hist(left, bins=h.edges, weights=h.counts, alpha=0.7, label="clean")
            ax.hist(left, bins=h.edges, weights=h.marked, alpha=0.7, label="injected defect")
            ax.legend(fontsize=7, loc="upper left")
        else:
            ax.hist(left, bins=h.edges, weights=h.counts)
        ax.set_title(f"{name} ({h.outside} outside the 1-99% range)", fontsize=9)
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
