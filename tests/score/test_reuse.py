"""Other --methods on a scored run: the columns of unchanged scorers are kept, not recomputed.

The pure parts (which scorers a record can give, the row check, the rewrite) are
tested on their own; the whole path on a real Ray cluster (raycluster.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from raycluster import fresh_run, one_actor_config

from pipeline.data.sample import Sample
from pipeline.rundir import RunDir
from pipeline.score.merge import read_record, write_part
from pipeline.score.reuse import carried, kept_scores, read_part, rerecord, reusable
from pipeline.score.table import build_part

pytestmark = pytest.mark.timeout(420)


def _samples(n: int = 4, bad: int = 2) -> list[Sample]:
    return [
        Sample(
            uid=f"u{i}",
            key=f"k{i}",
            shard="s.tar",
            index=i,
            caption="c",
            error="decode" if i == bad else None,
        )
        for i in range(n)
    ]


def test_reusable_needs_a_whole_part_and_the_same_hash():
    hashes = {"diffin": "a", "loss": "b", "random": "c"}
    rec = {"status": "ok", "methods": {"diffin": "a", "loss": "x", "clip_score": "d"}}
    assert reusable(rec, hashes) == ["diffin"]  # loss's inputs changed, random never scored
    assert reusable({**rec, "status": "partial"}, hashes) == []
    assert reusable({"status": "ok"}, hashes) == []  # a record from before methods were kept
    assert reusable(None, hashes) == []


def test_kept_scores_takes_the_ok_rows_only_when_the_rows_match(tmp_path):
    samples = _samples()
    earlier = build_part(samples, {"loss": np.array([0.5, 1.5, 2.5])}, ["loss"])
    kept = kept_scores(earlier, samples, ["loss"])
    assert kept is not None and kept["loss"].tolist() == [0.5, 1.5, 2.5]
    other = _samples(bad=1)  # another row failed this time: not the same rows
    assert kept_scores(earlier, other, ["loss"]) is None
    assert kept_scores(earlier, samples[:3], ["loss"]) is None
    assert kept_scores(earlier, samples, ["clip_score"]) is None  # a column it lacks


def test_carried_scorers_are_those_held_and_not_asked_for():
    hashes = {"loss": "b"}
    rec = {"status": "ok", "methods": {"diffin": "a", "loss": "x"}}
    assert carried(rec, hashes) == {"diffin": "a"}  # loss is asked for (with other inputs)
    assert carried({**rec, "status": "failed"}, hashes) == {}
    assert carried({"status": "ok"}, hashes) == {}


def test_rerecord_keeps_the_part_and_records_it_for_the_new_fingerprint(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    table = build_part(
        _samples(), {"loss": np.arange(3.0), "random": np.ones(3)}, ["loss", "random"]
    )
    rec = write_part(
        table,
        run.part("00000"),
        {
            "status": "ok",
            "shard": "s.tar",
            "fingerprint": "old",
            "stamp": {"size": 1},
            "methods": {"loss": "l", "random": "r"},
        },
    )
    before = open(run.part("00000"), "rb").read()
    new = rerecord(run, "00000", rec, "new", ["random"])
    assert open(run.part("00000"), "rb").read() == before  # loss stays in the part
    assert new["fingerprint"] == "new" and new["kept"] == ["random"]
    assert new["methods"] == {"loss": "l", "random": "r"} and new["stamp"] == {"size": 1}
    assert new["sha256"] == rec["sha256"] and read_record(run.part("00000")) == new
    earlier = read_part(run, "00000", new)
    assert earlier is not None and earlier.column("loss").to_pylist()[:2] == [0.0, 1.0]
    # a part whose bytes are not those of its record is not a source
    with open(run.part("00000"), "ab") as f:
        f.write(b"x")
    assert read_part(run, "00000", new) is None


def test_the_merge_takes_the_columns_asked_for(tmp_path):
    from pipeline.score.merge import MergeError, merge_parts

    run = RunDir(str(tmp_path / "run"))
    table = build_part(
        _samples(), {"loss": np.arange(3.0), "random": np.ones(3)}, ["loss", "random"]
    )
    write_part(table, run.part("00000"), {"status": "ok", "fingerprint": "f"})
    out = str(tmp_path / "scores.parquet")
    merged = merge_parts([run.part("00000")], out, {}, fingerprint="f", columns=["random"])
    got = pq.read_table(out)
    assert "loss" not in got.column_names and got.column("random").null_count == 1
    assert merged["rows"] == 4
    with pytest.raises(MergeError, match="has no column 'clip_score'"):
        merge_parts([run.part("00000")], out, {}, columns=["clip_score"])


def test_method_hashes_follow_what_each_scorer_depends_on(score_run):
    from pipeline.score.config import ScoreConfig
    from pipeline.score.directions import set_hashes
    from pipeline.score.driver import method_hashes
    from pipeline.score.trajectory import load_trajectory

    run = RunDir(score_run["run"])
    traj = load_trajectory(run)
    target = {"target_fingerprint": "t"}
    cfg = ScoreConfig(
        data=score_run["data"], run=score_run["run"], methods=["diffin", "loss", "random"]
    )

    def hashes(**changes):
        return method_hashes(
            dataclasses.replace(cfg, **changes), traj.record, target, set_hashes(run)
        )

    base = hashes()
    assert list(base) == ["diffin", "loss", "random"]
    assert len(set(base.values())) == 3
    # the order and company of the other scorers do not matter
    assert hashes(methods=["random", "diffin"]) == {
        "random": base["random"],
        "diffin": base["diffin"],
    }
    seed = hashes(seed=1)  # random's alone
    assert [m for m in base if seed[m] != base[m]] == ["random"]
    first = hashes(first_order=not cfg.first_order)  # diffin's alone
    assert [m for m in base if first[m] != base[m]] == ["diffin"]
    other_target = method_hashes(cfg, traj.record, {"target_fingerprint": "u"}, set_hashes(run))
    assert [m for m in base if other_target[m] != base[m]] == ["diffin"]
    grad = hashes(sample_gradient="reference")  # loss is l_z whatever g_z is (fast.py)
    assert [m for m in base if grad[m] != base[m]] == ["diffin"]
    dtype = hashes(dtype="float64")  # every column depends on it
    assert all(dtype[m] != base[m] for m in base)


def _by_row(table: dict, column: str) -> dict:
    return {
        (s, i): v for s, i, v in zip(table["shard"], table["index"], table[column], strict=True)
    }


def test_other_methods_keep_the_columns_of_unchanged_scorers(
    ray_cluster, score_run, tmp_path, caplog
):
    """Add loss to a diffin run: only loss is computed; drop diffin: nothing is; the values
    are those of a fresh run."""
    import ray

    from pipeline.score.driver import run_scoring

    run = fresh_run(score_run, tmp_path / "run")
    cfg = one_actor_config(
        score_run,
        run,
        ray_cluster.address,
        "{00000..00002}",
        methods=["diffin", "random"],
        batch_size=8,
    )
    try:
        first = run_scoring(cfg)
        before = pq.read_table(f"{run}/scores.parquet").to_pydict()
        with caplog.at_level("INFO", logger="pipeline.score.driver"):
            added = run_scoring(dataclasses.replace(cfg, methods=["diffin", "loss", "random"]))
        after = pq.read_table(f"{run}/scores.parquet").to_pydict()
        records = [json.load(open(f"{run}/scores/done/0000{i}.json")) for i in range(3)]
        dropped = run_scoring(dataclasses.replace(cfg, methods=["loss"]))
        only = pq.read_table(f"{run}/scores.parquet")
        part = pq.read_table(f"{run}/scores/parts/00000.parquet")
        more = run_scoring(dataclasses.replace(cfg, methods=["loss", "clip_score"]))
        held = json.load(open(f"{run}/scores/done/00001.json"))["methods"]
        back = run_scoring(cfg)  # diffin and random again, carried through the two runs
        again = pq.read_table(f"{run}/scores.parquet").to_pydict()
        fresh = fresh_run(score_run, tmp_path / "fresh")
        reference = run_scoring(dataclasses.replace(cfg, run=fresh, methods=["loss", "diffin"]))
        ref = pq.read_table(f"{fresh}/scores.parquet").to_pydict()
    finally:
        ray.shutdown()
    diffin = [c for c in before if c.startswith("diffin")]
    assert "diffin" in diffin and len(diffin) > 1  # the total and its per-checkpoint parts
    assert first["shards_scored_now"] == 3 and reference["shards_scored_now"] == 3
    # adding loss: every shard read again, but scored for loss alone
    assert added["shards_scored_in_part"] == 3 and added["shards_scored_now"] == 3
    assert all(r["kept"] == ["diffin", "random"] for r in records)
    assert "3 shard(s) scored earlier hold the columns of some of these scorers" in caplog.text
    for column in [*diffin, "random"]:  # taken over as they were
        assert _by_row(after, column) == _by_row(before, column)
    for column in [*diffin, "loss"]:  # what a fresh run of both gives
        got, want = _by_row(after, column), _by_row(ref, column)
        assert got.keys() == want.keys()
        assert np.allclose(list(got.values()), list(want.values()), rtol=1e-6, equal_nan=True)
    # dropping diffin and random: no shard is scored; the table holds loss alone, the parts
    # keep the rest
    assert dropped["shards_scored_now"] == 0 and dropped["shards_kept_columns"] == 3
    # no scorer of that run points toward a target: none described (walkthrough)
    assert first["target"]["target_fingerprint"] and dropped["target"] is None
    assert dropped["shards_resumed"] == 3 and dropped["rows"] == first["rows"]
    assert [c for c in only.column_names if c in [*diffin, "random", "loss"]] == ["loss"]
    assert _by_row(only.to_pydict(), "loss") == _by_row(after, "loss")
    assert set(diffin) <= set(part.column_names)
    # clip_score added to loss: computed alone, diffin and random ride along in the parts
    assert more["shards_scored_in_part"] == 3
    assert set(held) == {"diffin", "random", "loss", "clip_score"}
    # and asking for diffin and random again scores nothing: they are those of the first run
    assert back["shards_scored_now"] == 0 and back["shards_kept_columns"] == 3
    for column in [*diffin, "random"]:
        assert _by_row(again, column) == _by_row(before, column)
    assert "loss" not in again and "clip_score" not in again


def test_a_shard_that_reads_otherwise_is_scored_for_every_scorer(ray_cluster, score_run, tmp_path):
    """Rewritten in place since its columns were scored (other rows), or only touched (the
    same rows, another stamp): nothing of its part is kept. The first is scored while the
    actor prefetches the next shard, which must still be scored from its own rows."""
    import os

    import ray

    from pipeline.data.reader import iter_shard
    from pipeline.score.driver import run_scoring

    pool = tmp_path / "pool"
    pool.mkdir()
    src = score_run["data"].split("{")[0]
    for i in range(3):
        shutil.copy(f"{src}0000{i}.tar", pool / f"0000{i}.tar")
    run = fresh_run(score_run, tmp_path / "run")
    cfg = one_actor_config(score_run, run, ray_cluster.address, "", methods=["loss"], batch_size=8)
    cfg = dataclasses.replace(cfg, data=str(pool / "{00000..00002}.tar"))
    try:
        run_scoring(cfg)
        before = pq.read_table(f"{run}/scores.parquet").to_pydict()
        shutil.copy(f"{src}00005.tar", pool / "00000.tar")
        os.utime(pool / "00002.tar", (1e9, 1e9))
        again = run_scoring(dataclasses.replace(cfg, methods=["loss", "random"]))
    finally:
        ray.shutdown()
    assert again["shards_scored_in_part"] == 1  # 00001 alone: the others scored in full
    records = {i: json.load(open(f"{run}/scores/done/0000{i}.json")) for i in range(3)}
    assert records[1]["kept"] == ["loss"]
    assert "kept" not in records[0] and "kept" not in records[2]
    table = pq.read_table(f"{run}/scores.parquet").to_pydict()
    for i in range(3):
        keys = [s.key for s in iter_shard(str(pool / f"0000{i}.tar"))]
        assert [
            k for k, u in zip(table["key"], table["shard"], strict=True) if f"0000{i}" in u
        ] == keys
    assert all(v is not None for v in table["loss"]) and len(table["random"]) == len(table["loss"])
    # the untouched shard's loss is the earlier one; the touched one's is the same again
    for i in (1, 2):
        assert [
            v for v, u in zip(table["loss"], table["shard"], strict=True) if f"0000{i}" in u
        ] == [v for v, u in zip(before["loss"], before["shard"], strict=True) if f"0000{i}" in u]


def test_an_earlier_part_that_cannot_be_read_costs_nothing_but_the_reuse(monkeypatch):
    """Review: an error while reading the earlier part came after the shard's stream (and
    the next shard's) was requested, and left it to the prefetch thread, which then never
    served another stream: the actor hung on its next shard."""
    import threading
    import types

    from pipeline.score import driver

    def rows(url, **_):
        for i in range(20):
            yield Sample(uid=f"{url}-{i}", key=str(i), shard=url, index=i, caption="c")

    class Scorer:
        cfg = types.SimpleNamespace(methods=["loss"])
        columns = ["loss"]

        def subset(self, methods):
            return None, None, self.columns

        def score_samples(self, batch, methods=None):
            return {"loss": np.zeros(sum(s.ok for s in batch))}

    def unreadable(run, url, name):
        raise OSError("503 Slow Down")

    monkeypatch.setattr(driver, "iter_shard", rows)
    monkeypatch.setattr(driver, "shard_stamp", lambda url: {"size": 1})
    monkeypatch.setattr(driver, "earlier_record", unreadable)
    monkeypatch.setattr(driver, "write_part", lambda table, url, rec: {**rec, "rows": len(table)})
    monkeypatch.setattr(driver, "expected_samples", lambda url: None)
    monkeypatch.setattr(driver.ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    actor = driver.ScoreActor.__new__(driver.ScoreActor)
    actor.scorer, actor.run, actor.fingerprint = Scorer(), RunDir("/nonexistent"), "fp"
    actor.hashes, actor.pending = {"loss": "h"}, None
    actor.prefetcher = driver.Prefetcher(4, 2, {})
    first = actor.score("s0", "00000", next_url="s1", last_try=False)
    assert first["rows"] == 20 and "kept" not in first  # scored in full, not failed
    done: dict = {}
    worker = threading.Thread(target=lambda: done.update(r=actor.score("s2", "00002")))
    worker.start()
    worker.join(30)
    assert done.get("r", {}).get("rows") == 20, "the actor hung on its next shard"
