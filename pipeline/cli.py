"""The `diffin` command: one subcommand per stage, each a thin layer over a config dataclass."""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import os
import re
import shlex
import signal
import sys
import typing
from collections.abc import Mapping, Sequence

from pipeline.data.keys import IMAGE_KEYS, TEXT_KEYS
from pipeline.data.reader import MAX_IMAGE_PIXELS
from pipeline.data.shards import absolute_pattern, relative_items
from pipeline.errors import TERMINATED, ConfigError, StageFailed, field_flag, handle_sigterm
from pipeline.influence.directions import GGN_KEPT_PAIRS, PAIRS_PER_PASS
from pipeline.influence.estimator import CURVATURES, FORMS
from pipeline.prune.config import NORMS
from pipeline.score.config import AUTO_OBJECTIVE, DTYPE_CHOICES, OBJECTIVES, SAMPLE_GRADIENTS
from pipeline.scorers import REGISTRY
from pipeline.train.config import TrainConfig


def _methods(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def _add_reader_keys(parser: argparse.ArgumentParser, as_trained: bool = False) -> None:
    """Which members hold a sample's image and caption (img2dataset pools may differ).

    ``as_trained``: unset, they are the ones the proxy was trained with (walkthrough: a
    proxy trained with --image-key image was scored with jpg, and every row failed after
    a full pass over the pool)."""
    trained = " (default: as the proxy was trained)" if as_trained else ""
    parser.add_argument(
        "--image-key",
        type=_methods,
        default=None if as_trained else list(IMAGE_KEYS),
        help="comma list of image extensions, first present wins" + trained,
    )
    parser.add_argument(
        "--text-key",
        type=_methods,
        default=None if as_trained else list(TEXT_KEYS),
        help="comma list of caption extensions" + trained,
    )
    parser.add_argument(
        "--max-image-pixels",
        type=_positive,
        default=None if as_trained else MAX_IMAGE_PIXELS,
        help="an image declaring more pixels (width x height) is an error row, never decoded"
        + trained,
    )


METHODS_HELP = "comma-separated scorers: " + ", ".join(sorted(REGISTRY))


def _default(value: object) -> str:
    return f" (default {value})"


# `diffin train`'s options that say how to train. --import takes all of them from the
# open_clip_train run's params.txt, so one given with it is refused, not ignored.
TRAINING_ONLY = {
    "pretrained": "--pretrained",
    "steps": "--steps",
    "checkpoints": "--checkpoints",
    "spacing": "--spacing",
    "optimizer": "--optimizer",
    "lr": "--lr",
    "momentum": "--momentum",
    "weight_decay": "--weight-decay",
    "warmup": "--warmup",
    "schedule": "--schedule",
    "workers": "--workers",
    "address": "--address",
    "precision": "--precision",
    "resume": "--resume/--no-resume",
    "resume_every": "--resume-every",
    "max_failures": "--max-failures",
}


class _Help(argparse.HelpFormatter):
    """Shows each option's default, unless it is None or False or its help already says it."""

    @staticmethod
    def _with_default(action: argparse.Action) -> str | None:
        text, default = action.help or "", action.default
        if not action.option_strings or default is None or default is False:
            return None
        if default is argparse.SUPPRESS:
            return None
        if action.nargs == 0:  # a switch: "--no-first-order (default: True)" would mislead
            return None
        if "default" in text:
            return None
        # As the option is written: --methods takes a comma list, --keep several values.
        sep = " " if action.nargs in ("+", "*") else ","
        shown = sep.join(map(str, default)) if isinstance(default, list) else str(default)
        return f"{text} (default: {shown})".strip().replace("%", "%%")

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._with_default(action):
            action = copy.copy(action)  # argparse prints no help line for help=None
            action.help = self._with_default(action)
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        return self._with_default(action) or action.help or ""


def _fusion_norm_arg(parser: argparse.ArgumentParser) -> None:
    """--fusion-norm, as prune and evaluate share it (their --fuse differ)."""
    parser.add_argument(
        "--fusion-norm",
        choices=list(NORMS),
        default=None,
        help="with --fuse: how each scorer is normalised (default: zscore)",
    )


RUN_HELP = "the run directory every stage reads and writes (a local path or an fsspec URL)"


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Parser(argparse.ArgumentParser):
    """argparse that suggests the nearest command for a typo (Python 3.11's does not)."""

    def error(self, message: str) -> typing.NoReturn:
        # Python 3.12.8+ lists the choices unquoted (gh-117766), earlier ones quoted
        typed = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if typed:
            choices = [c.strip("'") for c in typed.group(2).split(", ")]
            message += _did_you_mean(typed.group(1), choices)
        super().error(message)


def _subcommand(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings]


def _unknown_options(parser: argparse.ArgumentParser, command: str, extra: list[str]) -> str:
    """'unrecognized arguments' with the nearest flag of the subcommand for each typo."""
    options = [s for s in _option_strings(_subcommand(parser, command)) if s.startswith("--")]
    named = []
    for arg in extra:
        flag = arg.split("=", 1)[0]
        named.append(arg + (_did_you_mean(flag, options) if flag.startswith("--") else ""))
    return "unrecognized arguments: " + " ".join(named)


def _as_flag(parser: argparse.ArgumentParser, command: str, message: str) -> str:
    """A config check names the dataclass field ("batch_size: ..."); on the command line
    the user typed the flag, so name that (jobs and specs keep the field name)."""
    field = re.match(r"([a-z][a-z0-9_]*):", message)
    if field:
        name = field.group(1)
        flag = field_flag(name)
        if flag in _option_strings(_subcommand(parser, command)):
            return flag + message[field.end() - 1 :]
    return message


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="diffin", description="Diff-In data pruning for CLIP pretraining")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    p.add_argument("--version", action="version", version=f"diffin {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("make-data", help="generate an image-text pool with known defects")
    d.add_argument("out", help="folder of the pool (a local path or an fsspec URL)")
    d.add_argument("--samples", type=int, default=2000, help="image-text pairs in the pool")
    d.add_argument("--shard-size", type=int, default=256, help="pairs per .tar shard")
    d.add_argument("--noise", type=float, default=0.2, help="rate of mismatched captions")
    d.add_argument(
        "--duplicates", type=float, default=0.02, help="fraction of exact duplicate pairs"
    )
    d.add_argument("--junk", type=float, default=0.02, help="rate of pure-noise images")
    d.add_argument(
        "--eval-samples", type=int, default=500, help="pairs of the held-out eval/ split"
    )
    d.add_argument(
        "--target-samples",
        type=int,
        default=256,
        help="clean pairs in OUT/target/, a curated target set for `diffin score --target`",
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the .tar, .parquet and sizes.json files in OUT (and OUT/eval, OUT/target) "
        "first, whoever wrote them",
    )

    t = sub.add_parser(
        "train",
        help="train the proxy CLIP and keep m checkpoints (or --import an open_clip_train run)",
    )
    t.add_argument("--data", required=True, help="shard pattern, e.g. 'pool/{00000..00007}.tar'")
    t.add_argument("--run", required=True, help=RUN_HELP)
    t.add_argument(
        "--model",
        default=None,
        help="open_clip model name (default diffin-small; with --import: the run's model)",
    )
    # The training's own options default to None, TrainConfig's defaults filling in, so that
    # --import (whose run's params.txt says how it trained) can refuse them when given.
    t.add_argument("--pretrained", default=None, help="checkpoint file or open_clip tag")
    t.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps of the proxy, each one --batch-size batch{_default(TrainConfig.steps)}",
    )
    t.add_argument(
        "--checkpoints",
        type=int,
        default=None,
        help="m: checkpoints written (evenly spaced: the last at the final step); the "
        "scores sum over them; scoring time grows with m (docs/operations.md, 'Choosing m')"
        + f" (default {TrainConfig.checkpoints}, at most --steps)",
    )
    t.add_argument(
        "--spacing",
        choices=["even", "random"],
        default=None,
        help="where the checkpoints fall: evenly, or at seeded random steps"
        + _default(TrainConfig.spacing),
    )
    t.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="global batch (default 64; with --import: the run's global batch, for g_B)",
    )
    t.add_argument(
        "--optimizer", choices=["sgd", "adamw"], default=None, help=_default(TrainConfig.optimizer)
    )
    t.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate; the default is an SGD rate (with --optimizer adamw give about "
        f"1e-3 to 2e-3){_default(TrainConfig.lr)}",
    )
    t.add_argument("--momentum", type=float, default=None, help=_default(TrainConfig.momentum))
    t.add_argument(
        "--weight-decay", type=float, default=None, help=_default(TrainConfig.weight_decay)
    )
    t.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"warm-up steps (default: a tenth of --steps, at most {TrainConfig.warmup})",
    )
    t.add_argument(
        "--schedule",
        choices=["constant", "cosine"],
        default=None,
        help="the rate after warm-up: constant, or cosine decay towards 0 at the end"
        + _default(TrainConfig.schedule),
    )
    t.add_argument(
        "--seed",
        type=int,
        default=0,
        help="initialisation, data order, held-out sets and random spacing"
        + _default(TrainConfig.seed),
    )
    t.add_argument(
        "--target-size",
        type=int,
        default=128,
        help="|V|: pool pairs held out of training, the target of `diffin score` without "
        "--target (held out even when score is given one: keep it small on a small pool)",
    )
    t.add_argument("--reference-size", type=int, default=255, help="K reference negatives")
    t.add_argument("--grad-batches", type=int, default=4, help="k batches for g_B and H_B")
    t.add_argument(
        "--max-samples",
        type=int,
        default=TrainConfig.max_samples,
        help="the proxy trains in memory on at most this many pairs of the pool, a seeded "
        "sample of it (the sets come from them too); scoring covers the whole pool",
    )
    t.add_argument(
        "--threads", type=int, default=0, help="torch threads (per worker; 0: torch's default)"
    )
    t.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data-parallel Ray Train workers (default 0: train in this process)",
    )
    t.add_argument(
        "--address", default=None, help="Ray cluster for --workers; default: embedded local Ray"
    )
    t.add_argument(
        "--precision",
        choices=["fp32", "amp", "fp64"],
        default=None,
        help="amp: bf16 autocast on CUDA workers (fp32 elsewhere; default fp32)",
    )
    t.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="continue an interrupted run of the same config from RUN/trajectory/resume.pt "
        "(default: on)",
    )
    t.add_argument(
        "--resume-every",
        type=int,
        default=None,
        help="also save the resume state every N steps (default: at checkpoints only)",
    )
    t.add_argument(
        "--max-failures",
        type=int,
        default=None,
        help=f"Ray Train restarts of a failed worker group{_default(TrainConfig.max_failures)}",
    )
    t.add_argument(
        "--import",
        dest="import_dir",
        default=None,
        metavar="DIR",
        help="import an open_clip_train run (DIR/params.txt, DIR/checkpoints/epoch_K.pt) "
        "instead of training; --data gives the pool for the sets",
    )
    t.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="--import: optimizer steps per epoch, where params.txt does not determine them",
    )
    _add_reader_keys(t)

    s = sub.add_parser("score", help="score every sample on a pool of Ray actors")
    s.add_argument("--data", required=True, help="shard pattern of the pool to score")
    s.add_argument("--run", required=True, help=RUN_HELP)
    s.add_argument(
        "--methods", type=_methods, default=["diffin", "tracin", "random"], help=METHODS_HELP
    )
    s.add_argument("--target", default=None, help="shard pattern of a curated target set")
    s.add_argument(
        "--target-max",
        type=int,
        default=1024,
        help="use at most this many --target pairs, the first ones in shard order (the "
        "target's gradient and Hessian-vector products cost grows with it)",
    )
    s.add_argument(
        "--address", default=None, help="Ray cluster address; default: embedded local Ray"
    )
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--threads", type=int, default=1, help="torch threads (and CPUs) per actor")
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument(
        "--no-first-order",
        dest="first_order",
        action="store_false",
        help="diffin (and diffin_self) without the first-order (TracIn) term: the "
        "second-order part alone",
    )
    s.add_argument(
        "--second-order",
        choices=("auto", *FORMS),
        default="auto",
        help="form of Diff-In: 'auto' (default: 'propagated' for an SGD trajectory, "
        "'derived' otherwise), 'propagated' (the damping applied exactly through the "
        "linearised SGD), 'derived' (the second-order expansion) or 'method' (the "
        "paper's weights and the authors' code, literally); docs/method.md",
    )
    s.add_argument(
        "--propagate-curvature",
        choices=CURVATURES,
        default="ggn",
        help="curvature of the propagated form: 'ggn' (Gauss-Newton, positive semi-definite; "
        "default) or 'hessian' (exact H_B, whose negative curvature can blow the product up)",
    )
    s.add_argument(
        "--objective",
        choices=(AUTO_OBJECTIVE, *OBJECTIVES),
        default=AUTO_OBJECTIVE,
        help="what diffin's removal effect is on: 'checkpoint-mean' (the target loss's mean "
        "over the checkpoints: less a single draw of the proxy; propagated form only; "
        "docs/accuracy.md 2e), 'final' (the target loss at the last checkpoint), or 'auto' "
        "(default): checkpoint-mean for the propagated form with the first-order term, "
        "final otherwise",
    )
    s.add_argument(
        "--sample-gradient",
        choices=SAMPLE_GRADIENTS,
        default="removal",
        help="g_z of diffin and tracin: 'removal' (z's removal gradient from the references "
        "used as a batch, z's role as a negative included; default: docs/accuracy.md 1g) or "
        "'reference' (gradient of the reference-negative loss, the default before 2026-11-29)",
    )
    s.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="float32",
        help="'float32' (default), 'float64', or 'amp_bf16': float32 weights and directions, "
        "the per-sample passes under bfloat16 autocast, for GPUs (not the per-sample-gradient "
        "scorers; docs/accuracy.md section 6)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--max-attempts",
        type=int,
        default=3,
        help="tries per shard before it is recorded as failed (an error row)",
    )
    s.add_argument(
        "--prefetch-batches",
        type=int,
        default=2,
        help="batches each actor decodes ahead in a background thread (0: no next-shard hint)",
    )
    s.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per scoring actor, at most 1 (0.5: two actors share one); default: 1 "
        "when the cluster has GPUs, else 0",
    )
    _add_reader_keys(s, as_trained=True)
    s.add_argument(
        "--self-hb",
        choices=["lanczos", "fisher"],
        default="lanczos",
        help="diffin_self: how g_z' H_B g_z is approximated (docs/method.md)",
    )
    s.add_argument("--self-rank", type=int, default=16, help="diffin_self: eigenpairs of H_B")
    s.add_argument("--self-dim", type=int, default=2048, help="diffin_self: sketch dim (fisher)")
    s.add_argument(
        "--memory-mb",
        type=int,
        default=1024,
        help="diffin_self: per-actor budget for per-sample gradients in flight",
    )
    s.add_argument(
        "--directions-chunk",
        type=int,
        default=PAIRS_PER_PASS,
        help="pairs per differentiated pass when the direction vectors are computed (once per "
        "checkpoint): lower it if that stage runs out of memory on a large model",
    )
    s.add_argument(
        "--ggn-kept-pairs",
        type=int,
        default=GGN_KEPT_PAIRS,
        help="propagated form: gradient-batch pairs whose graphs the Gauss-Newton products keep "
        "(faster); the rest are recomputed --directions-chunk pairs at a time (0: none kept)",
    )

    r = sub.add_parser("prune", help="keep the best fraction and write the manifest")
    r.add_argument("--run", required=True, help=RUN_HELP)
    r.add_argument(
        "--keep", type=float, default=None, help="fraction to keep (not used by --rule threshold)"
    )
    r.add_argument("--method", default=None, help="score column to rank by (default: diffin)")
    r.add_argument(
        "--name",
        default=None,
        help="the manifest's folder under RUN/prune/ (default from the rule, e.g. "
        "diffin-keep0.7, diffin-ge0.01, diffin-keep0.7-proportional-cluster8); a name used "
        "before is replaced",
    )
    r.add_argument("--shard-size", type=int, default=1000)
    r.add_argument(
        "--rule",
        choices=["fraction", "threshold", "balanced"],
        default="fraction",
        help="fraction: top --keep; threshold: score >= --threshold; balanced: top --keep per group",
    )
    r.add_argument("--threshold", type=float, default=None, help="rule threshold: minimum score")
    r.add_argument(
        "--balance-by",
        default=None,
        help="rule balanced: 'cluster' (k-means on proxy image embeddings) or a score-table column",
    )
    # Options one rule uses default to None here, so a value given to a rule
    # that ignores it is refused instead of being recorded as if it applied.
    r.add_argument(
        "--balance",
        choices=["proportional", "equal"],
        default=None,
        help="rule balanced: quotas (default: proportional)",
    )
    r.add_argument(
        "--clusters", type=int, default=None, help="k for --balance-by cluster (default: 8)"
    )
    r.add_argument(
        "--cluster-seed", type=int, default=None, help="--balance-by cluster (default: 0)"
    )

    def _weights(text: str) -> dict[str, float]:
        """'diffin=1,clip_score=0.5' -> {"diffin": 1.0, "clip_score": 0.5}."""
        out: dict[str, float] = {}
        for item in text.split(","):
            name, sep, weight = item.partition("=")
            name = name.strip()
            if name in out:
                raise argparse.ArgumentTypeError(f"{name!r} is named twice")
            try:
                out[name] = float(weight) if sep else 1.0
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"bad weight in {item!r} (want NAME=NUMBER, or NAME alone for weight 1)"
                ) from None
        return out

    r.add_argument(
        "--fuse",
        type=_weights,
        default=None,
        help="rank by a weighted fusion of scorers instead of --method, e.g. "
        "'diffin=1,clip_score=0.5' (a name alone weighs 1)",
    )
    _fusion_norm_arg(r)
    r.add_argument(
        "--ensemble",
        nargs="+",
        default=None,
        metavar="RUN",
        help="other runs trained on the same pool (another --seed) and scored with the same "
        "--data: rank by each score's mean over --run and these (the manifest is written "
        "under --run, named ...-ensN)",
    )

    e = sub.add_parser(
        "evaluate", help="retrain on each scorer's kept subset and measure the held-out split"
    )
    e.add_argument("--run", required=True, help=RUN_HELP)
    e.add_argument(
        "--keep", type=float, nargs="+", default=[0.5, 0.7], help="keep fractions to compare"
    )
    e.add_argument(
        "--methods",
        type=_methods,
        default=None,
        help="scored columns to compare (comma-separated); default: every scorer of the table",
    )
    e.add_argument(
        "--fuse",
        type=_weights,
        action="append",
        default=None,
        help="also compare a weighted fusion of scorers, kept as `diffin prune --fuse` keeps it, "
        "e.g. 'diffin_self=1,loss=1' (repeatable: one subset per fusion and keep)",
    )
    _fusion_norm_arg(e)
    e.add_argument(
        "--ensemble",
        nargs="+",
        default=None,
        metavar="RUN",
        help="other runs of the same pool, as for `diffin prune --ensemble`: also compare each "
        "of --methods ranked by its mean over --run and these (subsets METHOD-ensN@KEEP)",
    )
    e.add_argument("--no-full", dest="full", action="store_false", help="skip the full pool")
    e.add_argument(
        "--max-pairs",
        type=int,
        default=None,
        help="for pools too large to retrain on in memory: cut every subset to the same "
        "fraction, MAX_PAIRS / ok pairs, by a seeded draw (the full pool to MAX_PAIRS)",
    )
    e.add_argument("--data", default=None, help="the scored pool; default: as scored")
    e.add_argument("--eval-data", default=None, help="held-out shards; default: the pool's eval/")
    e.add_argument("--eval-labels", default=None, help="parquet (uid, label) for zero-shot")
    e.add_argument("--classes", default=None, help='json {"classnames": [...], "templates": [...]}')
    e.add_argument("--truth", default=None, help="parquet (uid, defect) of known defects")
    e.add_argument("--steps", type=int, default=None, help="default: the proxy's")
    e.add_argument("--batch-size", type=int, default=None, help="default: the proxy's")
    e.add_argument(
        "--optimizer",
        choices=["sgd", "adamw"],
        default="adamw",
        help="retraining optimiser (not the proxy's: docs/results.md)",
    )
    e.add_argument("--lr", type=float, default=1e-3)
    e.add_argument("--weight-decay", type=float, default=0.1)
    e.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="one retraining per subset and seed"
    )
    e.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")

    rp = sub.add_parser("report", help="write RUN/report/index.html")
    rp.add_argument("--run", required=True, help=RUN_HELP)
    rp.add_argument("--method", default=None, help="scorer of the galleries; default: diffin")
    rp.add_argument("--top", type=_positive, default=12, help="pairs in each gallery (at most 500)")

    st = sub.add_parser(
        "status", help="where a run stands: each stage's state, and the command to run next"
    )
    st.add_argument("--run", required=True, help=RUN_HELP)
    st.add_argument("--json", action="store_true", help="print the status as JSON")

    m = sub.add_parser("demo", help="the whole pipeline on a generated pool")
    m.add_argument("--run", default="runs/demo", help=RUN_HELP)
    m.add_argument("--samples", type=int, default=2000, help="pairs in the generated pool")
    m.add_argument("--steps", type=int, default=400)
    m.add_argument("--workers", type=int, default=2)
    m.add_argument("--keep", type=float, default=0.7)
    m.add_argument("--method", default="diffin")
    m.add_argument(
        "--target",
        dest="demo_target",  # not a shard pattern: check_patterns must not resolve it
        choices=("curated", "held-out"),
        default="curated",
        help="score toward the pool's clean target/ split (default) or the held-out pool sample",
    )
    m.add_argument(
        "--second-order",
        choices=("auto", *FORMS),
        default="auto",
        help="form of Diff-In, as `diffin score --second-order` ('derived' where the "
        "propagation of a short proxy on a small pool diverges)",
    )
    m.add_argument(
        "--no-evaluate",
        dest="evaluate",
        action="store_false",
        help="skip the retraining comparison (the report then has no evaluation table)",
    )
    m.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="train from scratch even when an interrupted training of another config is there",
    )
    # No abbreviations: `score --method diffin` (prune's and report's spelling) would
    # silently be `--methods diffin` and rewrite the table without the other scorers.
    p.allow_abbrev = False
    for command in sub.choices.values():
        command.allow_abbrev = False
        command.formatter_class = _Help
        # also after the subcommand (`diffin prune ... -v`); SUPPRESS keeps the one before
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logs"
        )
        # argparse takes "-1e-7" for an option ("--threshold: expected one argument"), as it
        # takes any "-" word but plain decimals; TracIn scores are that small (walkthrough)
        command._negative_number_matcher = NEGATIVE_NUMBER
    return p


NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffin")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "(not installed)"


def train_config(args: argparse.Namespace) -> TrainConfig:
    """`diffin train`'s TrainConfig; training options given with --import are refused."""
    training = {k: getattr(args, k) for k in TRAINING_ONLY if getattr(args, k) is not None}
    if args.import_dir is not None and training:
        flags = ", ".join(TRAINING_ONLY[k] for k in training)
        raise ConfigError(
            f"{flags}: not used with --import, which takes how the run trained from its "
            "params.txt and checkpoints; drop them (--model, --batch-size, --seed and the "
            "set sizes do apply)"
        )
    if args.import_dir is None and args.steps_per_epoch is not None:
        raise ConfigError("--steps-per-epoch: only used with --import")
    steps = training.get("steps", TrainConfig.steps)
    if args.import_dir is None and args.warmup is None:
        # As `diffin demo` and the README size it, a tenth of the steps up to 40: `--steps 30`
        # must not fail on a 40-step warm-up, nor `--steps 60` spend two thirds warming up.
        training["warmup"] = min(TrainConfig.warmup, max(0, steps // 10))
    if args.import_dir is None and args.checkpoints is None:
        # likewise `--steps 10` must not fail on the 25 default checkpoints: one per step then
        training["checkpoints"] = min(TrainConfig.checkpoints, max(1, steps))
    return TrainConfig(
        data=args.data,
        run=args.run,
        model=args.model or TrainConfig.model,
        batch_size=TrainConfig.batch_size if args.batch_size is None else args.batch_size,
        seed=args.seed,
        target_size=args.target_size,
        reference_size=args.reference_size,
        grad_batches=args.grad_batches,
        max_samples=args.max_samples,
        threads=args.threads,
        **training,
        image_keys=args.image_key,
        text_keys=args.text_key,
        max_image_pixels=args.max_image_pixels,
    )


def run(args: argparse.Namespace) -> object:
    absolute_paths(args)  # first: every stage below records what it is given
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
            target_samples=args.target_samples,
            seed=args.seed,
        )
        # recorded absolute in synth.json: evaluate reads it from anywhere
        return make_pool(args.out, cfg, overwrite=args.overwrite)
    if args.command == "train":
        cfg = train_config(args)
        if args.import_dir is not None:
            import dataclasses

            from pipeline.train.importer import import_open_clip_run, read_open_clip_run

            oc = read_open_clip_run(args.import_dir)
            batch = oc.step_batch if args.batch_size is None else args.batch_size
            cfg = dataclasses.replace(cfg, batch_size=batch)
            record = import_open_clip_run(oc, cfg, args.model, args.steps_per_epoch)
        else:
            from pipeline.train.trajectory import train

            record = train(cfg)
        keys = ("model", "n_train", "steps", "checkpoints", "seconds", "already_trained")
        return {k: record[k] for k in keys if k in record}
    if args.command == "score":
        from pipeline.score.config import ScoreConfig
        from pipeline.score.driver import run_scoring

        return run_scoring(
            ScoreConfig(
                data=args.data,
                run=args.run,
                methods=args.methods,
                target=args.target,
                target_max=args.target_max,
                address=args.address,
                workers=args.workers,
                threads=args.threads,
                batch_size=args.batch_size,
                first_order=args.first_order,
                second_order=args.second_order,
                propagate_curvature=args.propagate_curvature,
                objective=args.objective,
                sample_gradient=args.sample_gradient,
                dtype=args.dtype,
                seed=args.seed,
                max_attempts=args.max_attempts,
                prefetch_batches=args.prefetch_batches,
                gpus_per_worker=args.gpus_per_worker,
                self_hb=args.self_hb,
                self_rank=args.self_rank,
                self_dim=args.self_dim,
                memory_mb=args.memory_mb,
                directions_chunk=args.directions_chunk,
                ggn_kept_pairs=args.ggn_kept_pairs,
                **_score_reader_options(args),
            )
        )
    if args.command == "prune":
        from pipeline.prune.manifest import write_manifest

        return write_manifest(_prune_config(args))
    if args.command == "evaluate":
        from pipeline.evaluation.config import EvaluateConfig
        from pipeline.evaluation.retrain import run_evaluation

        if args.fusion_norm is not None and not args.fuse:
            raise ConfigError("--fusion-norm: only used with --fuse")
        summary = run_evaluation(
            EvaluateConfig(
                run=args.run,
                keeps=args.keep,
                methods=args.methods,
                fusions=args.fuse or [],
                fusion_norm=args.fusion_norm or "zscore",
                ensemble=args.ensemble,
                full=args.full,
                max_pairs=args.max_pairs,
                data=args.data,
                eval_data=args.eval_data,
                eval_labels=args.eval_labels,
                classes=args.classes,
                truth=args.truth,
                steps=args.steps,
                batch_size=args.batch_size,
                optimizer=args.optimizer,
                lr=args.lr,
                weight_decay=args.weight_decay,
                seeds=args.seeds,
                threads=args.threads,
            )
        )
        from pipeline.rundir import join, read_bytes

        print(read_bytes(join(args.run, "evaluate", "results.md")).decode())
        return {"results": join(args.run, "evaluate"), "seconds": summary["seconds"]}
    if args.command == "report":
        from pipeline.report.build import build_report

        return {"report": build_report(args.run, method=args.method, top=args.top)}
    if args.command == "status":
        from pipeline.status import describe, run_status

        status = run_status(args.run)
        if args.json:
            return status
        _print(describe(status))
        return None
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
                target=args.demo_target,
                evaluate=args.evaluate,
                resume=args.resume,
                second_order=args.second_order,
            )
        )
        print(format_summary(summary))
        return None
    raise AssertionError(args.command)


