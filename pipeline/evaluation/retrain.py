"""``diffin evaluate``: retrain a proxy-sized CLIP on each scorer's kept subset and measure it.

For each seed, every subset is trained from the same random initialisation,
with the same optimiser, schedule, number of steps and batch size (the
proxy's, unless overridden) and the same seed for the batch order, so the
only difference between rows of one seed is which pairs were kept. Several
seeds give the spread a ranking must beat (``summarise``). Equal size: at one keep fraction every
scorer keeps the same number of pairs (``select`` rounds the same way).

Writes RUN/evaluate/results.parquet, results.md and evaluate.json.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pipeline import runlock
from pipeline.data.keys import recorded_reader_options
from pipeline.data.reader import iter_shard
from pipeline.data.sample import Sample
from pipeline.data.shards import expand_pattern, resolve_shards
from pipeline.data.synth import pool_summary
from pipeline.errors import ConfigError
from pipeline.evaluation.config import EvaluateConfig
from pipeline.evaluation.partial import (
    FinishedRows,
    files_identity,
    row_digests,
    row_key,
    subset_digest,
    tensors_digest,
    uids_digest,
)
from pipeline.evaluation.zeroshot import recall_at_k, zero_shot_accuracy
from pipeline.memory import available_bytes, human_bytes
from pipeline.model import factory
from pipeline.model.batches import encode, encode_pool, input_bytes, pool_transform
from pipeline.provenance import provenance
from pipeline.prune.manifest import select
from pipeline.prune.select import Selection, plan
from pipeline.rundir import (
    RunDir,
    copy_dir,
    exists,
    join,
    leftovers,
    open_atomic,
    read_json,
    remove,
    replace_dir,
    write_bytes_atomic,
    write_json,
)
from pipeline.score.table import (
    check_scores_current,
    ensemble_record,
    read_table,
    require_scores,
    scored_config,
    table_identity,
)
from pipeline.train.config import TrainConfig
from pipeline.train.loop import batch_order, train_loop
from pipeline.train.progress import no_trajectory

log = logging.getLogger(__name__)

METRICS = ("zeroshot_top1", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")
DEFECTS = ("mismatch", "duplicate", "noise")


@dataclass
class EvalSet:
    images: torch.Tensor
    tokens: torch.Tensor
    captions: list[str]
    labels: torch.Tensor | None  # class index per image, None without labels
    class_tokens: list[torch.Tensor] | None  # per class: tokens of every template


def _positions(sub: dict[str, Any], position: dict[str, int]) -> list[int]:
    """A subset's rows in the pool as held, in pool order."""
    return sorted({position[u] for u in sub["uids"]})


@dataclass
class Sources:
    data: str
    eval_data: str
    eval_labels: str | None
    classes: str | None
    truth: str | None


def _pool_dir(pattern: str) -> str:
    """The directory of a pool's shards, where a generated pool keeps its truth and summary
    (of a list of patterns, the first one's: its whole text ended in another directory)."""
    first = expand_pattern(pattern)[0]
    if not any(c in first for c in "*?[") and "::" not in first:
        fs, path = fsspec.core.url_to_fs(first)
        if fs.isdir(path):  # `--data pool/` and `--data pool` name the directory itself
            return first.rstrip("/")
    return first.rsplit("/", 1)[0]


def pool_truth(data: str) -> str | None:
    """The truth table beside a generated pool's shards, if there is one."""
    url = join(_pool_dir(data), "truth.parquet")
    return url if exists(url) else None


def load_truth(url: str | None) -> pd.DataFrame | None:
    """uid -> defect, indexed by uid (None without a truth table)."""
    if not url:
        return None
    truth = _columns("truth", url, ["uid", "defect"]).to_pandas()
    truth["uid"] = truth["uid"].astype(str).str.lower()  # as the reader gives json uids
    return truth.set_index("uid")


