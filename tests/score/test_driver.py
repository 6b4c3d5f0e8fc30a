"""Driver pieces that need no Ray: prefetching, completion records, progress, the CLI flags."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest

from pipeline.cli import build_parser
from pipeline.data.sample import Sample
from pipeline.data.tarwriter import ShardWriter
from pipeline.rundir import RunDir
from pipeline.score.driver import Prefetcher, failed_part, is_done
from pipeline.score.merge import merge_parts, read_record
from pipeline.score.progress import Progress


def _shard(path, n: int) -> str:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "PNG")
    with ShardWriter(str(path), n) as w:
        for i in range(n):
            w.write(f"s{i:03d}", {"png": buf.getvalue(), "txt": f"red {i}".encode()})
    return str(path / "00000.tar")


def test_prefetcher_streams_in_order_and_reads_ahead(tmp_path):
    a = _shard(tmp_path / "a", 7)
    b = _shard(tmp_path / "b", 3)
    p = Prefetcher(batch_size=3, depth=2)
    sa = p.request(a)
    sb = p.request(b)
    # b is decoded while nobody has consumed a's last batch yet.
    got = [len(batch) for batch in Prefetcher.batches(sa)]
    assert got == [3, 3, 1]
    deadline = time.time() + 10
    while sb.batches.qsize() < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert sb.batches.qsize() == 2  # one batch + the end marker, ready before asked for
    keys = [s.key for batch in Prefetcher.batches(sb) for s in batch]
    assert keys == ["s000", "s001", "s002"]


def test_prefetcher_cancel_and_unreadable_shard(tmp_path):
    a = _shard(tmp_path / "a", 9)
    p = Prefetcher(batch_size=1, depth=1)
    sa = p.request(a)
    missing = p.request(str(tmp_path / "nope.tar"))
    time.sleep(0.2)
    sa.cancel.set()  # an abandoned stream must not block the thread
    rows = [s for batch in Prefetcher.batches(missing) for s in batch]
    assert [r.key for r in rows] == ["__shard__"] and "unreadable shard" in rows[0].error
    assert p.thread.is_alive() and isinstance(p.thread, threading.Thread)


def test_failed_part_is_an_error_row_with_a_record(tmp_path):
    run = RunDir(str(tmp_path))
    rec = failed_part(run, "/pool/00007.tar", "00007", "ActorDiedError: boom", ["diffin"], "fp", 3)
    assert rec["status"] == "failed" and rec["rows"] == 1
    assert is_done(run, "/pool/00007.tar", "00007", "fp") is None  # failed: retried by a rerun
    res = merge_parts([run.part("00007")], run.scores, {}, require_records=True, fingerprint="fp")
    assert (res["rows"], res["rows_error"]) == (1, 1)
    import pyarrow.parquet as pq

    t = pq.read_table(run.scores).to_pylist()[0]
    assert t["key"] == "__shard__" and t["status"] == "error" and t["diffin"] is None
    assert t["error"] == "shard failed after 3 attempt(s): ActorDiedError: boom"
    assert read_record(run.part("00007"))["reason"] == "ActorDiedError: boom"


def test_a_readable_shard_that_failed_keeps_a_row_per_sample(tmp_path):
    """Before: one __shard__ row stood for the whole shard, and its samples had no row."""
    import io
    import tarfile

    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.data.reader import iter_shard

    png = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(png, "PNG")
    members = [(f"{i}.png", png.getvalue()) for i in range(4)]
    members += [(f"{i}.txt", b"a cat") for i in (0, 1, 3)]  # 2 has no caption
    members.sort()
    url = str(tmp_path / "00000.tar")
    with tarfile.open(url, "w") as tar:
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    listed = list(iter_shard(url))
    assert [s.ok for s in listed] == [True, True, False, True]
    run = RunDir(str(tmp_path / "run"))
    rec = failed_part(run, url, "00000", "OutOfMemoryError: killed", ["diffin"], "fp", 3)
    assert rec["rows"] == rec["errors"] == len(listed) > 1 and rec["ok"] == 0
    merge_parts([run.part("00000")], run.scores, {}, require_records=True, fingerprint="fp")
    t = pq.read_table(run.scores).to_pylist()
    assert [(r["uid"], r["key"], r["index"]) for r in t] == [
        (s.uid, s.key, s.index) for s in listed
    ]
    for row, sample in zip(t, listed, strict=True):
        assert row["status"] == "error" and row["diffin"] is None
        if sample.ok:
            assert row["error"] == "shard failed after 3 attempt(s): OutOfMemoryError: killed"
        else:  # an error row anyway keeps its own reason
            assert row["error"] == sample.error


def test_is_done_needs_part_record_and_fingerprint(tmp_path):
    from pipeline.score.merge import write_part
    from pipeline.score.table import build_part

    run = RunDir(str(tmp_path))
    url = "/pool/00000.tar"
    assert is_done(run, url, "00000", "fp") is None
    record = {"status": "ok", "fingerprint": "fp", "shard": url}
    write_part(build_part([], {}, []), run.part("00000"), record)
    assert is_done(run, url, "00000", "fp")["rows"] == 0
    assert is_done(run, url, "00000", "other") is None
    (tmp_path / "scores" / "parts" / "00000.parquet").unlink()
    assert is_done(run, url, "00000", "fp") is None


def test_is_done_checks_the_shard_and_the_part_bytes(tmp_path):
    """Another pool's shard of the same name, or a part its record no longer describes."""
    from pipeline.score.merge import write_part
    from pipeline.score.table import build_part

    run = RunDir(str(tmp_path))
    row = Sample(uid="0" * 32, key="k", shard="/poolA/00000.tar", index=0, caption="a")
    write_part(
        build_part([row], {"loss": [1.0]}, ["loss"]),
        run.part("00000"),
        {"status": "ok", "fingerprint": "fp", "shard": "/poolA/00000.tar"},
    )
    assert is_done(run, "/poolA/00000.tar", "00000", "fp") is not None
    assert is_done(run, "/poolB/00000.tar", "00000", "fp") is None
    part = tmp_path / "scores" / "parts" / "00000.parquet"
    part.write_bytes(part.read_bytes() + b"other")
    assert is_done(run, "/poolA/00000.tar", "00000", "fp") is None


