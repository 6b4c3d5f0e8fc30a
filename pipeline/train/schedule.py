"""Learning-rate schedule as a pure function of the step.

The rate of step t is the one applied to the update theta_t -> theta_{t+1}.
Computing it from t directly (rather than reading an optimiser after
``scheduler.step()``) avoids the off-by-one METHOD.md warns about.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pipeline.errors import ConfigError


def lr_at(step: int, base_lr: float, warmup: int, total: int, schedule: str) -> float:
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * base_lr * (1 + math.cos(math.pi * progress))


# the params.txt fields open_clip_lr reads
OPEN_CLIP_SCHEDULE_PARAMS = (
    "lr",
    "warmup",
    "skip_scheduler",
    "lr_scheduler",
    "epochs",
    "epochs_cooldown",
    "lr_cooldown_end",
    "lr_cooldown_power",
)


def open_clip_lr(params: dict[str, Any], step: int, total: int) -> float:
    """The rate open_clip_train's scheduler sets for ``step`` (theta_step -> theta_step+1),
    from the run's ``params.txt``: cosine, const or const-cooldown after a linear warm-up,
    or the base rate with ``skip_scheduler``."""
    base, warmup = float(params["lr"]), int(params.get("warmup") or 0)
    if params.get("skip_scheduler"):
        return base
    kind = params.get("lr_scheduler", "cosine")
    if kind == "cosine":
        return lr_at(step, base, warmup, total, "cosine")
    if kind == "const":
        return lr_at(step, base, warmup, total, "constant")
    if kind == "const-cooldown":
        if step < warmup:
            return base * (step + 1) / warmup
        cooldown = (total // int(params["epochs"])) * int(params["epochs_cooldown"])
        start = total - cooldown
        if step < start or cooldown == 0:  # no cool-down: open_clip_train never reaches it
            return base
        end = float(params.get("lr_cooldown_end") or 0.0)
        decay = (1 - (step - start) / cooldown) ** float(params.get("lr_cooldown_power") or 1.0)
        return decay * (base - end) + end
    raise ConfigError(f"lr_scheduler {kind!r}: unknown to this version of diffin")


def recorded_rate(record: dict[str, Any]) -> Callable[[int], float] | None:
    """The rate of every training step of a trajectory (its ``trajectory.json``), or None when
    its schedule is not on record: ``diffin train``'s recipe, or an imported open_clip_train
    run's ``params.txt``."""
    c = record.get("config", {})
    if all(k in c for k in ("lr", "warmup", "steps", "schedule")):
        lr, warmup, steps, kind = float(c["lr"]), int(c["warmup"]), int(c["steps"]), c["schedule"]
        return lambda s: lr_at(s, lr, warmup, steps, str(kind))
    params = record.get("imported", {}).get("params")
    if params and "lr" in params and record.get("steps"):
        total = int(record["steps"])
        return lambda s: open_clip_lr(params, s, total)
    return None


def checkpoint_steps(total: int, m: int, spacing: str, seed: int) -> list[int]:
    """m distinct steps in [1, total]: evenly spaced (ending at ``total``) or sampled at random."""
    if spacing == "even":
        return sorted({max(1, round(i * total / m)) for i in range(1, m + 1)})
    import random

    return sorted(random.Random(seed).sample(range(1, total + 1), m))
