"""Gather a run's tables and records into the report page: RUN/report/index.html."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

import numpy as np
import pandas as pd

from pipeline import runlock
from pipeline.errors import ConfigError
from pipeline.evaluation.retrain import METRICS, load_truth, pool_truth, summarise
from pipeline.prune.config import NOT_KEEP_FIRST, check_rank_column
from pipeline.prune.select import Table
from pipeline.report import page as P
from pipeline.report.plots import metric_vs_keep, score_histograms
from pipeline.report.tablestats import (
    SHARD_COLUMNS,
    Extremes,
    ShardCounts,
    ShardErrors,
    column_histogram,
)
from pipeline.report.thumbnails import thumbnails
from pipeline.rundir import RunDir, exists, read_json, write_bytes_atomic
from pipeline.score.table import (
    check_scores_current,
    evaluation_is_stale,
    prune_entries,
    require_scores,
    scored_config,
    scored_reader_options,
    stale_manifests,
    table_metadata,
)

log = logging.getLogger(__name__)
_PER_CHECKPOINT = re.compile(r"_t\d+$")
BASE = ("uid", "key", "shard", "index", "status", "error", "caption")


def scorer_columns(columns: list[str], meta: dict[str, Any]) -> list[str]:
    """The scorers' own columns, not their per-checkpoint components, in the scored order."""
    methods = meta.get("score", {}).get("methods") or []
    cols = [m for m in methods if m in columns]
    return cols or [c for c in columns if c not in BASE and not _PER_CHECKPOINT.search(c)]


MAX_SHARD_ROWS = 100
# each gallery pair is a thumbnail inlined in the page and read back from its shard
MAX_TOP = 500
BATCH_ROWS = 1 << 16


def _errors_per_shard(shards: dict[str, ShardCounts]) -> tuple[list[list[Any]], str]:
    """Shards with errors first (most errors first), then the rest, at most MAX_SHARD_ROWS."""
    rows = []
    for shard in sorted(shards):
        c = shards[shard]
        reason = c.reasons.most_common(1)[0][0] if c.reasons else ""
        rows.append(
            [shard.rsplit("/", 1)[-1], c.samples, c.errors, str(reason)[:160], c.damage[:160]]
        )
    rows.sort(key=lambda r: (-r[2], not r[4]))
    damaged = sum(1 for r in rows if r[4])
    note = f"{len(rows)} shards, {sum(r[2] for r in rows)} sample error rows in all" + (
        f"; {damaged} shard(s) could not be read to their end." if damaged else "."
    )
    if len(rows) > MAX_SHARD_ROWS:
        note += f" The {MAX_SHARD_ROWS} shards with the most errors are listed."
    return rows[:MAX_SHARD_ROWS], note


def _pairs(
    chosen: pd.DataFrame, method: str, truth: pd.DataFrame | None, options
) -> list[dict[str, Any]]:
    """The gallery's items for ``chosen`` (:class:`Extremes` rows, in order)."""
    if not len(chosen):
        return []
    thumbs = thumbnails(list(zip(chosen.shard, chosen["index"], chosen.uid, strict=True)), options)
    items = []
    for r in chosen.itertuples(index=False):
        jpeg, caption = thumbs.get((r.shard, int(r.index)), (None, ""))
        defect = truth.defect.get(r.uid) if truth is not None else None
        items.append(
            {
                "jpeg": jpeg,
                "caption": caption,
                "score": float(getattr(r, method)),
                "defect": defect if defect and defect != "clean" else None,
            }
        )
    return items


def gallery_method(methods: list[str], method: str | None) -> str:
    """The column the galleries rank by: ``method``, else diffin, else the first scorer.

    High = helpful, as prune keeps: never a column whose high values are the worst
    (walkthrough: loss_raw showed the cleanest pairs as the most harmful).
    """
    if method is not None:
        check_rank_column("method", method)
        return method
    if "diffin" in methods:
        return "diffin"
    rankable = [m for m in methods if m not in NOT_KEEP_FIRST]
    if not rankable:
        raise ConfigError(f"method: no column of {methods} ranks high = keep first")
    log.warning(
        "report: the table has no diffin column; the galleries rank by %s (--method to "
        "choose another of %s)",
        rankable[0],
        rankable,
    )
    return rankable[0]


