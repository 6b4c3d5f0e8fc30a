"""`diffin evaluate` on the tiny scored run: one row per subset, equal sizes, known defects."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ConfigError
from pipeline.evaluation.config import EvaluateConfig
from pipeline.evaluation.retrain import run_evaluation
from pipeline.prune.manifest import select
from tests.conftest import copy_run


@pytest.fixture(scope="module")
def evaluated(tiny_scored, tmp_path_factory):
    run = copy_run(tiny_scored["run"], tmp_path_factory.mktemp("evaluate") / "run")
    cfg = EvaluateConfig(
        run=run, keeps=[0.5, 0.8], methods=["diffin", "loss", "random"], steps=8, threads=1
    )
    summary = run_evaluation(cfg)
    return {"run": run, "summary": summary, "cfg": cfg}


def test_one_row_per_subset_with_equal_sizes_at_each_keep(evaluated, tiny_scored):
    res = pq.read_table(f"{evaluated['run']}/evaluate/results.parquet").to_pandas()
    assert list(res.subset) == [
        "full", "diffin@0.5", "loss@0.5", "random@0.5", "diffin@0.8", "loss@0.8", "random@0.8"
    ]  # fmt: skip
    scores = pq.read_table(tiny_scored["run"] + "/scores.parquet").to_pandas()
    n_ok = int((scores.status == "ok").sum())
    assert res.loc[res.subset == "full", "n_train"].item() == n_ok
    for keep in (0.5, 0.8):
        sizes = set(res.loc[res.keep == keep, "n_train"])
        assert sizes == {round(keep * n_ok)}
    for col in ("zeroshot_top1", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
        assert res[col].between(0, 1).all(), col
    assert (res.i2t_r5 >= res.i2t_r1).all() and (res.t2i_r5 >= res.t2i_r1).all()


def test_defect_counts_match_the_truth_table(evaluated, tiny_scored):
    res = pq.read_table(f"{evaluated['run']}/evaluate/results.parquet").to_pandas()
    pool_dir = tiny_scored["data"].rsplit("/", 1)[0]
    truth = pq.read_table(f"{pool_dir}/truth.parquet").to_pandas()
    full = res[res.subset == "full"].iloc[0]
    assert full.mismatch_kept == (truth.defect == "mismatch").sum()
    assert (res.mismatch_kept <= full.mismatch_kept).all()
    table = pq.read_table(tiny_scored["run"] + "/scores.parquet")
    defect = dict(zip(truth.uid, truth.defect, strict=True))
    for row in res[res.method != "full"].itertuples():
        kept = select(table, row.method, row.keep).column("uid").to_pylist()
        for d in ("mismatch", "duplicate", "noise"):
            assert getattr(row, f"{d}_kept") == sum(defect[u] == d for u in kept), (row.subset, d)


def test_results_markdown_and_record(evaluated):
    run = evaluated["run"]
    md = open(f"{run}/evaluate/results.md").read()
    assert "| subset |" in md and "| diffin@0.5 |" in md
    record = json.load(open(f"{run}/evaluate/evaluate.json"))
    assert record["train"]["steps"] == 8
    # the retraining recipe is evaluate's own (AdamW), not the proxy's SGD
    assert record["train"]["optimizer"] == "adamw" and record["train"]["lr"] == 1e-3
    assert "(adamw, lr 0.001, weight decay 0.1)" in md
    assert record["config"]["methods"] == ["diffin", "loss", "random"]
    assert "evaluate" in json.load(open(f"{run}/run.json"))


def test_same_config_gives_the_same_figures(evaluated, tmp_path):
    run = copy_run(evaluated["run"], tmp_path / "again")
    cfg = EvaluateConfig(run=run, keeps=[0.5], methods=["diffin"], steps=8, threads=1)
    again = {r["subset"]: r for r in run_evaluation(cfg)["results"]}
    first = {r["subset"]: r for r in evaluated["summary"]["results"]}
    for name in ("full", "diffin@0.5"):
        for col in ("zeroshot_top1", "i2t_r1", "t2i_r5", "final_train_loss"):
            assert again[name][col] == first[name][col], (name, col)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(methods=["nope"]), "no column"),
        (dict(keeps=[1.5]), "keeps"),
        (dict(keeps=[]), "keeps"),
        (dict(optimizer="lbfgs"), "optimizer"),
        (dict(seeds=[]), "seeds"),
        (dict(seeds=[1, 1]), "seeds"),
        (dict(eval_data="/nonexistent/{0..1}.tar"), "eval_data"),
        (dict(keeps=[0.001]), "^keeps: subset .* has 1 pairs"),  # was refused after training
        (dict(batch_size=10**5), "^batch_size: subset .* fewer than one batch"),
        (dict(threads=-1), "^threads"),
        (dict(lr=float("inf")), "^lr"),
        # each of these failed only mid-run, after retrainings (review)
        (dict(keeps=[0.5, 0.5]), "^keeps: duplicates"),
        (dict(seeds=[0, 2**64]), "^seeds: every seed"),
        (dict(seeds=[-1]), "^seeds: every seed"),
        (dict(weight_decay=float("nan")), "^weight_decay"),
        (dict(fusions=[{"loss": 1.0, "nope": 1.0}]), "^fusion: no column 'nope'"),
        (dict(fusions=[{"loss": float("nan")}]), "^fusion: weight of 'loss'"),
        (dict(fusions=[{"loss": 1.0}], fusion_norm="max"), "^fusion_norm"),
        (dict(fusion_norm="max"), "^fusion_norm"),  # recorded as given, without a fusion
        (dict(max_pairs=1), "^max_pairs"),
        (dict(max_pairs=2.5), "^max_pairs"),
        (dict(fusions=[{"loss": 1.0}, {"loss": 1}]), "^fusions: duplicates"),
        (dict(weight_decay=float("inf")), "^weight_decay"),
        (dict(batch_size=True), "^batch_size"),
        # ranked by shard position, or by the loss itself (keeps the worst; walkthrough)
        (dict(methods=["index"]), "^methods: 'index' is not a score column"),
        (dict(methods=["loss", "loss_raw"]), "^methods: 'loss_raw' is the loss itself"),
    ],
)
def test_config_errors_are_refused_before_training(
    tiny_scored, tmp_path, monkeypatch, change, match
):
    run = copy_run(tiny_scored["run"], tmp_path / "run")

    def no_training(*args, **kwargs):
        raise AssertionError("trained before the config error was found")

    monkeypatch.setattr("pipeline.evaluation.retrain.train_loop", no_training)
    with pytest.raises(ConfigError, match=match):
        run_evaluation(EvaluateConfig(run=run, steps=2, **change))
    import os

    assert not os.path.exists(f"{run}/evaluate")


def test_several_seeds_give_one_row_each_and_a_mean_sd_summary(tiny_scored, tmp_path):
    run = copy_run(tiny_scored["run"], tmp_path / "run")
    cfg = EvaluateConfig(
        run=run, keeps=[0.5], methods=["random"], full=False, steps=4, seeds=[0, 1], threads=1
    )
    rows = run_evaluation(cfg)["results"]
    assert [(r["subset"], r["seed"]) for r in rows] == [("random@0.5", 0), ("random@0.5", 1)]
    # a seed changes the initialisation and the batch order, not the subset
    assert rows[0]["n_train"] == rows[1]["n_train"]
    assert rows[0]["final_train_loss"] != rows[1]["final_train_loss"]
    md = open(f"{run}/evaluate/results.md").read()
    table_rows = [line for line in md.splitlines() if line.startswith("| random@0.5")]
    assert len(table_rows) == 1 and "±" in table_rows[0]
    assert "seeds 0, 1 (mean ± sd over seeds)" in md


def test_summarise_reports_mean_and_sample_sd():
    import pandas as pd

    from pipeline.evaluation.retrain import METRICS, summarise

    base = {"subset": "x@0.5", "method": "x", "keep": 0.5, "n_train": 10}
    base.update({f"{d}_kept": 1 for d in ("mismatch", "duplicate", "noise")})
    rows = [
        {**base, "seed": s, **{m: v for m in METRICS}, "final_train_loss": 1.0}
        for s, v in ((0, 0.2), (1, 0.4))
    ]
    out = summarise(pd.DataFrame(rows))
    assert out.loc[0, "i2t_r5"] == "0.300 ± 0.141"
    single = summarise(pd.DataFrame(rows[:1]))
    assert single.loc[0, "i2t_r5"] == 0.2


def test_the_default_methods_are_the_scorers_of_the_table(tiny_scored, tmp_path):
    """Before: a fixed list with clip_score, refused on a table scored without it (README)."""
    run = copy_run(tiny_scored["run"], tmp_path / "run")
    cfg = EvaluateConfig(run=run, keeps=[0.5], full=False, steps=2, threads=1)
    rows = run_evaluation(cfg)["results"]
    assert [r["subset"] for r in rows] == ["diffin@0.5", "tracin@0.5", "loss@0.5", "random@0.5"]
    record = json.load(open(f"{run}/evaluate/evaluate.json"))
    assert record["config"]["methods"] == ["diffin", "tracin", "loss", "random"]


def test_a_pool_given_as_a_directory_finds_its_truth_and_eval_split(tiny_scored, tmp_path):
    from pipeline.evaluation.retrain import locate_sources
    from pipeline.rundir import RunDir

    pool = tiny_scored["data"].split("{")[0].rstrip("/")
    for data in (pool, pool + "/"):
        src = locate_sources(EvaluateConfig(run=tiny_scored["run"], data=data), RunDir("x"))
        assert src.truth == f"{pool}/truth.parquet", data
        assert src.eval_labels and src.classes, data


def test_the_eval_split_of_a_pool_made_or_moved_elsewhere_is_found(tiny_scored, tmp_path):
    """Walkthrough: `make-data data` recorded `data/eval/...` as typed, and evaluate run in
    another directory (a Ray job's) looked for the eval split there."""
    import shutil

    from pipeline.evaluation.retrain import locate_sources
    from pipeline.rundir import RunDir

    pool = Path(tiny_scored["data"].split("{")[0].rstrip("/"))
    moved = tmp_path / "moved"
    shutil.copytree(pool, moved)
    summary = json.loads((moved / "synth.json").read_text())
    tail = summary["eval"]["val_data"].removeprefix(summary["out"].rstrip("/"))  # /eval/{..}.tar
    summary["out"] = "data"  # as make-data recorded a relative --out
    summary["eval"]["val_data"] = "data" + tail
    (moved / "synth.json").write_text(json.dumps(summary))
    src = locate_sources(EvaluateConfig(run=tiny_scored["run"], data=str(moved)), RunDir("x"))
    assert src.eval_data == f"{moved}{tail}"
    assert src.eval_labels == f"{moved}/eval/labels.parquet"


def test_eval_labels_without_classes_are_refused(tiny_scored, tmp_path):
    """Before: zero-shot was silently n/a."""
    import shutil

    from pipeline.evaluation.retrain import locate_sources
    from pipeline.rundir import RunDir

    pool = tiny_scored["data"].split("{")[0].rstrip("/")
    bare = tmp_path / "eval"
    bare.mkdir()
    for tar in sorted((Path(pool) / "eval").glob("*.tar")):
        shutil.copy(tar, bare / tar.name)
    cfg = EvaluateConfig(
        run=tiny_scored["run"],
        data=tiny_scored["data"],
        eval_data=str(bare),
        eval_labels=f"{pool}/eval/labels.parquet",
    )
    with pytest.raises(ConfigError, match="^eval_labels: zero-shot needs both") as info:
        locate_sources(cfg, RunDir("x"))
    # what was given, and what is missing (walkthrough: "neither ... found")
    assert "--eval-labels was given, and no classes.json was found beside" in str(info.value)
    # a flag naming no file is refused by its own name (was: by the default file's)
    for field in ("eval_labels", "classes", "truth"):
        missing = dataclasses.replace(cfg, **{"eval_labels": None, field: str(tmp_path / "x")})
        with pytest.raises(ConfigError, match=f"^{field}: .*x does not exist"):
            locate_sources(missing, RunDir("x"))


def test_a_uid_seen_twice_in_the_pool_is_read_once(tiny_scored, tmp_path):
    """Before: evaluate refused a pool that score and prune accept ("299 ... but 300 found")."""
    import shutil

    from pipeline.evaluation.retrain import _read_ok

    shard = tiny_scored["data"].split("{")[0] + "00000.tar"
    shutil.copy(shard, tmp_path / "copy.tar")
    both = f"{shard}::{tmp_path / 'copy.tar'}"
    once = _read_ok(shard, {})
    got = _read_ok(both, {}, {s.uid for s in once})
    assert [s.uid for s in got] == [s.uid for s in once]
    assert {s.shard for s in got} == {shard}  # the first time each uid is seen


def test_captions_the_model_cannot_tell_apart_count_as_one():
    """Two strings with one tokenisation have equal features; which of them topk ranks first
    is arbitrary, so matching by string scored a perfect model 0.5 here (review)."""
    import torch

    from pipeline.evaluation.retrain import EvalSet, measure
    from pipeline.model import factory

    torch.manual_seed(0)
    bundle = factory.create("diffin-tiny")
    captions = ["A red circle on blue", "a red  circle on blue"]
    tokens = bundle.tokenizer(captions)
    assert torch.equal(tokens[0], tokens[1])
    image = torch.randn(1, 3, 32, 32)
    ev = EvalSet(torch.cat([image, image]), tokens, captions, None, None)
    got = measure(bundle.model, ev)
    assert got["i2t_r1"] == got["t2i_r1"] == 1.0


def test_a_missing_metric_over_seeds_reads_n_a():
    import pandas as pd

    from pipeline.evaluation.retrain import METRICS, markdown_table, summarise

    base = {"subset": "x@0.5", "method": "x", "keep": 0.5, "n_train": 10}
    base.update({f"{d}_kept": 1 for d in ("mismatch", "duplicate", "noise")})
    rows = [
        {**base, "seed": s, **{m: 0.5 for m in METRICS}, "zeroshot_top1": float("nan")}
        for s in (0, 1)
    ]
    rows = [{**r, "final_train_loss": 1.0} for r in rows]
    out = summarise(pd.DataFrame(rows))
    assert out.loc[0, "zeroshot_top1"] == "n/a" and out.loc[0, "i2t_r5"] == "0.500 ± 0.000"
    assert "nan" not in markdown_table(out)


def test_subsets_of_unequal_size_at_one_keep_are_refused(tiny_scored, tmp_path):
    """A scorer with ok rows but no finite score trained on fewer pairs, silently (review)."""
    import numpy as np
    import pyarrow as pa

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    table = pq.read_table(f"{run}/scores.parquet")
    loss = table.column("loss").to_numpy(zero_copy_only=False).copy()
    ok = np.flatnonzero(np.isfinite(loss))
    loss[ok[:3]] = np.nan
    table = table.set_column(table.schema.get_field_index("loss"), "loss", pa.array(loss))
    pq.write_table(table, f"{run}/scores.parquet")
    with pytest.raises(ConfigError, match="^keeps: at keep 0.5 the subsets differ in size"):
        run_evaluation(
            EvaluateConfig(run=run, keeps=[0.5], methods=["diffin", "loss"], steps=2, threads=1)
        )
    assert not Path(f"{run}/evaluate").exists()


@pytest.mark.parametrize("steps", [0, 2.5, True])
def test_steps_must_be_a_positive_integer(steps):
    with pytest.raises(ConfigError, match="^steps: must be an integer >= 1"):
        EvaluateConfig(run="r", steps=steps).validate()


def test_the_training_pool_given_as_eval_data_is_refused(tiny_scored, tmp_path):
    """Every subset would have been measured on pairs it trained on (review)."""
    run = copy_run(tiny_scored["run"], tmp_path / "run")
    cfg = EvaluateConfig(
        run=run, keeps=[0.5], methods=["random"], steps=2, threads=1, eval_data=tiny_scored["data"]
    )
    with pytest.raises(ConfigError, match=r"^eval_data: \d+ of its pairs are in the scored pool"):
        run_evaluation(cfg)
    assert not Path(f"{run}/evaluate").exists()


def test_an_evaluation_that_dies_while_writing_leaves_the_previous_one_whole(
    evaluated, tmp_path, monkeypatch
):
    """results.parquet, results.md and evaluate.json change together or not at all."""
    run = copy_run(evaluated["run"], tmp_path / "run")
    before = {p.name: p.read_bytes() for p in Path(run, "evaluate").iterdir()}
    assert set(before) == {"results.parquet", "results.md", "evaluate.json"}

    def dies(url, obj):
        raise KeyboardInterrupt("killed while writing evaluate.json")

    monkeypatch.setattr("pipeline.evaluation.retrain.write_json", dies)
    cfg = EvaluateConfig(run=run, keeps=[0.5], methods=["random"], full=False, steps=2, threads=1)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(cfg)
    assert {p.name: p.read_bytes() for p in Path(run, "evaluate").iterdir()} == before
    # and the finished model's row, for the rerun (evaluation/partial.py)
    assert sorted(p.name for p in Path(run).iterdir() if p.name.startswith("evaluate")) == [
        "evaluate",
        "evaluate-partial",
    ]
    monkeypatch.undo()
    summary = run_evaluation(cfg)
    assert not Path(run, "evaluate-partial").exists()
    assert [r["subset"] for r in summary["results"]] == ["random@0.5"]
    assert json.load(open(f"{run}/evaluate/evaluate.json"))["results"] == summary["results"]
    assert pq.read_table(f"{run}/evaluate/results.parquet").column("subset").to_pylist() == [
        "random@0.5"
    ]


def test_a_fused_subset_is_what_prune_keeps_for_that_fusion(tiny_scored, tmp_path):
    """`evaluate --fuse` could not compare a fusion (issue 8: diffin_self combined with other
    scores): the fused subset is the z-scored weighted sum's top fraction, ties by uid."""
    import numpy as np

    from pipeline.evaluation.retrain import plan_subsets

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    fusion = {"loss": 1.0, "diffin": 0.5}
    cfg = EvaluateConfig(run=run, keeps=[0.5], methods=["loss"], full=False, fusions=[fusion])
    cfg.validate()
    table = pq.read_table(f"{run}/scores.parquet")
    subsets = plan_subsets(cfg, table, table_url=f"{run}/scores.parquet")
    assert [s["name"] for s in subsets] == ["loss@0.5", "fusion-zscore-diffin0.5+loss1@0.5"]
    ok = table.to_pandas().query("status == 'ok'")
    fused = sum(w * (ok[c] - ok[c].mean()) / ok[c].std(ddof=0) for c, w in fusion.items())
    k = round(0.5 * len(ok))
    order = np.lexsort((ok.uid.to_numpy(), -fused.to_numpy()))[:k]
    assert sorted(subsets[1]["uids"]) == sorted(ok.uid.to_numpy()[order])
    assert len(subsets[1]["uids"]) == len(subsets[0]["uids"])
    assert sorted(subsets[1]["uids"]) != sorted(subsets[0]["uids"])  # the fusion chose others


def test_evaluate_retrains_on_a_fused_subset_beside_the_scorers(tiny_scored, tmp_path):
    from pipeline import cli

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    argv = ["evaluate", "--run", run, "--keep", "0.5", "--methods", "loss", "--no-full"]
    argv += ["--fuse", "loss,diffin=0.5", "--fuse", "tracin", "--fusion-norm", "rank"]
    assert cli.main([*argv, "--steps", "2", "--threads", "1"]) == 0
    record = json.loads(Path(run, "evaluate", "evaluate.json").read_text())
    names = [r["subset"] for r in record["results"]]
    assert names == ["loss@0.5", "fusion-rank-diffin0.5+loss1@0.5", "fusion-rank-tracin1@0.5"]
    assert len({r["n_train"] for r in record["results"]}) == 1
    assert record["config"]["fusions"] == [{"loss": 1.0, "diffin": 0.5}, {"tracin": 1.0}]
    assert record["config"]["fusion_norm"] == "rank"
    assert "| fusion-rank-tracin1@0.5 |" in Path(run, "evaluate", "results.md").read_text()


def test_evaluate_names_what_a_killed_evaluation_left_behind(tiny_scored, tmp_path, caplog):
    run = copy_run(tiny_scored["run"], tmp_path / "run")
    left = Path(run, "evaluate.tmp-deadbeef")
    left.mkdir()
    cfg = EvaluateConfig(run=run, keeps=[0.5], methods=["random"], full=False, steps=2, threads=1)
    with caplog.at_level("WARNING", logger="pipeline.evaluation.retrain"):
        run_evaluation(cfg)
    said = [r.getMessage() for r in caplog.records if "did not finish" in r.getMessage()]
    assert len(said) == 1 and str(left) in said[0] and left.exists()


def test_a_pool_larger_than_the_memory_left_is_refused_before_it_is_read(
    tiny_scored, tmp_path, monkeypatch
):
    """evaluate holds its subsets' pairs as model inputs: a pool of millions was read for
    hours and then killed for memory (review)."""
    import pipeline.evaluation.retrain as retrain

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    n_ok = int((pq.read_table(f"{run}/scores.parquet").column("status").to_numpy() == "ok").sum())
    need = 2 * n_ok * 3 * 32 * 32  # diffin-tiny's 32x32 uint8 pixels, held twice while stacked
    monkeypatch.setattr(retrain, "available_bytes", lambda: need - 1)

    def no_reading(*args, **kwargs):
        raise AssertionError("the pool was read before the memory check")

    monkeypatch.setattr(retrain, "_read_ok", no_reading)
    with pytest.raises(
        ConfigError, match=rf"^max_pairs: .* the {n_ok} pairs of its subsets need"
    ) as e:
        run_evaluation(EvaluateConfig(run=run, keeps=[0.5], methods=["random"], steps=2))
    assert "--no-full with a lower --keep" in str(e.value)
    assert "as 32x32 uint8 pixels" in str(e.value)
    assert not Path(f"{run}/evaluate").exists()
    monkeypatch.undo()
    monkeypatch.setattr(retrain, "available_bytes", lambda: need)  # it fits: read, trained
    cfg = EvaluateConfig(run=run, keeps=[0.5], methods=["random"], steps=2, threads=1)
    assert [r["subset"] for r in run_evaluation(cfg)["results"]] == ["full", "random@0.5"]


def test_max_pairs_cuts_every_subset_to_one_fraction_by_a_seeded_draw(tiny_scored, tmp_path):
    """A pool too large for memory could only be refused; --max-pairs evaluates a seeded
    miniature of each kept subset instead, the same fraction of each."""
    from pipeline.evaluation.retrain import plan_subsets

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    table = pq.read_table(f"{run}/scores.parquet")
    n_ok = int((table.column("status").to_numpy(zero_copy_only=False) == "ok").sum())
    url = f"{run}/scores.parquet"
    base = dict(run=run, keeps=[0.5, 0.8], methods=["diffin", "loss"], fusions=[{"loss": 1.0}])
    whole = plan_subsets(EvaluateConfig(**base), table, table_url=url)
    cut = plan_subsets(EvaluateConfig(**base, max_pairs=n_ok // 4), table, table_url=url)
    again = plan_subsets(EvaluateConfig(**base, max_pairs=n_ok // 4), table, table_url=url)
    assert [s["uids"] for s in cut] == [s["uids"] for s in again]  # seeded
    fraction = (n_ok // 4) / n_ok
    for before, after in zip(whole, cut, strict=True):
        assert after["name"] == before["name"]
        assert len(after["uids"]) == round(fraction * len(before["uids"]))
        assert set(after["uids"]) < set(before["uids"])
    assert len(cut[0]["uids"]) == n_ok // 4  # the full pool, to max_pairs
    # a pair's place in the draw depends on its uid alone: the lowest seeded hashes
    import hashlib

    def drawn(uids, n):
        return set(
            sorted(uids, key=lambda u: hashlib.sha256(f"max_pairs\0{u}".encode()).digest())[:n]
        )

    for before, after in zip(whole, cut, strict=True):
        assert set(after["uids"]) == drawn(before["uids"], len(after["uids"]))
    # a pool within max_pairs is not cut
    within = plan_subsets(EvaluateConfig(**base, max_pairs=n_ok), table, table_url=url)
    assert [s["uids"] for s in within] == [s["uids"] for s in whole]


def test_evaluate_with_max_pairs_trains_on_the_cut_subsets_and_says_so(tiny_scored, tmp_path):
    run = copy_run(tiny_scored["run"], tmp_path / "run")
    cfg = EvaluateConfig(
        run=run, keeps=[0.5], methods=["random"], steps=2, threads=1, max_pairs=80, batch_size=8
    )
    rows = run_evaluation(cfg)["results"]
    assert [(r["subset"], r["n_train"]) for r in rows] == [("full", 80), ("random@0.5", 40)]
    assert (
        "--max-pairs 80: each subset is a seeded sample"
        in Path(run, "evaluate", "results.md").read_text()
    )
    # the report shows the evaluation's notes too (walkthrough: only results.md had them)
    from pipeline.report.build import build_report

    html = Path(build_report(run, top=2)).read_text()
    assert "--max-pairs 80: each subset is a seeded sample" in html
    # a cap the pool does not reach cuts nothing, and says so (was: "a seeded sample")
    summary = run_evaluation(dataclasses.replace(cfg, max_pairs=10**6))
    assert summary["notes"] == [
        f"--max-pairs {10**6}: not reached by the {summary['pool_pairs']} ok pairs; no subset was cut."
    ]


def test_a_table_that_repeats_uids_is_refused_before_training(tiny_scored, tmp_path):
    """Review: the pool is read back by uid, so every subset trained on the first ok copy of
    a repeated uid, whichever row the scorer kept; docs/results.md said it was refused."""
    from pipeline.evaluation.retrain import plan_subsets

    table = pq.read_table(f"{tiny_scored['run']}/scores.parquet")
    uids = table.column("uid").to_pylist()
    ok = [i for i, s in enumerate(table.column("status").to_pylist()) if s == "ok"]
    uids[ok[1]] = uids[ok[0]]
    repeated = table.set_column(table.schema.get_field_index("uid"), "uid", pa.array(uids))
    cfg = EvaluateConfig(run="r", keeps=[0.5], methods=["loss"], full=False)
    with pytest.raises(ConfigError, match=r"^scores: the score table repeats 1 uid"):
        plan_subsets(cfg, repeated)
    assert plan_subsets(cfg, table)  # the table as scored: fine


def test_an_eval_set_the_scores_were_aimed_at_is_refused(tiny_scored, tmp_path):
    """Review: `diffin score --target EVAL` then `diffin evaluate` measured the influence
    scorers on the very pairs they chose subsets to help, without a word."""
    from pipeline.evaluation.retrain import locate_sources
    from pipeline.rundir import RunDir

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    cfg = EvaluateConfig(run=run, keeps=[0.5], methods=["random"], steps=2, threads=1)
    eval_data = locate_sources(cfg, RunDir(run)).eval_data
    path = Path(run, "run.json")
    record = json.loads(path.read_text()) if path.exists() else {}
    score = record.setdefault("score", {}).setdefault("config", {})
    score.setdefault("data", locate_sources(cfg, RunDir(run)).data)
    score["target"] = eval_data
    path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"^eval_data: \d+ of its pairs are in the --target"):
        run_evaluation(cfg)
    assert not Path(run, "evaluate").exists()


def test_non_finite_results_are_written_as_null():
    """Review: without zero-shot labels evaluate.json held a bare NaN, which strict JSON
    parsers refuse."""
    from pipeline.evaluation.retrain import _json_safe

    got = _json_safe({"a": [float("nan"), 1.5, {"b": float("inf")}], "c": (2, float("-inf"))})
    assert got == {"a": [None, 1.5, {"b": None}], "c": [2, None]}
    json.loads(json.dumps(got), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))


def test_a_template_without_a_place_for_the_class_name_is_refused(tiny_scored, tmp_path):
    """Every class would get the same prompt, and top-1 would be the first class (review)."""
    from pipeline.evaluation.retrain import locate_sources
    from pipeline.rundir import RunDir

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    cfg = EvaluateConfig(run=run, keeps=[0.5], methods=["random"], steps=2, threads=1)
    src = locate_sources(cfg, RunDir(run))
    classes = json.loads(Path(src.classes).read_text())
    blind = tmp_path / "classes.json"
    blind.write_text(json.dumps({**classes, "templates": ["a photo of {}", "a photo"]}))
    bad = EvaluateConfig(**{**cfg.to_dict(), "classes": str(blind), "eval_labels": src.eval_labels})
    with pytest.raises(ConfigError, match=r"^classes: template 'a photo' has no \{\}"):
        run_evaluation(bad)
    numbered = tmp_path / "numbered.json"  # "{0}" fills the name as "{}" does: accepted
    numbered.write_text(json.dumps({**classes, "templates": ["a photo of {0}"]}))
    ok = EvaluateConfig(**{**bad.to_dict(), "classes": str(numbered), "methods": ["random"]})
    assert run_evaluation(ok)["results"]


def test_the_directory_of_a_list_of_patterns_is_the_first_ones(tmp_path):
    """Review: of 'a/{0..1}.tar::b/{0..1}.tar' the directory was 'a/{0..1}.tar::b', so the
    labels.parquet and classes.json beside the eval shards were missed (zero-shot n/a)."""
    from pipeline.evaluation.retrain import _pool_dir

    (tmp_path / "a").mkdir()
    assert _pool_dir(f"{tmp_path}/a/{{0..1}}.tar::{tmp_path}/b/{{0..1}}.tar") == f"{tmp_path}/a"
    assert _pool_dir(f"{tmp_path}/a/{{0..1}}.tar") == f"{tmp_path}/a"
    assert _pool_dir(f"{tmp_path}/a/") == f"{tmp_path}/a"  # the directory itself
    assert _pool_dir(f"{tmp_path}/a") == f"{tmp_path}/a"
    assert _pool_dir(f"{tmp_path}/a/*.tar") == f"{tmp_path}/a"


@pytest.mark.parametrize(
    "field, content, match",
    [
        ("classes", b'{"names": ["a"]}', "^classes: .* has no `classnames` list"),
        ("classes", b"PAR1\x00\xff\xfe binary", "^classes: .* is not a JSON file"),
        ("classes", b'{"classnames": ["a", "b"], "templates": "{}"}', "^classes: .*templates"),
        ("truth", None, r"^truth: .* is not a Parquet table with columns \['uid', 'defect'\]"),
        # walkthrough: another pool's truth showed 0 defects kept, a perfect cleaning
        ("truth", "other", r"^truth: none of the 1 uids of .* is a uid of the score table"),
    ],
)
def test_a_wrong_classes_or_truth_file_is_a_config_error_naming_it(
    tiny_scored, tmp_path, monkeypatch, field, content, match
):
    """Walkthrough: these were a KeyError, a UnicodeDecodeError and an ArrowInvalid."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    path = tmp_path / f"{field}.file"
    if content is None:  # a Parquet file, but without the defect column
        pq.write_table(pa.table({"uid": ["a"], "label": [0]}), path)
    elif content == "other":  # a truth table of pairs the run never scored
        pq.write_table(pa.table({"uid": ["f" * 32], "defect": ["mismatch"]}), path)
    else:
        path.write_bytes(content)

    def no_training(*args, **kwargs):
        raise AssertionError("trained before the config error was found")

    monkeypatch.setattr("pipeline.evaluation.retrain.train_loop", no_training)
    monkeypatch.setattr("pipeline.evaluation.retrain._read_ok", no_training)  # nor read
    with pytest.raises(ConfigError, match=match) as info:
        run_evaluation(EvaluateConfig(run=run, steps=2, **{field: str(path)}))
    assert "\n" not in str(info.value)  # one line, not Arrow's schema dump (walkthrough)


def test_a_truth_table_with_upper_case_uids_is_read_as_the_pool_s(tiny_scored, tmp_path):
    """The reader lowercases json uids; a truth table in upper case matched none of them."""
    import pyarrow.parquet as pq

    from pipeline.evaluation.retrain import load_truth, pool_truth

    truth = pq.read_table(pool_truth(tiny_scored["data"])).to_pandas()
    upper = tmp_path / "truth.parquet"
    truth.assign(uid=truth.uid.str.upper()).to_parquet(upper)
    assert load_truth(str(upper)).index.tolist() == truth.uid.tolist()


def test_a_second_evaluation_keeps_the_first_in_the_history(tiny_scored, tmp_path):
    """Walkthrough: each evaluate replaced evaluate/ whole; one small follow-up run threw
    away the demo's 11 retrainings."""
    import json

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    base = dict(run=run, keeps=[0.5], steps=2, threads=1, full=False)
    run_evaluation(EvaluateConfig(methods=["random"], **base))
    first = Path(f"{run}/evaluate/evaluate.json").read_bytes()
    assert not Path(f"{run}/evaluate-history").exists()
    second = run_evaluation(EvaluateConfig(methods=["loss"], **base))
    assert [r["subset"] for r in second["results"]] == ["loss@0.5"]
    (kept,) = Path(f"{run}/evaluate-history").iterdir()
    assert (kept / "evaluate.json").read_bytes() == first
    assert sorted(p.name for p in kept.iterdir()) == [
        "evaluate.json",
        "results.md",
        "results.parquet",
    ]
    assert json.loads(first)["results"][0]["subset"] == "random@0.5"


def test_each_model_trains_on_the_pairs_its_scorer_kept(tiny_scored, tmp_path, monkeypatch):
    """Test audit: sizes and defect counts came from the planned uids, so training every
    subset on the pool's first rows passed every test."""
    import pipeline.evaluation.retrain as retrain
    from pipeline.model.batches import Inputs

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    pools, trained = [], []
    read_ok, subset = retrain._read_ok, Inputs.subset
    monkeypatch.setattr(retrain, "_read_ok", lambda *a: pools.append(read_ok(*a)) or pools[-1])
    monkeypatch.setattr(
        Inputs, "subset", lambda self, idx: trained.append(idx) or subset(self, idx)
    )
    out = run_evaluation(
        EvaluateConfig(run=run, keeps=[0.5], methods=["diffin", "random"], steps=2, threads=1)
    )
    pool = pools[0]  # the pool (the eval set is read after it)
    got = [{pool[int(i)].uid for i in idx} for idx in trained]
    table = pq.read_table(f"{run}/scores.parquet")
    ok = table.filter(pa.compute.equal(table.column("status"), "ok"))
    want = [
        set(ok.column("uid").to_pylist()),  # the full pool
        set(select(table, "diffin", 0.5).column("uid").to_pylist()),
        set(select(table, "random", 0.5).column("uid").to_pylist()),
    ]
    assert [r["subset"] for r in out["results"]] == ["full", "diffin@0.5", "random@0.5"]
    assert got == want and want[1] != want[2]


def test_an_interrupted_evaluation_resumes_with_the_models_it_finished(
    evaluated, tmp_path, monkeypatch, caplog
):
    """Each model's row is kept as it finishes: a rerun trains only the rest, and gives
    the figures of an evaluation that was never interrupted."""
    import logging

    from pipeline.evaluation import retrain
    from pipeline.evaluation.partial import FinishedRows

    run = copy_run(evaluated["run"], tmp_path / "run")
    cfg = dataclasses.replace(evaluated["cfg"], run=run)
    trained = []
    real_loop, real_put = retrain.train_loop, FinishedRows.put

    def counted(*args, **kwargs):
        trained.append(1)
        return real_loop(*args, **kwargs)

    def put(self, key, row):
        real_put(self, key, row)
        if len(trained) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(retrain, "train_loop", counted)
    with monkeypatch.context() as m:
        m.setattr(FinishedRows, "put", put)
        with pytest.raises(KeyboardInterrupt):
            run_evaluation(cfg)
    assert len(list(Path(run, "evaluate-partial").glob("*.json"))) == 3 + 1  # request.json
    total = len(evaluated["summary"]["results"])
    # `diffin status` says so, and offers the command that resumes it
    import shlex

    from pipeline.cli import build_parser
    from pipeline.status import describe, run_status

    status = run_status(run)
    assert "; one that did not finish kept 3 model row(s) in evaluate-partial/" in describe(status)
    assert status["next_why"].startswith(
        "resumes the evaluation that did not finish: the 3 model row(s) it kept"
    )
    args = build_parser().parse_args(shlex.split(status["next"])[1:])
    assert (args.run, args.keep, args.methods, args.steps, args.threads) == (
        run,
        cfg.keeps,
        cfg.methods,
        cfg.steps,
        cfg.threads,
    ), status["next"]
    trained.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.evaluation.retrain"):
        summary = run_evaluation(cfg)
    assert len(trained) == total - 3
    assert f"3 of {total} models were trained by an evaluation that did not finish" in caplog.text
    first = {r["subset"]: r for r in evaluated["summary"]["results"]}
    again = {r["subset"]: r for r in summary["results"]}
    assert list(again) == list(first)
    for name, row in first.items():
        for col in ("zeroshot_top1", "i2t_r1", "t2i_r5", "final_train_loss", "n_train"):
            assert again[name][col] == row[col], (name, col)
        assert list(again[name]) == list(row)  # the columns in their order (review)
    assert not Path(run, "evaluate-partial").exists()  # in place: the rows are in evaluate/
    columns = pq.read_schema(f"{run}/evaluate/results.parquet").names
    assert columns == pq.read_schema(f"{evaluated['run']}/evaluate/results.parquet").names

    # other settings: nothing is taken from rows of these
    with monkeypatch.context() as m:
        m.setattr(FinishedRows, "put", put)
        trained.clear()
        with pytest.raises(KeyboardInterrupt):
            run_evaluation(cfg)
    # rows of other settings are kept, but not counted as rows the command offered takes
    # (walkthrough); a row one evaluation takes from another's counts for it
    other = dataclasses.replace(cfg, lr=3e-3)
    with monkeypatch.context() as m:
        m.setattr(FinishedRows, "put", put)
        trained.clear()
        with pytest.raises(KeyboardInterrupt):
            run_evaluation(other)
    status = run_status(run)
    assert status["evaluate_unfinished"]["models"] == 3
    assert status["evaluate_unfinished"]["other"] == 3
    assert "kept 3 model row(s) in evaluate-partial/ (and 3 of other settings)" in describe(status)
    assert f"--lr {other.lr}" in status["next"]
    with monkeypatch.context() as m:
        m.setattr(FinishedRows, "put", put)
        trained.clear()
        with pytest.raises(KeyboardInterrupt):
            run_evaluation(cfg)  # takes its 3 rows, trains 3 more
    assert run_status(run)["evaluate_unfinished"] == {
        **status["evaluate_unfinished"],
        "models": 6,
        "other": 3,
        "config": cfg.to_dict(),
    }
    trained.clear()
    run_evaluation(dataclasses.replace(cfg, lr=2e-3, keeps=[0.5]))
    assert len(trained) == 4  # full and three scorers at 0.5, all trained again
    assert not Path(run, "evaluate-partial").exists()


def test_rows_measured_on_a_file_rewritten_since_are_not_taken(evaluated, tmp_path, monkeypatch):
    """Review: the key held the held-out files' paths only; rows measured with other
    zero-shot templates were taken after classes.json was rewritten in place."""
    from pipeline.evaluation import retrain
    from pipeline.evaluation.partial import FinishedRows

    run = copy_run(evaluated["run"], tmp_path / "run")
    classes = Path(retrain.locate_sources(evaluated["cfg"], retrain.RunDir(run)).classes)
    saved = tmp_path / "classes.json"
    saved.write_bytes(classes.read_bytes())
    cfg = dataclasses.replace(evaluated["cfg"], run=run, keeps=[0.5], methods=["loss"])
    real_put = FinishedRows.put

    def put(self, key, row):
        real_put(self, key, row)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(FinishedRows, "put", put)
        with pytest.raises(KeyboardInterrupt):
            run_evaluation(cfg)
    try:
        text = json.loads(saved.read_text())
        classes.write_text(json.dumps({**text, "templates": ["{}"]}))
        trained = []
        real_loop = retrain.train_loop
        monkeypatch.setattr(
            retrain, "train_loop", lambda *a, **k: trained.append(1) or real_loop(*a, **k)
        )
        run_evaluation(cfg)
        assert len(trained) == 2  # the full pool's model too: measured with other templates

        # rewritten with the same size and modification time (a copy keeping times, a
        # coarse clock; walkthrough): what was read differs, so the rows are not taken
        classes.write_bytes(saved.read_bytes())
        with monkeypatch.context() as m:
            m.setattr(FinishedRows, "put", put)
            with pytest.raises(KeyboardInterrupt):
                run_evaluation(cfg)
        before = classes.stat()
        raw = saved.read_bytes()  # tokenized in lower case: another word, not its case
        assert b'"a photo of a {}."' in raw
        classes.write_bytes(raw.replace(b'"a photo of a {}."', b'"a otohp of a {}."'))
        os.utime(classes, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert classes.stat().st_size == before.st_size
        trained.clear()
        run_evaluation(cfg)
        assert len(trained) == 2
    finally:
        classes.write_bytes(saved.read_bytes())  # the session's pool


def test_kept_rows_serve_an_evaluation_of_more_subsets_and_count_for_it(
    evaluated, tmp_path, monkeypatch
):
    """Review: the rows' key hashed the whole pool read, so a subset added (with --no-full
    the pool read is their union) trained every model again; and rows taken from another
    evaluation were counted for it only as its loop reached them."""
    from pipeline.evaluation import retrain
    from pipeline.evaluation.partial import FinishedRows
    from pipeline.status import run_status

    run = copy_run(evaluated["run"], tmp_path / "run")
    first = dataclasses.replace(
        evaluated["cfg"], run=run, keeps=[0.5], methods=["loss", "random"], full=False
    )
    trained: list[str] = []
    real_loop, real_put = retrain.train_loop, FinishedRows.put
    monkeypatch.setattr(
        retrain, "train_loop", lambda *a, **k: trained.append(1) or real_loop(*a, **k)
    )

    def put_until(n):
        def put(self, key, row):
            real_put(self, key, row)
            if len(trained) == n:
                raise KeyboardInterrupt

        return put

    with monkeypatch.context() as m:
        m.setattr(FinishedRows, "put", put_until(2))
        with pytest.raises(KeyboardInterrupt):
            run_evaluation(first)  # both models trained, then stopped
    # more subsets (a pool read of their union), the new seed first: its models train
    # before the kept rows are reached
    more = dataclasses.replace(first, methods=["loss", "random", "diffin"], seeds=[1, 0])
    trained.clear()
    with monkeypatch.context() as m:
        m.setattr(FinishedRows, "put", put_until(1))
        with pytest.raises(KeyboardInterrupt):
            run_evaluation(more)
    assert len(trained) == 1
    partial = run_status(run)["evaluate_unfinished"]
    assert (partial["models"], partial["other"]) == (3, 0)  # 2 taken, 1 trained
    trained.clear()
    summary = run_evaluation(more)
    assert len(trained) == 6 - 3  # the two loss and random rows of seed 0 are not trained again
    assert len(summary["results"]) == 6
