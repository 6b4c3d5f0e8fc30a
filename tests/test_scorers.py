"""The scorer registry: declared columns, finite floats, refusal of bad method lists."""

from __future__ import annotations

import dataclasses
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.reader import iter_shard
from pipeline.errors import ConfigError
from pipeline.influence.estimator import Checkpoint, checkpoint_weights
from pipeline.score.worker import ShardScorer
from pipeline.scorers import REGISTRY, ScoreContext, Scorer, Terms, get_scorers, needed_terms


@pytest.fixture(scope="module")
def all_scorer(tiny_scored) -> ShardScorer:
    cfg = dataclasses.replace(tiny_scored["config"], methods=sorted(REGISTRY))
    return ShardScorer(tiny_scored["run"], cfg)  # score_samples writes nothing


@pytest.fixture(scope="module")
def samples(tiny_pool):
    return list(islice(iter_shard(str(Path(tiny_pool["out"]) / "00002.tar")), 9))


@pytest.fixture(scope="module")
def worker_out(all_scorer, samples):
    """The worker's output for ``samples`` and the terms it handed to the scorers."""
    seen: dict[str, Terms] = {}
    for scorer in all_scorer.scorers:
        original = scorer.score

        def recording(terms, uids, ctx, _original=original):
            seen["terms"] = terms
            return _original(terms, uids, ctx)

        scorer.score = recording
    try:
        out = all_scorer.score_samples(samples)
    finally:
        for scorer in all_scorer.scorers:
            del scorer.score
    return out, seen["terms"]


def test_registry_has_the_documented_scorers():
    assert {"diffin", "tracin", "loss", "clip_score", "random"} <= set(REGISTRY)
    for name, cls in REGISTRY.items():
        assert issubclass(cls, Scorer) and cls.name == name
        assert cls.description
        for declared in (cls.terms, cls.last_terms, getattr(cls, "first_terms", frozenset())):
            assert isinstance(declared, frozenset)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_scorer_produces_exactly_its_declared_columns(name, all_scorer, samples, worker_out):
    _, terms = worker_out
    scorer = REGISTRY[name]()
    ctx = all_scorer.ctx
    cols = scorer.columns(ctx)
    assert cols[0] == name  # the final score is named after the scorer
    assert len(set(cols)) == len(cols)
    out = scorer.score(terms, [s.uid for s in samples], ctx)
    assert set(out) == set(cols)
    for c, v in out.items():
        v = np.asarray(v)
        assert v.shape == (len(samples),), c
        assert v.dtype == np.float64, c
        assert np.isfinite(v).all(), c


def test_all_scorers_together_through_the_worker(all_scorer, samples, worker_out):
    out, _ = worker_out
    assert len(set(all_scorer.columns)) == len(all_scorer.columns)  # no clashes
    assert set(out) == set(all_scorer.columns)
    for c, v in out.items():
        assert v.shape == (len(samples),) and np.isfinite(v).all(), c
    # loss_mean's last component and loss read the same term of the same checkpoint
    np.testing.assert_array_equal(out[f"loss_mean_t{all_scorer.ctx.last.step}"], out["loss"])


def test_scorer_formulas_on_given_terms():
    ctx = ScoreContext(
        [Checkpoint(10, 0.1), Checkpoint(20, 0.05)], 100, 0, {"second_order": "derived"}
    )
    rng = np.random.default_rng(0)
    terms = {
        c.step: {k: rng.normal(size=4) for k in ("first", "hb", "hz", "hv", "loss", "cosine")}
        for c in ctx.checkpoints
    }
    uids = [f"{i:032x}" for i in range(4)]
    tr = REGISTRY["tracin"]().score(terms, uids, ctx)
    # derived weights (default), by hand: checkpoint 10 stands for steps 0-9 at rate 0.1,
    # checkpoint 20 for steps 10-19 at 0.05 after an elapsed rate-sum of 1.0 (docs/method.md)
    t10, t20 = terms[10], terms[20]
    want = 0.01 * t10["first"] + 0.005 * t20["first"]
    np.testing.assert_allclose(tr["tracin"], want)
    di = REGISTRY["diffin"]().score(terms, uids, ctx)
    second = (
        -0.0045 * t10["hb"]
        + 0.0055 * t10["hz"]
        - 0.006125 * t20["hb"]
        + 0.001375 * t20["hz"]
        - 0.005 * t20["hv"]
    )
    np.testing.assert_allclose(di["diffin"], want + second)
    np.testing.assert_allclose(di["diffin_first_t20"], 0.005 * t20["first"])
    no_first = ScoreContext(
        ctx.checkpoints, 100, 0, {"first_order": False, "second_order": "derived"}
    )
    np.testing.assert_allclose(REGISTRY["diffin"]().score(terms, uids, no_first)["diffin"], second)
    # METHOD.md's form, literally: eta/(N m) and -t eta^2/(N m) (hb + hz), no hv
    method = ScoreContext(ctx.checkpoints, 100, 0, {"second_order": "method"})
    w = checkpoint_weights(ctx.checkpoints, 100, "method")
    assert [w[0].first, w[0].hb, w[1].first, w[1].hz] == pytest.approx(
        [0.1 / 200, -10 * 0.01 / 200, 0.05 / 200, -20 * 0.0025 / 200]
    )
    np.testing.assert_allclose(
        REGISTRY["diffin"]().score(terms, uids, method)["diffin"],
        sum(
            w[i].first * terms[c.step]["first"]
            + w[i].hb * (terms[c.step]["hb"] + terms[c.step]["hz"])
            for i, c in enumerate(ctx.checkpoints)
        ),
    )
    lo = REGISTRY["loss"]().score(terms, uids, ctx)
    np.testing.assert_array_equal(lo["loss"], -terms[20]["loss"])
    np.testing.assert_array_equal(lo["loss_raw"], terms[20]["loss"])
    lm = REGISTRY["loss_mean"]().score(terms, uids, ctx)
    np.testing.assert_allclose(lm["loss_mean"], -(terms[10]["loss"] + terms[20]["loss"]) / 2)
    np.testing.assert_array_equal(lm["loss_mean_t10"], -terms[10]["loss"])
    cs = REGISTRY["clip_score"]().score(terms, uids, ctx)
    np.testing.assert_array_equal(cs["clip_score"], terms[20]["cosine"])
    r1 = REGISTRY["random"]().score(terms, uids, ctx)["random"]
    r2 = REGISTRY["random"]().score(terms, uids[::-1], ctx)["random"]
    np.testing.assert_array_equal(r1, r2[::-1])  # a function of the uid, not the position


