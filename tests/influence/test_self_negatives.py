"""A scored pair that is one of the reference negatives R is not its own negative.

R is drawn from the pool and every pool pair is scored, so K pairs of the pool
meet themselves among R. Left in, their positive logit reappears as a negative
and their loss gains up to ln 2 (review). Every score built on l_z must see
such a pair exactly as if R held the other K - 1 references.
"""

import math

import pytest
import torch

from pipeline.influence.directions import compute_directions
from pipeline.influence.fast import fast_terms
from pipeline.influence.functional import ClipFunctions
from pipeline.influence.selfinf import FrozenReferences, self_terms
from pipeline.model import factory
from pipeline.model.loss import per_sample_loss

TERMS = {"loss", "first", "hb", "hz", "hv", "el2n"}


@pytest.fixture(scope="module")
def setup(tiny64):
    bundle = tiny64.bundle()
    batch = tiny64.batches(5)
    ref_images, ref_tokens = batch(6)
    params = factory.param_dict(bundle.model)
    fns = ClipFunctions(bundle.model, ref_images, ref_tokens)
    directions = compute_directions(fns, params, [batch(5)], batch(4))
    # A batch whose rows 1 and 3 are references 4 and 0; rows 0 and 2 are not.
    images, tokens = batch(4)
    images[1], tokens[1] = ref_images[4], ref_tokens[4]
    images[3], tokens[3] = ref_images[0], ref_tokens[0]
    return bundle, fns, params, directions, images, tokens


def test_the_loss_leaves_out_the_excluded_negatives():
    g = torch.Generator().manual_seed(0)
    unit = lambda n: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(n, 8, generator=g, dtype=torch.float64), dim=-1
    )
    img, txt, ref_img, ref_txt = unit(3), unit(3), unit(5), unit(5)
    ls = torch.tensor(math.log(20.0), dtype=torch.float64)
    exclude = torch.zeros(3, 5, dtype=torch.bool)
    exclude[1, 2] = True
    got = per_sample_loss(img, txt, ref_img, ref_txt, ls, exclude)
    keep = [0, 1, 3, 4]
    alone = per_sample_loss(img[1:2], txt[1:2], ref_img[keep], ref_txt[keep], ls)
    torch.testing.assert_close(got[1], alone[0], rtol=1e-14, atol=0)
    plain = per_sample_loss(img, txt, ref_img, ref_txt, ls)
    torch.testing.assert_close(got[[0, 2]], plain[[0, 2]], rtol=0, atol=0)
    # Without the mask, a pair equal to a reference is its own negative: + ln 2 when aligned.
    same = torch.nn.functional.normalize(torch.ones(1, 8, dtype=torch.float64), dim=-1)
    far = -same.expand(4, 8)
    stuck = per_sample_loss(same, same, torch.cat([same, far]), torch.cat([same, far]), ls * 2)
    assert float(stuck[0]) == pytest.approx(math.log(2), rel=1e-6)


def test_the_self_mask_finds_a_batch_s_own_pairs_by_their_inputs(setup):
    _, fns, _, _, images, tokens = setup
    mask = fns.self_mask(images, tokens)
    assert mask is not None and mask.shape == (4, 6)
    assert mask.nonzero().tolist() == [[1, 4], [3, 0]]
    # The same caption with other pixels is another pair: a negative as before.
    other = images.clone()
    other[1] += 1e-9
    assert fns.self_mask(other, tokens).nonzero().tolist() == [[3, 0]]
    assert fns.self_mask(images[[0, 2]], tokens[[0, 2]]) is None


def test_a_reference_pair_scores_as_if_r_held_the_other_references(setup):
    bundle, fns, params, directions, images, tokens = setup
    got = fast_terms(fns, params, directions, images, tokens, TERMS)
    for row, ref in ((1, 4), (3, 0)):
        keep = [k for k in range(6) if k != ref]
        without = ClipFunctions(bundle.model, fns.ref_images[keep], fns.ref_tokens[keep])
        want = fast_terms(
            without, params, directions, images[row : row + 1], tokens[row : row + 1], TERMS
        )
        for term in TERMS:
            torch.testing.assert_close(got[term][row], want[term][0], rtol=1e-10, atol=1e-14)
    # Rows that are not references keep all K negatives.
    alone = fast_terms(fns, params, directions, images[[0, 2]], tokens[[0, 2]], TERMS)
    for term in TERMS:
        torch.testing.assert_close(got[term][[0, 2]], alone[term], rtol=1e-10, atol=1e-14)
    assert torch.isfinite(torch.stack([got[t] for t in TERMS])).all()


def test_self_influence_terms_leave_out_the_pair_itself_too(setup):
    bundle, fns, params, directions, images, tokens = setup
    small = {k: v for k, v in params.items() if k != "token_embedding.weight"}

    def terms(f, i, t):
        refs = FrozenReferences.at(f, params, ("token_embedding.weight",))
        zero = lambda gz: torch.zeros(next(iter(gz.values())).shape[0])  # noqa: E731
        g_B = {k: directions.g_B[k] for k in small}
        return self_terms(f, small, refs, g_B, zero, i, t, chunk=2)

    got = terms(fns, images, tokens)
    keep = [k for k in range(6) if k != 4]
    without = ClipFunctions(bundle.model, fns.ref_images[keep], fns.ref_tokens[keep])
    want = terms(without, images[1:2], tokens[1:2])
    for term in ("self_first", "self_hz"):
        torch.testing.assert_close(got[term][1], want[term][0], rtol=1e-10, atol=1e-14)
