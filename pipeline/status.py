"""Where a run stands: `diffin status --run RUN`, read from the records its stages left.

Each stage leaves a record (trajectory.json, the score table's footer and
RUN/scores/progress.json, run.json's prune entries, evaluate.json, the report
page). This reads them and says, per stage, what is there, whether it still
matches the stage before it, and what to run next. It computes and writes
nothing; the staleness checks are the ones prune, evaluate and report apply.
"""

from __future__ import annotations

import shlex
import time
from typing import Any

import fsspec
import pyarrow.parquet as pq

from pipeline.errors import ConfigError
from pipeline.rundir import RunDir, exists, read_json
from pipeline.score.table import (
    check_scores_current,
    evaluation_is_stale,
    prune_entries,
    stale_manifests,
    table_metadata,
)


def _age_s(url: str) -> float | None:
    """Seconds since ``url`` was last written, where the store says."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        return round(time.time() - fs.modified(path).timestamp(), 1)
    except (NotImplementedError, OSError, ValueError, AttributeError):
        return None


def _train(run: RunDir, record: dict[str, Any]) -> dict[str, Any]:
    if exists(run.trajectory_json):
        traj = read_json(run.trajectory_json)
        config = traj.get("config") or {}
        return {
            "state": "trained",
            "model": traj.get("model"),
            "checkpoints": [c.get("step") for c in traj.get("checkpoints", [])],
            "data": config.get("data"),
            "imported_from": (record.get("train") or {}).get("imported_from"),
        }
    if exists(run.resume_state):
        return {"state": "unfinished"}  # interrupted, or under way now
    return {"state": "not trained"}


def _score(run: RunDir, record: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"state": "not scored"}
    progress_url = run.path("scores", "progress.json")
    if exists(progress_url):
        progress = read_json(progress_url)
        out["progress"] = {
            k: progress.get(k)
            for k in ("state", "shards_done", "shards_total", "shards_failed", "samples_total")
        }
        out["progress"]["written_s_ago"] = _age_s(progress_url)
        if progress.get("state") in ("scoring", "interrupted", "failed"):
            # "scoring" may be a run killed outright: the age of the file says which
            out["state"] = progress["state"]
    if not exists(run.scores):
        return out
    meta = table_metadata(run.scores)
    with fsspec.open(run.scores, "rb") as f:
        rows = pq.ParquetFile(f).metadata.num_rows
    summary = (record.get("score") or {}).get("summary") or {}
    table: dict[str, Any] = {
        "rows": rows,
        "methods": (meta.get("score") or {}).get("methods"),
    }
    if summary.get("rows") == rows:  # the summary of the run that wrote this table
        table["rows_error"] = summary.get("rows_error")
        table["shards_failed"] = len(summary.get("shards_failed") or {})
        table["shards_damaged"] = len(summary.get("shards_damaged") or {})
    try:
        table["warnings"] = check_scores_current(run)
    except ConfigError as exc:
        table["warnings"] = [str(exc)]
    out["table"] = table
    if out["state"] == "not scored" or not table["warnings"]:
        out["state"] = "scored" if not table["warnings"] else "stale"
    return out


def _prune(run: RunDir, record: dict[str, Any], scored: bool) -> list[dict[str, Any]]:
    entries = prune_entries(run, record)
    stale = set(stale_manifests(run, None, entries)) if scored else set()
    out = []
    for name, value in entries.items():
        cfg = value.get("config") or {}
        out.append(
            {
                "name": name,
                "rule": cfg.get("rule"),
                "ranked_by": cfg.get("fusion") or cfg.get("method"),
                "keep": cfg.get("keep") if cfg.get("threshold") is None else None,
                "threshold": cfg.get("threshold"),
                "kept": value.get("kept"),
                "stale": name in stale,
                "dir": run.prune_dir(name),
            }
        )
    return out


def _evaluate(run: RunDir, scored: bool) -> dict[str, Any] | None:
    url = run.path("evaluate", "evaluate.json")
    if not exists(url):
        return None
    ev = read_json(url)
    return {
        "subsets": len(ev.get("results") or []),
        "methods": (ev.get("config") or {}).get("methods"),
        "stale": scored and evaluation_is_stale(run, ev),
    }


def _report(run: RunDir) -> dict[str, Any] | None:
    url = run.path("report", "index.html")
    if not exists(url):
        return None
    age, scores_age = _age_s(url), _age_s(run.scores) if exists(run.scores) else None
    older = age is not None and scores_age is not None and age > scores_age
    return {"path": url, "older_than_scores": older}


def _next(run: RunDir, status: dict[str, Any]) -> str:
    """The command to run next, or what the run is ready for."""
    r = shlex.quote(run.url)
    train, score = status["train"], status["score"]
    data = shlex.quote(str(train.get("data") or "POOL"))
    if train["state"] == "not trained":
        return f"diffin train --data POOL --run {r}"
    if train["state"] == "unfinished":
        return f"diffin train --run {r} with the options it was started with (it resumes)"
    if score["state"] != "scored":
        return f"diffin score --data {data} --run {r} (a run resumes where it stopped)"
    stale = [p["name"] for p in status["prune"] if p["stale"]]
    if stale:
        return (
            f"diffin prune --run {r} again for {stale[0]}, with the options run.json records "
            f"under prune/{stale[0]}: it ranks an earlier table"
        )
    if not status["prune"]:
        return f"diffin prune --run {r} --keep 0.7"
    report = status["report"]
    if report is None or report["older_than_scores"]:
        return f"diffin report --run {r}"
    first = status["prune"][0]["dir"]
    return f"retrain on {first} with open_clip_train (docs/operations.md)"


def run_status(run_url: str) -> dict[str, Any]:
    """Each stage's state in ``run_url``, and the next command (see the module's doc)."""
    run = RunDir(run_url)
    if not exists(run.url) and not exists(run.run_json):
        raise ConfigError(f"run: {run_url} does not exist")
    record = read_json(run.run_json) if exists(run.run_json) else {}
    status: dict[str, Any] = {"run": run.url, "train": _train(run, record)}
    status["score"] = _score(run, record)
    scored = "table" in status["score"]
    status["prune"] = _prune(run, record, scored)
    status["evaluate"] = _evaluate(run, scored)
    status["report"] = _report(run)
    status["next"] = _next(run, status)
    return status


def describe(status: dict[str, Any]) -> str:
    """The status as lines a person reads at a glance."""
    lines = [f"run       {status['run']}"]
    t = status["train"]
    if t["state"] == "trained":
        steps = t["checkpoints"]
        lines.append(
            f"train     {t['model']}, {len(steps)} checkpoint(s) up to step "
            f"{max(steps) if steps else '?'}"
            + (f", imported from {t['imported_from']}" if t.get("imported_from") else "")
            + (f"; data {t['data']}" if t.get("data") else "")
        )
    else:
        lines.append(f"train     {t['state']}")
    s = status["score"]
    text = s["state"]
    if "table" in s:
        tb = s["table"]
        errors = f", {tb['rows_error']} error rows" if tb.get("rows_error") is not None else ""
        text = f"{tb['rows']} rows{errors}; {', '.join(tb['methods'] or [])}"
        if tb.get("shards_failed") or tb.get("shards_damaged"):
            text += f"; {tb['shards_failed']} shard(s) failed, {tb['shards_damaged']} damaged"
        text += "" if s["state"] == "scored" else f" [{s['state']}]"
    p = s.get("progress")
    if p and p.get("state") not in (None, "finished"):
        age = p.get("written_s_ago")
        text += (
            f" (last run {p.get('state')}: {p.get('shards_done')}/{p.get('shards_total')} shards"
            + (f", progress written {age:.0f} s ago" if age is not None else "")
            + ")"
        )
    lines.append(f"score     {text}")
    for w in (s.get("table") or {}).get("warnings") or []:
        lines.append(f"          ! {w}")
    if not status["prune"]:
        lines.append("prune     no manifest")
    for m in status["prune"]:
        limit = f"keep {m['keep']}" if m["keep"] is not None else f"threshold {m['threshold']}"
        rule = "" if m["rule"] in ("fraction", "threshold") else f"{m['rule']}, "
        by = m["ranked_by"]
        if isinstance(by, dict):  # a fusion: its weights
            by = ", ".join(f"{k}={w:g}" for k, w in by.items())
        lines.append(
            f"prune     {m['name']}: {m['kept']} kept ({rule}{limit}, by {by})"
            + (" [ranks an earlier table]" if m["stale"] else "")
        )
    e = status["evaluate"]
    lines.append(
        "evaluate  not run"
        if e is None
        else f"evaluate  {e['subsets']} subset(s) of {', '.join(e['methods'] or [])}"
        + (" [made from an earlier table]" if e["stale"] else "")
    )
    rp = status["report"]
    lines.append(
        "report    not written"
        if rp is None
        else f"report    {rp['path']}"
        + (" [older than the scores]" if rp["older_than_scores"] else "")
    )
    lines.append(f"next      {status['next']}")
    return "\n".join(lines)
