"""One writer per stage in a run directory: RUN/locks/NAME.lock (local) or NAME.json (stores).

Two `diffin train` on one run overwrite each other's checkpoints; a `score`
during a `train` scores checkpoints that are being replaced; two `score` runs
write the same parts and records. Each stage therefore holds its lock from the
end of its config checks until it returns, and refuses to start while a
conflicting one is held (``CONFLICTS``). Stages that only add files of their
own under an atomic rename (prune's manifests) or only read (status) take
none; run.json, which every stage updates, has a short lock of its own
(:func:`run_json_lock`).

Local paths (NFS included, where it locks across hosts) use ``flock``: the
kernel drops the lock when the holder dies, even by ``kill -9``, so a lock is
never stale. The lock files stay in RUN/locks/ (removing them would race with a
process opening them), except in a run folder the lock itself created: a
refused first stage leaves no empty run behind. Object stores have no locks,
so the holder writes a *lease* (owner id, host, pid, and a heartbeat renewed
every ``ttl/4`` seconds by a thread) with an exclusive create where the store
honours one (S3's If-None-Match). A lease not renewed for ``ttl`` seconds
belongs to a dead process and is taken over; ages compare the holder's clock
with the reader's, so hosts must keep their clocks within a minute (NTP). A
holder that finds its lease taken over (it was stalled for longer than ``ttl``)
stops, as Ctrl-C stops a stage, rather than write beside the new holder.
Taking over a stale lease is best effort: two processes that find the same
stale lease at the same instant may both start.
"""

from __future__ import annotations

import _thread
import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import ConfigError, StageFailed

log = logging.getLogger(__name__)

# Which held lock stops which stage from starting.
CONFLICTS: dict[str, frozenset[str]] = {
    "train": frozenset({"train", "score"}),  # train and import write the trajectory
    "score": frozenset({"score", "train"}),  # reads the trajectory, writes scores/
    "evaluate": frozenset({"evaluate"}),  # RUN/evaluate
    "report": frozenset({"report"}),  # RUN/report
}
LEASE_TTL_S = 120.0
# How long a local lock is tried before the stage is refused: other processes take it
# for an instant to ask whether it is held (`diffin status`, a starting stage).
LOCAL_PATIENCE_S = 2.0

# Names held in this process, by the thread holding them (the demo holds every stage's,
# then calls the stages): flock locks are per open file, so the demo's stages asking for
# its locks would be refused.
_HELD: dict[str, dict[str, int]] = {}

# Set once a lease of this process was lost (taken over): its stage stops, and writes no
# record of how it stopped over the new holder's (review).
LOST = threading.Event()


def mine(run_url: str) -> set[str]:
    """The lock names this process holds on ``run_url``."""
    fs, path = fsspec.core.url_to_fs(_locks_dir(run_url))
    return set(_HELD.get(_key(fs, path), {}))


class RunBusy(StageFailed):
    """Another process holds a lock that this stage conflicts with."""


def _locks_dir(run_url: str) -> str:
    return run_url.rstrip("/") + "/locks"


def _machine() -> str | None:
    """This boot of this kernel, and this pid namespace: where a pid names one process.
    (A hostname does not: containers on host networking share the host's.)"""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _identity(stage: str, command: str, owner: str, lease: bool) -> dict[str, Any]:
    now = time.time()
    info = {
        "stage": stage,
        "command": command,
        "owner": owner,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "machine": _machine(),
        "started": now,
    }
    return {**info, "heartbeat": now} if lease else info


def _gone(info: dict[str, Any]) -> bool:
    """A holder that ran here (same boot, same pid namespace) and whose pid is gone: its
    lease need not wait out its time (walkthrough: a killed stage kept an S3 run for two
    minutes). A live pid, even another process's, keeps it."""
    pid = info.get("pid")
    if not isinstance(pid, int) or info.get("machine") is None or info["machine"] != _machine():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: alive
        return False
    return False


