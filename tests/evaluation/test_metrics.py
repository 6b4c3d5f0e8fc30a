"""The metric helpers on cases with known answers."""

import numpy as np
import pytest

from pipeline.evaluation.metrics import (
    auroc,
    auroc_low_is_positive,
    lds,
    pearson,
    rankdata,
    spearman,
    subset_predictions,
)


def test_rankdata_averages_ties():
    assert rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_rankdata_matches_scipy_on_many_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    for n in (0, 1, 2, 7, 500):
        a = rng.integers(0, 6, n).astype(float)
        a[: n // 3] = -0.0  # -0.0 ties with 0.0
        assert rankdata(a).tolist() == scipy_stats.rankdata(a).tolist()


def test_a_nan_makes_every_figure_nan():
    # scipy's propagate policy: a NaN score cannot be ranked, so no figure is.
    x = [0.3, np.nan, 0.1, 0.2]
    assert np.isnan(rankdata(x)).all()
    assert np.isnan(spearman(x, [1, 2, 3, 4]))
    assert np.isnan(auroc(x, [True, False, True, False]))
    assert np.isnan(auroc_low_is_positive(x, [True, False, True, False]))


def test_spearman_known_values():
    x = np.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    # classic textbook case: d^2 sum = 2 over n = 5 -> 1 - 6*2/(5*24) = 0.9
    assert spearman([1, 2, 3, 4, 5], [2, 1, 3, 4, 5]) == pytest.approx(0.9)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_spearman_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 50).astype(float)
    b = a + rng.normal(size=50)
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic)


def test_pearson_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        pearson([1, 2], [1, 2, 3])


def test_auroc_known_values():
    labels = np.array([0, 0, 1, 1], bool)
    assert auroc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], labels) == 0.5
    # one inversion out of 4 pairs
    assert auroc([0.1, 0.85, 0.8, 0.9], labels) == pytest.approx(0.75)
    assert auroc_low_is_positive([0.9, 0.8, 0.2, 0.1], labels) == 1.0
    assert np.isnan(auroc([1, 2], [True, True]))


def test_lds_of_an_exactly_additive_model_is_one():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=30)
    masks = rng.random((12, 30)) < 0.5
    actual = 3.0 * (masks @ scores) + 0.1
    assert subset_predictions(scores, masks) == pytest.approx(masks @ scores)
    assert lds(scores, masks, actual) == pytest.approx(1.0)
    assert lds(-scores, masks, actual) == pytest.approx(-1.0)


def test_bootstrap_ci_resamples_rows_jointly_and_nests_its_levels():
    # test audit: every 90% interval of the leave-one-out benchmarks came from an untested
    # function
    from pipeline.evaluation.metrics import bootstrap_ci

    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    # a statistic of the pairing itself: only a joint resample keeps a == b
    assert bootstrap_ci(lambda x, y: float(np.mean(x == y)), a, a.copy(), n=200) == (1.0, 1.0)
    assert bootstrap_ci(lambda x: 3.0, a, n=50) == (3.0, 3.0)
    lo90, hi90 = bootstrap_ci(np.mean, a, n=400, level=0.9)
    lo50, hi50 = bootstrap_ci(np.mean, a, n=400, level=0.5)
    assert lo90 < lo50 < np.mean(a) < hi50 < hi90
    # the mean's interval is about +-1.645 standard errors wide
    se = a.std() / np.sqrt(len(a))
    assert abs((hi90 - lo90) / (2 * 1.645 * se) - 1) < 0.25
    assert all(np.isnan(bootstrap_ci(lambda x: float("nan"), a, n=20)))
    # reproducible with its seed, and the seed is used
    assert bootstrap_ci(np.mean, a, n=100, seed=3) == bootstrap_ci(np.mean, a, n=100, seed=3)
    assert bootstrap_ci(np.mean, a, n=100, seed=3) != bootstrap_ci(np.mean, a, n=100, seed=4)
