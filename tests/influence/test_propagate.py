"""The propagated form against the actual effect of down-weighting a sample (float64).

A tiny tanh network trained by full-batch SGD with momentum and weight decay,
torch.optim.SGD's update written out, at a rate where the second-order
expansion is far out of range (E lambda_max = 18). The actual effect
is the derivative of L_V(theta_T) with respect to z's removal weight (central
difference over retrainings), as in test_estimator.py.
"""

import numpy as np
import pytest
import torch
from torch.func import grad, hessian
from toynet import make_problem

from pipeline.influence.estimator import Checkpoint
from pipeline.influence.propagate import nearest_blocks, propagated_directions
from pipeline.scorers import REGISTRY, ScoreContext

N, N_V, STEPS, LR, BETA, WD = 12, 8, 40, 0.02, 0.9, 0.01


def rate(step: int) -> float:
    return LR * min(1.0, (step + 1) / 5)  # a warm-up: the rate changes within a block


@pytest.fixture(scope="module")
def toy():
    problem = make_problem(N, N_V)
    theta0, losses, target_loss = problem["theta0"], problem["losses"], problem["target_loss"]
    train_loss = problem["train_loss"]
    xt, yt = problem["x"]

    def run(weights):
        theta, buf, seen = theta0.clone(), torch.zeros_like(theta0), {0: theta0.clone()}
        for step in range(STEPS):
            buf = BETA * buf + grad(train_loss)(theta, weights) + WD * theta
            theta = theta - rate(step) * buf
            seen[step + 1] = theta
        return seen

    ones = torch.ones(N, dtype=torch.float64)
    seen = run(ones)
    eps, actual = 1e-4, np.zeros(N)
    for z in range(N):
        lo, hi = ones.clone(), ones.clone()
        lo[z] -= eps
        hi[z] += eps
        actual[z] = float(target_loss(run(lo)[STEPS]) - target_loss(run(hi)[STEPS])) / (2 * eps)
    hess = {s: hessian(train_loss)(theta, ones) for s, theta in seen.items()}

    def g_z(theta):
        return torch.stack(
            [
                grad(lambda th, z=z: losses(th, xt[z : z + 1], yt[z : z + 1])[0])(theta)
                for z in range(N)
            ]
        )

    return dict(
        seen=seen,
        actual=actual,
        hess=hess,
        g_z=g_z,
        g_V=grad(target_loss)(seen[STEPS]),
        target_grad=grad(target_loss),
        run=run,
        target_loss=target_loss,
    )


def _predict(toy, steps, exact_hessians=False, momentum=BETA, weight_decay=WD, ends=None):
    """``ends``: the checkpoint-mean objective over these steps (the last one included)."""
    seen, hess = toy["seen"], toy["hess"]

    def hvp(i, s, v):
        h = hess[s] if exact_hessians else hess[steps[i]]
        return {"theta": h @ v["theta"]}

    c = 1 / len(ends) if ends else 1.0
    earlier = {t: {"theta": c * toy["target_grad"](seen[t])} for t in (ends or [])[:-1]}
    dirs = propagated_directions(
        hvp,
        steps,
        rate,
        {"theta": c * toy["g_V"]},
        N,
        momentum=momentum,
        weight_decay=weight_decay,
        earlier=earlier,
    )
    return sum((toy["g_z"](seen[t]) @ r["theta"]).numpy() for t, r in zip(steps, dirs, strict=True))


def _err(pred, actual):
    return float(np.abs(pred - actual).max() / np.abs(actual).max())


def test_the_expansion_is_out_of_range(toy):
    """The premise: the learning-rate sum (momentum included) times lambda_max is well above 1,
    where the derived second-order weights cannot hold."""
    lam = float(torch.linalg.eigvalsh(toy["hess"][STEPS]).abs().max())
    elapsed = sum(rate(s) for s in range(STEPS)) / (1 - BETA)
    assert elapsed * lam > 2


def test_exact_hessians_recover_the_actual_effect(toy):
    """With the Hessian of every step the adjoint recursion is the first-order effect itself
    (measured: 1e-5, the central difference's own error); g_z of step 0 is taken at theta_1."""
    assert _err(_predict(toy, list(range(1, STEPS + 1)), exact_hessians=True), toy["actual"]) < 1e-4


