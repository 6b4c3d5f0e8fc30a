"""An ensemble of proxies: noise detection of each score averaged over K proxy trajectories.

    python -m benchmarks.proxy_ensemble --work /tmp/spread \\
        --out docs/figures/proxy_ensemble.json --figures docs/figures

One proxy trajectory is one draw (docs/accuracy.md, section 2c). This trains and scores
the same proxies as benchmarks/trajectory_spread.py (the demo's pool, the CLI's 400-step
recipe, seeds 0 to K-1, scored with diffin, tracin and loss toward the clean target/
split; it reuses that script's runs in the same --work) and reports, for each scorer, the
AUROC of "low score => mismatched caption" of each single proxy and of the mean score
over every subset of k of them (k = 2 ... K: mean, lowest and highest over the subsets).

A control asks whether the gain comes from the draws or only from evaluating g_z at more
points: seed 0 trained again with K times the checkpoints (the same trajectory, the same
scoring cost as the K-proxy ensemble). --lr trains every proxy at another rate;
--objective checkpoint-mean scores diffin toward the target loss averaged over the
checkpoints (docs/accuracy.md, section 2e) in runs of their own (suffix -cmean).

The ensemble of all K is then pruned through the real path, ``diffin prune --run R0
--ensemble R1 ... --keep 0.7`` (pipeline.prune.manifest.write_manifest), and the
mismatched captions each manifest keeps are counted against those of seed 0 alone.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import environment, md_table, pyplot, write_json
from benchmarks.trajectory_spread import METHODS, ensure_run

KEEP = 0.7


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.proxy_ensemble", description=__doc__)
    p.add_argument("--work", default="runs/spread")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--threads", type=int, default=2, help="torch threads of every training")
    p.add_argument("--lr", type=float, default=None, help="the proxy's rate (default: the CLI's)")
    p.add_argument(
        "--objective",
        choices=("final", "checkpoint-mean"),
        default="final",
        help="diffin's objective (`diffin score --objective`)",
    )
    p.add_argument("--no-control", action="store_true", help="skip the K x checkpoints run")
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="scorers compared (comma-separated); those beyond diffin,tracin,loss are added "
        "to each proxy's table by `diffin score` (e.g. diffin_self,tracin_self,grand)",
    )
    p.add_argument("--name", default="proxy_ensemble", help="file name of the figure (.png)")
    p.add_argument("--out", default="docs/figures/proxy_ensemble.json")
    p.add_argument("--figures", default="docs/figures")
    a = p.parse_args(argv)
    import pyarrow.parquet as pq

    from pipeline.data.synth import SynthConfig, make_pool
    from pipeline.evaluation.metrics import auroc_low_is_positive
    from pipeline.prune.config import PruneConfig
    from pipeline.prune.manifest import write_manifest
    from pipeline.rundir import RunDir
    from pipeline.score.config import ScoreConfig
    from pipeline.score.driver import run_scoring

    methods = a.methods.split(",")
    t0 = time.perf_counter()
    pool = make_pool(f"{a.work}/pool", SynthConfig(shard_size=250))  # the demo's pool
    runs = [
        ensure_run(a.work, pool, "constant", s, a.threads, lr=a.lr, objective=a.objective)
        for s in a.seeds
    ]
    k_all = len(runs)
    extra = [m for m in methods if m not in METHODS]
    for run in runs if extra else []:
        if not set(extra) <= set(pq.read_schema(RunDir(run).scores).names):
            # score keeps the columns it has and computes only the new scorers
            run_scoring(
                ScoreConfig(
                    data=pool["train_data"],
                    run=run,
                    methods=[*METHODS, *extra],
                    workers=2,
                    threads=1,
                    target=pool["target"]["data"],
                    objective=a.objective,
                )
            )
    control = None
    if not a.no_control:
        control = ensure_run(
            a.work,
            pool,
            "constant",
            a.seeds[0],
            a.threads,
            lr=a.lr,
            objective=a.objective,
            checkpoints=5 * k_all,
            name=f"{Path(runs[0]).name}-ckpt{5 * k_all}",
        )

    truth = pq.read_table(f"{a.work}/pool/truth.parquet", columns=["uid", "defect"]).to_pandas()
    truth = truth.set_index("uid")

    def ok_table(run: str):
        t = pq.read_table(RunDir(run).scores).to_pandas()
        return t[t.status == "ok"].set_index("uid")

    tables = [ok_table(r) for r in runs]
    uids = sorted(set.intersection(*(set(t.index) for t in tables)))
    positive = (truth.loc[uids].defect == "mismatch").to_numpy()
    by_method: dict[str, dict] = {}
    for m in methods:
        x = np.stack([t.loc[uids, m].to_numpy(np.float64) for t in tables])
        single = [auroc_low_is_positive(v, positive) for v in x]
        by_k = {1: single}
        for k in range(2, k_all + 1):
            by_k[k] = [
                auroc_low_is_positive(x[list(c)].mean(0), positive)
                for c in itertools.combinations(range(k_all), k)
            ]
        by_method[m] = {
            "single": single,
            "by_k": {
                k: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}
                for k, v in by_k.items()
            },
        }
        if control is not None and m in METHODS:
            c = ok_table(control)
            by_method[m]["control"] = auroc_low_is_positive(
                c.loc[uids, m].to_numpy(np.float64), positive
            )

    # through the real path: the manifests of seed 0 alone and of the K-proxy ensemble
    kept = {}
    for m in methods:
        for label, ensemble in (("seed 0 alone", None), (f"ensemble of {k_all}", runs[1:])):
            manifest = write_manifest(
                PruneConfig(run=runs[0], keep=KEEP, method=m, ensemble=ensemble)
            )
            keep = pq.read_table(f"{manifest['dir']}/keep.parquet", columns=["uid"]).to_pandas()
            counts = truth.loc[keep.uid].defect.value_counts()
            kept[f"{m}, {label}"] = {
                "manifest": manifest["dir"],
                "kept": int(manifest["kept"]),
                "mismatched_kept": int(counts.get("mismatch", 0)),
            }

    record = {
        "command": "python -m benchmarks.proxy_ensemble "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "lr": a.lr,
        "objective": a.objective,
        "runs": runs,
        "control_run": control,
        "pool": {"rows": len(uids), "mismatched": int(positive.sum())},
        "auroc": by_method,
        "keep": KEEP,
        "manifests": kept,
        "seconds": time.perf_counter() - t0,
        "environment": environment(),
    }
    header = ["scorer", *(f"seed {s}" for s in a.seeds), "mean of singles"]
    header += [f"ensemble of {k} (mean [min, max])" for k in range(2, k_all + 1)]
    header += [f"seed {a.seeds[0]}, {5 * k_all} checkpoints"] if control else []
    rows = []
    for m, v in by_method.items():
        row = [m, *v["single"], float(np.mean(v["single"]))]
        row += [
            f"{v['by_k'][k]['mean']:.3f} [{v['by_k'][k]['min']:.3f}, {v['by_k'][k]['max']:.3f}]"
            for k in range(2, k_all + 1)
        ]
        row += [v.get("control")] if control else []
        rows.append(row)
    print(md_table(header, rows))
    print(
        md_table(
            ["manifest (keep 0.7)", "kept", "mismatched captions kept"],
            [[k, v["kept"], v["mismatched_kept"]] for k, v in kept.items()],
        )
    )
    if a.figures:
        plt = pyplot()
        Path(a.figures).mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        ks = list(range(1, k_all + 1))
        for m, v in by_method.items():
            mean = [v["by_k"][k]["mean"] for k in ks]
            lo = [v["by_k"][k]["min"] for k in ks]
            hi = [v["by_k"][k]["max"] for k in ks]
            (line,) = ax.plot(ks, mean, marker="o", label=m)
            ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.15)
        ax.axhline(0.9, color="grey", lw=0.8, ls="--")
        ax.set_xticks(ks)
        ax.set_xlabel("proxies averaged (k)")
        ax.set_ylabel("noise AUROC (mismatched captions)")
        ax.legend()
        fig.tight_layout()
        path = Path(a.figures) / f"{a.name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        record["figures"] = [str(path)]
    if a.out:
        write_json(a.out, record)
    return record


if __name__ == "__main__":
    main()
