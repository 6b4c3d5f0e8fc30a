"""The leave-one-out harness on a very small setting: structure and determinism."""

import numpy as np
import pytest
import torch

from pipeline.evaluation.groundtruth import GroundTruth, LOOSetting, run_groundtruth

TINY = dict(
    samples=56,
    target_size=16,
    reference_size=7,
    batch_size=8,
    steps=10,
    warmup=2,
    checkpoints=2,
    grad_batches=1,
    lr=1.0,
)


@pytest.fixture(scope="module")
def result():
    torch.set_num_threads(1)
    return run_groundtruth(LOOSetting(**TINY), n_removed=3, n_subsets=2, log=lambda *_: None)


def test_structure(result):
    assert result.n_train == 40
    assert len(result.removed) == 3 == len(set(result.removed))
    assert result.actual.shape == (3,)
    assert np.isfinite(result.actual).all()
    for name in (
        "diffin",
        "tracin",
        "diffin_second",
        "diffin_propagated_hessian",
        "diffin_derived",
        "diffin_derived_second",
        "loss",
        "clip_score",
        "random",
    ):
        assert result.scores[name].shape == (40,), name
        assert np.isfinite(result.scores[name]).all(), name
    # diffin = tracin + second-order part (the default form, first_order=True), both forms
    np.testing.assert_allclose(
        result.scores["diffin_derived"],
        result.scores["tracin"] + result.scores["diffin_derived_second"],
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        result.scores["diffin"],
        result.scores["tracin"] + result.scores["diffin_second"],
        rtol=1e-12,
    )
    assert result.subsets.shape == (2, 40) and result.subsets.sum(1).tolist() == [20, 20]
    assert result.subset_actual.shape == (2,)
    assert [c["step"] for c in result.checkpoints] == [5, 10]
    assert len(result.defects) == 40


def test_removing_nothing_reproduces_the_full_run(result):
    assert result.noise_floor["repeat_max_abs_param_diff"] == 0.0
    assert result.noise_floor["empty_mask_max_abs_param_diff"] == 0.0
    assert result.noise_floor["empty_mask_target_loss_diff"] == 0.0


def test_the_measured_effects_are_the_target_loss_with_the_pairs_removed_minus_without(result):
    """Test audit: actual and subset_actual were checked for shape and finiteness only, so a
    sign flip (base - removed) passed; the benchmarks' Spearman and LDS rest on them."""
    torch.set_num_threads(1)
    gt = GroundTruth(LOOSetting(**TINY))
    base = gt.target_loss(gt.train().final)
    assert base == result.base_target_loss
    z = result.removed[0]
    gone = gt.target_loss(gt.train(removed=gt.mask([z])).final)
    assert result.actual[0] == gone - base
    subset = torch.from_numpy(result.subsets[0])
    assert result.subset_actual[0] == gt.target_loss(gt.train(removed=subset).final) - base
    # the checkpoint-mean objective: the mean over the checkpoints (the last is theta_T)
    full, cut = gt.train(keep_checkpoints=True), gt.train(gt.mask([z]), keep_checkpoints=True)

    def mean(run):
        return np.mean([gt.target_loss(p) for _, p in run.checkpoints])

    assert [c.step for c, _ in cut.checkpoints] == [5, 10]
    assert gt.target_loss(cut.checkpoints[-1][1]) == gone
    assert result.actual_cmean[0] == pytest.approx(mean(cut) - mean(full), rel=1e-12)
    assert result.scores["diffin_cmean"].shape == (40,)
    assert np.isfinite(result.scores["diffin_cmean"]).all()
    assert not np.allclose(result.scores["diffin_cmean"], result.scores["diffin_removal"])


def test_removal_changes_the_run():
    torch.set_num_threads(1)
    gt = GroundTruth(LOOSetting(**TINY))
    full = gt.train()
    one = gt.train(removed=gt.mask([0]))
    assert gt.target_loss(one.final) != gt.target_loss(full.final)
    again = gt.train(removed=gt.mask([0]))
    assert all(torch.equal(one.final[k], again.final[k]) for k in gt.names)


def test_a_clean_target_holds_clean_pairs_only_and_rows_score_a_subset(result):
    torch.set_num_threads(1)
    gt = GroundTruth(LOOSetting(**TINY, noise=0.4, clean_target=True))
    assert gt.n_train == 40 and gt.target_images.shape[0] == 16
    # every pair is either in V or in the training set, and V holds no mismatched caption
    assert "mismatch" in gt.defects
    assert gt.defects.count("mismatch") == round(0.4 * 56)
    full = gt.train(keep_checkpoints=True)
    ckpts = [c for c, _ in full.checkpoints]
    everything = gt.scores(gt.terms(full.checkpoints), ckpts)
    rows = [3, 17, 31]
    some = gt.scores(gt.terms(full.checkpoints, rows=rows), ckpts, rows=rows)
    for name in ("diffin", "tracin", "diffin_removal", "loss", "random"):
        np.testing.assert_allclose(some[name], everything[name][rows], rtol=1e-9, err_msg=name)


def test_a_clean_target_needs_enough_clean_pairs():
    with pytest.raises(ValueError, match="target pairs"):
        GroundTruth(LOOSetting(**{**TINY, "target_size": 40}, noise=0.5, clean_target=True))


def test_self_influence_rows_score_a_subset_and_own_losses_are_the_loss_column():
    torch.set_num_threads(1)
    gt = GroundTruth(LOOSetting(**TINY))
    full = gt.train(keep_checkpoints=True)
    ckpts = [c for c, _ in full.checkpoints]
    everything = gt.scores(gt.terms(full.checkpoints, self_influence=True), ckpts)
    rows = [2, 11, 29]
    some = gt.scores(gt.terms(full.checkpoints, rows=rows, self_influence=True), ckpts, rows=rows)
    for name in ("diffin_self", "diffin_self_second", "tracin_self", "grand"):
        assert everything[name].shape == (gt.n_train,), name
        assert np.isfinite(everything[name]).all(), name
        np.testing.assert_allclose(some[name], everything[name][rows], rtol=1e-8, err_msg=name)
    # without self terms, no self columns
    assert "diffin_self" not in gt.scores(gt.terms(full.checkpoints, rows=rows), ckpts, rows=rows)
    # l_z at the last checkpoint is what the loss scorer stores, negated
    last = full.checkpoints[-1][1]
    np.testing.assert_allclose(gt.sample_losses(last, rows), -everything["loss"][rows], rtol=1e-9)