@pytest.mark.parametrize("steps", [[10, 20, 30, 40], [5, 25, 40]], ids=["4-even", "3-uneven"])
def test_checkpoint_hessians_beat_the_expansion_and_momentum_matters(toy, steps):
    pred = _predict(toy, steps)
    e_prop = _err(pred, toy["actual"])
    assert e_prop < 0.06, e_prop  # measured 0.021 (4-even) and 0.036 (3-uneven)
    assert np.corrcoef(pred, toy["actual"])[0, 1] > 0.97
    # the same recursion without the momentum buffer or the decay is far off
    assert _err(_predict(toy, steps, momentum=0.0), toy["actual"]) > 10 * e_prop
    # and so is TracIn, which models neither the damping nor the momentum
    ctx = ScoreContext([Checkpoint(s, rate(s - 1)) for s in steps], N)
    terms = {}
    for t in steps:
        theta = toy["seen"][t]
        gz = toy["g_z"](theta)
        g_V = toy["target_grad"](theta)
        terms[t] = {"first": (gz @ g_V).numpy()}
    uids = [str(i) for i in range(N)]
    tracin = REGISTRY["tracin"]().score(terms, uids, ctx)["tracin"]
    assert _err(tracin, toy["actual"]) > 3 * e_prop


def test_the_checkpoint_mean_objective_is_its_actual_effect(toy):
    """The objective (1/m) sum_j L_V(theta_{t_j}): with every step's Hessian the adjoint with
    the earlier gradients added on the way back is the derivative of that mean (central
    difference over retrainings, as for the final loss); with checkpoint Hessians it is
    close, if less so than the final-loss form (the early endpoints weigh the early steps,
    where the curvature changes fastest). It is another quantity than the final loss's."""
    ends = [10, 20, 30, 40]

    def mean_loss(seen):
        return sum(float(toy["target_loss"](seen[t])) for t in ends) / len(ends)

    ones, eps, actual = torch.ones(N, dtype=torch.float64), 1e-4, np.zeros(N)
    for z in range(N):
        lo, hi = ones.clone(), ones.clone()
        lo[z] -= eps
        hi[z] += eps
        actual[z] = (mean_loss(toy["run"](lo)) - mean_loss(toy["run"](hi))) / (2 * eps)
    every = list(range(1, STEPS + 1))
    assert _err(_predict(toy, every, exact_hessians=True, ends=ends), actual) < 1e-4
    pred = _predict(toy, ends, ends=ends)
    assert _err(pred, actual) < 0.1  # measured 0.078 (the final loss's form: 0.021)
    assert np.corrcoef(pred, actual)[0, 1] > 0.97
    # the final loss's effect is another one: the earlier gradients are not a rescaling
    assert _err(_predict(toy, every, exact_hessians=True), actual) > 0.1


def test_earlier_objective_steps_must_lie_inside_the_trajectory():
    g_V = {"theta": torch.ones(2, dtype=torch.float64)}
    for t in (0, 40, 50):
        with pytest.raises(ValueError, match="earlier objective steps"):
            propagated_directions(
                lambda i, s, v: v, [20, 40], lambda s: 0.1, g_V, 4, earlier={t: g_V}
            )


def test_nearest_blocks():
    assert nearest_blocks([10, 20, 30]) == [range(0, 15), range(15, 25), range(25, 30)]
    assert nearest_blocks([1, 2, 3]) == [range(0, 2), range(2, 3), range(3, 3)]
    with pytest.raises(ValueError, match="sorted"):
        nearest_blocks([20, 10])


def test_a_diverging_sweep_stops_at_its_first_non_finite_step():
    """Negative curvature grows the adjoint without bound: the sweep stops where it overflows
    instead of paying the remaining curvature products and returning NaN directions."""
    from pipeline.influence.propagate import PropagationDiverged

    done = []
    g_V = {"theta": torch.ones(3, dtype=torch.float64)}
    with pytest.raises(PropagationDiverged) as caught:
        propagated_directions(
            lambda i, s, v: {"theta": -1e100 * v["theta"]},
            [100, 1000],
            lambda s: 1.0,
            g_V,
            10,
            progress=done.append,
        )
    # backwards from step 999: 1e100 per step overflows float64 within four steps
    assert caught.value.step >= 995 and len(done) < 5
