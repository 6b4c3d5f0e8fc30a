"""A tanh network small enough to form every Hessian: the exactly computable test model of
test_estimator.py and test_propagate.py (float64)."""

import torch
from torch.func import functional_call


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(3, 5)
        self.out = torch.nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x))).squeeze(-1)


def make_problem(n: int, n_v: int, seed: int = 0) -> dict:
    """theta0 (flat), per-sample losses(theta, xs, ys), the training pairs, the weighted
    training loss and the target loss."""
    torch.manual_seed(seed)
    net = Net().double()
    shapes = {k: v.shape for k, v in net.named_parameters()}
    sizes = {k: v.numel() for k, v in net.named_parameters()}
    theta0 = torch.cat([v.detach().flatten() for v in net.parameters()])

    def unflat(theta):
        out, i = {}, 0
        for k, m in sizes.items():
            out[k] = theta[i : i + m].view(shapes[k])
            i += m
        return out

    x = torch.randn(n + n_v, 3, dtype=torch.float64)
    y = torch.sin(2 * x[:, 0]) + 0.5 * x[:, 1] * x[:, 2] + 0.1 * torch.randn(n + n_v).double()
    xt, yt, xv, yv = x[:n], y[:n], x[n:], y[n:]

    def losses(theta, xs, ys):
        return 0.5 * (functional_call(net, unflat(theta), (xs,)) - ys) ** 2

    def target_loss(theta):
        return losses(theta, xv, yv).mean()

    def train_loss(theta, weights):  # weights: 1 = in, 0 = removed, 1 +- eps = perturbed
        return (weights * losses(theta, xt, yt)).sum() / n

    return dict(
        theta0=theta0, losses=losses, x=(xt, yt), target_loss=target_loss, train_loss=train_loss
    )
