"""The `diffin` command: one subcommand per stage, each a thin layer over a config dataclass."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pipeline.errors import ConfigError


def _methods(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diffin", description="Diff-In data pruning for CLIP pretraining"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("make-data", help="generate an image-text pool with known defects")
    d.add_argument("out")
    d.add_argument("--samples", type=int, default=2000)
    d.add_argument("--shard-size", type=int, default=256)
    d.add_argument("--noise", type=float, default=0.2, help="rate of mismatched captions")
    d.add_argument("--duplicates", type=float, default=0.02)
    d.add_argument("--junk", type=float, default=0.02, help="rate of pure-noise images")
    d.add_argument("--eval-samples", type=int, default=500)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--overwrite", action="store_true")

    t = sub.add_parser("train", help="train the proxy CLIP and keep m checkpoints")
    t.add_argument("--data", required=True, help="shard pattern, e.g. 'pool/{00000..00007}.tar'")
    t.add_argument("--run", required=True)
    t.add_argument("--model", default="diffin-small")
    t.add_argument("--pretrained", default=None, help="checkpoint file or open_clip tag")
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--checkpoints", type=int, default=5)
    t.add_argument("--spacing", choices=["even", "random"], default="even")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--warmup", type=int, default=40)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0)

    s = sub.add_parser("score", help="score every sample on a pool of Ray actors")
    s.add_argument("--data", required=True)
    s.add_argument("--run", required=True)
    s.add_argument("--methods", type=_methods, default=["diffin", "tracin", "random"])
    s.add_argument("--target", default=None, help="shard pattern of a curated target set")
    s.add_argument(
        "--address", default=None, help="Ray cluster address; default: embedded local Ray"
    )
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--no-first-order", dest="first_order", action="store_false")
    s.add_argument("--seed", type=int, default=0)

    r = sub.add_parser("prune", help="keep the best fraction and write the manifest")
    r.add_argument("--run", required=True)
    r.add_argument("--keep", type=float, required=True)
    r.add_argument("--method", default="diffin")
    r.add_argument("--name", default=None)
    r.add_argument("--shard-size", type=int, default=1000)

    m = sub.add_parser("demo", help="the whole pipeline on a generated pool")
    m.add_argument("--run", default="runs/demo")
    m.add_argument("--samples", type=int, default=2000)
    m.add_argument("--steps", type=int, default=400)
    m.add_argument("--workers", type=int, default=2)
    m.add_argument("--keep", type=float, default=0.7)
    m.add_argument("--method", default="diffin")
    return p


def run(args: argparse.Namespace) -> object:
    # Imports are deferred so that `diffin --help` and config errors stay fast.
    if args.command == "make-data":
        from pipeline.data.synth import SynthConfig, make_pool

        cfg = SynthConfig(
            samples=args.samples,
            shard_size=args.shard_size,
            noise=args.noise,
            duplicates=args.duplicates,
            junk=args.junk,
            eval_samples=args.eval_samples,
            seed=args.seed,
        )
        return make_pool(args.out, cfg, overwrite=args.overwrite)
    if args.command == "train":
        from pipeline.train.config import TrainConfig
        from pipeline.train.trajectory import train

        cfg = TrainConfig(
            data=args.data,
            run=args.run,
            model=args.model,
            pretrained=args.pretrained,
            steps=args.steps,
            checkpoints=args.checkpoints,
            spacing=args.spacing,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            lr=args.lr,
            momentum=args.momentum,
            warmup=args.warmup,
            seed=args.seed,
            threads=args.threads,
        )
        record = train(cfg)
        return {k: record[k] for k in ("model", "n_train", "steps", "checkpoints", "seconds")}
    if args.command == "score":
        from pipeline.score.config import ScoreConfig
        from pipeline.score.driver import run_scoring

        return run_scoring(
            ScoreConfig(
                data=args.data,
                run=args.run,
                methods=args.methods,
                target=args.target,
                address=args.address,
                workers=args.workers,
                threads=args.threads,
                batch_size=args.batch_size,
                first_order=args.first_order,
                seed=args.seed,
            )
        )
    if args.command == "prune":
        from pipeline.prune.config import PruneConfig
        from pipeline.prune.manifest import write_manifest

        return write_manifest(
            PruneConfig(
                run=args.run,
                keep=args.keep,
                method=args.method,
                name=args.name,
                shard_size=args.shard_size,
            )
        )
    if args.command == "demo":
        from pipeline.demo import DemoConfig, format_summary, run_demo

        summary = run_demo(
            DemoConfig(
                run=args.run,
                samples=args.samples,
                steps=args.steps,
                workers=args.workers,
                keep=args.keep,
                method=args.method,
            )
        )
        print(format_summary(summary))
        return None
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline import logs

    logs.setup(args.verbose)
    try:
        result = run(args)
    except ConfigError as exc:
        print(f"diffin {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