def _when(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_holder(info: dict[str, Any]) -> str:
    """'diffin score (pid 12 on host, started 2026-... UTC, 35 s ago)'."""
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


def lease_note(info: dict[str, Any], ttl: float = LEASE_TTL_S) -> str:
    """A word on a lease that has missed its renewals ('' for a lock, or one renewed):
    its holder stops itself after ttl/2 without one, and a stage started then waits
    until ttl before it takes the lease over (`diffin status` said nothing of it)."""
    beat = info.get("heartbeat")
    if not isinstance(beat, int | float) or time.time() - beat < ttl / 2:
        return ""
    return (
        f" [lease not renewed for {time.time() - beat:.0f} s: its process has stopped or "
        f"stalled; a stage started now takes the lease over once it is {ttl:.0f} s old]"
    )


# -- local: flock -----------------------------------------------------------------------

_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
_GONE = (errno.ENOENT, errno.ESTALE)  # the file was removed under us (a created run's)


def _no_access(path: str, exc: OSError) -> StageFailed:
    return StageFailed(
        f"cannot lock {path} ({exc.strerror}): the stage must be able to write the run "
        "folder, RUN/locks included (a run shared between users needs a group-writable "
        "folder: chmod -R g+w, umask 002)"
    )


class _LocalLock:
    def __init__(self, path: str, created: list[str]) -> None:
        self.path = path
        self.created = created  # folders the lock made (the run's own, its parents)
        self.fd: int | None = None

    def acquire(self, info: dict[str, Any], patience: float) -> dict[str, Any] | None:
        """None once held; else the holder's identity."""
        deadline = time.monotonic() + patience
        while True:
            try:
                fd = self._open()
            except FileNotFoundError as exc:  # a released created run took the folder
                if time.monotonic() < deadline:
                    continue
                raise _no_access(self.path, exc) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in _GONE and time.monotonic() < deadline:
                    continue
                if exc.errno not in _BUSY:  # EBADF: NFS locks a read-only file for none
                    raise _no_access(self.path, exc) from exc
                if time.monotonic() < deadline:  # maybe someone asking, for an instant
                    time.sleep(0.05)
                    continue
                return _read_local(self.path) or {"stage": _stage_of(self.path)}
            # A created run's lock file is unlinked at release: a lock on an unlinked file
            # guards nothing, so make sure ours is the file at the path.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except OSError:
                same = False
            if not same:
                os.close(fd)
                continue
            with contextlib.suppress(OSError):  # read-only: the identity goes unsaid
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(info).encode())
            self.fd = fd
            return None

    def _open(self) -> int:
        folder = os.path.dirname(self.path)
        missing = []
        where = folder
        while not os.path.isdir(where):
            missing.append(where)
            where = os.path.dirname(where)
        try:
            os.makedirs(folder, exist_ok=True)
            for made in reversed(missing):
                if made not in self.created:
                    self.created.append(made)
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except PermissionError as exc:  # another user's lock file: flock needs no write
                try:
                    return os.open(self.path, os.O_RDONLY)
                except FileNotFoundError:  # none, and a folder we may not write (review)
                    raise _no_access(self.path, exc) from exc
        except PermissionError as exc:
            raise _no_access(self.path, exc) from exc
        except (NotADirectoryError, FileExistsError) as exc:  # a file where a folder goes
            run = os.path.dirname(folder)
            raise ConfigError(
                f"run: {run} cannot be a run folder ({exc.strerror}: {exc.filename})"
            ) from exc

    def release(self) -> None:
        if self.fd is None:
            return
        folder = os.path.dirname(self.path)
        if os.path.dirname(folder) in self.created:  # the run folder was made for the lock
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still held: see acquire
        else:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)  # no identity of a holder that has gone
        os.close(self.fd)
        self.fd = None


def _stage_of(path: str) -> str:
    return os.path.basename(path).removesuffix(".lock").removesuffix(".json")


