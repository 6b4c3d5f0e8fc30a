"""The Ray driver: a pool of scoring actors streams whole shards, then the parts are merged.

Work unit = one input shard. Each actor loads the model, the checkpoints and
the direction vectors once, and decodes the next shard in a background thread
while it scores the current one.

Exactly once: parts have deterministic names and are written atomically, then
a completion record ``RUN/scores/done/NAME.json`` (rows, sha256, fingerprint)
commits them; a part without its record is not trusted. A rerun with the same
inputs scores only the shards without a valid record (resume after a killed
driver). The merge checks every part against its record and refuses a table
whose rows do not add up.

Faults: an actor that dies (killed, its node lost) is replaced and its shard
retried on another actor; a task that raises is retried too. After
``max_attempts`` tries a shard is recorded as failed: its part has one error
row per sample the shard holds (listed without decoding images; the reason
in ``error``), or a single ``__shard__`` row when nothing can be listed, so
the run finishes and rows in = rows out still holds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from pipeline import runlock
from pipeline.data.reader import SHARD_KEY, escape_utf8, iter_shard, retryable, shard_row_uid
from pipeline.data.sample import Sample
from pipeline.data.shards import (
    expected_samples,
    resolve_shards,
    shard_names,
    shard_stamp,
    shard_stamps,
)
from pipeline.errors import ConfigError, StageFailed, field_flag
from pipeline.provenance import provenance
from pipeline.raylocal import check_address, connect, embedded
from pipeline.rundir import RunDir, exists, file_size, move, read_json, remove, write_json
from pipeline.score.config import ScoreConfig
from pipeline.score.directions import (
    DIRECTIONS_VERSION,
    EIGEN_VERSION,
    PROPAGATED_VERSION,
    ensure_directions,
    needs_directions,
    resolve_form,
    resolve_objective,
    self_size,
    set_hashes,
)
from pipeline.score.merge import merge_parts, record_or_problem, write_part
from pipeline.score.progress import Progress
from pipeline.score.reuse import carried, kept_scores, read_part, rerecord, reusable
from pipeline.score.table import build_part, fingerprint_hash, read_table, stale_manifests
from pipeline.score.trajectory import (
    READER_FIELDS,
    Trajectory,
    load_trajectory,
    model_identity,
)
from pipeline.scorers import ScoreContext, depends_on, get_scorers
from pipeline.tensors import tensor_shapes
from pipeline.train.schedule import OPEN_CLIP_SCHEDULE_PARAMS

log = logging.getLogger(__name__)

_END = object()


class _Cancelled(Exception):
    pass


@dataclass
class _Stream:
    """Decoded batches of one shard, produced by the prefetch thread."""

    url: str
    batches: queue.Queue
    cancel: threading.Event
    stamp: dict[str, Any] | None = None  # the shard file's size and version, before reading


class Prefetcher:
    """One background thread that decodes shards, in request order, a few batches ahead.

    At most ``depth`` decoded batches wait per shard, so memory stays bounded
    whatever the shard size; the thread starts on the next shard as soon as
    the current one is decoded, while its last batches are still being scored.
    """

    def __init__(self, batch_size: int, depth: int = 2, reader: dict | None = None) -> None:
        self.batch_size = batch_size
        # iter_shard options: image and text keys, and the model's transform, so
        # that waiting batches hold model inputs, not full-resolution pixels
        self.reader = reader or {}
        self.depth = max(1, depth)
        self.jobs: queue.Queue[_Stream] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="diffin-prefetch", daemon=True)
        self.thread.start()

    def request(self, url: str) -> _Stream:
        stream = _Stream(url, queue.Queue(maxsize=self.depth), threading.Event())
        self.jobs.put(stream)
        return stream

    def _put(self, stream: _Stream, item: Any) -> None:
        while True:
            if stream.cancel.is_set():
                raise _Cancelled
            try:
                stream.batches.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        while True:
            stream = self.jobs.get()
            try:
                # Asked before the first byte is read: a shard rewritten while it is
                # read then differs from its record, and a rerun scores it again.
                stream.stamp = shard_stamp(stream.url)
                batch: list[Sample] = []
                for sample in iter_shard(stream.url, **self.reader):
                    batch.append(sample)
                    if len(batch) == self.batch_size:
                        self._put(stream, batch)
                        batch = []
                if batch:
                    self._put(stream, batch)
                self._put(stream, _END)
            except _Cancelled:
                continue
            except BaseException as exc:  # handed to the consumer, which raises it
                try:
                    self._put(stream, exc)
                except _Cancelled:
                    continue

    @staticmethod
    def batches(stream: _Stream) -> Iterator[list[Sample]]:
        while True:
            item = stream.batches.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class RetryableShardError(RuntimeError):
    """A shard read failed in a way another try may not: the driver retries it."""


def actor_device(gpu_ids: list) -> str:
    """The device of a scoring actor: a GPU only when Ray assigned it one, and one torch
    can use (else a clear error, not torch's own at the first CUDA call)."""
    if not gpu_ids:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            f"the scoring actor holds GPU(s) {gpu_ids} on {ray.util.get_node_ip_address()} "
            "but torch sees no CUDA device there (is the node's NVIDIA driver older than "
            "torch's CUDA build?); --gpus-per-worker 0 scores on CPUs"
        )
    return "cuda"


def actors_that_fit(workers: int, gpus: float, cluster_gpus: float) -> int:
    """How many of ``workers`` actors of ``gpus`` GPUs each a fixed cluster can place at
    once (at least one: a cluster short of even that is refused or reported elsewhere).
    Ray puts a share below 1 on one GPU: the spare quarters of four GPUs hold no 0.75."""
    if not gpus:
        return workers
    per_gpu = math.floor(1 / gpus + 1e-9)  # gpus <= 1 (ScoreConfig)
    return max(1, min(workers, math.floor(cluster_gpus + 1e-9) * per_gpu))


def fitting_share(workers: int, cluster_gpus: float) -> float:
    """The largest share of one GPU that lets ``workers`` actors fit ``cluster_gpus``."""
    return 1 / math.ceil(workers / max(1, math.floor(cluster_gpus + 1e-9)))


def poisons_the_process(exc: BaseException) -> bool:
    """A CUDA error that leaves the process's device context unusable (an illegal memory
    access, a lost device: torch raises them as AcceleratorError); out of memory is not."""
    import torch

    return isinstance(exc, torch.AcceleratorError)


