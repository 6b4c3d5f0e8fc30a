"""The fast form against both references, on a tiny model, in float64 (METHOD.md section 7.1)."""

import pytest
import torch

from pipeline.influence.directions import compute_directions, target_gradient
from pipeline.influence.fast import fast_terms
from pipeline.influence.functional import ClipFunctions
from pipeline.influence.reference import exact_terms, finite_difference_terms
from pipeline.influence.vectors import axpy, norm
from pipeline.model import factory


@pytest.fixture(scope="module")
def setup(tiny64):
    bundle = tiny64.bundle()
    batch = tiny64.batches(1)
    ref = batch(7)
    fns = ClipFunctions(bundle.model, *ref)
    params = factory.param_dict(bundle.model)
    grad_batches = [batch(6), batch(6)]
    target = batch(5)
    directions = compute_directions(fns, params, grad_batches, target)
    return fns, params, directions, grad_batches, batch(4), target


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_fast_equals_exact_double_backward(setup):
    fns, params, directions, grad_batches, (images, tokens), _ = setup
    fast = fast_terms(fns, params, directions, images, tokens, {"first", "hb", "hz", "hv"})
    exact = exact_terms(fns, params, directions, grad_batches, images, tokens)
    for term in ("first", "hb", "hz", "hv"):
        assert _rel(fast[term], exact[term]) < 1e-6, term


@pytest.mark.parametrize("chunk", [4, 64])
def test_u_is_the_target_hessian_along_g_B(setup, chunk):
    """u = H_V g_B (double backward) against a central difference of target gradients; by
    the chain rule through the embeddings (chunk 4 of 12 pairs) and whole (64)."""
    from pipeline.influence.directions import target_gradient_and_hvp

    fns, params, directions, _, _, target = setup
    _, u = target_gradient_and_hvp(fns, params, *target, directions.g_B, chunk)
    h = 1e-5 / float(norm(directions.g_B))
    plus = target_gradient(fns, axpy(h, directions.g_B, params), *target, chunk=chunk)
    minus = target_gradient(fns, axpy(-h, directions.g_B, params), *target, chunk=chunk)
    diff = {k: (plus[k] - minus[k]) / (2 * h) for k in params}
    err = float(norm({k: diff[k] - u[k] for k in params}) / norm(u))
    assert err < 1e-6, err


def test_fast_matches_finite_difference_reference(setup):
    """The authors' one-sided difference converges to the fast form as eps shrinks.

    At their eps = 1e-3 the truncation error on this randomly initialised model
    (large curvature) is about 1%; at 1e-4 it is well inside 1e-2.
    """
    fns, params, directions, grad_batches, (images, tokens), target = setup
    fast = fast_terms(fns, params, directions, images, tokens, {"first", "hb", "hz", "hv"})
    errors = {}
    for eps in (1e-3, 1e-4):
        fd = finite_difference_terms(
            fns, params, directions, grad_batches, images, tokens, eps=eps, target=target
        )
        errors[eps] = {t: _rel(fast[t], fd[t]) for t in ("first", "hb", "hz", "hv")}
    for term in ("first", "hb", "hz", "hv"):
        assert errors[1e-4][term] < 1e-2, (term, errors)
        # hv's one-sided difference runs along g_B of the (large) target curvature: 3.3% at 1e-3
        assert errors[1e-3][term] < (5e-2 if term == "hv" else 3e-2), (term, errors)
    for term in ("hb", "hz", "hv"):  # first-order convergence of the truncation error
        assert errors[1e-4][term] < 0.5 * errors[1e-3][term], (term, errors)


def test_sample_terms_do_not_depend_on_the_batch(setup):
    fns, params, directions, _, (images, tokens), _ = setup
    need = {"loss", "first", "hb", "hz", "hv"}
    whole = fast_terms(fns, params, directions, images, tokens, need)
    for i in range(images.shape[0]):
        one = fast_terms(
            fns,
            params,
            directions,
            images[i : i + 1],
            tokens[i : i + 1],
            need,
        )
        for term, v in one.items():
            assert torch.allclose(v[0], whole[term][i], rtol=1e-9, atol=1e-12), term


