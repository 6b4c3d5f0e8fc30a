"""The Ray driver: a pool of scoring actors streams whole shards, then the parts are merged.

Work unit = one input shard. Parts have deterministic names and are written
atomically, so a rerun scores only the shards whose part is missing. An actor
that dies is replaced and its shard retried elsewhere, up to ``max_attempts``;
a shard that keeps failing is recorded as failed with its reason, and the run
still finishes (its rows are then missing from the table, and the summary
says so).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any

import ray
from tqdm import tqdm

from pipeline.data.shards import resolve_shards, shard_names
from pipeline.provenance import provenance
from pipeline.rundir import RunDir, exists, read_json, write_json
from pipeline.score.config import ScoreConfig
from pipeline.score.directions import ensure_directions
from pipeline.score.merge import merge_parts
from pipeline.score.trajectory import load_trajectory
from pipeline.score.worker import ShardScorer

log = logging.getLogger(__name__)

# Ray advertises 127.0.0.1 as the machine's network address; another loopback
# address keeps the embedded cluster's advertised address on loopback.
LOCAL_NODE_IP = "127.0.0.2"


class ScoreActor:
    """Holds one ShardScorer: model, checkpoints and directions loaded once."""

    def __init__(self, run_url: str, cfg: ScoreConfig) -> None:
        self.scorer = ShardScorer(run_url, cfg)

    def pid(self) -> int:
        return os.getpid()

    def score(self, url: str, name: str) -> dict[str, Any]:
        return self.scorer.score_shard(url, name)


def start_ray(cfg: ScoreConfig) -> bool:
    """Connect to ``cfg.address`` or start an embedded Ray; returns True if we started it."""
    if ray.is_initialized():
        return False
    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=True)
        return False
    ray.init(
        num_cpus=cfg.workers * cfg.threads,
        include_dashboard=False,
        _node_ip_address=LOCAL_NODE_IP,
        log_to_driver=True,
        configure_logging=False,
    )
    return True


def _fingerprint(cfg: ScoreConfig, traj_record: dict, target: dict) -> dict[str, Any]:
    """What the parts depend on: a rerun with different inputs must not reuse them."""
    return {
        "methods": cfg.methods,
        "first_order": cfg.first_order,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "checkpoints": [c["sha256"] for c in traj_record["checkpoints"]],
        "target": target["target_fingerprint"],
    }


def run_scoring(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every shard of ``cfg.data`` into RUN/scores.parquet; returns the run summary."""
    cfg.validate()
    t0 = time.time()
    shards = resolve_shards(cfg.data)
    names = shard_names(shards)
    run = RunDir(cfg.run)
    traj = load_trajectory(run)
    target = ensure_directions(cfg, run, traj)

    fp = _fingerprint(cfg, traj.record, target)
    fp_url = run.path("scores", "fingerprint.json")
    reuse = exists(fp_url) and read_json(fp_url) == fp
    todo = deque(
        (u, n) for u, n in zip(shards, names, strict=True) if not (reuse and exists(run.part(n)))
    )
    resumed = len(shards) - len(todo)
    write_json(fp_url, fp)

    started = start_ray(cfg)
    actor_cls = ray.remote(num_cpus=cfg.threads, max_restarts=0)(ScoreActor)
    results: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    attempts: dict[str, int] = {}
    retries = 0
    try:
        actors = [
            actor_cls.remote(cfg.run, cfg) for _ in range(min(cfg.workers, max(1, len(todo))))
        ]
        idle = deque(actors)
        running: dict[ray.ObjectRef, tuple[Any, str, str]] = {}
        bar = tqdm(total=len(shards), initial=resumed, desc="score", unit="shard")
        samples = 0
        while todo or running:
            while todo and idle:
                url, name = todo.popleft()
                actor = idle.popleft()
                attempts[name] = attempts.get(name, 0) + 1
                running[actor.score.remote(url, name)] = (actor, url, name)
            done, _ = ray.wait(list(running), num_returns=1)
            actor, url, name = running.pop(done[0])
            try:
                res = ray.get(done[0])
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                log.warning("shard %s failed (attempt %d): %s", name, attempts[name], reason)
                if isinstance(exc, ray.exceptions.RayActorError):
                    ray.kill(actor, no_restart=True)
                    actor = actor_cls.remote(cfg.run, cfg)
                if attempts[name] < cfg.max_attempts:
                    retries += 1
                    todo.append((url, name))
                else:
                    failed[name] = reason
                    bar.update(1)
                idle.append(actor)
                continue
            idle.append(actor)
            results[name] = res
            samples += res["rows"]
            bar.update(1)
            elapsed = max(time.time() - t0, 1e-9)
            bar.set_postfix(samples=samples, rate=f"{samples / elapsed:.0f}/s")
        bar.close()
    finally:
        if started:
            ray.shutdown()

    merged = merge_parts(
        [run.part(n) for n in names if n not in failed],
        run.scores,
        metadata={
            "score": cfg.to_dict(),
            "fingerprint": fp,
            "target": target,
            "checkpoints": traj.record["checkpoints"],
            "model": traj.model,
            **provenance(),
        },
    )
    summary = {
        "shards": len(shards),
        "shards_scored_now": len(results),
        "shards_resumed": resumed,
        "shards_failed": failed,
        "retries": retries,
        **merged,
        "seconds": round(time.time() - t0, 2),
        "samples_per_second": round(
            sum(r["rows"] for r in results.values()) / max(time.time() - t0, 1e-9), 2
        ),
        "target": target,
    }
    run.update_run_json("score", {"config": cfg.to_dict(), "summary": summary})
    return summary
