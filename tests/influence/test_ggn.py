"""The Gauss-Newton product of the in-batch loss (the propagated form's default curvature)."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian, jvp

from pipeline.influence.directions import GaussNewton, batch_gradient_and_hvp
from pipeline.influence.functional import ClipFunctions, derivative_mode
from pipeline.influence.vectors import dot
from pipeline.model.loss import scale_of


@pytest.fixture(scope="module")
def setup(tiny64):
    bundle = tiny64.bundle()
    fns = ClipFunctions(bundle.model)
    params = {k: v.detach() for k, v in bundle.model.named_parameters()}
    size = bundle.model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    batches = [
        (
            torch.randn(5, 3, size, size, dtype=torch.float64),
            torch.randint(1, 400, (5, bundle.model.context_length)),
        )
        for _ in range(2)
    ]
    gen = torch.Generator().manual_seed(1)
    vecs = [
        {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}
        for _ in range(2)
    ]
    return fns, params, batches, vecs


def test_quadratic_form_equals_the_logit_hessian_along_jv(setup):
    """<v, G v> = (J v)' H_logits (J v), with H_logits formed explicitly by torch.func.hessian."""
    fns, params, batches, (v, _) = setup
    want = 0.0
    for images, tokens in batches:
        labels = torch.arange(images.shape[0])

        def logits_of(p, images=images, tokens=tokens):
            img, txt = fns.embed(p, images, tokens)
            return scale_of(p["logit_scale"]) * img @ txt.T

        def loss_of(lg, labels=labels):
            return 0.5 * (F.cross_entropy(lg, labels) + F.cross_entropy(lg.T, labels))

        with torch.no_grad(), derivative_mode():
            logits, jv = jvp(logits_of, (params,), (v,))
        h = hessian(loss_of)(logits).reshape(logits.numel(), logits.numel())
        want += float(jv.reshape(-1) @ h @ jv.reshape(-1)) / len(batches)
    got = float(dot(v, GaussNewton(fns, params, batches)(v)))
    assert got == pytest.approx(want, rel=1e-9)
    assert got > 0


def test_symmetric_and_positive_where_the_hessian_is_not(setup):
    fns, params, batches, (u, v) = setup
    ggn = GaussNewton(fns, params, batches)
    gu, gv = ggn(u), ggn(v)
    assert float(dot(u, gv)) == pytest.approx(float(dot(v, gu)), rel=1e-9)
    # the exact Hessian differs from its Gauss-Newton part by the network's own curvature
    _, hv = batch_gradient_and_hvp(fns, params, batches, v)
    assert float(dot(v, hv)) != pytest.approx(float(dot(v, gv)), rel=1e-3)
