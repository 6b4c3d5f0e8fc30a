"""Where the per-checkpoint terms become scores: the one place the weights live.

Per checkpoint t the engine computes four numbers per sample z (all at theta_t):

    first = <g_V, g_z>      hb = <g_V, H_B g_z>      hz = <g_V, H_z g_B>      hv = <g_z, H_V g_B>

and a score is sum_t (W_first first + W_hb hb + W_hz hz + W_hv hv): the estimated
*increase* of the target loss L_V(theta_T) if z were removed from training
(positive = z helps, keep; negative = z hurts, prune first). Two forms of the
weights exist (``FORMS``); docs/method.md ("Derivation of the weights") has the
full derivation and docs/accuracy.md the measurements.

``derived``, from a second-order expansion of plain SGD with
removal weight 1/N. Checkpoint t_i stands for the steps s in [t_{i-1}, t_i)
(t_0 = 0): Delta_i = t_i - t_{i-1} steps at rate eta_i (the checkpoint's rate),
with E_i = sum_{j<i} eta_j Delta_j the learning-rate sum already elapsed
before the block. Removing z adds +eta_s g_z/N to update s; the displacement
accumulated by step s, delta_s ~= E_s g_z / N, changes that step's descent of
L_V (d/d theta of -eta <g_V, g_B>: the H_B and the H_V terms); the quantities
of step s are evaluated at the block's checkpoint, at the end of the block,
hence the drift terms. Summed over the block:

    W_first =  eta Delta / N
    W_hb    = -eta Delta / N * (E + eta (Delta - 1) / 2)   (mean elapsed rate-sum over the block)
    W_hv    = -eta Delta / N *  E
    W_hz    = +eta Delta / N *  eta (Delta + 1) / 2         (drift of g_z within the block)

Those are the sums below for a constant rate over the block. When the
trajectory's schedule is on record, each checkpoint carries its block's
rates summed (``BlockRates``), and the weights use the rates the steps
actually ran at: with E_s = sum_{r<s} eta_r and E_end the sum at the
block's end,

    W_first = sum_s eta_s / N                 W_hb = -sum_s eta_s E_s / N
    W_hz    = sum_s eta_s (E_end - E_s) / N   W_hv = sum_s eta_s (E_end - 2 E_s - eta_s) / N
                                                   = -E_start sum_s eta_s / N

(why: a cosine schedule's last checkpoint has rate 0 at the final step, so
its rate alone would give the whole last block no weight; a warm-up block
would be weighted at the full rate).

``method``: METHOD.md section 3 and the authors' code, literally:

    W_first = eta_t / (N m),   W_hb = W_hz = -t eta_t^2 / (N m),   W_hv = 0.

The two agree on the sign of the H_B term and on its growth with the elapsed
steps; they differ in the scale (a checkpoint stands for Delta steps, not 1/m
of one), in the target-Hessian term <g_z, H_V g_B> that the method form lacks,
and in <g_V, H_z g_B>, which the derivation only has as a small positive drift
correction.

``propagated``: the damping of z's displacement is not expanded but applied
exactly, through the linearised optimiser (momentum and weight decay
included): ``propagate.py``. Its per-checkpoint part is one JVP along a
precomputed direction r_t; the engine computes it as ``hlin`` along
r_t - W_first g_V, so that F_t is TracIn's (the ``derived`` first-order
weight) and I_t is everything the propagation adds to it. Here the hb, hz
and hv weights are 0.

``assemble_diffin`` sums sum_t (F_t + I_t) when ``first_order`` is true (the
default), else sum_t I_t alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

FORMS = ("derived", "method", "propagated")
CURVATURES = ("ggn", "hessian")  # the propagated form's curvature (directions.curvature_operator)
DEFAULT_FORM = "propagated"  # what `diffin` uses unless told otherwise (docs/accuracy.md)
SECOND_ORDER_KEYS = ("hb", "hz", "hv")


@dataclass(frozen=True)
class BlockRates:
    """The rates eta_s of the steps s in [t_{i-1}, t_i) that checkpoint t_i stands for, summed.

    ``elapsed`` weighs each rate by E_s = sum_{r<s} eta_r, counted from step 0.
    """

    total: float  # sum_s eta_s
    elapsed: float  # sum_s eta_s E_s
    squares: float  # sum_s eta_s^2
    start: float  # E at the block's first step, t_{i-1}


@dataclass(frozen=True)
class Checkpoint:
    step: int
    lr: float  # the rate of step ``step`` (theta_step -> theta_step+1)
    block: BlockRates | None = None  # its block's rates, when the schedule is on record


def block_rates(steps: Sequence[int], rate: Callable[[int], float]) -> list[BlockRates]:
    """``BlockRates`` of every checkpoint step (sorted), from the rate of each training step."""
    if list(steps) != sorted(set(steps)) or not steps or steps[0] < 1:
        raise ValueError(f"checkpoint steps must be distinct, sorted and >= 1: {list(steps)}")
    r = np.fromiter((rate(s) for s in range(steps[-1])), dtype=np.float64, count=steps[-1])
    elapsed = np.concatenate([[0.0], np.cumsum(r)[:-1]])
    out, start = [], 0
    for t in steps:
        b, e = r[start:t], elapsed[start:t]
        out.append(BlockRates(float(b.sum()), float(b @ e), float(b @ b), float(elapsed[start])))
        start = t
    return out


def attach_block_rates(
    ckpts: Sequence[Checkpoint], rate: Callable[[int], float]
) -> list[Checkpoint]:
    """The checkpoints (sorted by step) with their ``BlockRates`` under ``rate``."""
    blocks = block_rates([c.step for c in ckpts], rate)
    return [replace(c, block=b) for c, b in zip(ckpts, blocks, strict=True)]


@dataclass(frozen=True)
class Weights:
    """Coefficients of (first, hb, hz, hv) at one checkpoint."""

    first: float
    hb: float
    hz: float
    hv: float


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"second-order form {form!r}: expected one of {FORMS}")


def checkpoint_weights(
    ckpts: Sequence[Checkpoint], n_train: int, form: str = "derived"
) -> list[Weights]:
    """The weights of every checkpoint (in the given order, which must be by step)."""
    _check_form(form)
    steps = [c.step for c in ckpts]
    if steps != sorted(steps) or len(set(steps)) != len(steps):
        raise ValueError(f"checkpoints must be distinct and sorted by step: {steps}")
    m, n = len(ckpts), float(n_train)
    out: list[Weights] = []
    if form == "method":
        for c in ckpts:
            a = -c.step * c.lr**2 / (n * m)
            out.append(Weights(c.lr / (n * m), a, a, 0.0))
        return out
    if form == "propagated":
        return [
            Weights(w.first, 0.0, 0.0, 0.0) for w in checkpoint_weights(ckpts, n_train, "derived")
        ]
    blocks = [c.block for c in ckpts]
    if all(b is not None for b in blocks):
        for b in blocks:
            end = b.start + b.total  # E at the block's end
            # W_hv's sum, sum_s eta_s (E_end - 2 E_s - eta_s), telescopes to -E_start sum_s eta_s
            out.append(
                Weights(
                    first=b.total / n,
                    hb=-b.elapsed / n,
                    hz=(b.total * end - b.elapsed) / n,
                    hv=-b.start * b.total / n,
                )
            )
        return out
    if any(b is not None for b in blocks):
        raise ValueError("checkpoints: block rates for some checkpoints and not others")
    elapsed, prev = 0.0, 0
    for c in ckpts:
        delta, eta = c.step - prev, c.lr
        base = eta * delta / n
        out.append(
            Weights(
                first=base,
                hb=-base * (elapsed + eta * (delta - 1) / 2),
                hz=base * eta * (delta + 1) / 2,
                hv=-base * elapsed,
            )
        )
        elapsed += eta * delta
        prev = c.step
    return out


def first_order_weights(
    ckpts: Sequence[Checkpoint], n_train: int, form: str = "derived"
) -> list[float]:
    return [w.first for w in checkpoint_weights(ckpts, n_train, form)]


def diffin_components(
    first: np.ndarray,
    hb: np.ndarray | None,
    hz: np.ndarray | None,
    hv: np.ndarray | None,
    weights: Weights,
    hlin: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(F_t, I_t) for one checkpoint. ``hz`` and ``hv`` may be None only where their weight is 0.

    ``hlin`` = W_hb hb + W_hv hv already combined (one JVP, ``fast.py``) replaces both
    (the propagated form: ``hlin`` is I_t itself).
    """
    if weights.hz != 0.0 and hz is None:
        raise ValueError("this form needs the hz term <g_V, H_z g_B>")
    drift = weights.hz * hz if weights.hz != 0.0 else 0.0
    if hlin is not None:
        return weights.first * first, hlin + drift
    if hb is None:
        raise ValueError("diffin_components needs hb (or hlin)")
    second = weights.hb * hb + drift
    if weights.hv != 0.0:
        if hv is None:
            raise ValueError("the derived form needs the hv term <g_z, H_V g_B>")
        second = second + weights.hv * hv
    return weights.first * first, second


def assemble_diffin(
    firsts: Sequence[np.ndarray], seconds: Sequence[np.ndarray], first_order: bool = True
) -> np.ndarray:
    total = np.sum(seconds, axis=0)
    if first_order:
        total = total + np.sum(firsts, axis=0)
    return total
