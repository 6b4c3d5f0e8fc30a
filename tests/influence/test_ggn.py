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


@pytest.mark.parametrize("kept_pairs", [512, 5, 0])
def test_quadratic_form_equals_the_logit_hessian_along_jv(setup, kept_pairs):
    """<v, G v> = (J v)' H_logits (J v), with H_logits formed explicitly by torch.func.hessian;
    the batches whose graphs are kept, those applied through their embeddings, and a mix."""
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
    got = float(dot(v, GaussNewton(fns, params, batches, kept_pairs, chunk=2)(v)))
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


def test_batches_beyond_the_kept_pairs_give_the_same_product(setup, count_pairs):
    """A large --batch-size kept the graphs of all k batches. Beyond ``kept_pairs`` they are
    applied a chunk at a time: the same G v, and no pass of more than a chunk of pairs."""
    fns, params, batches, (v, _) = setup
    want = GaussNewton(fns, params, batches)(v)
    sizes = count_pairs(fns)
    ggn = GaussNewton(fns, params, batches, kept_pairs=0, chunk=2)
    assert not ggn.ops and len(ggn.chunked) == len(batches)
    got = ggn(v)
    num = sum(float((got[k] - want[k]).pow(2).sum()) for k in want) ** 0.5
    den = sum(float(want[k].pow(2).sum()) for k in want) ** 0.5
    assert num / den < 1e-10
    assert max(sizes) == 2


def _rel(got, want):
    return max(float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in want)


def test_on_a_full_gpu_the_graphs_stop_being_kept(setup, monkeypatch):
    """No GPU here: the device's memory is given. The first batch's graph took 50 bytes;
    60 are left, less than twice a graph (the products need room), though more than one."""
    import pipeline.influence.directions as directions

    fns, params, batches, (v, _) = setup
    room, allocated = iter([100, 60]), iter([0, 50])
    monkeypatch.setattr(directions, "_room", lambda device: next(room))
    monkeypatch.setattr(directions, "_allocated", lambda device: next(allocated))
    ggn = GaussNewton(fns, params, batches)
    assert len(ggn.ops) == 1 and len(ggn.chunked) == 1
    assert _rel(ggn(v), GaussNewton(fns, params, batches, kept_pairs=0)(v)) < 1e-9


@pytest.mark.parametrize("room_after", [None, 10])
def test_running_out_of_memory_keeping_a_graph_chunks_the_rest(
    setup, monkeypatch, caplog, room_after
):
    """The second batch's graph runs out of memory. The first stays kept while the products
    have room (None: the host, no figure); with 10 bytes against a graph of 50 it is chunked
    too."""
    import pipeline.influence.directions as directions

    fns, params, batches, (v, _) = setup
    want = GaussNewton(fns, params, batches)(v)
    calls = []

    def vjp(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the second batch's forward pass (two VJPs a kept batch)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return directions_vjp(*args, **kwargs)

    directions_vjp = directions.vjp
    monkeypatch.setattr(directions, "vjp", vjp)
    rooms = iter([None if room_after is None else 1000] * 2 + [room_after] * 9)
    monkeypatch.setattr(directions, "_room", lambda device: next(rooms))
    allocated = iter([0, 50, 50])
    monkeypatch.setattr(directions, "_allocated", lambda device: next(allocated))
    with caplog.at_level("WARNING"):
        ggn = GaussNewton(fns, params, batches)
    kept = 0 if room_after == 10 else 1
    assert len(ggn.ops) == kept and len(ggn.chunked) == 2 - kept
    assert "out of GPU memory" in caplog.text and "--ggn-kept-pairs" in caplog.text
    assert f"{5 * kept} pairs kept" in caplog.text
    assert _rel(ggn(v), want) < 1e-9


def test_a_product_that_runs_out_of_memory_chunks_a_kept_batch_and_starts_again(
    setup, monkeypatch, caplog
):
    import pipeline.influence.directions as directions

    fns, params, batches, (v, _) = setup
    ggn = GaussNewton(fns, params, batches)
    want = ggn(v)
    assert len(ggn.ops) == 2
    calls = []

    def jvp(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second kept batch's logit-Hessian product
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return directions_jvp(*args, **kwargs)

    directions_jvp = directions.jvp
    monkeypatch.setattr(directions, "jvp", jvp)
    with caplog.at_level("WARNING"):
        got = ggn(v)
    assert len(ggn.ops) == 1 and len(ggn.chunked) == 1
    assert "out of GPU memory in a product" in caplog.text
    assert _rel(got, want) < 1e-9

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    ggn = GaussNewton(fns, params, batches, kept_pairs=0)
    monkeypatch.setattr(directions, "jvp", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):  # nothing kept to give up: raised, no loop
        ggn(v)
