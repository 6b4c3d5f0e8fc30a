"""Select the kept rows and write the manifest of DESIGN.md.

RUN/prune/NAME/shards/{00000..0NNNN}.tar + sizes.json   resharded kept samples, all members
RUN/prune/NAME/uids.npy                                  DataComp subset format
RUN/prune/NAME/keep.parquet                              kept uids, keys, scores
RUN/prune/NAME/manifest.json                             rule, counts, --train-data
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline.data.reader import ShardReadError, iter_raw
from pipeline.data.tarwriter import ShardWriter, brace_pattern
from pipeline.errors import ConfigError
from pipeline.prune.config import PruneConfig
from pipeline.prune.datacomp import save_uids
from pipeline.rundir import RunDir, exists, join, write_json
from pipeline.score.table import read_table, write_table


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
    cfg.validate()
    t0 = time.time()
    run = RunDir(cfg.run)
    if not exists(run.scores):
        raise ConfigError(f"run: no score table at {run.scores} (run `diffin score` first)")
    table = read_table(run.scores)
    kept = select(table, cfg.method, cfg.keep)
    out = run.prune_dir(cfg.manifest_name)
    fs, path = fsspec.core.url_to_fs(out)
    if fs.exists(path):
        fs.rm(path, recursive=True)  # a rerun replaces the manifest whole
    fs.makedirs(path, exist_ok=True)

    wanted: OrderedDict[str, set[str]] = OrderedDict()
    for shard, key in zip(
        kept.column("shard").to_pylist(), kept.column("key").to_pylist(), strict=True
    ):
        wanted.setdefault(shard, set()).add(key)
    shards_dir = join(out, "shards")
    written: list[str] = []
    with ShardWriter(shards_dir, cfg.shard_size) as writer:
        for shard, keys in tqdm(wanted.items(), desc="reshard", unit="shard"):
            seen: set[str] = set()
            try:
                for key, members in iter_raw(shard):
                    if key in keys and key not in seen:  # a repeated key was an error row
                        writer.write(_safe_key(key), members)
                        seen.add(key)
                        written.append(key)
                        if len(seen) == len(keys):
                            break
            except ShardReadError:
                pass  # damage after the samples we need is checked below
            if seen != keys:
                raise RuntimeError(f"{shard}: {len(keys - seen)} kept samples could not be re-read")
    n_shards, sizes = len(writer.shards), writer.sizes

    n_uids = save_uids(join(out, "uids.npy"), kept.column("uid").to_pylist())
    write_table(
        kept.select(["uid", "key", "shard", "index", cfg.method]), join(out, "keep.parquet")
    )
    scores = kept.column(cfg.method).to_numpy(zero_copy_only=False)
    statuses = table.column("status").to_pylist()
    pattern = brace_pattern(shards_dir, 0, n_shards - 1) if n_shards else ""
    manifest = {
        "rule": {"kind": "fraction", **cfg.to_dict()},
        "rows_in_table": table.num_rows,
        "rows_ok": statuses.count("ok"),
        "rows_error": statuses.count("error"),
        "kept": kept.num_rows,
        "unique_uids": n_uids,
        "threshold": float(scores.min()) if len(scores) else None,
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
    run.update_run_json(
        f"prune/{cfg.manifest_name}", {"config": cfg.to_dict(), "kept": kept.num_rows}
    )
    return {**manifest, "dir": out}


def _safe_key(key: str) -> str:
    # WebDataset keys may contain '/' (sub-directories in the tar); flatten them.
    return key.replace("/", "_").replace(".", "_")
