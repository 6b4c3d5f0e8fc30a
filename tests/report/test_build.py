"""The report page: every section present, figures and thumbnails inlined, nothing fetched."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.report.build import build_report, scorer_columns
from pipeline.score.table import table_metadata
from tests.conftest import copy_run

SECTIONS = [
    "Score distributions",
    "Evaluation: retraining on each kept subset",
    "Most harmful pairs (by diffin)",
    "Most helpful pairs (by diffin)",
    "Prune selections",
    "Errors per shard",
    "Provenance",
]


def _images(html: str) -> list[Image.Image]:
    out = []
    for mime, data in re.findall(r'src="data:image/(png|jpeg);base64,([^"]+)"', html):
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        img.load()
        assert img.format.lower() == mime
        out.append(img)
    return out


def test_report_has_every_section_and_inlines_its_images(reported):
    html = open(reported["html"]).read()
    assert re.findall(r"<h2>(.*?)</h2>", html) == SECTIONS
    assert "http://" not in html and "https://" not in html  # self-contained
    assert "<script" not in html
    images = _images(html)
    # histograms + 2 evaluation curves + 6 harmful + 6 helpful thumbnails
    assert len(images) == 3 + 12
    assert html.count("<table>") >= 5  # evaluation, errors, stages, checkpoints, versions
    assert "diffin@0.5" in html and "random@0.5" in html


def test_injected_defects_are_tagged_in_the_galleries(reported):
    html = open(reported["html"]).read()
    assert re.search(r'<span class="tag">(mismatch|duplicate|noise)</span>', html)


def test_report_without_evaluation_says_how_to_get_it(tiny_scored, tmp_path):
    run = copy_run(tiny_scored["run"], tmp_path / "run")
    html = open(build_report(run, method="loss", top=3)).read()
    assert "Not evaluated yet" in html
    assert "Most harmful pairs (by loss)" in html
    assert len(_images(html)) == 1 + 6


def test_error_rows_are_counted_per_shard(tiny_scored, tmp_path):
    run = copy_run(tiny_scored["run"], tmp_path / "run")
    table = pq.read_table(f"{run}/scores.parquet")
    frame = table.to_pandas()
    frame.loc[[0, 1], "status"] = "error"
    frame.loc[[0, 1], "error"] = "decode: image file is truncated"
    frame.loc[[0, 1], "diffin"] = float("nan")
    pq.write_table(
        table.from_pandas(frame, schema=table.schema, preserve_index=False), f"{run}/scores.parquet"
    )
    html = open(build_report(run, top=2)).read()
    shard = frame.shard[0].rsplit("/", 1)[-1]
    row = re.search(rf"<tr><td class=\"text\">{re.escape(shard)}</td>(.*?)</tr>", html).group(1)
    assert "<td>2</td>" in row and "decode: image file is truncated" in row


def test_a_shards_own_error_row_is_its_damage_not_a_sample():
    """Walkthrough: a garbage tar of 30 pairs showed "rows 1, errors 1", its reader row
    counted as a sample. Fed in batches of two rows: the counts add up across batches."""
    from pipeline.data.reader import shard_row_uid
    from pipeline.report.build import _errors_per_shard
    from pipeline.report.tablestats import ShardErrors

    cut, good = "/p/00001.tar", "/p/00000.tar"
    table = pa.table(
        {
            "shard": [good, good, cut, cut, cut],
            "uid": ["a" * 32, "b" * 32, "c" * 32, "d" * 32, shard_row_uid(cut)],
            "status": ["ok", "ok", "ok", "error", "error"],
            "error": [None, None, None, "decode: truncated", "unreadable shard: truncated tar"],
        }
    )
    errors = ShardErrors()
    for batch in table.to_batches(max_chunksize=2):
        errors.add(batch)
    rows, note = _errors_per_shard(errors.shards)
    assert rows[0] == ["00001.tar", 2, 1, "decode: truncated", "unreadable shard: truncated tar"]
    assert rows[1] == ["00000.tar", 2, 0, "", ""]
    assert (errors.rows, errors.errors) == (5, 2)
    assert (
        note == "2 shards, 1 sample error rows in all; 1 shard(s) could not be read to their end."
    )


def test_a_shard_changed_since_scoring_shows_no_other_pairs_pixels(tiny_scored, tmp_path):
    # The gallery reads pixels back from the shards by (shard, index); when the
    # uid there is no longer the scored one, that row's image is not shown.
    run = copy_run(tiny_scored["run"], tmp_path / "run")
    table = pq.read_table(f"{run}/scores.parquet")
    frame = table.to_pandas()
    lowest = frame[frame.status == "ok"].sort_values(["loss", "uid"]).index[0]
    frame.loc[lowest, "uid"] = "0" * 32  # what a rewritten shard looks like from the table
    frame.loc[lowest, "index"] = 10**6  # and a row the shard no longer has
    second = frame[frame.status == "ok"].sort_values(["loss", "uid"]).index[1]
    frame.loc[second, "uid"] = "f" * 32
    pq.write_table(
        table.from_pandas(frame, schema=table.schema, preserve_index=False), f"{run}/scores.parquet"
    )
    html = open(build_report(run, method="loss", top=3)).read()
    harmful = html.split("Most harmful pairs (by loss)")[1].split("Most helpful pairs")[0]
    assert "the shard changed since scoring" in harmful
    assert "the shard no longer holds this row" in harmful
    assert len(_images(harmful)) == 1  # the third pair is still the scored one
    assert len(_images(html)) == 1 + 1 + 3


def test_a_shard_that_cannot_be_read_now_says_so_not_that_it_changed(tiny_scored, tmp_path, caplog):
    """Walkthrough: with a scored shard moved away, the reader's row for the unreadable
    shard (index 0) was taken for a sample, and the pair at index 0 was said to have
    "changed" since scoring."""
    import shutil

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    table = pq.read_table(f"{run}/scores.parquet")
    frame = table.to_pandas()
    ok = frame[frame.status == "ok"]
    scored = ok.sort_values(["loss", "uid"]).shard.iloc[0]
    # the table names a copy of the shard (the pool is shared by other tests), then moved
    shard = str(tmp_path / "pool" / scored.rsplit("/", 1)[-1])
    (tmp_path / "pool").mkdir()
    shutil.copy(scored, shard)
    frame.loc[frame.shard == scored, "shard"] = shard
    pq.write_table(
        table.from_pandas(frame, schema=table.schema, preserve_index=False), f"{run}/scores.parquet"
    )
    rows = ok[ok.shard == scored]
    assert 0 in set(rows["index"])  # the index the reader's row for the shard takes
    shutil.move(shard, tmp_path / "moved.tar")
    with caplog.at_level("WARNING", logger="pipeline.report.thumbnails"):
        html = open(build_report(run, method="loss", top=len(ok))).read()
    assert "the shard changed since scoring" not in html
    assert html.count("(the shard cannot be read now: ") == 2 * len(rows)  # both galleries
    assert f"shard {shard} cannot be read now" in caplog.text


def test_a_table_the_last_score_run_did_not_write_is_said_on_the_page(tiny_scored, tmp_path):
    """Walkthrough: after an interrupted rescore with other inputs, the warning went to the
    console only and the page presented the earlier table as current."""
    from pipeline.rundir import write_json
    from pipeline.score.table import fingerprint_hash, write_table

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    table = f"{run}/scores.parquet"
    fingerprint = {"methods": ["diffin", "tracin", "loss", "random"]}  # what the driver records
    write_table(pq.read_table(table), table, {**table_metadata(table), "fingerprint": fingerprint})
    last = f"{run}/scores/fingerprint.json"
    write_json(last, {**fingerprint, "hash": fingerprint_hash(fingerprint)})
    html = open(build_report(run, top=2)).read()
    assert "Note: " not in html
    write_json(last, {**fingerprint, "hash": "0" * 16})  # what a rescore with other inputs left
    html = open(build_report(run, top=2)).read()
    distributions = html.split("<h2>Score distributions</h2>")[1].split("<h2>")[0]
    assert "Note: the last `diffin score` of" in distributions
    assert "did not write this table" in distributions


@pytest.mark.parametrize("top", [0, 501])
def test_a_gallery_size_out_of_range_is_refused_before_reading(tmp_path, top):
    # no run at all: the size is refused first
    with pytest.raises(ConfigError, match="top: .* give 1 to 500"):
        build_report(str(tmp_path / "no-run"), top=top)


def test_unknown_method_is_refused(tiny_scored):
    with pytest.raises(ConfigError, match="no column"):
        build_report(tiny_scored["run"], method="nope")


@pytest.mark.parametrize(
    "method, why", [("loss_raw", "higher = worse"), ("index", "not a score column")]
)
def test_galleries_refuse_columns_prune_refuses(tiny_scored, method, why):
    """Walkthrough: --method loss_raw titled the cleanest pairs "most harmful" (its high
    values are the worst); index was called missing, though it is in the table."""
    with pytest.raises(ConfigError, match=f"^method: '{method}' .*{why}"):
        build_report(tiny_scored["run"], method=method)


def test_scorer_columns_leave_out_per_checkpoint_components():
    cols = ["uid", "status", "diffin", "diffin_first_t10", "tracin", "tracin_t10", "loss_raw"]
    assert scorer_columns(cols, {}) == ["diffin", "tracin", "loss_raw"]
    assert scorer_columns(cols, {"score": {"methods": ["tracin", "diffin"]}}) == [
        "tracin",
        "diffin",
    ]


def test_the_evaluation_section_comes_from_evaluate_json_alone(reported, tmp_path):
    """Rows and settings from one file (an object-store copy that failed part-way could leave
    a newer results.parquet beside an older evaluate.json)."""
    import json

    run = copy_run(reported["run"], tmp_path / "run")
    (tmp_path / "run" / "evaluate" / "results.parquet").unlink()
    record = json.loads((tmp_path / "run" / "evaluate" / "evaluate.json").read_text())
    html = open(build_report(run, top=6)).read()
    assert "Evaluation: retraining on each kept subset" in html
    assert "diffin@0.5" in html and "random@0.5" in html
    assert f"evaluated on {record['eval_pairs']} held-out pairs" in html


def test_an_evaluation_without_zero_shot_is_shown_from_its_nulls(reported, tmp_path):
    """evaluate.json writes a missing zero-shot as null (it wrote a bare NaN, not JSON)."""
    import json

    run = copy_run(reported["run"], tmp_path / "run")
    path = tmp_path / "run" / "evaluate" / "evaluate.json"
    record = json.loads(path.read_text())
    for row in record["results"]:
        row["zeroshot_top1"] = None
    path.write_text(json.dumps(record))
    html = open(build_report(run, top=2)).read()
    assert "diffin@0.5" in html and "n/a" in html


def test_an_evaluation_of_an_earlier_score_table_is_not_shown(reported, tmp_path):
    """Walkthrough: after a rescore, the report showed the old evaluation's rows, for
    scorers the new table no longer had."""
    run = copy_run(reported["run"], tmp_path / "run")
    html = open(build_report(run, top=2)).read()
    assert "diffin@0.5" in html
    table = pq.read_table(f"{run}/scores.parquet")
    pq.write_table(table, f"{run}/scores.parquet")  # the same table written again: still current
    assert "diffin@0.5" in open(build_report(run, top=2)).read()
    fp = {**table_metadata(f"{run}/scores.parquet").get("fingerprint", {}), "methods": ["x"]}
    meta = {b"diffin": json.dumps({"fingerprint": fp}).encode()}
    # rescored with another scorer beside: the evaluated columns are as they were (walkthrough)
    pq.write_table(table.replace_schema_metadata(meta), f"{run}/scores.parquet")
    assert "diffin@0.5" in open(build_report(run, top=2)).read()
    values = table.column("diffin").to_numpy(zero_copy_only=False) + 1.0  # rescored: changed
    i = table.schema.get_field_index("diffin")
    table = table.set_column(i, "diffin", pa.array(values, mask=np.isnan(values)))
    pq.write_table(table.replace_schema_metadata(meta), f"{run}/scores.parquet")
    html = open(build_report(run, top=2)).read()
    assert "made from an earlier score table" in html
    assert "diffin@0.5" not in html and "random@0.5" not in html


def test_manifests_of_an_earlier_score_table_are_named_in_the_provenance(tiny_scored, tmp_path):
    from pipeline.prune.config import PruneConfig
    from pipeline.prune.manifest import write_manifest

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    assert "No prune selection yet" in _section(open(build_report(run, top=2)).read(), "Prune")
    write_manifest(PruneConfig(run=run, keep=0.5, name="half"))
    write_manifest(PruneConfig(run=run, keep=0.8, method="loss"))
    html = open(build_report(run, top=2)).read()
    assert "rank an earlier score table" not in html
    # each selection in a row of its own: what ranks it, what it keeps (walkthrough: raw
    # JSON in the provenance only)
    rows = _section(html, "Prune selections").split("<tr>")[2:]
    kept = {r.split("</td>")[0].split(">")[-1]: r for r in rows}
    n = len(pq.read_table(f"{run}/scores.parquet"))
    ok = int(sum(s == "ok" for s in pq.read_table(f"{run}/scores.parquet")["status"].to_pylist()))
    assert sorted(kept) == ["half", "loss-keep0.8"]
    assert f"<td>{ok // 2}</td><td>{n}</td><td>yes</td>" in kept["half"]
    assert ">loss</td><td>0.8</td>" in kept["loss-keep0.8"]
    table = pq.read_table(f"{run}/scores.parquet")
    recorded = table_metadata(f"{run}/scores.parquet")
    recorded["fingerprint"] = {**recorded.get("fingerprint", {}), "methods": ["x"]}
    meta = {**table.schema.metadata, b"diffin": json.dumps(recorded).encode()}
    # rescored with other scorers beside: what the manifests rank is as it was
    pq.write_table(table.replace_schema_metadata(meta), f"{run}/scores.parquet")
    assert "rank an earlier score table" not in open(build_report(run, top=2)).read()
    for column in ("diffin", "loss"):  # rescored: the ranking columns changed
        values = table.column(column).to_numpy(zero_copy_only=False) + 1.0
        i = table.schema.get_field_index(column)
        table = table.set_column(i, column, pa.array(values, mask=np.isnan(values)))
    pq.write_table(table.replace_schema_metadata(meta), f"{run}/scores.parquet")
    html = open(build_report(run, top=2)).read()
    assert "The prune manifests half, loss-keep0.8 were made from an earlier score table" in html
    assert _section(html, "Prune selections").count("no: an earlier table") == 2
    # a manifest from before prune recorded its table: not known, not "yes" (review)
    from pipeline.rundir import read_json, write_json

    record = read_json(f"{run}/run.json")
    record["prune/half"].pop("scores")
    write_json(f"{run}/run.json", record)
    rows = _section(open(build_report(run, top=2)).read(), "Prune selections").split("<tr>")[2:]
    half = next(r for r in rows if ">half<" in r)
    assert "<td>unknown</td></tr>" in half


def _section(html: str, heading: str) -> str:
    return html.split(f"<h2>{heading}")[1].split("<h2>")[0]


def test_the_provenance_table_gives_the_seconds_of_score_and_prune(tiny_scored, tmp_path):
    """Walkthrough: the score row was blank (its seconds are in its summary) and so were the
    prune rows (run.json held only their config and count)."""
    import json
    import re

    from pipeline.prune.config import PruneConfig
    from pipeline.prune.manifest import write_manifest
    from pipeline.rundir import RunDir

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    # the fixture's table was merged without the driver: its record, as the driver writes it
    RunDir(run).update_run_json("score", {"config": {}, "summary": {"seconds": 12.5}})
    write_manifest(PruneConfig(run=run, keep=0.5, name="half"))
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["prune/half"]["seconds"] >= 0
    html = open(build_report(run, top=2)).read()
    rows = dict(re.findall(r'<tr><td class="text">([^<]+)</td><td>([^<]*)</td></tr>', html))
    assert float(rows["score"]) == pytest.approx(record["score"]["summary"]["seconds"])
    assert float(rows["prune/half"]) == pytest.approx(record["prune/half"]["seconds"])


def test_without_diffin_the_galleries_rank_by_the_first_column_that_keeps_high(caplog):
    from pipeline.report.build import gallery_method

    with caplog.at_level("WARNING"):
        assert gallery_method(["loss_raw", "loss", "tracin"], None) == "loss"
    assert "rank by loss" in caplog.text
    assert gallery_method(["loss_raw", "diffin"], None) == "diffin"
    assert gallery_method(["loss_raw", "diffin"], "tracin") == "tracin"  # checked later
    with pytest.raises(ConfigError, match="no column of"):
        gallery_method(["loss_raw"], None)
