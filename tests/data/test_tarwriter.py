"""ShardWriter: the shards the pool generator and the pruning stage publish."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import fsspec
import pytest

from pipeline.data.tarwriter import ShardWriter, brace_pattern


def _sample(i: int) -> dict[str, bytes]:
    return {
        "jpg": f"image-{i}".encode(),
        "txt": f"caption {i}".encode(),
        "json": json.dumps({"i": i}).encode(),
    }


def _write(out: str, n: int, shard_size: int, start_index: int = 0) -> ShardWriter:
    with ShardWriter(out, shard_size, start_index=start_index) as w:
        for i in range(n):
            w.write(f"{i:09d}", _sample(i))
    return w


def _members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getmembers()


def test_splits_into_contiguous_shards(tmp_path: Path) -> None:
    w = _write(str(tmp_path / "shards"), n=7, shard_size=3, start_index=2)
    assert w.shards == ["00002.tar", "00003.tar", "00004.tar"]
    assert w.sizes == {"00002.tar": 3, "00003.tar": 3, "00004.tar": 1}
    assert w.count == 7
    files = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert files == ["00002.tar", "00003.tar", "00004.tar", "sizes.json"]  # no temp files left
    keys = []
    for name in w.shards:
        names = [m.name for m in _members((tmp_path / "shards" / name).read_bytes())]
        keys.extend(sorted({n.split(".")[0] for n in names}))
    assert keys == [f"{i:09d}" for i in range(7)]


def test_a_key_of_the_finished_shard_may_start_the_next(tmp_path: Path) -> None:
    """Before: the finished shard's keys were still held, so the next shard refused them."""
    with ShardWriter(str(tmp_path), 2) as w:
        w.write("a", _sample(0))
        w.write("b", _sample(1))  # finishes 00000.tar
        assert not w.holds("a")
        w.write("a", _sample(2))  # the first sample of 00001.tar
        assert w.holds("a")
        with pytest.raises(ValueError, match="already in this shard"):
            w.write("a", _sample(3))
    assert w.sizes == {"00000.tar": 2, "00001.tar": 1}


def test_sizes_json(tmp_path: Path) -> None:
    _write(str(tmp_path), n=5, shard_size=2)
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {"00000.tar": 2, "00001.tar": 2, "00002.tar": 1}
    assert list(sizes) == sorted(sizes)


def test_exact_multiple_leaves_no_empty_shard(tmp_path: Path) -> None:
    w = _write(str(tmp_path), n=4, shard_size=2)
    assert w.shards == ["00000.tar", "00001.tar"]
    assert not (tmp_path / "00002.tar").exists()


def test_member_names_order_and_content(tmp_path: Path) -> None:
    members = {"txt": b"hello", "jpg": b"\xff\xd8jpeg", "seg.png": b"png", "npy": b"raw"}
    with ShardWriter(str(tmp_path), 10) as w:
        w.write("k1", members)
        w.write("k2", {"json": b"{}"})
    with tarfile.open(tmp_path / "00000.tar") as tf:
        infos = tf.getmembers()
        assert [m.name for m in infos] == ["k1.txt", "k1.jpg", "k1.seg.png", "k1.npy", "k2.json"]
        assert tf.extractfile("k1.npy").read() == b"raw"
        assert tf.extractfile("k1.jpg").read() == b"\xff\xd8jpeg"
    for m in infos:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o444)
        assert m.isfile()


def test_bytes_are_deterministic(tmp_path: Path) -> None:
    a = _write(str(tmp_path / "a"), n=9, shard_size=4)
    _write(str(tmp_path / "b"), n=9, shard_size=4)
    for name in a.shards:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "sizes.json").read_bytes() == (
        tmp_path / "b" / "sizes.json"
    ).read_bytes()


@pytest.mark.parametrize("key", ["a.b", "a/b", "", "/abs", "x."])
def test_rejects_bad_keys(tmp_path: Path, key: str) -> None:
    with ShardWriter(str(tmp_path), 2) as w, pytest.raises(ValueError):
        w.write(key, {"txt": b"x"})


def test_rejects_bad_members(tmp_path: Path) -> None:
    with ShardWriter(str(tmp_path), 2) as w:
        with pytest.raises(ValueError):
            w.write("k", {})
        with pytest.raises(ValueError):
            w.write("k", {"": b"x"})
        with pytest.raises(TypeError):
            w.write("k", {"txt": "not bytes"})  # type: ignore[dict-item]
    assert w.count == 0


def test_rejects_bad_shard_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ShardWriter(str(tmp_path), 0)


def test_memory_url() -> None:
    url = f"memory://tarwriter-{uuid.uuid4().hex}/shards"
    fs = fsspec.filesystem("memory")
    try:
        w = _write(url, n=5, shard_size=2)
        assert w.shards == ["00000.tar", "00001.tar", "00002.tar"]
        with fsspec.open(f"{url}/sizes.json", "rb") as f:
            assert json.loads(f.read()) == {"00000.tar": 2, "00001.tar": 2, "00002.tar": 1}
        with fsspec.open(f"{url}/00002.tar", "rb") as f:
            names = [m.name for m in _members(f.read())]
        assert names == ["000000004.jpg", "000000004.txt", "000000004.json"]
    finally:
        fs.rm(url.removeprefix("memory://").split("/")[0], recursive=True)


def test_file_url(tmp_path: Path) -> None:
    w = _write(f"file://{tmp_path}/s", n=3, shard_size=2)
    assert w.shards == ["00000.tar", "00001.tar"]
    assert (tmp_path / "s" / "00001.tar").exists()


def test_empty_writer(tmp_path: Path) -> None:
    with ShardWriter(str(tmp_path / "empty"), 3) as w:
        pass
    assert w.shards == [] and w.sizes == {} and w.count == 0
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["sizes.json"]
    assert json.loads((tmp_path / "empty" / "sizes.json").read_text()) == {}


def test_exception_discards_unfinished_shard(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(str(tmp_path), 2) as w:
        for i in range(3):
            w.write(f"k{i}", {"txt": b"x"})
        raise RuntimeError("boom")
    # The finished shard stays; the half shard and sizes.json are not published.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar"]


def test_close_is_idempotent_and_final(tmp_path: Path) -> None:
    w = ShardWriter(str(tmp_path), 2)
    w.write("a", {"txt": b"x"})
    w.close()
    w.close()
    assert w.sizes == {"00000.tar": 1}
    with pytest.raises(RuntimeError):
        w.write("b", {"txt": b"y"})


def test_brace_pattern() -> None:
    assert brace_pattern("/x/shards", 0, 3) == "/x/shards/{00000..00003}.tar"
    assert brace_pattern("/x/shards/", 2, 2) == "/x/shards/00002.tar"
    assert brace_pattern("s3://b/p", 0, 12, digits=6) == "s3://b/p/{000000..000012}.tar"
    with pytest.raises(ValueError):
        brace_pattern("/x", 3, 2)


def test_digits(tmp_path: Path) -> None:
    with ShardWriter(str(tmp_path), 1, start_index=7, digits=3) as w:
        w.write("a", {"txt": b"x"})
    assert w.shards == ["007.tar"]
