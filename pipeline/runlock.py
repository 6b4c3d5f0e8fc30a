"""One writer per stage in a run directory: RUN/locks/NAME.lock (local) or NAME.json (stores).

Two `diffin train` on one run overwrite each other's checkpoints; a `score`
during a `train` scores checkpoints that are being replaced; two `score` runs
write the same parts and records. A stage therefore holds its lock for as long
as it writes, and refuses to start, before any work, while a conflicting one is
held (``CONFLICTS``). Stages that only add files of their own under an atomic
rename (prune's manifests) or only read (status) take none.

Local paths (NFS included) use ``flock``: the kernel drops the lock when the
holder dies, even by ``kill -9``, so a lock is never stale. Object stores have
no locks, so the holder writes a *lease* (its owner id, host, pid, and a
heartbeat renewed every ``ttl/4`` seconds by a thread) with an exclusive
create where the store honours one (S3's If-None-Match); a lease whose
heartbeat is older than ``ttl`` belongs to a dead process and is taken over. Taking
over is best effort: two processes that find the same stale lease at the same
instant may both start. The holder's identity is in the file, so a refusal
names it, and `diffin status` says which stage is under way now.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import StageFailed

log = logging.getLogger(__name__)

# Which held lock stops which stage from starting.
CONFLICTS: dict[str, frozenset[str]] = {
    "train": frozenset({"train", "score"}),  # train and import write the trajectory
    "score": frozenset({"score", "train"}),  # reads the trajectory, writes scores/
    "evaluate": frozenset({"evaluate"}),  # RUN/evaluate
    "report": frozenset({"report"}),  # RUN/report
}
LEASE_TTL_S = 120.0

# Names this process holds (the demo holds several): flock locks are per open file, so
# this process asking about its own lock would see it as someone else's.
_HELD: dict[str, set[str]] = {}


class RunBusy(StageFailed):
    """Another process holds a lock that this stage conflicts with."""


def _locks_dir(run_url: str) -> str:
    return run_url.rstrip("/") + "/locks"


def _identity(stage: str, command: str, owner: str) -> dict[str, Any]:
    now = time.time()
    return {
        "stage": stage,
        "command": command,
        "owner": owner,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": now,
        "heartbeat": now,
    }


def _when(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_holder(info: dict[str, Any]) -> str:
    """'diffin score (pid 12, host h, started 2026-... UTC, 35 s ago)'."""
    started = info.get("started")
    since = (
        f", started {_when(started)}, {max(0.0, time.time() - started):.0f} s ago"
        if isinstance(started, int | float)
        else ""
    )
    return (
        f"diffin {info.get('command') or info.get('stage', '?')} "
        f"(pid {info.get('pid', '?')} on {info.get('host', '?')}{since})"
    )


# -- local: flock -----------------------------------------------------------------------


class _LocalLock:
    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, info: dict[str, Any]) -> dict[str, Any] | None:
        """None once held; else the holder's identity."""
        while True:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the locks folder went with a release: again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                return _read_local(self.path) or {"stage": os.path.basename(self.path)}
            # The holder before us unlinks its file on release: a lock on an unlinked
            # file guards nothing, so make sure ours is the file at the path.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
            self.fd = fd
            return None

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still held: see acquire
        os.close(self.fd)
        self.fd = None
        folder = os.path.dirname(self.path)
        _sweep(folder)
        with contextlib.suppress(OSError):  # not empty: another stage's lock
            os.rmdir(folder)


def _sweep(folder: str) -> None:
    """Remove the lock files of processes killed outright (nobody holds them): unlinked
    under a lock of our own, which :meth:`_LocalLock.acquire` allows for."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(path)
            except OSError:
                pass  # held: a live stage's
            finally:
                os.close(fd)


def _read_local(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None


def _local_holder(path: str) -> dict[str, Any] | None:
    """The identity of a live holder of ``path``, or None when no process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read_local(path) or {"stage": os.path.basename(path).removesuffix(".lock")}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# -- object stores: leases ----------------------------------------------------------------


def _read_lease(fs: Any, path: str) -> dict[str, Any] | None:
    fs.invalidate_cache(path.rsplit("/", 1)[0])
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except ValueError:  # half a lease from a store without atomic puts: someone's
        return {"heartbeat": time.time()}


def _live(lease: dict[str, Any] | None, ttl: float) -> bool:
    if lease is None:
        return False
    beat = lease.get("heartbeat")
    return not isinstance(beat, int | float) or time.time() - beat < ttl


def _create(fs: Any, path: str, data: bytes) -> bool:
    """Write ``data`` at ``path`` unless something is there; False if it was."""
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    except (TypeError, NotImplementedError, ValueError):  # no exclusive create here
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
    return True


