"""Faults on a real two-node Ray cluster: actor killed, node lost, driver killed, poison shards.

Each run scores a pool of many tiny shards so that there is time to break
things mid-run; each test then checks the finished table: every sample once,
no duplicates, rows in = rows out.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from raycluster import NODE_IP, REPO, fresh_run, kill_all, one_actor_config, tree

from pipeline.errors import StageFailed

pytestmark = pytest.mark.timeout(420)


def _done(run: str) -> int:
    return len(glob.glob(f"{run}/scores/done/*.json"))


# Readiness waits, not assertions: actor start-up (torch + open_clip import, model and
# checkpoint load) took 90 s here on a quiet machine and over 240 s while other jobs
# loaded both cores, so the waits are generous and the checks come after them.
WAIT = 600


def _wait(pred, timeout: float, what: str, poll: float = 0.3) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(poll)
    raise TimeoutError(what)


def _check_table(run: str, data: str, n_samples: int, allow_errors: int = 0) -> dict:
    from pipeline.data.shards import resolve_shards

    t = pq.read_table(f"{run}/scores.parquet").to_pydict()
    rows = list(zip(t["shard"], t["index"], strict=True))
    assert len(rows) == len(set(rows)), "a row appears twice"
    assert set(t["shard"]) == set(resolve_shards(data))
    ok = t["status"].count("ok")
    assert ok + t["status"].count("error") == len(rows)
    assert len(rows) == n_samples + allow_errors
    summary = json.load(open(f"{run}/run.json"))["score"]["summary"]
    assert summary["rows"] == summary["rows_in"] == len(rows)
    return summary


def _pool_of_three(score_run: dict, tmp_path) -> tuple:
    """A pool of copies of the first three shards; returns it and the source shards' prefix."""
    import shutil

    pool = tmp_path / "pool"
    pool.mkdir()
    src = score_run["data"].split("{")[0]
    for i in range(3):
        shutil.copy(f"{src}0000{i}.tar", pool / f"0000{i}.tar")
    return pool, src


def _score_args(data: str, run: str, workers: int = 2) -> list[str]:
    return [
        "--data",
        data,
        "--run",
        run,
        "--methods",
        "diffin,random",
        "--workers",
        str(workers),
        "--threads",
        "1",
        "--batch-size",
        "8",
        "--max-attempts",
        "3",
        # The derived form's nested JVP makes a shard slow enough for the kills below to land
        # mid-run; the propagated default scores these tiny shards too fast for that.
        "--second-order",
        "derived",
    ]


def _alive_score_actors(cluster) -> list:
    from ray.util.state import list_actors

    actors = list_actors(
        address=cluster.dashboard,
        filters=[("class_name", "=", "ScoreActor"), ("state", "=", "ALIVE")],
        timeout=10,
        raise_on_missing_output=False,
    )
    return [a for a in actors if a.pid]