def test_combined_term_is_the_weighted_sum_of_hb_and_hv(setup):
    """hlin (one JVP along a w + b u, what the engine computes) == a hb + b hv."""
    fns, params, directions, _, (images, tokens), _ = setup
    a, b = -0.37, 1.9
    lin = directions.combined(a, b)
    sep = fast_terms(fns, params, directions, images, tokens, {"hb", "hv"})
    got = fast_terms(fns, params, directions, images, tokens, {"hlin"}, lin=lin)
    assert _rel(got["hlin"], a * sep["hb"] + b * sep["hv"]) < 1e-10
    with pytest.raises(ValueError, match="hlin"):
        fast_terms(fns, params, directions, images, tokens, {"hlin"})


def _direct_target_gradient_and_hvp(fns, params, images, tokens, vector):
    """The whole target loss, R embedded with it, differentiated twice (the former method)."""
    from pipeline.influence.functional import derivative_mode

    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    with derivative_mode():
        loss = fns.sample_losses(p, images, tokens).mean()
        grads = torch.autograd.grad(loss, list(p.values()), create_graph=True, allow_unused=True)
        gv = sum((g * vector[k]).sum() for g, k in zip(grads, p, strict=True) if g is not None)
        hv = torch.autograd.grad(gv, list(p.values()), allow_unused=True)
    zero = torch.zeros_like
    return (
        {k: zero(p[k]) if g is None else g.detach() for g, k in zip(grads, p, strict=True)},
        {k: zero(p[k]) if h is None else h for h, k in zip(hv, p, strict=True)},
    )


@pytest.mark.parametrize("chunk", [3, 5, 64])
def test_the_chunked_target_derivatives_equal_the_whole_loss_differentiated(setup, chunk):
    """GPU-path review: each chunk of targets was differentiated together with all K
    references (88 GiB for ViT-B-32). Now the chain rule through the embeddings takes
    ``chunk`` pairs at a time, whatever K; it must be the same gradient and H_V v. One
    target is a reference pair itself (its self-match leaves it out of its negatives)."""
    from pipeline.influence.directions import target_gradient_and_hvp

    fns, params, directions, _, _, (images, tokens) = setup
    images = torch.cat([images, fns.ref_images[2:3]])
    tokens = torch.cat([tokens, fns.ref_tokens[2:3]])
    assert fns.self_mask(images, tokens) is not None
    g, h = target_gradient_and_hvp(fns, params, images, tokens, directions.g_B, chunk)
    g0, h0 = _direct_target_gradient_and_hvp(fns, params, images, tokens, directions.g_B)
    assert float(norm({k: g[k] - g0[k] for k in params}) / norm(g0)) < 1e-10
    assert float(norm({k: h[k] - h0[k] for k in params}) / norm(h0)) < 1e-10
    assert float(h["logit_scale"]) != 0.0 and float(g["logit_scale"]) != 0.0


def test_no_pass_of_the_target_derivatives_takes_more_than_a_chunk_of_pairs(setup, count_pairs):
    # what bounds the memory: the former method embedded each chunk of targets together
    # with all K references in one differentiated pass
    from pipeline.influence.directions import target_gradient_and_hvp

    fns, params, directions, _, _, (images, tokens) = setup
    sizes = count_pairs(fns)
    target_gradient_and_hvp(fns, params, images, tokens, directions.g_B, chunk=3)
    k = fns.ref_images.shape[0]
    assert max(sizes) == 3 < k and sum(sizes) == 3 * (images.shape[0] + k)  # E, J v, passes


