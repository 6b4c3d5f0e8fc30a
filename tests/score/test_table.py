"""The score table: one row per sample, null scores for error rows, Parquet with metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.data.sample import Sample
from pipeline.score.table import (
    BASE_FIELDS,
    build_part,
    read_table,
    schema,
    table_metadata,
    write_table,
)

COLS = ["diffin", "random"]


def _samples() -> list[Sample]:
    return [
        Sample(uid="a" * 32, key="k0", shard="s.tar", index=0, caption="one"),
        Sample(uid="b" * 32, key="k1", shard="s.tar", index=1, error="undecodable image: x"),
        Sample(uid="c" * 32, key="k2", shard="s.tar", index=2, caption="three"),
        Sample(uid="d" * 32, key="__shard__", shard="s.tar", index=3, error="unreadable shard"),
    ]


def test_schema_has_base_fields_then_float_score_columns():
    s = schema(COLS)
    assert s.names == [f.name for f in BASE_FIELDS] + COLS
    assert s.field("diffin").type == pa.float64()
    assert s.field("index").type == pa.int32()
    assert s.field("status").type == pa.string()


def test_build_part_places_scores_on_ok_rows_and_nulls_on_errors():
    scores = {"diffin": np.array([1.5, -2.0]), "random": np.array([0.25, 0.75])}
    t = build_part(_samples(), scores, COLS)
    assert t.schema == schema(COLS)
    assert t.num_rows == 4
    rows = t.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "error"]
    assert [r["diffin"] for r in rows] == [1.5, None, -2.0, None]
    assert [r["random"] for r in rows] == [0.25, None, 0.75, None]
    assert rows[1]["error"] == "undecodable image: x"
    assert rows[0]["error"] is None
    assert [r["key"] for r in rows] == ["k0", "k1", "k2", "__shard__"]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert rows[2]["caption"] == "three" and rows[1]["caption"] is None
    assert t.column("diffin").null_count == 2


def test_build_part_all_errors_and_empty():
    samples = [s for s in _samples() if not s.ok]
    t = build_part(samples, {c: np.zeros(0) for c in COLS}, COLS)
    assert t.num_rows == 2
    assert t.column("diffin").null_count == 2
    empty = build_part([], {c: np.zeros(0) for c in COLS}, COLS)
    assert empty.num_rows == 0 and empty.schema == schema(COLS)


def test_build_part_refuses_scores_that_do_not_cover_the_ok_rows():
    with pytest.raises(ValueError):
        build_part(_samples(), {"diffin": np.array([1.0]), "random": np.array([1.0, 2.0])}, COLS)


def test_write_read_roundtrip_with_metadata(tmp_path):
    scores = {"diffin": np.array([1.5, -2.0]), "random": np.array([0.25, 0.75])}
    t = build_part(_samples(), scores, COLS)
    url = str(tmp_path / "sub" / "part.parquet")
    write_table(t, url, metadata={"method": "diffin", "checkpoints": [1, 2]})
    back = read_table(url)
    assert back.to_pylist() == t.to_pylist()
    assert table_metadata(url) == {"method": "diffin", "checkpoints": [1, 2]}
    assert read_table(url, columns=["uid", "diffin"]).column_names == ["uid", "diffin"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["part.parquet"]  # no temp left


def test_write_without_metadata_reads_empty_metadata(tmp_path):
    t = build_part(_samples()[:1], {"diffin": np.ones(1), "random": np.ones(1)}, COLS)
    url = str(tmp_path / "p.parquet")
    write_table(t, url)
    assert table_metadata(url) == {}


def test_rewrite_replaces_the_part(tmp_path):
    url = str(tmp_path / "p.parquet")
    write_table(build_part(_samples(), {c: np.ones(2) for c in COLS}, COLS), url)
    write_table(build_part(_samples()[:1], {c: np.ones(1) for c in COLS}, COLS), url)
    assert read_table(url).num_rows == 1


def test_merged_pool_table_has_one_row_per_generated_sample(tiny_scored, tiny_pool):
    table = read_table(str(Path(tiny_scored["run"]) / "scores.parquet"))
    assert table.num_rows == sum(tiny_pool["sizes"].values()) == tiny_pool["samples"]
    uids = table.column("uid").to_pylist()
    assert len(set(uids)) == len(uids)
    assert set(table.column("status").to_pylist()) <= {"ok", "error"}
    assert table.schema.names[: len(BASE_FIELDS)] == [f.name for f in BASE_FIELDS]
    # parts are in shard order, rows in shard position order
    shards = table.column("shard").to_pylist()
    assert shards == sorted(shards)
    assert table_metadata(str(Path(tiny_scored["run"]) / "scores.parquet"))["score"]["methods"]


def test_scores_are_checked_against_the_current_trajectory(tiny_scored, tmp_path, caplog):
    import json

    from pipeline.errors import ConfigError
    from pipeline.rundir import RunDir, read_json
    from pipeline.score.table import check_scores_current, read_table, write_table
    from tests.conftest import copy_run

    run = copy_run(tiny_scored["run"], tmp_path / "run")
    rd = RunDir(run)
    traj = read_json(rd.trajectory_json)
    write_table(read_table(rd.scores), rd.scores, {"checkpoints": traj["checkpoints"]})
    check_scores_current(rd)  # the same trajectory

    # same bytes, other rates (a re-import with another --steps-per-epoch)
    traj["checkpoints"][0]["lr"] *= 2
    Path(rd.trajectory_json).write_text(json.dumps(traj))
    with pytest.raises(ConfigError, match="another trajectory"):
        check_scores_current(rd)

    Path(rd.trajectory_json).unlink()  # deleted to save space: nothing to check against
    with caplog.at_level("WARNING"):
        check_scores_current(rd)
    assert "no trajectory.json" in caplog.text
    Path(rd.resume_state).write_bytes(b"a training under way")
    with pytest.raises(ConfigError, match="trained again"):
        check_scores_current(rd)


def test_reading_a_table_leaves_no_work_that_aborts_the_interpreter_at_exit(tmp_path):
    """Walkthrough: `diffin evaluate` exited 134 ("terminate called without an active
    exception") about one run in four after reading the table from an in-memory buffer,
    pyarrow's thread pools still busy at shutdown (apache/arrow#33975)."""
    import os
    import subprocess
    import sys

    import pyarrow.parquet as pq

    n = 2000
    path = tmp_path / "scores.parquet"
    rng = np.random.default_rng(0)
    pq.write_table(
        pa.table(
            {
                "uid": [f"{i:032x}" for i in range(n)],
                "status": ["ok"] * n,
                "diffin": rng.random(n),
                "loss": rng.random(n),
            }
        ),
        path,
    )
    code = (
        "import sys; from pipeline.score.table import read_table, table_from_bytes; "
        "read_table(sys.argv[1]); table_from_bytes(open(sys.argv[1], 'rb').read())"
    )
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root}
    codes = [
        subprocess.run(
            [sys.executable, "-c", code, str(path)], env=env, capture_output=True
        ).returncode
        for _ in range(12)  # about 1 in 5 aborted before: 12 clean runs by chance, 6%
    ]
    assert codes == [0] * 12


