"""Leave-one-out and linear-datamodeling ground truth for every scorer (METHOD.md 7.2).

    python -m benchmarks.loo --out docs/figures/loo.json --figures docs/figures

Trains a small CLIP (float64, plain SGD, fixed seed and data order) on a few
hundred generated pairs, scores every training pair at the full run's
checkpoints with the production code (compute_directions, fast_terms, the
scorer registry), retrains without each of ``--removed`` samples and without
each of ``--subsets`` random halves, and reports Spearman(score, real change
of the target loss) and the LDS per scorer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import environment, md_table, one_thread, pyplot, write_json

SCORERS = (
    "diffin",
    "tracin",
    "diffin_removal",
    "tracin_removal",
    "diffin_cmean",
    "diffin_second",
    "diffin_propagated_hessian",
    "diffin_derived",
    "diffin_derived_second",
    "diffin_hb",
    "diffin_hz",
    "diffin_hv",
    "diffin_method",
    "diffin_method_second",
    "tracin_last",
    "loss",
    "clip_score",
    "random",
)


def analyse(res) -> dict:
    from pipeline.evaluation.metrics import (
        bootstrap_ci,
        lds,
        pearson,
        spearman,
        subset_predictions,
    )

    idx = np.asarray(res.removed)
    actual = res.actual
    out: dict = {"per_scorer": {}}
    for name in SCORERS:
        s = res.scores[name][idx]
        row = {
            "spearman": spearman(s, actual),
            "spearman_ci90": bootstrap_ci(spearman, s, actual, n=500),
            "pearson": pearson(s, actual),
        }
        if name.startswith(("diffin", "tracin")):
            # least-squares slope actual ~ c * predicted (1 = calibrated)
            row["slope"] = float((s * actual).sum() / max((s * s).sum(), 1e-300))
            row["pred_abs_mean"] = float(np.abs(s).mean())
        if name != "tracin":
            # paired: the same resampled removals for both, so the intervals of a
            # difference are not two overlapping marginal intervals
            row["spearman_minus_tracin_ci90"] = bootstrap_ci(
                lambda a, b, y: spearman(a, y) - spearman(b, y),
                s,
                res.scores["tracin"][idx],
                actual,
                n=500,
            )
        if res.subsets is not None:
            row["lds"] = lds(res.scores[name], res.subsets, res.subset_actual)
            predicted = subset_predictions(res.scores[name], res.subsets)
            row["lds_ci90"] = bootstrap_ci(spearman, predicted, res.subset_actual, n=500)
        out["per_scorer"][name] = row
    defects = np.asarray(res.defects)[idx]
    out["actual_by_defect"] = {
        str(d): {"n": int((defects == d).sum()), "mean": float(actual[defects == d].mean())}
        for d in sorted(set(defects))
    }
    if res.actual_cmean is not None:
        # against the effect on the checkpoint-mean objective, which diffin_cmean estimates
        y = res.actual_cmean
        out["checkpoint_mean"] = {
            name: {
                "spearman": spearman(res.scores[name][idx], y),
                "spearman_ci90": bootstrap_ci(spearman, res.scores[name][idx], y, n=500),
            }
            for name in ("diffin_cmean", "diffin_removal", "tracin_removal", "loss")
        }
        out["checkpoint_mean"]["spearman_with_final_effect"] = spearman(y, actual)
    out["actual_abs_mean"] = float(np.abs(actual).mean())
    out["actual_positive_fraction"] = float((actual > 0).mean())
    return out


def plots(res, summary: dict, fig_dir: Path, tag: str = "") -> list[str]:
    plt = pyplot()
    fig_dir.mkdir(parents=True, exist_ok=True)
    idx = np.asarray(res.removed)
    defects = np.asarray(res.defects)[idx]
    names = ["diffin", "tracin", "diffin_derived", "loss"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6))
    for ax, name in zip(axes, names, strict=True):
        s = res.scores[name][idx]
        for d, c in (("clean", "tab:blue"), ("mismatch", "tab:red")):
            m = defects == d
            ax.scatter(s[m], res.actual[m], s=14, c=c, label=d)
        m = ~np.isin(defects, ["clean", "mismatch"])
        if m.any():
            ax.scatter(s[m], res.actual[m], s=14, c="tab:gray", label="other")
        rho = summary["per_scorer"][name]["spearman"]
        ax.set_title(f"{name}: Spearman {rho:+.2f}")
        ax.set_xlabel("score (predicted delta L_V)")
        ax.axhline(0, lw=0.5, c="k")
        ax.axvline(0, lw=0.5, c="k")
    axes[0].set_ylabel("actual delta L_V (LOO)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    files = [str(fig_dir / f"loo_scatter{tag}.png")]
    fig.savefig(files[0], dpi=110)
    plt.close(fig)
    if res.subsets is not None:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
        for ax, name in zip(axes, ["diffin", "tracin"], strict=True):
            pred = res.subsets.astype(float) @ res.scores[name]
            ax.scatter(pred, res.subset_actual, s=16)
            ax.set_title(f"{name}: LDS {summary['per_scorer'][name]['lds']:+.2f}")
            ax.set_xlabel("sum of removed scores")
        axes[0].set_ylabel("actual delta L_V (half removed)")
        fig.tight_layout()
        files.append(str(fig_dir / f"lds_scatter{tag}.png"))
        fig.savefig(files[1], dpi=110)
        plt.close(fig)
    return files


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loo", description=__doc__)
    p.add_argument("--model", default="diffin-tiny")
    p.add_argument("--samples", type=int, default=360, help="generated pairs (train + target)")
    p.add_argument("--target-size", type=int, default=60)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--checkpoints", type=int, default=5)
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--removed", type=int, default=40)
    p.add_argument("--subsets", type=int, default=16)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pre-steps", type=int, default=0, help="warm start: steps before the segment")
    p.add_argument("--pre-lr", type=float, default=1.0)
    p.add_argument(
        "--radius-iters",
        type=int,
        default=12,
        help="power iterations for the top eigenvalue of H_B per checkpoint (0: skip)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/figures/loo.json")
    p.add_argument("--figures", default="docs/figures")
    p.add_argument("--tag", default="", help="suffix of the figure file names")
    a = p.parse_args(argv)
    one_thread(a.threads)
    from pipeline.evaluation.groundtruth import LOOSetting, run_groundtruth

    t0 = time.perf_counter()
    setting = LOOSetting(
        model=a.model,
        samples=a.samples,
        target_size=a.target_size,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        momentum=a.momentum,
        warmup=a.warmup,
        checkpoints=a.checkpoints,
        dtype=a.dtype,
        seed=a.seed,
        pre_steps=a.pre_steps,
        pre_lr=a.pre_lr,
    )
    res = run_groundtruth(setting, a.removed, a.subsets, a.fraction, radius_iters=a.radius_iters)
    summary = analyse(res)
    total = time.perf_counter() - t0
    figs = plots(res, summary, Path(a.figures), a.tag) if a.figures else []
    record = {
        "command": "python -m benchmarks.loo "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "setting": res.setting,
        "n_train": res.n_train,
        "base_target_loss": res.base_target_loss,
        "loss_curve": res.loss_curve,
        "checkpoints": res.checkpoints,
        "expansion_radius": res.radius,
        "noise_floor": res.noise_floor,
        "timings_s": {**res.timings, "total": total},
        "summary": summary,
        "removed": res.removed,
        "actual": res.actual,
        "actual_cmean": res.actual_cmean,
        "scores_removed": {k: res.scores[k][np.asarray(res.removed)] for k in SCORERS},
        # everything the LDS is computed from, so that it can be rechecked
        "scores": {k: res.scores[k] for k in SCORERS},
        "subsets_removed": (
            [np.flatnonzero(m).tolist() for m in res.subsets] if res.subsets is not None else None
        ),
        "subset_actual": res.subset_actual,
        "figures": figs,
        "environment": environment(),
    }
    if a.out:
        write_json(a.out, record)
    rows = [
        [
            n,
            r["spearman"],
            f"[{r['spearman_ci90'][0]:+.2f}, {r['spearman_ci90'][1]:+.2f}]",
            r.get("lds", float("nan")),
        ]
        for n, r in summary["per_scorer"].items()
    ]
    print(md_table(["scorer", "Spearman (LOO)", "90% CI", "LDS"], rows))
    print("actual by defect:", summary["actual_by_defect"])
    if "checkpoint_mean" in summary:
        print("against the checkpoint-mean effect:", summary["checkpoint_mean"])
    print("noise floor:", res.noise_floor)
    print(f"total {total:.0f}s; timings {res.timings}")
    return record


if __name__ == "__main__":
    main()