def _prune_config(args: argparse.Namespace):  # -> PruneConfig (imported late: light CLI start)
    """The PruneConfig of `diffin prune`'s flags, refusing those the chosen rule would ignore."""
    from pipeline.prune.config import PruneConfig

    given = {
        "--keep": args.keep,
        "--threshold": args.threshold,
        "--balance-by": args.balance_by,
        "--balance": args.balance,
        "--clusters": args.clusters,
        "--cluster-seed": args.cluster_seed,
        "--method": args.method,
        "--fuse": args.fuse,
        "--fusion-norm": args.fusion_norm,
    }
    used = {
        "fraction": {"--keep"},
        "threshold": {"--threshold"},
        "balanced": {"--keep", "--balance-by", "--balance", "--clusters", "--cluster-seed"},
    }[args.rule]
    used |= {"--fuse", "--fusion-norm"} if args.fuse else {"--method"}
    if args.balance_by != "cluster":
        used -= {"--clusters", "--cluster-seed"}
    ignored = [flag for flag, value in given.items() if value is not None and flag not in used]
    if "--fusion-norm" in ignored and not args.fuse:  # as evaluate words it
        raise ConfigError("--fusion-norm: only used with --fuse")
    if ignored:
        why = f"--rule {args.rule}" + (" with --fuse" if args.fuse else "")
        if args.rule == "balanced" and args.balance_by != "cluster":
            why += f" and --balance-by {args.balance_by}"
        raise ConfigError(f"{', '.join(ignored)}: not used by {why}")
    if args.keep is None and args.rule != "threshold":
        raise ConfigError(f"keep: required for --rule {args.rule}")
    defaults = {"method": "diffin", "balance": "proportional", "clusters": 8, "cluster_seed": 0}
    chosen = {
        name: getattr(args, name) if getattr(args, name) is not None else default
        for name, default in defaults.items()
    }
    return PruneConfig(
        run=args.run,
        keep=1.0 if args.keep is None else args.keep,
        name=args.name,
        shard_size=args.shard_size,
        rule=args.rule,
        threshold=args.threshold,
        balance_by=args.balance_by,
        fusion=args.fuse,
        fusion_norm=args.fusion_norm or "zscore",
        ensemble=args.ensemble,
        **chosen,
    )


