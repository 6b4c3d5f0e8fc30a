"""Reader hardening from review: names, member kinds, size and shape caps, bit depth, keys.

Every case keeps DESIGN.md's bad-input promise: rows in = rows out, a clear
reason on each error row, and every string in a row writable as UTF-8.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.data import reader
from pipeline.data.keys import valid_keys
from pipeline.data.reader import SHARD_KEY, count_samples, iter_raw, iter_shard
from pipeline.errors import ConfigError
from pipeline.train.config import TrainConfig


def _png(size=(8, 6), mode="RGB", color=(200, 30, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def _write(path, members, *, encoding="utf-8") -> str:
    """members: (name, bytes) or a TarInfo (links, directories); GNU format keeps any name."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding=encoding) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
                continue
            name, data = m
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def _writable(rows) -> None:
    """The string columns of the score table, written as pyarrow writes them."""
    for column in ("key", "shard", "error", "caption"):
        pa.array([getattr(r, column) for r in rows], pa.string())
    for r in rows:
        for value in (r.key, r.shard, r.error, r.caption):
            if value is not None:
                value.encode("utf-8")  # strict: no lone surrogates


# --- 1. names that are not UTF-8 ------------------------------------------------------


def test_non_utf8_member_name_gives_an_escaped_key_and_an_ok_row(tmp_path):
    # Latin-1 bytes in member names: tarfile hands them over as lone surrogates.
    url = _write(
        tmp_path / "00000.tar",
        [
            ("good.png", _png()),
            ("good.txt", b"a cat"),
            ("caf\xe9.png", _png()),
            ("caf\xe9.txt", b"a dog"),
        ],
        encoding="latin-1",
    )
    rows = list(iter_shard(url))
    _writable(rows)
    assert [r.key for r in rows] == ["good", "caf\\xe9"]
    assert all(r.ok for r in rows), [r.error for r in rows]
    assert rows[1].uid == _md5(f"{url}\0caf\\xe9")  # the documented rule, on the row's key
    # Resharding matches table keys against iter_raw's: they must be the same strings.
    assert [k for k, _ in iter_raw(url)] == [r.key for r in rows]


def test_non_utf8_names_in_error_messages_are_escaped(tmp_path):
    url = _write(
        tmp_path / "00000.tar",
        [
            ("k.png", _png()),
            ("k.\xe9.txt", b"x"),  # only the extension is not UTF-8
            ("k.\xe9.txt", b"y"),  # ... and duplicated: its name lands in the error
            ("READ\xe9", b"stray member without extension"),
        ],
        encoding="latin-1",
    )
    rows = list(iter_shard(url))
    _writable(rows)
    assert [r.key for r in rows] == ["k", "READ\\xe9"]
    assert "duplicate member k.\\xe9.txt in sample" in rows[0].error
    assert rows[1].error == "member READ\\xe9 has no extension (not part of a sample)"


def test_non_utf8_shard_path_gives_one_writable_shard_row(tmp_path):
    raw = bytes(tmp_path) + b"/caf\xe9.tar"
    url = raw.decode("utf-8", "surrogateescape")  # how a directory listing names it
    _write(raw, [("000.png", _png()), ("000.txt", b"x")])
    rows = list(iter_shard(url))
    _writable(rows)
    (row,) = rows
    assert row.key == SHARD_KEY and row.index == 0
    assert row.shard == f"{tmp_path}/caf\\xe9.tar"
    assert row.error.startswith("unreadable shard: shard path is not UTF-8")
    assert row.uid == _md5(f"{row.shard}\0\0{SHARD_KEY}") and row.whole_shard


# --- 2. which members make samples ----------------------------------------------------


def test_underscore_members_are_samples_and_dot_members_are_skipped_as_in_webdataset(tmp_path):
    wds = pytest.importorskip("webdataset")
    url = _write(
        tmp_path / "00000.tar",
        [
            ("._000.png", b"AppleDouble"),  # what macOS tar writes before each member
            ("000.png", _png()),
            ("._000.txt", b"AppleDouble"),
            ("000.txt", b"ok sample"),
            ("_001.png", _png()),
            ("_001.txt", b"underscore key"),
            (".002.png", _png()),
            (".002.txt", b"a hidden file"),
            ("d/_003.png", _png()),
            ("d/_003.txt", b"in a directory"),
        ],
    )
    rows = list(iter_shard(url))
    assert [r.key for r in rows] == ["000", "_001", "d/_003"]
    assert all(r.ok for r in rows), [r.error for r in rows]
    theirs = [s["__key__"] for s in wds.WebDataset(url, shardshuffle=False)]
    assert [k for k, _ in iter_raw(url)] == theirs == ["000", "_001", "d/_003"]


