"""The run directory: every stage reads and writes here (a local path or an fsspec URL).

RUN/run.json                      config, versions, seeds, timing of each stage
RUN/data/                         `diffin demo` only: the generated pool
RUN/trajectory/ckpt-STEP.pt       checkpoints (+ trajectory.json: step, lr, sha256)
RUN/trajectory/resume.pt          an unfinished training's state (gone when it completes)
RUN/trajectory/progress.json      how far it got, for `diffin status` (gone with it)
RUN/sets/*.safetensors            reference negatives R, target V, gradient batches
RUN/directions/STEP.safetensors   g_B, g_V, w per checkpoint
RUN/scores/parts/SHARD.parquet    one part per input shard
RUN/scores/done/SHARD.json        its completion record (+ fingerprint, progress, request.json)
RUN/scores.parquet                the merged table
RUN/prune/NAME/                   one manifest per keep rule
RUN/evaluate/                     retraining comparison (diffin evaluate)
RUN/evaluate-partial/             an unfinished evaluation's finished rows
RUN/evaluate-history/STAMP/       earlier evaluations, set aside by a later one
RUN/report/index.html             the HTML report (diffin report)
RUN/locks/NAME.lock|json         held by a stage while it writes (pipeline/runlock.py)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def is_local(url: str) -> bool:
    fs, _ = fsspec.core.url_to_fs(url)
    return isinstance(fs, LocalFileSystem)


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    # Object-store filesystems answer from cached listings; another process
    # (a Ray worker) may have written the object since.
    fs.invalidate_cache(path.rsplit("/", 1)[0] if "/" in path else path)
    return fs.exists(path)


# Object stores whose first path component is a bucket: an account's resource, made by
# its owner, not by a stage's first write.
BUCKET_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})


def check_bucket(url: str, flag: str) -> None:
    """Refuse, before any work, a ``flag`` URL on an object store that cannot be reached
    (credentials, endpoint) or whose bucket does not exist.

    Walkthrough: a missing credential or a mistyped endpoint gave prune, report and
    make-data a botocore traceback of 60 to 140 lines; and a mistyped bucket was created
    by s3fs on the first write (on AWS, a stray bucket in the account). diffin never
    creates a bucket.
    """
    try:
        fs, path = fsspec.core.url_to_fs(url)
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        if not protocols & BUCKET_STORES:
            return
        # the store's own split: an S3 access point's ARN holds slashes (review)
        split = getattr(fs, "split_path", None)
        bucket = split(path)[0] if split else path.strip("/").split("/", 1)[0]
        if not bucket:
            return
        fs.info(bucket)  # exists() would answer False for a store it cannot reach too
    except FileNotFoundError as exc:
        if not protocols & {"s3", "s3a"}:
            # gcsfs answers an empty bucket it may not describe (objectAdmin) with a
            # listing, empty, so "not found" is no proof there (review)
            log.debug("%s: the bucket of %s was not found, or not described: %s", flag, url, exc)
            return
        raise ConfigError(
            f"{flag}: the bucket {bucket!r} of {url} does not exist; diffin does not create "
            "buckets: create it, or correct the URL"
        ) from exc
    except Exception as exc:  # noqa: BLE001 (whatever the store's client raises: botocore...)
        if isinstance(exc, PermissionError) or re.search(r"\b403\b|Forbidden", str(exc)):
            # credentials that may use objects but not ask about their bucket (GCS's
            # objectAdmin has no storage.buckets.get): the stage's own reads will tell
            log.debug("%s: cannot ask about the bucket of %s (%s)", flag, url, exc)
            return
        first = (str(exc).splitlines() or [""])[0][:200]
        raise ConfigError(
            f"{flag}: {url} cannot be reached ({type(exc).__name__}: {first}); check the "
            "store's credentials and endpoint (AWS_ENDPOINT_URL; docs/data.md)"
        ) from exc


def check_dir_target(url: str, flag: str) -> None:
    """Refuse, before any work, a ``flag`` directory that cannot be one here: a file of
    that name, or a local parent that cannot be created (walkthrough: NotADirectoryError
    after the pool was read and encoded)."""
    fs, path = fsspec.core.url_to_fs(url)
    if fs.isfile(path):
        raise ConfigError(f"{flag}: {url} is a file; {flag} names a directory")
    if isinstance(fs, LocalFileSystem):
        # the nearest folder that exists, the target itself included (review: a writable
        # mount whose parent is not was refused)
        where = Path(path)
        while not where.exists():
            where = where.parent
        if not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag}: cannot create {url} ({where} is not a writable folder)")


def check_apart(url: str, flag: str, kind: str) -> None:
    """Refuse a ``flag`` directory that already holds the other kind: a pool's shards where
    a run directory goes (``kind="run"``), or a run where a pool goes (``kind="pool"``).
    They share file names (``*.parquet``): `make-data --overwrite` in a run directory
    deleted its score table (walkthrough)."""
    fs, path = fsspec.core.url_to_fs(url)
    path = path.rstrip("/")
    if kind == "run" and (
        fs.exists(f"{path}/synth.json")
        or any(p.endswith(".tar") for p in (fs.ls(path, detail=False) if fs.isdir(path) else []))
    ):
        raise ConfigError(
            f"{flag}: {url} holds a pool (.tar shards); a run directory is a folder of its own"
        )
    if kind == "pool" and (fs.exists(f"{path}/run.json") or fs.exists(f"{path}/trajectory.json")):
        raise ConfigError(
            f"{flag}: {url} is a run directory (run.json); a pool goes in a folder of its own"
        )


def move(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``, replacing it (an object store copies, then deletes)."""
    fs, path = fsspec.core.url_to_fs(src)
    fs.mv(path, fsspec.core.url_to_fs(dst)[1])


