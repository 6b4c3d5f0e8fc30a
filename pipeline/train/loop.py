"""The proxy training loop over in-memory tensors, with a fixed data order.

Separate from the run-directory plumbing so that ground-truth experiments
(leave-one-out, subsets) retrain with exactly the same seed and data order,
only without the removed samples (METHOD.md section 7.2).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from pipeline.model.batches import Inputs
from pipeline.model.loss import MAX_LOGIT_SCALE, batch_clip_loss
from pipeline.train.config import TrainConfig
from pipeline.train.schedule import lr_at


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Indices of each step's batch: seeded epochs of random permutations, last partial batch dropped."""
    gen = torch.Generator().manual_seed(seed)
    per_epoch = max(1, n // batch_size)
    order: list[torch.Tensor] = []
    perm = torch.randperm(n, generator=gen)
    for step in range(steps):
        slot = step % per_epoch
        if slot == 0 and step > 0:
            perm = torch.randperm(n, generator=gen)
        order.append(perm[slot * batch_size : (slot + 1) * batch_size])
    return order


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD is the method's assumption; AdamW is offered because SGD can stall (METHOD.md 9).

    With AdamW the Diff-In weights use the base learning rate of the step,
    not Adam's per-coordinate effective rate: recorded in trajectory.json
    (``optimizer.lr_in_weights``) and explained in docs/operations.md.
    """
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# (model, images, tokens) -> the loss of the global batch; the data-parallel
# path supplies its own (features gathered across workers, distributed.py).
BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def core(model: nn.Module) -> nn.Module:
    """The CLIP model itself, under a DistributedDataParallel wrapper or not."""
    return getattr(model, "module", model)


def clip_loss(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    out = model(images, tokens)
    return batch_clip_loss(out["image_features"], out["text_features"], core(model).logit_scale)


@dataclass
class LoopState:
    """Where an interrupted loop continues: theta and the optimiser before step ``step``."""

    step: int
    optimizer: dict[str, Any]
    losses: list[tuple[int, float]] = field(default_factory=list)


def autocast_for(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision="amp"`` on CUDA; nothing elsewhere (CPU trains in fp32)."""
    if cfg.precision == "amp" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_loop(
    model: nn.Module,
    images: torch.Tensor | Inputs,
    tokens: torch.Tensor,
    cfg: TrainConfig,
    order: list[torch.Tensor],
    checkpoint_steps: list[int] | None = None,
    on_checkpoint: Callable[[int, float, nn.Module], None] | None = None,
    removed: torch.Tensor | None = None,
    progress: bool = True,
    *,
    state: LoopState | None = None,
    save_steps: set[int] | None = None,
    on_save: Callable[[int, torch.optim.Optimizer, list[tuple[int, float]]], None] | None = None,
    rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_loss: BatchLoss = clip_loss,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
) -> list[tuple[int, float]]:
    """Run ``len(order)`` steps; returns the loss curve (every 10 steps).

    ``removed`` (bool, one per sample) drops those samples from the batches
    they would have been in, keeping every other choice identical.
    ``on_checkpoint(step, lr, model)`` sees theta_step before its update;
    step ``len(order)`` is the final model.

    Resuming: ``state`` (theta already loaded into ``model``) starts the loop
    at ``state.step`` with the optimiser's saved state; the data order and the
    schedule are functions of the step, and the loop draws no random numbers,
    so the continued run computes what the uninterrupted one would have.
    ``on_save(step, optimizer, losses)`` runs at ``save_steps`` and at the
    end, after ``on_checkpoint``, to write that state.

    Data parallel: ``rows(idx)`` picks this worker's rows of the global batch
    and ``batch_loss`` computes the global batch's loss from them.
    """
    device = torch.device(device)
    steps = len(order)
    ckpts = set(checkpoint_steps or [])
    saves = set(save_steps or [])
    clip = core(model)
    dtype = next(clip.parameters()).dtype  # fp64 training casts the fp32 inputs
    opt = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    start = 0
    losses: list[tuple[int, float]] = []
    if state is not None:
        opt.load_state_dict(state.optimizer)
        start, losses = state.step, [tuple(x) for x in state.losses]
    model.train()
    # disable=None: a bar only on a terminal (in a file or a Ray job log its \r updates
    # are one unreadable line); the checkpoints are logged either way.
    # The loop visits step == steps to save and checkpoint the end, but trains no step
    # there: the bar counts trained steps only (it said 400/401 at the end).
    bar = tqdm(
        total=steps, initial=start, desc="train", unit="step", disable=None if progress else True
    )
    for step in range(start, steps + 1):
        lr = lr_at(step, cfg.lr, cfg.warmup, steps, cfg.schedule)
        if step in ckpts and on_checkpoint is not None:
            on_checkpoint(step, lr, model)
        if (step in saves or step == steps) and on_save is not None:
            on_save(step, opt, losses)
        if step == steps:
            break
        idx = order[step]
        if removed is not None:
            idx = idx[~removed[idx]]
        if rows is not None:
            idx = rows(idx)
        for group in opt.param_groups:
            group["lr"] = lr
        batch_images = images[idx].to(device, dtype)
        with autocast_for(cfg, device):
            loss = batch_loss(model, batch_images, tokens[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"training diverged at step {step} (loss {value}); lower --lr")
        if step % 10 == 0 or step == steps - 1:
            losses.append((step, round(value, 5)))
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.3g}")
        bar.update(1)
        if on_step is not None:
            on_step(step + 1, value)
    bar.close()
    model.eval()
    return losses