def _read_local(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _local_holder(path: str) -> dict[str, Any] | None:
    """The identity of a live holder of ``path``, or None when no process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in _BUSY:
            return None
        return _read_local(path) or {"stage": _stage_of(path)}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_json_lock(run_url: str, timeout: float = 60.0) -> Iterator[None]:
    """Hold run.json for one read-modify-write (evaluate may finish beside a score, prune
    takes no stage lock). Local paths only: on object stores the update stays a
    read-modify-write, as their other records are."""
    fs, path = fsspec.core.url_to_fs(_locks_dir(run_url))
    fd = None
    if isinstance(fs, LocalFileSystem) and os.path.isdir(os.path.dirname(path)):
        try:
            os.makedirs(path, exist_ok=True)
            fd = os.open(f"{path}/run-json.lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:  # a run the user may not lock: written as before
            fd = None
    try:
        deadline = time.monotonic() + timeout
        while fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in _BUSY or time.monotonic() > deadline:
                    # hours of training must not end in a traceback here
                    log.warning("run.json: not locked (%s); written anyway", exc)
                    break
                time.sleep(0.02)
        yield
    finally:
        if fd is not None:
            os.close(fd)


# -- object stores: leases ----------------------------------------------------------------


def _read_lease(fs: Any, path: str) -> dict[str, Any] | None:
    """The lease at ``path``; one that does not read as a lease is aged by the store's
    modification time, so that it too is taken over once nothing renews it."""
    fs.invalidate_cache(path.rsplit("/", 1)[0])
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        info = None
    if isinstance(info, dict) and isinstance(info.get("heartbeat"), int | float):
        return info
    try:
        beat = fs.modified(path).timestamp()
    except Exception:  # noqa: BLE001 (a store that does not say: treat it as stale)
        beat = 0.0
    return {"stage": _stage_of(path), "heartbeat": beat, "unreadable": path}


def _live(lease: dict[str, Any] | None, ttl: float) -> bool:
    return lease is not None and time.time() - lease["heartbeat"] < ttl and not _gone(lease)


def _create(fs: Any, path: str, data: bytes) -> bool:
    """Write ``data`` at ``path`` unless something is there; False if it was."""
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False
    except Exception as exc:  # noqa: BLE001 (botocore's, for each store's own answer)
        # a race of two conditional writes (409), a store without them (501, or an s3fs
        # that passes mode= on to botocore): what is there now tells
        log.debug("exclusive create of %s: %s", path, exc)
    if _read_lease(fs, path) is not None:
        return False
    fs.pipe_file(path, data)
    return True


class _Lease:
    def __init__(self, fs: Any, path: str, ttl: float) -> None:
        self.fs, self.path, self.ttl = fs, path, ttl
        self.info: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, info: dict[str, Any], patience: float) -> dict[str, Any] | None:
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
            held = self._wait_out(_read_lease(self.fs, self.path))
            if _live(held, self.ttl):
                return held
            if held is not None:
                age = time.time() - held["heartbeat"]
                log.warning(
                    "taking over the lease %s of %s: %s",
                    self.path,
                    describe_holder(held),
                    "its process is gone"
                    if age < self.ttl
                    else f"not renewed for {age:.0f} s (its process is gone, or stalled: a "
                    "stalled one stops when it finds the lease taken)",
                )
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)
        return _read_lease(self.fs, self.path) or {"stage": info["stage"]}

    def _wait_out(self, held: dict[str, Any] | None) -> dict[str, Any] | None:
        """A live lease that has missed renewals (older than ttl/2: its holder stops
        itself there) is waited out, up to ttl; a retried job (KubeRay's backoffLimit)
        then takes over the lease of the driver that was killed, instead of failing."""
        if not _live(held, self.ttl) or time.time() - held["heartbeat"] < self.ttl / 2:
            return held
        log.warning(
            "waiting up to %.0f s for the lease %s of %s: not renewed for %.0f s",
            self.ttl - (time.time() - held["heartbeat"]),
            self.path,
            describe_holder(held),
            time.time() - held["heartbeat"],
        )
        beat = held["heartbeat"]
        while _live(held, self.ttl) and held["heartbeat"] == beat:
            time.sleep(min(5.0, self.ttl / 20))
            held = _read_lease(self.fs, self.path)
        return held

    def _renew(self) -> None:
        assert self.info is not None
        renewed = time.time()
        while not self._stop.wait(self.ttl / 4):
            try:
                held = _read_lease(self.fs, self.path)
                if held is not None and held.get("owner") != self.info["owner"]:
                    self._lost(f"it was taken over by {describe_holder(held)}")
                    return
                if self._stop.is_set():  # released meanwhile: write nothing after it
                    return
                beat = time.time()
                self.fs.pipe_file(self.path, json.dumps({**self.info, "heartbeat": beat}).encode())
                renewed = beat
            except Exception as exc:  # noqa: BLE001 (a network blip: try again next beat)
                log.warning("could not renew the lease %s: %s", self.path, exc)
                # half the time a taker waits: stopped before anyone may take over
                if time.time() - renewed > self.ttl / 2:
                    self._lost(f"it could not be renewed for {self.ttl / 2:.0f} s")
                    return

    def _lost(self, why: str) -> None:
        info = self.info
        if info is None or self._stop.is_set():  # released meanwhile: nothing to stop
            return
        log.error(
            "this %s lost its lease on the run (%s): stopping, rather than write beside "
            "another stage",
            info["stage"],
            why,
        )
        if LOST.is_set():  # stopping already (the demo's other leases)
            return
        LOST.set()
        if callable(signal.getsignal(signal.SIGINT)):
            _thread.interrupt_main()  # as Ctrl-C: every stage stops cleanly there
        else:  # SIGINT ignored (a background job of a script): as `kill` instead
            os.kill(os.getpid(), signal.SIGTERM)

    def release(self) -> None:
        if self.info is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():  # a renewal stuck in the store's retries
                log.warning("left the lease %s: its renewal did not stop", self.path)
                self.info = None
                return
        with contextlib.suppress(Exception):
            held = _read_lease(self.fs, self.path)
            if held is not None and held.get("owner") == self.info["owner"]:
                self.fs.rm_file(self.path)
        self.info = None


# -- the interface ------------------------------------------------------------------------


def _key(fs: Any, path: str) -> str:
    return os.path.realpath(path) if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def holders(run_url: str, ttl: float = LEASE_TTL_S) -> dict[str, dict[str, Any]]:
    """The locks held now in ``run_url`` (by any process, this one included): name -> the
    holder's identity (stage, command, host, pid, started)."""
    fs, path = fsspec.core.url_to_fs(_locks_dir(run_url))
    here = _HELD.get(_key(fs, path), {})
    out: dict[str, dict[str, Any]] = {}
    for name in CONFLICTS:
        if isinstance(fs, LocalFileSystem):
            info = _local_holder(f"{path}/{name}.lock")
            if info is None and name in here:
                info = {"stage": name, "pid": os.getpid(), "host": socket.gethostname()}
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
    holding none, if any of them or any lock they conflict with is held elsewhere.

    Locks this process already holds (the demo's, around its stages) are not taken again.
    """
    fs, path = fsspec.core.url_to_fs(_locks_dir(run_url))
    local = isinstance(fs, LocalFileSystem)
    if not any(_HELD.values()):  # a first stage of this process: an earlier loss is done
        LOST.clear()
    held_here = _HELD.setdefault(_key(fs, path), {})
    me = threading.get_ident()
    owner = uuid.uuid4().hex
    created: list[str] = []  # local folders made for the locks, deepest first once sorted
    taken: list[tuple[str, Any]] = []
    try:
        for name in names:
            if held_here.get(name) == me:  # this thread's already (the demo's)
                continue
            lock: Any = (
                _LocalLock(f"{path}/{name}.lock", created)
                if local
                else _Lease(fs, f"{path}/{name}.json", ttl)
            )
            holder = lock.acquire(_identity(name, command, owner, not local), LOCAL_PATIENCE_S)
            if holder is not None:
                raise _busy(run_url, holder, ttl)
            taken.append((name, lock))
            held_here[name] = me
        # ours first, then the others': two conflicting stages starting at once both
        # refuse rather than both start
        others = set().union(*(CONFLICTS[n] for n in names)) - {
            n for n, t in held_here.items() if t == me
        }
        held = holders(run_url, ttl) if others else {}
        for name in sorted(others & held.keys()):
            raise _busy(run_url, held[name], ttl)
    except BaseException:
        _release(taken, held_here, created)
        raise
    try:
        yield
    finally:
        _release(taken, held_here, created)


def _release(taken: list[tuple[str, Any]], held_here: dict[str, int], created: list[str]) -> None:
    for name, _ in taken:  # first: an interrupted release leaves no name held by nobody
        held_here.pop(name, None)
    for _, lock in reversed(taken):
        lock.release()
    # folders made only to hold the lock: a refused or failed first stage leaves none
    for folder in sorted(created, key=len, reverse=True):
        with contextlib.suppress(OSError):  # not empty: the stage wrote there
            os.rmdir(folder)


def _busy(run_url: str, holder: dict[str, Any], ttl: float) -> RunBusy:
    lease = ""
    if holder.get("unreadable"):
        lease = (
            f"; its lease {holder['unreadable']} does not read as one (it is taken over "
            f"{ttl:.0f} s after it was written)"
        )
    elif "heartbeat" in holder:
        lease = (
            f"; its lease was renewed {max(0.0, time.time() - holder['heartbeat']):.0f} s "
            f"ago, and one not renewed for {ttl:.0f} s is taken over"
        )
    return RunBusy(
        f"{run_url} is in use by {describe_holder(holder)}{lease}. Two stages writing one run "
        f"at once would overwrite each other's files: wait for it to finish (diffin status "
        f"--run {run_url}), or stop it (Ctrl-C where it runs, `kill PID` on its host, `ray "
        "job stop JOB` for a Ray job)."
    )