def test_a_crash_between_part_and_record_leaves_the_part_unrecorded(tmp_path, monkeypatch):
    import pipeline.score.merge as merge
    from pipeline.score.table import build_part

    run = RunDir(str(tmp_path))
    url = "/pool/00000.tar"
    record = {"status": "ok", "fingerprint": "A", "shard": url}
    merge.write_part(build_part([], {}, []), run.part("00000"), record)
    assert is_done(run, url, "00000", "A") is not None

    def killed(*_args):
        raise KeyboardInterrupt  # the run with other settings dies after its part

    monkeypatch.setattr(merge, "write_json", killed)
    row = Sample(uid="0" * 32, key="k", shard=url, index=0, caption="a")
    with pytest.raises(KeyboardInterrupt):
        merge.write_part(
            build_part([row], {"loss": [1.0]}, ["loss"]),
            run.part("00000"),
            {**record, "fingerprint": "B"},
        )
    assert is_done(run, url, "00000", "A") is None  # A's record no longer vouches for B's bytes


def test_progress_rate_eta_and_snapshot_file(tmp_path):
    now = [100.0]
    url = str(tmp_path / "progress.json")
    p = Progress(10, resumed_shards=2, resumed_samples=20, json_url=url, clock=lambda: now[0])
    now[0] += 4
    p.shard_done(rows=10, errors=1)
    p.actor_replaced()
    p.retry()
    now[0] += 4
    p.shard_done(rows=10, errors=0)
    p.shard_failed()
    snap = p.close()
    assert snap["shards_done"] == 5 and snap["shards_failed"] == 1
    assert snap["samples_total"] == 40 and snap["samples_scored_now"] == 20
    assert snap["samples_per_second"] == 2.5  # 20 samples in 8 s
    assert snap["eta_s"] == pytest.approx(5 / (3 / 8), abs=0.1)
    assert (snap["retries"], snap["actors_replaced"], snap["error_rows_now"]) == (1, 1, 1)
    assert json.load(open(url))["shards_done"] == 5
    assert "5/10 shards (1 failed, 1 retries)" in Progress.line(snap)