def test_needed_terms_last_only_at_the_last_checkpoint():
    ctx = ScoreContext([Checkpoint(1, 0.1), Checkpoint(2, 0.1)], n_train=10)
    scorers = get_scorers(["loss", "tracin"])
    assert needed_terms(scorers, ctx.checkpoints[0], ctx) == {"first"}
    assert needed_terms(scorers, ctx.checkpoints[1], ctx) == {"first", "loss"}
    assert needed_terms(get_scorers(["random"]), ctx.checkpoints[1], ctx) == set()
    assert needed_terms(get_scorers(["loss_mean"]), ctx.checkpoints[0], ctx) == {"loss"}


@pytest.mark.parametrize(
    "names,match",
    [
        (["nope"], "nope"),
        (["diffin", "nope"], "nope"),
        ([], "methods"),
        (["diffin", "diffin"], "twice"),
        (["random", "loss", "random"], "twice"),
    ],
)
def test_get_scorers_refuses_bad_lists(names, match):
    with pytest.raises(ConfigError, match="methods") as info:
        get_scorers(names)
    assert match in str(info.value)


def test_get_scorers_keeps_the_order():
    assert [s.name for s in get_scorers(["random", "diffin", "loss"])] == [
        "random",
        "diffin",
        "loss",
    ]


def test_the_propagated_form_reads_hlin_as_its_second_order_part():
    """second_order="propagated": the engine's hlin is I_t itself (a JVP along r_t - W_first g_V),
    no hz is asked for, TracIn keeps the derived first-order weights, and diffin_self (which
    cannot be propagated per sample) keeps the derived expansion."""
    ckpts = [Checkpoint(10, 0.1), Checkpoint(20, 0.05)]
    prop = ScoreContext(ckpts, 100, 0, {"second_order": "propagated"})
    derived = ScoreContext(ckpts, 100, 0)
    diffin, self_ = REGISTRY["diffin"](), REGISTRY["diffin_self"]()
    assert needed_terms([diffin], ckpts[0], prop) == {"first", "hlin"}
    assert needed_terms([self_], ckpts[0], prop) == needed_terms([self_], ckpts[0], derived)
    w = checkpoint_weights(ckpts, 100, "propagated")
    assert [(x.hb, x.hz, x.hv) for x in w] == [(0.0, 0.0, 0.0)] * 2
    assert [x.first for x in w] == [x.first for x in checkpoint_weights(ckpts, 100)]
    rng = np.random.default_rng(1)
    keys = ("first", "hlin", "self_first", "self_hb", "self_hz")
    terms = {c.step: {k: rng.normal(size=3) for k in keys} for c in ckpts}
    uids = ["a", "b", "c"]
    out = diffin.score(terms, uids, prop)
    np.testing.assert_allclose(
        out["diffin"],
        sum(
            x.first * terms[c.step]["first"] + terms[c.step]["hlin"]
            for c, x in zip(ckpts, w, strict=True)
        ),
    )
    np.testing.assert_allclose(out["diffin_second_t20"], terms[20]["hlin"])
    np.testing.assert_allclose(
        self_.score(terms, uids, prop)["diffin_self"],
        self_.score(terms, uids, derived)["diffin_self"],
    )