def test_job_survives_killed_actor_and_lost_node(ray_cluster, score_run, tmp_path):
    """Submitted through the Jobs API; an actor is SIGKILLed, then the second node disappears."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    node2 = ray_cluster.add_node(num_cpus=1)
    run = fresh_run(score_run, tmp_path / "run")
    client = JobSubmissionClient(ray_cluster.dashboard)
    entry = shlex.join(
        [sys.executable, str(REPO / "jobs" / "score.py"), *_score_args(score_run["data"], run)]
    )
    job = client.submit_job(entrypoint=entry, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        # Both actors up and working: one on each node (SPREAD).
        def spread() -> bool:
            actors = _alive_score_actors(ray_cluster)
            return len({a.node_id for a in actors}) == 2 and _done(run) >= 2

        _wait(spread, WAIT, "two ScoreActors on two nodes scoring")
        actors = _alive_score_actors(ray_cluster)
        ips = {a.node_id: None for a in actors}
        from ray.util.state import list_nodes

        for n in list_nodes(address=ray_cluster.dashboard, timeout=10):
            if n.node_id in ips:
                ips[n.node_id] = n.node_ip
        on_head = next(a for a in actors if ips[a.node_id] != NODE_IP)
        os.kill(on_head.pid, signal.SIGKILL)
        killed_at = _done(run)

        # The run goes on (a replacement actor starts), then node 2 vanishes.
        _wait(lambda: _done(run) >= killed_at + 3, WAIT, "progress after the actor kill")
        assert client.get_job_status(job) == JobStatus.RUNNING, "run ended before the node loss"
        node2.kill()
        _wait(lambda: client.get_job_status(job).is_terminal(), WAIT, "job end", poll=1)
        logs = client.get_job_logs(job)
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    finally:
        if not client.get_job_status(job).is_terminal():
            client.stop_job(job)
    summary = _check_table(run, score_run["data"], score_run["samples"])
    assert summary["rows_error"] == 0 and not summary["shards_failed"]
    assert summary["actors_replaced"] >= 2 and summary["retries"] >= 1
    assert "ETA" in logs or "score:" in logs  # progress a person can follow
    progress = json.load(open(f"{run}/scores/progress.json"))
    assert progress["shards_done"] == progress["shards_total"]


def _score_command(score_run, run: str, cluster, workers: int) -> tuple[list[str], dict]:
    """`diffin score` of ``run`` on ``cluster`` as a subprocess: its argv and environment."""
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "score",
        *_score_args(score_run["data"], run, workers=workers),
        "--address",
        cluster.address,
    ]
    return cmd, {**os.environ, "RAY_AUTH_MODE": "disabled"}


def test_driver_killed_then_rerun_resumes(ray_cluster, score_run, tmp_path):
    run = fresh_run(score_run, tmp_path / "run")
    cmd, env = _score_command(score_run, run, ray_cluster, workers=2)
    first = subprocess.Popen(
        cmd, start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait(lambda: _done(run) >= 6, WAIT, "some shards scored")
    finally:
        kill_all(tree(first.pid))
        first.wait(timeout=30)
    assert not os.path.exists(f"{run}/scores.parquet")
    before = _done(run)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["shards_resumed"] >= before - 2  # a record written after the kill is fine
    assert summary["shards_scored_now"] + summary["shards_resumed"] == summary["shards"]
    _check_table(run, score_run["data"], score_run["samples"])


def test_a_driver_sent_sigterm_stops_cleanly_and_the_rerun_resumes(
    ray_cluster, score_run, tmp_path
):
    """Walkthrough: SIGTERM (`kill`, `timeout`, Kubernetes, `ray job stop`) met Ray's
    handler in the driver: a C++ stack dump and exit 134 instead of the interrupt path."""
    run = fresh_run(score_run, tmp_path / "run")
    cmd, env = _score_command(score_run, run, ray_cluster, workers=1)
    first = subprocess.Popen(
        cmd, start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        _wait(lambda: _done(run) >= 2, WAIT, "some shards scored")
        first.send_signal(signal.SIGTERM)
        err = first.communicate(timeout=60)[1].decode()
    finally:
        kill_all(tree(first.pid))
    assert first.returncode == 143, err[-3000:]
    assert "terminated (SIGTERM); run the same command again" in err
    assert "SIGTERM received" not in err and "Traceback" not in err
    assert not os.path.exists(f"{run}/scores.parquet")
    before = _done(run)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["shards_resumed"] == before > 0
    _check_table(run, score_run["data"], score_run["samples"])


@pytest.mark.slow  # about 3 minutes on 2 busy cores (five actor start-ups)
def test_poison_shards_are_recorded_as_failed(ray_cluster, score_run, tmp_path):
    """One shard kills its actor every time, another raises: their samples end as error rows."""
    import ray

    from pipeline.score.driver import ScoreActor, run_scoring

    class PoisonActor(ScoreActor):
        def score(self, url, name, next_url=None, last_try=True):
            if name == "00001":
                os._exit(1)
            if name == "00003":
                raise ValueError("cannot score this one")
            return super().score(url, name, next_url, last_try)

    run = fresh_run(score_run, tmp_path / "run")
    cfg = one_actor_config(
        score_run,
        run,
        ray_cluster.address,
        "{00000..00005}",
        methods=["diffin", "random"],
        batch_size=8,
        max_attempts=2,
    )
    try:
        summary = run_scoring(cfg, actor_cls=PoisonActor)
    finally:
        ray.shutdown()
    assert set(summary["shards_failed"]) == {"00001", "00003"}
    assert "ValueError" in summary["shards_failed"]["00003"]
    assert summary["actors_replaced"] == 2 and summary["retries"] == 2
    # progress.json too (it counted only the deaths that left a try: 1, review)
    progress = json.load(open(f"{run}/scores/progress.json"))
    assert (progress["actors_replaced"], progress["retries"]) == (2, 2)
    t = pq.read_table(f"{run}/scores.parquet").to_pydict()
    errors = [
        (k, e) for k, e, s in zip(t["key"], t["error"], t["status"], strict=True) if s == "error"
    ]
    # rows in = rows out: both shards are readable, so each sample keeps its row
    assert len(errors) == 2 * 8 and not any(k == "__shard__" for k, _ in errors)
    assert all("failed after 2 attempt(s)" in e for _, e in errors)
    assert len(t["uid"]) == 6 * 8
    # A rerun retries the failed shards only (they may be transient), and they fail again.
    try:
        again = run_scoring(cfg, actor_cls=PoisonActor)
    finally:
        ray.shutdown()
    assert again["shards_resumed"] == 4 and set(again["shards_failed"]) == {"00001", "00003"}


def test_actors_that_never_start_stop_the_run_with_the_reason(ray_cluster, score_run, tmp_path):
    """A start-up failure every actor hits ends the run after a few tries, not one per shard."""
    import ray

    from pipeline.score.config import ScoreConfig
    from pipeline.score.driver import ScoreActor, run_scoring

    class BrokenActor(ScoreActor):
        def __init__(self, *args, **kwargs):
            raise FileNotFoundError("sets/reference.safetensors is gone")

    run = fresh_run(score_run, tmp_path / "run")
    cfg = ScoreConfig(
        data=score_run["data"],  # 72 shards
        run=run,
        methods=["random"],
        address=ray_cluster.address,
        workers=1,
        max_attempts=2,
    )
    try:
        with pytest.raises(StageFailed, match="2 scoring actors in a row.*reference.safetensors"):
            run_scoring(cfg, actor_cls=BrokenActor)
    finally:
        ray.shutdown()
    assert not os.path.exists(f"{run}/scores.parquet")


def test_a_failure_every_shard_hits_stops_the_run_before_it_publishes(
    ray_cluster, score_run, tmp_path
):
    """Review: with every score call raising (out of GPU memory at --batch-size) the run spent
    max_attempts tries on each of the pool's shards, then published a table of error rows."""
    import ray

    from pipeline.score.config import ScoreConfig
    from pipeline.score.driver import ScoreActor, run_scoring

    calls = tmp_path / "calls"  # one line per score call, from the actor's process

    class OutOfMemory(ScoreActor):
        def score(self, url, name, next_url=None, last_try=True):
            with open(calls, "a") as f:
                f.write(name + "\n")
            if name >= "00002":
                raise RuntimeError("CUDA out of memory")
            return super().score(url, name, next_url, last_try)

    run = fresh_run(score_run, tmp_path / "run")
    cfg = ScoreConfig(
        data=score_run["data"],  # 72 shards
        run=run,
        methods=["random"],
        address=ray_cluster.address,
        workers=1,
        max_attempts=2,
    )
    try:
        with pytest.raises(
            StageFailed, match=r"^5 shards in a row failed an attempt, none scored in between"
        ) as err:
            run_scoring(cfg, actor_cls=OutOfMemory)
        assert "CUDA out of memory" in str(err.value)
        # stopped at the fifth shard's first attempt, not after every shard's (review: a
        # failed shard goes to the back of the queue, so the last attempts came last)
        assert calls.read_text().split() == [f"{i:05d}" for i in range(7)]
        assert not os.path.exists(f"{run}/scores.parquet")  # nothing published
        assert _done(run) == 2  # the shards scored before it are kept
        again = run_scoring(
            dataclasses.replace(cfg, data=score_run["data"].split("{")[0] + "{00000..00003}.tar")
        )
    finally:
        ray.shutdown()
    assert again["shards_resumed"] == 2 and again["shards_scored_now"] == 2