def test_the_final_progress_line_is_logged_once(tmp_path, caplog):
    """Walkthrough: a finished run logged its last line twice (close, then stop)."""
    import logging

    url = str(tmp_path / "progress.json")
    p = Progress(2, json_url=url)
    with caplog.at_level(logging.INFO, logger="pipeline.score.progress"):
        p.shard_done(rows=3, errors=0)
        p.shard_done(rows=3, errors=0)
        p.close()
        p.stop("finished")
    assert caplog.text.count("score: 2/2 shards") == 1, caplog.text
    assert json.load(open(url))["state"] == "finished"
    p = Progress(2, json_url=url)
    with caplog.at_level(logging.INFO, logger="pipeline.score.progress"):
        caplog.clear()
        p.stop("interrupted")  # said: where it stopped
    assert caplog.text.count("score: 0/2 shards") == 1


def test_progress_of_a_run_with_nothing_left_to_score_claims_no_rate():
    """Was: "300 samples, 0.0 samples/s, ETA ?" for a rerun of a finished score."""
    p = Progress(6, resumed_shards=6, resumed_samples=300)
    line = Progress.line(p.close())
    assert line == "score: 6/6 shards, all scored by an earlier run, 300 samples"


def test_score_flags_reach_the_config(monkeypatch):
    args = build_parser().parse_args(
        [
            "score",
            "--data",
            "p/{0..1}.tar",
            "--run",
            "r",
            "--max-attempts",
            "5",
            "--prefetch-batches",
            "0",
            "--gpus-per-worker",
            "0.5",
        ]
    )
    seen = {}

    def fake(cfg):
        seen["cfg"] = cfg
        return None

    monkeypatch.setattr("pipeline.score.driver.run_scoring", fake)
    from pipeline.cli import run

    run(args)
    cfg = seen["cfg"]
    assert (cfg.max_attempts, cfg.prefetch_batches, cfg.gpus_per_worker) == (5, 0, 0.5)
    cfg.validate()


def _traj_record(**changes) -> dict:
    record = {
        "checkpoints": [
            {"sha256": "a" * 64, "step": 10, "lr": 0.1, "path": "ckpt-000010.pt"},
            {"sha256": "b" * 64, "step": 20, "lr": 0.1, "path": "ckpt-000020.pt"},
        ],
        "n_train": 1000,
        "steps": 20,
        "batch_size": 64,
        "optimizer": {"name": "sgd", "momentum": 0.9, "weight_decay": 0.0},
        "config": {"run": "/runs/a", "data": "/pool/{0..9}.tar", "lr": 0.1, "warmup": 2},
    }
    record.update(changes)
    return record


def test_the_fingerprint_covers_what_the_scores_depend_on_and_not_paths():
    """A re-import can keep the checkpoint bytes and change steps, rates or sets (review)."""
    import copy

    from pipeline.score.config import ScoreConfig
    from pipeline.score.driver import _fingerprint, fingerprint_hash

    cfg = ScoreConfig(data="/pool/x.tar", run="/runs/a", methods=["diffin", "diffin_self"])
    target = {"target_fingerprint": "t"}
    sets = {"reference": "r", "grad_batches": "g"}

    def h(cfg=cfg, record=None, sets=sets, size=None):
        size = size or {"rank": cfg.self_rank, "self_rank": cfg.self_rank}
        return fingerprint_hash(_fingerprint(cfg, record or _traj_record(), target, sets, size))

    base = h()
    moved = _traj_record(config={**_traj_record()["config"], "run": "/elsewhere", "data": "/p2"})
    assert h(record=moved) == base  # a moved run directory keeps its parts
    relabelled = copy.deepcopy(_traj_record())
    relabelled["checkpoints"][1]["step"] = 200
    rated = copy.deepcopy(_traj_record())
    rated["checkpoints"][0]["lr"] = 0.05
    import dataclasses

    changed = [
        h(record=relabelled),
        h(record=rated),
        h(record=_traj_record(n_train=999)),
        h(record=_traj_record(config={**_traj_record()["config"], "warmup": 5})),
        h(sets={**sets, "reference": "r2"}),
        h(sets={**sets, "grad_batches": "g2"}),
        h(cfg=dataclasses.replace(cfg, self_rank=2)),
        h(cfg=dataclasses.replace(cfg, self_hb="fisher"), size={"dim": 2048}),
        h(size={"rank": 5, "self_rank": cfg.self_rank}),  # a tight budget lowered the rank
        # the rank asked for, cut by the same budget: the eigenpairs are solved at it
        h(size={"rank": 5, "self_rank": cfg.self_rank + 8}),
        # the same parameter layout and checkpoint bytes, another function (review)
        h(record=_traj_record(model="ViT-B-32-quickgelu")),
        h(record=_traj_record(model_config={"embed_dim": 512, "quick_gelu": True})),
        h(cfg=dataclasses.replace(cfg, sample_gradient="reference")),
        # an imported run's schedule (params.txt) gives the rates of its blocks (review)
        h(record=_traj_record(imported={"params": {"lr": 1e-3, "warmup": 5}})),
        h(record=_traj_record(imported={"params": {"lr": 1e-3, "warmup": 6}})),
    ]
    assert base not in changed and len(set(changed)) == len(changed)
    # The sketch size is not used by the default (Lanczos) form of H_B, and a
    # budget that changes only the chunk size does not change the scores.
    assert h(cfg=dataclasses.replace(cfg, self_dim=4096)) == base
    assert h(cfg=dataclasses.replace(cfg, memory_mb=4096)) == base
    # memory knobs of the directions stage: the same vectors (tests/score/test_propagated.py)
    assert h(cfg=dataclasses.replace(cfg, directions_chunk=8, ggn_kept_pairs=0)) == base