def test_only_webdataset_meta_members_and_directories_are_skipped(tmp_path):
    directory = tarfile.TarInfo("d")
    directory.type = tarfile.DIRTYPE
    url = _write(
        tmp_path / "00000.tar",
        [
            ("__key__", b"meta"),
            ("__meta__/info.json", b"{}"),
            directory,
            ("000.png", _png()),
            ("000.txt", b"ok"),
            ("__x__.txt", b"has an extension: a sample, as in WebDataset"),
        ],
    )
    rows = list(iter_shard(url))
    assert [r.key for r in rows] == ["000", "__x__"]
    assert rows[0].ok
    assert rows[1].error.startswith("missing image")


def test_grouping_of_underscore_keys_matches_webdataset(tmp_path):
    wds = pytest.importorskip("webdataset")
    url = _write(
        tmp_path / "00000.tar",
        [("_001.png", _png()), ("_001.txt", b"a"), ("__x__.png", _png()), ("__x__.txt", b"b")],
    )
    theirs = [s["__key__"] for s in wds.WebDataset(url, shardshuffle=False)]
    assert theirs == [k for k, _ in iter_raw(url)] == ["_001", "__x__"]


def test_dot_slash_prefix_is_dropped_from_keys(tmp_path):
    # What `tar -cf shard.tar .` writes.
    dot = tarfile.TarInfo(".")
    dot.type = tarfile.DIRTYPE
    url = _write(
        tmp_path / "00000.tar",
        [dot, ("./000.png", _png()), ("./000.txt", b"a"), ("./d/001.png", _png())],
    )
    rows = list(iter_shard(url))
    assert [r.key for r in rows] == ["000", "d/001"]
    assert rows[0].ok
    assert [k for k, _ in iter_raw(url)] == ["000", "d/001"]


def test_link_members_are_error_rows_that_say_so(tmp_path):
    url = _write(
        tmp_path / "00000.tar",
        [
            ("000.png", _png()),
            ("000.txt", b"ok"),
            _link("003.png", "000.png", tarfile.SYMTYPE),
            ("003.txt", b"symlinked image"),
            _link("004.png", "000.png", tarfile.LNKTYPE),
            ("004.txt", b"hardlinked image"),
        ],
    )
    rows = list(iter_shard(url))
    assert [r.key for r in rows] == ["000", "003", "004"]  # rows in = rows out
    assert rows[0].ok
    assert rows[1].error == "link member not supported: 003.png"
    assert rows[2].error == "link member not supported: 004.png"
    assert rows[1].caption == "symlinked image"
    assert count_samples(url) == 3


# --- 3. thin images -------------------------------------------------------------------


def test_thin_images_are_refused_by_the_aspect_ratio_cap(tmp_path):
    url = _write(
        tmp_path / "00000.tar",
        [
            ("strip.png", _png((1, 3000))),
            ("strip.txt", b"a 1 x 3000 strip"),
            ("wide.png", _png((101, 1))),
            ("wide.txt", b"just over"),
            ("edge.png", _png((100, 1))),
            ("edge.txt", b"exactly 100:1"),
        ],
    )
    rows = list(iter_shard(url))
    assert rows[0].error == "image too thin: 1x3000 pixels (aspect ratio cap 100:1)"
    assert rows[0].image is None
    assert rows[1].error == "image too thin: 101x1 pixels (aspect ratio cap 100:1)"
    assert rows[2].ok
    # Configurable like the pixel cap.
    loose = list(iter_shard(url, max_aspect_ratio=5000))
    assert [r.ok for r in loose] == [True, True, True]
    assert reader.MAX_ASPECT_RATIO == 100
    assert reader._decode_image(_png((1, 3000)), reader.MAX_IMAGE_PIXELS)[1].startswith(
        "image too thin"
    )


# --- 4. member size cap ---------------------------------------------------------------


