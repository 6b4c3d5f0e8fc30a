"""Safe reading of WebDataset tar shards.

Two promises from DESIGN.md shape this module:

* Security: a shard is untrusted input. Only images (a short list of PIL
  formats), text and json are ever decoded; pickles (``.pyd``, ``.pickle``,
  ``.pth``, ...) are carried as raw bytes and never loaded. Decoded pixels,
  image aspect ratios, member sizes and a sample's total size are capped
  (decompression bombs, tar bombs, thin strips that the model's resize would
  blow up). Members are read into memory, never extracted to disk, so member
  names cannot escape anywhere.
* Nothing is lost: every sample becomes a row, with ``error`` set when it
  cannot be used, and a shard that cannot be read (missing, not a tar,
  truncated, corrupt) yields the samples before the damage plus one
  ``__shard__`` row saying why. Every string in a row is valid UTF-8 (the
  score table is Parquet): bytes of a member name that are not UTF-8 are shown
  as ``\\xNN``.

Grouping follows WebDataset: member ``dir/abc.def.jpg`` has key ``dir/abc``
and extension ``def.jpg``; members of one sample are contiguous. Only
directories and WebDataset's metadata members (``__key__``, ``__meta__/...``)
are skipped; a leading ``./`` (``tar -cf shard.tar .``) is not part of a key.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import re
import sys
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from pipeline.data.sample import Sample

__all__ = [
    "MAX_ASPECT_RATIO",
    "MAX_IMAGE_PIXELS",
    "MAX_MEMBER_BYTES",
    "RETRYABLE_KINDS",
    "SHARD_KEY",
    "shard_row_uid",
    "ShardReadError",
    "count_samples",
    "iter_raw",
    "iter_shard",
    "sample_uid",
]

SHARD_KEY = "__shard__"

# Caps on untrusted input; each is an iter_shard keyword of the same name, lower-cased.
# Decoded pixels (width x height), checked from the image header before decoding.
MAX_IMAGE_PIXELS = 64_000_000
# Longer side / shorter side. open_clip's eval transform scales the *shorter*
# side to the model size, so a 1 x N strip becomes 224 x 224N pixels before
# the crop: the pixel cap alone does not bound that.
MAX_ASPECT_RATIO = 100
# Bytes of one tar member. Checked from the member header, before reading:
# a small gzipped shard can hold a member of gigabytes of zeros.
MAX_MEMBER_BYTES = 256 * 2**20
# A sample's members together, as a multiple of the member cap: one key may have
# any number of members, each under the cap (a tar bomb of many extensions).
SAMPLE_BYTES_PER_MEMBER_CAP = 2

# PIL formats we are willing to parse, whatever a member's extension says.
# Deliberately short: e.g. EPS would run Ghostscript, and rarely used
# formats are where decoder bugs live.
SAFE_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

_UID = re.compile(r"[0-9a-fA-F]{32}")
# PIL puts the BytesIO repr (with a memory address) in some messages; drop it
# so error strings are deterministic and groupable in the report.
_OBJ_REPR = re.compile(r" ?<[^<>]* at 0x[0-9a-fA-F]+>")
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
# WebDataset's metadata members (tariterators.tar_file_iterator's skip_meta):
# top-level "__name__" entries and whatever lies in a top-level "__name__/".
_WDS_META = re.compile(r"__[^/]*__($|/)")
# 16- and 32-bit grayscale: convert("RGB") clips them to 0..255, i.e. mostly white.
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# Read what follows the end-of-archive marker in chunks of this size.
_CHUNK = 1 << 20


def sample_uid(meta: dict[str, Any], shard_url: str, key: str) -> str:
    """The stable uid of a sample (DESIGN.md, score table).

    The img2dataset/DataComp ``uid`` from the sample's json when it is a string
    of exactly 32 hex digits (lowercased), else the md5 of ``"{url}\\0{key}"``,
    so a pool without uids still gets uids that are stable across runs.
    """
    return json_uid(meta) or _md5(f"{shard_url}\0{key}")


def json_uid(meta: Any) -> str | None:
    """The sample json's DataComp/img2dataset ``uid`` (32 hex digits, lowercased), if it has one."""
    uid = meta.get("uid") if isinstance(meta, dict) else None
    return uid.lower() if isinstance(uid, str) and _UID.fullmatch(uid) else None