def test_an_actor_whose_gpu_context_broke_is_replaced_not_kept(ray_cluster, score_run, tmp_path):
    """GPU-path review: after an illegal memory access every CUDA call of the process fails
    at once, so a kept actor took shard after shard and failed them all (a healthy actor's
    successes kept resetting the breaker). It now exits and Ray gives a fresh process."""
    import ray
    import torch

    from pipeline.score.driver import ScoreActor, run_scoring

    marker = tmp_path / "context-broke-once"

    class BrokenContext(ScoreActor):
        def __init__(self, *args):
            super().__init__(*args)
            score_samples = self.scorer.score_samples

            def once(batch, methods=None):
                if not marker.exists():
                    marker.touch()
                    raise torch.AcceleratorError(
                        "CUDA error: an illegal memory access was encountered"
                    )
                return score_samples(batch, methods)

            self.scorer.score_samples = once

    run = fresh_run(score_run, tmp_path / "run")
    cfg = one_actor_config(score_run, run, ray_cluster.address, "{00000..00005}", max_attempts=2)
    try:
        summary = run_scoring(cfg, actor_cls=BrokenContext)
    finally:
        ray.shutdown()
    assert marker.exists() and summary["actors_replaced"] == 1
    assert summary["shards_scored_now"] == 6 and not summary["shards_failed"]
    assert summary["rows_error"] == 0