def _score_reader_options(args: argparse.Namespace) -> dict[str, object]:
    """Score's --image-key, --text-key and --max-image-pixels: as given, else as the run
    last read its pool (pipeline.score.trajectory.reader_defaults)."""
    from pipeline.rundir import RunDir
    from pipeline.score.trajectory import reader_defaults

    given = {
        "image_keys": args.image_key,
        "text_keys": args.text_key,
        "max_image_pixels": args.max_image_pixels,
    }
    if all(v is not None for v in given.values()):
        return given
    defaults = reader_defaults(RunDir(args.run))
    return {k: v if v is not None else defaults[k] for k, v in given.items()}


def _flag_value(value: object) -> list[str]:
    """A config value as the words its flag takes."""
    if isinstance(value, dict):  # a fusion: 'diffin=1.0,loss=0.5', every digit kept
        return [",".join(f"{k}={float(w)!r}" for k, w in value.items())]
    if isinstance(value, (list, tuple)):
        return [",".join(str(v) for v in value)]
    return [str(value)]


def command_for(command: str, values: dict[str, object], skip: Sequence[str] = ()) -> str:
    """The `diffin COMMAND` line that gives back ``values`` (a recorded config): every
    option whose value differs from the command's default, shell-quoted, so that
    ``diffin status`` can print a command a user pastes as it is."""
    parser = _subcommand(build_parser(), command)
    words = ["diffin", command]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "verbose") or action.dest in skip:
            continue
        flag = action.option_strings[0]
        field = next((f for f in values if field_flag(f) in action.option_strings), action.dest)
        if field not in values:
            continue
        value = values[field]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if value is not None and bool(value) != bool(action.default):
                words.append(flag)
            continue
        if isinstance(action, argparse.BooleanOptionalAction):  # --resume / --no-resume
            if value is not None and value != action.default:
                words.append(flag if value else action.option_strings[1])
            continue
        if value is None or (action.default is not None and value == action.default):
            continue
        if action.nargs in ("+", "*"):  # evaluate's --keep 0.5 0.7
            words += [flag, *(str(v) for v in value)]
        elif isinstance(action, argparse._AppendAction):  # one flag per item (--fuse)
            for item in value:
                words += [flag, *_flag_value(item)]
        else:
            (text,) = _flag_value(value)
            # "--flag=-x": a value that starts with "-" would read as another option
            words += [f"{flag}={text}"] if text.startswith("-") else [flag, text]
    return shlex.join(words)