class ScoreActor:
    """Holds one ShardScorer (model, checkpoints, directions loaded once) and a prefetch thread."""

    def __init__(
        self,
        run_url: str,
        cfg: ScoreConfig,
        fingerprint: str,
        method_hashes: dict[str, str] | None = None,
    ) -> None:
        """``method_hashes``: :func:`method_hashes`, recorded with each part so that a
        later run with other --methods keeps its columns; when given, an earlier part's
        columns of the scorers whose hash is unchanged are kept here (score/reuse.py)."""
        from pipeline.score.worker import ShardScorer

        self.scorer = ShardScorer(run_url, cfg, device=actor_device(ray.get_gpu_ids()))
        self.run = RunDir(run_url)
        self.fingerprint = fingerprint
        self.hashes = method_hashes
        self.prefetcher = Prefetcher(
            cfg.batch_size,
            cfg.prefetch_batches,
            {**cfg.reader_options(), "transform": self.scorer.bundle.preprocess},
        )
        self.pending: _Stream | None = None

    def pid(self) -> int:
        return os.getpid()

    def ready(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "node": ray.util.get_node_ip_address(),
            "device": str(self.scorer.device),
        }

    def score(
        self, url: str, name: str, next_url: str | None = None, last_try: bool = True
    ) -> dict[str, Any]:
        """Score one shard, write its part and completion record; start decoding ``next_url``.

        A shard that could not be opened or read to its end (a network error,
        say) raises :class:`RetryableShardError` unless this is its last try,
        so the driver tries it again. On the last try its rows are kept (those
        before the damage, then the ``__shard__`` row) under a "partial"
        record, which a rerun tries again.
        """
        t0 = time.time()
        # before any stream is requested: an error here must not orphan one (review)
        earlier = self._earlier_part(url, name)
        keep = earlier.keep if earlier else []
        stream = self.pending if self.pending is not None and self.pending.url == url else None
        if self.pending is not None and stream is None:
            self.pending.cancel.set()
        self.pending = None
        prefetched = stream is not None
        if stream is None:
            stream = self.prefetcher.request(url)
        if next_url is not None:
            self.pending = self.prefetcher.request(next_url)
        missing = [m for m in self.scorer.cfg.methods if m not in keep]
        samples, scores = self._read_and_score(stream, name, missing if keep else None)
        columns = self.scorer.columns
        held = dict(self.hashes or {})
        if earlier is not None:
            unread = next((s.error for s in samples if retryable(s)), None)
            if unread is not None and keep and not last_try:
                raise RetryableShardError(unread)
            kept = (
                None
                if unread is not None or not same_shard(earlier.record, stream.stamp)
                else kept_scores(earlier.table, samples, earlier.columns)
            )
            if kept is not None:
                scores.update(kept)
                columns = columns + earlier.carried_columns
                held.update(earlier.carry)
            elif keep:
                log.warning(
                    "shard %s %s: scoring it for every scorer, not only for those its "
                    "earlier part lacks",
                    name,
                    "could not be read to its end"
                    if unread is not None
                    else "does not read as it did when its earlier part was scored",
                )
                keep = []
                if self.pending is not None:  # the thread decodes in request order
                    self.pending.cancel.set()
                stream = self.prefetcher.request(url)
                if next_url is not None:
                    self.pending = self.prefetcher.request(next_url)
                samples, scores = self._read_and_score(stream, name, None)
        transient = next((s.error for s in samples if retryable(s)), None)
        if transient is not None and not last_try:
            raise RetryableShardError(transient)
        table = build_part(samples, scores, columns)
        errors = sum(not s.ok for s in samples)
        found = sum(not s.whole_shard for s in samples)
        # corrupt, truncated, not a tar: the rows before the damage are kept, and the
        # shard's own error row says why; the driver names such shards in its summary
        damaged = transient or next((s.error for s in samples if s.whole_shard), None)
        record = write_part(
            table,
            self.run.part(name),
            {
                "status": "partial" if transient else "ok",
                **({"reason": transient} if transient else {}),
                **({"damaged": damaged} if damaged else {}),
                "shard": url,
                "stamp": stream.stamp,
                "name": name,
                "ok": len(samples) - errors,
                "errors": errors,
                "samples": found,
                # What img2dataset says it wrote (its _stats.json), when it is there.
                "expected": expected_samples(url),
                "fingerprint": self.fingerprint,
                **({"methods": held} if held else {}),
                **({"kept": keep} if keep else {}),  # columns taken from the earlier part
                "pid": os.getpid(),
                "node": ray.util.get_node_ip_address(),
                "prefetched": prefetched,
                "seconds": round(time.time() - t0, 3),
            },
        )
        return record

    def _earlier_part(self, url: str, name: str) -> EarlierPart | None:
        """What this shard's earlier part can give this run (score/reuse.py): columns of the
        scorers asked for whose inputs are unchanged (``keep``; not all of them: the
        driver keeps such parts itself) and of scorers not asked for (``carry``). None
        where it gives nothing or cannot be read: the shard is then scored in full."""
        if not self.hashes:
            return None
        try:
            rec = earlier_record(self.run, url, name)
            keep, carry = reusable(rec, self.hashes), carried(rec, self.hashes)
            if len(keep) == len(self.hashes) or not (keep or carry):
                return None
            table = read_part(self.run, name, rec)
        except Exception as exc:  # a store's hiccup: no reuse, not a failed shard
            log.warning("shard %s: its earlier part could not be read (%s)", name, exc)
            return None
        if table is None:
            return None
        asked, there = set(self.scorer.columns), set(table.column_names)
        cols = {m: self.scorer.columns_of(m) for m in carry}
        carry = {  # only scorers whose columns are all there and clash with none asked for
            m: h
            for m, h in carry.items()
            if cols[m] and set(cols[m]) <= there and not set(cols[m]) & asked
        }
        if not (keep or carry):
            return None
        carried_columns = [c for m in carry for c in cols[m]]
        columns = self.scorer.subset(keep)[2] + carried_columns
        return EarlierPart(rec, table, keep, carry, columns, carried_columns)

    def _read_and_score(
        self, stream: _Stream, name: str, methods: list[str] | None
    ) -> tuple[list[Sample], dict[str, Any]]:
        """Every row of ``stream`` and the score columns of ``methods`` (None: all) for
        its ok rows."""
        import numpy as np

        samples: list[Sample] = []
        chunks = []
        try:
            for batch in Prefetcher.batches(stream):
                chunks.append(self.scorer.score_samples(batch, methods))
                for s in batch:  # keep rows, not decoded pixels
                    s.image = None
                samples.extend(batch)
        except Exception as exc:
            if poisons_the_process(exc):
                # Every later CUDA call of this process fails the same way, at once: kept,
                # the actor would take shard after shard and fail them all. Dying, it is
                # replaced by the driver (a fresh process), and the shard tried again there.
                log.error("%s: %s; this scoring actor exits to be replaced", name, exc)
                os._exit(1)
            raise
        finally:
            stream.cancel.set()
        columns = self.scorer.subset(methods)[2]
        scores = {
            c: np.concatenate([ch[c] for ch in chunks]) if chunks else np.zeros(0) for c in columns
        }
        return samples, scores


@dataclass
class EarlierPart:
    """An earlier part of the shard being scored, and what of it this run takes."""

    record: dict[str, Any]
    table: pa.Table
    keep: list[str]  # scorers asked for whose columns are taken as they are
    carry: dict[str, str]  # scorers not asked for ({name: hash}): their columns ride along
    columns: list[str]  # every column taken: the kept scorers', then the carried ones
    carried_columns: list[str]


def steady_rate(finished: list[tuple[float, str, int]]) -> float | None:
    """Samples per second of the actors once started: ``finished`` holds (time, actor,
    rows) per shard back. Each actor's first shard carries its start-up (model
    loading): its rows are left out, and its window opens when that shard is back
    and closes with its last. The rows of the rest are divided by the time covered
    by at least one window (actors that score side by side count once, a replaced
    actor and its replacement one after the other). None when no window is open."""
    by_actor: dict[str, list[tuple[float, int]]] = {}
    for when, actor, rows in sorted(finished):
        by_actor.setdefault(actor, []).append((when, rows))
    windows = sorted((d[0][0], d[-1][0]) for d in by_actor.values() if d[-1][0] > d[0][0])
    covered, end = 0.0, float("-inf")
    for start, stop in windows:
        covered += max(0.0, stop - max(start, end))
        end = max(end, stop)
    if covered <= 0:
        return None
    rows = sum(r for d in by_actor.values() for _, r in d[1:])
    return round(rows / covered, 2)