def test_the_fingerprint_holds_only_the_options_the_requested_scorers_use(monkeypatch):
    """A loss-only rerun with another --sample-gradient or target used to rescore (review)."""
    from pipeline.score.config import ScoreConfig
    from pipeline.score.driver import _fingerprint, fingerprint_hash

    sets = {"reference": "r", "grad_batches": "g"}

    def h(methods, target="t", **options):
        cfg = ScoreConfig(data="/pool/x.tar", run="/runs/a", methods=methods, **options)
        return fingerprint_hash(
            _fingerprint(cfg, _traj_record(), {"target_fingerprint": target}, sets)
        )

    unused_by_loss = [
        {"sample_gradient": "reference"},
        {"second_order": "method"},
        {"propagate_curvature": "hessian"},
        {"first_order": False},
        {"seed": 7},
    ]
    for methods in (["loss"], ["loss_mean", "clip_score", "grand", "el2n"]):
        base = h(methods)
        assert h(methods, target="another") == base
        assert all(h(methods, **o) == base for o in unused_by_loss), methods
        assert h(methods, dtype="float64") != base  # still what every scorer depends on
        assert h(methods, image_keys=["png"]) != base
        assert h(methods, max_image_pixels=1_000) != base  # which rows are ok
    assert h(["loss", "tracin"]) != h(["loss"])  # the columns differ

    tracin = h(["tracin"])
    assert h(["tracin"], first_order=False) == tracin
    assert h(["tracin"], seed=7) == tracin
    assert h(["tracin"], target="another") != tracin
    assert h(["tracin"], sample_gradient="reference") != tracin
    assert h(["tracin"], second_order="method") != tracin  # its weights are the form's

    # The curvature the propagated form damps with counts only for that form.
    derived = h(["diffin"], second_order="derived")
    assert h(["diffin"], second_order="derived", propagate_curvature="hessian") == derived
    propagated = h(["diffin"], second_order="propagated", objective="final")
    assert (
        h(["diffin"], second_order="propagated", objective="final", propagate_curvature="hessian")
        != propagated
    )
    assert h(["diffin"], second_order="propagated", objective="final", first_order=False) != (
        propagated
    )
    # diffin's objective (resolved from "auto" before the fingerprint): another one rescores
    # diffin, not the loss; the final loss's tables, scored before the option existed, keep
    # their fingerprint
    assert h(["diffin"], second_order="propagated", objective="checkpoint-mean") != propagated
    assert h(["loss"], objective="checkpoint-mean") == h(["loss"])
    assert (
        "objective"
        not in _fingerprint(
            ScoreConfig(data="/p/x.tar", run="/r", methods=["diffin"], objective="final"),
            _traj_record(),
            {"target_fingerprint": "t"},
            sets,
        )["options"]
    )
    assert h(["random"], seed=7) != h(["random"])

    # A new version of the directions, propagation or eigenpairs rescores the scorers
    # that read them (review: eigen-v2 changed diffin_self and kept its old parts).
    loss, diffin = h(["loss"]), h(["diffin"])
    for version in ("DIRECTIONS_VERSION", "PROPAGATED_VERSION", "EIGEN_VERSION"):
        with monkeypatch.context() as m:
            m.setattr(f"pipeline.score.driver.{version}", "next")
            assert h(["diffin"]) != diffin and h(["tracin"]) != tracin, version
            assert h(["loss"]) == loss, version


