"""The whole pipeline with the pool, the run directory and the manifest in object storage.

A real S3-protocol server (moto, loopback) serves every byte; the scoring
actors run in an embedded Ray whose workers reach it through the inherited
environment.
"""

from __future__ import annotations

import io
import json
import os

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.data.reader import iter_shard
from pipeline.data.shards import resolve_shards, shard_stamp, shard_stamps
from pipeline.data.synth import SynthConfig, make_pool
from pipeline.data.tarwriter import ShardWriter
from pipeline.errors import ConfigError
from pipeline.prune.config import PruneConfig
from pipeline.prune.datacomp import array_to_uids, load_uids
from pipeline.prune.manifest import write_manifest
from pipeline.rundir import exists, read_json, write_bytes_atomic, write_json


def _fs():
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    return fs


def test_rundir_and_writer_on_s3(s3_bucket):
    url = f"{s3_bucket}/run/a/b.json"
    write_json(url, {"x": 1})
    assert read_json(url) == {"x": 1}
    write_bytes_atomic(url, b"{}")  # overwrite in place
    assert read_json(url) == {}
    assert not _fs().glob(f"{s3_bucket}/run/a/*.tmp-*")

    with ShardWriter(f"{s3_bucket}/shards", 2) as w:
        for i in range(5):
            w.write(f"k{i}", {"txt": f"caption {i}".encode()})
    assert w.shards == ["00000.tar", "00001.tar", "00002.tar"]
    assert read_json(f"{s3_bucket}/shards/sizes.json") == {
        "00000.tar": 2,
        "00001.tar": 2,
        "00002.tar": 1,
    }
    urls = resolve_shards(f"{s3_bucket}/shards/{{00000..00002}}.tar")
    assert urls[0] == f"{s3_bucket}/shards/00000.tar"
    assert [r.caption for u in urls for r in iter_shard(u)] == [f"caption {i}" for i in range(5)]
    # a directory and a glob resolve to the same list
    assert resolve_shards(f"{s3_bucket}/shards/") == urls
    assert resolve_shards(f"{s3_bucket}/shards/*.tar") == urls

    # an aborted writer leaves no half shard and no sizes.json
    with pytest.raises(RuntimeError):
        with ShardWriter(f"{s3_bucket}/aborted", 10) as w:
            w.write("k0", {"txt": b"x"})
            raise RuntimeError("boom")
    assert not exists(f"{s3_bucket}/aborted/00000.tar")
    assert not exists(f"{s3_bucket}/aborted/sizes.json")


def test_shard_stamps_on_s3_see_a_shard_rewritten_in_place(s3_bucket):
    """A listing's ETag is the HEAD's (its LastModified is not, hence the ETag)."""
    for i in range(3):
        write_bytes_atomic(f"{s3_bucket}/pool/{i:05d}.tar", b"a" * (10 + i))
    urls = [f"{s3_bucket}/pool/{i:05d}.tar" for i in range(3)]
    stamps = shard_stamps(urls)
    assert [stamps[u] for u in urls] == [shard_stamp(u) for u in urls]
    assert stamps[urls[0]]["size"] == 10 and stamps[urls[0]]["version"]
    write_bytes_atomic(urls[0], b"b" * 10)  # same name, same size, other bytes
    assert shard_stamp(urls[0]) != stamps[urls[0]]
    assert shard_stamps(urls)[urls[0]] == shard_stamp(urls[0])  # no stale listing


def test_on_s3_an_object_beside_a_prefix_of_its_name_is_a_shard_and_a_prefix_alone_not(
    s3_bucket,
):
    """Review: s3fs lists an object and a prefix of the same name as a file and a directory;
    the directory entry hid the shard. A prefix alone is no shard (walkthrough)."""
    write_bytes_atomic(f"{s3_bucket}/both/00000.tar", b"x")
    write_bytes_atomic(f"{s3_bucket}/both/00000.tar/inner", b"y")
    write_bytes_atomic(f"{s3_bucket}/both/00001.tar/inner", b"y")
    urls = resolve_shards(f"{s3_bucket}/both/00000.tar")
    assert urls == [f"{s3_bucket}/both/00000.tar"]
    with pytest.raises(ConfigError, match=r"00001.tar \(a directory, not a shard file\)"):
        resolve_shards(f"{s3_bucket}/both/{{00000..00001}}.tar")


