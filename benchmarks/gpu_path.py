"""The GPU scoring path end to end, against the CPU (a device check, not a test).

    python -m benchmarks.gpu_path --out DIR [--model diffin-small] [--variants gpu,cpu,...]

Generates a pool, trains a proxy once (in this process, or ``--train-workers 1``:
Ray Train on one GPU), then scores that trajectory once per variant, each on a
fresh copy of the trained run (so each computes its own direction vectors on
its own device), through ``run_scoring`` with an embedded Ray, as `diffin score`:

- ``gpu``:        one actor on one GPU, float32 (TF32 off): the reference here;
- ``gpu_shared``: two actors sharing the GPU (``--gpus-per-worker 0.5``);
- ``gpu_bf16``:   one actor on one GPU, ``--dtype amp_bf16``;
- ``cpu``:        CPU actors (``--gpus-per-worker 0``);
- ``cpu_one``:    one CPU actor.

Every score column of every variant is compared with the ``gpu`` run's, row by
row on uid: largest difference over the largest magnitude, Spearman, and
whether the columns are bitwise equal. Each variant's summary gives the
pipeline's samples per second (decoding, Ray and all; ``steady_*`` leaves out
each actor's start-up). Written to ``DIR/gpu_path.json``; the figures of the
one run on an accelerator are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from benchmarks.common import environment, write_json

VARIANTS = {
    "gpu": {"gpus_per_worker": 1.0, "workers": 1},
    "gpu_shared": {"gpus_per_worker": 0.5, "workers": 2},
    "gpu_bf16": {"gpus_per_worker": 1.0, "workers": 1, "dtype": "amp_bf16"},
    "cpu": {"gpus_per_worker": 0.0},
    "cpu_one": {"gpus_per_worker": 0.0, "workers": 1},
}
SUMMARY_KEYS = (
    "rows",
    "rows_ok",
    "rows_error",
    "seconds",
    "scoring_seconds",
    "samples_per_second",
    "steady_samples_per_second",
    "actors",
)


def compare(ref, other, columns: list[str]) -> dict[str, dict]:
    """Each score column of ``other`` against ``ref`` (pandas frames), on uid, ok rows."""
    from scipy.stats import spearmanr

    m = ref.merge(other, on="uid", suffixes=("_ref", "_x"))
    out = {}
    for c in columns:
        a, b = m[c + "_ref"].to_numpy(float), m[c + "_x"].to_numpy(float)
        scale = max(abs(a).max(), 1e-30)
        out[c] = {
            "rows": len(m),
            "bitwise_equal": bool((a == b).all()),
            "max_abs_diff_over_max_abs": float(abs(a - b).max() / scale),
            "spearman": float(spearmanr(a, b)[0]),
        }
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_path", description=__doc__)
    p.add_argument("--out", required=True, help="working directory; gpu_path.json is written here")
    p.add_argument("--model", default="diffin-small")
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--checkpoints", type=int, default=2)
    p.add_argument("--train-workers", type=int, default=0, help="1: train on one GPU (Ray Train)")
    p.add_argument("--methods", default="diffin,tracin,loss,clip_score,random")
    p.add_argument("--variants", default="gpu,gpu_shared,gpu_bf16,cpu")
    p.add_argument("--reference", default="gpu", help="the variant the others are compared with")
    p.add_argument("--cpu-workers", type=int, default=4)
    p.add_argument("--cpu-threads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    # the pipeline's own progress, timestamped: a run cut short by its time limit shows
    # which stage it was in (the first accelerator run lost that)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from pipeline.data.synth import SynthConfig, make_pool
    from pipeline.rundir import RunDir
    from pipeline.score.config import ScoreConfig
    from pipeline.score.driver import run_scoring
    from pipeline.score.table import read_table
    from pipeline.train.config import TrainConfig
    from pipeline.train.trajectory import train

    t0 = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = a.methods.split(",")
    variants = a.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {sorted(VARIANTS)}")
    record: dict = {
        "command": "python -m benchmarks.gpu_path "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": vars(a),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "environment": environment(),
        "variants": {},
    }

    def save() -> None:  # after every stage: a run stopped at its time limit keeps what it had
        record["total_seconds"] = round(time.perf_counter() - t0, 1)
        write_json(out / "gpu_path.json", record)

    t = time.perf_counter()
    pool = make_pool(
        str(out / "data"),
        SynthConfig(
            samples=a.samples,
            shard_size=a.shard_size,
            eval_samples=0,
            target_samples=0,
            seed=a.seed,
        ),
    )
    record["make_data_seconds"] = round(time.perf_counter() - t, 1)
    base = out / "base"
    t = time.perf_counter()
    train(
        TrainConfig(
            data=pool["train_data"],
            run=str(base),
            model=a.model,
            steps=a.steps,
            checkpoints=a.checkpoints,
            warmup=min(40, a.steps // 10),
            workers=a.train_workers,
            seed=a.seed,
        )
    )
    record["train_seconds"] = round(time.perf_counter() - t, 1)
    save()

    tables = {}
    for name in variants:
        run = out / name
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base, run)
        v = dict(VARIANTS[name])
        if name == "cpu":
            v.update(workers=a.cpu_workers, threads=a.cpu_threads)
        cfg = ScoreConfig(
            data=pool["train_data"],
            run=str(run),
            methods=methods,
            batch_size=a.batch_size,
            seed=a.seed,
            **v,
        )
        t = time.perf_counter()
        try:
            summary = run_scoring(cfg)
        except Exception as exc:  # one variant's failure is a finding; the others still run
            record["variants"][name] = {"config": v, "error": f"{type(exc).__name__}: {exc}"}
            save()
            continue
        entry = {k: summary.get(k) for k in SUMMARY_KEYS}
        entry["config"] = v
        entry["wall_seconds"] = round(time.perf_counter() - t, 1)
        if entry["steady_samples_per_second"]:
            # per sample and checkpoint: what the throughput benchmark's rates count
            entry["steady_sample_checkpoints_per_second"] = (
                entry["steady_samples_per_second"] * a.checkpoints
            )
        table = read_table(RunDir(str(run)).scores).to_pandas()
        tables[name] = table[table["status"] == "ok"][["uid", *methods]]
        if name != a.reference and a.reference in tables:
            entry["vs_" + a.reference] = compare(tables[a.reference], tables[name], methods)
        record["variants"][name] = entry
        save()
    save()
    print(
        {
            k: {x: v.get(x) for x in ("error", "steady_samples_per_second", "vs_" + a.reference)}
            for k, v in record["variants"].items()
        }
    )
    return record


if __name__ == "__main__":
    main()