def test_oversized_member_is_an_error_row_and_is_not_read(tmp_path, monkeypatch):
    size = 8 * 2**20  # zeros: a gzipped shard of a few KiB
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w|") as tar:
            members = [("000.png", _png()), ("000.txt", b"ok"), ("001.txt", bytes(size))]
            for name, data in [*members, ("001.png", _png())]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "00000.tar"  # gzip content under a .tar name
    path.write_bytes(buf.getvalue())

    opened = []  # members whose data was read
    extractfile = tarfile.TarFile.extractfile

    def spy(self, member):
        opened.append(member.name)
        return extractfile(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    cap = 2**20
    rows = list(iter_shard(str(path), max_member_bytes=cap))
    assert [r.key for r in rows] == ["000", "001"]
    assert rows[0].ok
    # Not also "missing caption": the caption was there, and refused.
    assert rows[1].error == f"member too large: 001.txt ({size} bytes, cap {cap})"
    assert "001.txt" not in opened and "001.png" in opened
    raw = dict(iter_raw(str(path), max_member_bytes=cap))
    assert set(raw["001"]) == {"png"}
    assert reader.MAX_MEMBER_BYTES == 256 * 2**20
    assert [r.ok for r in iter_shard(str(path))] == [True, True]  # under the default cap


def test_member_at_the_cap_is_read(tmp_path):
    url = _write(tmp_path / "00000.tar", [("000.png", _png()), ("000.txt", b"12345")])
    assert [r.ok for r in iter_shard(url, max_member_bytes=len(_png()))] == [True]
    (row,) = iter_shard(url, max_member_bytes=len(_png()) - 1)
    assert row.error.startswith("member too large: 000.png (")


def test_a_sample_of_many_members_under_the_cap_is_capped_as_a_whole(tmp_path, monkeypatch):
    """Before: each member was checked alone, so one key with many extensions of
    zeros (a small gzipped shard) was read whole into memory."""
    cap = 2**20
    part = int(0.9 * cap)
    bomb = [(f"001.x{i}", bytes(part)) for i in range(6)]
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w|") as tar:
            members = [("000.png", _png()), ("000.txt", b"ok"), ("001.png", _png())]
            for name, data in [*members, ("001.txt", b"cap"), *bomb, ("002.png", _png())]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "00000.tar"
    path.write_bytes(buf.getvalue())
    assert len(buf.getvalue()) < cap // 10
    opened = []
    extractfile = tarfile.TarFile.extractfile

    def spy(self, member):
        opened.append(member.name)
        return extractfile(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    rows = list(iter_shard(str(path), max_member_bytes=cap))
    assert [r.key for r in rows] == ["000", "001", "002"]  # rows in = rows out
    assert rows[0].ok and not rows[2].ok  # 002 lacks its caption
    # png + txt + two 0.9 MiB members fit the 2 MiB sample cap; the rest are refused unread
    assert rows[1].error.startswith("sample too large: 001.x2 would bring its members to ")
    assert rows[1].error.count("sample too large") == 4
    assert [n for n in opened if n.startswith("001.x")] == ["001.x0", "001.x1"]
    assert set(dict(iter_raw(str(path), max_member_bytes=cap))["001"]) == {
        "png",
        "txt",
        "x0",
        "x1",
    }


# --- 5. high bit depth ----------------------------------------------------------------


def test_16_bit_grayscale_png_keeps_its_tones(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    url = _write(tmp_path / "00000.tar", [("k.png", buf.getvalue()), ("k.txt", b"ramp")])
    (row,) = iter_shard(url)
    assert row.ok and row.image.mode == "RGB"
    got = np.asarray(row.image)
    assert got.min() == 0 and got.max() == 255
    assert abs(got.mean() - 127.5) < 1.0  # PIL's convert("RGB") clips: mean ~254
    assert np.array_equal(got[..., 0], (ramp >> 8).astype(np.uint8))


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I;16", np.array([[0, 255, 256, 65535]], np.uint16), [0, 0, 1, 255]),
        ("I;16B", np.array([[0, 255, 256, 65535]], ">u2"), [0, 0, 1, 255]),
        # 32-bit ints: the 16-bit range PNG uses, clipped.
        ("I", np.array([[-5, 256, 65535, 1 << 20]], np.int32), [0, 1, 255, 255]),
        # floats: PIL's own 0..255 convention, clipped and rounded; NaN is black.
        ("F", np.array([[-1.0, 127.6, 300.0, np.nan]], np.float32), [0, 128, 255, 0]),
    ],
)
def test_high_bit_depth_modes_scale_to_8_bits(mode, values, expected):
    im = Image.frombytes(mode, (values.shape[1], 1), values.tobytes())
    assert im.mode == mode
    out = reader._to_8bit(im)
    assert out.mode == "L"
    assert np.asarray(out)[0].tolist() == expected


# --- 6. image and text keys -----------------------------------------------------------


@pytest.mark.parametrize(
    "keys", [["JPG"], ["jpg", "Png"], ["jpg;png"], ["jpg,png"], ["jp g"], [" jpg"], ["txt\n"]]
)
def test_keys_the_reader_can_never_match_are_refused(keys):
    assert not valid_keys(keys)
    with pytest.raises(ConfigError, match="image_keys"):
        TrainConfig(data="x", run="r", image_keys=keys).validate()
    with pytest.raises(ConfigError, match="text_keys"):
        TrainConfig(data="x", run="r", text_keys=keys).validate()


def test_plain_keys_are_accepted():
    assert valid_keys(["jpg", "jpeg", "def.jpg", "txt", "caption"])
    assert not valid_keys([]) and not valid_keys([""]) and not valid_keys([".jpg"])
    assert not valid_keys(["a/b"])


# --- which shard failures are worth another try -----------------------------------------


def test_only_open_and_read_failures_are_retryable(tmp_path):
    missing = list(iter_shard(str(tmp_path / "gone.tar")))
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 40)
    junk = list(iter_shard(str(tmp_path / "junk.tar")))
    good = _write(tmp_path / "good.tar", [("a.png", _png()), ("a.txt", b"a cat")])
    assert [r.key for r in missing] == [SHARD_KEY] and reader.retryable(missing[0])
    assert [r.key for r in junk] == [SHARD_KEY] and not reader.retryable(junk[0])
    assert not any(reader.retryable(r) for r in iter_shard(good))