# The loopback test cluster's "GPU" node declares a GPU it does not have; everywhere else a
# task that holds a GPU but sees no CUDA device must fail, not compute for hours on a CPU.
REQUIRE_CUDA = True
# How long an actor may wait to be placed before the log asks why: an existing
# cluster may be adding a node, so waiting is not an error.
PENDING_WARNING_S = 120.0
# Distinct shards that failed an attempt in a row, none scored in between, that stop
# a run: a failure every shard hits (out of GPU memory at --batch-size, a bug) would
# else spend max_attempts tries on each shard of the pool, then publish a table of
# errors. Distinct: one poison shard retried at once on a fresh actor counts once.
FAILED_IN_A_ROW = 5


class DirectionsActor:
    """Holds one GPU for the per-run work of :func:`prepare_directions`, then is killed."""

    def ready(self) -> str:
        return ray.util.get_node_ip_address()

    def compute(self, cfg: ScoreConfig, sets: dict[str, str], require_cuda: bool) -> dict:
        """ensure_directions on this actor's GPU; the run directory is shared storage."""
        from pipeline import logs

        logs.setup()  # its progress lines reach the driver's log (Ray forwards worker output)
        if torch.cuda.is_available():
            device = "cuda"
        elif require_cuda:
            raise RuntimeError(
                f"the directions actor holds GPU(s) {ray.get_gpu_ids()} on "
                f"{ray.util.get_node_ip_address()} but torch sees no CUDA device there (is "
                "the node's NVIDIA driver older than torch's CUDA build?); --gpus-per-worker 0 "
                "computes on the driver's CPU"
            )
        else:
            device = "cpu"
        run = RunDir(cfg.run)
        target = ensure_directions(cfg, run, load_trajectory(run), sets, device)
        return {"target": target, "node": ray.util.get_node_ip_address(), "device": device}


def _release_gpu() -> None:
    """Give this process's cached GPU memory back before the scoring actors want it."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def warn_about_reader(cfg: ScoreConfig, trained: dict[str, Any]) -> None:
    """Say when the pool is read otherwise than the proxy read it (another member as the
    caption, another pixel cap): rows it trained on may then be other rows, or errors."""

    def same(f: str) -> bool:
        mine, theirs = _as_list(getattr(cfg, f)), _as_list(trained[f])
        if isinstance(theirs, list):  # read first, as trained; others after them
            return mine[: len(theirs)] == theirs
        return mine == theirs

    differ = [f for f in READER_FIELDS if f in trained and not same(f)]
    if differ:
        log.warning(
            "%s: the proxy was trained reading its pool with %s; these scores read it with %s",
            ", ".join(field_flag(f) for f in differ),
            ", ".join(f"{f}={trained[f]}" for f in differ),
            ", ".join(f"{f}={getattr(cfg, f)}" for f in differ),
        )


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def warn_about_target(cfg: ScoreConfig) -> None:
    """Say when --target is missing where it matters, or given where nothing uses it (a
    walkthrough found it accepted silently with clip_score and random alone)."""
    uses = "target" in depends_on(get_scorers(cfg.methods))
    if cfg.target is not None and not uses:
        log.warning(
            "--target: none of %s points toward a target; it is not used",
            ",".join(cfg.methods),
        )
    if cfg.target is None and uses:
        log.warning(
            "no --target: the influence scores point toward a held-out sample of the pool, "
            "noisy pairs included, which finds mismatched pairs near chance on a noisy pool "
            "(docs/accuracy.md section 2); give --target a clean, curated set"
        )


def warn_about_another_pool(cfg: ScoreConfig, run: RunDir, shards: list[str]) -> None:
    """Say when the last score run of this run directory scored another --data: the new
    table holds this pool's shards only, and a shard of the same name is scored again
    over the earlier part (a walkthrough found the earlier table replaced silently).
    ``shards``: this run's, resolved; the same pool spelled otherwise is the same pool."""
    if not exists(run.run_json):
        return
    earlier = (read_json(run.run_json).get("score") or {}).get("config") or {}
    if earlier.get("data") in (None, cfg.data):
        return
    try:
        same = resolve_shards(earlier["data"]) == shards
    except ConfigError:  # the earlier pool is gone: another one
        same = False
    if not same:
        log.warning(
            "the last score run of %s scored --data %s; this one scores %s, and "
            "scores.parquet will hold its shards only (score into another --run to keep "
            "both tables)",
            cfg.run,
            earlier["data"],
            cfg.data,
        )


def prepare_directions(
    cfg: ScoreConfig,
    run: RunDir,
    traj: Trajectory,
    sets: dict[str, str],
    pending_warning_s: float | None = None,
) -> dict[str, Any]:
    """The per-run work before scoring (directions, propagation, eigenpairs); returns the target.

    Where it runs:
    - this process's GPU when it runs alone (no cluster named, no Ray job): the
      machine is its own, and the memory is released before the actors start;
    - one Ray task holding a GPU when this process joins a cluster that has
      GPUs, or that has none yet but ``--gpus-per-worker`` asks for them (an
      autoscaler adds GPU nodes for the actors that wait). Ray does not hide
      a node's GPUs from a process that asked for none, so a GPU this process
      can see may be another job's or an actor's;
    - else this process's CPU, as with ``--gpus-per-worker 0``.

    The propagation is one Gauss-Newton product per training step, serial in the
    step: hours on a CPU for a real-size proxy.
    """
    if cfg.gpus_per_worker == 0 or not needs_directions(cfg, traj):
        return ensure_directions(cfg, run, traj, sets)
    if embedded(cfg.address):
        if not torch.cuda.is_available():
            return ensure_directions(cfg, run, traj, sets)
        try:
            return ensure_directions(cfg, run, traj, sets, "cuda")
        finally:
            _release_gpu()
    connect(cfg.address, cfg.workers * cfg.threads)
    if ray.cluster_resources().get("GPU", 0) < 1:
        if cfg.gpus_per_worker is None:  # no GPU asked for, none here: this CPU
            return ensure_directions(cfg, run, traj, sets)
        # --gpus-per-worker asks for GPUs the cluster has none of yet: an autoscaler adds
        # GPU nodes for actors that ask (review: this ran on the head's CPU, for hours)
        log.info("directions: waiting for a GPU node (--gpus-per-worker %g)", cfg.gpus_per_worker)
    log.info("directions: computed by a Ray actor holding a GPU")
    actor = ray.remote(num_gpus=1, num_cpus=1, max_restarts=0)(DirectionsActor).remote()
    try:
        ready = actor.ready.remote()
        if pending_warning_s is None:
            pending_warning_s = PENDING_WARNING_S
        started = time.monotonic()
        warned = False
        while not ray.wait([ready], timeout=5.0)[0]:
            if not warned and time.monotonic() - started > pending_warning_s:
                warned = True  # Ray keeps an actor no node can host pending, silently
                log.warning(
                    "the directions actor has waited %.0f s to be placed: does any node have a "
                    "free GPU (another job may hold them, or this one's --entrypoint-num-gpus)?",
                    time.monotonic() - started,
                )
        log.info("directions: on %s", ray.get(ready))
        out = ray.get(actor.compute.remote(cfg, sets, REQUIRE_CUDA))
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, ConfigError):
            raise exc.cause from None
        raise
    finally:
        ray.kill(actor)  # its GPU goes back before the scoring actors ask for one
    log.info("directions: done on %s (%s)", out["node"], out["device"])
    return out["target"]


