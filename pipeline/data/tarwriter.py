"""Writing WebDataset tar shards: the generated pool and the pruned manifest.

Both the dataset generator and the pruning stage (resharding the kept
samples) need the same thing: samples streamed into contiguous, zero-padded
``{00000..0NNNN}.tar`` files plus a ``sizes.json`` that open_clip's loader reads
to learn the sample count. The bytes of a shard depend only on what was
written (no clocks, no user names), so a rerun with the same inputs yields the
same files and hashes of shards are meaningful.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import tarfile
from collections.abc import Mapping
from types import TracebackType
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["ShardWriter", "brace_pattern", "shard_name"]

# GNU format: no PAX headers (which would carry per-file metadata) and long
# member names still work; fixed so the bytes never depend on Python's default.
_TAR_FORMAT = tarfile.GNU_FORMAT


def shard_name(index: int, digits: int = 5) -> str:
    """The file name of shard ``index``, zero-padded so a brace pattern covers a run."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"{index:0{digits}d}.tar"


def brace_pattern(out_dir: str, first: int, last: int, digits: int = 5) -> str:
    """The ``--train-data`` pattern open_clip / webdataset expand to shards first..last.

    A single shard gets its plain name: braces around one value are not
    expanded by every tool.
    """
    if first < 0 or last < first:
        raise ValueError(f"need 0 <= first <= last, got first={first}, last={last}")
    base = out_dir.rstrip("/")
    if first == last:
        return f"{base}/{shard_name(first, digits)}"
    return f"{base}/{{{first:0{digits}d}..{last:0{digits}d}}}.tar"


def _check_key(key: str) -> None:
    # WebDataset splits a member name at the first dot into key and extension,
    # and a slash would put the member in a directory: both corrupt grouping.
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample key must be a non-empty string, got {key!r}")
    if "." in key or "/" in key:
        raise ValueError(f"sample key must not contain '.' or '/': {key!r}")


def _check_ext(key: str, ext: str) -> None:
    if not isinstance(ext, str) or not ext or "/" in ext or ext.startswith("."):
        raise ValueError(f"bad member extension {ext!r} for key {key!r}")


