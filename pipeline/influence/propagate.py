"""The propagated form: the effect of removing z carried to theta_T through the linearised
optimiser, instead of a Taylor expansion of it in the elapsed learning-rate sum.

Why: the derived second-order weights (``estimator.py``) expand the damping of
z's displacement, prod_r (I - eta H_B), to first order: -E H_B. That is only
accurate where E lambda_max(H_B) << 1; on the proxy trajectories of
docs/accuracy.md it reaches 3 to 50 and the expansion overshoots. Here the
product is applied exactly (one Hessian-vector product per training step, on
the target direction, not per sample), so the estimate holds for any E lambda.

Dynamics: SGD as torch.optim.SGD runs it (momentum beta, dampening 0, no
Nesterov, weight decay wd): b_{s+1} = beta b_s + g_s + wd theta_s,
theta_{s+1} = theta_s - eta_s b_{s+1}, with g_s the mean training gradient in
which z carries weight 1/N. Removing z perturbs g_s by -g_z(theta_s)/N; to
first order in 1/N the perturbation (delta, m) of (theta, b) is linear:

    m_{s+1}     = beta m_s + (H_s + wd I) delta_s - g_z / N
    delta_{s+1} = delta_s - eta_s m_{s+1}

and L_V(theta_T) changes by <g_V(theta_T), delta_T>. The adjoint recursion
(backwards from lambda_T = g_V, mu_T = 0) gives the effect of step s as
<d_s, g_z(theta_s)> / N with

    d_s      = eta_s lambda_{s+1} - mu_{s+1}
    lambda_s = lambda_{s+1} - (H_s + wd I) d_s
    mu_s     = -beta d_s

(plain SGD: d_s = eta_s prod_{r>s} (I - eta_r H_r) g_V, the propagation form
of docs/method.md). The score of z, the estimated increase of L_V if z were
removed, is sum_s <d_s, g_z(theta_s)> / N.

What is approximated, per checkpoint t_i (``nearest_blocks``):
- H_s is the curvature at the checkpoint nearest to s, averaged over the k
  gradient batches: for independently drawn batches the expected product of
  the step maps is the product of the expected maps. (A product of
  single-batch maps, cycling through the batches, is a high-variance sample of
  it: on the demo run it grew by 1e4 in 40 steps where the mean decays.) The
  caller picks the curvature: the exact H_B or its Gauss-Newton part, which is
  positive semi-definite (negative curvature of H_B makes the product grow
  exponentially: on the demo run, NaN after 320 steps);
- g_z(theta_s) is g_z at that checkpoint, so the per-sample work is one JVP per
  checkpoint along r_i = sum over its steps of d_s / N, a TracIn-sized cost.

The objective need not be the final loss alone. For J = sum_j c_j L_V(theta_{t_j}) (the
checkpoint-mean objective: c_j = 1/m over the m checkpoints) the adjoint is the same
recursion started from lambda_T = c_m g_V(theta_T), with c_j g_V(theta_{t_j}) added to
lambda as the sweep passes t_j: a step s < t_j moves theta_{t_j}, a later one does not.
Same cost: still one curvature product per step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from pipeline.influence.vectors import Params

# hvp(i, s, v): (the curvature of step s, taken at checkpoint i) @ v
HVP = Callable[[int, int, Params], Params]


class PropagationDiverged(ArithmeticError):
    """The adjoint recursion left the finite numbers: the linearised dynamics are unstable."""

    def __init__(self, step: int) -> None:
        super().__init__(
            f"the propagated target gradient is not finite at training step {step}: the "
            "linearised optimiser diverges along it (negative curvature, or a rate above "
            "2 / lambda_max)"
        )
        self.step = step


def nearest_blocks(steps: Sequence[int]) -> list[range]:
    """The training steps each checkpoint stands for: the steps s in [0, t_m) nearest to it
    (ties go to the later checkpoint)."""
    if list(steps) != sorted(set(steps)) or not steps or steps[0] < 1:
        raise ValueError(f"checkpoint steps must be distinct, sorted and >= 1: {list(steps)}")
    blocks, start = [], 0
    for i, t in enumerate(steps):
        end = steps[-1] if i == len(steps) - 1 else (t + steps[i + 1] + 1) // 2
        blocks.append(range(start, end))
        start = end
    return blocks


def propagated_directions(
    hvp: HVP,
    steps: Sequence[int],
    rate: Callable[[int], float],
    g_V: Params,
    n_train: int,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    progress: Callable[[int], None] | None = None,
    earlier: Mapping[int, Params] | None = None,
) -> list[Params]:
    """r_i per checkpoint: the score of z is sum_i <r_i, g_z(theta_{t_i})>.

    ``g_V`` is the gradient of the objective at the last checkpoint (theta_T), ``rate(s)``
    the learning rate of the update theta_s -> theta_{s+1}. ``earlier``: the objective's
    gradient at earlier steps t < T too (step -> gradient, its weight included), for an
    objective that reads the trajectory there (the checkpoint-mean objective).
    """
    earlier = earlier if earlier is not None else {}  # a Mapping may read each on demand
    if any(not 0 < t < steps[-1] for t in earlier):
        raise ValueError(f"earlier objective steps must lie in (0, {steps[-1]}): {sorted(earlier)}")
    blocks = nearest_blocks(steps)
    owner = {s: i for i, block in enumerate(blocks) for s in block}
    lam = {k: v.double() for k, v in g_V.items()}
    mu = {k: torch.zeros_like(v) for k, v in lam.items()}
    # The per-checkpoint sums wait in host memory (on a GPU they would be m more float64
    # copies of the model); the block being swept is summed on the device and moved once.
    out = [{k: torch.zeros_like(v, device="cpu") for k, v in lam.items()} for _ in steps]
    acc: Params = {}
    current = None
    for s in range(steps[-1] - 1, -1, -1):
        if s + 1 in earlier:  # steps before t move theta_t; this one is the last of them
            add = earlier[s + 1]  # once: a Mapping may read it from a file
            lam = {k: lam[k] + add[k].to(lam[k].device).double() for k in lam}
        i = owner[s]
        if i != current:
            _flush(out, current, acc)
            acc, current = {k: torch.zeros_like(v) for k, v in lam.items()}, i
        d = {k: rate(s) * lam[k] - mu[k] for k in lam}
        for k in d:
            acc[k] += d[k] / n_train
        hd = hvp(i, s, {k: v.to(g_V[k].dtype) for k, v in d.items()})
        lam = {k: lam[k] - hd[k].double() - weight_decay * d[k] for k in lam}
        mu = {k: -momentum * v for k, v in d.items()}
        # A diverging sweep ends in NaN scores for every sample: stop at the first step
        # (one sum per step, far cheaper than its curvature product).
        if not torch.isfinite(sum(v.sum() for v in lam.values())):
            raise PropagationDiverged(s)
        if progress is not None:
            progress(1)
    _flush(out, current, acc)
    return [{k: v.to(g_V[k].dtype) for k, v in r.items()} for r in out]


def _flush(out: list[Params], i: int | None, acc: Params) -> None:
    if i is not None:
        for k, v in acc.items():
            out[i][k] += v.cpu()
