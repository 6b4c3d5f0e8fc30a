"""Data-parallel training on real Ray Train workers (gloo, CPU) computes the single-process run.

Tolerance: in float64, 2 workers match one process to 1e-12 (relative and
absolute, every tensor of every checkpoint); measured here: about 2e-15,
the order of float64 rounding. The two paths differ only in the order of
floating-point sums (each worker sums its half of the batch, then the
halves are averaged), so the bound is float64 rounding amplified over 30
steps, with a thousandfold margin for other BLAS blockings. A per-worker
loss on each half batch (the objective without the feature gather) moves
the same checkpoints by about 20%, so the bound does test the gather.
In float32 the same comparison measures about 7e-7 relative.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import ray
import torch

from pipeline.raylocal import connect
from pipeline.rundir import RunDir
from pipeline.train.trajectory import train

FP64_TOL = 1e-12


@pytest.fixture(scope="module")
def local_ray():
    """One embedded Ray for the module (``train`` reuses a connected Ray instead of starting one)."""
    started = connect(None, 2)
    yield
    if started:
        ray.shutdown()


def _state(run: str, step: int) -> dict[str, torch.Tensor]:
    return torch.load(RunDir(run).checkpoint(step), map_location="cpu", weights_only=True)


def test_two_workers_reach_the_single_process_checkpoints(tiny_run, tmp_path, capfd):
    # no local_ray: train starts its own embedded Ray, as `diffin train --workers 2` does
    if ray.is_initialized():  # the module's Ray, where another test ran first
        ray.shutdown()
    one_cfg = dataclasses.replace(
        tiny_run["config"], run=str(tmp_path / "one"), precision="fp64", lr=0.02
    )
    one = train(one_cfg)
    two = train(dataclasses.replace(one_cfg, run=str(tmp_path / "two"), workers=2))
    assert two["workers"] == 2 and two["precision"] == "fp64"
    # the embedded Ray has no dashboard: Ray Train's placement-group cleaner warned that the
    # state API was unavailable every few seconds of the training (walkthrough)
    assert "State API may be temporarily unavailable" not in capfd.readouterr().err
    assert [(c["step"], c["lr"]) for c in two["checkpoints"]] == [
        (c["step"], c["lr"]) for c in one["checkpoints"]
    ]
    assert [s for s, _ in two["loss_curve"]] == [s for s, _ in one["loss_curve"]]
    assert [v for _, v in two["loss_curve"]] == pytest.approx([v for _, v in one["loss_curve"]])
    worst = 0.0
    for c in one["checkpoints"]:
        a, b = _state(one_cfg.run, c["step"]), _state(str(tmp_path / "two"), c["step"])
        assert set(a) == set(b)
        for k in a:
            assert b[k].dtype == torch.float64 or not b[k].is_floating_point()
            torch.testing.assert_close(b[k], a[k], rtol=FP64_TOL, atol=FP64_TOL, msg=k)
            if a[k].is_floating_point():
                worst = max(worst, (a[k] - b[k]).abs().max().item())
    print(f"max |2 workers - 1 process| over checkpoints: {worst:.3g}")
    # the sets are the driver's, written once, identical
    for name in ("reference", "target", "grad_batches"):
        assert (
            Path(RunDir(one_cfg.run).set_file(name)).read_bytes()
            == Path(RunDir(str(tmp_path / "two")).set_file(name)).read_bytes()
        )


def test_two_workers_resume_an_interrupted_single_process_run(
    local_ray, interrupted, tiny_run, tmp_path
):
    run = str(tmp_path / "run")
    shutil.copytree(interrupted["run"], run)
    killed = int(torch.load(RunDir(run).resume_state, weights_only=True)["step"])
    rec = train(dataclasses.replace(interrupted["config"], run=run, workers=2))
    assert rec["resumed_at"] == [killed]
    want = tiny_run["record"]["checkpoints"]
    assert [(c["step"], c["lr"]) for c in rec["checkpoints"]] == [
        (c["step"], c["lr"]) for c in want
    ]
    # written before the kill: untouched; after it: the 2 workers' float32 result
    assert rec["checkpoints"][0]["sha256"] == want[0]["sha256"]
    a, b = _state(tiny_run["run"], want[-1]["step"]), _state(run, want[-1]["step"])
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not Path(RunDir(run).resume_state).exists()


def test_ctrl_c_during_ray_train_says_so_and_keeps_the_resume_state(tiny_pool, tmp_path):
    """Walkthrough: Ctrl-C during `train --workers` exited 1 without a word (Ray Train's
    own handler aborts the run, then exits or lets fit fail on the aborted controller)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "pipeline.cli", "train", "--data", tiny_pool["train_data"],
        "--run", str(run), "--model", "diffin-tiny", "--steps", "100000", "--checkpoints", "2",
        "--threads", "1", "--workers", "2", "--resume-every", "5",
    ]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    first = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline, state = time.monotonic() + 240, Path(RunDir(str(run)).resume_state)
        while not state.exists():  # rank 0 saved a resume point: training is under way
            assert time.monotonic() < deadline and first.poll() is None, "no resume state"
            time.sleep(0.5)
        first.send_signal(signal.SIGINT)
        err = first.communicate(timeout=120)[1]
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err[-3000:]
    assert "diffin train: interrupted; " in err and "Traceback" not in err
    saved = int(torch.load(state, weights_only=True)["step"])
    assert 0 < saved < 100000  # what the rerun resumes from (the test above resumes one)
    # said as it exits, from rank 0's record (train/progress.py), written after each state:
    # an interrupt between the two leaves the record one state behind
    last = err.strip().splitlines()[-1]
    assert "; run the same command again to resume from " in last, last
    if "resume from step " in last:
        assert 0 < int(last.split("resume from step ")[1].split()[0]) <= saved


def test_ray_train_folders_of_killed_trainings_are_removed(tmp_path, monkeypatch):
    """Walkthrough: a training killed with SIGKILL left its Ray Train folder in /tmp, one
    per kill; the next training removes those whose owner no longer holds their lock."""
    import fcntl
    import os
    import tempfile

    from pipeline.train import distributed

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / "diffin-train-123-abc"  # its owner killed: the lock is free
    live = tmp_path / "diffin-train-456-def"  # a training under way holds its lock
    bare = tmp_path / "diffin-train-789-ghi"  # no lock yet (being made), or an older diffin's
    other = tmp_path / "diffin-trainer-notes"
    for d in (dead, live, bare, other):
        (d / "diffin-train").mkdir(parents=True)
    for d in (dead, live, other):
        (d / distributed.OWNER).touch()
    held = os.open(live / distributed.OWNER, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        made, owner = distributed._storage_dir()
        assert Path(made).parent == tmp_path
        assert Path(made).name.startswith(f"diffin-train-{os.getpid()}-")
        assert not dead.exists() and live.exists() and bare.exists() and other.exists()
        distributed._storage_dir()  # another training starting: this one's folder is held
        assert Path(made).exists()
        os.close(owner)  # as if killed
        distributed._storage_dir()
        assert not Path(made).exists()
    finally:
        os.close(held)
