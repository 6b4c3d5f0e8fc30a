"""Every kind of bad input, end to end through the scoring worker: nothing is lost.

A pool holding every kind of damage is scored with ``ShardScorer`` (the
function a Ray actor runs) against a tiny trained run, the parts are merged,
and the table is checked: rows in == rows out, one error row per bad sample
with its reason, a ``__shard__`` row for each unreadable shard after the
samples recovered from it. Configuration errors are refused before any work.
"""

from __future__ import annotations

import io
import pickle
import shutil
import tarfile

import pandas as pd
import pytest

from pipeline.data.reader import SHARD_KEY
from pipeline.data.shards import shard_names
from pipeline.errors import ConfigError
from pipeline.rundir import RunDir
from pipeline.score.config import ScoreConfig
from pipeline.score.directions import ensure_directions
from pipeline.score.merge import merge_parts
from pipeline.score.table import read_table
from pipeline.score.trajectory import load_trajectory
from pipeline.score.worker import ShardScorer
from pipeline.train.config import TrainConfig


class _Boom:
    """Unpickling this creates ``path``: proof that a pickle was (not) loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _cut_mid_member(data: bytes, member: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        m = next(m for m in tar if m.name == member)
        return data[: m.offset_data + m.size // 2]


@pytest.fixture
def damaged_pool(tmp_path, helpers):
    h = helpers
    marker = tmp_path / "UNPICKLED"
    pool = tmp_path / "pool"
    pool.mkdir()

    def good(key, **kw):
        return h.sample_members(key, image=h.encode_image("JPEG", (40, 40)), **kw)

    # Shard 0: a readable tar holding every kind of bad sample between good ones.
    members = [
        *good("a0", meta={"uid": "0" * 31 + "1"}),
        ("a1.jpg", b"\xff\xd8 this is not a jpeg"),
        ("a1.txt", b"undecodable image"),
        *good("a2", caption=b"caf\xe9 latin-1, not utf-8"),
        ("a3.txt", b"a caption without its image"),
        ("a3.json", b'{"uid": "00000000000000000000000000000003"}'),
        ("a4.jpg", h.encode_image("JPEG", (40, 40))),  # no caption
        *good("a5"),
        ("a6.png", h.png_bomb(30_000, 30_000)),  # declares 900 Mpx
        ("a6.txt", b"a decompression bomb"),
        ("a7.pyd", pickle.dumps(_Boom(str(marker)))),  # a pickle instead of an image
        ("a7.txt", b"pickled payload"),
        ("a8.jpg", h.encode_image("JPEG", (40, 40))),
        ("a8.pyd", pickle.dumps(_Boom(str(marker)))),  # carried, never decoded
        ("a8.txt", b"good sample with a pickle beside it"),
        *good("a5"),  # the same key again, later in the shard
        *good("a9"),
    ]
    (pool / "00000.tar").write_bytes(h.tar_bytes(members))
    # Shard 1: three good samples, then cut in the middle of the fourth's image.
    data = h.tar_bytes([m for i in range(4) for m in good(f"b{i}")])
    (pool / "00001.tar").write_bytes(_cut_mid_member(data, "b3.jpg"))
    # Shard 2: not a tar at all.
    (pool / "00002.tar").write_bytes(b"<html>404 Not Found</html>" * 40)
    shards = [str(pool / f"{i:05d}.tar") for i in range(3)] + [str(pool / "00003.tar")]  # gone
    expected = {
        shards[0]: {
            "a0": None,
            "a1": "undecodable image",
            "a2": "caption is not UTF-8",
            "a3": "missing image",
            "a4": "missing caption",
            "a5": None,
            "a6": "image too large",
            "a7": "missing image",
            "a8": None,
            "a5#dup": "duplicate key a5",
            "a9": None,
        },
        shards[1]: {
            "b0": None,
            "b1": None,
            "b2": None,
            "b3": "incomplete sample",
            SHARD_KEY: "unreadable shard: truncated tar after 3 samples",
        },
        shards[2]: {SHARD_KEY: "unreadable shard: not a tar file"},
        shards[3]: {SHARD_KEY: "unreadable shard: cannot open"},
    }
    return {"shards": shards, "expected": expected, "marker": marker}


def test_every_kind_of_damage_scored_end_to_end(tiny_run, tmp_path, damaged_pool):
    run_url = str(tmp_path / "run")
    shutil.copytree(tiny_run["run"], run_url)
    shards = damaged_pool["shards"]
    cfg = ScoreConfig(
        data="::".join(shards[:3]), run=run_url, methods=["diffin", "random"], batch_size=4
    )
    run = RunDir(run_url)
    ensure_directions(cfg, run, load_trajectory(run))
    scorer = ShardScorer(run_url, cfg)
    names = shard_names(shards)
    counts = [scorer.score_shard(u, n) for u, n in zip(shards, names, strict=True)]
    summary = merge_parts([run.part(n) for n in names], run.scores, metadata={})
    table = read_table(run.scores).to_pandas()

    expected = damaged_pool["expected"]
    rows_in = sum(len(v) for v in expected.values())
    n_err = sum(e is not None for v in expected.values() for e in v.values())
    # rows in == rows out, and the counts add up everywhere
    assert len(table) == rows_in == summary["rows"] == sum(c["rows"] for c in counts)
    assert summary["rows_ok"] + summary["rows_error"] == summary["rows"]
    assert summary["rows_error"] == n_err == sum(c["errors"] for c in counts)
    assert summary["rows_ok"] == rows_in - n_err == sum(c["ok"] for c in counts)

    for url, want in expected.items():
        got = table[table.shard == url].sort_values("index")
        assert got["index"].tolist() == list(range(len(want))), url
        for (key, reason), (_, row) in zip(want.items(), got.iterrows(), strict=True):
            assert row.key == key.split("#")[0], (url, key)
            if reason is None:
                assert row.status == "ok" and pd.isna(row.error), (key, row.error)
                assert not pd.isna(row.diffin) and not pd.isna(row.random)
            else:
                assert row.status == "error", key
                assert reason in row.error, (key, row.error)
                assert pd.isna(row.diffin) and pd.isna(row.random)  # null scores
    # the img2dataset uid from the json, also for an error row
    assert table.loc[(table.shard == shards[0]) & (table.key == "a3"), "uid"].item() == (
        "00000000000000000000000000000003"
    )
    assert not damaged_pool["marker"].exists(), "a pickle member was unpickled"


def test_configuration_errors_are_refused_before_work(tiny_run, tmp_path):
    import ray

    from pipeline.prune.config import PruneConfig
    from pipeline.score.driver import run_scoring

    run_url = str(tmp_path / "run")
    shutil.copytree(tiny_run["run"], run_url)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (dict(data=f"{tmp_path}/{{00000..00003.tar"), "unbalanced"),
        (dict(data=f"{tmp_path}/{{3..1}}.tar"), "reversed brace range"),
        (dict(data=str(empty)), "no shards match"),
        (dict(data=f"{tmp_path}/missing-{{0..1}}.tar"), "missing"),
        (dict(data=tiny_run["data"], methods=["diffin", "nope"]), "nope"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_scoring(ScoreConfig(run=run_url, **{"methods": ["diffin"], **kwargs}))
        assert not ray.is_initialized()
    assert not (tmp_path / "run" / "scores").exists()
    for keep in (0.0, -0.1, 1.01):
        with pytest.raises(ConfigError, match="keep"):
            PruneConfig(run=run_url, keep=keep).validate()


def test_the_pixel_cap_is_a_score_option(tiny_run, tmp_path, helpers):
    """``max_image_pixels`` reaches the actors' reader: a larger image is an error row."""
    h = helpers
    run_url = str(tmp_path / "run")
    shutil.copytree(tiny_run["run"], run_url)
    members = [
        *h.sample_members("small", image=h.encode_image("JPEG", (40, 40))),  # 1,600 px
        *h.sample_members("large", image=h.encode_image("PNG", (60, 60))),  # 3,600 px
        *h.sample_members("small2", image=h.encode_image("JPEG", (30, 50))),  # 1,500 px
    ]
    shard = tmp_path / "pool" / "00000.tar"
    shard.parent.mkdir()
    shard.write_bytes(h.tar_bytes(members))
    cfg = ScoreConfig(
        data=str(shard), run=run_url, methods=["diffin"], batch_size=4, max_image_pixels=2_000
    )
    assert cfg.reader_options()["max_image_pixels"] == 2_000
    run = RunDir(run_url)
    ensure_directions(cfg, run, load_trajectory(run))
    (name,) = shard_names([str(shard)])
    counts = ShardScorer(run_url, cfg).score_shard(str(shard), name)
    assert counts["rows"] == 3 and counts["errors"] == 1
    merge_parts([run.part(name)], run.scores, metadata={})
    table = read_table(run.scores).to_pandas().set_index("key")
    assert table.loc["large", "error"] == "image too large: 60x60 pixels (cap 2000)"
    assert table.loc[["small", "small2"], "status"].tolist() == ["ok", "ok"]
    # Above PIL's bomb limit the error said "image too large (cap C)" for images under C (review).
    for bad in (0, -1, 500_000_000):
        with pytest.raises(ConfigError, match="max_image_pixels"):
            ScoreConfig(data="x", run="r", max_image_pixels=bad).validate()
        with pytest.raises(ConfigError, match="max_image_pixels"):
            TrainConfig(data="x", run="r", max_image_pixels=bad).validate()
