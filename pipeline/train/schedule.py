"""Learning-rate schedule as a pure function of the step.

The rate of step t is the one applied to the update theta_t -> theta_{t+1}.
Computing it from t directly (rather than reading an optimiser after
``scheduler.step()``) avoids the off-by-one METHOD.md warns about.
"""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup: int, total: int, schedule: str) -> float:
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * base_lr * (1 + math.cos(math.pi * progress))


def checkpoint_steps(total: int, m: int, spacing: str, seed: int) -> list[int]:
    """m distinct steps in [1, total]: evenly spaced (ending at ``total``) or sampled at random."""
    if spacing == "even":
        return sorted({max(1, round(i * total / m)) for i in range(1, m + 1)})
    import random

    return sorted(random.Random(seed).sample(range(1, total + 1), m))