def check_truth(truth: pd.DataFrame | None, url: str | None, ok_uids: Sequence[str]) -> None:
    """Refuse a truth table that names none of the scored pairs: every subset would show 0
    defects kept, read as a perfect cleaning (walkthrough); warn when it names only some."""
    if truth is None:
        return
    matched = len(truth.index.intersection(pd.Index(ok_uids)))
    if not matched:
        raise ConfigError(
            f"truth: none of the {len(truth)} uids of {url} is a uid of the score table's "
            f"{len(ok_uids)} ok rows (another pool's truth table? A truth.parquet found "
            "beside --data is used unless --truth names another)"
        )
    if matched < len(ok_uids):
        log.warning(
            "truth: %s names %d of the %d scored ok pairs; the defect counts cover those only",
            url,
            matched,
            len(ok_uids),
        )


def _columns(field: str, url: str, columns: list[str]) -> pa.Table:
    """``columns`` of the Parquet file ``url`` given as ``field``, or a ConfigError naming it."""
    try:
        return read_table(url, columns=columns)
    except (pa.ArrowException, KeyError, ValueError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ConfigError(
            f"{field}: {url} is not a Parquet table with columns {columns} ({first})"
        ) from e


def _classes(url: str) -> tuple[list[str], list[str]]:
    """(classnames, templates) of an open_clip-style classes JSON, or a ConfigError."""
    try:
        classes = read_json(url)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ConfigError(f"classes: {url} is not a JSON file ({e})") from e
    names = classes.get("classnames") if isinstance(classes, dict) else None
    templates = classes.get("templates") or ["{}"] if isinstance(classes, dict) else None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ConfigError(f"classes: {url} has no `classnames` list of strings")
    if not (isinstance(templates, list) and all(isinstance(t, str) for t in templates)):
        raise ConfigError(f"classes: {url}: `templates` must be a list of strings")
    return names, templates


def locate_sources(cfg: EvaluateConfig, run: RunDir) -> Sources:
    """Fill in what the user left out from the run and, for a generated pool, its summary."""
    data = cfg.data or scored_config(run).get("data")
    if not data:
        raise ConfigError("data: not given and not recorded by `diffin score`")
    root = _pool_dir(data)
    # Its paths under root: a pool made with a relative --out, or moved since, records
    # another directory (walkthrough: evaluate inside a Ray job looked in the job's copy).
    summary = pool_summary(root)
    eval_data = cfg.eval_data
    if eval_data is None:
        if summary is None or not summary["eval"].get("val_data"):
            raise ConfigError(
                "eval_data: give --eval-data (held-out shards); defaults only exist for generated pools"
            )
        eval_data = summary["eval"]["val_data"]
    for name, pattern in (("data", data), ("eval_data", eval_data)):
        try:
            resolve_shards(pattern)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from exc
    eval_root = _pool_dir(eval_data)

    def beside(given: str | None, url: str, field: str) -> str | None:
        if given is not None:
            if not exists(given):
                raise ConfigError(f"{field}: {given} does not exist")
            return given
        return url if exists(url) else None

    labels = beside(cfg.eval_labels, join(eval_root, "labels.parquet"), "eval_labels")
    classes = beside(cfg.classes, join(eval_root, "classes.json"), "classes")
    if (cfg.eval_labels or cfg.classes) and not (labels and classes):
        given, other = (
            ("--eval-labels", "classes.json") if labels else ("--classes", "labels.parquet")
        )
        raise ConfigError(
            f"eval_labels: zero-shot needs both --eval-labels and --classes; {given} was "
            f"given, and no {other} was found beside {eval_data} for the other"
        )
    if labels and classes:
        _classes(classes)  # refused now, not after the pool is read
    return Sources(
        data=data,
        eval_data=eval_data,
        eval_labels=labels,
        classes=classes,
        truth=beside(cfg.truth, "", "truth") if cfg.truth else pool_truth(data),
    )


def _read_ok(pattern: str, options: dict[str, Any], keep: set[str] | None = None) -> list[Sample]:
    """The ok samples (of ``keep``'s uids); a uid seen twice is kept once, the first
    time, as the score table's selection counts it."""
    out, seen = [], set()
    for url in tqdm(resolve_shards(pattern), desc="read", unit="shard", leave=False, disable=None):
        for s in iter_shard(url, **options):
            if s.ok and (keep is None or (s.uid in keep and s.uid not in seen)):
                seen.add(s.uid)
                out.append(s)
    return out


def load_eval_set(
    src: Sources,
    bundle: factory.ClipBundle,
    options: dict[str, Any],
    pool_uids: set[str] | None = None,
    target_uids: set[str] | None = None,
) -> EvalSet:
    """The held-out pairs; refused when any of them is a pair of the scored pool, or of
    the target the influence scores were computed toward."""
    samples = _read_ok(src.eval_data, options)
    if len(samples) < 2:
        raise ConfigError(f"eval_data: {len(samples)} decodable pairs in {src.eval_data}")
    shared = sorted({s.uid for s in samples} & (pool_uids or set()))
    if shared:
        # e.g. the training shards given as --eval-data: every subset would be measured on
        # pairs some of them trained on
        raise ConfigError(
            f"eval_data: {len(shared)} of its pairs are in the scored pool (uid {shared[0]}, "
            f"...); give held-out shards"
        )
    aimed = sorted({s.uid for s in samples} & (target_uids or set()))
    if aimed:
        # diffin and tracin chose their subsets to lower the loss on these very pairs:
        # measured on them, they would win by construction (review)
        raise ConfigError(
            f"eval_data: {len(aimed)} of its pairs are in the --target the scores were "
            f"computed toward (uid {aimed[0]}, ...); give held-out shards the scores did not see"
        )
    images, tokens = encode(samples, bundle)
    captions = [s.caption or "" for s in samples]
    labels = class_tokens = None
    if src.eval_labels and src.classes:
        names, templates = _classes(src.classes)
        blind = [t for t in templates if _prompt(t, "a") == _prompt(t, "b")]
        if blind:
            # every class would get the same prompt: top-1 would be whichever class is first
            raise ConfigError(f"classes: template {blind[0]!r} has no {{}} for the class name")
        by_uid = dict(
            zip(
                *_columns("eval_labels", src.eval_labels, ["uid", "label"]).to_pydict().values(),
                strict=True,
            )
        )
        missing = [s.uid for s in samples if by_uid.get(s.uid) not in names]
        if missing:
            raise ConfigError(
                f"eval_labels: {len(missing)} eval pairs have no label among the classnames "
                f"(first uid {missing[0]})"
            )
        labels = torch.tensor([names.index(by_uid[s.uid]) for s in samples])
        class_tokens = [bundle.tokenizer([t.format(n) for t in templates]) for n in names]
    return EvalSet(images, tokens, captions, labels, class_tokens)


@torch.no_grad()
def measure(model: torch.nn.Module, ev: EvalSet, batch: int = 256) -> dict[str, float]:
    """Zero-shot top-1 (NaN without labels) and retrieval recall@1/5 on the eval set."""
    model.eval()
    img = torch.cat(
        [model.encode_image(ev.images[i : i + batch]) for i in range(0, len(ev.images), batch)]
    )
    txt = torch.cat(
        [model.encode_text(ev.tokens[i : i + batch]) for i in range(0, len(ev.tokens), batch)]
    )
    # Matches by token rows, what the model sees: captions that differ only in case,
    # spacing or past the context length have equal features and must count as equal.
    out = recall_at_k(img, txt, [tuple(row) for row in ev.tokens.tolist()])
    if ev.labels is not None and ev.class_tokens is not None:
        cls = torch.stack(
            [
                torch.nn.functional.normalize(model.encode_text(t), dim=-1).mean(0)
                for t in ev.class_tokens
            ]
        )
        out["zeroshot_top1"] = zero_shot_accuracy(img, cls, ev.labels)
    else:
        out["zeroshot_top1"] = float("nan")
    return {m: out[m] for m in METRICS}


def _scored_methods(run: RunDir, columns: list[str]) -> list[str]:
    """The scorers the table was scored with, in their order (``--methods`` left out)."""
    methods = [m for m in scored_config(run).get("methods") or [] if m in columns]
    if not methods:
        raise ConfigError("methods: the score table records no scorer column; give --methods")
    return methods


def plan_subsets(
    cfg: EvaluateConfig,
    table: pa.Table,
    batch_size: int | None = None,
    table_url: str | None = None,
) -> list[dict[str, Any]]:
    """(name, method, keep, uids) of every subset to train on; refuses, before any training,
    unknown columns and subsets too small for one batch of ``batch_size``.

    A fused subset is chosen by prune's own planner from ``table_url`` (the file
    ``table`` was read from), so it holds exactly the rows `diffin prune --fuse` keeps.
    """
    assert cfg.methods is not None
    missing = [m for m in cfg.methods if m not in table.column_names]
    if missing:
        raise ConfigError(f"methods: no column {missing} in the score table")
    ok_uids = table.filter(pa.compute.equal(table.column("status"), "ok")).column("uid")
    repeated = len(ok_uids) - pa.compute.count_distinct(ok_uids).as_py()
    if repeated:
        # The pool is read back by uid: every subset would train on the first ok copy of a
        # uid, whichever of its rows the scorer kept (review).
        raise ConfigError(
            f"scores: the score table repeats {repeated} uid(s) among its ok rows (the score "
            "summary's duplicate_uids); evaluate reads the pool back by uid and could not "
            "train on the row a scorer kept. Give each pair its own uid"
        )
    subsets = []
    if cfg.full:
        subsets.append({"name": "full", "method": "full", "keep": 1.0, "uids": ok_uids.to_pylist()})
    for keep in cfg.keeps:
        for m in cfg.methods:
            kept = select(table, m, keep).column("uid").to_pylist()
            subsets.append(
                {"name": f"{m}@{keep:g}", "method": m, "keep": float(keep), "uids": kept}
            )
        for m in cfg.methods if cfg.ensemble else []:
            if table_url is None:
                raise ValueError("plan_subsets: ensemble subsets need table_url")
            rule = cfg.ensemble_config(m, keep)
            others = [RunDir(u).scores for u in cfg.ensemble]
            selection = plan(rule, table_url, ensemble=others)  # refuses other rows
            if selection.rows_ok != len(ok_uids):
                # the size check below would blame non-finite scores or repeated uids
                raise ConfigError(
                    f"ensemble: {len(ok_uids) - selection.rows_ok} of the rows {cfg.run} scored "
                    "are error rows in another run of the ensemble, so its subsets would be "
                    "smaller than the others: evaluate compares subsets of one size. Leave "
                    "that run out, or rescore it"
                )
            kept = _kept_uids(selection)
            name = f"{m}-ens{1 + len(cfg.ensemble)}"
            subsets.append(
                {"name": f"{name}@{keep:g}", "method": name, "keep": float(keep), "uids": kept}
            )
        for fusion in cfg.fusions:
            if table_url is None:
                raise ValueError("plan_subsets: fused subsets need table_url")
            rule = cfg.prune_config(fusion, keep)
            selection = plan(rule, table_url)  # refuses unknown columns
            kept = _kept_uids(selection)
            name = rule.ranking
            subsets.append(
                {"name": f"{name}@{keep:g}", "method": name, "keep": float(keep), "uids": kept}
            )
    if cfg.max_pairs is not None:
        n_ok = len(ok_uids)
        if n_ok > cfg.max_pairs:
            # each uid hashed once, not once per subset it is in
            key = {u: _draw_key(u) for sub in subsets for u in sub["uids"]}
            for sub in subsets:
                sub["uids"] = _sample(sub["uids"], cfg.max_pairs / n_ok, key)
    for keep in cfg.keeps:
        # The comparison holds the subset size fixed; a scorer with non-finite scores or a
        # table that repeats uids would otherwise train on fewer pairs, with no word.
        sizes = {s["method"]: len(set(s["uids"])) for s in subsets if s["keep"] == float(keep)}
        if len(set(sizes.values())) > 1:
            raise ConfigError(
                f"keeps: at keep {keep:g} the subsets differ in size ({sizes}): a scorer has ok "
                "rows without a finite score, or the table repeats uids (the score summary's "
                "nonfinite_scores and duplicate_uids); rescore, or evaluate the others"
            )
    for sub in subsets:
        n = len(set(sub["uids"]))
        if n < 2:
            raise ConfigError(f"keeps: subset {sub['name']} has {n} pairs; need >= 2")
        if batch_size is not None and n < batch_size:
            # A smaller subset would train on smaller batches, and the contrastive
            # loss depends on the batch size: its row would not be comparable.
            raise ConfigError(
                f"batch_size: subset {sub['name']} has {n} pairs, fewer than one batch of "
                f"{batch_size}; lower --batch-size or raise --keep"
            )
    return subsets


def _kept_uids(selection: Selection) -> list[str]:
    """The uids a prune selection keeps, in table order."""
    return [u for b in selection.kept_batches(["uid"]) for u in b.column("uid").to_pylist()]


def _draw_key(uid: str) -> bytes:
    """A uid's place in the --max-pairs draw: its seeded hash, and nothing else."""
    return hashlib.sha256(f"max_pairs\0{uid}".encode()).digest()


def _sample(uids: list[str], fraction: float, key: dict[str, bytes]) -> list[str]:
    """``round(fraction * len(uids))`` of ``uids``, in their order: those of lowest
    ``key`` (:func:`_draw_key`). The draw depends on the uids alone (not on the scorer or
    the table order), and subsets of one size keep samples of one size."""
    n = round(fraction * len(uids))
    chosen = set(sorted(uids, key=key.__getitem__)[:n])
    return [u for u in uids if u in chosen]


def _prompt(template: str, name: str) -> str | None:
    try:
        return template.format(name)  # "{}" or "{0}", as zero-shot fills it
    except (IndexError, KeyError, ValueError):
        return None


def _target_uids(scored: dict[str, Any], options: dict[str, Any]) -> set[str] | None:
    """The uids of the ``--target`` the run was scored toward (None without one, or when
    it cannot be read here, which is said)."""
    target = scored.get("target")
    if not target:
        return None
    # uids only: no image decoded or held (the pool already fills the memory evaluate has)
    listing = {**options, "transform": None, "decode_images": False}
    try:
        return {s.uid for url in resolve_shards(target) for s in iter_shard(url, **listing)}
    except (ConfigError, OSError) as exc:
        log.warning(
            "evaluate: the scored --target %s cannot be read here (%s): the eval "
            "set is not checked against it",
            target,
            exc,
        )
        return None


def _check_pool_fits(n_pairs: int, bundle: factory.ClipBundle, full: bool) -> None:
    """Refuse, before the pool is read, one evaluate could not hold.

    It retrains from memory: every pair of its subsets as uint8 pixels (float32
    model inputs for a preprocess ``pixel_steps`` cannot split), held twice
    while they are stacked. A pool of millions would otherwise be
    killed for memory after reading for hours.
    """
    size = bundle.preprocess_cfg.get("size")
    if size is None:
        return
    h, w = (size, size) if isinstance(size, int) else size
    per_value = input_bytes(bundle)
    need = 2 * n_pairs * per_value * 3 * int(h) * int(w)
    held = "uint8 pixels" if per_value == 1 else "float32 model inputs"
    room = available_bytes()
    if room is not None and need > room:
        raise ConfigError(
            f"max_pairs: evaluate retrains from memory, and the {n_pairs} pairs of its subsets need "
            f"about {human_bytes(need)} as {h}x{w} {held}; this machine has {human_bytes(room)} "
            f"available. Give --max-pairs N (every subset cut to the same fraction)"
            + ("" if not full else ", or --no-full with a lower --keep")
        )


def _defects(uids: list[str], truth: pd.DataFrame | None) -> dict[str, int]:
    if truth is None:
        return {d: -1 for d in DEFECTS}
    got = truth.loc[truth.index.intersection(uids), "defect"].value_counts()
    return {d: int(got.get(d, 0)) for d in DEFECTS}


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per subset (first-seen order): metrics as "mean ± sd" over seeds when several."""
    keep_cols = ["subset", "keep", "n_train", *[f"{d}_kept" for d in DEFECTS]]
    groups = frame.groupby("subset", sort=False)
    out = groups[keep_cols].first().reset_index(drop=True)
    n_seeds = frame.seed.nunique() if "seed" in frame else 1
    for col in (*METRICS, "final_train_loss"):
        mean = groups[col].mean().to_numpy()
        if n_seeds > 1:
            sd = groups[col].std(ddof=1).to_numpy()
            out[col] = [
                "n/a" if np.isnan(m) else f"{m:.3f} ± {d:.3f}"  # e.g. no zero-shot labels
                for m, d in zip(mean, sd, strict=True)
            ]
        else:
            out[col] = mean
    return out[["subset", "keep", "n_train", *METRICS, *keep_cols[3:], "final_train_loss"]]


def _json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinities as null: JSON has neither (strict parsers refuse the
    ``NaN`` json.dumps writes, e.g. zero-shot without labels)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (pandas' to_markdown needs an extra package)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if np.isnan(v) else f"{v:.3f}"
        return str(v)

    head = "| " + " | ".join(frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *rows]) + "\n"


def keep_earlier_evaluation(run: RunDir, tag: str) -> str | None:
    """Copy the run's evaluation, if any, to ``evaluate-history/STAMP-TAG`` (STAMP: when it
    was set aside, UTC) before something replaces it; returns where."""
    earlier = run.path("evaluate")
    if not exists(join(earlier, "evaluate.json")):
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = run.path("evaluate-history", f"{stamp}-{tag}")
    copy_dir(earlier, kept)
    log.info("the earlier evaluation is kept in %s", kept)
    return kept


def run_evaluation(cfg: EvaluateConfig) -> dict[str, Any]:
    """Train on every planned subset and write the results; returns the summary."""
    cfg.validate()
    run = RunDir(cfg.run)
    # one evaluation at a time: two would write RUN/evaluate together
    with runlock.hold(cfg.run, ["evaluate"], "evaluate"):
        return _run_evaluation(cfg, run)


def _run_evaluation(cfg: EvaluateConfig, run: RunDir) -> dict[str, Any]:
    require_scores(run)
    if not exists(run.trajectory_json):
        raise no_trajectory(run)
    check_scores_current(run)
    for other in cfg.ensemble or []:
        require_scores(RunDir(other))
        check_scores_current(RunDir(other))
    traj = read_json(run.trajectory_json)
    proxy = TrainConfig(**traj["config"])
    steps = cfg.steps or proxy.steps
    train_cfg = replace(
        proxy,
        steps=steps,
        batch_size=cfg.batch_size or proxy.batch_size,
        warmup=min(proxy.warmup, steps - 1),
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    with fsspec.open(run.scores, "rb") as f:
        names = pq.read_schema(f).names
    if cfg.methods is None:
        cfg = replace(cfg, methods=_scored_methods(run, names))
    # The report shows this evaluation only beside the rows and values it ranked by (its
    # scorers' and fusions' columns), not after a rescore that changed them.
    ranked = [*cfg.methods, *(c for fusion in cfg.fusions for c in fusion)]
    ranked = [c for c in dict.fromkeys(ranked) if c in names]
    scores_identity = table_identity(run.scores, ranked)
    # what each other run's table ranked by (its methods' mean), as prune --ensemble records,
    # so that a rescore of another run shows this evaluation is out of date too
    ensemble = ensemble_record(cfg.ensemble or [], [m for m in cfg.methods if m in names])
    # those columns alone: not the captions, errors and per-checkpoint terms of every row
    table = read_table(run.scores, columns=list(dict.fromkeys(["uid", "status", *ranked])))
    src = locate_sources(cfg, run)
    # refuses bad methods and undersized subsets before any training
    subsets = plan_subsets(cfg, table, train_cfg.batch_size, run.scores)
    truth = load_truth(src.truth)  # checked before the pool is read
    ok_uids = table.filter(pa.compute.equal(table.column("status"), "ok")).column("uid")
    check_truth(truth, src.truth, ok_uids.to_pylist())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    recorded = scored_config(run)
    options = recorded_reader_options(recorded, proxy.reader_options())
    wanted = set().union(*(s["uids"] for s in subsets))
    bundle = factory.create(traj["model"], preprocess_cfg=factory.recorded_preprocess(traj))
    # transformed as read: the pool is held as small pixels, not at full resolution
    options = {**options, "transform": pool_transform(bundle)}
    _check_pool_fits(len(wanted), bundle, cfg.full)
    for left in leftovers(run.url, ("evaluate.tmp-", "evaluate.old-")):
        log.warning(
            "evaluate: %s was left by an evaluation that did not finish (partial results, or "
            "the previous ones set aside); remove it once no other evaluation of this run runs",
            left,
        )
    pool = _read_ok(src.data, options, wanted)
    if len(pool) != len(wanted):
        raise ConfigError(
            f"data: the subsets to train on hold {len(wanted)} scored ok pairs, of which "
            f"{len(pool)} were found in {src.data} (another pool, or shards changed since "
            "scoring?)"
        )
    images, tokens = encode_pool(pool, bundle)
    for s in pool:  # encoded: not held twice while retraining
        s.image = None
    position = {s.uid: i for i, s in enumerate(pool)}
    target_uids = _target_uids(recorded, options)
    ev = load_eval_set(src, bundle, options, set(table.column("uid").to_pylist()), target_uids)
    log.info(
        "evaluate: %d subsets, %d pool pairs, %d eval pairs, %d steps of batch %d each",
        len(subsets),
        len(pool),
        len(ev.captions),
        steps,
        train_cfg.batch_size,
    )
    rows = []
    jobs = [(seed, sub) for seed in cfg.seeds for sub in subsets]
    # what each model's row follows from (evaluation/partial.py): a rerun takes the rows an
    # interrupted evaluation finished instead of training those models again
    finished = FinishedRows(run)
    same = {
        "trajectory": traj.get("fingerprint"),
        "model": traj["model"],
        "train": train_cfg.trajectory_fields(),
        "sources": src.__dict__,
        # what they hold, not only where: shards, labels, classes, truth rewritten in place
        "contents": files_identity(
            [
                *resolve_shards(src.data),
                *resolve_shards(src.eval_data),
                *(u for u in (src.eval_labels, src.classes, src.truth) if u is not None),
            ]
        ),
        # and what was read from them: stamps miss a same-size rewrite keeping its time
        "held_out": tensors_digest(ev.images, ev.tokens, ev.labels, *(ev.class_tokens or [])),
        "preprocess": bundle.preprocess_cfg,
        "reader": {k: v for k, v in options.items() if k != "transform"},
        "target": uids_digest(target_uids) if target_uids is not None else None,
    }
    pool_rows = row_digests(images.data, tokens)
    read = {id(sub): subset_digest(pool_rows, _positions(sub, position)) for sub in subsets}
    keys = [
        row_key(
            **same,
            seed=seed,
            subset={k: sub[k] for k in ("name", "method", "keep")},
            uids=uids_digest(sub["uids"]),
            read=read[id(sub)],  # its pairs as read
        )
        for seed, sub in jobs
    ]
    reused = [finished.get(k) for k in keys]
    finished.save_request(cfg.to_dict())  # what `diffin status` offers to resume it
    for key, row in zip(keys, reused, strict=True):
        if row is not None:  # taken by these options too: `diffin status` counts it (review:
            finished.put(key, row)  # stamped only as the loop reached it)
    if any(r is not None for r in reused):
        log.info(
            "evaluate: %d of %d models were trained by an evaluation that did not finish "
            "(%s): their rows are taken, not trained again",
            sum(r is not None for r in reused),
            len(jobs),
            finished.dir,
        )
    bar = tqdm(total=len(jobs), desc="evaluate", unit="model", disable=None)
    for (seed, sub), key, row in zip(jobs, keys, reused, strict=True):
        if row is not None:
            rows.append(row)
            bar.update(1)
            continue
        bar.set_postfix_str(f"{sub['name']} seed {seed}")
        t = time.time()
        idx = torch.tensor(_positions(sub, position))
        torch.manual_seed(seed)  # one initialisation for every subset of this seed
        model = factory.create(traj["model"]).model
        order = batch_order(len(idx), train_cfg.batch_size, steps, seed)
        curve = train_loop(
            model,
            images.subset(idx),
            tokens[idx],
            replace(train_cfg, seed=seed),
            order,
            progress=False,
        )
        metrics = measure(model, ev)
        rows.append(
            {
                "subset": sub["name"],
                "method": sub["method"],
                "keep": sub["keep"],
                "seed": seed,
                "n_train": len(idx),
                **metrics,
                **{f"{d}_kept": n for d, n in _defects(sub["uids"], truth).items()},
                "final_train_loss": curve[-1][1],
                "seconds": round(time.time() - t, 1),
            }
        )
        finished.put(key, rows[-1])
        bar.update(1)
        log.info(
            "evaluate %s seed %d: %s",
            sub["name"],
            seed,
            {k: round(v, 3) for k, v in metrics.items()},
        )
    bar.close()
    frame = pd.DataFrame(rows)
    seeds = ", ".join(str(s) for s in cfg.seeds)
    note = (
        f"Each row: a {traj['model']} trained from scratch for {steps} steps of batch "
        f"{train_cfg.batch_size} ({train_cfg.optimizer}, lr {train_cfg.lr:g}, weight decay "
        f"{train_cfg.weight_decay:g}), one initialisation per seed shared by every subset; "
        f"seeds {seeds}"
        + (" (mean ± sd over seeds)" if len(cfg.seeds) > 1 else "")
        + f"; zero-shot and recall on {len(ev.captions)} held-out pairs "
        "(retrieval counts identical captions as matches)."
    )
    # said in results.md and, from evaluate.json, in the report (walkthrough: its table
    # showed -1 defect counts and smaller n_train without a word)
    notes = []
    if truth is None:
        notes.append("Defect counts are -1: the pool has no truth table.")
    if cfg.max_pairs is not None and len(ok_uids) > cfg.max_pairs:
        notes.append(
            f"--max-pairs {cfg.max_pairs}: each subset is a seeded sample of the pairs its "
            "rule keeps, all cut to the same fraction (n_train)."
        )
    elif cfg.max_pairs is not None:
        notes.append(
            f"--max-pairs {cfg.max_pairs}: not reached by the {len(ok_uids)} ok pairs; no "
            "subset was cut."
        )
    note = " ".join([note, *notes])
    summary = {
        "config": cfg.to_dict(),
        "sources": src.__dict__,
        "train": {
            k: getattr(train_cfg, k)
            for k in (
                "model",
                "steps",
                "batch_size",
                "optimizer",
                "lr",
                "weight_decay",
                "warmup",
                "schedule",
            )
        },
        "eval_pairs": len(ev.captions),
        "pool_pairs": len(pool),
        "scores": scores_identity,
        **({"ensemble": ensemble} if ensemble else {}),
        "notes": notes,
        "results": rows,
        "seconds": round(time.time() - t0, 1),
        **provenance(),
    }
    # The three files are one result: written beside RUN/evaluate, then put in its place
    # together, so a run that dies part-way leaves the previous evaluation whole, never
    # a results table of one evaluation beside the record of another.
    # On an object store the files are copied one by one, evaluate.json last: the report
    # reads that file alone, and a copy that fails part-way keeps the finished set aside.
    out = run.path(f"evaluate.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open_atomic(join(out, "results.parquet")) as f:
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), f)
        write_bytes_atomic(
            join(out, "results.md"), (note + "\n\n" + markdown_table(summarise(frame))).encode()
        )
        write_json(join(out, "evaluate.json"), _json_safe(summary))
    except BaseException:
        remove(out, recursive=True)
        raise
    try:
        # Retrainings can take hours: an evaluation of other keeps, fusions or settings
        # must not cost the earlier one (the report shows the latest).
        keep_earlier_evaluation(run, out[-8:])
        replace_dir(out, run.path("evaluate"), last="evaluate.json")
    except Exception:
        log.error("evaluate: the finished results stay in %s (not put in place)", out)
        raise
    finished.clear()  # in place: the rows are in evaluate/ (others' settings go with them)
    run.update_run_json("evaluate", {"config": cfg.to_dict(), "seconds": summary["seconds"]})
    return summary