def start_ray(cfg: ScoreConfig) -> bool:
    """Connect to ``cfg.address`` (or the job's cluster) or start an embedded Ray; True if we started it."""
    return connect(cfg.address, cfg.workers * cfg.threads)


# Bumped when the scorers' values change for the same inputs, so that older parts are
# rescored: v2 leaves a pair that is one of the references out of its own negatives; v3
# weighs each checkpoint by the rates of the steps it stands for (estimator.BlockRates);
# v4 computes a reference member's removal loss without cancellation (it was inf or NaN
# where the member dominates a row) and its sums over R in float32 under bfloat16.
SCORES_VERSION = "scores-v4"
# Trajectory fields the scores depend on beyond the checkpoints' bytes: the
# estimator's weights (step, lr, n_train) and the propagated form's dynamics.
_TRAINING_FIELDS = ("optimizer", "steps", "spacing", "batch_size", "n_train")
_RECIPE_FIELDS = ("lr", "schedule", "warmup", "momentum", "weight_decay", "optimizer")


def check_placeable(cfg: ScoreConfig) -> None:
    """Refuse scoring actors the embedded Ray could never place (it would wait forever).

    Only for the Ray this process starts, whose CPUs are sized for the actors:
    an existing cluster may add nodes (autoscaler); there a pending actor is
    reported by :func:`schedule` instead.
    """
    if not embedded(cfg.address):
        return  # an existing cluster: connect() joins it, whatever this machine has
    if not cfg.gpus_per_worker:
        return
    import torch

    have = torch.cuda.device_count()
    if cfg.gpus_per_worker > have:
        raise ConfigError(
            f"gpus_per_worker: {cfg.gpus_per_worker} GPU(s) per scoring actor, "
            f"but this machine has {have}"
        )


def _fingerprint(
    cfg: ScoreConfig,
    traj_record: dict,
    target: dict | None,
    sets: dict[str, str],
    self_size: dict[str, int] | None = None,
) -> dict[str, Any]:
    """What the parts depend on: a rerun with different inputs must not reuse them.

    Paths are left out on purpose (a moved run directory keeps its parts);
    the shard a part came from is checked by :func:`is_done`. ``self_size`` is
    :func:`~pipeline.score.directions.self_size`, when diffin_self is asked for.
    """
    recipe = traj_record.get("config", {})
    fp: dict[str, Any] = {
        "version": SCORES_VERSION,
        "methods": cfg.methods,
        "dtype": cfg.dtype,
        # A re-import can give the same checkpoint bytes other steps and rates.
        "checkpoints": [[c["sha256"], c["step"], c["lr"]] for c in traj_record["checkpoints"]],
        "model": model_identity(traj_record),
        "training": {k: traj_record.get(k) for k in _TRAINING_FIELDS},
        "recipe": {k: recipe.get(k) for k in _RECIPE_FIELDS},
        "sets": sets,  # reference negatives R and the batches behind g_B, H_B
        "reader": cfg.reader_options(),  # which rows are ok
    }
    imported = traj_record.get("imported")
    if imported:  # an import's schedule is its params.txt (train.schedule.recorded_rate)
        params = imported.get("params") or {}
        fp["imported_schedule"] = {k: params.get(k) for k in OPEN_CLIP_SCHEDULE_PARAMS}
    # Only the options the requested scorers depend on: another value of an unused
    # one must not rescore (a loss-only rerun with another --sample-gradient).
    uses = depends_on(get_scorers(cfg.methods))
    if cfg.second_order != "propagated":
        uses -= {"propagate_curvature"}  # the curvature the propagated form damps with
    if cfg.objective == "final":
        # the only objective before the option: the tables scored then stay valid
        uses -= {"objective"}
    fp["options"] = {k: getattr(cfg, k) for k in sorted(uses - {"target", "self_hb"})}
    if "target" in uses:
        fp["target"] = target["target_fingerprint"]
    if "target" in uses or self_size is not None:
        # A new version of the per-run work recomputes its files; the parts scored
        # with the old ones must go too (eigen-v2 changed diffin_self's values).
        fp["per_run_work"] = [DIRECTIONS_VERSION, PROPAGATED_VERSION, EIGEN_VERSION]
    if self_size is not None:
        # The size actually used, not the budget: a roomier budget that changes
        # only the chunk size must not rescore.
        fp["self"] = {"hb": cfg.self_hb, **self_size}
    return fp


# What each fingerprint entry is, in the user's words (walkthrough: the log named
# "per_run_work" and "options").
_INPUTS = {
    "version": "diffin's score version",
    "methods": "--methods",
    "dtype": "--dtype",
    "checkpoints": "the trajectory's checkpoints",
    "model": "the model",
    "training": "the proxy training",
    "recipe": "the proxy's learning-rate recipe",
    "imported_schedule": "the imported run's schedule",
    "sets": "the reference set or the gradient batches",
    "reader": "how the shards are read (--image-key, --text-key, --max-image-pixels)",
    "target": "the target (--target, or its pairs as --dtype reads them)",
    "per_run_work": "diffin's version of the direction vectors",
    "self": "diffin_self's H_B form or size",
}


def describe_changes(now: dict[str, Any], earlier: dict[str, Any]) -> list[str]:
    """The inputs of two scoring fingerprints that differ, as the flags and things a user
    knows them by. An input only one of them has (an option, the target) came or went
    with --methods, which is listed then: it did not change."""
    out = []
    for key in sorted((set(now) & set(earlier)) - {"hash"}):
        if now[key] == earlier[key]:
            continue
        if key == "options":
            a, b = now[key] or {}, earlier[key] or {}
            out += [field_flag(k) for k in sorted(set(a) & set(b)) if a[k] != b[k]]
        else:
            out.append(_INPUTS.get(key, key))
    return out


def method_hashes(
    cfg: ScoreConfig,
    traj_record: dict,
    target: dict | None,
    sets: dict[str, str],
    self_size: dict[str, int] | None = None,
) -> dict[str, str]:
    """{scorer: the hash of what its columns depend on}, in ``cfg.methods``' order: the
    fingerprint of a run asking for that scorer alone. A part's record holds them, so a
    rerun with other --methods keeps the columns whose hash is unchanged (score/reuse.py)."""
    return {
        m: fingerprint_hash(
            _fingerprint(
                dataclasses.replace(cfg, methods=[m]),
                traj_record,
                target,
                sets,
                self_size if m == "diffin_self" else None,
            )
        )
        for m in cfg.methods
    }


def earlier_record(run: RunDir, url: str, name: str, warn: bool = False) -> dict[str, Any] | None:
    """The completion record of shard ``url`` scored whole by an earlier run, else None.

    The record must name this very shard (another pool may have the same
    shard names) and its part must still be the size it describes. Whether
    the shard itself is still the file that was scored is
    :func:`same_shard`'s question (asked for many shards at once). ``warn``:
    say why a record that is there cannot be used (walkthrough: a part deleted
    by hand, or a torn record, was scored again without a word).
    """
    part = run.part(name)
    rec, problem = record_or_problem(part)
    if rec is not None and rec.get("status") == "ok" and rec.get("shard") == url:
        if not exists(part):
            rec, problem = None, "its part is missing"
        elif "bytes" in rec and file_size(part) != rec["bytes"]:
            rec, problem = None, "its part is not the size its completion record says"
    elif rec is not None:  # failed or partial (retried, as the summary says), another pool
        return None
    if problem is not None and warn:
        log.warning("shard %s: %s: scoring it again", name, problem)
    return rec


