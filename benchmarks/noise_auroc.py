"""Noise detection: AUROC of "low score => injected mismatched caption", per scorer and column.

    python -m benchmarks.noise_auroc --work runs/noise --out docs/figures/noise_auroc.json

Runs the real pipeline on the default generated pool (pipeline.data.synth
defaults: 2,000 pairs, 20% mismatched captions, a clean 256-pair target/
split): make-data, train (the CLI defaults: diffin-small, SGD, 400 steps, 25
checkpoints, lr 0.025, unless --steps/--checkpoints/--lr), score (diffin,tracin,loss,loss_mean,
clip_score,random, toward the curated target/ split unless --target held-out),
i.e. the same as

    diffin make-data WORK/pool
    diffin train --data 'WORK/pool/{00000..00007}.tar' --run WORK/run --threads 1
    diffin score --data 'WORK/pool/{00000..00007}.tar' --run WORK/run \
        --methods diffin,tracin,loss,loss_mean,clip_score,random --workers 1 \
        --target 'WORK/pool/target/{00000..00000}.tar'

then joins the score table with truth.parquet. Stages whose outputs exist
are reused (scoring resumes per shard). ``--shards N`` scores only the first
N shards (the AUROC is then over those samples; training still uses all).
Note: training holds out the target set V, but every pool sample is scored.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import environment, md_table, one_thread, pyplot, write_json

METHODS = ["diffin", "tracin", "loss", "loss_mean", "clip_score", "random"]


def auroc_table(scores_url: str, truth_url: str) -> dict:
    import pyarrow.parquet as pq

    from pipeline.evaluation.metrics import auroc_low_is_positive

    table = pq.read_table(scores_url).to_pandas()
    truth = pq.read_table(truth_url, columns=["uid", "defect"]).to_pandas()
    df = table[table.status == "ok"].merge(truth, on="uid", how="inner")
    skip = {"index", "loss_raw"}
    cols = [c for c in df.columns if df[c].dtype.kind == "f" and c not in skip]
    out = {"n": len(df), "defects": df.defect.value_counts().to_dict(), "columns": {}}
    for c in cols:
        v = df[c].to_numpy(np.float64)
        out["columns"][c] = {
            "mismatch_vs_rest": auroc_low_is_positive(v, (df.defect == "mismatch").to_numpy()),
            "mismatch_vs_clean": auroc_low_is_positive(
                v[(df.defect.isin(["mismatch", "clean"])).to_numpy()],
                (df.defect[df.defect.isin(["mismatch", "clean"])] == "mismatch").to_numpy(),
            ),
            "any_defect": auroc_low_is_positive(v, (df.defect != "clean").to_numpy()),
        }
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.noise_auroc", description=__doc__)
    p.add_argument("--work", default="runs/noise")
    p.add_argument("--shards", type=int, default=0, help="score only the first N shards (0: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/figures/noise_auroc.json")
    p.add_argument("--figures", default="docs/figures")
    p.add_argument(
        "--target",
        choices=("curated", "held-out"),
        default="curated",
        help="score toward the pool's clean target/ split (default) or the held-out pool sample",
    )
    p.add_argument("--steps", type=int, default=None, help="proxy steps (default: the CLI's)")
    p.add_argument("--checkpoints", type=int, default=None, help="m (default: the CLI's)")
    p.add_argument("--lr", type=float, default=None, help="proxy rate (default: the CLI's)")
    p.add_argument(
        "--objective",
        default="auto",
        help="diffin's objective (default: the CLI's, auto); the figures measured before "
        "2026-12-02 are --lr 0.1 --checkpoints 5 --objective final",
    )
    p.add_argument("--workers", type=int, default=1, help="scoring actors")
    p.add_argument("--name", default="noise_auroc", help="file name of the figure (.png)")
    a = p.parse_args(argv)
    one_thread(a.threads)
    from pipeline.data.synth import SynthConfig, make_pool
    from pipeline.rundir import RunDir, exists, read_json
    from pipeline.score.config import ScoreConfig
    from pipeline.score.driver import run_scoring
    from pipeline.score.trajectory import load_trajectory
    from pipeline.train.config import TrainConfig
    from pipeline.train.trajectory import train

    t0 = time.perf_counter()
    timings = {}
    pool_dir = f"{a.work}/pool"
    run_dir = f"{a.work}/run"
    t = time.perf_counter()
    summary = make_pool(pool_dir, SynthConfig())
    timings["make_data"] = time.perf_counter() - t
    pattern = summary["train_data"]
    run = RunDir(run_dir)
    t = time.perf_counter()
    if not exists(run.trajectory_json):
        recipe = {
            k: v
            for k, v in (("steps", a.steps), ("checkpoints", a.checkpoints), ("lr", a.lr))
            if v is not None
        }
        train(TrainConfig(data=pattern, run=run_dir, threads=a.threads, **recipe))
    timings["train"] = time.perf_counter() - t
    shards = summary["shards"]
    data = pattern
    if a.shards and a.shards < len(shards):
        from pipeline.data.tarwriter import brace_pattern

        data = brace_pattern(pool_dir, 0, a.shards - 1)
    t = time.perf_counter()
    target = summary["target"]["data"] if a.target == "curated" else None
    score_summary = run_scoring(
        ScoreConfig(
            data=data,
            run=run_dir,
            methods=METHODS,
            workers=a.workers,
            threads=a.threads,
            target=target,
            objective=a.objective,
        )
    )
    timings["score"] = time.perf_counter() - t
    res = auroc_table(run.scores, f"{pool_dir}/truth.parquet")
    traj = load_trajectory(run)
    record = {
        "command": "python -m benchmarks.noise_auroc "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": data,
        "target": target or "held-out sample of the pool",
        "trajectory": {
            "steps": traj.record["steps"],
            "checkpoints": [c.step for c in traj.checkpoints],
            "optimizer": traj.record["optimizer"],
        },
        "objective": read_json(run.path("scores", "request.json"))["objective"],
        "timings_s": {**timings, "total": time.perf_counter() - t0},
        "score_summary": {
            k: score_summary.get(k) for k in ("rows", "seconds", "samples_per_second")
        },
        **res,
        "environment": environment(),
    }
    rows = [
        [c, v["mismatch_vs_rest"], v["mismatch_vs_clean"], v["any_defect"]]
        for c, v in res["columns"].items()
    ]
    print(md_table(["column", "AUROC mismatch", "mismatch vs clean", "any defect"], rows))
    if a.figures:
        plt = pyplot()
        Path(a.figures).mkdir(parents=True, exist_ok=True)
        cols = list(res["columns"])
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(cols)), 3.8))
        ax.bar(cols, [res["columns"][c]["mismatch_vs_rest"] for c in cols])
        ax.axhline(0.5, c="k", lw=0.7, ls="--")
        ax.set_ylim(0, 1)
        ax.set_ylabel("AUROC (low score => mismatch)")
        plt.setp(ax.get_xticklabels(), rotation=45, ha="right", fontsize=7)
        fig.tight_layout()
        fig.savefig(Path(a.figures) / f"{a.name}.png", dpi=110)
        plt.close(fig)
        record["figures"] = [str(Path(a.figures) / f"{a.name}.png")]
    if a.out:
        write_json(a.out, record)
    return record


if __name__ == "__main__":
    main()