def check_patterns(args: argparse.Namespace) -> None:
    """Refuse a shard pattern that resolves to nothing before any stage runs, naming the option."""
    from pipeline.data.shards import resolve_shards
    from pipeline.data.synth import unfinished_pool

    for name in ("data", "target"):
        pattern = getattr(args, name, None)
        if pattern is None:
            continue
        try:
            shards = resolve_shards(pattern)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from exc
        # walkthrough: a training took the 24 shards of an interrupted make-data of 30
        folder = unfinished_pool(shards)
        if folder is not None:
            raise ConfigError(
                f"{name}: {folder} holds a pool make-data has not finished (interrupted); "
                "run that make-data again: it writes the pool whole"
            )


def check_buckets(args: argparse.Namespace) -> None:
    """Refuse a directory on an object store that cannot be reached, or in a bucket that
    does not exist, before any stage runs (:func:`pipeline.rundir.check_bucket`)."""
    from pipeline.rundir import check_bucket

    for name in ("run", "out", "import_dir"):
        url = getattr(args, name, None)
        if isinstance(url, str):
            check_bucket(url, name)  # the field's name: main names the flag


# Options that name files or directories (patterns included).
PATH_OPTIONS = (
    "run",
    "data",
    "target",
    "out",
    "eval_data",
    "eval_labels",
    "classes",
    "truth",
    "import_dir",
)


