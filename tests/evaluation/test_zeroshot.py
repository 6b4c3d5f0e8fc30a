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
