"""img2dataset pools as input: tar + per-shard parquet + _stats.json, uid from each json.

The pool is built by hand the way img2dataset writes it (keys
``SSSSSIIII``, members ``KEY.jpg|png|webp``, ``KEY.txt``, ``KEY.json``; the
parquet lists every url tried, failed downloads included, the tar only the
successes), read through the same shard patterns users pass to open_clip.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.reader import iter_shard
from pipeline.data.shards import expected_samples, resolve_shards, sidecars
from pipeline.errors import ConfigError

FORMATS = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]


def _uid(shard: int, i: int) -> str:
    return f"{shard:08x}{i:08x}" + "ab" * 8


def write_img2dataset_shard(
    directory: Path, shard: int, n: int, helpers, failed: int = 2, image_ext=None, text_ext="txt"
) -> list[dict]:
    """Write SHARD.tar, SHARD.parquet and SHARD_stats.json; returns the successful rows."""
    members, rows = [], []
    for i in range(n + failed):
        key = f"{shard:05d}{i:04d}"
        uid = _uid(shard, i)
        ok = i < n
        ext, fmt = FORMATS[i % 3]
        ext = image_ext or ext
        caption = f"photo {shard}-{i} \u00e9t\u00e9"  # non-ASCII, valid UTF-8
        meta = {
            "url": f"http://example.com/{key}.{ext}",
            "caption": caption,
            "key": key,
            "status": "success" if ok else "failed_to_download",
            "error_message": None if ok else "HTTP 404",
            "width": 24 if ok else None,
            "height": 16 if ok else None,
            "original_width": 48 if ok else None,
            "original_height": 32 if ok else None,
            "exif": "{}",
            "sha256": "0" * 64,
            "uid": uid,
        }
        rows.append(meta)
        if ok:  # img2dataset writes only successes to the tar
            members += [
                (f"{key}.{ext}", helpers.encode_image(fmt, (24, 16))),
                (f"{key}.{text_ext}", caption.encode("utf-8")),
                (f"{key}.json", json.dumps(meta).encode()),
            ]
    (directory / f"{shard:05d}.tar").write_bytes(helpers.tar_bytes(members))
    pq.write_table(pa.Table.from_pylist(rows), directory / f"{shard:05d}.parquet")
    stats = {
        "count": n + failed,
        "successes": n,
        "failed_to_download": failed,
        "failed_to_resize": 0,
        "duration": 1.0,
        "status_dict": {"success": n, "HTTP 404": failed},
    }
    (directory / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    return [r for r in rows if r["status"] == "success"]


@pytest.fixture
def pool(tmp_path, helpers):
    d = tmp_path / "laion"
    d.mkdir()
    rows = {s: write_img2dataset_shard(d, s, 6, helpers) for s in range(3)}
    return d, rows


def test_reads_an_img2dataset_pool(pool):
    d, rows = pool
    shards = resolve_shards(f"{d}/{{00000..00002}}.tar")
    for s, url in enumerate(shards):
        got = list(iter_shard(url))
        assert all(r.ok for r in got), [r.error for r in got]
        # uid from each sample's json; rows match the parquet's successes and the stats
        assert [r.uid for r in got] == [m["uid"] for m in rows[s]]
        parquet = pq.read_table(sidecars(url)["parquet"]).to_pylist()
        ok_rows = [p for p in parquet if p["status"] == "success"]
        assert [r.key for r in got] == [p["key"] for p in ok_rows]
        assert [r.uid for r in got] == [p["uid"] for p in ok_rows]
        assert len(got) == expected_samples(url) == 6
        assert [r.caption for r in got] == [p["caption"] for p in ok_rows]
        assert {r.image.size for r in got} == {(24, 16)}
        assert got[0].meta["status"] == "success"


def test_patterns_lists_and_directories(pool, tmp_path, helpers):
    d, _ = pool
    other = tmp_path / "cc3m"
    other.mkdir()
    write_img2dataset_shard(other, 7, 3, helpers)
    by_brace = resolve_shards(f"{d}/{{00000..00002}}.tar")
    by_list = resolve_shards(f"{d}/{{00000,00002}}.tar::{other}/00007.tar")
    assert by_list == [by_brace[0], by_brace[2], str(other / "00007.tar")]
    # a directory listing takes the tars only, not the parquet or _stats.json beside them
    assert resolve_shards(str(d)) == by_brace
    assert resolve_shards(f"{d}/*.tar") == by_brace
    assert sum(1 for u in by_list for _ in iter_shard(u)) == 6 + 6 + 3
    with pytest.raises(ConfigError, match="missing"):
        resolve_shards(f"{d}/{{00000..00003}}.tar")


def test_configurable_image_and_text_keys(tmp_path, helpers):
    d = tmp_path / "custom"
    d.mkdir()
    write_img2dataset_shard(d, 0, 4, helpers, failed=0, image_ext="jpeg", text_ext="caption")
    url = str(d / "00000.tar")
    default = list(iter_shard(url))
    assert all("missing caption" in r.error for r in default)  # .caption is not a default key
    custom = list(iter_shard(url, image_keys=("jpeg",), text_keys=("caption", "txt")))
    assert all(r.ok for r in custom), [r.error for r in custom]
    assert custom[0].caption.startswith("photo 0-0")
    only_png = list(iter_shard(url, image_keys=("png",), text_keys=("caption",)))
    assert all("missing image (expected one of png)" in r.error for r in only_png)


def test_sidecars_and_missing_stats(tmp_path):
    assert sidecars("s3://b/pool/00012.tar") == {
        "parquet": "s3://b/pool/00012.parquet",
        "stats": "s3://b/pool/00012_stats.json",
    }
    assert expected_samples(str(tmp_path / "00000.tar")) is None
    (tmp_path / "00001_stats.json").write_text("not json")
    assert expected_samples(str(tmp_path / "00001.tar")) is None