def test_a_pool_that_scores_nothing_fails_and_keeps_the_earlier_table(
    ray_cluster, score_run, tmp_path, caplog
):
    """Walkthrough: `--data afile` (an empty file, a typo) replaced a scored table with one
    error row, and the command exited 0."""
    import dataclasses

    import ray

    from pipeline.errors import ConfigError
    from pipeline.score.config import ScoreConfig
    from pipeline.score.driver import run_scoring

    run = fresh_run(score_run, tmp_path / "run")
    good = ScoreConfig(
        data=score_run["data"].split("{")[0] + "00000.tar",
        run=run,
        methods=["random"],
        address=ray_cluster.address,
        workers=1,
    )
    typo = tmp_path / "afile"
    typo.write_bytes(b"")
    # other scorers too: a rescore that did not write its table (its inputs are recorded)
    bad = dataclasses.replace(good, data=str(typo), max_attempts=1, methods=["loss"])
    from pipeline.rundir import RunDir
    from pipeline.score.table import check_scores_current

    try:
        run_scoring(good)
        before = pq.read_table(f"{run}/scores.parquet")
        with caplog.at_level("WARNING", logger="pipeline.score.table"):
            check_scores_current(RunDir(run))
        assert "did not write this table" not in caplog.text
        with pytest.raises(ConfigError, match=r"^data: no sample of the 1 shard\(s\) could be sc"):
            run_scoring(bad)
        assert pq.read_table(f"{run}/scores.parquet").equals(before)
        failed = pq.read_table(f"{run}/scores-failed.parquet").to_pydict()
        assert failed["status"] == ["error"] and "not a tar file" in failed["error"][0]
        # prune, evaluate and report now say the table is the earlier run's (walkthrough:
        # after an interrupted rescore they went on without a word)
        with caplog.at_level("WARNING", logger="pipeline.score.table"):
            check_scores_current(RunDir(run))
        assert "with other inputs, did not write this table" in caplog.text
        fresh = fresh_run(score_run, tmp_path / "fresh")
        with pytest.raises(ConfigError, match="The error rows are in"):
            run_scoring(dataclasses.replace(bad, run=fresh))
        # every row an error for a per-sample reason: the reason is in the message (review)
        keys = fresh_run(score_run, tmp_path / "keys")
        with pytest.raises(ConfigError, match=r"could be scored \(\d+ x missing image") as info:
            run_scoring(dataclasses.replace(good, run=keys, image_keys=["webp"]))
        # most frequent first, with a damaged shard's own reason among them (walkthrough:
        # the one truncated shard was named, not the 231 images that could not be read)
        cut = tmp_path / "cut"
        cut.mkdir()
        shard = score_run["data"].split("{")[0] + "00000.tar"
        (cut / "00000.tar").write_bytes(open(shard, "rb").read())
        (cut / "00001.tar").write_bytes(open(shard, "rb").read()[:3000])
        mixed = dataclasses.replace(
            good, data=f"{cut}/", run=fresh_run(score_run, tmp_path / "mixed"), image_keys=["webp"]
        )
        with pytest.raises(ConfigError, match=r"could be scored \((\d+) x missing image") as info:
            run_scoring(mixed)
        assert re.search(r"; 1 x unreadable shard: truncated tar", str(info.value))
        # the flags it names are the CLI's (walkthrough: it said --image-keys)
        from pipeline.cli import build_parser

        flags = build_parser().parse_args(["score", "--data", "d", "--run", "r"])
        named = re.findall(r"--([a-z-]+)", str(info.value))
        assert {"image-key", "text-key"} <= set(named)
        assert all(hasattr(flags, n.replace("-", "_")) for n in named)
        again = run_scoring(good)  # a later good run: the table and its summary as before
    finally:
        ray.shutdown()
    # review: the merge path had taken the name of the target's description; random points
    # toward no target, so none is described (test_reuse checks a diffin run's)
    assert again["target"] is None
    assert again["table"] == f"{run}/scores.parquet"
    assert not os.path.exists(f"{run}/scores-failed.parquet")  # superseded
    assert not os.path.exists(f"{run}/scores.new.parquet")
    assert pq.read_table(f"{fresh}/scores.parquet").num_rows == 1  # rows in = rows out


