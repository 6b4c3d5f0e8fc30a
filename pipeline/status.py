"""Where a run stands: `diffin status --run RUN`, read from the records its stages left.

Each stage leaves a record (trajectory.json, the score table's footer and
RUN/scores/progress.json, run.json's prune entries, evaluate.json, the report
page). This reads them and says, per stage, what is there, whether it still
matches the stage before it, and what to run next. The run's locks
(pipeline/runlock.py) tell a stage under way now from one that was killed. It
computes and writes nothing; the staleness checks are the ones prune, evaluate
and report apply.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import fsspec
import pyarrow.parquet as pq

from pipeline.errors import ConfigError, StageFailed
from pipeline.evaluation.partial import unfinished as unfinished_evaluation
from pipeline.prune.config import PruneConfig
from pipeline.rundir import RunDir, check_apart, exists, read_json
from pipeline.runlock import describe_holder, holders, lease_note
from pipeline.score.table import (
    check_scores_current,
    evaluation_is_stale,
    prune_entries,
    stale_manifests,
    table_metadata,
)
from pipeline.train.config import TrainConfig
from pipeline.train.progress import progress_url as training_progress_url
from pipeline.train.progress import read_progress


def _age_s(url: str) -> float | None:
    """Seconds since ``url`` was last written, where the store says."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        return round(time.time() - fs.modified(path).timestamp(), 1)
    except (NotImplementedError, OSError, ValueError, AttributeError):
        return None


def _train(run: RunDir, record: dict[str, Any], running: dict[str, Any]) -> dict[str, Any]:
    command = (running.get("train") or {}).get("command")
    # the demo holds the train lock throughout: training until its trajectory is written
    training = command in ("train", "train --import") or (
        command == "demo" and not exists(run.trajectory_json)
    )
    # an import writes no record; one left by a native training is not its
    progress = _train_progress(run) if command != "train --import" else {}
    if training:  # its trajectory.json, if any, is the one it replaces (not the demo's lock)
        age = _age_s(run.resume_state) if exists(run.resume_state) else None
        return {"state": "training", "resume_written_s_ago": age, **progress}
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
    if exists(run.resume_state):  # stopped (Ctrl-C, killed) before it finished
        return {
            "state": "unfinished",
            "resume_written_s_ago": _age_s(run.resume_state),
            **progress,
        }
    return {"state": "not trained", **progress}


def _train_progress(run: RunDir) -> dict[str, Any]:
    """How far the training under way (or the last one) got: train/progress.py's record."""
    record = read_progress(run)
    if record is None:
        return {}
    keys = ("step", "steps", "resumable_from", "loss", "preparing")
    age = _age_s(training_progress_url(run))
    return {"progress": {**{k: record.get(k) for k in keys}, "written_s_ago": age}}


def _score(run: RunDir, record: dict[str, Any], running: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"state": "not scored"}
    request_url = run.path("scores", "request.json")
    if exists(request_url):  # the config of the last score run started
        out["request"] = read_json(request_url)
    progress_url = run.path("scores", "progress.json")
    last = None
    if exists(progress_url):
        progress = read_json(progress_url)
        out["progress"] = {
            k: progress.get(k)
            for k in ("state", "shards_done", "shards_total", "shards_failed", "samples_total")
        }
        out["progress"]["written_s_ago"] = _age_s(progress_url)
        last = progress.get("state")
    if exists(run.scores):
        meta = table_metadata(run.scores)
        with fsspec.open(run.scores, "rb") as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        summary = (record.get("score") or {}).get("summary") or {}
        table: dict[str, Any] = {"rows": rows, "methods": (meta.get("score") or {}).get("methods")}
        if summary.get("rows") == rows:  # the summary of the run that wrote this table
            table["rows_error"] = summary.get("rows_error")
            table["shards_failed"] = len(summary.get("shards_failed") or {})
            table["shards_damaged"] = len(summary.get("shards_damaged") or {})
        quiet = logging.getLogger("pipeline.score.table")
        level, quiet.level = quiet.level, logging.ERROR  # said once, on the status's lines
        try:
            table["warnings"] = check_scores_current(run)
        except (ConfigError, StageFailed) as exc:  # StageFailed: RunBusy, a stage under way
            table["warnings"] = [str(exc)]
            table["refused"] = True  # not the run's trajectory's: what ranks it is stale
        finally:
            quiet.setLevel(level)
        out["table"] = table
        out["state"] = "stale" if table["warnings"] else "scored"
    # a run that did not finish says so, whatever table an earlier one left
    if last in ("preparing", "scoring", "merging", "interrupted", "failed"):
        # a run under way holds the run's score lock; one that no process holds was killed
        under_way = last in ("interrupted", "failed") or "score" in running
        out["state"] = last if under_way else "killed"
    return out