def _prune_selections(run: RunDir, entries: dict[str, dict], stale: list[str]) -> str:
    """One row per manifest in RUN/prune/ (``entries``: :func:`prune_entries`): what it keeps
    and whether it ranks this table (walkthrough: selections showed only as raw JSON in the
    provenance)."""
    rows = []
    for name, value in entries.items():
        cfg = value.get("config") or {}
        fusion = cfg.get("fusion")
        ranks = (
            ", ".join(f"{k}={w:g}" for k, w in fusion.items())
            if isinstance(fusion, dict)
            else cfg.get("method")
        )
        if cfg.get("ensemble"):  # ranked by the mean over this run and those
            ranks = f"{ranks}, mean over this run and {', '.join(cfg['ensemble'])}"
        limit = cfg.get("keep") if cfg.get("keep") is not None else cfg.get("threshold")
        rows_of = (value.get("scores") or {}).get("rows")
        # a manifest from before prune recorded its table cannot be checked
        known = value.get("scores") is not None
        table_now = "no: an earlier table" if name in stale else "yes" if known else "unknown"
        rows.append([name, cfg.get("rule"), ranks, limit, value.get("kept"), rows_of, table_now])
    if not rows:
        return (
            "<p>No prune selection yet: <code>diffin prune --run RUN --keep 0.7</code> writes "
            "one under RUN/prune/.</p>"
        )
    return (
        f"<p>{len(rows)} selection(s) under {P.esc(run.path('prune'))}; retrain on a "
        "manifest with <code>open_clip_train.main --train-data</code> (docs/operations.md)."
        "</p>"
        + P.table(
            [
                "name",
                "rule",
                "ranked by",
                "keep / threshold",
                "kept",
                "rows ranked",
                "ranks this table",
            ],
            rows,
            text_cols=3,
        )
    )


def build_report(run_url: str, method: str | None = None, top: int = 12) -> str:
    """Write RUN/report/index.html; returns its path."""
    if not 0 < top <= MAX_TOP:
        raise ConfigError(
            f"top: {top} pairs per gallery; give 1 to {MAX_TOP} (each is a thumbnail in the "
            "page; every row is in RUN/scores.parquet)"
        )
    run = RunDir(run_url)
    # one report at a time: two would write RUN/report together
    with runlock.hold(run_url, ["report"], "report"):
        return _build_report(run_url, method, top, run)


