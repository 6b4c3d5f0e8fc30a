"""Fixtures that build tiny WebDataset tars with tarfile and PIL, in tmp_path.

Tests describe a shard as a list of (member name, bytes) pairs so that every
kind of damage (wrong order, duplicates, junk members, cut bytes) is easy to
write down; ``sample_members`` gives the usual jpg/txt/json triple.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

Member = tuple[str, bytes]


def encode_image(fmt: str = "JPEG", size: tuple[int, int] = (8, 6), color=(200, 30, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG declaring width x height pixels, built without
    ever allocating its pixels: rows of zeros compress to almost nothing."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    idat = b"".join(parts)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def sample_members(
    key: str,
    *,
    image: bytes | None = None,
    image_ext: str = "jpg",
    caption: str | bytes | None = "a photo",
    meta: dict[str, Any] | bytes | None = None,
) -> list[Member]:
    """Members of one sample in img2dataset order; ``image=None`` means a small JPEG."""
    out: list[Member] = [(f"{key}.{image_ext}", image if image is not None else encode_image())]
    if caption is not None:
        out.append((f"{key}.txt", caption.encode() if isinstance(caption, str) else caption))
    if meta is not None:
        out.append((f"{key}.json", meta if isinstance(meta, bytes) else json.dumps(meta).encode()))
    return out


def write_tar(fileobj: Any, members: Iterable[Member | tarfile.TarInfo]) -> None:
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):  # directories, symlinks, ...
                tar.addfile(m)
                continue
            name, data = m
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))


def tar_bytes(members: Iterable[Member | tarfile.TarInfo]) -> bytes:
    buf = io.BytesIO()
    write_tar(buf, members)
    return buf.getvalue()


@pytest.fixture
def make_tar(tmp_path: Path) -> Callable[..., str]:
    """make_tar(members, name="00000.tar", subdir="") -> path of the written shard."""

    def _make(
        members: Iterable[Member | tarfile.TarInfo], name: str = "00000.tar", subdir=""
    ) -> str:
        directory = tmp_path / subdir
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / name
        path.write_bytes(tar_bytes(members))
        return str(path)

    return _make


@pytest.fixture
def good_members() -> list[Member]:
    """Three good samples: jpg with a DataComp uid, png without json, webp with a non-uid json."""
    return [
        *sample_members(
            "000000000",
            caption="  a red square \n",
            meta={"uid": "0123456789ABCDEF0123456789abcdef"},
        ),
        *sample_members(
            "000000001", image=encode_image("PNG", (5, 7)), image_ext="png", caption="png one"
        ),
        *sample_members(
            "000000002",
            image=encode_image("WEBP", (9, 4)),
            image_ext="webp",
            caption="webp one",
            meta={"uid": "not-a-uid", "url": "http://x"},
        ),
    ]


@pytest.fixture
def memfs():
    """fsspec's in-memory filesystem, emptied before and after the test."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")
    yield fs
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")


# Plain helpers, handed to tests as fixtures (tests/ is not a package).
@pytest.fixture
def helpers():
    class _H:
        encode_image = staticmethod(encode_image)
        png_bomb = staticmethod(png_bomb)
        sample_members = staticmethod(sample_members)
        tar_bytes = staticmethod(tar_bytes)

    return _H
