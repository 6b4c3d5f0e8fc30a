"""Zero-shot accuracy and retrieval recall on embeddings whose answers are known."""

from __future__ import annotations

import pytest
import torch

from pipeline.evaluation.zeroshot import caption_ids, recall_at_k, zero_shot_accuracy


def test_zero_shot_accuracy_counts_argmax_matches():
    classes = torch.eye(3)
    images = torch.tensor([[1.0, 0.1, 0], [0, 2.0, 0], [0, 0, 0.5], [0.9, 0, 1.0]])
    labels = torch.tensor([0, 1, 2, 0])  # the last one is nearer class 2: wrong
    assert zero_shot_accuracy(images, classes, labels) == pytest.approx(0.75)


def test_caption_ids_share_ids_for_equal_captions():
    assert caption_ids(["a", "b", "a", "c"]).tolist() == [0, 1, 0, 2]


def test_recall_perfect_pairs_and_shifted_pairs():
    x = torch.eye(4)
    caps = ["w", "x", "y", "z"]
    r = recall_at_k(x, x, caps, ks=(1, 5))
    assert r == {"i2t_r1": 1.0, "t2i_r1": 1.0, "i2t_r5": 1.0, "t2i_r5": 1.0}
    # every image nearest to the next pair's text: wrong at 1, right within 5 (all 4 candidates)
    r = recall_at_k(x, x.roll(1, dims=0), caps, ks=(1, 5))
    assert r["i2t_r1"] == 0.0 and r["t2i_r1"] == 0.0
    assert r["i2t_r5"] == 1.0 and r["t2i_r5"] == 1.0


def test_recall_counts_an_identical_caption_as_a_match():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # swapped ...
    assert recall_at_k(images, texts, ["same", "same"], ks=(1,))["i2t_r1"] == 1.0  # ... same text
    assert recall_at_k(images, texts, ["one", "two"], ks=(1,))["i2t_r1"] == 0.0


def test_recall_refuses_mismatched_lengths():
    with pytest.raises(ValueError):
        recall_at_k(torch.eye(3), torch.eye(2), ["a", "b", "c"])


def test_a_collapsed_model_scores_chance_not_the_first_index():
    """Review: argmax and topk break ties by index, so a model whose features collapsed to
    one point scored the share of class 0 at zero-shot, and what the candidates' order gave
    at retrieval."""
    n_cls, n = 4, 10
    labels = torch.tensor([0] * 5 + [1, 2, 3, 3, 3])  # class 0 is half the eval set
    same = torch.ones(n, 8)
    assert zero_shot_accuracy(same, torch.ones(n_cls, 8), labels) == pytest.approx(1 / n_cls)
    r = recall_at_k(same, same, [f"c{i}" for i in range(n)], ks=(1, 5))
    assert r == pytest.approx({"i2t_r1": 0.1, "t2i_r1": 0.1, "i2t_r5": 0.5, "t2i_r5": 0.5})


def _by_every_tie_break(sim: torch.Tensor, ids: torch.Tensor, k: int) -> float:
    """Recall@k averaged over every order of the candidates as the tie-break (exact)."""
    import itertools

    n = sim.shape[1]
    total, count = 0.0, 0
    for perm in itertools.permutations(range(n)):
        rank = torch.tensor(perm, dtype=torch.double)
        hits = 0
        for q in range(sim.shape[0]):
            order = sorted(range(n), key=lambda c: (-float(sim[q, c]), float(rank[c])))
            hits += any(int(ids[c]) == int(ids[q]) for c in order[:k])
        total += hits / sim.shape[0]
        count += 1
    return total / count


def test_recall_with_ties_is_the_average_over_every_tie_break():
    from pipeline.evaluation.zeroshot import _hit_probability

    # 6 pairs; similarities on a coarse grid so that many tie, two captions repeated
    g = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 3, (6, 6), generator=g).double()
    ids = torch.tensor([0, 1, 1, 2, 3, 0])
    match = ids[:, None] == ids[None, :]
    for k in (1, 2, 3):
        got = float(_hit_probability(sim, match, k).mean())
        assert got == pytest.approx(_by_every_tie_break(sim, ids, k), abs=1e-12), k


def test_without_ties_recall_is_the_top_k_count():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(50, 16, generator=g), torch.randn(50, 16, generator=g)
    caps = [f"c{i % 45}" for i in range(50)]  # some repeated captions (equal ids)
    txt[45:] = txt[:5]  # ... with equal text features, as equal token rows have
    got = recall_at_k(img, txt, caps, ks=(1, 5))
    ids = caption_ids(caps)
    sim = (
        torch.nn.functional.normalize(img.double(), dim=-1)
        @ torch.nn.functional.normalize(txt.double(), dim=-1).T
    )
    for k in (1, 5):
        i2t = ids[sim.topk(k, dim=1).indices]
        t2i = ids[sim.T.topk(k, dim=1).indices]
        assert got[f"i2t_r{k}"] == pytest.approx(
            float((i2t == ids[:, None]).any(1).double().mean())
        )
        assert got[f"t2i_r{k}"] == pytest.approx(
            float((t2i == ids[:, None]).any(1).double().mean())
        )


def test_a_diverged_model_has_no_figures_not_perfect_ones():
    """Review: NaN features left no similarity tied at the best, and the tie count gave a
    recall of 1.0 and a zero-shot accuracy of 1/0."""
    import math

    nan = torch.full((4, 3), float("nan"))
    assert math.isnan(zero_shot_accuracy(nan, torch.eye(3), torch.tensor([0, 1, 2, 0])))
    r = recall_at_k(nan, torch.randn(4, 3), ["a", "b", "c", "d"], ks=(1, 5))
    assert set(r) == {"i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"}
    assert all(math.isnan(v) for v in r.values())


def test_recall_in_blocks_of_queries_equals_the_whole_matrix():
    """Queries go a block at a time (memory block x n, not n x n: review, 80 GB at 100k)."""
    g = torch.Generator().manual_seed(2)
    img = torch.randint(0, 3, (23, 4), generator=g).double()  # coarse: many ties
    txt = torch.randint(0, 3, (23, 4), generator=g).double()
    caps = [f"c{i % 17}" for i in range(23)]
    whole = recall_at_k(img, txt, caps, ks=(1, 5), block=10_000)
    for block in (1, 4, 7):
        assert recall_at_k(img, txt, caps, ks=(1, 5), block=block) == pytest.approx(whole)
