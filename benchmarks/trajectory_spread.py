"""One proxy trajectory is one draw: how far noise detection moves with the seed, the CPU
thread count (float rounding alone) and the schedule of the proxy.

    python -m benchmarks.trajectory_spread --work /tmp/spread \
        --out docs/figures/trajectory_spread.json --figures docs/figures

On the demo's pool (`diffin make-data POOL --shard-size 250`: 2,000 pairs, 400
mismatched captions, a clean target/ split) it trains the CLI's 400-step proxy
(diffin-small, SGD momentum 0.9, lr 0.1 unless --lr) for each schedule (constant, the default;
cosine) and seed, with 2 torch threads, plus seed 0 with 1 thread; scores each run
with diffin, tracin and loss toward target/ (2 actors of 1 thread), the same as

    diffin train --data 'POOL/{00000..00007}.tar' --run RUN --steps 400 --seed S \
        --schedule SCHED --threads T
    diffin score --data 'POOL/{00000..00007}.tar' --run RUN --methods diffin,tracin,loss \
        --target 'POOL/target/{00000..00001}.tar' --workers 2 --threads 1

and reports the AUROC of "low score => mismatched caption" (against the rest), the
Spearman correlation between the two thread counts' scores, and the relative distance
between their checkpoints. A run whose scores.parquet exists is reused as it is: remove
the run folder to redo it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import environment, md_table, pyplot, write_json
from benchmarks.noise_auroc import auroc_table

METHODS = ["diffin", "tracin", "loss"]


def run_name(
    schedule: str, seed: int, threads: int, lr: float | None = None, objective: str = "final"
) -> str:
    return (
        f"run-{schedule}-s{seed}-t{threads}"
        + (f"-lr{lr:g}" if lr is not None else "")
        + ("-cmean" if objective == "checkpoint-mean" else "")
    )


def aurocs(scores_url: str, truth_url: str) -> dict[str, float]:
    """AUROC of "low score => mismatched caption" against the rest, per float column."""
    table = auroc_table(scores_url, truth_url)["columns"]
    return {c: v["mismatch_vs_rest"] for c, v in table.items()}


def rank_agreement(a_url: str, b_url: str) -> dict[str, float]:
    """Spearman correlation of each score column between two score tables, matched by uid."""
    import pyarrow.parquet as pq

    from pipeline.evaluation.metrics import spearman

    a = pq.read_table(a_url).to_pandas().set_index("uid").sort_index()
    b = pq.read_table(b_url).to_pandas().set_index("uid").sort_index()
    assert (a.index == b.index).all(), "the two tables score other pairs"
    cols = [
        c for c in a.columns if c in METHODS or c.startswith(("diffin_first_t", "diffin_second_t"))
    ]
    return {c: spearman(a[c].to_numpy(np.float64), b[c].to_numpy(np.float64)) for c in cols}


def checkpoint_distance(a_run: str, b_run: str) -> dict[int, float]:
    """|theta_a - theta_b| / |theta_a| at each checkpoint (float64 sums)."""
    import torch

    from pipeline.rundir import RunDir
    from pipeline.score.trajectory import load_trajectory

    out = {}
    for c in load_trajectory(RunDir(a_run)).checkpoints:
        x, y = (
            torch.load(RunDir(r).checkpoint(c.step), map_location="cpu", weights_only=True)
            for r in (a_run, b_run)
        )
        keys = [k for k in x if x[k].is_floating_point()]
        num = sum(float(((x[k].double() - y[k].double()) ** 2).sum()) for k in keys)
        den = sum(float((x[k].double() ** 2).sum()) for k in keys)
        out[c.step] = (num / den) ** 0.5
    return out


def ensure_run(
    work: str,
    pool: dict,
    schedule: str,
    seed: int,
    threads: int,
    lr: float | None = None,
    steps: int = 400,
    checkpoints: int | None = None,
    name: str | None = None,
    objective: str = "final",
) -> str:
    """WORK/NAME trained and scored as the module docstring says, unless its scores exist.

    ``pool``: :func:`pipeline.data.synth.make_pool`'s summary. Returns the run's folder.
    """
    from pipeline.rundir import RunDir, exists
    from pipeline.score.config import ScoreConfig
    from pipeline.score.driver import run_scoring
    from pipeline.train.config import TrainConfig
    from pipeline.train.trajectory import train

    run_dir = f"{work}/{name or run_name(schedule, seed, threads, lr, objective)}"
    if not exists(RunDir(run_dir).scores):
        train(
            TrainConfig(
                data=pool["train_data"],
                run=run_dir,
                steps=steps,
                schedule=schedule,
                seed=seed,
                threads=threads,
                **({"lr": lr} if lr is not None else {}),
                **({"checkpoints": checkpoints} if checkpoints is not None else {}),
            )
        )
        run_scoring(
            ScoreConfig(
                data=pool["train_data"],
                run=run_dir,
                methods=METHODS,
                workers=2,
                threads=1,
                target=pool["target"]["data"],
                objective=objective,
            )
        )
    return run_dir


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trajectory_spread", description=__doc__)
    p.add_argument("--work", default="runs/spread")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--schedules", nargs="+", default=["constant", "cosine"])
    p.add_argument("--threads", type=int, default=2, help="torch threads of every training")
    p.add_argument(
        "--other-threads", type=int, default=1, help="the second thread count, seed 0 only"
    )
    p.add_argument("--lr", type=float, default=None, help="the proxy's rate (default: the CLI's)")
    p.add_argument("--name", default="trajectory_spread", help="file name of the figure (.png)")
    p.add_argument("--out", default="docs/figures/trajectory_spread.json")
    p.add_argument("--figures", default="docs/figures")
    a = p.parse_args(argv)
    from pipeline.data.synth import SynthConfig, make_pool
    from pipeline.rundir import RunDir

    t0 = time.perf_counter()
    pool_dir = f"{a.work}/pool"
    summary = make_pool(pool_dir, SynthConfig(shard_size=250))  # the demo's pool
    truth = f"{pool_dir}/truth.parquet"
    variants = [(s, seed, a.threads) for s in a.schedules for seed in a.seeds]
    variants += [(s, a.seeds[0], a.other_threads) for s in a.schedules]
    runs = {}
    for schedule, seed, threads in variants:
        name = run_name(schedule, seed, threads, a.lr)
        run = RunDir(ensure_run(a.work, summary, schedule, seed, threads, lr=a.lr, steps=a.steps))
        runs[name] = {
            "schedule": schedule,
            "seed": seed,
            "threads": threads,
            "auroc": aurocs(run.scores, truth),
        }
    over_seeds = {}
    for schedule in a.schedules:
        names = [run_name(schedule, seed, a.threads, a.lr) for seed in a.seeds]
        over_seeds[schedule] = {
            m: {
                "mean": float(np.mean([runs[n]["auroc"][m] for n in names])),
                "sd": float(np.std([runs[n]["auroc"][m] for n in names], ddof=1))
                if len(names) > 1
                else None,
            }
            for m in METHODS
        }
    rounding = {}
    for schedule in a.schedules:
        x = f"{a.work}/{run_name(schedule, a.seeds[0], a.threads, a.lr)}"
        y = f"{a.work}/{run_name(schedule, a.seeds[0], a.other_threads, a.lr)}"
        rounding[schedule] = {
            "spearman": rank_agreement(f"{x}/scores.parquet", f"{y}/scores.parquet"),
            "checkpoint_distance": checkpoint_distance(x, y),
        }
    record = {
        "command": "python -m benchmarks.trajectory_spread "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "pool": pool_dir,
        "runs": runs,
        "over_seeds": over_seeds,
        "rounding": rounding,
        "seconds": time.perf_counter() - t0,
        "environment": environment(),
    }
    print(
        md_table(
            ["run", "schedule", "seed", "threads", *METHODS],
            [
                [n, r["schedule"], r["seed"], r["threads"], *(r["auroc"][m] for m in METHODS)]
                for n, r in runs.items()
            ],
        )
    )
    print(
        md_table(
            ["schedule", *(f"{m} mean ± sd" for m in METHODS)],
            [
                [s, *(f"{v[m]['mean']:.3f} ± {v[m]['sd'] or 0:.3f}" for m in METHODS)]
                for s, v in over_seeds.items()
            ],
        )
    )
    print(
        md_table(
            ["schedule", *(f"Spearman {m}" for m in METHODS), "distance at each checkpoint"],
            [
                [
                    s,
                    *(v["spearman"][m] for m in METHODS),
                    ", ".join(f"{d:.1e}" for d in v["checkpoint_distance"].values()),
                ]
                for s, v in rounding.items()
            ],
        )
    )
    if a.figures:
        plt = pyplot()
        Path(a.figures).mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for s, v in rounding.items():
            d = v["checkpoint_distance"]
            ax.semilogy(list(d), list(d.values()), marker="o", label=f"{s} schedule")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"|θ({a.threads} threads) - θ({a.other_threads})| / |θ|")
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
