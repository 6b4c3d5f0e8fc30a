"""CLIP losses against direct computations and open_clip's own ClipLoss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from pipeline.model.loss import MAX_LOGIT_SCALE, batch_clip_loss, per_sample_loss, scale_of


def _unit(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)


@pytest.fixture
def feats():
    g = torch.Generator().manual_seed(0)
    return {
        "img": _unit(6, 8, g),
        "txt": _unit(6, 8, g),
        "ref_img": _unit(5, 8, g),
        "ref_txt": _unit(5, 8, g),
        "logit_scale": torch.tensor(math.log(1 / 0.07), dtype=torch.float64),
    }


def _direct(img, txt, ref_img, ref_txt, s):
    """Cross-entropy with label 0 over [positive, reference negatives], both directions."""
    out = []
    for z in range(img.shape[0]):
        i2t = s * torch.cat([(img[z] * txt[z]).sum()[None], ref_txt @ img[z]])
        t2i = s * torch.cat([(img[z] * txt[z]).sum()[None], ref_img @ txt[z]])
        label = torch.zeros(1, dtype=torch.long)
        out.append(0.5 * (F.cross_entropy(i2t[None], label) + F.cross_entropy(t2i[None], label)))
    return torch.stack(out)


def test_scale_is_open_clips_exp():
    # open_clip's forward is logit_scale.exp(); the clamp is applied to the
    # parameter after each optimiser step (the training loop does the same).
    assert scale_of(torch.tensor(2.0)).item() == pytest.approx(math.exp(2.0))
    assert MAX_LOGIT_SCALE == pytest.approx(math.log(100.0))


@pytest.mark.parametrize("log_s", [0.0, float(torch.tensor(math.log(100.0)))])
def test_the_scale_still_learns_at_the_bounds_as_in_open_clip(feats, log_s):
    """A clamp inside the loss zeroed d/d logit_scale at 0 and at float32 ln 100 (review)."""
    ls = torch.tensor(log_s, dtype=torch.float64, requires_grad=True)
    batch_clip_loss(feats["img"], feats["txt"], ls).backward()
    ls2 = torch.tensor(log_s, dtype=torch.float64, requires_grad=True)
    ClipLoss()(feats["img"], feats["txt"], ls2.exp()).backward()
    assert ls.grad != 0
    torch.testing.assert_close(ls.grad, ls2.grad, rtol=1e-10, atol=1e-12)
    ls3 = torch.tensor(log_s, dtype=torch.float64, requires_grad=True)
    args = (feats["img"], feats["txt"], feats["ref_img"], feats["ref_txt"])
    per_sample_loss(*args, ls3).sum().backward()
    assert ls3.grad != 0


@pytest.mark.parametrize("log_s", [0.0, math.log(1 / 0.07), 6.0])
def test_per_sample_loss_equals_direct_cross_entropy(feats, log_s):
    ls = torch.tensor(log_s, dtype=torch.float64)
    got = per_sample_loss(feats["img"], feats["txt"], feats["ref_img"], feats["ref_txt"], ls)
    want = _direct(feats["img"], feats["txt"], feats["ref_img"], feats["ref_txt"], scale_of(ls))
    assert got.shape == (6,)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_per_sample_loss_is_independent_of_other_rows(feats):
    args = (feats["ref_img"], feats["ref_txt"], feats["logit_scale"])
    whole = per_sample_loss(feats["img"], feats["txt"], *args)
    g = torch.Generator().manual_seed(7)
    for z in range(feats["img"].shape[0]):
        alone = per_sample_loss(feats["img"][z : z + 1], feats["txt"][z : z + 1], *args)
        torch.testing.assert_close(alone[0], whole[z], rtol=1e-12, atol=1e-12)
        # the same row in a batch of entirely different companions
        others_img, others_txt = _unit(3, 8, g), _unit(3, 8, g)
        mixed = per_sample_loss(
            torch.cat([others_img, feats["img"][z : z + 1]]),
            torch.cat([others_txt, feats["txt"][z : z + 1]]),
            *args,
        )
        torch.testing.assert_close(mixed[-1], whole[z], rtol=1e-12, atol=1e-12)


def test_per_sample_loss_depends_on_the_reference_set(feats):
    """Guards the independence test: the loss does see its inputs."""
    a = per_sample_loss(
        feats["img"], feats["txt"], feats["ref_img"], feats["ref_txt"], feats["logit_scale"]
    )
    b = per_sample_loss(
        feats["img"], feats["txt"], feats["ref_img"][:2], feats["ref_txt"][:2], feats["logit_scale"]
    )
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("log_s", [0.0, math.log(1 / 0.07), 5.0, 7.0])
def test_batch_clip_loss_equals_open_clip_clip_loss(feats, log_s):
    ls = torch.tensor(log_s, dtype=torch.float64)
    got = batch_clip_loss(feats["img"], feats["txt"], ls)
    want = ClipLoss()(feats["img"], feats["txt"], scale_of(ls))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_batch_clip_loss_gradient_matches_open_clip(feats):
    img = feats["img"].clone().requires_grad_(True)
    ls = feats["logit_scale"].clone().requires_grad_(True)
    batch_clip_loss(img, feats["txt"], ls).backward()
    img2 = feats["img"].clone().requires_grad_(True)
    ls2 = feats["logit_scale"].clone().requires_grad_(True)
    ClipLoss()(img2, feats["txt"], ls2.exp()).backward()
    torch.testing.assert_close(img.grad, img2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ls.grad, ls2.grad, rtol=1e-10, atol=1e-12)


def test_the_removal_loss_is_what_taking_z_out_of_a_batch_of_references_changes(feats):
    """(K+1) L(R + z) - K L(R) for a pair outside R; K L(R) - (K-1) L(R - z) for R's member."""
    img, txt, ref_img, ref_txt, ls = (
        feats["img"], feats["txt"], feats["ref_img"], feats["ref_txt"], feats["logit_scale"]
    )  # fmt: skip
    k = ref_img.shape[0]
    got = per_sample_loss(img, txt, ref_img, ref_txt, ls, removal=True)
    for z in range(img.shape[0]):
        with_z = batch_clip_loss(
            torch.cat([ref_img, img[z : z + 1]]), torch.cat([ref_txt, txt[z : z + 1]]), ls
        )
        want = (k + 1) * with_z - k * batch_clip_loss(ref_img, ref_txt, ls)
        torch.testing.assert_close(got[z], want, rtol=1e-10, atol=1e-12)
    # a scored pair that is reference 2 itself (the self-mask marks it)
    exclude = torch.zeros(1, k, dtype=torch.bool)
    exclude[0, 2] = True
    inside = per_sample_loss(ref_img[2:3], ref_txt[2:3], ref_img, ref_txt, ls, exclude, True)
    rest = [r for r in range(k) if r != 2]
    want = k * batch_clip_loss(ref_img, ref_txt, ls) - (k - 1) * batch_clip_loss(
        ref_img[rest], ref_txt[rest], ls
    )
    torch.testing.assert_close(inside[0], want, rtol=1e-10, atol=1e-12)
    # and its gradient, through every embedding
    ls2 = ls.clone().requires_grad_(True)
    per_sample_loss(
        ref_img[2:3], ref_txt[2:3], ref_img, ref_txt, ls2, exclude, True
    ).sum().backward()
    ls3 = ls.clone().requires_grad_(True)
    (
        k * batch_clip_loss(ref_img, ref_txt, ls3)
        - (k - 1) * batch_clip_loss(ref_img[rest], ref_txt[rest], ls3)
    ).backward()
    torch.testing.assert_close(ls2.grad, ls3.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 7])
