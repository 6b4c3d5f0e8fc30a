"""Does the real effect of removing a pair single out mismatched captions?

    python -m benchmarks.noise_loo --per-class 50 --out docs/figures/noise_loo.json
    python -m benchmarks.noise_loo --figure docs/figures/noise_loo.png docs/figures/noise_loo*.json

Issue 3 asks Diff-In, an estimate of the change of the target loss when a pair
is removed, for a noise AUROC of 0.9. This measures the quantity being
estimated. On the leave-one-out harness (``pipeline.evaluation.groundtruth``),
with a proxy that learns (diffin-small, a warm start of ``--pre-steps`` with the
CLI's recipe, then the studied segment) and a *clean* target V, it removes
``--per-class`` mismatched and as many clean training pairs one at a time,
retrains the segment without each, and reports the AUROC ("low => mismatched")
of the measured change of L_V beside that of the scorers on the same pairs,
and each scorer's Spearman correlation with the measured change.

If the measured effect itself separates mismatched captions poorly, no faithful
influence estimate can reach the target; if it separates them well and Diff-In
does not, the estimator loses what the removal does.

The same retrainings give the ground truth of self-influence (issue 8): the
measured change of a removed pair's own loss l_z, against which ``diffin_self``
(the estimated change of z's own loss if z were removed), TracIn
self-influence and the gradient norm are compared in a second table.

Scope: the removal covers the studied segment only (the warm start trains on
every pair), as in the LOO settings 1b, 1c and 1f of docs/accuracy.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import environment, md_table, one_thread, pyplot, write_json

SCORERS = (
    "diffin",
    "diffin_second",
    "tracin",
    "diffin_removal",
    "tracin_removal",
    "diffin_derived",
    "tracin_last",
    "loss",
    "clip_score",
)
# scored against the measured change of z's own loss
SELF_SCORERS = ("diffin_self", "diffin_self_second", "tracin_self", "grand", "loss", "diffin")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.noise_loo", description=__doc__)
    p.add_argument("--model", default="diffin-small")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--target-size", type=int, default=200)
    p.add_argument("--reference-size", type=int, default=127)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--pre-steps", type=int, default=320)
    p.add_argument("--steps", type=int, default=80, help="the studied segment")
    p.add_argument("--lr", type=float, default=0.1, help="the segment's rate")
    p.add_argument("--pre-lr", type=float, default=0.1, help="the warm start's rate")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--checkpoints", type=int, default=5)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/figures/noise_loo.json")
    p.add_argument(
        "--figure",
        metavar="PNG",
        help="only draw the figure of the JSON records given as arguments (no measurement)",
    )
    p.add_argument("records", nargs="*", help="with --figure: the JSON records to draw")
    a = p.parse_args(argv)
    if bool(a.figure) != bool(a.records):
        p.error("--figure PNG and the JSON records to draw go together")
    if a.figure:
        figure([json.loads(Path(r).read_text()) for r in a.records], a.figure)
        return {}
    one_thread(a.threads)
    from pipeline.evaluation import groundtruth as G
    from pipeline.evaluation.metrics import auroc_low_is_positive, bootstrap_ci, spearman

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    setting = G.LOOSetting(
        model=a.model,
        samples=a.samples,
        target_size=a.target_size,
        reference_size=a.reference_size,
        clean_target=True,
        batch_size=a.batch_size,
        steps=a.steps,
        checkpoints=a.checkpoints,
        lr=a.lr,
        momentum=a.momentum,
        warmup=0,
        dtype="float64",
        seed=a.seed,
        pre_steps=a.pre_steps,
        pre_lr=a.pre_lr,
        pre_momentum=a.momentum,
        pre_warmup=min(40, a.pre_steps // 10),
    )
    gt = G.GroundTruth(setting)
    timings["data_and_warm_start"] = time.perf_counter() - t0
    start_loss = gt.target_loss(dict(gt.init_model.named_parameters()))
    full = gt.train(keep_checkpoints=True)
    base = gt.target_loss(full.final)
    print(f"L_V: {start_loss:.4f} at the segment's start, {base:.4f} at its end", flush=True)

    # how far a tiny change of the start moves L_V: the floor under the measured effects
    floor = {
        f"init_perturbed_{rel:g}": gt.target_loss(gt.perturbed_init_run(rel).final) - base
        for rel in (1e-10, 1e-6)
    }
    print(f"floor: {floor}", flush=True)

    rng = np.random.default_rng(a.seed + 7)
    defects = np.asarray(gt.defects)
    removed: list[int] = []
    for cls in ("mismatch", "clean"):
        pool = np.flatnonzero(defects == cls)
        removed += rng.choice(pool, size=min(a.per_class, len(pool)), replace=False).tolist()
    removed.sort()
    is_mismatch = defects[removed] == "mismatch"

    t = time.perf_counter()
    ckpts = [c for c, _ in full.checkpoints]
    terms = gt.terms(full.checkpoints, rows=removed, self_influence=True)
    scores = gt.scores(terms, ckpts, rows=removed)
    timings["scores"] = time.perf_counter() - t
    print(f"scores: {timings['scores']:.0f}s", flush=True)

    t = time.perf_counter()
    base_self = gt.sample_losses(full.final, removed)
    actual, actual_self = [], []
    for i, z in enumerate(removed):
        final = gt.train(removed=gt.mask([z])).final
        actual.append(gt.target_loss(final) - base)
        actual_self.append(float(gt.sample_losses(final, [z])[0] - base_self[i]))
        if (i + 1) % 10 == 0:
            print(f"  LOO {i + 1}/{len(removed)} ({time.perf_counter() - t:.0f}s)", flush=True)
    timings["loo"] = time.perf_counter() - t
    y = np.asarray(actual)
    y_self = np.asarray(actual_self)

    def auc_ci(s: np.ndarray) -> list[float]:
        return bootstrap_ci(lambda x, m: auroc_low_is_positive(x, m), s, is_mismatch, n=500)

    summary = {
        "measured_effect": {
            "auroc": auroc_low_is_positive(y, is_mismatch),
            "auroc_ci90": auc_ci(y),
            "mean_mismatch": float(y[is_mismatch].mean()),
            "mean_clean": float(y[~is_mismatch].mean()),
            "negative_fraction_mismatch": float((y[is_mismatch] < 0).mean()),
            "negative_fraction_clean": float((y[~is_mismatch] < 0).mean()),
        },
        "per_scorer": {
            name: {
                "auroc": auroc_low_is_positive(scores[name], is_mismatch),
                "auroc_ci90": auc_ci(scores[name]),
                "spearman_with_measured": spearman(scores[name], y),
            }
            for name in SCORERS
        },
        # own loss: removing a pair the segment memorised raises its loss most, so a high
        # measured change => mismatched, and the AUROC is taken of its negative
        "measured_self_effect": {
            "auroc_high_is_mismatched": auroc_low_is_positive(-y_self, is_mismatch),
            "auroc_ci90": auc_ci(-y_self),
            "mean_mismatch": float(y_self[is_mismatch].mean()),
            "mean_clean": float(y_self[~is_mismatch].mean()),
            "positive_fraction": float((y_self > 0).mean()),
            "spearman_with_measured_target_change": spearman(y_self, y),
        },
        "per_self_scorer": {
            name: {
                "auroc": auroc_low_is_positive(scores[name], is_mismatch),
                "auroc_ci90": auc_ci(scores[name]),
                "spearman_with_measured_self": spearman(scores[name], y_self),
                "positive_fraction": float((scores[name] > 0).mean()),
            }
            for name in SELF_SCORERS
        },
    }
    timings["total"] = time.perf_counter() - t0
    record = {
        "command": "python -m benchmarks.noise_loo "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "setting": setting.__dict__,
        "n_train": gt.n_train,
        "target_loss": {"segment_start": start_loss, "segment_end": base},
        "loss_curve": full.loss_curve,
        "floor": floor,
        "removed": removed,
        "defects": defects[removed].tolist(),
        "measured": y,
        "scores": {k: scores[k] for k in SCORERS},
        "measured_self": y_self,
        "base_own_loss": base_self,
        "self_scores": {k: scores[k] for k in SELF_SCORERS},
        "summary": summary,
        "timings_s": timings,
        "environment": environment(),
    }
    if a.out:
        write_json(a.out, record)
    m = summary["measured_effect"]
    _print_table(
        "measured change of L_V (ground truth)",
        m["auroc"],
        m["auroc_ci90"],
        summary["per_scorer"],
        "spearman_with_measured",
    )
    print(
        f"measured mean: mismatched {m['mean_mismatch']:+.2e}, clean {m['mean_clean']:+.2e}; "
        f"total {timings['total']:.0f}s"
    )
    ms = summary["measured_self_effect"]
    _print_table(
        "measured change of l_z (high => mismatched)",
        ms["auroc_high_is_mismatched"],
        ms["auroc_ci90"],
        summary["per_self_scorer"],
        "spearman_with_measured_self",
    )
    print(
        f"measured own-loss change: mismatched {ms['mean_mismatch']:+.2e}, "
        f"clean {ms['mean_clean']:+.2e}, positive {ms['positive_fraction']:.2f}"
    )
    return record


def figure(records: list[dict], path: str) -> None:
    """Per record: the measured change of L_V by class, and the AUROC of each score. Records
    that also measured the change of the removed pair's own loss get a second figure,
    ``<path>_self.png``, the same for self-influence."""
    _draw(
        records,
        path,
        "measured",
        "measured change of L_V",
        lambda rec: (
            [("measured", rec["summary"]["measured_effect"]["auroc"])]
            + [(n, r["auroc"]) for n, r in rec["summary"]["per_scorer"].items()]
        ),
    )
    with_self = [r for r in records if "measured_self" in r]
    if with_self:
        p = Path(path)
        _draw(
            with_self,
            str(p.with_name(f"{p.stem}_self{p.suffix}")),
            "measured_self",
            "measured change of own loss l_z",
            lambda rec: (
                [
                    (
                        "measured (high => mismatched)",
                        rec["summary"]["measured_self_effect"]["auroc_high_is_mismatched"],
                    )
                ]
                + [(n, r["auroc"]) for n, r in rec["summary"]["per_self_scorer"].items()]
            ),
        )


def _draw(records: list[dict], path: str, key: str, ylabel: str, aurocs) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(len(records), 2, figsize=(11, 3.4 * len(records)), squeeze=False)
    for (left, right), rec in zip(axes, records, strict=True):
        s = rec["setting"]
        title = f"warm start {s['pre_steps']} steps, segment {s['steps']} steps at lr {s['lr']:g}"
        if s.get("seed"):
            title += f", seed {s['seed']}"
        y = np.asarray(rec[key])
        mis = np.asarray(rec["defects"]) == "mismatch"
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(y))
        left.scatter(mis.astype(float) + jitter, y, s=10, c=np.where(mis, "tab:red", "tab:blue"))
        left.set_xticks([0, 1], ["clean", "mismatched"])
        left.axhline(0, lw=0.5, c="k")
        left.set_ylabel(ylabel)
        left.set_title(title, fontsize=9)
        names, vals = zip(*aurocs(rec), strict=True)
        colors = ["k"] + ["tab:green" if n.startswith("diffin") else "tab:gray" for n in names[1:]]
        right.barh(names[::-1], vals[::-1], color=colors[::-1])
        right.axvline(0.5, lw=0.5, c="k", ls=":")
        right.axvline(0.9, lw=0.5, c="tab:red", ls="--")
        right.set_xlim(0, 1)
        right.set_xlabel("AUROC, mismatched vs clean (low score => mismatched)")
        right.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_table(
    measured: str, auroc: float, ci: list[float], per_scorer: dict, spearman_key: str
) -> None:
    """The measured effect's row, then one row per scorer."""
    rows = [[measured, auroc, _ci(ci), 1.0]] + [
        [n, r["auroc"], _ci(r["auroc_ci90"]), r[spearman_key]] for n, r in per_scorer.items()
    ]
    print(
        md_table(["score", "AUROC mismatch vs clean", "90% CI", f"Spearman ({spearman_key})"], rows)
    )


def _ci(ci: list[float]) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


if __name__ == "__main__":
    main()
