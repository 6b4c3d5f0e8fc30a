"""Shard patterns: the open_clip/WebDataset spelling, directories, globs, any fsspec URL."""

from __future__ import annotations

import os
import re

import pytest

from pipeline.data.shards import (
    expand_pattern,
    resolve_shards,
    shard_name,
    shard_names,
    shard_stamp,
    shard_stamps,
)
from pipeline.errors import ConfigError

# --- expand_pattern: pure string work --------------------------------------------------


def test_brace_range_keeps_zero_padding():
    assert expand_pattern("/d/{00008..00011}.tar") == [
        "/d/00008.tar",
        "/d/00009.tar",
        "/d/00010.tar",
        "/d/00011.tar",
    ]
    # Unpadded bounds do not pad.
    assert expand_pattern("{8..11}") == ["8", "9", "10", "11"]
    assert expand_pattern("{3..3}.tar") == ["3.tar"]


@pytest.mark.parametrize("body", ["8..010", "1..003", "001..3", "08..10", "0..10", "0..0", "00..3"])
def test_mixed_width_ranges_name_the_files_webdataset_opens(body):
    # WebDataset and open_clip expand with braceexpand; listing other names
    # would score or count shards that the training client never reads.
    import braceexpand

    pattern = f"/d/{{{body}}}.tar"
    assert expand_pattern(pattern) == list(braceexpand.braceexpand(pattern))


def test_several_braces_are_a_cartesian_product_leftmost_slowest():
    assert expand_pattern("s3://b/{a,b}/{000..001}-{x,y}.tar") == [
        "s3://b/a/000-x.tar",
        "s3://b/a/000-y.tar",
        "s3://b/a/001-x.tar",
        "s3://b/a/001-y.tar",
        "s3://b/b/000-x.tar",
        "s3://b/b/000-y.tar",
        "s3://b/b/001-x.tar",
        "s3://b/b/001-y.tar",
    ]


def test_brace_lists_and_double_colon_join_keep_order():
    assert expand_pattern("/a/{c,a,b}.tar::/z/{1..2}.tar::/plain.tar") == [
        "/a/c.tar",
        "/a/a.tar",
        "/a/b.tar",
        "/z/1.tar",
        "/z/2.tar",
        "/plain.tar",
    ]
    # "::" is not confused with the "://" of a URL.
    assert expand_pattern("s3://b/0.tar::memory://m/1.tar") == ["s3://b/0.tar", "memory://m/1.tar"]


def test_fsspec_chained_url_is_not_split():
    assert expand_pattern("simplecache::s3://b/{0..1}.tar") == [
        "simplecache::s3://b/0.tar",
        "simplecache::s3://b/1.tar",
    ]


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("/d/{5..1}.tar", "reversed brace range"),
        ("/d/{00000..00009.tar", "unbalanced '{'"),
        ("/d/00000..00009}.tar", "unbalanced '}'"),
        ("/d/}{0..1}.tar", "unbalanced '}'"),
        ("/d/{}.tar", "empty braces"),
        ("/d/{a..z}.tar", "must be two non-negative integers"),
        ("/d/{1..2..3}.tar", "must be two non-negative integers"),
        ("/d/{abc}.tar", "neither a range"),
        ("/d/{{0..1}}.tar", "nested braces"),
        ("/a.tar::::/b.tar", "empty item"),
        ("", "empty"),
        ("{0..99999999999}", "more than"),
    ],
)
def test_malformed_patterns_raise_config_error_naming_pattern_and_problem(pattern, problem):
    with pytest.raises(ConfigError) as info:
        expand_pattern(pattern)
    assert problem in str(info.value)
    if pattern:
        assert repr(pattern) in str(info.value)