def is_done(run: RunDir, url: str, name: str, fp_hash: str) -> dict[str, Any] | None:
    """:func:`earlier_record` if it was scored for this fingerprint, else None."""
    rec = earlier_record(run, url, name)
    return rec if rec is not None and rec.get("fingerprint") == fp_hash else None


def completion_records(
    run: RunDir, shards: list[str], names: list[str]
) -> dict[str, dict[str, Any] | None]:
    """{shard URL: :func:`earlier_record`} for every shard, 16 asked at a time: on an object
    store each is three or four requests, and 10,000 shards asked one after another would
    take half an hour at 50 ms a request before a resumed run scored anything (review)."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        done = pool.map(lambda u, n: earlier_record(run, u, n, warn=True), shards, names)
        return dict(zip(shards, done, strict=True))


def _keep_earlier_parts(
    run: RunDir,
    whole: list[tuple[str, str, dict[str, Any]]],
    stamps: dict[str, dict[str, Any] | None],
    fp_hash: str,
    asked: list[str],
) -> dict[str, dict[str, Any]]:
    """{name: new record} of the earlier parts in ``whole`` (holding every scorer asked for),
    recorded again for this run's fingerprint (score/reuse.py); a part whose shard changed
    since, or whose record cannot be written now, is left out, to be scored (16 at a time:
    object stores)."""

    def keep(job: tuple[str, str, dict[str, Any]]) -> dict[str, Any] | None:
        url, name, rec = job
        if not same_shard(rec, stamps[url]):
            log.warning("shard %s changed since it was scored: scoring it again", name)
            return None
        try:
            return rerecord(run, name, rec, fp_hash, asked)
        except Exception as exc:  # one store hiccup must not stop the run: score it
            log.warning("shard %s: its earlier part could not be kept (%s)", name, exc)
            return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        kept = pool.map(keep, whole)
        return {job[1]: rec for job, rec in zip(whole, kept, strict=True) if rec is not None}


def same_shard(record: dict[str, Any], stamp: dict[str, Any] | None) -> bool:
    """Whether a shard's stamp now (size and ETag or mtime) is the one its record holds.

    A shard rewritten in place under the same name must be scored again.
    Records written before stamps existed are trusted; one whose shard could
    not be stamped (``null``) is scored again once the shard can be.
    """
    return "stamp" not in record or record["stamp"] == stamp


def failed_part(
    run: RunDir,
    url: str,
    name: str,
    reason: str,
    columns: list[str],
    fp_hash: str,
    tries: int,
    reader_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Record a shard that could not be scored: an error row per sample, then its record.

    The shard is listed again without decoding images (``reader_options`` as
    scoring read it), so a readable shard whose scoring failed keeps a row for
    each of its samples. A sample the listing already finds unusable (no
    caption, no image member, ...; pixels are not decoded) keeps its own
    reason; the rows of damage the listing meets are kept as the reader gives
    them. A shard that cannot even be listed gives its ``__shard__`` row.
    """
    failure = escape_utf8(f"shard failed after {tries} attempt(s): {reason}")
    rows = [
        s if not s.ok else dataclasses.replace(s, error=failure, image=None)
        for s in iter_shard(url, decode_images=False, **(reader_options or {}))
    ]
    if not rows or all(s.whole_shard for s in rows):
        rows = [
            Sample(
                uid=shard_row_uid(url),
                key=SHARD_KEY,
                shard=escape_utf8(url),  # the table's strings must be UTF-8
                index=0,
                error=failure,
                whole_shard=True,
            )
        ]
    table = build_part(rows, {}, columns)
    return write_part(
        table,
        run.part(name),
        {
            "status": "failed",
            "shard": url,
            "name": name,
            "ok": 0,
            "errors": len(rows),
            "reason": reason,
            "attempts": tries,
            "fingerprint": fp_hash,
        },
    )


@dataclass
class _Slot:
    actor: Any
    started: float = field(default_factory=time.monotonic)
    warned_pending: bool = False  # said in the log that Ray has not placed it yet
    ready: bool = False
    job: tuple[str, str] | None = None  # the shard it is scoring
    reserved: tuple[str, str] | None = None  # the shard it is prefetching (its next job)
    info: dict[str, Any] | None = None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")


# What a node's storage client raises when it cannot reach the run or the pool.
_STORAGE = re.compile(
    r"botocore|NoCredentials|EndpointConnection|Unable to locate credentials|AccessDenied|"
    # an object store's refusal, not a local file's ("[Errno 13] Permission denied")
    r"PermissionError: (?!\[Errno)|google\.auth|DefaultCredentialsError|azure\.core"
)


def start_hint(reason: str) -> str:
    """What to check when actors cannot start for ``reason`` (walkthrough: nodes without
    S3 access failed with a botocore error, and nothing said that every node needs it)."""
    if _STORAGE.search(reason):
        return (
            ". Every node reads the run directory and the pool itself: give the nodes "
            "credentials (an instance profile or service account) and the store's endpoint "
            '(docs/operations.md, "Storage credentials")'
        )
    return ""


def _reason(exc: BaseException) -> str:
    """One line for logs and error rows: the exception raised inside the actor when Ray's
    message carries its traceback (its last ``XxxError: ...`` line), else the first line."""
    lines = [t.strip() for t in _ANSI.sub("", str(exc)).splitlines() if t.strip()]
    raised = [t for t in lines if _RAISED.match(t)]
    line = raised[-1] if raised else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {line[:300]}"


def assign(slots: list[_Slot], queue_: deque[tuple[str, str]], prefetch: bool) -> list[_Slot]:
    """Give every ready, idle slot its next shard; returns the slots that got one.

    A slot takes its reserved shard, else the next queued one, else a shard
    another (busy) slot has reserved: a free actor never waits while a shard
    does. A slot reserves a next shard (which its actor prefetches) only while
    the queue holds more shards than the other slots still without work, so
    the first actors ready do not take the shards of those still starting.
    """
    given = []
    for slot in slots:
        if not slot.ready or slot.job is not None:
            continue
        job, slot.reserved = slot.reserved, None
        if job is None and queue_:
            job = queue_.popleft()
        if job is None:
            other = next((o for o in slots if o.job is not None and o.reserved), None)
            if other is None:
                continue
            job, other.reserved = other.reserved, None  # its actor drops the prefetch
        slot.job = job
        waiting = sum(1 for o in slots if o is not slot and o.job is None and o.reserved is None)
        if prefetch and len(queue_) > waiting:
            slot.reserved = queue_.popleft()
        given.append(slot)
    return given


