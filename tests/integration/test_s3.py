"""The whole pipeline with the pool, the run directory and the manifest in object storage.

A real S3-protocol server (moto, loopback) serves every byte; the scoring
actors run in an embedded Ray whose workers reach it through the inherited
environment.
"""

from __future__ import annotations

import io
import json

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
