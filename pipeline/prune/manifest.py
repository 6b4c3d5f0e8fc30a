"""Select the kept rows and write the manifest of DESIGN.md.

RUN/prune/NAME/shards/{00000..0NNNN}.tar + sizes.json   resharded kept samples, all members
RUN/prune/NAME/uids.npy                                  DataComp subset format
RUN/prune/NAME/keep.parquet                              kept uids, keys, scores
RUN/prune/NAME/manifest.json                             rule, counts, --train-data
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.reader import ShardReadError, iter_raw
from pipeline.data.tarwriter import ShardWriter, brace_pattern
from pipeline.errors import ConfigError
from pipeline.prune.config import PruneConfig
from pipeline.prune.datacomp import save_uid_halves
from pipeline.prune.select import plan
from pipeline.rundir import RunDir, exists, join, makedirs, open_atomic, remove, write_json


def select(table: pa.Table, method: str, keep: float) -> pa.Table:
    """The top ``keep`` fraction of ok rows by score (ties broken by uid: deterministic)."""
    if method not in table.column_names:
        scored = [
            c
            for c in table.column_names
            if c not in ("uid", "key", "shard", "index", "status", "error", "caption")
        ]
        raise ConfigError(f"method: no column {method!r} in the score table; columns: {scored}")
    ok = table.filter(pa.compute.equal(table.column("status"), "ok"))
    scores = ok.column(method).to_numpy(zero_copy_only=False)
    finite = np.isfinite(scores)
    ok, scores = ok.filter(pa.array(finite)), scores[finite]
    n_keep = max(1, int(round(keep * len(scores)))) if len(scores) else 0
    uids = np.asarray(ok.column("uid").to_pylist())
    order = np.lexsort((uids, -scores))[:n_keep]
    return ok.take(pa.array(np.sort(order)))


def write_manifest(cfg: PruneConfig) -> dict[str, Any]:
    """Apply ``cfg``'s keep rule to RUN/scores.parquet and write RUN/prune/NAME/ whole.

    The score table is streamed (see :mod:`pipeline.prune.select`): kept rows
    go to ``keep.parquet`` batch by batch and are resharded shard by shard
    as they arrive (the table is in shard order), so memory holds one batch,
    one shard's kept keys and the kept uids as two 64-bit integers each.
    """
    cfg.validate()
    t0 = time.time()
    run = RunDir(cfg.run)
    if not exists(run.scores):
        raise ConfigError(f"run: no score table at {run.scores} (run `diffin score` first)")
    selection = plan(cfg, run.scores)  # refuses unknown columns before anything is removed
    out = run.prune_dir(cfg.manifest_name)
    remove(out, recursive=True)  # a rerun replaces the manifest whole
    makedirs(out)

    shards_dir = join(out, "shards")
    base = ["uid", "key", "shard", "index"]
    columns = base + [c for c in selection.score_columns if c not in base]
    uid_hi: list[np.ndarray] = []
    uid_lo: list[np.ndarray] = []
    kept = 0
    min_score = np.inf
    pending: tuple[str, set[str]] | None = None  # the shard being gathered, its kept keys
    writer = ShardWriter(shards_dir, cfg.shard_size)
    try:
        with open_atomic(join(out, "keep.parquet")) as f:
            pw: pq.ParquetWriter | None = None
            for batch in selection.kept_batches(columns):
                if pw is None:
                    pw = pq.ParquetWriter(f, batch.schema)
                pw.write_batch(batch)
                kept += batch.num_rows
                score = batch.column(cfg.score_name).to_numpy(zero_copy_only=False)
                if len(score):
                    min_score = min(min_score, float(np.min(score)))
                hi, lo = _uid_halves(batch.column("uid").to_pylist())
                uid_hi.append(hi)
                uid_lo.append(lo)
                for shard, key in zip(
                    batch.column("shard").to_pylist(), batch.column("key").to_pylist(), strict=True
                ):
                    if pending is None or pending[0] != shard:
                        if pending is not None:
                            _reshard(writer, *pending)
                        pending = (shard, set())
                    pending[1].add(key)
            if pending is not None:
                _reshard(writer, *pending)
            if pw is None:
                empty = pa.schema(
                    [selection.table.schema.field(c) for c in columns]
                    + (
                        [pa.field(cfg.score_name, pa.float64())]
                        if cfg.score_name not in columns
                        else []
                    )
                )
                pw = pq.ParquetWriter(f, empty)
            pw.close()
    except BaseException:
        writer.abort()
        raise
    writer.close()
    n_shards, sizes = len(writer.shards), writer.sizes

    n_uids = save_uid_halves(join(out, "uids.npy"), uid_hi, uid_lo)
    pattern = brace_pattern(shards_dir, 0, n_shards - 1) if n_shards else ""
    rule: dict[str, Any] = {"kind": cfg.rule, **cfg.to_dict()}
    manifest = {
        "rule": rule,
        "score": cfg.score_name,
        "rows_in_table": selection.rows,
        "rows_ok": selection.rows_ok,
        "rows_error": selection.rows_error,
        "rows_scorable": selection.scorable,
        "kept": kept,
        "unique_uids": n_uids,
        "threshold": float(min_score) if kept else None,
        "selection": {**selection.info, "in_memory": selection.in_memory},
        "shards": n_shards,
        "sizes": sizes,
        "train_data": pattern,
        "train_num_samples": sum(sizes.values()),
        "open_clip_args": f"--dataset-type webdataset --train-data '{pattern}' "
        f"--train-num-samples {sum(sizes.values())}",
        "note": "open_clip needs at least workers x world_size shards; set --shard-size accordingly",
        "seconds": round(time.time() - t0, 2),
    }
    write_json(join(out, "manifest.json"), manifest)
    run.update_run_json(f"prune/{cfg.manifest_name}", {"config": cfg.to_dict(), "kept": kept})
    return {**manifest, "dir": out}


def _uid_halves(uids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    hi = np.fromiter((int(u[:16], 16) for u in uids), dtype=np.uint64, count=len(uids))
    lo = np.fromiter((int(u[16:32], 16) for u in uids), dtype=np.uint64, count=len(uids))
    return hi, lo


def _reshard(writer: ShardWriter, shard: str, keys: set[str]) -> None:
    """Copy the kept samples of one input shard, every member byte for byte, in tar order."""
    seen: set[str] = set()
    try:
        for key, members in iter_raw(shard):
            if key in keys and key not in seen:  # a repeated key was an error row
                writer.write(_safe_key(key), members)
                seen.add(key)
                if len(seen) == len(keys):
                    break
    except ShardReadError:
        pass  # damage after the samples we need is checked below
    if seen != keys:
        raise RuntimeError(f"{shard}: {len(keys - seen)} kept samples could not be re-read")


def _safe_key(key: str) -> str:
    # WebDataset keys may contain '/' (sub-directories in the tar); flatten them.
    return key.replace("/", "_").replace(".", "_")
