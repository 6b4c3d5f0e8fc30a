"""The per-run work (directions, propagation) handed to a GPU node when the driver has none.

A real two-node loopback Ray: the second node declares a GPU it does not have
(a Ray resource), as a KubeRay GPU worker would, while the driver (this
process) has no CUDA device. The directions task must run there, and its
files must be the ones the driver would have computed itself.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
from raycluster import NODE_IP, fresh_run

pytestmark = pytest.mark.timeout(420)


def test_a_driver_without_gpu_computes_the_directions_on_a_gpu_node(
    ray_cluster, score_run, tmp_path, caplog, monkeypatch
):
    import ray

    from pipeline.rundir import RunDir
    from pipeline.score.config import ScoreConfig
    from pipeline.score.directions import set_hashes
    from pipeline.score.driver import prepare_directions
    from pipeline.score.trajectory import load_trajectory
    from pipeline.tensors import load_tensors

    assert not torch.cuda.is_available()  # the point of the test: this process has no GPU
    monkeypatch.setattr("pipeline.score.driver.REQUIRE_CUDA", False)  # the node's GPU is declared
    run = fresh_run(score_run, tmp_path / "run")
    shutil.rmtree(Path(run) / "directions")  # computed again, by the task
    before = ray_cluster.alive_nodes()
    node = ray_cluster.add_node(num_cpus=1, num_gpus=1)
    cfg = ScoreConfig(
        data=score_run["data"],
        run=run,
        methods=["diffin"],
        address=ray_cluster.address,
        workers=1,
        threads=1,
    )
    try:
        rd = RunDir(run)
        with caplog.at_level(logging.INFO, logger="pipeline.score.driver"):
            target = prepare_directions(cfg, rd, load_trajectory(rd), set_hashes(rd))
        deadline = time.time() + 60  # the actor is killed; Ray frees its GPU soon after
        while ray.available_resources().get("GPU", 0) < 1 and time.time() < deadline:
            time.sleep(0.5)
        gpus_free = ray.available_resources().get("GPU", 0)
    finally:
        ray.shutdown()
        node.kill()
        deadline = time.time() + 120  # later tests must not see a GPU in this cluster
        while ray_cluster.alive_nodes() != before and time.time() < deadline:
            time.sleep(1)
    assert ray_cluster.alive_nodes() == before, "the GPU node is still in the cluster"
    assert gpus_free == 1  # the directions actor gave its GPU back
    assert f"directions: done on {NODE_IP} (cpu)" in caplog.text
    assert target["target_size"] > 0
    here = Path(score_run["run"]) / "directions"
    there = Path(run) / "directions"
    files = sorted(p.name for p in here.iterdir())
    assert files == sorted(p.name for p in there.iterdir()) and files
    for name in files:  # the same work: only the thread count (float rounding) differs
        a, meta_a = load_tensors(str(here / name))
        b, meta_b = load_tensors(str(there / name))
        assert meta_a.get("fingerprint") == meta_b.get("fingerprint"), name
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-7), (name, k)


def test_a_driver_alone_uses_its_own_gpu_and_gives_the_memory_back(score_run, monkeypatch):
    """No cluster named and no Ray job: the machine is this process's own."""
    import ray

    from pipeline.rundir import RunDir
    from pipeline.score import driver
    from pipeline.score.config import ScoreConfig
    from pipeline.score.trajectory import load_trajectory

    assert not ray.is_initialized()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    calls: list = []
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.empty_cache", lambda: calls.append("released"))
    monkeypatch.setattr(driver, "ensure_directions", lambda *a: calls.append(a[4:]) or {})
    rd = RunDir(score_run["run"])
    traj = load_trajectory(rd)
    cfg = ScoreConfig(data=score_run["data"], run=score_run["run"], methods=["diffin"])
    driver.prepare_directions(cfg, rd, traj, {})
    assert calls == [("cuda",), "released"]
    calls.clear()
    off = ScoreConfig(
        data=score_run["data"], run=score_run["run"], methods=["diffin"], gpus_per_worker=0
    )
    driver.prepare_directions(off, rd, traj, {})
    assert calls == [()]  # --gpus-per-worker 0: the CPU, nothing to release
    assert not ray.is_initialized()  # deciding needed no Ray


def test_directions_wait_for_the_gpu_node_an_autoscaler_adds(
    ray_cluster, score_run, tmp_path, caplog, monkeypatch
):
    """Review: on a KubeRay cluster whose GPU group had scaled to zero, the directions ran on
    the head's CPU (hours at scale) although --gpus-per-worker asked for GPUs. Now the
    directions actor asks for one, is reported while it waits, and runs once a node joins."""
    import ray

    from pipeline.rundir import RunDir
    from pipeline.score.config import ScoreConfig
    from pipeline.score.directions import set_hashes
    from pipeline.score.driver import prepare_directions
    from pipeline.score.trajectory import load_trajectory

    monkeypatch.setattr("pipeline.score.driver.REQUIRE_CUDA", False)  # the GPU is declared
    monkeypatch.setattr("pipeline.score.driver.PENDING_WARNING_S", 2.0)
    run = fresh_run(score_run, tmp_path / "run")
    shutil.rmtree(Path(run) / "directions")
    cfg = ScoreConfig(
        data=score_run["data"],
        run=run,
        methods=["diffin"],
        address=ray_cluster.address,
        workers=1,
        threads=1,
        gpus_per_worker=1,
    )
    try:
        with (
            caplog.at_level(logging.INFO, logger="pipeline.score.driver"),
            ray_cluster.node_added_when(lambda: "has waited" in caplog.text, 1, num_gpus=1),
        ):
            rd = RunDir(run)
            prepare_directions(cfg, rd, load_trajectory(rd), set_hashes(rd))
    finally:
        ray.shutdown()
    assert "directions: waiting for a GPU node (--gpus-per-worker 1)" in caplog.text
    assert "the directions actor has waited" in caplog.text
    assert f"directions: done on {NODE_IP} (cpu)" in caplog.text