def schedule(
    todo: list[tuple[str, str]],
    make_actor,
    workers: int,
    max_attempts: int,
    on_done,
    on_failed,
    progress: Progress,
    prefetch: bool = True,
    max_actor_starts: int | None = None,
    pending_warning_s: float | None = None,
) -> dict[str, Any]:
    """Stream ``todo`` (url, name) through a pool of ``workers`` actors; returns retry counts.

    ``make_actor()`` returns a fresh actor handle with ``ready()`` and
    ``score(url, name, next_url)``. ``on_done(url, name, record)`` and
    ``on_failed(url, name, reason, tries)`` are called as shards finish.
    """
    if pending_warning_s is None:
        pending_warning_s = PENDING_WARNING_S
    queue_: deque[tuple[str, str]] = deque(todo)
    attempts: dict[str, int] = {}
    refs: dict[Any, tuple[str, _Slot]] = {}
    slots: list[_Slot] = []
    starts = 0
    # Start failures in a row, with no actor becoming ready in between: a
    # failure every actor will hit (a missing file, out of memory at model
    # load) must stop the run after a few tries, not one start per shard.
    failing_starts = 0
    max_failing_starts = workers * max_attempts
    last_start_error = ""
    max_starts = max_actor_starts or workers * (max_attempts + 2) + len(todo)
    failing: set[str] = set()  # shards that failed an attempt since the last shard scored
    max_failing = max(FAILED_IN_A_ROW, 2 * workers)
    stats = {"retries": 0, "actors_replaced": 0, "actor_start_failures": 0, "actors": []}

    def start() -> None:
        nonlocal starts
        if starts >= max_starts:
            raise RuntimeError(
                f"gave up after starting {starts} scoring actors; last start failure: "
                f"{last_start_error or 'none'}"
            )
        starts += 1
        slot = _Slot(make_actor())
        slots.append(slot)
        refs[slot.actor.ready.remote()] = ("ready", slot)

    def retire(slot: _Slot) -> None:
        slots.remove(slot)
        for ref in [r for r, (_, s) in refs.items() if s is slot]:
            del refs[ref]
        if slot.reserved is not None:
            queue_.appendleft(slot.reserved)
            slot.reserved = None
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # already gone
            pass

    for _ in range(min(workers, max(1, len(queue_)))):
        start()
    try:
        while queue_ or any(s.job or s.reserved for s in slots):
            for slot in assign(slots, queue_, prefetch):
                assert slot.job is not None
                url, name = slot.job
                attempts[name] = attempts.get(name, 0) + 1
                nxt = slot.reserved[0] if slot.reserved else None
                last_try = attempts[name] >= max_attempts
                refs[slot.actor.score.remote(url, name, nxt, last_try)] = ("score", slot)
            if not refs:  # pragma: no cover - every slot holds a ready or score ref
                raise RuntimeError("no scoring actor left")
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
            progress.tick()
            for slot in slots:
                waited = time.monotonic() - slot.started
                if not slot.ready and waited > pending_warning_s and not slot.warned_pending:
                    # Ray keeps an actor no node can host pending forever, silently.
                    slot.warned_pending = True
                    log.warning(
                        "a scoring actor has waited %.0f s to be placed: does any node have "
                        "the CPUs and GPUs it asks for (--threads, --gpus-per-worker)? A job "
                        "submitted with --entrypoint-num-gpus holds GPUs the actors cannot use",
                        waited,
                    )
            for ref in ready:
                if ref not in refs:
                    continue
                kind, slot = refs.pop(ref)
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    reason = _reason(exc)
                    actor_died = isinstance(exc, ray.exceptions.RayActorError) or kind == "ready"
                    if kind == "ready":
                        failing_starts += 1
                        last_start_error = reason
                        stats["actor_start_failures"] += 1
                        log.warning("scoring actor failed to start: %s", reason)
                        retire(slot)
                        if failing_starts >= max_failing_starts:
                            raise StageFailed(
                                f"{failing_starts} scoring actors in a row failed to start; "
                                f"last: {reason}" + start_hint(reason)
                            ) from exc
                        start()
                        continue
                    url, name = slot.job
                    slot.job = None
                    log.warning(
                        "shard %s failed (attempt %d/%d): %s",
                        name,
                        attempts[name],
                        max_attempts,
                        reason,
                    )
                    failing.add(name)
                    if len(failing) >= max_failing:
                        raise StageFailed(
                            f"{len(failing)} shards in a row failed an attempt, none scored in "
                            f"between; stopping before the rest of the pool fails the same way "
                            f"(last: {reason}). Nothing was merged; the shards scored so far "
                            "are kept for the next run"
                        ) from exc
                    if actor_died:
                        stats["actors_replaced"] += 1
                        progress.actor_replaced()
                        retire(slot)
                        start()
                    if attempts[name] < max_attempts:
                        stats["retries"] += 1
                        progress.retry()
                        # Actor death: retry at once (on the next free actor). A task
                        # error: behind the queue, so another actor likely takes it.
                        if actor_died:
                            queue_.appendleft((url, name))
                        else:
                            queue_.append((url, name))
                    else:
                        on_failed(url, name, reason, attempts[name])
                    continue
                if kind == "ready":
                    failing_starts = 0
                    slot.ready = True
                    slot.info = value
                    stats["actors"].append(value)
                    continue
                url, name = slot.job
                slot.job = None
                failing.clear()
                on_done(url, name, value)
    finally:
        for slot in list(slots):
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:
                pass
    stats["attempts"] = sum(attempts.values())
    return stats


def run_scoring(cfg: ScoreConfig, actor_cls: type | None = None) -> dict[str, Any]:
    """Score every shard of ``cfg.data`` into RUN/scores.parquet; returns the run summary.

    ``actor_cls`` replaces :class:`ScoreActor` (tests inject faults with it).

    Once the config is checked, ``RUN/scores/request.json`` records it (`diffin status`
    rebuilds the command from it) and progress.json says "preparing" until the shards
    are scored, and how the run stopped if it stops before (walkthrough: a rescore that
    was computing its directions showed as the earlier table, and the status's command
    lost its --methods and --target).
    """
    cfg.validate()
    check_address(cfg.address)  # before the directions, which may take long
    check_placeable(cfg)
    t0 = time.time()
    run = RunDir(cfg.run)
    # the checks that refuse a mistyped command, before anything is written (review)
    get_scorers(cfg.methods)
    shards = resolve_shards(cfg.data)
    # one score run at a time, and none while a training replaces the checkpoints: held
    # before the trajectory is read (a training under way has removed trajectory.json)
    with runlock.hold(cfg.run, ["score"], "score"):
        traj = load_trajectory(run)
        form = resolve_form(cfg.second_order, traj)
        # resolved once here: the workers, the directions and the fingerprint see one value
        cfg = dataclasses.replace(cfg, objective=resolve_objective(cfg, form))
        if cfg.objective != "final" and form != "propagated" and "diffin" in cfg.methods:
            raise ConfigError(
                f"objective {cfg.objective}: needs the propagated form, and this "
                f"{traj.record.get('optimizer', {}).get('name')!r} trajectory is scored with "
                f"the {form} one (the propagated form models SGD)"
            )
        progress_url, request_url = (
            run.path("scores", "progress.json"),
            run.path("scores", "request.json"),
        )
        before = {u: read_json(u) if exists(u) else None for u in (progress_url, request_url)}
        write_json(request_url, cfg.to_dict())
        write_json(progress_url, {"state": "preparing"})
        try:
            return _score(cfg, run, actor_cls, t0, shards, traj, form)
        except BaseException as exc:
            try:
                _mark_stopped(exc, progress_url, before)
            except Exception as why:  # noqa: BLE001 (the store that failed the run may fail this)
                log.warning("could not record how the score run stopped: %s", why)
            raise