def test_pipeline_end_to_end_on_s3(s3_bucket):
    from pipeline.score.config import ScoreConfig
    from pipeline.score.driver import run_scoring
    from pipeline.train.config import TrainConfig
    from pipeline.train.trajectory import train

    pool_url, run_url = f"{s3_bucket}/pool", f"{s3_bucket}/run"
    pool = make_pool(pool_url, SynthConfig(samples=96, shard_size=32, eval_samples=8, seed=3))
    assert pool["train_data"] == f"{pool_url}/{{00000..00002}}.tar"
    fs = _fs()
    assert fs.exists(f"{pool_url}/00002.tar") and fs.exists(f"{pool_url}/synth.json")

    train(
        TrainConfig(
            data=pool["train_data"],
            run=run_url,
            model="diffin-tiny",
            steps=10,
            checkpoints=2,
            batch_size=16,
            target_size=16,
            reference_size=15,
            warmup=2,
        )
    )
    summary = run_scoring(
        ScoreConfig(data=pool["train_data"], run=run_url, methods=["diffin", "random"], workers=1)
    )
    assert summary["shards"] == 3 and not summary["shards_failed"]
    assert summary["rows"] == 96 == summary["rows_ok"] + summary["rows_error"]
    fs = _fs()
    assert len(fs.glob(f"{run_url}/scores/parts/*.parquet")) == 3

    # a second prune replaces the first: the old manifest is removed whole
    write_manifest(PruneConfig(run=run_url, keep=0.9, method="diffin", name="m", shard_size=20))
    m = write_manifest(PruneConfig(run=run_url, keep=0.5, method="diffin", name="m", shard_size=20))
    out = f"{run_url}/prune/m"
    assert m["dir"] == out
    fs = _fs()
    for name in ("manifest.json", "uids.npy", "keep.parquet", "shards/sizes.json"):
        assert fs.exists(f"{out}/{name}"), name
    kept = m["kept"]
    assert kept == round(0.5 * summary["rows_ok"])
    sizes = read_json(f"{out}/shards/sizes.json")
    assert sum(sizes.values()) == kept == m["train_num_samples"]
    tars = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"{out}/shards/*.tar"))
    assert tars == sorted(sizes) == [f"{i:05d}.tar" for i in range(len(sizes))]
    assert len(tars) == -(-kept // 20)  # nothing left over from the first, larger manifest
    manifest = read_json(f"{out}/manifest.json")
    assert manifest["kept"] == kept and manifest["rows_in_table"] == 96
    with fs.open(f"{out}/keep.parquet", "rb") as f:
        keep = pq.read_table(io.BytesIO(f.read()))
    assert keep.num_rows == kept
    assert sorted(array_to_uids(load_uids(f"{out}/uids.npy"))) == sorted(
        keep.column("uid").to_pylist()
    )
    # open_clip's WebDataset loader cannot open s3:// (it retried forever): it gets the
    # AWS CLI as a pipe: command per shard; the fsspec pattern is kept beside it.
    from webdataset.shardlists import expand_urls

    assert manifest["shards_url"] == f"{out}/shards/{{00000..{len(tars) - 1:05d}}}.tar"
    assert expand_urls(manifest["train_data"]) == [
        f"pipe:aws s3 cp '{out}/shards/{t}' -"
        for t in tars  # quoted: a pattern has braces
    ]
    assert manifest["open_clip_argv"][3] == manifest["train_data"]
    resharded = [r for u in resolve_shards(manifest["shards_url"]) for r in iter_shard(u)]
    assert len(resharded) == kept and all(r.ok for r in resharded)
    assert {r.uid for r in resharded} == set(keep.column("uid").to_pylist())
    run_json = read_json(f"{run_url}/run.json")
    assert run_json["prune/m"]["kept"] == kept
    assert np.isfinite(keep.column("diffin").to_numpy()).all()
    assert json.loads(json.dumps(manifest))  # plain JSON

    # `diffin status` reads the same records from the store (the modification times too)
    from pipeline.status import run_status

    status = run_status(run_url)
    assert status["train"]["state"] == "trained" and status["score"]["state"] == "scored"
    assert status["score"]["table"]["rows"] == 96
    assert status["score"]["progress"]["state"] == "finished"
    assert status["score"]["progress"]["written_s_ago"] is not None
    assert [(p["name"], p["kept"], p["stale"]) for p in status["prune"]] == [("m", kept, False)]
    assert status["next"] == f"diffin report --run {run_url}"


def test_a_missing_bucket_is_refused_and_not_created(s3_bucket, capsys):
    """Walkthrough: `make-data s3://wlak/pool` (a typo) created the bucket `wlak`, and
    `train --run s3://wlak/...` too; on AWS a stray bucket in the account."""
    from pipeline.cli import main

    typo = f"{s3_bucket}-typo"
    assert main(["make-data", f"{typo}/pool", "--samples", "20", "--shard-size", "10"]) == 2
    assert main(["prune", "--run", f"{typo}/runs/r1", "--keep", "0.5"]) == 2
    err = capsys.readouterr().err
    bucket = typo.removeprefix("s3://")
    assert f"diffin make-data: configuration error: out: the bucket {bucket!r}" in err
    assert f"diffin prune: configuration error: --run: the bucket {bucket!r}" in err
    assert "does not create buckets" in err and "Traceback" not in err
    assert not _fs().exists(bucket)


def test_a_store_that_cannot_be_reached_is_one_line_naming_the_flag(s3_bucket, monkeypatch, capsys):
    """Walkthrough: missing credentials or a mistyped endpoint gave prune, report and
    make-data a botocore traceback of 60 to 140 lines."""
    import fsspec.config
    import s3fs

    from pipeline.cli import main

    monkeypatch.setitem(fsspec.config.conf["s3"], "endpoint_url", "not-a-url:1")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        assert main(["report", "--run", f"{s3_bucket}/runs/r1"]) == 2
        assert main(["make-data", f"{s3_bucket}/pool", "--samples", "20"]) == 2
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    err = capsys.readouterr().err
    assert (
        f"diffin report: configuration error: --run: {s3_bucket}/runs/r1 cannot be reached "
        "(ValueError: Invalid endpoint: not-a-url:1); check the store's credentials" in err
    )
    assert f"diffin make-data: configuration error: out: {s3_bucket}/pool cannot be" in err
    assert "Traceback" not in err

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setitem(fsspec.config.conf["s3"], "endpoint_url", os.environ["AWS_ENDPOINT_URL"])
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        assert main(["prune", "--run", f"{s3_bucket}/runs/r1", "--keep", "0.5"]) == 2
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    err = capsys.readouterr().err
    assert "--run: " in err and "(NoCredentialsError: Unable to locate credentials)" in err


def test_run_leases_on_s3_exclusive_create_refusal_and_take_over(s3_bucket, tiny_pool, capsys):
    """S3 has no locks: a stage holds a lease object, created with If-None-Match."""
    import time

    from pipeline import runlock
    from pipeline.cli import main
    from pipeline.status import run_status

    run = f"{s3_bucket}/runs/locked"
    fs = _fs()
    key = f"{run.removeprefix('s3://')}/locks/train.json"
    assert runlock._create(fs, key, b"{}") and not runlock._create(fs, key, b"{}")  # exclusive

    lease = {"stage": "train", "command": "train", "owner": "x", "host": "node-2", "pid": 9,
             "started": time.time() - 30, "heartbeat": time.time()}  # fmt: skip
    fs.pipe_file(key, json.dumps(lease).encode())
    argv = ["score", "--data", tiny_pool["train_data"], "--run", run, "--methods", "loss"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"diffin score: {run} is in use by diffin train (pid 9 on node-2, started " in err
    assert "its lease was renewed " in err and len(err.splitlines()) == 1
    assert not fs.exists(f"{run.removeprefix('s3://')}/locks/score.json")  # let go
    assert run_status(run)["running"]["train"]["host"] == "node-2"

    fs.pipe_file(key, json.dumps({**lease, "heartbeat": time.time() - 600}).encode())
    with runlock.hold(run, ["train"], "train"):
        held = runlock.holders(run)["train"]
        assert held["pid"] == os.getpid() and held["owner"] != "x"  # taken over
    assert runlock.holders(run) == {} and not _fs().exists(key)
