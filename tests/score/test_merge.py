"""The merge publishes only tables that add up: parts checked against their completion records."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.sample import Sample
from pipeline.score.merge import MergeError, done_url, merge_parts, read_record, write_part
from pipeline.score.table import build_part

COLS = ["diffin", "random"]


def _samples(shard: str, n: int, errors: int = 0) -> list[Sample]:
    return [
        Sample(
            uid=f"{abs(hash((shard, i))):032x}"[:32],
            key=f"k{i:04d}",
            shard=shard,
            index=i,
            caption=f"caption {i}",
            error="bad image" if i < errors else None,
        )
        for i in range(n)
    ]


def _part(run: str, name: str, n: int, errors: int = 0, fp: str = "fp") -> str:
    samples = _samples(f"/pool/{name}.tar", n, errors)
    ok = n - errors
    scores = {c: [float(i) for i in range(ok)] for c in COLS}
    import numpy as np

    table = build_part(samples, {c: np.array(v) for c, v in scores.items()}, COLS)
    url = f"{run}/scores/parts/{name}.parquet"
    record = {"status": "ok", "name": name, "shard": f"/pool/{name}.tar", "fingerprint": fp}
    write_part(table, url, record)
    return url


def test_merge_counts_and_records(tmp_path):
    run = str(tmp_path)
    parts = [_part(run, "00000", 5, errors=2), _part(run, "00001", 3)]
    rec = read_record(parts[0])
    assert rec["rows"] == 5 and len(rec["sha256"]) == 64
    assert done_url(parts[0]) == f"{run}/scores/done/00000.json"
    out = f"{run}/scores.parquet"
    res = merge_parts(parts, out, {"m": 1}, require_records=True, fingerprint="fp")
    assert res["rows"] == res["rows_in"] == 8
    assert (res["rows_ok"], res["rows_error"], res["duplicate_rows_dropped"]) == (6, 2, 0)
    t = pq.read_table(out)
    assert t.num_rows == 8
    assert json.loads(t.schema.metadata[b"diffin"]) == {"m": 1}
    assert not [f for f in os.listdir(run) if ".tmp-" in f]


def test_part_without_record_is_not_trusted(tmp_path):
    run = str(tmp_path)
    parts = [_part(run, "00000", 4)]
    os.remove(done_url(parts[0]))
    out = f"{run}/scores.parquet"
    with pytest.raises(MergeError, match="no completion record"):
        merge_parts(parts, out, {}, require_records=True)
    assert not os.path.exists(out)
    # Without require_records (hand-made parts), a part without a record is read as is.
    assert merge_parts(parts, out, {})["rows"] == 4


def test_refuses_a_part_that_does_not_match_its_record(tmp_path):
    run = str(tmp_path)
    good = _part(run, "00000", 4)
    bad = _part(run, "00001", 4)
    # Replace the part behind the record's back (e.g. a stale writer): sha256 differs.
    t = pq.read_table(bad).slice(0, 3)
    pq.write_table(t, bad)
    out = f"{run}/scores.parquet"
    with pytest.raises(MergeError, match="sha256"):
        merge_parts([good, bad], out, {}, require_records=True)
    assert not os.path.exists(out)
    rec = json.load(open(done_url(bad)))
    with open(bad, "rb") as f:
        import hashlib

        rec["sha256"] = hashlib.sha256(f.read()).hexdigest()
    json.dump(rec, open(done_url(bad), "w"))
    with pytest.raises(MergeError, match="3 rows != completion record 4"):
        merge_parts([good, bad], out, {}, require_records=True)


def test_refuses_other_fingerprint_and_repeated_shard(tmp_path):
    run = str(tmp_path)
    a = _part(run, "00000", 2, fp="old")
    out = f"{run}/scores.parquet"
    with pytest.raises(MergeError, match="another configuration"):
        merge_parts([a], out, {}, require_records=True, fingerprint="new")
    b = _part(run, "00001", 2)
    with pytest.raises(MergeError, match="already merged"):
        merge_parts([b, b], out, {})


def test_exact_repeats_dropped_gaps_refused(tmp_path):
    run = str(tmp_path)
    samples = _samples("/pool/x.tar", 3)
    table = build_part(samples, {}, [])
    doubled = pa.concat_tables([table, table.slice(1, 1)])
    url = f"{run}/scores/parts/x.parquet"
    write_part(doubled, url, {"status": "ok"})
    res = merge_parts([url], f"{run}/scores.parquet", {}, require_records=True)
    assert (res["rows"], res["rows_in"], res["duplicate_rows_dropped"]) == (3, 4, 1)

    gap = table.filter(pa.array([True, False, True]))
    write_part(gap, url, {"status": "ok"})
    with pytest.raises(MergeError, match="not positions"):
        merge_parts([url], f"{run}/other.parquet", {}, require_records=True)

    clash = pa.concat_tables([table, build_part(_samples("/pool/x.tar", 1)[:1], {}, [])])
    clash = clash.set_column(0, "uid", pa.array(["a" * 32, "b" * 32, "c" * 32, "d" * 32]))
    write_part(clash, url, {"status": "ok"})
    with pytest.raises(MergeError, match="different uids"):
        merge_parts([url], f"{run}/other.parquet", {}, require_records=True)


def test_no_parts_is_an_error(tmp_path):
    with pytest.raises(MergeError, match="no parts"):
        merge_parts([], str(tmp_path / "scores.parquet"), {})


def test_the_summary_counts_nonfinite_scores_of_ok_rows(tmp_path):
    """A NaN or infinite score of an ok row is counted per column; error rows' nulls are not."""
    import numpy as np

    samples = _samples("/pool/00000.tar", 6, errors=2)
    diffin = np.array([1.0, np.nan, np.inf, 2.0])
    table = build_part(samples, {"diffin": diffin, "random": np.arange(4.0)}, COLS)
    url = f"{tmp_path}/scores/parts/00000.parquet"
    write_part(table, url, {"status": "ok", "name": "00000"})
    res = merge_parts([url], f"{tmp_path}/scores.parquet", {})
    assert (res["rows_ok"], res["rows_error"]) == (4, 2)
    assert res["nonfinite_scores"] == {"diffin": 2}
    clean = _part(str(tmp_path / "clean"), "00000", 5, errors=2)
    assert merge_parts([clean], f"{tmp_path}/clean.parquet", {})["nonfinite_scores"] == {}