def _direct_batch_gradient_and_hvp(fns, params, batches, vector, fixed=None):
    """Each gradient batch's loss differentiated twice whole (the former method)."""
    from pipeline.influence.functional import derivative_mode

    fixed = fixed or {}
    g_sum = {k: torch.zeros_like(v) for k, v in params.items()}
    h_sum = {k: torch.zeros_like(v) for k, v in params.items()}
    for images, tokens in batches:
        p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        with derivative_mode():
            loss = fns.batch_loss({**fixed, **p}, images, tokens)
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
            gv = sum((g * vector[k]).sum() for g, k in zip(grads, p, strict=True))
            hv = torch.autograd.grad(gv, list(p.values()), allow_unused=True)
        for g, h, k in zip(grads, hv, p, strict=True):
            g_sum[k] += g.detach()
            if h is not None:
                h_sum[k] += h
    return (
        {k: v / len(batches) for k, v in g_sum.items()},
        {k: v / len(batches) for k, v in h_sum.items()},
    )


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_the_chunked_batch_derivatives_equal_the_whole_batch_differentiated(setup, chunk):
    """GPU-path review: grad L(B) and H_B v took each gradient batch whole (--batch-size
    pairs per double backward: about 250 GiB for ViT-B-32 at a batch of 512). The chain
    rule through the embeddings takes ``chunk`` pairs at a time; it must give the same
    g_B and H_B v."""
    from pipeline.influence.directions import batch_gradient_and_hvp

    fns, params, directions, grad_batches, _, _ = setup
    g, h = batch_gradient_and_hvp(fns, params, grad_batches, directions.g_V, chunk)
    g0, h0 = _direct_batch_gradient_and_hvp(fns, params, grad_batches, directions.g_V)
    assert float(norm({k: g[k] - g0[k] for k in params}) / norm(g0)) < 1e-10
    assert float(norm({k: h[k] - h0[k] for k in params}) / norm(h0)) < 1e-10
    assert float(h["logit_scale"]) != 0.0 and float(g["logit_scale"]) != 0.0


@pytest.mark.parametrize("learned_scale", [False, True])
def test_the_chunked_batch_derivatives_in_a_subset_hold_the_rest_fixed(setup, learned_scale):
    # the self-influence's Lanczos differentiates a subset of the layers: without the logit
    # scale, or (its default split) everything but the token embedding
    from pipeline.influence.directions import batch_gradient_and_hvp

    fns, params, directions, grad_batches, _, _ = setup
    names = (
        [k for k in params if k != "token_embedding.weight"]
        if learned_scale
        else [k for k in params if k.startswith("visual.") or k == "text_projection"]
    )
    assert ("logit_scale" in names) == learned_scale and "token_embedding.weight" in params
    sub = {k: params[k] for k in names}
    fixed = {k: v for k, v in params.items() if k not in sub}
    vector = {k: directions.g_V[k] for k in names}
    g, h = batch_gradient_and_hvp(fns, sub, grad_batches, vector, chunk=4, fixed=fixed)
    g0, h0 = _direct_batch_gradient_and_hvp(fns, sub, grad_batches, vector, fixed)
    assert set(g) == set(h) == set(names)
    assert float(norm({k: g[k] - g0[k] for k in names}) / norm(g0)) < 1e-10
    assert float(norm({k: h[k] - h0[k] for k in names}) / norm(h0)) < 1e-10


def test_no_pass_of_the_batch_derivatives_takes_more_than_a_chunk_of_pairs(setup, count_pairs):
    from pipeline.influence.directions import batch_gradient_and_hvp

    fns, params, directions, grad_batches, _, _ = setup
    sizes = count_pairs(fns)
    batch_gradient_and_hvp(fns, params, grad_batches, directions.g_V, chunk=4)
    pairs = sum(b[0].shape[0] for b in grad_batches)
    assert max(sizes) == 4 < grad_batches[0][0].shape[0] and sum(sizes) == 3 * pairs
