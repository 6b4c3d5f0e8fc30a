"""A training killed part-way (SIGKILL), shared by the resume tests of both training paths."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def train_argv(data: str, run: str, cfg: Any) -> list[str]:
    """`diffin train` flags for a TrainConfig (the fields the tiny configs set)."""
    return [
        "train",
        "--data", data,
        "--run", run,
        "--model", cfg.model,
        "--steps", str(cfg.steps),
        "--checkpoints", str(cfg.checkpoints),
        "--batch-size", str(cfg.batch_size),
        "--warmup", str(cfg.warmup),
        "--lr", str(cfg.lr),
        "--target-size", str(cfg.target_size),
        "--reference-size", str(cfg.reference_size),
        "--grad-batches", str(cfg.grad_batches),
        "--threads", str(cfg.threads),
        "--seed", str(cfg.seed),
        "--resume-every", str(cfg.resume_every),
    ]  # fmt: skip


def _saved_step(state: Path) -> int:
    """The step of the saved resume state; -1 while there is none."""
    import torch

    try:
        return int(torch.load(state, weights_only=True)["step"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return -1


@pytest.fixture(scope="session")
def interrupted(tiny_run, tmp_path_factory) -> dict[str, Any]:
    """``tiny_run``'s config run by `diffin train` in a subprocess, SIGKILLed after its first checkpoint.

    ``resume_every=1`` writes the resume state at every step, so the kill
    lands on a state past the first checkpoint (step 15 of 30), with half the
    run still to do however fast the machine is. Treat as read-only.
    """
    import dataclasses

    cfg = dataclasses.replace(tiny_run["config"], resume_every=1)
    run = tmp_path_factory.mktemp("interrupted") / "run"
    argv = [sys.executable, "-m", "pipeline.cli", *train_argv(tiny_run["data"], str(run), cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log = run.parent / "train.log"  # a file, not a pipe: nothing can block the child
    state = run / "trajectory" / "resume.pt"
    first = tiny_run["record"]["checkpoints"][0]["step"]
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 120
        try:
            while _saved_step(state) <= first and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    assert state.exists(), log.read_text(errors="replace")[-2000:]
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (run / "trajectory" / "trajectory.json").exists()
    return {"run": str(run), "config": cfg, "data": tiny_run["data"]}