class _InFlight:
    """Counts the calls in flight at once, each taking a moment, as requests to a store do."""

    def __init__(self, fn):
        import threading

        self.fn, self.now, self.most, self.lock = fn, 0, 0, threading.Lock()

    def __call__(self, *args, **kwargs):
        import time

        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(0.02)
            return self.fn(*args, **kwargs)
        finally:
            with self.lock:
                self.now -= 1


def test_the_merge_reads_parts_ahead_in_order_and_a_missing_one_still_fails(tmp_path, monkeypatch):
    """Review: each part was two or three requests, one part after another: 10,000 shards on
    an object store would take half an hour before the table was written."""
    import pipeline.score.merge as merge

    run = str(tmp_path)
    parts = [_part(run, f"{i:05d}", 3) for i in range(40)]
    spy = _InFlight(merge.read_bytes)
    monkeypatch.setattr(merge, "read_bytes", spy)
    out = f"{run}/scores.parquet"
    res = merge_parts(parts, out, {}, require_records=True, fingerprint="fp")
    assert res["rows"] == 120 and 1 < spy.most <= merge.FETCH_AHEAD
    shards = pq.read_table(out).column("shard").to_pylist()
    assert shards == [f"/pool/{i:05d}.tar" for i in range(40) for _ in range(3)]  # in order
    os.remove(parts[7])  # a part gone behind its record: the merge stops there, as before
    with pytest.raises(FileNotFoundError):
        merge_parts(parts, out, {}, require_records=True, fingerprint="fp")


def test_a_failed_merge_leaves_the_earlier_table_and_nothing_else(tmp_path, monkeypatch):
    """The table is streamed beside its place (it was written whole under the system's
    temporary directory, twice its size on disk, then copied): a failed merge leaves the
    earlier table and no file of its own, here or there."""
    import tempfile

    run = str(tmp_path / "run")
    parts = [_part(run, "00000", 4), _part(run, "00001", 4)]
    out = f"{run}/scores.parquet"
    merge_parts(parts, out, {"first": 1}, require_records=True)
    before = open(out, "rb").read()
    elsewhere = tmp_path / "system-tmp"
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    t = pq.read_table(parts[1]).slice(0, 3)
    pq.write_table(t, parts[1])  # the second part no longer matches its record
    with pytest.raises(MergeError, match="sha256"):
        merge_parts(parts, out, {"second": 1}, require_records=True)
    assert open(out, "rb").read() == before
    assert sorted(os.listdir(run)) == ["scores", "scores.parquet"]
    assert not list(elsewhere.iterdir())  # nothing staged outside the run either


def test_a_failed_merge_on_a_store_that_cannot_abandon_a_file_keeps_the_earlier_table():
    """Review: on memory:// (and sftp, HDFS) closing a file commits it, so the merge's
    error path published a truncated table that read as valid over the earlier one."""
    import uuid

    import fsspec

    name = f"merge-{uuid.uuid4().hex[:8]}"
    run = f"memory://{name}/r"
    parts = [_part(run, "00000", 4), _part(run, "00001", 4)]
    out = f"{run}/scores.parquet"
    merge_parts(parts, out, {"first": 1}, require_records=True)
    fs = fsspec.filesystem("memory")
    before = fs.cat_file(f"/{name}/r/scores.parquet")
    with fsspec.open(parts[1], "rb") as f:
        t = pq.read_table(f).slice(0, 3)
    with fsspec.open(parts[1], "wb") as f:
        pq.write_table(t, f)  # no longer the part its record describes
    with pytest.raises(MergeError, match="sha256"):
        merge_parts(parts, out, {"second": 1}, require_records=True)
    assert fs.cat_file(f"/{name}/r/scores.parquet") == before
    left = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"/{name}/r", detail=False))
    fs.rm(f"/{name}", recursive=True)
    assert left == ["scores", "scores.parquet"]