def _prune(run: RunDir, record: dict[str, Any], scored: bool) -> list[dict[str, Any]]:
    entries = prune_entries(run, record)
    stale = set(stale_manifests(run, None, entries)) if scored else set(entries)
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
                "ensemble": cfg.get("ensemble"),
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
        "stale": not scored or evaluation_is_stale(run, ev),
        "config": ev.get("config") or {},
    }


def _report(run: RunDir, manifests: list[dict[str, Any]]) -> dict[str, Any] | None:
    url = run.path("report", "index.html")
    if not exists(url):
        return None
    age = _age_s(url)
    shown = {
        "the scores": run.scores,
        "the evaluation": run.path("evaluate", "evaluate.json"),
        **{f"manifest {m['name']}": f"{m['dir']}/manifest.json" for m in manifests},
    }
    newer = []
    for what, source in shown.items():
        source_age = _age_s(source) if exists(source) else None
        if age is not None and source_age is not None and source_age < age:
            newer.append(what)  # written after the page: the page does not show it
    return {"path": url, "older_than": newer}


# Score options left out of the printed command: unset, score reads the pool as the run
# last did, or as the proxy was trained when it was trained again since (review: the
# recorded keys pinned an earlier pool's members after a retrain).
READER = ("image_keys", "text_keys", "max_image_pixels")


def _score_command(run: RunDir, status: dict[str, Any], record: dict[str, Any]) -> tuple[str, str]:
    from pipeline.cli import command_for

    # the last score run started, else the last one that finished (runs before request.json)
    request = status["score"].get("request") or (record.get("score") or {}).get("config")
    if request:  # its own options: a rerun resumes it
        command = command_for("score", {**request, "run": run.url}, skip=READER)
        return command, "with the last score run's options"
    data = status["train"].get("data") or "POOL"
    return command_for("score", {"data": data, "run": run.url}), "add --methods and --target"


def _rankable(methods: list[str] | None) -> str | None:
    from pipeline.prune.config import NOT_KEEP_FIRST

    methods = methods or []
    if "diffin" in methods:
        return "diffin"
    return next((m for m in methods if m not in NOT_KEEP_FIRST), None)


def _train_line(t: dict[str, Any]) -> str:
    """The train line of a training under way, stopped, or not (yet) trained."""
    p, state = t.get("progress"), t["state"]
    age = t.get("resume_written_s_ago")
    saved = f"resume state written {age:.0f} s ago" if age is not None else ""
    if not p:  # no record (a training of an earlier diffin, an import)
        return state + (f" ({saved})" if saved else "")
    at = f"step {p['step']} of {p['steps']}"
    if state == "training" and p.get("preparing"):
        return (
            "training (preparing: reading the pool, writing the sets; resumes from step "
            f"{p['step']})"
        )
    if state == "training":
        loss = f", loss {p['loss']:.3f}" if p.get("loss") is not None else ""
        since = p.get("written_s_ago")
        when = f" ({since:.0f} s ago)" if since is not None else ""
        return f"training, {at}{loss}{when}" + (f"; {saved}" if saved else "")
    if state == "unfinished":
        # the steps after the last resume state are trained again
        resume = p.get("resumable_from")
        return f"unfinished, stopped at {at}" + (
            f"; resumes from step {resume} ({saved})" if resume is not None else f" ({saved})"
        )
    # not trained, a record left: stopped before its first resume state
    return f"not trained (the last training stopped at {at}, before its first resume state)"


def _wait_for(running: dict[str, Any], stages: tuple[str, ...]) -> str | None:
    """Why to look again later, when one of ``stages`` is under way now."""
    stage = next((s for s in stages if s in running), None)
    if stage is None:
        return None
    return f"{describe_holder(running[stage])} is under way now; look again when it has finished"


def _evaluate_command(config: dict[str, Any], run_url: str) -> str:
    from pipeline.cli import command_for

    keep = {k: v for k, v in config.items() if k != "run"}
    if not keep.get("fusions"):
        keep.pop("fusion_norm", None)  # refused without --fuse (review)
    return command_for("evaluate", {**keep, "run": run_url})


