"""The retrainings an evaluation has finished, kept until the evaluation is written.

`diffin evaluate` trains one model per subset and seed, hours of work at
scale, and writes its results only at the end. Each finished model's row is
written at once to ``RUN/evaluate-partial/KEY.json``; a rerun after a crash,
a kill or Ctrl-C takes the rows whose key it computes again instead of
training those models again. The key is a hash of everything the row follows
from: the proxy trajectory, the training settings, the seed, the subset's
uids and the held-out sources. Torch's thread count is left out (it changes
float rounding only), as a training's resume leaves it out. The folder is
removed once the evaluation is in place; rows of other settings are removed
with it. ``request.json`` beside the rows holds the options of the evaluation
that wrote them, for `diffin status` to print the command that resumes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import fsspec
import torch

from pipeline.data.shards import shard_stamps
from pipeline.rundir import RunDir, exists, join, read_json, remove, write_json

# The retraining and measuring code's version: rows saved by another one are not reused.
VERSION = "evaluate-row-v1"


def partial_dir(run: RunDir) -> str:
    return run.path("evaluate-partial")


def row_key(**parts: Any) -> str:
    """A stable hash of ``parts`` (JSON values; lists of uids are hashed as given)."""
    text = json.dumps({"version": VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def uids_digest(uids: Any) -> str:
    return hashlib.sha256("\n".join(sorted(str(u) for u in uids)).encode()).hexdigest()


def files_identity(urls: list[str]) -> str:
    """A hash of each file's size and version (data/shards.py's stamps: the ETag on object
    stores, the modification time on a disk), one listing per folder: a file rewritten in
    place under the same name is another input (review: rows measured with other zero-shot
    templates were taken)."""
    stamps = shard_stamps(urls)
    text = json.dumps([[u, stamps[u]] for u in urls], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _as_bytes(t: Any) -> Any:
    """A tensor's bytes as a flat uint8 numpy array (bf16 and empty tensors too)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def tensors_digest(*tensors: Any) -> str:
    """A hash of tensors' dtypes, shapes and bytes (None counted as such): the held-out set
    as it was read and encoded. File stamps miss a file rewritten with the same size and
    modification time (a copy that keeps times, a coarse clock; walkthrough)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none;")
            continue
        h.update(f"{t.dtype}{list(t.shape)};".encode())
        h.update(_as_bytes(t))
    return h.hexdigest()


def row_digests(*tensors: Any) -> list[bytes]:
    """A hash per row (the first dimension) of equally long tensors: the pool as read. A
    subset's rows are hashed from these (:func:`subset_digest`), so that a subset's key
    does not change with the others (review: one hash of the whole pool trained every
    model again after a keep was added)."""
    n = len(tensors[0])
    rows = [_as_bytes(t).reshape(n, -1) for t in tensors]
    head = "".join(f"{t.dtype}{list(t.shape[1:])};" for t in tensors).encode()
    return [
        hashlib.sha256(head + b"".join(r[i].tobytes() for r in rows)).digest() for i in range(n)
    ]


def subset_digest(rows: list[bytes], idx: Any) -> str:
    return hashlib.sha256(b"".join(rows[int(i)] for i in idx)).hexdigest()


def _plain(v: Any) -> Any:
    """A JSON value: numpy scalars as Python numbers (NaN stays: json writes and reads it)."""
    return v.item() if hasattr(v, "item") else v


class FinishedRows:
    """Rows of finished retrainings, by key."""

    def __init__(self, run: RunDir) -> None:
        self.dir = partial_dir(run)
        self.request: str | None = None  # the hash of the options the rows are written under

    def _url(self, key: str) -> str:
        return join(self.dir, f"{key}.json")

    def get(self, key: str) -> dict[str, Any] | None:
        url = self._url(key)
        try:
            if not exists(url):
                return None
            record = read_json(url)
        except (OSError, ValueError):  # cut short: trained again
            return None
        if not isinstance(record, dict) or record.get("key") != key:
            return None
        row, columns = record.get("row"), record.get("columns")
        if not isinstance(row, dict) or not isinstance(columns, list) or set(columns) != set(row):
            return None
        return {c: row[c] for c in columns}

    def put(self, key: str, row: dict[str, Any]) -> None:
        # the columns' order too: write_json sorts keys (review: results.parquet came back
        # with its columns in alphabetical order)
        row = {k: _plain(v) for k, v in row.items()}
        record = {"key": key, "columns": list(row), "row": row, "request": self.request}
        write_json(self._url(key), record)

    def save_request(self, config: dict[str, Any]) -> None:
        self.request = request_hash(config)
        write_json(join(self.dir, "request.json"), config)

    def clear(self) -> None:
        remove(self.dir, recursive=True)


def request_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def unfinished(run: RunDir) -> dict[str, Any] | None:
    """{"models": rows kept by the evaluation of these options, "other": rows kept of other
    options, "config": the options of the last evaluation that wrote rows}, for an evaluation
    that did not finish; None where there is none. Rows of other options stay (a rerun of
    those takes them) but the command offered does not (walkthrough: they were counted as
    rows it would take)."""
    request = join(partial_dir(run), "request.json")
    try:
        if not exists(request):
            return None
        config = read_json(request)
        fs, path = fsspec.core.url_to_fs(partial_dir(run))
        fs.invalidate_cache()
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except (OSError, ValueError):
        return None
    wanted = request_hash(config) if isinstance(config, dict) else None
    rows = [f"{path}/{n}" for n in names if n.endswith(".json") and n != "request.json"]
    try:  # at once: concurrent requests on an object store (review: one GET per row)
        blobs = fs.cat(rows, on_error="omit") if rows else {}
    except OSError:
        return None
    models = other = 0
    for raw in blobs.values():  # those removed as the evaluation finished are omitted
        try:
            record = json.loads(raw)
        except ValueError:  # cut short: trained again
            record = None
        if isinstance(record, dict) and record.get("request") == wanted:
            models += 1
        else:
            other += 1
    return {"models": models, "other": other, "config": _checked(config)}


def _checked(config: Any) -> dict[str, Any] | None:
    """The options as evaluate would take them; None for a request it would refuse."""
    from pipeline.errors import ConfigError
    from pipeline.evaluation.config import EvaluateConfig

    known = {f.name for f in dataclasses.fields(EvaluateConfig)}
    try:
        cfg = EvaluateConfig(**{k: v for k, v in config.items() if k in known})
        cfg.validate()
    except (AttributeError, TypeError, ValueError, ConfigError):
        return None
    return cfg.to_dict()
