"""The proxy training loop over in-memory tensors, with a fixed data order.

Separate from the run-directory plumbing so that ground-truth experiments
(leave-one-out, subsets) retrain with exactly the same seed and data order,
only without the removed samples (METHOD.md section 7.2).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

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
    not Adam's per-coordinate effective rate: recorded in trajectory.json.
    """
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_loop(
    model: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    cfg: TrainConfig,
    order: list[torch.Tensor],
    checkpoint_steps: list[int] | None = None,
    on_checkpoint: Callable[[int, float, nn.Module], None] | None = None,
    removed: torch.Tensor | None = None,
    progress: bool = True,
) -> list[tuple[int, float]]:
    """Run ``len(order)`` steps; returns the loss curve (every 10 steps).

    ``removed`` (bool, one per sample) drops those samples from the batches
    they would have been in, keeping every other choice identical.
    ``on_checkpoint(step, lr, model)`` sees theta_step before its update;
    step ``len(order)`` is the final model.
    """
    steps = len(order)
    ckpts = set(checkpoint_steps or [])
    opt = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    losses: list[tuple[int, float]] = []
    model.train()
    bar = tqdm(range(steps + 1), desc="train", unit="step", disable=not progress)
    for step in bar:
        lr = lr_at(step, cfg.lr, cfg.warmup, steps, cfg.schedule)
        if step in ckpts and on_checkpoint is not None:
            on_checkpoint(step, lr, model)
        if step == steps:
            break
        idx = order[step]
        if removed is not None:
            idx = idx[~removed[idx]]
        for group in opt.param_groups:
            group["lr"] = lr
        out = model(images[idx], tokens[idx])
        loss = batch_clip_loss(out["image_features"], out["text_features"], model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"training diverged at step {step} (loss {value}); lower --lr")
        if step % 10 == 0 or step == steps - 1:
            losses.append((step, round(value, 5)))
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.3g}")
    model.eval()
    return losses
