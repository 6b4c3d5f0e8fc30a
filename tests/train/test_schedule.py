"""The learning-rate schedule and the checkpoint steps: pure functions of the step."""

from __future__ import annotations

import math

import pytest

from pipeline.train.schedule import checkpoint_steps, lr_at


def test_warmup_is_linear_and_reaches_base_at_the_last_warmup_step():
    assert [lr_at(t, 0.1, 4, 100, "constant") for t in range(4)] == pytest.approx(
        [0.025, 0.05, 0.075, 0.1]
    )
    # the same warm-up under cosine
    assert [lr_at(t, 0.1, 4, 100, "cosine") for t in range(4)] == pytest.approx(
        [0.025, 0.05, 0.075, 0.1]
    )


def test_constant_after_warmup():
    for t in (4, 5, 50, 99, 100):
        assert lr_at(t, 0.1, 4, 100, "constant") == 0.1
    # no warm-up at all: base rate from step 0
    assert lr_at(0, 0.3, 0, 10, "constant") == 0.3


def test_cosine_after_warmup():
    base, warmup, total = 0.2, 10, 110
    assert lr_at(warmup, base, warmup, total, "cosine") == pytest.approx(base)
    assert lr_at(60, base, warmup, total, "cosine") == pytest.approx(base / 2)
    assert lr_at(total, base, warmup, total, "cosine") == pytest.approx(0.0, abs=1e-12)
    for t in (10, 33, 77, 109):
        want = 0.5 * base * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
        assert lr_at(t, base, warmup, total, "cosine") == pytest.approx(want)
    values = [lr_at(t, base, warmup, total, "cosine") for t in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # non-increasing
    assert lr_at(total + 5, base, warmup, total, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_cosine_without_warmup_starts_at_base():
    assert lr_at(0, 0.1, 0, 10, "cosine") == pytest.approx(0.1)
    assert lr_at(5, 0.1, 0, 10, "cosine") == pytest.approx(0.05)


@pytest.mark.parametrize(
    "total,m,want",
    [
        (30, 2, [15, 30]),
        (100, 4, [25, 50, 75, 100]),
        (10, 10, list(range(1, 11))),
        (7, 1, [7]),
        (400, 5, [80, 160, 240, 320, 400]),
    ],
)
def test_even_checkpoint_steps(total, m, want):
    assert checkpoint_steps(total, m, "even", seed=0) == want


@pytest.mark.parametrize("total,m", [(7, 3), (9, 4), (101, 7), (3, 3)])
def test_even_steps_are_m_distinct_in_range_and_end_at_total(total, m):
    steps = checkpoint_steps(total, m, "even", seed=0)
    assert len(steps) == m == len(set(steps))
    assert steps == sorted(steps)
    assert steps[-1] == total
    assert all(1 <= s <= total for s in steps)


def test_random_checkpoint_steps_are_seeded_distinct_and_in_range():
    a = checkpoint_steps(100, 5, "random", seed=1)
    assert a == checkpoint_steps(100, 5, "random", seed=1)
    assert len(a) == 5 == len(set(a))
    assert a == sorted(a)
    assert all(1 <= s <= 100 for s in a)
    draws = {tuple(checkpoint_steps(100, 5, "random", seed=s)) for s in range(10)}
    assert len(draws) > 1  # the seed matters
    assert checkpoint_steps(6, 6, "random", seed=3) == [1, 2, 3, 4, 5, 6]
