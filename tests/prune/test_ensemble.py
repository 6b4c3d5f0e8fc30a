"""`diffin prune --ensemble`: the score of each row is its mean over several runs' tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ConfigError
from pipeline.prune.config import PruneConfig
from pipeline.prune.manifest import write_manifest
from pipeline.prune.select import plan


def _copy(tiny_scored, tmp_path: Path, name: str) -> Path:
    run = tmp_path / name
    shutil.copytree(tiny_scored["run"], run)
    return run


def _rewrite(run: Path, change, row_group_size: int | None = None) -> pa.Table:
    """RUN/scores.parquet changed by ``change`` (a pa.Table -> pa.Table), metadata kept."""
    path = run / "scores.parquet"
    table = pq.read_table(path)
    new = change(table).replace_schema_metadata(table.schema.metadata)
    pq.write_table(new, path, row_group_size=row_group_size)
    return new


def _set(table: pa.Table, name: str, values) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))


def _top(uids: list[str], scores: np.ndarray, ok: np.ndarray, keep: float) -> set[str]:
    """The top ``keep`` of the ok rows, ties by uid: what a full sort keeps."""
    rows = sorted((-s, u) for u, s, o in zip(uids, scores, ok, strict=True) if o)
    return {u for _, u in rows[: max(1, round(keep * len(rows)))]}


@pytest.fixture
def two_runs(tiny_scored, tmp_path):
    """The tiny run and a copy whose diffin and tracin are other numbers (another proxy's)."""
    a, b = _copy(tiny_scored, tmp_path, "a"), _copy(tiny_scored, tmp_path, "b")
    rng = np.random.default_rng(0)
    n = pq.read_metadata(a / "scores.parquet").num_rows

    def other_scores(t: pa.Table) -> pa.Table:
        for col in ("diffin", "tracin"):
            t = _set(t, col, rng.normal(size=n))
        return t

    _rewrite(b, other_scores, row_group_size=7)  # other batch boundaries than a's
    return a, b


def test_the_ensemble_keeps_the_top_of_the_mean_score(two_runs):
    a, b = two_runs
    ta, tb = (pq.read_table(r / "scores.parquet").to_pandas() for r in (a, b))
    mean = (ta.diffin.to_numpy() + tb.diffin.to_numpy()) / 2
    ok = ((ta.status == "ok") & (tb.status == "ok")).to_numpy()
    result = write_manifest(PruneConfig(run=str(a), keep=0.5, ensemble=[str(b)]))
    out = Path(result["dir"])
    assert out.name == "diffin-keep0.5-ens2"
    kept = pq.read_table(out / "keep.parquet").to_pandas()
    assert set(kept.uid) == _top(list(ta.uid), mean, ok, 0.5)
    # the manifest's scores are the means, not run a's
    by_uid = dict(zip(ta.uid, mean, strict=True))
    assert np.allclose(kept.diffin.to_numpy(), [by_uid[u] for u in kept.uid])
    # and differ from what run a alone keeps
    alone = _top(list(ta.uid), ta.diffin.to_numpy(), ok, 0.5)
    assert set(kept.uid) != alone
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rule"]["ensemble"] == [str(b)]
    assert [e["run"] for e in manifest["ensemble"]] == [str(b)]
    assert manifest["ensemble"][0]["scores"]["columns"] == ["diffin"]
    record = json.loads((a / "run.json").read_text())["prune/diffin-keep0.5-ens2"]
    assert record["config"]["ensemble"] == [str(b)]


def test_a_fusion_fuses_the_ensemble_means(two_runs):
    a, b = two_runs
    ta, tb = (pq.read_table(r / "scores.parquet").to_pandas() for r in (a, b))
    ok = ((ta.status == "ok") & (tb.status == "ok")).to_numpy()

    def z(x):
        return (x - x[ok].mean()) / x[ok].std()

    fused = sum(z((ta[c].to_numpy() + tb[c].to_numpy()) / 2) for c in ("diffin", "tracin"))
    result = write_manifest(
        PruneConfig(run=str(a), keep=0.5, fusion={"diffin": 1.0, "tracin": 1.0}, ensemble=[str(b)])
    )
    kept = pq.read_table(Path(result["dir"]) / "keep.parquet").to_pandas()
    assert set(kept.uid) == _top(list(ta.uid), fused, ok, 0.5)


def test_a_row_not_scored_in_another_run_is_not_kept_and_is_counted(two_runs):
    a, b = two_runs
    ta = pq.read_table(a / "scores.parquet").to_pandas()
    best = ta.uid[ta.diffin.idxmax()]  # run a's best row, which b could not score

    def fail_best(t: pa.Table) -> pa.Table:
        status = [
            "error" if u == best else s
            for u, s in zip(ta.uid, t["status"].to_pylist(), strict=True)
        ]
        t = _set(t, "status", status)
        return _set(
            t,
            "diffin",
            [
                100.0 if u == best else v
                for u, v in zip(ta.uid, t["diffin"].to_pylist(), strict=True)
            ],
        )

    _rewrite(b, fail_best)
    result = write_manifest(PruneConfig(run=str(a), keep=1.0, ensemble=[str(b)]))
    assert result["rows_in_table"] == len(ta)
    assert result["rows_error"] == int((ta.status != "ok").sum()) + 1
    kept = pq.read_table(Path(result["dir"]) / "keep.parquet").to_pandas()
    assert best not in set(kept.uid)
    assert len(kept) == result["rows_ok"]


def test_runs_of_other_rows_are_refused_before_anything_is_written(tiny_scored, tmp_path):
    a, b = _copy(tiny_scored, tmp_path, "a"), _copy(tiny_scored, tmp_path, "b")
    _rewrite(b, lambda t: t.take(pa.array(np.arange(t.num_rows)[::-1])))  # another order
    with pytest.raises(ConfigError, match="other rows, or the same rows in another order"):
        write_manifest(PruneConfig(run=str(a), keep=0.5, ensemble=[str(b)]))
    assert not (a / "prune").exists() or not any((a / "prune").iterdir())
    _rewrite(b, lambda t: t.slice(1))  # a row fewer
    with pytest.raises(ConfigError, match="holds .* rows"):
        write_manifest(PruneConfig(run=str(a), keep=0.5, ensemble=[str(b)]))


def test_a_column_another_run_lacks_is_refused_by_name(tiny_scored, tmp_path):
    a, b = _copy(tiny_scored, tmp_path, "a"), _copy(tiny_scored, tmp_path, "b")
    _rewrite(b, lambda t: t.drop(["tracin"]))
    with pytest.raises(ConfigError, match=f"no column 'tracin' in {b}"):
        write_manifest(PruneConfig(run=str(a), keep=0.5, method="tracin", ensemble=[str(b)]))
    # a column both hold still ranks
    assert write_manifest(PruneConfig(run=str(a), keep=0.5, ensemble=[str(b)]))["kept"] > 0
    as_text = pa.array(["x"] * pq.read_metadata(b / "scores.parquet").num_rows)
    _rewrite(b, lambda t: t.set_column(t.schema.get_field_index("diffin"), "diffin", as_text))
    with pytest.raises(ConfigError, match=f"column 'diffin' of {b}.* is not numeric"):
        write_manifest(PruneConfig(run=str(a), keep=0.5, ensemble=[str(b)]))


def _add_int_column(run: Path, values) -> None:
    _rewrite(run, lambda t: t.append_column("x", pa.array(values, pa.int64())))


def test_integer_columns_are_averaged_too(tiny_scored, tmp_path):
    """Review: an int column was ranked by --run's values alone."""
    a, b = _copy(tiny_scored, tmp_path, "a"), _copy(tiny_scored, tmp_path, "b")
    n = pq.read_metadata(a / "scores.parquet").num_rows
    _add_int_column(a, np.arange(n))
    _add_int_column(b, np.arange(n)[::-1])  # every mean is (n - 1) / 2: ties, broken by uid
    result = write_manifest(PruneConfig(run=str(a), keep=0.3, method="x", ensemble=[str(b)]))
    kept = pq.read_table(Path(result["dir"]) / "keep.parquet").to_pandas()
    ta = pq.read_table(a / "scores.parquet").to_pandas()
    ok = (ta.status == "ok").to_numpy()
    assert set(kept.uid) == _top(list(ta.uid), np.full(n, (n - 1) / 2), ok, 0.3)
    assert np.allclose(kept.x, (n - 1) / 2)


def test_the_balance_column_is_run_s_own_not_averaged(tiny_scored, tmp_path):
    """Review: a float --balance-by column was averaged into made-up groups."""
    a, b = _copy(tiny_scored, tmp_path, "a"), _copy(tiny_scored, tmp_path, "b")
    n = pq.read_metadata(a / "scores.parquet").num_rows
    _rewrite(a, lambda t: t.append_column("group", pa.array(np.arange(n) % 2, pa.float64())))
    _rewrite(b, lambda t: t.append_column("group", pa.array(np.full(n, 7.0))))
    result = write_manifest(
        PruneConfig(run=str(a), keep=0.5, rule="balanced", balance_by="group", ensemble=[str(b)])
    )
    # --run's groups, not the means 3.5 and 4.0
    assert set(result["selection"]["groups"]) == {"0", "1"}


def test_uids_stored_as_large_strings_are_the_same_uids(tiny_scored, tmp_path):
    a, b = _copy(tiny_scored, tmp_path, "a"), _copy(tiny_scored, tmp_path, "b")
    _rewrite(
        b,
        lambda t: t.set_column(
            0, pa.field("uid", pa.large_string()), t["uid"].cast(pa.large_string())
        ),
    )
    assert write_manifest(PruneConfig(run=str(a), keep=0.5, ensemble=[str(b)]))["kept"] > 0


def test_an_unscored_run_in_the_ensemble_is_refused(tiny_scored, tmp_path):
    a = _copy(tiny_scored, tmp_path, "a")
    with pytest.raises(ConfigError, match="no score table"):
        write_manifest(PruneConfig(run=str(a), keep=0.5, ensemble=[str(tmp_path / "none")]))


@pytest.mark.parametrize(
    "ensemble, match",
    [([], "one or more"), ("b", "one or more"), ([""], "one or more"), (["a"], "named twice")],
)
def test_bad_ensembles_are_config_errors(tmp_path, monkeypatch, ensemble, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=match):
        PruneConfig(run="a/", keep=0.5, ensemble=ensemble).validate()


def test_the_same_rows_in_batches_of_any_size_give_the_same_selection(two_runs):
    a, b = two_runs
    cfg = PruneConfig(run=str(a), keep=0.3, ensemble=[str(b)])
    picks = []
    for batch_rows in (5, 64, 1 << 18):
        sel = plan(cfg, str(a / "scores.parquet"), batch_rows, ensemble=[str(b / "scores.parquet")])
        picks.append(
            [u for batch in sel.kept_batches(["uid"]) for u in batch.column("uid").to_pylist()]
        )
    assert picks[0] == picks[1] == picks[2]


def test_the_cli_passes_the_ensemble_and_status_gives_it_back(two_runs, capsys):
    from pipeline import cli

    a, b = two_runs
    assert cli.main(["prune", "--run", str(a), "--keep", "0.5", "--ensemble", str(b)]) == 0
    manifest = json.loads((a / "prune" / "diffin-keep0.5-ens2" / "manifest.json").read_text())
    assert manifest["rule"]["ensemble"] == [str(b)]
    command = cli.command_for("prune", manifest["rule"])
    assert f"--ensemble {b}" in command
    capsys.readouterr()
    assert cli.main(["status", "--run", str(a)]) == 0
    assert "mean over this run and 1 other(s)" in capsys.readouterr().out


def test_the_report_says_the_selection_ranks_an_ensemble(two_runs):
    from pipeline.report.build import build_report

    a, b = two_runs
    write_manifest(PruneConfig(run=str(a), keep=0.5, ensemble=[str(b)]))
    html = open(build_report(str(a), top=2)).read()
    selections = html.split("<h2>Prune selections")[1].split("<h2>")[0]
    assert "diffin-keep0.5-ens2" in selections
    assert f"diffin, mean over this run and {b}" in selections


def test_evaluate_retrains_on_the_ensemble_subsets_beside_the_scorers(two_runs, capsys):
    """`diffin evaluate --ensemble`: each method also ranked by its mean over the runs,
    the subset being exactly what `diffin prune --ensemble` keeps."""
    from pipeline import cli
    from pipeline.evaluation.config import EvaluateConfig
    from pipeline.evaluation.retrain import plan_subsets

    a, b = two_runs
    cfg = EvaluateConfig(run=str(a), keeps=[0.5], methods=["diffin"], ensemble=[str(b)])
    cfg.validate()
    url = str(a / "scores.parquet")
    subsets = plan_subsets(cfg, pq.read_table(url), table_url=url)
    assert [s["name"] for s in subsets] == ["full", "diffin@0.5", "diffin-ens2@0.5"]
    result = write_manifest(PruneConfig(run=str(a), keep=0.5, ensemble=[str(b)]))
    pruned = pq.read_table(Path(result["dir"]) / "keep.parquet").column("uid").to_pylist()
    assert sorted(subsets[2]["uids"]) == sorted(pruned)
    assert sorted(subsets[2]["uids"]) != sorted(subsets[1]["uids"])

    argv = ["evaluate", "--run", str(a), "--keep", "0.5", "--methods", "diffin", "--no-full"]
    argv += ["--ensemble", str(b), "--steps", "2", "--threads", "1"]
    assert cli.main(argv) == 0
    record = json.loads((a / "evaluate" / "evaluate.json").read_text())
    assert [r["subset"] for r in record["results"]] == ["diffin@0.5", "diffin-ens2@0.5"]
    assert record["config"]["ensemble"] == [str(b)]
    # what b's table ranked is recorded, as prune does: a rescore of b that changes it
    # makes the evaluation stale (review: only --run's table was recorded and checked)
    from pipeline.rundir import RunDir
    from pipeline.score.table import evaluation_is_stale

    assert [o["run"] for o in record["ensemble"]] == [RunDir(str(b)).url]
    assert record["ensemble"][0]["scores"]["columns"] == ["diffin"]
    assert not evaluation_is_stale(RunDir(str(a)), record)
    _rewrite(b, lambda t: _set(t, "tracin", np.zeros(t.num_rows)))  # not what it ranked
    assert not evaluation_is_stale(RunDir(str(a)), record)
    _rewrite(b, lambda t: _set(t, "diffin", np.zeros(t.num_rows)))
    assert evaluation_is_stale(RunDir(str(a)), record)
    capsys.readouterr()
    assert cli.main(["status", "--run", str(a)]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("evaluate ")]
    assert line.endswith("[made from an earlier table]"), line
    with pytest.raises(ConfigError, match="named twice"):
        EvaluateConfig(run=str(a), methods=["diffin"], ensemble=[str(a)]).validate()
    with pytest.raises(ConfigError, match="named twice"):
        EvaluateConfig(run=str(a), methods=["diffin"], ensemble=[f"file://{a}/"]).validate()


def test_evaluate_refuses_an_ensemble_whose_runs_failed_other_rows(two_runs):
    """Review: the subsets' size check blamed non-finite scores or repeated uids."""
    from pipeline.evaluation.config import EvaluateConfig
    from pipeline.evaluation.retrain import plan_subsets

    a, b = two_runs
    first_ok = pq.read_table(a / "scores.parquet").to_pandas().query("status == 'ok'").uid.iloc[0]
    _rewrite(
        b,
        lambda t: _set(
            t,
            "status",
            [
                "error" if u == first_ok else s
                for u, s in zip(t["uid"].to_pylist(), t["status"].to_pylist(), strict=True)
            ],
        ),
    )
    cfg = EvaluateConfig(run=str(a), keeps=[0.5], methods=["diffin"], ensemble=[str(b)])
    url = str(a / "scores.parquet")
    with pytest.raises(ConfigError, match="1 of the rows .* are error rows in another run"):
        plan_subsets(cfg, pq.read_table(url), table_url=url)


def test_a_rescore_of_another_run_marks_the_ensemble_manifest_stale(two_runs, capsys):
    from pipeline import cli
    from pipeline.rundir import RunDir
    from pipeline.score.table import stale_manifests

    a, b = two_runs
    write_manifest(PruneConfig(run=str(a), keep=0.5, ensemble=[str(b)]))
    write_manifest(PruneConfig(run=str(a), keep=0.5))  # run a's own: never marked below
    assert stale_manifests(RunDir(str(a))) == []
    # another column of b changes: what the manifest ranked did not
    _rewrite(b, lambda t: _set(t, "tracin", np.zeros(t.num_rows)))
    assert stale_manifests(RunDir(str(a))) == []
    _rewrite(b, lambda t: _set(t, "diffin", np.zeros(t.num_rows)))
    assert stale_manifests(RunDir(str(a))) == ["diffin-keep0.5-ens2"]
    capsys.readouterr()
    assert cli.main(["status", "--run", str(a)]) == 0
    out = capsys.readouterr().out
    assert "diffin-keep0.5-ens2: " in out and "[ranks an earlier table]" in out
    assert f"diffin prune --run {a} --keep 0.5 --method diffin --ensemble {b}" in out
    shutil.rmtree(b)  # gone: the manifest cannot be what it ranks now
    assert stale_manifests(RunDir(str(a))) == ["diffin-keep0.5-ens2"]
