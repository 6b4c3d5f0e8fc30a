"""Where the per-checkpoint terms become scores: the one place the weights live.

With checkpoints t in T_m (absolute step t, learning rate eta_t of the update
leaving theta_t), N training pairs and m checkpoints (METHOD.md section 3):

    first-order  F_t(z) =  eta_t / (N m)        * <g_V, g_z>
    second-order I_t(z) = -t eta_t^2 / (N m)    * (<g_V, H_B g_z> + <g_V, H_z g_B>)

Both estimate the *increase* of the target loss if z were removed from
training (the user-facing sign convention): removing z undoes the descent
step -eta g_z / N each time z is used, which moves the target loss by
+eta/N <g_V, g_z> to first order; the second-order term is the change of
that first-order step along the displaced trajectory. So positive = z helps
(keep), negative = z hurts (prune first).

The ``diffin`` score is sum_t (F_t + I_t) when ``first_order`` is true (the
default: the full second-order estimate), else sum_t I_t alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Checkpoint:
    step: int
    lr: float


def first_order_weight(ckpt: Checkpoint, n_train: int, m: int) -> float:
    return ckpt.lr / (n_train * m)


def second_order_weight(ckpt: Checkpoint, n_train: int, m: int) -> float:
    return -ckpt.step * ckpt.lr**2 / (n_train * m)


def diffin_components(
    first: np.ndarray, hb: np.ndarray, hz: np.ndarray, ckpt: Checkpoint, n_train: int, m: int
) -> tuple[np.ndarray, np.ndarray]:
    """(F_t, I_t) for one checkpoint."""
    return (
        first_order_weight(ckpt, n_train, m) * first,
        second_order_weight(ckpt, n_train, m) * (hb + hz),
    )


def assemble_diffin(
    firsts: Sequence[np.ndarray], seconds: Sequence[np.ndarray], first_order: bool = True
) -> np.ndarray:
    total = np.sum(seconds, axis=0)
    if first_order:
        total = total + np.sum(firsts, axis=0)
    return total