# --- resolve_shards: local ------------------------------------------------------------


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def test_resolve_explicit_pattern_local(tmp_path):
    paths = [_touch(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert resolve_shards(f"{tmp_path}/{{00000..00002}}.tar") == paths


def test_resolve_file_url_gives_plain_local_paths(tmp_path):
    paths = [_touch(tmp_path / f"{i:05d}.tar") for i in range(2)]
    assert resolve_shards(f"file://{tmp_path}/{{00000..00001}}.tar") == paths


def test_resolve_relative_path_is_made_absolute(tmp_path, monkeypatch):
    path = _touch(tmp_path / "sub" / "00000.tar")
    monkeypatch.chdir(tmp_path)
    assert resolve_shards("sub/00000.tar") == [path]


def test_resolve_directory_lists_tar_files_sorted(tmp_path):
    d = tmp_path / "pool"
    # gzipped shards too: before, a directory dropped them without a word (review)
    names = ("00000.tar", "00001.tar.gz", "00002.tgz", "00010.tar")
    expected = [_touch(d / n) for n in names]
    _touch(d / "00000.parquet")
    _touch(d / "_stats.json")
    _touch(d / "nested" / "00002.tar")  # not recursive
    assert resolve_shards(str(d)) == expected
    assert resolve_shards(str(d) + "/") == expected
    # x.tar beside x.tar.gz: the same shard twice, refused (review: it was scored twice)
    _touch(d / "00010.tar.gz")
    with pytest.raises(ConfigError, match="holds 00010.tar and 00010.tar.gz: the same shard"):
        resolve_shards(str(d))


def test_resolve_glob_sorted(tmp_path):
    # a-x.shard: a name without a shard suffix, taken as given when listed explicitly
    # (a .parquet, .json ... file is refused as a shard: test below)
    for n in ("b-1.tar", "a-2.tar", "a-1.tar", "a-x.shard"):
        _touch(tmp_path / n)
    assert resolve_shards(f"{tmp_path}/a-?.tar") == [
        str(tmp_path / "a-1.tar"),
        str(tmp_path / "a-2.tar"),
    ]
    assert resolve_shards(f"{tmp_path}/*.tar::{tmp_path}/a-x.shard")[-1] == str(
        tmp_path / "a-x.shard"
    )


def test_missing_shard_named_in_error(tmp_path):
    _touch(tmp_path / "00000.tar")
    _touch(tmp_path / "00002.tar")
    with pytest.raises(ConfigError) as info:
        resolve_shards(f"{tmp_path}/{{00000..00002}}.tar")
    msg = str(info.value)
    assert "1 shard(s)" in msg and "missing" in msg
    assert str(tmp_path / "00001.tar") in msg
    # check_exists=False skips the existence check.
    assert len(resolve_shards(f"{tmp_path}/{{00000..00002}}.tar", check_exists=False)) == 3


def test_missing_shards_listed_up_to_five_with_count(tmp_path):
    _touch(tmp_path / "00000.tar")
    with pytest.raises(ConfigError) as info:
        resolve_shards(f"{tmp_path}/{{00000..00009}}.tar")
    msg = str(info.value)
    assert msg.startswith("9 shard(s)")
    assert len(re.findall(r"\d{5}\.tar", msg)) == 5
    assert "(4 more)" in msg


def test_missing_parent_directory(tmp_path):
    with pytest.raises(ConfigError, match="no shards match|missing"):
        resolve_shards(f"{tmp_path}/nope/{{0..1}}.tar")


def test_a_missing_directory_is_named_as_a_directory(tmp_path):
    # walkthrough: `--data nodir/` said "1 shard(s) ... missing: .../nodir"
    with pytest.raises(ConfigError, match=r"nodir/ \(no such directory\)"):
        resolve_shards(f"{tmp_path}/nodir/")
    _touch(tmp_path / "00000.tar")
    with pytest.raises(ConfigError, match=r"1 shard\(s\) .*nodir/ \(no such directory\)"):
        resolve_shards(f"{tmp_path}/00000.tar::{tmp_path}/nodir/")


def test_a_store_that_cannot_be_reached_is_one_line_not_a_traceback(memfs, monkeypatch):
    """Walkthrough: an S3 endpoint that did not answer ended `diffin score` in a 220-line
    botocore traceback from the existence check."""
    from fsspec.implementations.memory import MemoryFileSystem

    def down(self, *args, **kwargs):
        raise ConnectionError("Could not connect to the endpoint URL\nmore detail")

    monkeypatch.setattr(MemoryFileSystem, "ls", down)
    monkeypatch.setattr(MemoryFileSystem, "exists", down)
    with pytest.raises(ConfigError) as info:
        resolve_shards("memory://pool/{00000..00001}.tar")
    assert re.fullmatch(
        r"shards in memory:/+pool cannot be listed \(ConnectionError: Could not connect to the "
        r"endpoint URL\) nor checked \(ConnectionError: Could not connect to the endpoint URL\)",
        str(info.value),
    )


def test_a_directory_named_like_a_shard_is_refused_before_reading(tmp_path, memfs):
    """Review: `--data x.tar` naming a directory passed, then failed at read time after
    --max-attempts tries, as a partial shard."""
    _touch(tmp_path / "00000.tar")
    (tmp_path / "00001.tar").mkdir()
    with pytest.raises(ConfigError, match=r"00001.tar \(a directory, not a shard file\)"):
        resolve_shards(f"{tmp_path}/{{00000..00001}}.tar")
    memfs.pipe("/pool/00000.tar", b"x")
    memfs.makedirs("/pool/00001.tar", exist_ok=True)
    memfs.pipe("/pool/00001.tar/inner", b"x")
    with pytest.raises(ConfigError, match=r"00001.tar \(a directory, not a shard file\)"):
        resolve_shards("memory://pool/{00000..00001}.tar")


@pytest.mark.parametrize("name", ["sizes.json", "truth.parquet", "uids.npy", "00000_stats.json"])
def test_a_file_that_sits_beside_shards_is_refused_as_one(tmp_path, name):
    # walkthrough: `--data pool/sizes.json` gave one "not a tar" row and "0 decodable pairs"
    _touch(tmp_path / name)
    with pytest.raises(ConfigError, match=r"is a \w+ file, not a tar shard"):
        resolve_shards(f"{tmp_path}/{name}")
    _touch(tmp_path / "00000.tar")
    assert resolve_shards(str(tmp_path)) == [str(tmp_path / "00000.tar")]  # a listing skips it


def test_nothing_matches(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no shards match"):
        resolve_shards(f"{tmp_path}/*.tar")
    with pytest.raises(ConfigError, match="no shards match"):
        resolve_shards(str(tmp_path / "empty"))
    assert os.listdir(tmp_path / "empty") == []


def test_duplicate_shards_refused(tmp_path):
    _touch(tmp_path / "00000.tar")
    _touch(tmp_path / "00001.tar")
    with pytest.raises(ConfigError, match="more than once") as info:
        resolve_shards(f"{tmp_path}/{{00000..00001}}.tar::{tmp_path}/00000.tar")
    assert str(tmp_path / "00000.tar") in str(info.value)
    # The same file named two ways is still a duplicate.
    with pytest.raises(ConfigError, match="more than once"):
        resolve_shards(f"{tmp_path}::{tmp_path}/00001.tar")


def test_a_local_shard_is_one_string_however_its_path_is_spelled(tmp_path):
    """Review: '/d/./x.tar' was another string than '/d/x.tar' (so other fallback uids), and
    the same shard listed both ways was scored twice; '/d//x.tar' was reported missing."""
    _touch(tmp_path / "00000.tar")
    (tmp_path / "sub").mkdir()
    plain = str(tmp_path / "00000.tar")
    for spelled in (f"{tmp_path}/./00000.tar", f"{tmp_path}//00000.tar"):
        assert resolve_shards(spelled) == [plain], spelled
    assert resolve_shards(f"{tmp_path}/./*.tar") == [plain]
    with pytest.raises(ConfigError, match="more than once"):
        resolve_shards(f"{plain}::{tmp_path}/./00000.tar")
    # '..' after a symbolic link is the link target's parent, as the OS reads it (review:
    # normpath made '/home/link/../x.tar' into '/home/x.tar', another file or none)
    target = tmp_path / "mnt" / "pool" / "deep"
    target.mkdir(parents=True)
    _touch(tmp_path / "mnt" / "pool" / "00001.tar")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "link").symlink_to(target)
    through = f"{tmp_path}/home/link/../00001.tar"
    assert os.path.exists(through)
    assert resolve_shards(through) == [through]


# --- resolve_shards: fsspec memory filesystem ------------------------------------------


def test_memory_urls_keep_protocol(memfs):
    for i in range(3):
        memfs.pipe(f"/pool/{i:05d}.tar", b"x")
    memfs.pipe("/pool/readme.txt", b"x")
    expected = [f"memory:///pool/{i:05d}.tar" for i in range(3)]
    assert resolve_shards("memory://pool/{00000..00002}.tar") == expected
    assert resolve_shards("memory://pool") == expected
    assert resolve_shards("memory://pool/*.tar") == expected
    with pytest.raises(ConfigError, match=r"memory:///pool/00003\.tar"):
        resolve_shards("memory://pool/{00000..00003}.tar")


def test_unknown_protocol_is_a_config_error():
    with pytest.raises(ConfigError, match="nosuchproto"):
        resolve_shards("nosuchproto://x/0.tar")


# --- shard names -----------------------------------------------------------------------


def test_shard_name_is_basename_without_tar():
    assert shard_name("/data/pool/00012.tar") == "00012"
    assert shard_name("s3://bucket/pool/00012.tar") == "00012"
    assert shard_name("https://host/p/00012.tar?sig=abc") == "00012"
    assert shard_name("memory:///p/odd name!.tar") == "odd_name"
    assert shard_name("/p/.tar").startswith("shard-")


def test_shard_names_disambiguate_only_collisions_deterministically():
    urls = ["s3://a/pool/00000.tar", "s3://b/pool/00000.tar", "s3://a/pool/00001.tar"]
    names = shard_names(urls)
    assert names == shard_names(list(urls))
    assert names[2] == "00001"
    assert names[0] != names[1]
    assert all(re.fullmatch(r"[0-9a-f]{8}-00000", n) for n in names[:2])
    assert len(set(names)) == 3
    # Same directory, same stem: the parent hash is not enough, the URL hash is.
    same_dir = shard_names(["/p/x.tar", "/p/x.tar.gz"])
    assert len(set(same_dir)) == 2
    with pytest.raises(ConfigError):
        shard_names(["/p/x.tar", "/p/x.tar"])


# --- shard stamps (is this still the file that was scored?) ------------------------------


def test_a_shard_rewritten_in_place_gets_another_stamp(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"x" * (100 + i))
    urls = [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    stamps = shard_stamps(urls + [str(tmp_path / "gone.tar")])
    assert [stamps[u] for u in urls] == [shard_stamp(u) for u in urls]  # listing = asking
    assert stamps[urls[1]]["size"] == 101 and "version" in stamps[urls[1]]
    assert stamps[str(tmp_path / "gone.tar")] is None
    # Same name, same size, other bytes, written later: a different stamp.
    os.utime(urls[1], ns=(1_000_000_000, 1_000_000_000))
    before = shard_stamp(urls[1])
    (tmp_path / "00001.tar").write_bytes(b"y" * 101)
    assert shard_stamp(urls[1]) != before
    assert shard_stamp(urls[0]) == stamps[urls[0]]


def test_shard_stamps_of_shards_in_several_directories(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "00000.tar").write_bytes(d.encode() * 10)
    urls = [f"file://{tmp_path}/a/00000.tar", str(tmp_path / "b" / "00000.tar")]
    stamps = shard_stamps(urls)
    assert all(stamps[u] == shard_stamp(u) and stamps[u]["size"] == 10 for u in urls)


def test_a_symlinked_shard_is_stamped_by_its_target(tmp_path):
    """A listing gives a link's own mtime; asking for the file follows it (review)."""
    (tmp_path / "disk").mkdir()
    (tmp_path / "pool").mkdir()
    target = tmp_path / "disk" / "00000.tar"
    target.write_bytes(b"x" * 10)
    link = tmp_path / "pool" / "00000.tar"
    link.symlink_to(target)
    os.utime(link, ns=(1_000_000_000, 1_000_000_000), follow_symlinks=False)
    assert shard_stamps([str(link)])[str(link)] == shard_stamp(str(link))
    assert shard_stamp(str(link)) == shard_stamp(str(target))


def test_an_etag_is_the_same_version_quoted_or_not():
    from pipeline.data.shards import _stamp

    quoted = _stamp({"size": 3, "ETag": '"abc"'})
    assert quoted == _stamp({"size": 3, "ETag": "abc"}) == _stamp({"size": 3, "ETag": 'W/"abc"'})
    assert quoted != _stamp({"size": 3, "mtime": "abc"})  # the key is part of the version


def test_shards_over_http_are_stamped_one_by_one(tmp_path):
    """An HTTP index page lists no sizes: each shard is asked for (HEAD) instead."""
    import functools
    import http.server
    import threading

    for i in range(2):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"z" * (5 + i))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        urls = [f"{base}/{i:05d}.tar" for i in range(2)]
        stamps = shard_stamps(urls)
        assert [stamps[u] for u in urls] == [shard_stamp(u) for u in urls]
        assert [stamps[u]["size"] for u in urls] == [5, 6]
        assert all(stamps[u]["version"] for u in urls)  # the server's Last-Modified
    finally:
        server.shutdown()