def test_the_self_influence_size_in_the_fingerprint_is_the_one_the_budget_allows():
    from types import SimpleNamespace

    from pipeline.score.config import ScoreConfig
    from pipeline.score.directions import self_size

    traj = SimpleNamespace(model="diffin-tiny")
    cfg = ScoreConfig(data="x", run="r", methods=["diffin_self"], self_rank=100)
    assert self_size(cfg, traj, 128) == {"rank": 100, "self_rank": 100}
    roomy = dataclasses.replace(cfg, memory_mb=4096)
    assert self_size(roomy, traj, 128) == {"rank": 100, "self_rank": 100}
    # diffin-tiny without its token embedding: 35,137 float32 parameters, so half
    # of 16 MB holds 59 eigenvectors.
    tight = dataclasses.replace(cfg, memory_mb=16)
    assert self_size(tight, traj, 128) == {"rank": 59, "self_rank": 100}
    # Before: another --self-rank under the same budget kept the fingerprint, but the
    # eigenpairs are solved at the rank asked for, so the scores changed.
    asked = dataclasses.replace(tight, self_rank=120)
    assert self_size(asked, traj, 128) == {"rank": 59, "self_rank": 120}
    fisher = dataclasses.replace(cfg, self_hb="fisher", self_dim=64)
    assert self_size(fisher, traj, 128) == {"dim": 64}


def test_gpus_the_embedded_ray_cannot_offer_are_refused_up_front(monkeypatch):
    import torch

    from pipeline.errors import ConfigError
    from pipeline.score.config import ScoreConfig
    from pipeline.score.driver import check_placeable

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = ScoreConfig(data="x", run="r", gpus_per_worker=torch.cuda.device_count() + 1)
    with pytest.raises(ConfigError, match="gpus_per_worker"):
        check_placeable(cfg)
    check_placeable(ScoreConfig(data="x", run="r", gpus_per_worker=0))
    monkeypatch.setattr("ray.is_initialized", lambda: True)  # already joined a cluster
    check_placeable(cfg)
    check_placeable(ScoreConfig(data="x", run="r", gpus_per_worker=8, address="ray://head:10001"))


def test_an_actor_scores_on_a_gpu_only_when_ray_gave_it_one():
    # Recent Ray leaves CUDA_VISIBLE_DEVICES alone for actors that asked for no GPU,
    # so torch would see every GPU of the node; Ray's assignment decides instead.
    import torch

    from pipeline.score.driver import actor_device

    assert actor_device([]) == "cpu"
    if torch.cuda.is_available():
        assert actor_device([0]) == "cuda"
    else:  # a GPU Ray gave but torch cannot use: said plainly, at the actor's start
        with pytest.raises(RuntimeError, match="torch sees no CUDA device there"):
            actor_device([0])


@pytest.mark.parametrize(
    "workers, gpus, cluster, fit",
    [
        (2, 1, 1, 1),
        (2, 1, 2, 2),
        (4, 0.5, 1, 2),
        (3, 1 / 3, 1, 3),
        (2, 0, 0, 2),
        (2, 1, 0, 1),
        (4, 0.75, 3, 3),  # a share sits on one GPU: three spare quarters hold no 0.75
        (4, 0.3, 1, 3),
    ],
)
def test_the_embedded_ray_starts_only_the_actors_its_gpus_can_hold(workers, gpus, cluster, fit):
    # The default --workers 2 on a one-GPU machine left one actor waiting for ever.
    from pipeline.score.driver import actors_that_fit, fitting_share

    assert actors_that_fit(workers, gpus, cluster) == fit
    if cluster >= 1:  # the share the warning suggests does fit every worker
        assert actors_that_fit(workers, fitting_share(workers, cluster), cluster) == workers


def _slots(n: int, ready: bool = True):
    from pipeline.score.driver import _Slot

    return [_Slot(actor=i, ready=ready) for i in range(n)]