class _Lease:
    def __init__(self, fs: Any, path: str, ttl: float) -> None:
        self.fs, self.path, self.ttl = fs, path, ttl
        self.info: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, info: dict[str, Any]) -> dict[str, Any] | None:
        for _ in range(2):
            if _create(self.fs, self.path, json.dumps(info).encode()):
                # a store that ignored the exclusive create lets the last writer win
                now = _read_lease(self.fs, self.path)
                if now is not None and now.get("owner") != info["owner"]:
                    return now
                self.info = info
                self._thread = threading.Thread(
                    target=self._renew, name=f"diffin-lease-{info['stage']}", daemon=True
                )
                self._thread.start()
                return None
            held = _read_lease(self.fs, self.path)
            if _live(held, self.ttl):
                return held
            if held is not None:
                log.warning(
                    "taking over the lease of %s: not renewed for %.0f s (its process is gone)",
                    describe_holder(held),
                    time.time() - held.get("heartbeat", 0),
                )
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)
        return _read_lease(self.fs, self.path) or {"stage": info["stage"]}

    def _renew(self) -> None:
        assert self.info is not None
        while not self._stop.wait(self.ttl / 4):
            try:
                held = _read_lease(self.fs, self.path)
                if held is not None and held.get("owner") != self.info["owner"]:
                    log.error(
                        "the lease of this %s was taken over by %s (not renewed for %.0f s): "
                        "both may now write to the run",
                        self.info["stage"],
                        describe_holder(held),
                        self.ttl,
                    )
                    return
                self.info["heartbeat"] = time.time()
                self.fs.pipe_file(self.path, json.dumps(self.info).encode())
            except Exception as exc:  # noqa: BLE001 (a network blip: try again next beat)
                log.warning("could not renew the lease %s: %s", self.path, exc)

    def release(self) -> None:
        if self.info is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with contextlib.suppress(Exception):
            held = _read_lease(self.fs, self.path)
            if held is not None and held.get("owner") == self.info["owner"]:
                self.fs.rm_file(self.path)
        self.info = None


# -- the interface ------------------------------------------------------------------------


def holders(run_url: str, ttl: float = LEASE_TTL_S) -> dict[str, dict[str, Any]]:
    """The locks held now in ``run_url`` (by any process, this one included): name -> the
    holder's identity (stage, command, host, pid, started)."""
    fs, path = fsspec.core.url_to_fs(_locks_dir(run_url))
    out: dict[str, dict[str, Any]] = {}
    for name in CONFLICTS:
        if isinstance(fs, LocalFileSystem):
            info = _local_holder(f"{path}/{name}.lock")
            if info is None and name in _HELD.get(os.path.realpath(path), set()):
                info = {"stage": name, "pid": os.getpid()}
        else:
            info = _read_lease(fs, f"{path}/{name}.json")
            info = info if _live(info, ttl) else None
        if info is not None:
            out[name] = info
    return out


@contextlib.contextmanager
def hold(
    run_url: str, names: Sequence[str], command: str, ttl: float = LEASE_TTL_S
) -> Iterator[None]:
    """Hold the locks ``names`` of ``run_url`` while the block runs; raise :class:`RunBusy`,
    holding none, if any of them or any lock they conflict with is held elsewhere."""
    fs, path = fsspec.core.url_to_fs(_locks_dir(run_url))
    local = isinstance(fs, LocalFileSystem)
    key = os.path.realpath(path) if local else fs.unstrip_protocol(path)
    run_existed = not local or os.path.isdir(os.path.dirname(path))
    mine = _HELD.setdefault(key, set())
    owner = uuid.uuid4().hex
    taken: list[Any] = []
    try:
        for name in names:
            if name in mine:
                continue
            lock: Any = (
                _LocalLock(f"{path}/{name}.lock")
                if local
                else _Lease(fs, f"{path}/{name}.json", ttl)
            )
            holder = lock.acquire(_identity(name, command, owner))
            if holder is not None:
                raise _busy(run_url, command, holder)
            taken.append((name, lock))
            mine.add(name)
        # ours first, then the others': two conflicting stages starting at once both
        # refuse rather than both start
        others = set().union(*(CONFLICTS[n] for n in names)) - mine
        held = holders(run_url, ttl)
        for name in sorted(others & held.keys()):
            raise _busy(run_url, command, held[name])
    except BaseException:
        _release(taken, mine, path if local and not run_existed else None)
        raise
    try:
        yield
    finally:
        _release(taken, mine, path if local and not run_existed else None)


def _release(taken: list[Any], mine: set[str], created_run: str | None) -> None:
    for name, lock in reversed(taken):
        lock.release()
        mine.discard(name)
    if created_run is not None:  # made only to hold the lock: a refused stage leaves nothing
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(created_run))


def _busy(run_url: str, command: str, holder: dict[str, Any]) -> RunBusy:
    lease = ""
    if isinstance(holder.get("heartbeat"), int | float) and not is_local_run(run_url):
        lease = (
            f"; its lease was renewed {max(0.0, time.time() - holder['heartbeat']):.0f} s ago, "
            f"and one not renewed for {LEASE_TTL_S:.0f} s is taken over"
        )
    return RunBusy(
        f"{run_url} is in use by {describe_holder(holder)}{lease}. `diffin {command}` would "
        f"overwrite its files or read them half-written: wait for it to finish (diffin status "
        f"--run {run_url}), or stop it"
    )


def is_local_run(run_url: str) -> bool:
    return isinstance(fsspec.core.url_to_fs(run_url)[0], LocalFileSystem)