def _build_report(run_url: str, method: str | None, top: int, run: RunDir) -> str:
    require_scores(run)
    # on the page too: a reader of the report does not see the console (walkthrough)
    table_warnings = check_scores_current(run)
    meta = table_metadata(run.scores)
    table = Table(run.scores, batch_rows=BATCH_ROWS)
    columns = table.columns
    methods = scorer_columns(columns, meta)
    method = gallery_method(methods, method)
    if method not in columns or method in BASE:
        raise ConfigError(f"method: no column {method!r} in the score table; scorers: {methods}")
    record = read_json(run.run_json) if exists(run.run_json) else {}
    score_cfg = scored_config(run)
    options = scored_reader_options(run)
    truth = load_truth(pool_truth(score_cfg["data"])) if score_cfg.get("data") else None
    # One pass for the counts and the galleries, then one per scorer for its histogram:
    # the table is never held whole (a pool of millions; tablestats.py). Captions come
    # from the shards for the few rows shown.
    errors, extremes = ShardErrors(), Extremes(method, top)
    for batch in table.batches(list(dict.fromkeys([*SHARD_COLUMNS, *extremes.columns()]))):
        errors.add(batch)
        extremes.add(batch)

    def defect(uids: pd.Series) -> np.ndarray:
        return uids.map(truth.defect).fillna("clean").ne("clean").to_numpy()

    hists = {
        m: column_histogram(
            table.batches(["status", m] + (["uid"] if truth is not None else [])),
            m,
            table.num_rows,
            defect if truth is not None else None,
        )
        for m in methods
    }
    sections: list[tuple[str, str]] = []

    hist = score_histograms(hists)
    note = (
        "Injected defects (from the generated pool's truth table) are drawn apart."
        if truth is not None
        else ""
    )
    warned = "".join(f'<p class="tag">Note: {P.esc(w)}</p>' for w in table_warnings)
    sections.append(
        ("Score distributions", f"{warned}<p>{note}</p>{P.img(hist, 'score histograms')}")
    )

    # evaluate.json alone: it holds every row, and it is written last, as one object, so
    # the rows and the settings shown beside them always come from the same evaluation.
    ev_url = run.path("evaluate", "evaluate.json")
    ev_json = read_json(ev_url) if exists(ev_url) else None
    if ev_json is not None and evaluation_is_stale(run, ev_json):
        log.warning("report: %s was made from an earlier score table; not shown", ev_url)
        inner = (
            "<p>The last evaluation was made from an earlier score table (the run was scored "
            "again since), so its results are not shown: run <code>diffin evaluate --run "
            "RUN</code> again.</p>"
        )
    elif ev_json is not None:
        res = pd.DataFrame(ev_json["results"])
        for col in (*METRICS, "final_train_loss"):  # null in the file (no zero-shot) is NaN
            if col in res:
                res[col] = pd.to_numeric(res[col], errors="coerce").astype(float)
        table = summarise(res)
        cols = list(table.columns)
        # curves: the mean over seeds of each subset
        res = res.groupby(["subset", "method", "keep"], sort=False)[list(METRICS)].mean()
        res = res.reset_index()
        seeds = ev_json.get("config", {}).get("seeds", [0])
        train = ev_json.get("train", {})
        inner = (
            f"<p>Each row: a {P.esc(train.get('model'))} trained from scratch on the subset kept "
            f"by a scorer ({P.esc(train.get('steps'))} steps of batch "
            f"{P.esc(train.get('batch_size'))}, {P.esc(train.get('optimizer'))}, one "
            f"initialisation per seed shared by every subset; seeds "
            f"{P.esc(', '.join(map(str, seeds)))}), evaluated on "
            f"{P.esc(ev_json.get('eval_pairs'))} held-out pairs"
            + (" (mean ± sd over seeds)" if len(seeds) > 1 else "")
            + ".</p>"
            + "".join(f"<p>{P.esc(n)}</p>" for n in ev_json.get("notes", []))
            + P.table(cols, table[cols].itertuples(index=False))
            + P.img(metric_vs_keep(res, "zeroshot_top1"), "zero-shot accuracy versus keep")
            + P.img(metric_vs_keep(res, "i2t_r5"), "image-to-text recall@5 versus keep")
        )
    else:
        inner = (
            "<p>Not evaluated yet: <code>diffin evaluate --run RUN</code> retrains on each "
            "scorer's kept subset and fills this section.</p>"
        )
    sections.append(("Evaluation: retraining on each kept subset", inner))

    for heading, lowest in (("Most harmful pairs", True), ("Most helpful pairs", False)):
        chosen = extremes.lowest if lowest else extremes.highest
        items = _pairs(chosen, method, truth, options)
        side = "lowest" if lowest else "highest"
        sections.append(
            (
                f"{heading} (by {method})",
                f"<p>The {len(items)} {side} {P.esc(method)} scores.</p>" + P.gallery(items),
            )
        )

    entries = prune_entries(run, record)
    stale = stale_manifests(run, None, entries)
    if stale:
        log.warning("report: the prune manifests %s rank an earlier score table", stale)
    sections.append(("Prune selections", _prune_selections(run, entries, stale)))

    err_rows, err_note = _errors_per_shard(errors.shards)
    sections.append(
        (
            "Errors per shard",
            f"<p>{P.esc(err_note)}</p>"
            + P.table(
                ["shard", "samples", "errors", "most frequent reason", "shard damaged"],
                err_rows,
                text_cols=1,
            ),
        )
    )

    prov_rows = []
    for stage, value in sorted(record.items()):
        # the score stage keeps its seconds in its summary (walkthrough: the row was blank)
        seconds = (
            value.get("seconds", (value.get("summary") or {}).get("seconds"))
            if isinstance(value, dict)
            else None
        )
        prov_rows.append([stage, "" if seconds is None else seconds])
    traj = read_json(run.trajectory_json) if exists(run.trajectory_json) else {}
    ckpts = [[c["step"], c["lr"], c["sha256"]] for c in traj.get("checkpoints", [])]
    versions = traj.get("versions") or meta.get("versions") or {}
    stale_note = (
        "<p>The prune manifests "
        + P.esc(", ".join(stale))
        + " were made from an earlier score table (the run was scored again since): run "
        "<code>diffin prune</code> again for each before retraining on them.</p>"
        if stale
        else ""
    )
    prov = (
        stale_note
        + P.table(["stage", "seconds"], prov_rows)
        + P.table(["checkpoint step", "lr", "sha256"], ckpts, text_cols=0)
        + P.table(["package", "version"], sorted(versions.items()))
        + f"<pre>{P.esc(json.dumps(record, indent=1, sort_keys=True, default=str))}</pre>"
    )
    sections.append(("Provenance", prov))

    n_err = errors.errors
    intro = (
        f"<p>{errors.rows} rows ({errors.rows - n_err} scored, {n_err} errors), scorers: "
        f"{P.esc(', '.join(methods))}; model {P.esc(meta.get('model', traj.get('model')))}; "
        f"written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.</p>"
    )
    out = run.path("report", "index.html")
    write_bytes_atomic(out, P.page(f"diffin report: {run.url}", sections, intro).encode())
    return out