def test_a_stage_before_the_table_says_whether_scoring_ran_or_has_not_finished(tmp_path):
    """Walkthrough: prune and report told a half-scored run to "run `diffin score` first"."""
    from pipeline.errors import ConfigError
    from pipeline.rundir import RunDir, write_json
    from pipeline.score.table import require_scores

    run = RunDir(str(tmp_path))
    with pytest.raises(ConfigError, match=r"\(run `diffin score` first\)"):
        require_scores(run)
    for name in ("00000", "00001"):
        write_json(run.path("scores", "done", f"{name}.json"), {"rows": 3})
    with pytest.raises(ConfigError, match=r"has not finished \(2 shard\(s\) scored so far\)"):
        require_scores(run)


def test_a_column_identity_tells_an_ok_nan_row_from_an_error_row(tmp_path):
    """Review: nulls hash as NaN, so an ok row whose score is NaN hashed as an error row;
    evaluate's full subset and its max_pairs fraction count ok rows."""
    from pipeline.score.table import table_identity

    samples = _samples()
    ok = np.array([s.ok for s in samples])
    scores = {c: np.full(int(ok.sum()), np.nan) for c in COLS}
    url = str(tmp_path / "a.parquet")
    write_table(build_part(samples, scores, COLS), url)
    first = table_identity(url, ["diffin"])
    samples[0].error, samples[0].image = "decode error", None  # now an error row
    write_table(build_part(samples, {c: v[1:] for c, v in scores.items()}, COLS), url)
    assert table_identity(url, ["diffin"]) != first
    assert first["columns"] == ["diffin"] and first["rows"] == len(samples)