def _next(run: RunDir, status: dict[str, Any], record: dict[str, Any]) -> tuple[str, str]:
    """(the command to run next, why or what to add): the command alone can be pasted."""
    from pipeline.cli import command_for

    r = run.url
    train, score = status["train"], status["score"]
    wait = _wait_for(status["running"], ("train", "score"))  # what the rest reads
    if wait:
        return command_for("status", {"run": r}), wait
    request = run.path("trajectory", "request.json")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if train["state"] == "not trained":
        if exists(request):  # walkthrough: a training stopped before its first resume state
            options = {k: v for k, v in read_json(request).items() if k in known and k != "resume"}
            return command_for("train", {**options, "run": r}), (
                "the last training stopped before it saved a resume state: this starts it again"
            )
        return command_for("train", {"data": "POOL", "run": r}), "POOL: the pool's shards"
    if train["state"] == "unfinished":
        resume = run.path("trajectory", "resume-fingerprint.json")
        # every option of the training started last; else (before request.json) those that
        # make its fingerprint
        whole = exists(request)
        parts = read_json(request) if whole else read_json(resume) if exists(resume) else {}
        options = {k: v for k, v in parts.items() if k in known and k != "resume"}
        step = (train.get("progress") or {}).get("resumable_from")
        why = (
            "resumes the training"
            + (f" from step {step}" if step is not None else "")
            + ", which stopped before it finished (no diffin process holds the run; its "
            f"resume state was written {train.get('resume_written_s_ago')} s ago)"
        )
        if not whole:
            why += (
                "; options that do not change the trajectory (--workers, --address, "
                "--threads) are not recorded: add them"
            )
        if options:
            return command_for("train", {**options, "run": r}), why
        return command_for("train", {"data": "POOL", "run": r}), why + ", and the others"
    if score["state"] != "scored":
        command, how = _score_command(run, status, record)
        why = {
            "not scored": "no score table yet",
            "stale": "the score table is not this run's now",
            "interrupted": "the last score run was interrupted",
            "failed": "the last score run failed (error rows of a run that scored nothing: "
            "RUN/scores-failed.parquet)",
            "killed": "the last score run was killed while "
            f"{(score.get('progress') or {}).get('state')} (no diffin process holds the run)",
        }[score["state"]]
        return command, f"{why}; {how}"
    # what the user was doing, and needs no manifest (the table is current here)
    partial = status["evaluate_unfinished"]
    if partial is not None and "evaluate" in status["running"]:
        return command_for("status", {"run": r}), _wait_for(status["running"], ("evaluate",))
    config = (partial or {}).get("config")
    scored = set((score.get("table") or {}).get("methods") or [])
    # offered while evaluate would take it (review: after a rescore without its methods it
    # was offered, refused, before every later step)
    if config is not None and set(config.get("methods") or []) <= scored:
        return _evaluate_command(config, r), (
            f"resumes the evaluation that did not finish: the {partial['models']} model "
            "row(s) it kept in RUN/evaluate-partial are not trained again (remove that folder "
            "to drop them)"
        )
    stale = [p for p in status["prune"] if p["stale"]]
    if stale:
        config = (record.get(f"prune/{stale[0]['name']}") or {}).get("config") or {}
        known = {f.name for f in dataclasses.fields(PruneConfig)}
        try:  # normalised: records from before kept every field's default (review)
            config = PruneConfig(**{k: v for k, v in config.items() if k in known}).to_dict()
        except (TypeError, ValueError):
            pass
        return (
            command_for("prune", {**config, "run": r}),
            f"{stale[0]['name']} ranks an earlier table",
        )
    if not status["prune"]:
        method = _rankable((score.get("table") or {}).get("methods"))
        return command_for("prune", {"run": r, "keep": 0.7, "method": method}), "a first manifest"
    # the page, and the retraining, follow these (walkthrough: a stale evaluation's
    # command was offered while an evaluate ran)
    wait = _wait_for(status["running"], ("evaluate", "report"))
    if wait:
        return command_for("status", {"run": r}), wait
    evaluation = status["evaluate"]
    if evaluation is not None and evaluation["stale"]:
        return _evaluate_command(evaluation["config"], r), "it was made from an earlier table"
    report = status["report"]
    if report is None or report["older_than"]:
        return command_for("report", {"run": r}), "the page does not show the latest"
    # the manifest written last: its own open_clip arguments (prune records them)
    newest = min(status["prune"], key=lambda m: _age_s(f"{m['dir']}/manifest.json") or 0.0)
    args = read_json(f"{newest['dir']}/manifest.json").get("open_clip_args") or ""
    return (
        f"python -m open_clip_train.main {args}".strip(),
        f"retrain on {newest['name']}, the newest manifest; add --model and the training "
        "options (docs/operations.md)",
    )