def test_every_ready_actor_gets_a_shard_before_any_reserves_a_next_one():
    """Before: each actor took a shard and reserved the next, so with as many shards
    as actors half of the actors never got one."""
    from collections import deque

    from pipeline.score.driver import assign

    for workers in (2, 4, 8):
        slots = _slots(workers)
        todo = deque((f"/p/{i}.tar", str(i)) for i in range(workers))
        assert assign(slots, todo, prefetch=True) == slots
        assert [s.job[1] for s in slots] == [str(i) for i in range(workers)]
        assert not any(s.reserved for s in slots) and not todo
    # twice as many shards: each actor scores one and prefetches one
    slots = _slots(4)
    todo = deque((f"/p/{i}.tar", str(i)) for i in range(8))
    assign(slots, todo, prefetch=True)
    assert [(s.job[1], s.reserved[1]) for s in slots] == [
        ("0", "1"),
        ("2", "3"),
        ("4", "5"),
        ("6", "7"),
    ]
    # an actor still starting keeps a shard free for itself
    slots = _slots(2)
    slots[1].ready = False
    todo = deque((f"/p/{i}.tar", str(i)) for i in range(2))
    assign(slots, todo, prefetch=True)
    assert (
        slots[0].job[1] == "0" and slots[0].reserved is None and list(todo) == [("/p/1.tar", "1")]
    )


def test_a_free_actor_takes_a_shard_another_actor_reserved():
    from collections import deque

    from pipeline.score.driver import assign

    slots = _slots(2)
    slots[0].job, slots[0].reserved = ("/p/0.tar", "0"), ("/p/1.tar", "1")
    assert assign(slots, deque(), prefetch=True) == [slots[1]]
    assert slots[1].job == ("/p/1.tar", "1") and slots[0].reserved is None
    # an idle slot keeps its own reservation (its actor is already prefetching it)
    slots = _slots(2)
    slots[1].reserved = ("/p/9.tar", "9")
    assert assign(slots, deque(), prefetch=True) == [slots[1]]
    assert slots[1].job == ("/p/9.tar", "9") and slots[0].job is None
    # without prefetch nothing is ever reserved
    slots = _slots(2)
    todo = deque((f"/p/{i}.tar", str(i)) for i in range(5))
    assign(slots, todo, prefetch=False)
    assert not any(s.reserved for s in slots) and len(todo) == 3


def test_the_steady_rate_leaves_out_each_actors_start_up():
    """Before: only the first shard back was left out, so the other actors' first
    shards (each carrying its start-up) were counted over a moment."""
    from pipeline.score.driver import steady_rate

    # two actors load for 10 s, then each scores 100 rows per second
    finished = [(10.0, "a", 100), (10.01, "b", 100), (11.0, "a", 100), (11.01, "b", 100)]
    finished += [(12.0, "a", 100), (12.01, "b", 100)]
    assert steady_rate(finished) == 199.0  # 400 rows over 10.00 .. 12.01
    assert steady_rate(finished[:2]) is None  # nothing after the start-ups
    # a replaced actor and its replacement, one after the other: counted once
    replaced = [(10.0, "a", 100), (11.0, "a", 100), (12.0, "a", 100)]
    replaced += [(14.0, "c", 100), (15.0, "c", 100), (16.0, "c", 100)]
    assert steady_rate(replaced) == 100.0
    # an actor out of shards early stops counting
    early = [(10.0 + i, "a", 100) for i in range(3)] + [(10.0 + i, "b", 100) for i in range(11)]
    assert steady_rate(early) == 120.0
    # an actor placed late (its start-up while the other scored) does not inflate it
    # (a window opened at b's first shard would hold only a's last: 100 rows in 0.05 s)
    late = [(10.0, "a", 100), (11.0, "a", 100), (12.0, "a", 100), (13.0, "a", 100)]
    late += [(12.95, "b", 100)]
    assert steady_rate(late) == 100.0
    assert steady_rate([(5.0, "a", 10), (6.0, "a", 10), (7.0, "a", 10)]) == 10.0  # one actor
    assert steady_rate([]) is None


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(seed=-1), "seed"),  # failed in numpy after the directions were written
        (dict(seed=2**64), "seed"),
        (dict(gpus_per_worker=float("inf")), "gpus_per_worker"),
        (dict(gpus_per_worker=float("nan")), "gpus_per_worker"),
        # Ray refuses these only when the actors are made, after the per-run work (review)
        (dict(gpus_per_worker=1e-5), "gpus_per_worker"),
        (dict(gpus_per_worker=1.5), "gpus_per_worker"),
        # an actor scores on one device: a second GPU would sit idle (GPU-path review)
        (dict(gpus_per_worker=2), "gpus_per_worker"),
        (dict(batch_size=2.5), "batch_size"),  # never equal to a batch's length
        (dict(workers=2.5), "workers"),
        (dict(self_rank=True), "self_rank"),
        (dict(memory_mb=float("inf")), "memory_mb"),
        (dict(directions_chunk=0), "directions_chunk"),
        (dict(directions_chunk=2.5), "directions_chunk"),
        (dict(ggn_kept_pairs=-1), "ggn_kept_pairs"),
        (dict(first_order="no"), "first_order"),  # truthy: the first-order term stayed in
    ],
)
def test_score_config_types_and_ranges_are_checked_up_front(change, field):
    """Each of these passed validate() and failed (or did the wrong thing) later (review)."""
    from pipeline.errors import ConfigError
    from pipeline.score.config import ScoreConfig

    with pytest.raises(ConfigError, match=f"^{field}: "):
        ScoreConfig(data="d", run="r", methods=["diffin", "random"], **change).validate()


