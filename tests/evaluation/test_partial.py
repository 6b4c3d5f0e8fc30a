"""pipeline/evaluation/partial.py: the hashes a kept evaluation row is found by."""

from __future__ import annotations

import pytest
import torch

from pipeline.evaluation.partial import row_digests, subset_digest, tensors_digest


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.bool]
)
def test_the_digest_takes_every_dtype_and_sees_one_value_changed(dtype):
    """Review: numpy has no bfloat16, and an empty tensor could not be viewed as bytes."""
    t = torch.arange(24).reshape(2, 3, 4).to(dtype)
    changed = t.clone()
    changed.view(-1)[5] = 0 if dtype == torch.bool else changed.view(-1)[5] + 1
    assert tensors_digest(t) == tensors_digest(t.clone())
    assert tensors_digest(t) != tensors_digest(changed)
    assert tensors_digest(t) == tensors_digest(t.transpose(0, 1).contiguous().transpose(0, 1))
    assert tensors_digest(t) != tensors_digest(t.reshape(3, 2, 4))  # the shape counts
    empty = torch.empty(0, 3, dtype=dtype)
    assert tensors_digest(empty) != tensors_digest(None)
    assert tensors_digest(torch.tensor(1, dtype=dtype)) == tensors_digest(
        torch.tensor(1, dtype=dtype)
    )


def test_a_subset_digest_follows_its_rows_only():
    images = torch.randint(0, 255, (6, 3, 4, 4), dtype=torch.uint8)
    tokens = torch.randint(0, 100, (6, 8))
    rows = row_digests(images, tokens)
    again = images.clone()
    again[5, 0, 0, 0] += 1  # a row outside the subset
    assert subset_digest(rows, [0, 2, 3]) == subset_digest(row_digests(again, tokens), [0, 2, 3])
    assert subset_digest(rows, [0, 2, 5]) != subset_digest(row_digests(again, tokens), [0, 2, 5])
    assert subset_digest(rows, [0, 2]) != subset_digest(rows, [0, 3])
