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
from pipeline.score.reuse import kept_scores, read_part, recommit, reusable
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


def test_recommit_keeps_the_asked_columns_under_the_new_fingerprint(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    samples = _samples()
    table = build_part(samples, {"loss": np.arange(3.0), "random": np.ones(3)}, ["loss", "random"])
    rec = write_part(
        table,
        run.part("00000"),
        {"status": "ok", "shard": "s.tar", "fingerprint": "old", "stamp": {"size": 1}},
    )
    earlier = read_part(run, "00000", rec)
    assert earlier is not None
    new = recommit(run, "00000", rec, earlier, ["random"], "new", {"random": "h"})
    part = pq.read_table(run.part("00000"))
    assert "loss" not in part.column_names and part.column("random").to_pylist()[:2] == [1, 1]
    assert new["fingerprint"] == "new" and new["methods"] == {"random": "h"}
    assert new["stamp"] == {"size": 1} and new["kept"] == ["random"]
    assert read_record(run.part("00000")) == new
    # a part whose bytes are not those of its record is not a source
    with open(run.part("00000"), "ab") as f:
        f.write(b"x")
    assert read_part(run, "00000", new) is None


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
    assert "3 shard(s) scored earlier keep their columns" in caplog.text
    for column in [*diffin, "random"]:  # taken over as they were
        assert _by_row(after, column) == _by_row(before, column)
    for column in [*diffin, "loss"]:  # what a fresh run of both gives
        got, want = _by_row(after, column), _by_row(ref, column)
        assert got.keys() == want.keys()
        assert np.allclose(list(got.values()), list(want.values()), rtol=1e-6, equal_nan=True)
    # dropping diffin and random: no shard is scored, the parts are written again
    assert dropped["shards_scored_now"] == 0 and dropped["shards_kept_columns"] == 3
    assert dropped["shards_resumed"] == 3 and dropped["rows"] == first["rows"]
    assert [c for c in only.column_names if c in [*diffin, "random", "loss"]] == ["loss"]
    assert _by_row(only.to_pydict(), "loss") == _by_row(after, "loss")


def test_a_shard_that_reads_otherwise_is_scored_for_every_scorer(ray_cluster, score_run, tmp_path):
    """Rewritten in place since its columns were scored: nothing of its part is kept."""
    import ray

    from pipeline.data.reader import iter_shard
    from pipeline.score.driver import run_scoring

    pool = tmp_path / "pool"
    pool.mkdir()
    src = score_run["data"].split("{")[0]
    for i in range(2):
        shutil.copy(f"{src}0000{i}.tar", pool / f"0000{i}.tar")
    run = fresh_run(score_run, tmp_path / "run")
    cfg = one_actor_config(score_run, run, ray_cluster.address, "", methods=["loss"], batch_size=8)
    cfg = dataclasses.replace(cfg, data=str(pool / "{00000..00001}.tar"))
    try:
        run_scoring(cfg)
        shutil.copy(f"{src}00005.tar", pool / "00001.tar")
        again = run_scoring(dataclasses.replace(cfg, methods=["loss", "random"]))
    finally:
        ray.shutdown()
    assert again["shards_scored_in_part"] == 2
    # (the actor's warning says so in its own log: "shard 00001 does not read as it did")
    records = {i: json.load(open(f"{run}/scores/done/0000{i}.json")) for i in range(2)}
    assert records[0]["kept"] == ["loss"] and "kept" not in records[1]
    table = pq.read_table(f"{run}/scores.parquet").to_pydict()
    keys = [s.key for s in iter_shard(str(pool / "00001.tar"))]
    assert [k for k, u in zip(table["key"], table["shard"], strict=True) if "00001" in u] == keys
    assert all(v is not None for v in table["loss"])
