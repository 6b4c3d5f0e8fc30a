"""One training process (or one Ray Train worker) from its resume state to the last step.

Shared by the single-process and the data-parallel paths, so both write the
same checkpoints, the same trajectory entries and the same resume state.
Only the writer (rank 0) writes; every rank runs the same hooks in lockstep.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from pipeline.model.batches import Inputs
from pipeline.rundir import RunDir
from pipeline.train.config import TrainConfig
from pipeline.train.loop import BatchLoss, LoopState, clip_loss, core, train_loop
from pipeline.train.progress import ProgressWriter
from pipeline.train.state import ResumeState, cpu_state, load_resume, save_checkpoint, save_resume

log = logging.getLogger(__name__)


def save_steps(cfg: TrainConfig, ckpt_steps: list[int]) -> set[int]:
    """Where the resume state is written: at every checkpoint, and every ``resume_every`` steps."""
    every = set(range(cfg.resume_every, cfg.steps, cfg.resume_every)) if cfg.resume_every else set()
    return set(ckpt_steps) | every


def run_resumable(
    model: nn.Module,
    images: torch.Tensor | Inputs,
    tokens: torch.Tensor,
    cfg: TrainConfig,
    order: list[torch.Tensor],
    ckpt_steps: list[int],
    run: RunDir,
    fingerprint: str,
    *,
    writer: bool = True,
    rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_loss: BatchLoss = clip_loss,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> ResumeState | None:
    """Train, continuing from RUN's resume state if there is one; returns the writer's final state.

    ``model`` may be wrapped in DistributedDataParallel; its CLIP model must
    already hold the initial theta (the resume state, if any, replaces it).
    """
    clip = core(model)
    resumed = load_resume(run, fingerprint)
    loop_state = None
    saved: list[dict] = []
    resumed_at: list[int] = []
    if resumed is not None:
        clip.load_state_dict(resumed.model)
        loop_state = LoopState(resumed.step, resumed.optimizer, resumed.losses)
        saved = list(resumed.checkpoints)
        resumed_at = [*resumed.resumed_at, resumed.step]
        if writer:  # once, not once per Ray Train worker (walkthrough)
            log.info("resuming training at step %d of %d", resumed.step, cfg.steps)
    done = {int(c["step"]) for c in saved}
    final: list[ResumeState] = []
    start = resumed.step if resumed is not None else 0
    record = ProgressWriter(run, cfg.steps, start, start if resumed else None) if writer else None

    def keep(step: int, lr: float, _m: nn.Module) -> None:
        if writer and step not in done:
            saved.append(save_checkpoint(run, clip, step, lr))
            done.add(step)
            log.info("step %d of %d: checkpoint saved", step, cfg.steps)

    def save(step: int, opt: torch.optim.Optimizer, losses: list[tuple[int, float]]) -> None:
        # Nothing new at the step we resumed at (and other ranks may still be reading it).
        if not writer or (resumed is not None and step == resumed.step):
            return
        state = ResumeState(
            step=step,
            model=cpu_state(clip),
            optimizer=opt.state_dict(),
            checkpoints=list(saved),
            losses=list(losses),
            fingerprint=fingerprint,
            resumed_at=resumed_at,
        )
        save_resume(run, state)
        if record is not None:
            record.saved(step)
        if step == cfg.steps:
            final.append(state)

    try:
        train_loop(
            model,
            images,
            tokens,
            cfg,
            order,
            ckpt_steps,
            keep,
            progress=progress,
            state=loop_state,
            save_steps=save_steps(cfg, ckpt_steps),
            on_save=save,
            rows=rows,
            batch_loss=batch_loss,
            device=device,
            on_step=record.step if record is not None else None,
        )
    finally:  # where it stopped (Ctrl-C, an error), not the step of the last write
        if record is not None:
            record.flush()
    if final:
        return final[0]
    if writer and resumed is not None and resumed.step == cfg.steps:
        return resumed  # killed after the last state was saved: nothing left to train
    return None
