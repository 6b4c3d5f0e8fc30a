"""The whole pipeline through `run_demo` on an embedded Ray: rows in = rows out, a usable manifest."""

from __future__ import annotations

import dataclasses
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.data.shards import expand_pattern
from pipeline.demo import DemoConfig, format_summary, run_demo
from pipeline.errors import ConfigError
from pipeline.prune.datacomp import array_to_uids


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import ray

    run = tmp_path_factory.mktemp("demo") / "run"
    cfg = DemoConfig(
        run="run",  # relative, as `make demo` gives it: run from the directory above
        samples=300,
        shard_size=100,
        steps=30,
        checkpoints=2,
        workers=2,
        model="diffin-tiny",
        keep=0.7,
        batch_size=32,
        warmup=5,
        target_size=32,
        reference_size=31,
        eval_samples=20,
        target_samples=24,
    )
    here = os.getcwd()
    os.chdir(run.parent)
    try:
        summary = run_demo(cfg)
    finally:
        os.chdir(here)
        if ray.is_initialized():
            ray.shutdown()
    assert not ray.is_initialized()
    return {"cfg": cfg, "summary": summary, "run": run}


def _tar_uids(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return [
            json.loads(tf.extractfile(m).read())["uid"]
            for m in tf.getmembers()
            if m.name.endswith(".json")
        ]


def test_score_table_has_one_row_per_generated_sample(demo):
    run = demo["run"]
    sizes = json.loads((run / "data" / "sizes.json").read_text())
    assert sum(sizes.values()) == 300
    table = pq.read_table(run / "scores.parquet")
    assert table.num_rows == sum(sizes.values()) == demo["summary"]["samples"]
    uids = table.column("uid").to_pylist()
    assert len(set(uids)) == len(uids)
    status = table.column("status").to_pylist()
    assert set(status) <= {"ok", "error"}
    assert status.count("error") == demo["summary"]["errors"]
    for m in demo["cfg"].methods:
        assert m in table.column_names


def test_manifest_matches_tars_and_sizes(demo):
    out = Path(demo["summary"]["outputs"]["manifest"])
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    tars = expand_pattern(manifest["train_data"])
    assert [Path(t).name for t in tars] == sorted(sizes)
    counts = {Path(t).name: len(_tar_uids(Path(t))) for t in tars}
    assert counts == sizes
    assert manifest["train_num_samples"] == sum(sizes.values()) == manifest["kept"]
    assert manifest["kept"] == round(0.7 * manifest["rows_ok"]) == demo["summary"]["kept"]
    assert manifest["train_data"] == demo["summary"]["outputs"]["train_data"]

    arr = np.load(out / "uids.npy", allow_pickle=False)
    assert arr.dtype == np.dtype("u8,u8")
    pairs = arr.tolist()
    assert pairs == sorted(set(pairs))
    tar_uids = [u for t in tars for u in _tar_uids(Path(t))]
    assert array_to_uids(arr) == sorted(tar_uids)


def test_demo_json_and_summary(demo):
    written = json.loads((demo["run"] / "demo.json").read_text())
    s = demo["summary"]
    assert written["kept"] == s["kept"] and written["samples"] == s["samples"]
    assert s["mismatched_in_pool"] == 60  # 20% of 300
    assert 0 <= s["mismatched_kept"] <= s["mismatched_in_pool"]
    assert set(s["defects_kept_by_method"]) == set(demo["cfg"].methods)
    text = format_summary(s)
    assert f"{s['mismatched_kept']} of {s['mismatched_in_pool']} injected mismatched" in text
    for m in demo["cfg"].methods:
        assert m in text
    run_json = json.loads((demo["run"] / "run.json").read_text())
    assert {"train", "score", "evaluate"} <= set(run_json)


def test_the_demo_records_absolute_paths_whatever_directory_it_ran_from(demo):
    """Walkthrough: a demo run from runs/demo recorded runs/demo/data/..., so evaluate or
    report on a copy, or from another directory, could not find the pool."""
    run_json = json.loads((demo["run"] / "run.json").read_text())
    recorded = [
        run_json["train"]["config"]["data"],
        run_json["score"]["config"]["data"],
        run_json["score"]["config"]["target"],
    ]
    assert all(p.startswith(str(demo["run"]) + "/") for p in recorded), recorded


def test_demo_scores_toward_the_curated_target_split(demo):
    """The default demo target is the pool's clean target/ split, not the noisy held-out sample."""
    s = demo["summary"]
    target_dir = demo["run"] / "data" / "target"
    assert s["target"].startswith(str(target_dir))
    assert json.loads((target_dir / "sizes.json").read_text()) == {"00000.tar": 24}
    run_json = json.loads((demo["run"] / "run.json").read_text())
    assert run_json["score"]["config"]["target"] == s["target"]
    assert f"target set     : {s['target']}" in format_summary(s)


def test_demo_evaluates_every_scorer_and_ends_with_the_report(demo):
    s = demo["summary"]
    subsets = [r["subset"] for r in s["evaluation"]]
    methods = ["diffin", "tracin", "loss", "clip_score", "random"]
    assert subsets == ["full"] + [f"{m}@{k:g}" for k in (0.5, 0.7) for m in methods]
    report = Path(s["outputs"]["report"])
    assert report == demo["run"] / "report" / "index.html" and report.stat().st_size > 10_000
    html = report.read_text()
    assert "Evaluation: retraining on each kept subset" in html and "diffin@0.7" in html
    assert format_summary(s).rstrip().endswith(str(report))


@pytest.mark.parametrize(
    "change,field",
    [
        ({"keep": 1.5}, "keep"),
        ({"method": "nope"}, "method"),
        ({"methods": ["diffin", "nope"]}, "methods"),
        ({"steps": 30, "warmup": 40}, "warmup"),  # an explicit warm-up longer than the run
        ({"model": "nope"}, "model"),
        ({"noise": 1.0}, "noise"),
        ({"target": "clean"}, "target"),
        ({"target_samples": 0}, "target_samples"),
        ({"samples": 100}, "^samples: 100 pairs"),  # was refused by training, after make-data
        ({"samples": 200, "eval_keeps": [0.3]}, "^eval_keeps: keeping 0.3 of 200"),
    ],
)
def test_bad_demo_config_is_refused_before_any_work(tmp_path, change, field):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=field):
        run_demo(DemoConfig(run=str(run), **change))
    assert not run.exists()