def test_damaged_shards_are_named_in_the_summary_and_the_log(
    ray_cluster, score_run, tmp_path, caplog
):
    """Walkthrough: a pool with a shard that is no tar and one cut short logged "4/4 shards
    (0 failed, 0 retries)"; only rows_error hinted that pairs were lost."""
    import ray

    from pipeline.score.config import ScoreConfig
    from pipeline.score.driver import run_scoring

    good = score_run["data"].split("{")[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "00010.tar").write_bytes(b"<html>404 Not Found</html>" * 40)
    # its first sample keyed like the shard's own error row (review: the shard went
    # unnamed, and the two rows shared a uid)
    whole = _first_sample_keyed(open(f"{good}00001.tar", "rb").read(), "__shard__")
    (bad / "00011.tar").write_bytes(whole[: len(whole) // 2])
    # and a good shard copied under another name: its uids on two rows each
    (bad / "00012.tar").write_bytes(open(f"{good}00000.tar", "rb").read())
    cfg = ScoreConfig(
        data=f"{good}00000.tar::{bad}/00010.tar::{bad}/00011.tar::{bad}/00012.tar",
        run=fresh_run(score_run, tmp_path / "run"),
        methods=["random"],
        address=ray_cluster.address,
        workers=1,
        max_attempts=2,
    )
    try:
        with caplog.at_level("WARNING", logger="pipeline.score.driver"):
            summary = run_scoring(cfg)
        again = run_scoring(cfg)  # resumed: still named
    finally:
        ray.shutdown()
    damaged = summary["shards_damaged"]
    assert sorted(damaged) == ["00010", "00011"]
    assert "not a tar file" in damaged["00010"] and "truncated tar" in damaged["00011"]
    assert not summary["shards_failed"] and not summary["shards_partial"]
    assert "shard 00011 could not be read to its end: unreadable shard" in caplog.text
    assert re.search(
        r"shard 00011 could not be read to its end: [^\n]*its rows before", caplog.text
    )
    # a file with no sample before the damage says so (walkthrough: "its rows before the
    # damage are scored" for a shard that had none)
    assert re.search(r"shard 00010 could not be read[^\n]*no sample could be read", caplog.text)
    assert again["shards_resumed"] == 4 and again["shards_damaged"] == damaged
    from pipeline.data.reader import iter_shard

    copied = sum(1 for _ in iter_shard(f"{good}00000.tar", decode_images=False))
    assert summary["duplicate_uids"] == copied
    assert (
        f"scores: {copied} rows repeat another row's uid" in caplog.text
    )  # said, not only counted
    table = pq.read_table(f"{cfg.run}/scores.parquet").to_pydict()
    keyed = [i for i, k in enumerate(table["key"]) if k == "__shard__"]
    assert sorted(table["status"][i] for i in keyed) == ["error", "error", "ok"]
    assert len({table["uid"][i] for i in keyed}) == 3


def _first_sample_keyed(raw: bytes, key: str) -> bytes:
    """The tar ``raw`` with its first sample's members renamed to ``key``."""
    import io
    import tarfile

    src, out = tarfile.open(fileobj=io.BytesIO(raw)), io.BytesIO()
    members = src.getmembers()
    first = members[0].name.split(".", 1)[0]
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as dst:
        for m in members:
            data = src.extractfile(m).read()
            stem, ext = m.name.split(".", 1)
            m.name = f"{key}.{ext}" if stem == first else m.name
            dst.addfile(m, io.BytesIO(data))
    return out.getvalue()


def test_a_shard_that_cannot_be_read_is_tried_again_before_it_becomes_rows(
    ray_cluster, score_run, tmp_path
):
    """Shard 00002 is unreachable on its first try only; 00004 on every try."""
    import ray

    from pipeline.score.driver import ScoreActor, is_done, run_scoring
    from pipeline.score.merge import read_record

    marker = tmp_path / "00002-hidden-once"

    class FlakyStoreActor(ScoreActor):
        def score(self, url, name, next_url=None, last_try=True):
            hide = name == "00004" or (name == "00002" and not marker.exists())
            if not hide:
                return super().score(url, name, next_url, last_try)
            marker.touch()
            os.rename(url, url + ".away")  # "cannot open", as a store that is briefly down
            try:
                return super().score(url, name, next_url, last_try)
            finally:
                os.rename(url + ".away", url)

    run = fresh_run(score_run, tmp_path / "run")
    cfg = one_actor_config(
        score_run,
        run,
        ray_cluster.address,
        "{00000..00005}",
        batch_size=8,
        max_attempts=2,
        prefetch_batches=0,  # each shard is opened inside its own score() call
    )
    try:
        summary = run_scoring(cfg, actor_cls=FlakyStoreActor)
    finally:
        ray.shutdown()
    assert summary["retries"] == 2 and not summary["shards_failed"]
    # the reason, as for a failed shard (was: the name only; review)
    assert list(summary["shards_partial"]) == ["00004"]
    assert "cannot open" in summary["shards_partial"]["00004"]
    t = pq.read_table(f"{run}/scores.parquet").to_pydict()
    rows = list(zip(t["shard"], t["key"], t["status"], t["error"], strict=True))
    assert [r for r in rows if r[2] == "error"] == [
        (r[0], "__shard__", "error", r[3]) for r in rows if r[0].endswith("00004.tar")
    ]
    assert len(rows) == 5 * 8 + 1 and "cannot open" in next(r[3] for r in rows if r[3])
    from pipeline.rundir import RunDir

    record = read_record(RunDir(run).part("00004"))
    assert record["status"] == "partial" and "cannot open" in record["reason"]
    url4 = next(r[0] for r in rows if r[0].endswith("00004.tar"))
    fp = json.load(open(f"{run}/scores/fingerprint.json"))["hash"]
    assert is_done(RunDir(run), url4, "00004", fp) is None  # a rerun tries it again


def test_shards_with_fewer_samples_than_img2dataset_wrote_are_reported(
    ray_cluster, score_run, tmp_path
):
    """A shard cut short at a member boundary is a valid tar: only the sidecar tells."""
    import tarfile

    import ray

    from pipeline.score.config import ScoreConfig
    from pipeline.score.driver import run_scoring

    pool, _ = _pool_of_three(score_run, tmp_path)
    (pool / "00001_stats.json").write_text(json.dumps({"successes": 10, "count": 12}))
    (pool / "00000_stats.json").write_text(json.dumps({"successes": 8}))  # as many as read
    with tarfile.open(pool / "00002.tar", "w"):
        pass  # a valid tar with no member
    (pool / "00003.tar").write_bytes(os.urandom(3000))  # unreadable: a row, not "empty"
    run = fresh_run(score_run, tmp_path / "run")
    cfg = ScoreConfig(
        data=str(pool / "{00000..00003}.tar"),
        run=run,
        methods=["random"],
        address=ray_cluster.address,
        workers=1,
        batch_size=8,
    )
    try:
        summary = run_scoring(cfg)
        again = run_scoring(cfg)  # everything resumed: the summary still says so
        third = run_scoring(cfg)
    finally:
        ray.shutdown()
    for s in (summary, again):
        assert s["shards_short"] == {"00001": {"read": 8, "expected": 10}}
        assert s["shards_empty"] == ["00002"]
        assert not s["shards_failed"] and s["rows"] == 16 + 1
    assert again["shards_resumed"] == 4
    assert (
        summary["samples_per_second"] > 0 and again["samples_per_second"] is None
    )  # none measured
    # walkthrough: a rerun that scored nothing replaced the scoring run's rates in run.json;
    # they are kept beside it, through any number of such reruns
    earlier = {k: summary[k] for k in ("seconds", "samples_per_second", "actors")}
    for s in (again, third):
        assert {k: s["earlier_scoring"][k] for k in earlier} == earlier
    with open(os.path.join(run, "run.json")) as f:
        stored = json.load(f)["score"]["summary"]["earlier_scoring"]
    assert stored["samples_per_second"] == summary["samples_per_second"]
    assert "earlier_scoring" not in summary


def test_a_shard_rewritten_in_place_is_scored_again(ray_cluster, score_run, tmp_path, caplog):
    """Same name, other samples: a rerun rescores that shard and keeps the others' parts."""
    import dataclasses
    import shutil

    import ray

    from pipeline.errors import ConfigError
    from pipeline.prune.config import PruneConfig
    from pipeline.prune.manifest import write_manifest
    from pipeline.score.config import ScoreConfig
    from pipeline.score.driver import run_scoring

    pool, src = _pool_of_three(score_run, tmp_path)
    run = fresh_run(score_run, tmp_path / "run")
    cfg = ScoreConfig(
        data=str(pool / "{00000..00002}.tar"),
        run=run,
        methods=["loss"],
        address=ray_cluster.address,
        workers=1,
        batch_size=8,
    )
    try:
        first = run_scoring(cfg)
        old = pq.read_table(f"{run}/scores.parquet").to_pydict()
        # The pool's 00001 is rewritten in place with other samples (those of 00005).
        shutil.copy(f"{src}00005.tar", pool / "00001.tar")
        # prune re-reads the kept samples by key: the rewritten shard is refused, not copied
        with pytest.raises(ConfigError, match=r"00001.tar was rewritten since it was scored"):
            write_manifest(PruneConfig(run=run, keep=1.0, method="loss"))
        with caplog.at_level("WARNING", logger="pipeline.score.driver"):
            again = run_scoring(cfg)
        new = pq.read_table(f"{run}/scores.parquet").to_pydict()
        pruned = write_manifest(PruneConfig(run=run, keep=1.0, method="loss"))
        with caplog.at_level("INFO", logger="pipeline.score.driver"):
            other = run_scoring(dataclasses.replace(cfg, methods=["tracin", "random"]))
        write_manifest(PruneConfig(run=run, keep=0.5, method="tracin"))  # the new records
    finally:
        ray.shutdown()
    assert pruned["kept"] == sum(s == "ok" for s in new["status"])
    assert other["shards_scored_now"] == 3
    # the loss manifest (loss-keep1) ranks the table the tracin rescore replaced: said, not left silent
    assert "stale_manifests" not in again
    assert other["stale_manifests"] == ["loss-keep1"]
    assert "prune manifests loss-keep1 rank an earlier score table" in caplog.text
    # what changed is said (was: nothing), and that tracin has no curated target
    assert re.search(r"inputs changed since the last score run \(--methods\)", caplog.text)
    assert "no --target: the influence scores point toward a held-out sample" in caplog.text
    assert "the new table holds no loss (not in --methods)" in caplog.text  # walkthrough
    assert first["shards_scored_now"] == 3
    assert again["shards_resumed"] == 2 and again["shards_scored_now"] == 1
    assert "shard 00001 changed since it was scored" in caplog.text
    from pipeline.data.reader import iter_shard

    keys = [s.key for s in iter_shard(str(pool / "00001.tar"))]
    assert [k for k, u in zip(new["key"], new["shard"], strict=True) if "00001" in u] == keys
    assert keys != [k for k, u in zip(old["key"], old["shard"], strict=True) if "00001" in u]
    for name in ("00000", "00002"):  # untouched shards keep their scores
        assert [x for x, u in zip(new["loss"], new["shard"], strict=True) if name in u] == [
            x for x, u in zip(old["loss"], old["shard"], strict=True) if name in u
        ]


def test_an_actor_no_node_can_place_is_reported_and_starts_once_a_node_joins(
    ray_cluster, score_run, tmp_path, caplog, monkeypatch
):
    """An existing cluster may be adding a node: a pending actor is named in the log, not refused."""
    import logging

    import ray

    from pipeline.score.driver import run_scoring

    monkeypatch.setattr("pipeline.score.driver.PENDING_WARNING_S", 2.0)
    run = fresh_run(score_run, tmp_path / "run")
    cfg = one_actor_config(
        score_run,
        run,
        ray_cluster.address,
        "{00000..00002}",
        threads=3,  # the head has 2 CPUs: no node can place the actor yet
        batch_size=8,
    )
    try:
        with (
            caplog.at_level(logging.WARNING, logger="pipeline.score.driver"),
            ray_cluster.node_added_when(lambda: "has waited" in caplog.text, num_cpus=3),
        ):
            summary = run_scoring(cfg)
    finally:
        ray.shutdown()
    warnings = [r.getMessage() for r in caplog.records if "has waited" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per actor, not once per poll
    assert "(--threads, --gpus-per-worker)" in warnings[0]
    assert "--entrypoint-num-gpus" in warnings[0]
    assert summary["shards_scored_now"] == 3 and not summary["shards_failed"]
    assert [a["node"] for a in summary["actors"]] == [NODE_IP]  # placed on the new node


def test_an_interrupted_run_leaves_progress_json_at_what_it_finished(
    ray_cluster, score_run, tmp_path, monkeypatch
):
    """Walkthrough: after a SIGINT with 5 of 10 parts committed, progress.json still read
    "shards_done": 0 (it is written every 10 s, and not at the end of an interrupted run)."""
    import ray

    import pipeline.score.driver as driver

    real = driver.schedule

    def interrupted(todo, make_actor, workers, attempts, on_done, *rest, **kw):
        done = []

        def done_then_interrupt(*args):
            on_done(*args)
            done.append(args)
            if len(done) == 2:  # the second within the 10 s between two writes
                raise KeyboardInterrupt

        return real(todo, make_actor, workers, attempts, done_then_interrupt, *rest, **kw)

    monkeypatch.setattr(driver, "schedule", interrupted)
    run = fresh_run(score_run, tmp_path / "run")
    cfg = one_actor_config(score_run, run, ray_cluster.address, "{00000..00003}")
    try:
        with pytest.raises(KeyboardInterrupt):
            driver.run_scoring(cfg)
        progress = json.load(open(f"{run}/scores/progress.json"))
        assert progress["state"] == "interrupted"
        assert (progress["shards_done"], progress["shards_total"]) == (2, 4)
        assert progress["samples_total"] == 16
        monkeypatch.setattr(driver, "schedule", real)
        driver.run_scoring(cfg)  # resumed: "finished" once merged, not before
    finally:
        ray.shutdown()
    progress = json.load(open(f"{run}/scores/progress.json"))
    assert (progress["state"], progress["shards_done"], progress["shards_resumed"]) == (
        "finished",
        4,
        2,
    )
