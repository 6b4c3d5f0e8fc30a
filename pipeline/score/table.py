"""The score table: one row per input sample (errors included), written per shard, then merged."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.data.keys import recorded_reader_options
from pipeline.data.sample import Sample
from pipeline.errors import ConfigError
from pipeline.rundir import RunDir, exists, read_bytes, read_json, write_bytes_atomic
from pipeline.runlock import RunBusy, describe_holder, holders, mine

log = logging.getLogger(__name__)

BASE_FIELDS = [
    pa.field("uid", pa.string()),
    pa.field("key", pa.string()),
    pa.field("shard", pa.string()),
    pa.field("index", pa.int32()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("caption", pa.string()),
]


def schema(score_columns: Sequence[str]) -> pa.Schema:
    return pa.schema(BASE_FIELDS + [pa.field(c, pa.float64()) for c in score_columns])


def build_part(
    samples: Sequence[Sample], scores: dict[str, np.ndarray], score_columns: Sequence[str]
) -> pa.Table:
    """Rows for every sample; score arrays cover the ok samples in order, errors get nulls."""
    ok_mask = np.array([s.ok for s in samples], dtype=bool)
    cols: dict[str, Any] = {
        "uid": [s.uid for s in samples],
        "key": [s.key for s in samples],
        "shard": [s.shard for s in samples],
        "index": [s.index for s in samples],
        "status": ["ok" if s.ok else "error" for s in samples],
        "error": [s.error for s in samples],
        "caption": [s.caption for s in samples],
    }
    for c in score_columns:
        full = np.full(len(samples), np.nan)
        if ok_mask.any():
            values = np.asarray(scores[c], dtype=np.float64)
            if values.shape != (int(ok_mask.sum()),):
                # numpy would broadcast a length-1 array over every ok row
                raise ValueError(
                    f"score column {c!r}: {values.shape} values for {int(ok_mask.sum())} ok rows"
                )
            full[ok_mask] = values
        cols[c] = pa.array(full, mask=~ok_mask)
    return pa.table(cols, schema=schema(score_columns))


def write_table(table: pa.Table, url: str, metadata: dict[str, Any] | None = None) -> None:
    if metadata:
        meta = {
            **(table.schema.metadata or {}),
            b"diffin": json.dumps(metadata, default=str).encode(),
        }
        table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(url, buf.getvalue())


def table_from_bytes(data: bytes, columns: Sequence[str] | None = None) -> pa.Table:
    """A Parquet file held in memory, read without pyarrow's thread pools: a read from a
    Python buffer left work behind that aborted the interpreter at exit now and then
    ("terminate called without an active exception", exit 134, after a clean run;
    apache/arrow#33975, walkthrough). Unthreaded and not pre-buffered, it did not (0 of 60
    runs here, against about 1 in 4)."""
    return pq.read_table(
        pa.BufferReader(data), columns=columns, use_threads=False, pre_buffer=False
    )


def read_table(url: str, columns: Sequence[str] | None = None) -> pa.Table:
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem) and os.path.isfile(path):  # threaded, clean exit
        return pq.read_table(path, columns=columns)
    return table_from_bytes(read_bytes(url), columns)


def table_metadata(url: str) -> dict[str, Any]:
    # The footer only: the table itself may be many gigabytes.
    with fsspec.open(url, "rb") as f:
        raw = pq.read_schema(f).metadata or {}
    return json.loads(raw.get(b"diffin", b"{}"))


def scored_config(run: RunDir) -> dict[str, Any]:
    """The score stage's config: from run.json, else from the score table's own metadata."""
    if exists(run.run_json):
        recorded = read_json(run.run_json).get("score", {}).get("config")
        if recorded:
            return recorded
    return table_metadata(run.scores).get("score", {}) if exists(run.scores) else {}


def require_scores(run: RunDir) -> None:
    """Refuse a stage that needs the score table when there is none, saying whether scoring
    never ran or has not finished (walkthrough: a half-scored run was told to "run `diffin
    score` first")."""
    if exists(run.scores):
        return
    fs, done = fsspec.core.url_to_fs(run.path("scores", "done"))
    fs.invalidate_cache()  # records written by other processes (the scoring actors)
    scored = len(fs.glob(f"{done}/*.json")) if fs.exists(done) else 0
    scoring = _scoring_now(run)
    if scoring:  # walkthrough: "run the same score again", which would be refused
        raise RunBusy(
            f"run: no score table at {run.scores} yet: {scoring} is scoring now ({scored} "
            "shard(s) scored so far); run this again when it has finished"
        )
    if scored:
        raise ConfigError(
            f"run: no score table at {run.scores} yet: scoring has not finished ({scored} "
            "shard(s) scored so far); run the same `diffin score` command again to finish "
            "it (it resumes)"
        )
    raise ConfigError(f"run: no score table at {run.scores} (run `diffin score` first)")


def _scoring_now(run: RunDir) -> str | None:
    """The score run under way on ``run`` now (pipeline/runlock.py), described; else None."""
    if "score" in mine(run.url):  # the demo's own, around its stages
        return None
    holder = holders(run.url).get("score")
    return describe_holder(holder) if holder else None


def _preparing(run: RunDir) -> str | None:
    """The score run under way now, described, while it has not recorded its fingerprint
    (directions first); else None. Advisory: a record that cannot be read is none."""
    progress = run.path("scores", "progress.json")
    try:
        if not exists(progress) or read_json(progress).get("state") != "preparing":
            return None
    except (OSError, ValueError, AttributeError):  # removed as it stopped, or not a record
        return None
    return _scoring_now(run)


def check_scores_current(run: RunDir) -> list[str]:
    """Refuse a score table made from another trajectory than the run's current one.

    A run trained (or imported) again keeps its old scores.parquet until it is
    rescored; pruning or evaluating on it would rank by the old proxy without
    a word. Tables that record no checkpoints (written by hand) are not checked.
    Returns the warnings it logged (the report shows them on the page too).
    """
    warnings: list[str] = []
    meta = table_metadata(run.scores)
    last = run.path("scores", "fingerprint.json")
    preparing = _preparing(run)
    if preparing:
        # walkthrough: silent while a rescore computed its directions, as fingerprint.json
        # is written only after them; its inputs are not known until then (review: nor is
        # fingerprint.json, an earlier run's, about this one)
        warnings.append(
            f"{preparing} is under way now, preparing its inputs: if they differ from this "
            f"table's it will replace {run.scores} when it finishes"
        )
    elif meta.get("fingerprint") and exists(last):
        if read_json(last).get("hash") != fingerprint_hash(meta["fingerprint"]):
            # walkthrough: after an interrupted rescore, prune and report went on with the
            # older table without a word
            scoring = _scoring_now(run)
            warnings.append(
                f"{scoring}, under way now with other inputs, will replace this table when "
                f"it finishes: until then {run.scores} is the earlier run's"
                if scoring
                else f"the last `diffin score` of {run.url}, with other inputs, did not "
                f"write this table (interrupted, killed, or it failed): {run.scores} is the earlier "
                "run's; run that score again to replace it"
            )
    recorded = meta.get("checkpoints")
    for message in warnings:  # said before a refusal below, too
        log.warning("scores: %s", message)
    if recorded and not exists(run.trajectory_json):
        training = holders(run.url).get("train")
        if training and "train" not in mine(run.url):  # not the demo's own
            raise RunBusy(
                f"scores: {run.scores} belongs to the trajectory that "
                f"{describe_holder(training)} is training again over now; run this again "
                "when it and a `diffin score` after it have finished"
            )
        if exists(run.resume_state):  # walkthrough: said "is being trained again" when stopped
            raise ConfigError(
                f"scores: {run.scores} belongs to a trajectory the run was being trained again "
                f"over, and that training stopped before it finished: run it again to resume "
                f"it (`diffin status --run {run.url}` prints the command), then `diffin score`"
            )
        warnings.append(f"{run.url} has no trajectory.json to check the scores against")
        log.warning("scores: %s", warnings[-1])
        recorded = None
    if not recorded:
        return warnings

    def key(c: dict[str, Any]) -> tuple:  # a re-import can give the same bytes other steps
        return (c.get("sha256"), c.get("step"), c.get("lr"))

    current = read_json(run.trajectory_json)["checkpoints"]
    if [key(c) for c in recorded] != [key(c) for c in current]:
        scoring = _scoring_now(run)
        if scoring:  # walkthrough: told to run the score that was running
            raise RunBusy(
                f"scores: {run.scores} was scored against another trajectory than the run's; "
                f"{scoring} is scoring it again now: run this again when it has finished"
            )
        raise ConfigError(
            f"scores: {run.scores} was scored against another trajectory than the run's (the "
            "run was trained or imported again since); run `diffin score` again"
        )
    return warnings


def fingerprint_hash(fp: dict[str, Any]) -> str:
    """The short hash of a scoring fingerprint, as completion records hold it."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def table_identity(url: str, columns: Sequence[str] | None = None) -> dict[str, Any]:
    """What a score table holds, however often it was written: its scoring fingerprint, row
    count and uids. A rerun that merges the same parts again writes other bytes (new
    provenance) but the same identity; the scores follow from these (determinism).

    ``columns``: the identity of those columns only (what a prune manifest ranks by):
    the uids and the columns' values, without the fingerprint, which changes with every
    other scorer a rescore adds or drops while these columns stay as they were
    (walkthrough: every manifest was called stale after such a rescore).
    """
    h, v, rows = hashlib.sha256(), hashlib.sha256(), 0
    cols = list(dict.fromkeys(columns or []))
    # with the status: an ok row whose score is NaN must not hash as an error row (review)
    hashed = ["status", *[c for c in cols if c != "status"]] if columns is not None else []
    with fsspec.open(url, "rb") as f:
        # pre_buffer would read ahead many row groups: memory grows with the table
        for batch in pq.ParquetFile(f, pre_buffer=False).iter_batches(columns=["uid", *hashed]):
            rows += batch.num_rows
            h.update("\n".join(batch.column(0).to_pylist()).encode() + b"\n")
            for i, column in enumerate(batch.columns[1:]):
                v.update(f"{hashed[i]}\n".encode())
                if pa.types.is_floating(column.type):  # nulls (error rows) read as NaN
                    v.update(column.to_numpy(zero_copy_only=False).astype("<f8").tobytes())
                else:
                    v.update(json.dumps(column.to_pylist(), default=str).encode())
    if columns is not None:
        return {
            "columns": cols,
            "rows": rows,
            "uids": h.hexdigest()[:16],
            "values": v.hexdigest()[:16],
        }
    fp = table_metadata(url).get("fingerprint")
    return {
        "fingerprint": fingerprint_hash(fp) if fp else None,
        "rows": rows,
        "uids": h.hexdigest()[:16],
    }


def prune_entries(run: RunDir, record: dict[str, Any] | None = None) -> dict[str, dict]:
    """run.json's prune entries by manifest name, for the manifests still there (one removed
    since is no longer there to retrain on, walkthrough). ``record``: run.json, when the
    caller has it."""
    if record is None:
        record = read_json(run.run_json) if exists(run.run_json) else {}
    return {
        stage.removeprefix("prune/"): value
        for stage, value in sorted(record.items())
        if stage.startswith("prune/")
        and isinstance(value, dict)
        and exists(f"{run.prune_dir(stage.removeprefix('prune/'))}/manifest.json")
    }


def evaluation_is_stale(run: RunDir, evaluation: dict[str, Any]) -> bool:
    """Whether ``evaluation`` (evaluate.json) was made from another score table than
    RUN/scores.parquet. One that recorded the columns it ranked by is compared on those
    alone (a rescore that adds a scorer leaves it valid); one from before, on the whole
    table; one from before evaluations recorded their table ("unknown") cannot be checked.
    One that retrained on ensemble subsets (``evaluate --ensemble``) is stale too when another
    run's table changed what those subsets ranked, or is gone."""
    made = evaluation.get("scores", "unknown")
    if made == "unknown" or not exists(run.scores):
        return False
    if _ensemble_changed(evaluation.get("ensemble"), {}):
        return True
    columns = made.get("columns") if isinstance(made, dict) else None
    if not columns:
        return made != table_identity(run.scores)
    with fsspec.open(run.scores, "rb") as f:
        names = set(pq.read_schema(f).names)
    return not set(columns) <= names or made != table_identity(run.scores, columns)


def stale_manifests(
    run: RunDir,
    identity: dict[str, Any] | None = None,
    entries: dict[str, dict] | None = None,
) -> list[str]:
    """The prune manifests in run.json made from another score table than RUN/scores.parquet.

    A rescore replaces the table but not RUN/prune/NAME/, which would go on retraining on
    the old ranking. A manifest that recorded the columns it ranks by is stale only when
    those columns' values or the rows changed (other scorers come and go with --methods);
    one that recorded the whole table's identity, when that changed. Manifests written
    before prune recorded its table are not listed. ``identity``: the table's
    :func:`table_identity`, and ``entries`` :func:`prune_entries`, when the caller has them.
    """
    if not exists(run.scores):
        return []
    entries = prune_entries(run) if entries is None else entries
    made = {n: v["scores"] for n, v in entries.items() if v.get("scores")}
    if not made:
        return []
    with fsspec.open(run.scores, "rb") as f:
        names = set(pq.read_schema(f).names)
    current: dict[tuple[str, ...], dict[str, Any] | None] = {}

    def now(columns: list[str] | None) -> dict[str, Any] | None:
        key = tuple(columns) if columns is not None else ("",)
        if key not in current:
            if columns is None:
                current[key] = identity or table_identity(run.scores)
            else:  # a column the table no longer has: that manifest is stale
                current[key] = (
                    table_identity(run.scores, columns) if set(columns) <= names else None
                )
        return current[key]

    stale = {name for name, scores in made.items() if scores != now(scores.get("columns"))}
    # an ensemble's manifest (prune --ensemble) ranks the other runs' tables too
    # each other table read once per column set, however many manifests averaged it in
    others: dict[tuple[str, ...], dict[str, Any] | None] = {}
    stale |= {name for name, v in entries.items() if _ensemble_changed(v.get("ensemble"), others)}
    return sorted(stale)


def ensemble_record(runs: Sequence[str], columns: Sequence[str]) -> list[dict[str, Any]]:
    """What each other run of an ensemble ranked by, [{"run", "scores"}, ...]: the record
    prune and evaluate write beside their own table's, which :func:`_ensemble_changed` reads."""
    return [
        {"run": RunDir(u).url, "scores": table_identity(RunDir(u).scores, columns)} for u in runs
    ]


def _ensemble_changed(
    ensemble: Any, identities: dict[tuple[str, ...], dict[str, Any] | None]
) -> bool:
    """Whether a table an ensemble manifest averaged in holds other rows or values now
    (or is gone): ``ensemble`` is run.json's record of it, [{"run", "scores"}, ...];
    ``identities`` caches each (table, *columns)'s identity now (None: none)."""
    if not isinstance(ensemble, list):
        return False
    for other in ensemble:
        made = other.get("scores") if isinstance(other, dict) else None
        if not isinstance(made, dict) or not isinstance(other.get("run"), str):
            continue  # nothing recorded to compare with
        url = RunDir(other["run"]).scores
        columns = made.get("columns") or []
        key = (url, *columns)
        if key not in identities:
            identities[key] = _identity_now(url, columns)
        if identities[key] != made:
            return True
    return False


def _identity_now(url: str, columns: list[str]) -> dict[str, Any] | None:
    """:func:`table_identity` of ``columns``; None if the table is gone, unreadable or
    lacks one of them (it cannot be the table a manifest ranked)."""
    try:
        if not exists(url):
            return None
        with fsspec.open(url, "rb") as f:
            names = set(pq.read_schema(f).names)
        return table_identity(url, columns) if set(columns) <= names else None
    except OSError:
        return None


def scored_reader_options(run: RunDir) -> dict[str, Any]:
    """How the scored shards were read (image and text keys, pixel cap): re-read them the same way."""
    return recorded_reader_options(scored_config(run))