def absolute_paths(args: argparse.Namespace) -> None:
    """Local paths made absolute before anything records them: a run records what it was
    given, and later stages and the report read it from wherever they run (walkthrough:
    --run and --import were recorded as typed). URLs stay as given. Not --pretrained: its
    string is in the training fingerprint (a finished run would train again)."""
    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, absolute_pattern(value))


def check_job_paths(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> None:
    """Inside a `ray job submit` entrypoint, refuse relative local paths.

    The job runs in a temporary copy of the submitted working directory: a
    relative --run would be written there, reported as a success, and lost
    (walkthrough); a relative --data would be looked for there.
    """
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in environ:  # set by Ray for job entrypoints
        return
    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        relative = relative_items(value) if isinstance(value, str) else []
        if relative:
            flag = {"import_dir": "--import", "out": "out"}.get(name, f"--{name.replace('_', '-')}")
            raise ConfigError(
                f"{flag}: {relative[0]!r} is a relative path, and this is a Ray job: it would "
                "resolve in the job's temporary copy of the working directory (deleted "
                "afterwards, and not seen by other nodes); give an absolute path or a URL"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _subcommand(parser, args.command).error(_unknown_options(parser, args.command, extra))
    from pipeline import logs

    logs.setup(args.verbose)
    TERMINATED.clear()
    previous = handle_sigterm()  # set again after ray.init: pipeline.raylocal.connect
    try:
        check_job_paths(args)
        check_patterns(args)
        check_buckets(args)
        result = run(args)
    except ConfigError as exc:
        message = _as_flag(parser, args.command, str(exc))
        print(f"diffin {args.command}: configuration error: {message}", file=sys.stderr)
        return 2
    except StageFailed as exc:  # the message says what to do; Ray's logs are above it
        print(f"diffin {args.command}: {exc}", file=sys.stderr)
        return 1
    except FloatingPointError as exc:
        # the proxy's loss went NaN (training says at which step and what to change): the
        # message is the whole story, a traceback would bury it (walkthrough)
        print(f"diffin {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        from pipeline.runlock import LOST

        if LOST.is_set():  # its lease was taken over: a rerun now would be refused
            print(
                f"diffin {args.command}: stopped: another process took over the run's lease "
                "(the log above names it); run this again once that one has finished",
                file=sys.stderr,
            )
            return 1
        # Every stage writes atomically and resumes, so a traceback would only alarm.
        terminated = TERMINATED.is_set()
        again = (
            "run the same command again to write the pool (it starts over)"
            if args.command == "make-data"  # a generated pool is written whole, not resumed
            else _train_again(args)
            if args.command == "train" and not getattr(args, "import_dir", None)
            else "run the same command again to continue (finished work is kept)"
        )
        print(
            f"diffin {args.command}: {'terminated (SIGTERM)' if terminated else 'interrupted'}; "
            + again,
            file=sys.stderr,
        )
        return 143 if terminated else 130
    finally:
        if previous is not None:  # the caller's handler again (tests, programs calling main)
            signal.signal(signal.SIGTERM, previous)
    if result is not None:
        _print(json.dumps(result, indent=2, default=str))
    return 0


def _train_again(args: argparse.Namespace) -> str:
    """What a rerun of an interrupted train does: it resumes from its last resume state,
    and the steps after it are trained again (review: "finished work is kept" said
    nothing of the steps lost, nor that a training stopped before its first state
    starts over)."""
    from pipeline.rundir import RunDir, exists
    from pipeline.train.progress import marked, read_progress

    run = RunDir(args.run)
    try:
        p = read_progress(run)
        saved = exists(run.resume_state)
    except (OSError, ValueError):
        p, saved = None, False
    resume = p.get("resumable_from") if p is not None and saved else None
    if not marked(run):  # stopped while loading: the record is an earlier training's
        return (
            "stopped before it trained, while loading the model and the pool; run the same "
            "command again"
            + (
                f" (the run holds a resume state at step {resume}: the same config resumes from it)"
                if resume is not None and args.resume is not False
                else ""
            )
        )
    at = (
        None
        if p is None  # none written yet, or (no resume state) removed as it started
        else "stopped while preparing (the pool read, the sets written), before its first step"
        if p["preparing"]
        else f"stopped at step {p['step']} of {p['steps']}"
    )
    if args.resume is False:  # a rerun as typed starts over, whatever was saved
        return f"{at or 'stopped'}; run the same command again to start it over" + (
            f", or without --no-resume to resume from step {resume}" if resume is not None else ""
        )
    if at is None:
        return (
            "run the same command again to resume from its last resume state"
            if saved
            else "stopped before its first step; run the same command again to start it over"
        )
    if saved:  # the record may lag the state by one write: then the state is not named
        where = (
            "its last resume state ("
            if resume is None
            else f"step {resume} (its last resume state;"
        )
        return (
            f"{at}; run the same command again to resume from {where} --resume-every K "
            "saves one every K steps)"
        )
    return (
        f"{at}, before its first resume state; run the same command again to start it "
        "over (--resume-every K saves one every K steps)"
    )


def _print(text: str) -> None:
    """Print to stdout; a reader that has stopped reading (`diffin status --json | head`)
    gets no traceback (walkthrough)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at nothing first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
