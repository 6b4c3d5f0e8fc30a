"""`diffin demo`: the whole pipeline on the embedded default, with a short summary.

make-data (about 2,000 pairs, 20% mismatched captions, a clean target split) -> train -> score
(local Ray) -> prune -> evaluate -> report, then: samples, errors, kept, where
each output is, how many injected mismatched pairs each scorer's kept set
still holds, and the path of the HTML report.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pandas as pd

from pipeline import runlock
from pipeline.data.shards import absolute_pattern
from pipeline.data.synth import SynthConfig, make_pool
from pipeline.errors import ConfigError
from pipeline.evaluation.config import EvaluateConfig
from pipeline.evaluation.retrain import keep_earlier_evaluation, run_evaluation
from pipeline.model import factory
from pipeline.prune.config import PruneConfig
from pipeline.prune.manifest import select, write_manifest
from pipeline.report.build import build_report
from pipeline.rundir import RunDir, exists, join, read_json, remove, write_json
from pipeline.score.config import ScoreConfig
from pipeline.score.driver import run_scoring
from pipeline.score.table import read_table
from pipeline.train.config import TrainConfig
from pipeline.train.trajectory import train

TARGETS = ("curated", "held-out")


@dataclass
class DemoConfig:
    run: str = "runs/demo"
    samples: int = 2000
    noise: float = 0.2
    shard_size: int = 250
    steps: int = 400
    checkpoints: int = TrainConfig.checkpoints
    workers: int = 2
    keep: float = 0.7
    method: str = "diffin"
    methods: list[str] = field(
        default_factory=lambda: ["diffin", "tracin", "loss", "clip_score", "random"]
    )
    model: str = "diffin-small"
    seed: int = 0
    # TrainConfig's defaults unless set; small pools and short runs need smaller values
    batch_size: int = 64
    warmup: int | None = None  # None: a tenth of the steps, at most 40 (--steps alone suffices)
    resume: bool = True  # continue an interrupted training of the same config
    target_size: int = 128
    reference_size: int = 255
    eval_samples: int = 500
    # "curated": score toward the pool's clean target/ split (what `--target` is in a
    # real run); "held-out": toward the noisy pool sample held out of training.
    target: str = "curated"
    target_samples: int = 256
    evaluate: bool = True  # retrain on each scorer's kept subset (diffin evaluate)
    eval_keeps: list[float] = field(default_factory=lambda: [0.5, 0.7])
    # Diff-In's form (ScoreConfig.second_order): "derived" where the propagation of a
    # short proxy on a small pool diverges, as its error advises (walkthrough)
    second_order: str = "auto"


def stage_configs(
    cfg: DemoConfig,
) -> tuple[SynthConfig, TrainConfig, ScoreConfig, PruneConfig, EvaluateConfig]:
    """Every stage's config, validated before any work (``data`` is filled in once it exists)."""
    synth = SynthConfig(
        samples=cfg.samples,
        shard_size=cfg.shard_size,
        noise=cfg.noise,
        eval_samples=cfg.eval_samples,
        target_samples=cfg.target_samples if cfg.target == "curated" else 0,
        seed=cfg.seed,
    )
    trainc = TrainConfig(
        data="",
        run=cfg.run,
        model=cfg.model,
        steps=cfg.steps,
        # --steps alone must be enough: 40 or fewer steps failed on the fixed warm-up
        # and checkpoint count (review)
        checkpoints=min(cfg.checkpoints, max(cfg.steps, 1)),
        batch_size=cfg.batch_size,
        warmup=min(40, cfg.steps // 10) if cfg.warmup is None else cfg.warmup,
        resume=cfg.resume,
        target_size=cfg.target_size,
        reference_size=cfg.reference_size,
        seed=cfg.seed,
    )
    score = ScoreConfig(
        data="",
        run=cfg.run,
        methods=cfg.methods,
        workers=cfg.workers,
        seed=cfg.seed,
        second_order=cfg.second_order,
    )
    prune = PruneConfig(run=cfg.run, keep=cfg.keep, method=cfg.method, shard_size=cfg.shard_size)
    evaluate = EvaluateConfig(
        run=cfg.run,
        keeps=cfg.eval_keeps,
        methods=[
            m for m in cfg.methods if m in ("diffin", "tracin", "clip_score", "loss", "random")
        ],
        seeds=[cfg.seed],
    )
    synth.validate()
    trainc.validate()
    factory.model_config(cfg.model)
    score.validate()
    prune.validate()
    if cfg.evaluate:
        evaluate.validate()
    if cfg.target not in TARGETS:
        raise ConfigError(f"target: expected one of {TARGETS}, got {cfg.target!r}")
    if cfg.target == "curated" and cfg.target_samples < 1:
        raise ConfigError(f"target_samples: a curated target needs >= 1, got {cfg.target_samples}")
    if cfg.samples < cfg.target_size + cfg.batch_size:
        # What training will ask of the generated pool: refuse it before generating it.
        raise ConfigError(
            f"samples: {cfg.samples} pairs; the proxy needs at least target_size + "
            f"batch_size = {cfg.target_size + cfg.batch_size}"
        )
    if cfg.evaluate and round(min(cfg.eval_keeps) * cfg.samples) < cfg.batch_size:
        # evaluate refuses a subset smaller than one batch; say so before the work.
        raise ConfigError(
            f"eval_keeps: keeping {min(cfg.eval_keeps):g} of {cfg.samples} pairs leaves fewer "
            f"than one batch of {cfg.batch_size}"
        )
    if cfg.method not in cfg.methods:
        raise ConfigError(f"method: {cfg.method!r} is not one of the scored methods {cfg.methods}")
    return synth, trainc, score, prune, evaluate


def mismatch_kept(
    run: RunDir, truth_url: str, methods: list[str], keep: float
) -> dict[str, dict[str, int]]:
    """For each scorer: how many injected defects its kept set would still hold."""
    table = read_table(run.scores)
    truth = read_table(truth_url, columns=["uid", "defect"]).to_pandas()
    out = {}
    for m in methods:
        kept = select(table, m, keep).select(["uid"]).to_pandas().merge(truth, on="uid")
        out[m] = {d: int((kept.defect == d).sum()) for d in ("mismatch", "duplicate", "noise")}
        out[m]["kept"] = len(kept)
    return out


def set_aside_evaluation(run: RunDir) -> str | None:
    """Move an earlier evaluation out of the run: into ``evaluate-history/`` as `diffin
    evaluate` keeps it, and out of run.json (walkthrough: it was deleted, while run.json
    still listed it). Returns where it was kept."""
    kept = keep_earlier_evaluation(run, "demo")
    remove(run.path("evaluate"), recursive=True)
    if exists(run.run_json):
        recorded = read_json(run.run_json)
        if recorded.pop("evaluate", None) is not None:
            write_json(run.run_json, recorded)
    return kept


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    stage_configs(cfg)  # refuse bad configs first
    # Every path the stages record absolute, as the CLI records them: evaluate and report
    # then find the pool from any directory (a relative run gave relative data paths).
    cfg = replace(cfg, run=absolute_pattern(cfg.run))
    # every stage's lock for the whole demo: nothing else writes the run between its stages
    with runlock.hold(cfg.run, list(runlock.CONFLICTS), "demo"):
        return _run_demo(cfg)


def _run_demo(cfg: DemoConfig) -> dict[str, Any]:
    synth_cfg, train_cfg, score_cfg, prune_cfg, eval_cfg = stage_configs(cfg)
    t0 = time.time()
    run = RunDir(cfg.run)
    data = join(cfg.run, "data")
    timings: dict[str, float] = {}
    # An earlier demo's evaluation describes other scores: with --no-evaluate the report
    # would show it as this run's (review).
    set_aside_evaluation(run)

    t = time.time()
    pool = make_pool(data, synth_cfg, overwrite=True)
    timings["make-data"] = time.time() - t

    t = time.time()
    train(replace(train_cfg, data=pool["train_data"]))
    timings["train"] = time.time() - t

    t = time.time()
    target = pool["target"]["data"] if cfg.target == "curated" else None
    score = run_scoring(replace(score_cfg, data=pool["train_data"], target=target))
    timings["score"] = time.time() - t

    t = time.time()
    manifest = write_manifest(prune_cfg)
    timings["prune"] = time.time() - t

    evaluation = None
    if cfg.evaluate:
        t = time.time()
        evaluation = run_evaluation(eval_cfg)
        timings["evaluate"] = time.time() - t

    t = time.time()
    report = build_report(cfg.run, method=cfg.method)
    timings["report"] = time.time() - t

    defects = mismatch_kept(run, join(data, "truth.parquet"), cfg.methods, cfg.keep)
    summary = {
        "config": asdict(cfg),
        "samples": score["rows"],
        "errors": score["rows_error"],
        "kept": manifest["kept"],
        "target": target or "held-out sample of the pool",
        "mismatched_in_pool": pool["defects"]["mismatch"],
        "mismatched_kept": defects[cfg.method]["mismatch"],
        "defects_kept_by_method": defects,
        "outputs": {
            "data": data,
            "trajectory": run.path("trajectory"),
            "scores": run.scores,
            "manifest": manifest["dir"],
            "train_data": manifest["train_data"],
            "evaluation": run.path("evaluate", "results.md") if evaluation else None,
            "report": report,
        },
        "evaluation": [
            {k: r[k] for k in ("subset", "n_train", "zeroshot_top1", "i2t_r5", "t2i_r5")}
            for r in (evaluation["results"] if evaluation else [])
        ],
        "seconds": {k: round(v, 1) for k, v in {**timings, "total": time.time() - t0}.items()},
    }
    write_json(run.path("demo.json"), summary)
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        "",
        "diffin demo: done in {:.0f}s ({})".format(
            s["seconds"]["total"],
            ", ".join(f"{k} {v:.0f}s" for k, v in s["seconds"].items() if k != "total"),
        ),
        f"  samples scored : {s['samples']} ({s['errors']} errors)",
        f"  target set     : {s.get('target', 'held-out sample of the pool')}",
        f"  kept           : {s['kept']} by {s['config']['method']} at keep={s['config']['keep']}",
        f"  mismatched     : {s['mismatched_kept']} of {s['mismatched_in_pool']} injected mismatched "
        "pairs are still in the kept set",
        "  mismatched kept by each scorer at the same keep fraction:",
    ]
    frame = pd.DataFrame(s["defects_kept_by_method"]).T[["kept", "mismatch", "duplicate", "noise"]]
    lines += ["    " + line for line in frame.to_string().splitlines()]
    if s.get("evaluation"):
        lines.append("  retrained on each kept subset (held-out zero-shot top-1, recall@5):")
        ev = pd.DataFrame(s["evaluation"]).set_index("subset")
        lines += ["    " + line for line in ev.to_string(float_format="%.3f").splitlines()]
    lines += [f"  {k:<15}: {v}" for k, v in s["outputs"].items() if v is not None]
    return "\n".join(lines)
