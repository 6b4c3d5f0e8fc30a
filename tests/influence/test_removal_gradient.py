"""--sample-gradient removal: g_z as z's removal gradient from the references used as a batch.

The fast form must compute the same terms as the exact double-backward reference
for this per-sample function too, keep per-sample scores independent of the
batch, leave the ``loss`` term as the plain l_z, and treat a pair that is one of
the references exactly as removal from R itself.
"""

import pytest
import torch

from pipeline.influence.directions import compute_directions
from pipeline.influence.fast import fast_terms
from pipeline.influence.functional import ClipFunctions
from pipeline.influence.reference import exact_terms
from pipeline.model import factory

TERMS = ("first", "hb", "hz", "hv")


@pytest.fixture(scope="module")
def setup(tiny64):
    bundle = tiny64.bundle()
    batch = tiny64.batches(11)
    ref = batch(6)
    plain = ClipFunctions(bundle.model, *ref)
    removal = ClipFunctions(bundle.model, *ref, removal=True)
    params = factory.param_dict(bundle.model)
    grad_batches = [batch(5), batch(5)]
    directions = compute_directions(plain, params, grad_batches, batch(4))
    return bundle, plain, removal, params, directions, grad_batches, batch(3)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_fast_equals_exact_double_backward_for_the_removal_gradient(setup):
    _, _, removal, params, directions, grad_batches, (images, tokens) = setup
    fast = fast_terms(removal, params, directions, images, tokens, set(TERMS))
    exact = exact_terms(removal, params, directions, grad_batches, images, tokens)
    for term in TERMS:
        assert _rel(fast[term], exact[term]) < 1e-6, term


def test_the_removal_gradient_is_another_gradient_and_the_loss_stays_l_z(setup):
    _, plain, removal, params, directions, _, (images, tokens) = setup
    a = fast_terms(plain, params, directions, images, tokens, {"first", "loss", "el2n"})
    b = fast_terms(removal, params, directions, images, tokens, {"first", "loss", "el2n"})
    assert not torch.allclose(a["first"], b["first"])
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-12, atol=0)
    torch.testing.assert_close(a["el2n"], b["el2n"], rtol=1e-12, atol=0)


def test_removal_terms_do_not_depend_on_the_batch(setup):
    _, _, removal, params, directions, _, (images, tokens) = setup
    whole = fast_terms(removal, params, directions, images, tokens, set(TERMS))
    for i in range(images.shape[0]):
        alone = fast_terms(
            removal, params, directions, images[i : i + 1], tokens[i : i + 1], set(TERMS)
        )
        for term in TERMS:
            torch.testing.assert_close(alone[term][0], whole[term][i], rtol=1e-9, atol=1e-14)


def test_a_reference_pair_is_removed_from_r_itself(setup):
    """For R's member k, removal from R is removal from R - k of a pair outside it."""
    bundle, plain, _, params, directions, _, _ = setup
    k = 2
    images, tokens = plain.ref_images[k : k + 1], plain.ref_tokens[k : k + 1]
    inside = ClipFunctions(bundle.model, plain.ref_images, plain.ref_tokens, removal=True)
    keep = [r for r in range(plain.ref_images.shape[0]) if r != k]
    outside = ClipFunctions(
        bundle.model, plain.ref_images[keep], plain.ref_tokens[keep], removal=True
    )
    a = fast_terms(inside, params, directions, images, tokens, set(TERMS))
    b = fast_terms(outside, params, directions, images, tokens, set(TERMS))
    for term in TERMS:
        assert torch.isfinite(a[term]).all(), term
        torch.testing.assert_close(a[term], b[term], rtol=1e-8, atol=1e-12)