@pytest.mark.parametrize("gpus", [None, 0, 0.25, 0.3333, 1 / 3, 0.03125, 1, 1.0])
def test_gpu_shares_ray_can_place_are_accepted(gpus):
    from pipeline.score.config import ScoreConfig

    ScoreConfig(data="d", run="r", methods=["random"], gpus_per_worker=gpus).validate()


def test_a_resumed_run_asks_for_its_completion_records_many_at_a_time(tmp_path, monkeypatch):
    """Review: three or four requests per shard, one shard after another, before a resumed
    run scored anything (half an hour for 10,000 shards on an object store)."""
    from test_merge import _InFlight, _part

    import pipeline.score.driver as driver
    from pipeline.rundir import RunDir

    run = str(tmp_path)
    names = [f"{i:05d}" for i in range(40)]
    for name in names[:30]:
        _part(run, name, 2)
    shards = [f"/pool/{n}.tar" for n in names]
    spy = _InFlight(driver.record_or_problem)
    monkeypatch.setattr(driver, "record_or_problem", spy)
    records = driver.completion_records(RunDir(run), shards, names)
    assert list(records) == shards and spy.most > 1
    assert [r is not None for r in records.values()] == [True] * 30 + [False] * 10
    # whatever fingerprint they were scored for: the caller keeps columns of other ones
    assert records[shards[3]] == driver.is_done(RunDir(run), shards[3], names[3], "fp")
    assert driver.is_done(RunDir(run), shards[3], names[3], "other") is None


def test_a_record_vouches_only_for_the_shard_file_it_stamped():
    from pipeline.score.driver import same_shard

    stamp = {"size": 10, "version": "1.5"}
    assert same_shard({"stamp": stamp}, dict(stamp))
    assert not same_shard({"stamp": stamp}, {"size": 10, "version": "2.5"})
    assert not same_shard({"stamp": stamp}, None)  # the shard cannot be asked now: rescore
    assert same_shard({}, None)  # a record from before stamps existed is trusted
    assert not same_shard({"stamp": None}, stamp)  # not stamped then: rescored once it can be


def test_a_target_nothing_uses_is_said(caplog):
    """Walkthrough: `--target` with clip_score and random alone was accepted silently."""
    from pipeline.score.config import ScoreConfig
    from pipeline.score.driver import warn_about_target

    with caplog.at_level("WARNING", logger="pipeline.score.driver"):
        warn_about_target(ScoreConfig(data="d", run="r", methods=["clip_score"], target="t"))
        warn_about_target(ScoreConfig(data="d", run="r", methods=["tracin"], target="t"))
    assert caplog.text.count("it is not used") == 1
    assert "none of clip_score points toward a target" in caplog.text