def test_only_transport_errors_count_as_read_errors():
    # A reader bug would meet the same shard again: retrying it only delays the row.
    assert reader._io_error(ConnectionResetError("reset by peer")).kind == "read error"
    assert reader._io_error(TimeoutError()).kind == "read error"
    assert reader._io_error(ValueError("a bug")).kind == "reader error"
    # The network clients' own errors are transport failures too (not OSError).
    import aiohttp
    import botocore.exceptions as be

    assert reader._io_error(aiohttp.ClientPayloadError("cut short")).kind == "read error"
    assert reader._io_error(aiohttp.ServerDisconnectedError()).kind == "read error"
    assert reader._io_error(be.ReadTimeoutError(endpoint_url="http://x")).kind == "read error"
    wrapped = RuntimeError("store failed")
    wrapped.__cause__ = aiohttp.ClientPayloadError("cut short")
    assert reader._io_error(wrapped).kind == "read error"


def test_a_connection_dropped_mid_shard_is_retryable_and_the_retry_reads_it_all(tmp_path):
    """Before: aiohttp's ClientPayloadError was a "reader error"; the shard was recorded
    as scored with the rest of its samples missing, and never retried."""
    import http.server
    import re
    import threading

    url = _write(
        tmp_path / "00000.tar",
        [m for i in range(6) for m in ((f"{i}.png", _png()), (f"{i}.txt", b"a cat"))],
    )
    data = open(url, "rb").read()
    gets = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _head(self, body_len, start, status):
            self.send_response(status)
            self.send_header("Content-Length", str(body_len))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Range", f"bytes {start}-{start + body_len - 1}/{len(data)}")
            self.end_headers()

        def do_HEAD(self):
            self._head(len(data), 0, 200)

        def do_GET(self):
            gets.append(1)
            m = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            a, b = (int(m[1]), int(m[2] or len(data) - 1)) if m else (0, len(data) - 1)
            body = data[a : b + 1]
            self._head(len(body), a, 206 if m else 200)
            if len(gets) == 1:  # the first body is cut short and the connection closed
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        shard = f"http://127.0.0.1:{server.server_address[1]}/00000.tar"
        first = list(iter_shard(shard))
        assert first[-1].key == SHARD_KEY and "read error" in first[-1].error
        assert reader.retryable(first[-1])
        again = list(iter_shard(shard))  # what the driver's retry reads
        assert [r.key for r in again] == [str(i) for i in range(6)] and all(r.ok for r in again)
    finally:
        server.shutdown()