def run_status(run_url: str) -> dict[str, Any]:
    """Each stage's state in ``run_url``, and the next command (see the module's doc)."""
    run = RunDir(run_url)
    if not exists(run.url) and not exists(run.run_json):
        raise ConfigError(f"run: {run_url} does not exist")
    fs, path = fsspec.core.url_to_fs(run.url)
    if fs.isfile(path):  # walkthrough: an empty run, exit 0
        raise ConfigError(f"run: {run_url} is a file; run names a directory")
    check_apart(run.url, "run", "run")  # a pool's folder is no run
    record = read_json(run.run_json) if exists(run.run_json) else {}
    status: dict[str, Any] = {"run": run.url, "running": holders(run.url)}
    status["train"] = _train(run, record, status["running"])
    status["score"] = _score(run, record, status["running"])
    scored = "table" in status["score"]
    # a table the stages refuse (another trajectory's) makes what ranks it stale; one that
    # only warns (a rescore under way or stopped) is still what the manifests ranked
    # (walkthrough: marked "ranks an earlier table" while a rescore ran)
    current = scored and not status["score"]["table"].get("refused")
    status["prune"] = _prune(run, record, current)
    status["evaluate"] = _evaluate(run, current)
    status["evaluate_unfinished"] = unfinished_evaluation(run)
    status["report"] = _report(run, status["prune"])
    status["next"], status["next_why"] = _next(run, status, record)
    return status


def _line(stage: str, text: str, flag: str | None = None) -> str:
    return f"{stage:<10}{text}" + (f" [{flag}]" if flag else "")


def describe(status: dict[str, Any]) -> str:
    """The status as lines a person reads at a glance."""
    lines = [f"run       {status['run']}"]
    said = set()
    for holder in status.get("running", {}).values():
        # a demo holds every stage's lock: said once
        key = holder.get("owner") or (holder.get("pid"), holder.get("host"))
        if key not in said:
            said.add(key)
            lines.append(f"running   {describe_holder(holder)}{lease_note(holder)}")
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
        lines.append(f"train     {_train_line(t)}")
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
        age, state = p.get("written_s_ago"), p.get("state")
        counts = p.get("shards_total") is not None
        under_way = s["state"] in ("preparing", "scoring", "merging")
        # written once as a run starts preparing (directions, propagation: long): under
        # way, its age says nothing (walkthrough: "preparing (last run preparing,
        # progress written 73 s ago)", looking stuck)
        written = age is not None and not (under_way and state == "preparing")
        detail = (f"{p.get('shards_done')}/{p.get('shards_total')} shards" if counts else "") + (
            f"{', ' if counts else ''}progress written {age:.0f} s ago" if written else ""
        )
        if under_way and "table" not in s:
            text += f" ({detail})" if detail else " (directions and propagation, before the shards)"
        else:
            which = "a rescore under way," if under_way else "last run"
            text += f" ({which} {state}" + (f": {detail}" if detail else "") + ")"
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
        if m.get("ensemble"):
            by += f", mean over this run and {len(m['ensemble'])} other(s)"
        lines.append(
            f"prune     {m['name']}: {m['kept']} kept ({rule}{limit}, by {by})"
            + (" [ranks an earlier table]" if m["stale"] else "")
        )
    e, rp = status["evaluate"], status["report"]
    lines.append(
        _line("evaluate", "not run")
        if e is None
        else _line(
            "evaluate",
            f"{e['subsets']} subset(s) of {', '.join(e['methods'] or [])}",
            "made from an earlier table" if e["stale"] else None,
        )
    )
    partial = status.get("evaluate_unfinished")
    if partial is not None:  # under way, or stopped: the models it has trained are kept
        under_way = "evaluate" in status.get("running", {})
        lines[-1] += (
            f"; {'the one under way has' if under_way else 'one that did not finish'} "
            f"kept {partial['models']} model row(s) in evaluate-partial/"
            + (f" (and {partial['other']} of other settings)" if partial.get("other") else "")
        )
    lines.append(
        _line("report", "not written")
        if rp is None
        else _line(
            "report", rp["path"], rp["older_than"] and f"older than {', '.join(rp['older_than'])}"
        )
    )
    lines.append(f"next      {status['next']}")
    lines.append(f"          ({status['next_why']})")
    return "\n".join(lines)