def escape_utf8(text: str) -> str:
    """``text`` made encodable as UTF-8: bytes that were not UTF-8 appear as ``\\xNN``.

    tarfile (and os.listdir) turn such bytes into lone surrogates
    (surrogateescape), which pyarrow refuses to write. Any other lone
    surrogate (e.g. from a json ``"\\ud800"``) is shown as ``\\udNNN``.
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def _md5(text: str) -> str:
    # surrogateescape: tar member names that are not valid UTF-8 arrive as
    # lone surrogates and must still hash (identically to .encode() otherwise).
    return hashlib.md5(text.encode("utf-8", "surrogateescape")).hexdigest()


def shard_row_uid(url: str) -> str:
    """The uid of a shard's ``__shard__`` row: a tar name holds no NUL, so no sample's
    hashed uid (URL, NUL, key) is this one, not even a sample keyed ``__shard__``."""
    return _md5(f"{url}\0\0{SHARD_KEY}")


class ShardReadError(Exception):
    """A shard could not be read to its end.

    ``kind`` is a short category ("cannot open", "not a tar file", "truncated
    tar", "corrupt tar", "read error", "reader error"), ``detail`` the underlying reason and
    ``groups`` how many complete sample groups were delivered before it.
    """

    def __init__(self, kind: str, detail: str, groups: int = 0) -> None:
        self.kind = kind
        self.detail = detail
        self.groups = groups
        # The group being read when the damage hit, if any (see _read_groups).
        self.incomplete: _Group | None = None
        self.incomplete_reason = ""
        super().__init__(f"{kind}: {detail}")


@dataclass
class _Group:
    """The members of one sample as read from the tar, raw."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes
    names: list[str] = field(default_factory=list)  # member names, in tar order
    duplicate_members: list[str] = field(default_factory=list)
    duplicate_key: bool = False
    # Members that were there but not read (links, over the size cap): why,
    # and their extensions, so the sample is not also called "missing" them.
    problems: list[str] = field(default_factory=list)
    refused: set[str] = field(default_factory=set)
    # Yielded complete, but the shard broke right after its last member, so
    # members that would have followed may be missing.
    before_damage: bool = False
    size: int = 0  # bytes of the members read


class _WatchedTarInfo(tarfile.TarInfo):
    """Remembers why tarfile stopped reading headers.

    In stream mode tarfile ends iteration *silently* on a missing
    end-of-archive marker (a tar cut at a member boundary), on a truncated
    header and on an invalid header after the first: it returns None as if
    the archive were complete. Recording the header error lets us tell a clean
    end from damage.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as exc:
            tarfile_.last_header_error = exc
            raise


class _WatchedTarFile(tarfile.TarFile):
    tarinfo = _WatchedTarInfo
    last_header_error: Exception | None = None


def normal_name(raw: str) -> str:
    """A member name (or key) as rows show it: valid UTF-8, without a leading ``./``.

    Idempotent, so a key already in a score table maps to the key the reader
    gives today (tables scored before the ``./`` rule still hold it).
    """
    name = escape_utf8(raw)
    while name.startswith("./"):  # tar -cf shard.tar . ; "./000.png" is sample "000"
        name = name[2:]
    return name


def _split_name(name: str) -> tuple[str, str] | None:
    """WebDataset key/extension split, or None for members WebDataset skips too.

    The key runs to the first dot of the base name. Skipped, as WebDataset
    skips them: its metadata members (``__key__``, ``__meta__/...``) and base
    names starting with a dot, which its key pattern cannot match. Those are
    hidden files, such as the ``._000.png`` AppleDouble companions macOS tar
    writes before every member: as samples they would split every real one.
    """
    if ("/" not in name and name.startswith("__") and name.endswith("__")) or _WDS_META.match(name):
        return None
    dirname, _, base = name.rpartition("/")
    if not base or base.startswith("."):
        return None
    stem, _, ext = base.partition(".")
    key = f"{dirname}/{stem}" if dirname else stem
    return key, ext.lower()


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym() or member.islnk():
        return "link"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "fifo"
    return f"type {member.type.decode('ascii', 'backslashreplace')}"


def _describe(exc: BaseException) -> str:
    msg = _OBJ_REPR.sub("", str(exc)).strip()
    return msg or type(exc).__name__


def _end_state(tar: _WatchedTarFile) -> None:
    """Raise ShardReadError unless the archive ended with a proper end marker."""
    err = tar.last_header_error
    if isinstance(err, tarfile.EOFHeaderError):
        # A zero block. Make sure it is the real end and not a zeroed-out
        # region in the middle of the file with samples after it.
        while True:
            chunk = tar.fileobj.read(_CHUNK)
            if not chunk:
                return
            if chunk.count(0) != len(chunk):
                raise ShardReadError("corrupt tar", "non-zero data after the end-of-archive marker")
    if isinstance(err, tarfile.EmptyHeaderError) or err is None:
        raise ShardReadError("truncated tar", "no end-of-archive marker")
    if isinstance(err, tarfile.TruncatedHeaderError):
        raise ShardReadError("truncated tar", f"truncated header ({_describe(err)})")
    raise ShardReadError("corrupt tar", f"bad member header ({_describe(err)})")


class _Head:
    """A stream with its first bytes read ahead (to see its compression), given back first."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.head = f.read(6)
        self.failed = False  # whether reading the file itself raised: an I/O error

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n is None or n < 0:
                out, self.head = self.head + self._read(-1), b""
                return out
            out, self.head = self.head[:n], self.head[n:]
            return out
        return self._read(n)

    def _read(self, n: int) -> bytes:
        try:
            return self.f.read(n)
        except BaseException:
            self.failed = True
            raise


class _Decompressed:
    """A compressed shard, decompressed whole: every gzip member or bzip2 stream (tarfile's
    stream mode reads only the first), with gzip's CRC and length checked (it checks none).

    Damage in the compressed data is a corrupt tar; an error reading the file stays one.
    """

    def __init__(self, raw: _Head, kind: str) -> None:
        self.raw, self.kind = raw, kind
        opener = {"gzip": gzip.GzipFile, "bzip2": bz2.BZ2File, "xz": lzma.LZMAFile}[kind]
        self.dec = opener(fileobj=raw, mode="rb") if kind == "gzip" else opener(raw, mode="rb")
        self.pending: BaseException | None = None  # the damage, after the bytes before it

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes, fewer only at the end or before damage.

        A shard cut short or damaged yields the bytes decompressed before the damage first,
        then the error: the decompressors' ``read(n)`` raised and dropped up to ``n`` bytes
        (tarfile asks for 10 KiB), losing complete samples an uncompressed shard keeps.
        """
        if self.pending is not None:
            raise self.pending
        if n is None or n < 0:
            return self._read(self.dec.read)
        parts, got = [], 0
        while got < n:
            try:
                part = self._read(self.dec.read1, n - got)
            except (EOFError, tarfile.TarError, OSError) as exc:
                if not parts:
                    raise
                self.pending = exc
                break
            if not part:
                break
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    def _read(self, read: Callable[..., bytes], *n: int) -> bytes:
        try:
            return read(*n)
        except (EOFError, tarfile.TarError):
            raise
        except (zlib.error, lzma.LZMAError, OSError) as exc:
            if self.raw.failed:
                raise  # the file, not its content
            raise tarfile.ReadError(f"bad {self.kind} data ({_describe(exc)})") from exc

    def close(self) -> None:
        self.dec.close()


def _decompressed(f: Any) -> Any:
    """``f`` as a plain tar stream: gzip, bzip2 and xz shards decompressed."""
    raw = _Head(f)
    if raw.head[:2] == b"\x1f\x8b":
        return _Decompressed(raw, "gzip")
    if raw.head[:3] == b"BZh":
        return _Decompressed(raw, "bzip2")
    if raw.head[:6] == b"\xfd7zXZ\x00":
        return _Decompressed(raw, "xz")
    return raw


def _as_shard_error(exc: Exception) -> ShardReadError:
    if isinstance(exc, ShardReadError):
        return exc
    if isinstance(exc, EOFError) or (
        isinstance(exc, tarfile.ReadError) and "end of data" in str(exc)
    ):
        return ShardReadError("truncated tar", _describe(exc))
    if isinstance(exc, tarfile.TarError):
        return ShardReadError("corrupt tar", _describe(exc))
    return _io_error(exc)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The exception types of the network clients fsspec's stores use.

    A dropped connection or a timeout is worth another try, but these are not
    all OSError: aiohttp's (HTTP and, once s3fs's own retries are spent, S3),
    botocore's and urllib3's. Imported only if already loaded: a store that
    raised one has imported its client.
    """
    found: list[type[BaseException]] = []
    for module, names in (
        ("aiohttp", ("ClientError",)),
        ("botocore.exceptions", ("HTTPClientError", "ConnectionError")),
        ("urllib3.exceptions", ("HTTPError",)),
    ):
        mod = sys.modules.get(module)
        found += [getattr(mod, n) for n in names if mod is not None and hasattr(mod, n)]
    return tuple(found)


def _is_transport_error(exc: BaseException) -> bool:
    transport = (OSError, *_transport_errors())
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:  # a wrapped error keeps its cause
        if isinstance(e, transport):
            return True
        seen.add(id(e))
        e = e.__cause__
    return False


def _io_error(exc: Exception) -> ShardReadError:
    """An I/O failure ("read error", worth another try: see :func:`retryable`), or
    anything else ("reader error": a bug or bad input, which a retry would meet again)."""
    kind = "read error" if _is_transport_error(exc) else "reader error"
    return ShardReadError(kind, f"{type(exc).__name__}: {_describe(exc)}")


def _read_groups(url: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[_Group]:
    """Stream the sample groups of a shard, raw.

    On damage, complete groups before it are yielded, then ShardReadError is
    raised, with the group that was cut short attached as ``incomplete`` (it
    is never yielded). Cut short means: the damage hit one of its members'
    data, or it hit the next header and the group lacks an extension the
    previous group had (img2dataset's json comes last; losing it would
    silently change the uid), or, in the first group, lacks a json. Otherwise the pending group is yielded: it is
    as complete as anything can tell, and a completely read sample is never
    lost.

    Members over ``max_member_bytes``, members that would bring their sample
    over ``SAMPLE_BYTES_PER_MEMBER_CAP`` times that, links and other
    non-regular members are not read: they are recorded in the group's
    ``problems``.
    """
    delivered = 0
    current: _Group | None = None
    prev_exts: set[str] | None = None  # extensions of the last complete group
    seen: set[str] = set()
    try:
        opener = fsspec.open(url, "rb")
        f = opener.open()
    except Exception as exc:
        raise ShardReadError("cannot open", f"{type(exc).__name__}: {_describe(exc)}") from exc
    try:
        try:
            # UTF-8 whatever the locale: names that are not UTF-8 arrive as lone
            # surrogates (escaped by normal_name), never as mojibake.
            tar = _WatchedTarFile.open(
                fileobj=_decompressed(f), mode="r|", encoding="utf-8", errors="surrogateescape"
            )
        except EOFError as exc:  # a compressed shard cut short before its first header
            raise ShardReadError("truncated tar", _describe(exc)) from exc
        except tarfile.TarError as exc:
            raise ShardReadError("not a tar file", _describe(exc)) from exc
        except Exception as exc:
            raise _io_error(exc) from exc

        with tar:
            while True:
                member_name: str | None = None
                try:
                    member = tar.next()
                    if member is None:
                        _end_state(tar)
                        break
                    # Stream mode keeps every TarInfo; shards can hold
                    # tens of thousands and we never look back.
                    tar.members.clear()
                    if member.isdir():
                        continue  # as WebDataset: directories are not sample data
                    name = normal_name(member.name)
                    split = _split_name(name)
                    if split is None:
                        _skip_data(tar, member)
                        continue
                    key, ext = split
                    if current is None or key != current.key:
                        if current is not None:
                            prev_exts = set(current.members) | current.refused
                            yield current
                            delivered += 1
                        current = _Group(key=key, duplicate_key=key in seen)
                        seen.add(key)
                    current.names.append(name)
                    member_name = name
                    if not member.isreg():
                        # No data to read (a link's target may not even be in
                        # this shard); reading it as empty would say "missing".
                        current.problems.append(
                            f"{_member_kind(member)} member not supported: {name}"
                        )
                        current.refused.add(ext)
                        _skip_data(tar, member)
                        continue
                    if member.size > max_member_bytes:
                        current.problems.append(
                            f"member too large: {name} ({member.size} bytes, "
                            f"cap {max_member_bytes})"
                        )
                        current.refused.add(ext)
                        _skip_data(tar, member)
                        continue
                    sample_cap = SAMPLE_BYTES_PER_MEMBER_CAP * max_member_bytes
                    if current.size + member.size > sample_cap:
                        current.problems.append(
                            f"sample too large: {name} would bring its members to "
                            f"{current.size + member.size} bytes (cap {sample_cap})"
                        )
                        current.refused.add(ext)
                        _skip_data(tar, member)
                        continue
                    current.size += member.size
                    handle = tar.extractfile(member)
                    # The size the header says (already under the cap): asking for the
                    # cap itself made the buffered reader reserve it for every member.
                    data = handle.read(member.size) if handle is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError("unexpected end of data")
                except Exception as exc:
                    err = _as_shard_error(exc)
                    err.groups = delivered
                    if member_name is not None:
                        # The damage hit this member's data: its group is incomplete.
                        err.incomplete = current
                        err.incomplete_reason = f"shard damaged while reading {member_name}"
                    elif current is not None:
                        # The damage hit a header: the pending group's members
                        # were all read, but more of them may have followed.
                        # The previous sample's members are the evidence.
                        missing = (prev_exts or set()) - set(current.members) - current.refused
                        if prev_exts is None and "json" not in current.members:
                            # The first sample: no earlier one tells whether a
                            # json (and with it the uid) was to follow.
                            err.incomplete = current
                            err.incomplete_reason = (
                                f"shard damaged after its {', '.join(sorted(current.members))} "
                                "member(s), in the first sample (a json with its uid may "
                                "have followed)"
                            )
                        elif missing:
                            err.incomplete = current
                            err.incomplete_reason = (
                                f"shard damaged after its {', '.join(sorted(current.members))} "
                                f"member(s), before {', '.join(sorted(missing))}"
                            )
                        else:
                            current.before_damage = True
                            yield current
                            err.groups += 1
                    if err is exc:
                        raise
                    raise err from exc
                if ext in current.members:
                    current.duplicate_members.append(member_name)
                else:
                    current.members[ext] = data
            if current is not None:
                yield current
    finally:
        f.close()


def _skip_data(tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
    """Read past the data of a member that is not kept, stopping at the end of the file.

    tarfile's own skip (in ``tar.next()``) reads in stream mode one block per
    512 bytes the header claims, past the end of the file too: a 1.5 KB
    shard whose header claims 1 TiB took minutes. Members that carry no data
    (links, directories) read nothing. Nothing is kept.
    """
    # tar.offset: where tarfile will look for the next header (past this
    # member's data and padding, if any); the stream stands at the data.
    left = tar.offset - tar.fileobj.tell()
    while left > 0:
        chunk = tar.fileobj.read(min(left, _CHUNK))
        if not chunk:
            raise tarfile.ReadError("unexpected end of data")
        left -= len(chunk)


def iter_raw(
    url: str, *, max_member_bytes: int = MAX_MEMBER_BYTES
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {extension: bytes})`` for every sample group, decoding nothing.

    For resharding: every member of a sample is kept byte for byte (pickles
    included, unopened). Groups and keys are the ones :func:`iter_shard` makes
    rows of, including error ones (a duplicated key is yielded again; a member
    without extension appears under ``""``; links and members over
    ``max_member_bytes`` or beyond the sample cap are left out, as their rows
    are errors). Raises
    :class:`ShardReadError` on shard damage, after yielding the complete
    groups before it.
    """
    for group in _read_groups(url, max_member_bytes):
        yield group.key, group.members


def count_samples(url: str, *, max_member_bytes: int = MAX_MEMBER_BYTES) -> int:
    """Number of sample groups (rows) in an undamaged shard; raises ShardReadError otherwise."""
    return sum(1 for _ in iter_raw(url, max_member_bytes=max_member_bytes))


def _dotted(members: dict[str, bytes], keys: tuple[str, ...]) -> str:
    """Why a member named like an expected one was not taken: a dot in its key (review)."""
    found = next((e for e in members if any(e.endswith(f".{k}") for k in keys)), None)
    if found is None:
        return ""
    return f"; found extension {found}: WebDataset's key ends at the first dot of a name"


def _to_8bit(im: Image.Image) -> Image.Image:
    """A 16/32-bit grayscale image ("I;16*", "I", "F") as 8-bit "L", tones kept.

    PIL's convert() clips these to 0..255, which turns most of a 16-bit image
    white. Ranges: "I;16*" are 0..65535 (the top byte is kept); "I" (32-bit
    int, what 16-bit PNGs decode to in some PIL versions) is read as that same
    16-bit range, clipped to it; "F" (float) follows PIL's own F-to-L
    convention of 0..255, clipped, rounded, NaN as 0.
    """
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        out = a >> 8
    elif im.mode == "I":
        out = np.clip(a, 0, 65535) >> 8
    else:
        out = np.rint(np.clip(np.nan_to_num(a, nan=0.0), 0, 255))
    return Image.fromarray(np.ascontiguousarray(out, dtype=np.uint8))


def _decode_image(
    data: bytes,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
) -> tuple[Image.Image | None, str | None]:
    """Decode to RGB with pixel count and aspect ratio checked from the header, before decoding."""
    try:
        with warnings.catch_warnings():
            # PIL's own bomb warning fires at its global limit; our cap
            # (checked below, before load) is the one that decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # e.g. "Palette images with Transparency expressed in bytes ..."
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(BytesIO(data), formats=SAFE_IMAGE_FORMATS) as im:
                width, height = im.size
                if width * height > max_image_pixels:
                    return None, (
                        f"image too large: {width}x{height} pixels (cap {max_image_pixels})"
                    )
                if max(width, height) > max_aspect_ratio * min(width, height):
                    return None, (
                        f"image too thin: {width}x{height} pixels "
                        f"(aspect ratio cap {max_aspect_ratio:g}:1)"
                    )
                im.load()
                if im.mode in _HIGH_DEPTH_MODES:
                    rgb = _to_8bit(im).convert("RGB")
                elif im.mode == "P":
                    # Palette transparency is only handled correctly via RGBA.
                    rgb = im.convert("RGBA").convert("RGB")
                else:
                    rgb = im.convert("RGB")
        return rgb, None
    except Image.DecompressionBombError as exc:
        # PIL refused in open(), before we could see the size.
        match = _BOMB_PIXELS.search(str(exc))
        size = f"{match.group(1)} pixels" if match else _describe(exc)
        return None, f"image too large: {size} (cap {max_image_pixels})"
    except Exception as exc:  # any decoder failure is the sample's problem, not ours
        return None, f"undecodable image: {_describe(exc)}"


def _decode_group(
    group: _Group,
    url: str,
    index: int,
    *,
    image_keys: tuple[str, ...],
    text_keys: tuple[str, ...],
    max_image_pixels: int,
    max_aspect_ratio: float,
    decode_images: bool,
) -> Sample:
    errors: list[str] = []
    members = group.members
    if group.duplicate_key:
        errors.append(f"duplicate key {group.key} in shard")
    for name in group.duplicate_members:
        errors.append(f"duplicate member {name} in sample")
    errors.extend(group.problems)
    # A member name that is not UTF-8 leaves the row ok: the name is only an
    # identifier, its escaped form (``\xNN`` in ``key``) is stable and the same
    # in iter_raw (resharding), and the image and caption are usable.

    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            parsed = json.loads(members["json"])
        except (ValueError, RecursionError) as exc:
            errors.append(f"invalid json: {_describe(exc)}")
        else:
            if isinstance(parsed, dict):
                meta = parsed
            else:
                errors.append(f"invalid json: expected an object, got {type(parsed).__name__}")
    uid = sample_uid(meta, url, group.key)

    if set(members) == {""}:
        # e.g. a stray "README" member: WebDataset would skip it silently.
        errors.append(f"member {group.names[0]} has no extension (not part of a sample)")
        return Sample(
            uid=uid,
            key=group.key,
            shard=url,
            index=index,
            meta=meta,
            error="; ".join(errors),
        )

    image = None
    image_ext = next((k for k in image_keys if k in members), None)
    if image_ext is None:
        if not group.refused.intersection(image_keys):  # else a problem above says why
            errors.append(
                f"missing image (expected one of {', '.join(image_keys)}"
                f"{_dotted(members, image_keys)})"
            )
    elif decode_images:
        image, problem = _decode_image(members[image_ext], max_image_pixels, max_aspect_ratio)
        if problem:
            errors.append(problem)

    caption = None
    text_ext = next((k for k in text_keys if k in members), None)
    if text_ext is None:
        if not group.refused.intersection(text_keys):
            errors.append(f"missing caption ({', '.join(text_keys)}{_dotted(members, text_keys)})")
    else:
        try:
            # utf-8-sig: strict UTF-8 that also drops a leading byte-order mark.
            caption = members[text_ext].decode("utf-8-sig").strip()
        except UnicodeDecodeError as exc:
            errors.append(f"caption is not UTF-8: {_describe(exc)}")
        else:
            if not caption:
                errors.append("empty caption")

    if errors and group.before_damage:
        errors.append("the shard is damaged right after this sample")
    return Sample(
        uid=uid,
        key=group.key,
        shard=url,
        index=index,
        image=image,
        caption=caption,
        meta=meta,
        error="; ".join(errors) or None,
    )


# Shard failures a second try may not meet (a connection reset, a store briefly
# unavailable), unlike a file that is not a tar or is cut short.
RETRYABLE_KINDS = ("cannot open", "read error")


def retryable(sample: Sample) -> bool:
    """Whether ``sample`` is the ``__shard__`` row of a failure worth another try."""
    return sample.whole_shard and any(
        (sample.error or "").startswith(f"unreadable shard: {kind}") for kind in RETRYABLE_KINDS
    )


def _shard_row(url: str, index: int, exc: ShardReadError, samples: int) -> Sample:
    if exc.kind in ("cannot open", "not a tar file"):
        reason = f"unreadable shard: {exc.kind}: {exc.detail}"
    else:
        reason = f"unreadable shard: {exc.kind} after {samples} samples: {exc.detail}"
    return Sample(
        uid=shard_row_uid(url),
        key=SHARD_KEY,
        shard=url,
        index=index,
        error=reason,
        whole_shard=True,
    )


def iter_shard(
    url: str,
    *,
    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp"),
    text_keys: tuple[str, ...] = ("txt",),
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    decode_images: bool = True,
    transform: Callable[[Image.Image], Any] | None = None,
) -> Iterator[Sample]:
    """Yield one :class:`Sample` per sample of a shard, error rows included.

    Never raises for bad data or a bad shard. A sample that cannot be used has
    ``error`` set (image/caption ``None`` where not decodable). If the shard
    itself is damaged, the samples read before the damage come first, then
    the interrupted sample (if any) as an error row, then one row with key
    ``"__shard__"`` (index: the next position) and error ``"unreadable shard:
    ..."``. ``decode_images=False`` only checks that an image member is
    present (for counting). The caps (see the module constants) make error
    rows: images over ``max_image_pixels`` pixels or longer than
    ``max_aspect_ratio`` times their width (or the reverse), members over
    ``max_member_bytes`` bytes and members beyond twice that per sample
    (never read). Every string in a row is valid
    UTF-8.

    ``transform`` (a model's eval transform) replaces each ok row's image by
    what it returns, as the row is read: a batch then holds what the model
    takes, not full-resolution pixels (the pixel cap bounds one image, not a
    batch of them). A sample it refuses is an error row (``preprocess error``).
    """
    shown = escape_utf8(url)
    if shown != url:
        # Later stages reopen a shard by the name in its rows (resharding,
        # thumbnails), and the escaped name would not open: refuse it whole.
        yield Sample(
            uid=shard_row_uid(shown),
            key=SHARD_KEY,
            shard=shown,
            index=0,
            error="unreadable shard: shard path is not UTF-8 (shown escaped; rename the file)",
            whole_shard=True,
        )
        return
    opts = dict(
        image_keys=tuple(image_keys),
        text_keys=tuple(text_keys),
        max_image_pixels=max_image_pixels,
        max_aspect_ratio=max_aspect_ratio,
        decode_images=decode_images,
    )
    for sample in _rows(url, max_member_bytes, opts):
        yield _encodable(_transformed(sample, transform))


def _transformed(sample: Sample, transform: Callable[[Image.Image], Any] | None) -> Sample:
    if transform is not None and sample.ok and sample.image is not None:
        try:
            sample.image = transform(sample.image)
        except Exception as exc:
            sample.image = None
            sample.error = preprocess_error(exc)
    return sample


def preprocess_error(exc: BaseException) -> str:
    """The error of a row the model's transforms refused (one wording wherever it happens)."""
    return f"preprocess error: {type(exc).__name__}: {_describe(exc)}"


def _encodable(sample: Sample) -> Sample:
    """Escape what is not UTF-8 in the row's strings (exception texts may quote raw names)."""
    sample.key = escape_utf8(sample.key)  # already escaped by _read_groups; iter_raw agrees
    for name in ("error", "caption"):
        value = getattr(sample, name)
        if value is not None:
            setattr(sample, name, escape_utf8(value))
    return sample


def _rows(url: str, max_member_bytes: int, opts: dict[str, Any]) -> Iterator[Sample]:
    index = 0
    groups = _read_groups(url, max_member_bytes)
    while True:
        try:
            group = next(groups)
        except StopIteration:
            return
        except ShardReadError as exc:
            complete = index
            if exc.incomplete is not None:
                yield _incomplete_row(exc, url, index, opts)
                index += 1
            yield _shard_row(url, index, exc, complete)
            return
        except Exception as exc:  # defensive: a reader bug must not kill a run
            yield _shard_row(url, index, _io_error(exc), index)
            return
        try:
            sample = _decode_group(group, url, index, **opts)
        except Exception as exc:  # defensive: never crash on one sample
            sample = Sample(
                uid=_md5(f"{url}\0{group.key}"),
                key=group.key,
                shard=url,
                index=index,
                error=f"undecodable sample: {type(exc).__name__}: {_describe(exc)}",
            )
        yield sample
        index += 1


def _incomplete_row(exc: ShardReadError, url: str, index: int, opts: dict[str, Any]) -> Sample:
    group = exc.incomplete
    assert group is not None
    reason = f"incomplete sample: {exc.incomplete_reason}"
    try:
        # Members read in full (e.g. its json, for the uid) are still used,
        # but no pixels are decoded for a sample that is an error anyway.
        sample = _decode_group(group, url, index, **{**opts, "decode_images": False})
        sample.image = None
        sample.error = reason
    except Exception:  # pragma: no cover - defensive
        sample = Sample(
            uid=_md5(f"{url}\0{group.key}"), key=group.key, shard=url, index=index, error=reason
        )
    return sample