def test_steps_alone_sizes_the_warm_up_and_the_checkpoints():
    """`diffin demo --steps 40` failed on the fixed 40-step warm-up, --steps 3 on the five
    checkpoints (review); the default run keeps its 40 warm-up steps."""
    from pipeline.demo import stage_configs

    for steps, warmup, checkpoints in ((400, 40, 25), (40, 4, 25), (20, 2, 20), (3, 0, 3)):
        train = stage_configs(DemoConfig(steps=steps))[1]
        assert (train.warmup, train.checkpoints) == (warmup, checkpoints), steps
    assert not stage_configs(DemoConfig(resume=False))[1].resume


def test_an_earlier_evaluation_is_not_shown_as_this_runs(demo, tmp_path):
    """With --no-evaluate the report showed the previous demo's evaluation table (review)."""
    import shutil

    import ray

    run = tmp_path / "again"
    shutil.copytree(demo["run"], run)
    assert (run / "evaluate" / "results.parquet").exists()
    cfg = dataclasses.replace(demo["cfg"], run=str(run), evaluate=False)
    try:
        summary = run_demo(cfg)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert summary["evaluation"] == [] and not (run / "evaluate").exists()
    html = Path(summary["outputs"]["report"]).read_text()
    assert "Not evaluated yet" in html
    # set aside as `diffin evaluate` sets it aside, and out of run.json (walkthrough: it
    # was deleted, while run.json and the report's provenance still listed it)
    (kept,) = (run / "evaluate-history").iterdir()
    assert (kept / "evaluate.json").is_file()
    assert "evaluate" not in json.loads((run / "run.json").read_text())


def test_demo_takes_the_form_its_divergence_error_advises(monkeypatch):
    """Walkthrough: a diverging propagation advised `--second-order derived`, which demo
    did not have."""
    from pipeline import cli, demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda cfg: seen.append(cfg) or {})
    monkeypatch.setattr(demo, "format_summary", lambda s: "")
    assert cli.main(["demo", "--second-order", "derived", "--no-evaluate"]) == 0
    assert seen[0].second_order == "derived"
    score = demo.stage_configs(seen[0])[2]
    assert score.second_order == "derived"