def test_scoring_another_pool_into_a_run_is_said(tmp_path, caplog):
    """Walkthrough: scoring another --data into a scored run replaced its table silently."""
    from pipeline.data.shards import resolve_shards
    from pipeline.rundir import RunDir
    from pipeline.score.config import ScoreConfig
    from pipeline.score.driver import warn_about_another_pool

    pool = tmp_path / "p"
    pool.mkdir()
    for name in ("0.tar", "1.tar"):
        (pool / name).write_bytes(b"")
    run = RunDir(str(tmp_path / "run"))
    cfg = ScoreConfig(data=f"{pool}/{{0..1}}.tar", run=run.url, methods=["loss"])
    shards = resolve_shards(cfg.data)
    with caplog.at_level("WARNING", logger="pipeline.score.driver"):
        warn_about_another_pool(cfg, run, shards)  # no run.json yet
        run.update_run_json("train", {"steps": 3})
        warn_about_another_pool(cfg, run, shards)  # never scored
        run.update_run_json("score", {"config": cfg.to_dict()})
        warn_about_another_pool(cfg, run, shards)  # the same pool
        # the same shards spelled otherwise (review)
        warn_about_another_pool(
            dataclasses.replace(cfg, data=f"{pool}/0.tar::{pool}/1.tar"), run, shards
        )
        assert caplog.text == ""
        other = dataclasses.replace(cfg, data=f"{pool}/0.tar")
        warn_about_another_pool(other, run, resolve_shards(other.data))
    assert f"scored --data {pool}/{{0..1}}.tar; this one scores {pool}/0.tar" in caplog.text


def test_a_record_that_cannot_be_used_is_said(tmp_path, caplog):
    """Walkthrough: a part deleted by hand, or a torn completion record, was scored again
    without a word (a rewritten shard was named)."""
    import os

    from test_merge import _part

    import pipeline.score.driver as driver
    from pipeline.rundir import RunDir

    run = str(tmp_path)
    for name in ("00000", "00001", "00002", "00003"):
        _part(run, name, 2)
    os.remove(f"{run}/scores/parts/00000.parquet")
    with open(f"{run}/scores/done/00001.json", "w") as f:
        f.write('{"rows": 2, "sha')  # torn
    with open(f"{run}/scores/parts/00002.parquet", "ab") as f:
        f.write(b"x")
    shards = [f"/pool/0000{i}.tar" for i in range(4)]
    with caplog.at_level("WARNING", logger="pipeline.score.driver"):
        records = driver.completion_records(RunDir(run), shards, [f"0000{i}" for i in range(4)])
    assert [r is not None for r in records.values()] == [False, False, False, True]
    assert "shard 00000: its part is missing: scoring it again" in caplog.text
    assert "shard 00001: its completion record cannot be read (JSONDecodeError)" in caplog.text
    assert "shard 00002: its part is not the size its completion record says" in caplog.text
    assert "00003" not in caplog.text
    caplog.clear()  # the actors ask again, silently
    with caplog.at_level("WARNING", logger="pipeline.score.driver"):
        assert driver.earlier_record(RunDir(run), shards[0], "00000") is None
    assert not caplog.text


def test_the_changed_inputs_are_named_as_the_user_knows_them():
    from pipeline.score.driver import describe_changes

    earlier = {
        "methods": ["diffin"],
        "dtype": "float32",
        "options": {"first_order": True, "seed": 0},
        "target": "t1",
        "per_run_work": [1],
        "hash": "a",
    }
    now = {
        "methods": ["diffin", "loss"],
        "dtype": "float64",
        "options": {"first_order": False, "seed": 0, "sample_gradient": "removal"},
        "target": "t2",
        "per_run_work": [1],
        "hash": "b",
    }
    assert describe_changes(now, earlier) == [
        "--dtype",
        "--methods",
        "--no-first-order",  # sample_gradient came with the scorers: not a change
        "the target (--target, or its pairs as --dtype reads them)",
    ]
    # an input that came or went with --methods is not listed
    assert describe_changes({"methods": ["loss"]}, {"methods": ["tracin"], "target": "t"}) == [
        "--methods"
    ]


def test_actors_that_cannot_reach_storage_are_told_what_every_node_needs():
    """Walkthrough: nodes without S3 access failed with a botocore error after pages of
    tracebacks, and nothing said that every node reads the run and the pool itself."""
    from pipeline.score.driver import start_hint

    for reason in (
        "ActorDiedError: botocore.exceptions.NoCredentialsError: Unable to locate credentials",
        'ActorDiedError: EndpointConnectionError: Could not connect to the endpoint URL: "x"',
        "ActorDiedError: PermissionError: Access Denied",
    ):
        assert "Every node reads the run directory and the pool itself" in start_hint(reason)
    assert start_hint("ActorDiedError: ImportError: no module named open_clip") == ""
    local = "ActorDiedError: PermissionError: [Errno 13] Permission denied: '/tmp/ray'"
    assert start_hint(local) == ""  # a local file's, not a store's