class ShardWriter:
    """Streams samples into ``NNNNN.tar`` shards of at most ``shard_size`` samples.

    ``out_dir`` is a local path or any fsspec URL. Local shards are written to a
    temporary name and renamed, so a reader never sees half a shard; object
    stores already publish a whole object on close, so there the final name is
    written directly. ``close()`` (or leaving the ``with`` block normally)
    finishes the last shard and writes ``sizes.json``; leaving it with an
    exception discards the unfinished shard and writes no ``sizes.json``, so a
    failed run is not mistaken for a complete one.
    """

    def __init__(self, out_dir: str, shard_size: int, start_index: int = 0, digits: int = 5):
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        if digits < 1:
            raise ValueError(f"digits must be >= 1, got {digits}")
        self.out_dir = out_dir
        self.shard_size = shard_size
        self.digits = digits
        self._fs, self._root = fsspec.core.url_to_fs(out_dir)
        self._root = self._root.rstrip("/") or "/"
        self._local = isinstance(self._fs, LocalFileSystem)
        self._fs.makedirs(self._root, exist_ok=True)
        self._next_index = start_index
        self._shards: list[str] = []
        self._sizes: dict[str, int] = {}
        self._count = 0
        # The shard being written: its name, file, tar and sample count.
        self._name: str | None = None
        self._tmp_path: str | None = None
        self._file: IO[bytes] | None = None
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0
        self._keys: set[str] = set()  # keys in the shard being written
        self._closed = False

    # -- public API -------------------------------------------------------

    @property
    def shards(self) -> list[str]:
        """File names (not paths) of the shards finished so far, in order."""
        return list(self._shards)

    @property
    def sizes(self) -> dict[str, int]:
        """Samples per finished shard, as written to ``sizes.json``."""
        return dict(self._sizes)

    @property
    def count(self) -> int:
        """Samples written so far, including those of the unfinished shard."""
        return self._count

    def path(self, name: str) -> str:
        """Full path (in the writer's filesystem) of a file in ``out_dir``."""
        return f"{self._root}/{name}" if self._root != "/" else f"/{name}"

    def holds(self, key: str) -> bool:
        """Whether the shard being written already has a sample ``key``."""
        return key in self._keys

    def write(self, key: str, members: Mapping[str, bytes]) -> None:
        """Append one sample; members map extension to raw bytes, kept in order."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        _check_key(key)
        if key in self._keys:
            # WebDataset readers would merge the two samples' members or fail.
            raise ValueError(f"sample key {key!r} is already in this shard")
        if not members:
            raise ValueError(f"sample {key!r} has no members")
        for ext, data in members.items():
            _check_ext(key, ext)
            if not isinstance(data, bytes | bytearray | memoryview):
                raise TypeError(f"member {key}.{ext} must be bytes, got {type(data).__name__}")
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        for ext, data in members.items():
            payload = bytes(data)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            info.mtime = 0
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            self._tar.addfile(info, io.BytesIO(payload))
        self._keys.add(key)
        self._in_shard += 1
        self._count += 1
        if self._in_shard >= self.shard_size:
            self._finish_shard()

    def close(self) -> None:
        """Finish the last shard and write ``sizes.json``; calling it again does nothing."""
        if self._closed:
            return
        if self._tar is not None:
            self._finish_shard()
        self._closed = True
        payload = (json.dumps(self._sizes, sort_keys=True, indent=1) + "\n").encode()
        self._write_small("sizes.json", payload)

    def abort(self) -> None:
        """Drop the unfinished shard and write no ``sizes.json`` (finished shards stay)."""
        if self._closed:
            return
        self._closed = True
        tar, f = self._tar, self._file
        self._tar = self._file = None
        try:
            # The tar is dropped without close(): no end-of-archive blocks.
            del tar
            if f is not None:
                discard = getattr(f, "discard", None)
                if callable(discard) and not self._local:
                    discard()  # e.g. s3fs: abandon the multipart upload
                    # s3fs' discard drops the buffer but leaves the file
                    # "open", so its __del__ would try to upload and fail.
                    try:
                        f.closed = True
                    except AttributeError:  # pragma: no cover - other backends
                        pass
                else:
                    f.close()
        finally:
            target = self._tmp_path if self._local else self._final_path()
            if target is not None and self._fs.exists(target):
                self._fs.rm(target)
            self._name = self._tmp_path = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- internals --------------------------------------------------------

    def _final_path(self) -> str | None:
        return None if self._name is None else self.path(self._name)

    def _open_shard(self) -> None:
        self._name = shard_name(self._next_index, self.digits)
        final = self.path(self._name)
        if self._local:
            self._tmp_path = f"{final}.tmp-{secrets.token_hex(6)}"
            self._file = open(self._tmp_path, "wb")  # noqa: SIM115 - closed in _finish_shard
        else:
            self._tmp_path = None
            self._file = self._fs.open(final, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=_TAR_FORMAT)
        self._in_shard = 0
        self._keys = set()

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._file is not None and self._name is not None
        self._tar.close()  # writes the end-of-archive blocks, leaves fileobj open
        if self._local:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            assert self._tmp_path is not None
            os.replace(self._tmp_path, self.path(self._name))
        else:
            self._file.close()
        self._shards.append(self._name)
        self._sizes[self._name] = self._in_shard
        self._next_index += 1
        self._tar = self._file = None
        self._name = self._tmp_path = None
        self._in_shard = 0
        self._keys = set()  # the next shard holds none of these

    def _write_small(self, name: str, payload: bytes) -> None:
        final = self.path(name)
        if self._local:
            tmp = f"{final}.tmp-{secrets.token_hex(6)}"
            with open(tmp, "wb") as f:
                f.write(payload)
            os.replace(tmp, final)
        else:
            with self._fs.open(final, "wb") as f:
                f.write(payload)