def _mark_stopped(exc: BaseException, progress_url: str, before: dict[str, Any]) -> None:
    """progress.json's state once a score run stops early. A run refused before it scored
    (a ConfigError while preparing) leaves the records as it found them: it did not run."""
    if runlock.LOST.is_set():  # another score run holds the run now: its records
        return
    stopped = read_json(progress_url) if exists(progress_url) else {}
    if stopped.get("state") == "preparing" and isinstance(exc, ConfigError):
        for url, value in before.items():
            if value is None:
                remove(url)
            else:
                write_json(url, value)
        return
    if stopped.get("state") in ("preparing", "scoring", "merging"):
        state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        write_json(progress_url, {**stopped, "state": state})


def _score(
    cfg: ScoreConfig,
    run: RunDir,
    actor_cls: type | None,
    t0: float,
    shards: list[str],
    traj: Trajectory,
    form: str,
) -> dict[str, Any]:
    names = shard_names(shards)
    warn_about_reader(cfg, traj.record.get("config") or {})
    if form != cfg.second_order and "diffin" in cfg.methods:
        log.info(
            "diffin form: %s (--second-order %s, %s trajectory)",
            form,
            cfg.second_order,
            traj.record.get("optimizer", {}).get("name"),
        )
    cfg = dataclasses.replace(cfg, second_order=form)
    sets = set_hashes(run)
    target = prepare_directions(cfg, run, traj, sets)

    size = None
    if "diffin_self" in cfg.methods:
        k, batch = tensor_shapes(run.set_file("grad_batches"))["images"][:2]
        size = self_size(cfg, traj, k * batch)
    warn_about_target(cfg)
    if "target" not in depends_on(get_scorers(cfg.methods)):
        target = None  # not a target of these scores (walkthrough: described in the summary)
    warn_about_another_pool(cfg, run, shards)
    fp = _fingerprint(cfg, traj.record, target, sets, size)
    fp_hash = fingerprint_hash(fp)
    hashes = method_hashes(cfg, traj.record, target, sets, size)
    fp_url = run.path("scores", "fingerprint.json")
    earlier = read_json(fp_url) if exists(fp_url) else None
    if earlier is not None and earlier.get("hash") != fp_hash:
        now = json.loads(json.dumps(fp, default=str))  # as it reads back from the file
        # an input the new scorers do not use is absent, not changed (walkthrough: the
        # target was listed when clip_score alone was asked for)
        changed = describe_changes(now, earlier)
        dropped = [m for m in earlier.get("methods") or [] if m not in cfg.methods]
        log.info(
            "the scores' inputs changed since the last score run (%s): a shard's earlier "
            "columns are kept only for the scorers whose inputs are the same%s",
            ", ".join(changed) or "what the new scorers do not use",
            f"; the new table holds no {', '.join(dropped)} (not in --methods)" if dropped else "",
        )
    write_json(fp_url, {**fp, "hash": fp_hash})
    ctx = ScoreContext(traj.checkpoints, traj.n_train, cfg.seed, cfg.score_options())
    columns = [c for s in get_scorers(cfg.methods) for c in s.columns(ctx)]

    short: dict[str, dict[str, int]] = {}
    empty: list[str] = []
    damaged: dict[str, str] = {}

    def check_counts(name: str, record: dict[str, Any]) -> None:
        """Shards with fewer samples than img2dataset wrote, or none (a valid, empty tar)."""
        found, expected = record.get("samples"), record.get("expected")
        if expected is not None and found is not None and found < expected:
            log.warning(
                "shard %s: %d samples read, but its _stats.json says %d were written",
                name,
                found,
                expected,
            )
            short[name] = {"read": found, "expected": expected}
        if record.get("rows") == 0:  # an unreadable shard has its __shard__ row
            log.warning("shard %s holds no samples", name)
            empty.append(name)
        if record.get("damaged") and record.get("status") != "partial":  # partial: logged
            log.warning(
                "shard %s could not be read to its end: %s (%s)",
                name,
                record["damaged"],
                "no sample could be read before the damage; its error row says why"
                if record.get("samples") == 0
                else "its rows before the damage are scored; its error rows say why",
            )
            damaged[name] = record["damaged"]

    todo: list[tuple[str, str]] = []
    resumed_rows = 0
    records = completion_records(run, shards, names)
    # Stamps only for the shards with a record to check: one listing per directory.
    stamps = shard_stamps([u for u, r in records.items() if r is not None])
    whole: list[tuple[str, str, dict[str, Any]]] = []  # earlier parts holding every scorer
    some = 0  # shards whose earlier part holds some of the scorers asked for
    for url, name in zip(shards, names, strict=True):
        rec = records[url]
        if rec is not None and rec.get("fingerprint") != fp_hash:
            keep = reusable(rec, hashes)
            if len(keep) == len(hashes):
                whole.append((url, name, rec))
                continue
            if keep and not same_shard(rec, stamps[url]):  # the actor finds it too
                log.warning("shard %s changed since it was scored: scoring it again", name)
            else:
                some += bool(keep)
            rec = None  # the actor keeps what it can (ScoreActor._earlier_part)
        if rec is not None and not same_shard(rec, stamps[url]):
            log.warning("shard %s changed since it was scored: scoring it again", name)
            rec = None
        if rec is None:
            todo.append((url, name))
        else:
            resumed_rows += rec["rows"]
            check_counts(name, rec)  # the summary of a resumed run still lists them
    kept_whole = _keep_earlier_parts(run, whole, stamps, fp_hash, cfg.methods)
    for url, name, _ in whole:
        if name in kept_whole:
            resumed_rows += kept_whole[name]["rows"]
            check_counts(name, kept_whole[name])
        else:
            todo.append((url, name))
    order = {n: i for i, n in enumerate(names)}
    todo.sort(key=lambda job: order[job[1]])  # shard order, whatever was kept
    resumed = len(shards) - len(todo)
    if kept_whole:
        log.info(
            "%d shard(s) scored earlier hold every scorer asked for (%s): their columns are "
            "kept, none is scored again",
            len(kept_whole),
            ",".join(cfg.methods),
        )
    if some:
        log.info(
            "%d shard(s) scored earlier hold the columns of some of these scorers, with the "
            "same inputs: unless a shard reads otherwise now, only the other scorers are "
            "computed for them",
            some,
        )
    if not todo:
        log.info(
            "nothing to score: all %d shards were scored with these inputs by an earlier run",
            len(shards),
        )
    elif resumed:
        log.info("resuming: %d of %d shards already scored", resumed, len(shards))

    progress = Progress(
        len(shards), resumed, resumed_rows, json_url=run.path("scores", "progress.json")
    )
    scored: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    partial: dict[str, str] = {}  # name -> why it could not be read to its end

    finished: list[tuple[float, str, int]] = []  # (when, actor, rows) of each shard back
    in_part: list[str] = []  # scored for some scorers, the others' columns kept

    def on_done(url: str, name: str, record: dict[str, Any]) -> None:
        scored[name] = record
        if record.get("kept"):
            in_part.append(name)
        if record.get("status") == "partial":
            reason = record.get("reason", "")
            log.error(
                "shard %s could not be read to its end after %d attempts (%s); its rows before "
                "the damage are kept and a rerun tries it again",
                name,
                cfg.max_attempts,
                reason,
            )
            partial[name] = reason
        check_counts(name, record)
        actor = f"{record.get('node')}/{record.get('pid')}"
        finished.append((time.monotonic(), actor, record["rows"]))
        progress.shard_done(record["rows"], record.get("errors", 0))

    to_record: list[tuple[str, str, str, int]] = []

    def on_failed(url: str, name: str, reason: str, tries: int) -> None:
        log.error("shard %s recorded as failed after %d attempts: %s", name, tries, reason)
        # Its part lists the shard again (one row per sample): written once the actors
        # are done, so a large remote shard does not hold up the scheduling loop.
        to_record.append((url, name, reason, tries))
        failed[name] = reason
        progress.shard_failed()

    # progress.json said "0 shards done" after an interrupt that had finished five
    # (walkthrough): it is written every 10 s, so once more when the run stops, saying how
    try:
        stats: dict[str, Any] = {"retries": 0, "actors_replaced": 0, "actors": []}
        if todo:
            started = start_ray(cfg)
            try:
                gpus = cfg.gpus_per_worker
                cluster_gpus = ray.cluster_resources().get("GPU", 0)
                if gpus is None:
                    gpus = 1 if cluster_gpus >= 1 else 0
                workers = cfg.workers
                if started:  # the embedded Ray has this machine's GPUs and no more, ever
                    workers = actors_that_fit(cfg.workers, gpus, cluster_gpus)
                    if workers < cfg.workers:
                        log.warning(
                            "%d of --workers %d scoring actors fit this machine's %g GPU(s) at "
                            "%g each: scoring with %d (a share such as --gpus-per-worker %g puts "
                            "all %d on them)",
                            workers,
                            cfg.workers,
                            cluster_gpus,
                            gpus,
                            workers,
                            fitting_share(cfg.workers, cluster_gpus),
                            cfg.workers,
                        )
                options: dict[str, Any] = {
                    "num_cpus": cfg.threads,
                    "max_restarts": 0,
                    "max_task_retries": 0,
                    "scheduling_strategy": "SPREAD",
                }
                if gpus:
                    options["num_gpus"] = gpus
                remote_cls = ray.remote(**options)(actor_cls or ScoreActor)

                def make_actor():
                    return remote_cls.remote(cfg.run, cfg, fp_hash, hashes)

                stats = schedule(
                    todo,
                    make_actor,
                    workers,
                    cfg.max_attempts,
                    on_done,
                    on_failed,
                    progress,
                    prefetch=cfg.prefetch_batches > 0,
                )
            finally:
                if started:
                    ray.shutdown()
        for url, name, reason, tries in to_record:
            failed_part(run, url, name, reason, columns, fp_hash, tries, cfg.reader_options())
        snap = progress.close()  # its state: "merging"

        # A table that scored nothing must not replace one that did (walkthrough: a mistyped
        # --data file turned a good table into one error row, exit 0): merged beside it first.
        previous = exists(run.scores)
        table_url = run.path("scores.new.parquet") if previous else run.scores
        merged = merge_parts(
            [run.part(n) for n in names],
            table_url,
            metadata={
                "score": cfg.to_dict(),
                "fingerprint": fp,
                "target": target,
                "checkpoints": traj.record["checkpoints"],
                "model": traj.model,
                **provenance(),
            },
            require_records=True,
            fingerprint=fp_hash,
            columns=columns,  # a part may hold columns of scorers not asked for (reuse.py)
        )
        failed_table = run.path("scores-failed.parquet")
        if merged["rows"] and not merged["rows_ok"]:
            # the rows' most frequent reasons, a damaged shard's among them (walkthrough: the
            # one truncated shard was named, not the 231 images the keys could not decode)
            counts = pc.value_counts(read_table(table_url, columns=["error"]).column("error"))
            reasons = [
                f"{n} x {r}"
                for r, n in sorted(
                    zip(counts.field(0).to_pylist(), counts.field(1).to_pylist(), strict=True),
                    key=lambda rn: -rn[1],
                )
                if r
            ]
            if previous:
                move(table_url, failed_table)
            raise ConfigError(
                f"data: no sample of the {len(shards)} shard(s) could be scored "
                f"({'; '.join(reasons[:3]) or 'every row is an error row'}): is --data the pool, "
                "read with the right --image-key and --text-key? "
                + (
                    f"The earlier score table is kept; this run's error rows are in {failed_table}"
                    if previous
                    else f"The error rows are in {run.scores}"
                )
            )
        if previous:
            move(table_url, run.scores)
            merged["table"] = run.scores
        remove(failed_table)  # a failed run's rows, now superseded
    except BaseException as exc:
        if not runlock.LOST.is_set():  # else progress.json is the new holder's now
            progress.stop("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        raise
    progress.stop("finished")
    for column, n in merged["nonfinite_scores"].items():
        log.warning("%s: %d of %d ok rows are NaN or infinite", column, n, merged["rows_ok"])
    if merged["duplicate_uids"]:
        # prune keeps such rows and counts unique_uids; evaluate refuses them (walkthrough:
        # only the summary said so)
        log.warning(
            "scores: %d rows repeat another row's uid (a pool that repeats uids, or a shard "
            "copied under another name): prune keeps such ok rows (uids.npy names each uid "
            "once), `diffin evaluate` refuses them",
            merged["duplicate_uids"],
        )
    elapsed = time.time() - t0
    rows_now = sum(r["rows"] for r in scored.values())
    summary = {
        "shards": len(shards),
        "shards_scored_now": len(scored),
        "shards_resumed": resumed,
        # of which their earlier parts held every scorer asked for, under other --methods
        "shards_kept_columns": len(kept_whole),
        # scored now for some scorers only, the others' columns kept from earlier parts
        "shards_scored_in_part": len(in_part),
        "shards_failed": failed,
        "shards_partial": partial,
        "shards_short": short,  # fewer samples than img2dataset's _stats.json counts
        # corrupt, truncated or not a tar, and not worth another try: name -> the reason
        "shards_damaged": damaged,
        "shards_empty": empty,
        "retries": stats["retries"],
        "actors_replaced": stats["actors_replaced"],
        "actors": stats["actors"],
        **merged,
        "seconds": round(elapsed, 2),
        "scoring_seconds": snap["elapsed_s"],
        "samples_scored_now": rows_now,
        # None, not 0.0, when an earlier run scored every shard: no rate was measured.
        "samples_per_second": round(rows_now / max(snap["elapsed_s"], 1e-9), 2)
        if rows_now
        else None,
        # Each actor from its first shard back: start-up (model loading) excluded.
        "steady_samples_per_second": steady_rate(finished),
        "target": target,
    }
    stale = stale_manifests(run)
    if stale:
        summary["stale_manifests"] = stale
        log.warning(
            "score: the prune manifests %s rank an earlier score table; run `diffin prune` "
            "again for each before retraining on them",
            ", ".join(stale),
        )
    earlier = _earlier_scoring(run, summary)
    if earlier:
        summary["earlier_scoring"] = earlier
    run.update_run_json("score", {"config": cfg.to_dict(), "summary": summary})
    return summary


# what a run that scored measured, which a rerun that scored nothing cannot
RATE_KEYS = (
    "seconds",
    "scoring_seconds",
    "samples_scored_now",
    "samples_per_second",
    "steady_samples_per_second",
    "actors",
)


def _earlier_scoring(run: RunDir, summary: dict[str, Any]) -> dict[str, Any] | None:
    """The rates of the last run that scored, kept through reruns that scored nothing (which
    replaced them in run.json with nulls; walkthrough)."""
    if summary["samples_scored_now"] or not exists(run.run_json):
        return None
    before = read_json(run.run_json).get("score", {}).get("summary") or {}
    if before.get("earlier_scoring"):
        return before["earlier_scoring"]
    if before.get("samples_scored_now"):
        return {k: before.get(k) for k in RATE_KEYS}
    return None