def makedirs(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def open_atomic(url: str) -> Iterator[IO[bytes]]:
    """A binary file that appears at ``url`` whole, or not at all, when the block ends.

    Local: written to a temporary name beside it, fsynced, renamed. Object
    stores have no rename, but an object becomes visible only when its upload
    completes, so the final name is written directly; on an exception the
    upload is abandoned (``discard`` of fsspec's buffered files: s3fs, gcsfs)
    instead of completed. A store whose files cannot be abandoned (memory://,
    sftp, HDFS)
    is written under a temporary name and moved into place at the end (a
    failed merge published a truncated table there, review). Use this for
    outputs too large to build in memory first.
    """
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    f = fs.open(tmp, "wb")
    if isinstance(f, AbstractBufferedFile):  # an upload (s3fs, gcsfs): nothing until closed
        _abandon(f)
        f = fs.open(path, "wb")
    else:  # memory://'s files are in place from the open, and their discard does nothing
        try:
            yield f
            f.close()
            fs.mv(tmp, path)
        finally:
            if not f.closed:
                f.close()
            with contextlib.suppress(FileNotFoundError):
                if fs.exists(tmp):
                    fs.rm(tmp)
        fs.invalidate_cache(parent or path)
        return
    try:
        yield f
    except BaseException:
        _abandon(f)
        raise
    else:
        f.close()
    # A listing cached before the write would hide the new object.
    fs.invalidate_cache(parent or path)


def _abandon(f: Any) -> None:
    """Drop an object-store upload instead of completing it."""
    f.discard()
    with contextlib.suppress(AttributeError):
        f.closed = True  # s3fs leaves it "open"; its __del__ would upload


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Readers never see a half-written file (see :func:`open_atomic`)."""
    with open_atomic(url) as f:
        f.write(data)


def remove(url: str, recursive: bool = False) -> None:
    """Delete a file or (``recursive``) a directory tree; missing is fine.

    On object stores a "directory" is a prefix: every object under it goes,
    and the cached listings are dropped so later ``exists`` calls are fresh.
    """
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(path)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
    fs.invalidate_cache(path)


def replace_dir(src: str, dst: str, last: str | None = None) -> None:
    """Put the finished directory ``src`` at ``dst``, replacing what was there.

    Local: two renames, so ``dst`` is never half old and half new. Object
    stores have no rename: every file of ``src`` is copied over ``dst``
    (``last``, e.g. the manifest, after all the others), then the files of
    the old ``dst`` that ``src`` does not have are deleted, then ``src``. A
    failure part way leaves ``src`` whole, and ``dst`` with every file of the
    old or the new version, never neither.
    """
    fs, src_path = fsspec.core.url_to_fs(src)
    _, dst_path = fsspec.core.url_to_fs(dst)
    src_path, dst_path = src_path.rstrip("/"), dst_path.rstrip("/")
    if isinstance(fs, LocalFileSystem):
        old = f"{dst_path}.old-{uuid.uuid4().hex[:8]}"
        if os.path.exists(dst_path):
            os.replace(dst_path, old)
        os.replace(src_path, dst_path)
        if os.path.exists(old):
            fs.rm(old, recursive=True)
        return
    fs.invalidate_cache(src_path)
    fs.invalidate_cache(dst_path)
    names = sorted(p[len(src_path) + 1 :] for p in fs.find(src_path))
    names.sort(key=lambda name: name == last)  # stable: ``last`` goes last
    for name in names:
        fs.copy(f"{src_path}/{name}", f"{dst_path}/{name}")  # raises on failure
    keep = {f"{dst_path}/{name}" for name in names}
    stale = [p for p in fs.find(dst_path) if p not in keep] if fs.exists(dst_path) else []
    if stale:
        fs.rm(stale)
    remove(src, recursive=True)
    fs.invalidate_cache(dst_path)


def copy_dir(src: str, dst: str) -> None:
    """Copy the files under ``src`` to the same relative paths under ``dst``."""
    fs, src_path = fsspec.core.url_to_fs(src)
    _, dst_path = fsspec.core.url_to_fs(dst)
    src_path, dst_path = src_path.rstrip("/"), dst_path.rstrip("/")
    fs.invalidate_cache(src_path)
    for path in fs.find(src_path):
        target = f"{dst_path}/{path[len(src_path) + 1 :]}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.copy(path, target)


def leftovers(parent: str, prefixes: tuple[str, ...]) -> list[str]:
    """Entries of ``parent`` whose names start with one of ``prefixes``, sorted.

    A stage writes its result beside its place and swaps it in (:func:`replace_dir`);
    one killed part-way (SIGKILL, a lost node) leaves that build, or the previous
    result set aside, under such a name, where nothing else would ever remove it.
    """
    fs, path = fsspec.core.url_to_fs(parent)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    names = (e.rstrip("/").rpartition("/")[2] for e in entries)
    return sorted(join(parent, n) for n in names if n.startswith(prefixes))


def file_size(url: str) -> int:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(path)
    return int(fs.size(path))


def read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def write_json(url: str, obj: Any) -> None:
    write_bytes_atomic(
        url, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
    )


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def sha256(url: str) -> str:
    h = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class RunDir:
    """Named paths inside one run directory."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def path(self, *parts: str) -> str:
        return join(self.url, *parts)

    @property
    def run_json(self) -> str:
        return self.path("run.json")

    @property
    def trajectory_json(self) -> str:
        return self.path("trajectory", "trajectory.json")

    @property
    def resume_state(self) -> str:
        return self.path("trajectory", "resume.pt")

    def checkpoint(self, step: int) -> str:
        return self.path("trajectory", f"ckpt-{step:06d}.pt")

    def set_file(self, name: str) -> str:
        return self.path("sets", f"{name}.safetensors")

    def directions(self, step: int) -> str:
        return self.path("directions", f"{step:06d}.safetensors")

    @property
    def parts_dir(self) -> str:
        return self.path("scores", "parts")

    def part(self, shard_name: str) -> str:
        return self.path("scores", "parts", f"{shard_name}.parquet")

    @property
    def scores(self) -> str:
        return self.path("scores.parquet")

    def prune_dir(self, name: str) -> str:
        return self.path("prune", name)

    def update_run_json(self, section: str, value: Any) -> None:
        """Record one stage's config and outcome in run.json (read-modify-write, under a
        lock of its own where the run is local: stages may finish together)."""
        from pipeline.runlock import run_json_lock

        with run_json_lock(self.url):
            data = read_json(self.run_json) if exists(self.run_json) else {}
            data[section] = value
            write_json(self.run_json, data)