@pytest.mark.parametrize("dim", [0, 1])
def test_logsumexp_leaving_out_matches_a_direct_sum(k, dim):
    from pipeline.model.loss import _logsumexp_leaving_out

    x = torch.randn(k, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64) * 30
    got = _logsumexp_leaving_out(x, dim)
    for i in range(k):
        rest = [j for j in range(k) if j != i]
        want = x.index_select(dim, torch.tensor(rest)).logsumexp(dim)
        torch.testing.assert_close(got.select(dim, i), want, rtol=1e-12, atol=1e-12)


def test_a_reference_member_whose_caption_dominates_another_row_has_a_finite_removal_loss():
    # Reference 1's image matches reference 2's caption far better than its own
    # (a mismatched pair): in row 1, z = reference 2 holds all the mass, and
    # log(1 - exp(a - LSE)) was log(0) in float32.
    g = torch.Generator().manual_seed(0)
    k = 6
    ref_img, ref_txt = _unit(k, 16, g), _unit(k, 16, g)
    ref_img[1] = F.normalize(
        ref_txt[2] + 0.01 * torch.randn(16, generator=g, dtype=torch.float64), dim=0
    )
    ls = torch.tensor(math.log(100.0), dtype=torch.float64)
    exclude = torch.zeros(1, k, dtype=torch.bool)
    exclude[0, 2] = True
    rest = [r for r in range(k) if r != 2]

    def definition(ri, rt, scale):  # K L(R) - (K-1) L(R - z), in float64
        return k * batch_clip_loss(ri, rt, scale) - (k - 1) * batch_clip_loss(
            ri[rest], rt[rest], scale
        )

    want = definition(ref_img, ref_txt, ls)
    ri32, rt32 = ref_img.float().requires_grad_(True), ref_txt.float()
    ls32 = ls.float().requires_grad_(True)
    got = per_sample_loss(ri32[2:3], rt32[2:3], ri32, rt32, ls32, exclude, True)[0]
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    got.backward()
    assert torch.isfinite(ri32.grad).all() and torch.isfinite(ls32.grad)
    # The derivatives the scorers take, in float64 against central differences: forward
    # mode (the fast form: one JVP, and a nested one for hz), reverse mode and double
    # backward (the exact reference). A logcumsumexp form was finite but 10% off in
    # forward mode (torch's derivative of it; diff review).
    from torch.func import jvp

    def f(scale):
        return per_sample_loss(ref_img[2:3], ref_txt[2:3], ref_img, ref_txt, scale, exclude, True)[
            0
        ]

    one = torch.ones((), dtype=torch.float64)
    h = 1e-4
    fd1 = (f(ls + h) - f(ls - h)) / (2 * h)
    fd2 = (f(ls + h) - 2 * f(ls) + f(ls - h)) / h**2
    first = jvp(f, (ls,), (one,))[1]
    second = jvp(lambda q: jvp(f, (q,), (one,))[1], (ls,), (one,))[1]
    x = ls.clone().requires_grad_(True)
    (rev,) = torch.autograd.grad(f(x), x, create_graph=True)
    (rev2,) = torch.autograd.grad(rev, x)
    torch.testing.assert_close(first, fd1, rtol=1e-7, atol=0)
    torch.testing.assert_close(rev.detach(), fd1, rtol=1e-7, atol=0)
    torch.testing.assert_close(second, fd2, rtol=1e-5, atol=0)
    torch.testing.assert_close(rev2, fd2, rtol=1e-5, atol=0)
