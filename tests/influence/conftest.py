"""The float64 tiny CLIP and the random batches the estimator tests check the math on."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pipeline.model import factory

Batch = tuple[torch.Tensor, torch.Tensor]


class Tiny64:
    """``diffin-tiny`` in float64 (seeded weights) and seeded makers of (images, tokens)."""

    size = 32  # diffin-tiny's image size
    context = 24  # tokens per caption (shorter than the model's context: padded by it)
    vocab = 49_000

    @staticmethod
    def bundle() -> factory.ClipBundle:
        torch.manual_seed(0)
        return factory.create("diffin-tiny", dtype=torch.float64)

    @classmethod
    def batches(cls, seed: int) -> Callable[[int], Batch]:
        """``batch(n)``: n random pairs, each call drawing the next from one generator."""
        g = torch.Generator().manual_seed(seed)

        def batch(n: int) -> Batch:
            return (
                torch.randn(n, 3, cls.size, cls.size, generator=g, dtype=torch.float64),
                torch.randint(1, cls.vocab, (n, cls.context), generator=g),
            )

        return batch


@pytest.fixture(scope="session")
def tiny64() -> type[Tiny64]:
    return Tiny64


@pytest.fixture
def count_pairs(monkeypatch) -> Callable:
    """``count_pairs(fns)``: the list that will hold the pairs of each pass through
    ``fns.embed`` (what bounds a chunked method's memory)."""

    def install(fns) -> list[int]:
        sizes: list[int] = []
        embed = fns.embed

        def counted(p, imgs, toks):
            sizes.append(imgs.shape[0])
            return embed(p, imgs, toks)

        monkeypatch.setattr(fns, "embed", counted)
        return sizes

    return install
