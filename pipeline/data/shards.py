"""Turning a user's shard specification into a list of shard URLs.

Users already know the open_clip / WebDataset spelling of a shard list:
``"/data/{00000..00099}.tar::/more/{00000..00009}.tar"``. We accept exactly
that, plus a directory (all ``*.tar``, ``*.tar.gz``, ``*.tgz`` in it) and ``*``/``?`` globs, on any
fsspec filesystem. Every problem is a :class:`ConfigError` raised before any
work starts, because a typo in a pattern should never turn into a run that
silently scores half of the pool.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import posixpath
import re
from collections import Counter, defaultdict
from typing import Any
from urllib.parse import urlsplit

import fsspec
import fsspec.core
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import known_implementations

from pipeline.errors import ConfigError

__all__ = [
    "expand_pattern",
    "expected_samples",
    "resolve_shards",
    "shard_name",
    "shard_names",
    "shard_stamp",
    "shard_stamps",
    "sidecars",
]

# A pattern like "{0..999999999}" would exhaust memory before anything else
# could complain; no real pool has anywhere near this many shards.
MAX_EXPANDED = 1_000_000

# How many offending entries an error message names before summarising.
_SHOW = 5

_RANGE = re.compile(r"(\d+)\.\.(\d+)")
_GLOB_CHARS = ("*", "?")
# Suffixes that make an entry a shard file without asking the filesystem
# whether it is a directory (one request per shard is slow on object stores).
_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Files that sit beside shards (img2dataset, DataComp, diffin make-data) and are never one:
# given as a shard, each gave a single "not a tar" error row and "0 decodable pairs".
_NOT_SHARDS = (".json", ".parquet", ".npy", ".txt", ".csv", ".md")


def _split_list(pattern: str) -> list[str]:
    """Split on "::" (the WebDataset list separator).

    fsspec uses "::" too, to chain filesystems ("simplecache::s3://b/x.tar").
    A part that is exactly a known fsspec protocol name cannot be a shard, so
    it is re-joined with what follows instead of being treated as a list item.
    """
    parts = pattern.split("::")
    out: list[str] = []
    i = 0
    while i < len(parts):
        part = parts[i]
        while part in known_implementations and i + 1 < len(parts):
            i += 1
            part = f"{part}::{parts[i]}"
        out.append(part)
        i += 1
    return out


def absolute_pattern(pattern: str | None) -> str | None:
    """``pattern`` with each local item made absolute (``~`` expanded), others as given.

    A run records the patterns it was given; later stages (evaluate, report)
    read them again from wherever they run, so a relative path must not be
    recorded as typed. Braces, globs and a trailing ``/`` are kept.
    """
    if pattern is None:
        return None
    items = []
    for item in _split_list(pattern):
        if _is_local_path(item):
            absolute = os.path.abspath(os.path.expanduser(item))
            item = absolute + "/" if item.endswith("/") and absolute != "/" else absolute
        items.append(item)
    return "::".join(items)


def relative_items(pattern: str) -> list[str]:
    """The items of ``pattern`` that are relative local paths (``~`` counts as absolute)."""
    return [
        item
        for item in _split_list(pattern)
        if _is_local_path(item) and not os.path.isabs(os.path.expanduser(item))
    ]


def _is_local_path(item: str) -> bool:
    # A chain ("simplecache::rel/x.tar") is left as given: its last link is not a path.
    return bool(item) and "::" not in item and fsspec.core.split_protocol(item)[0] is None


def _expand_braces(part: str, pattern: str) -> list[str]:
    """Expand every brace group of one list item (cartesian product, leftmost slowest)."""
    pieces: list[list[str]] = []  # alternating literal / alternatives
    pos = 0
    while pos < len(part):
        open_at = part.find("{", pos)
        close_at = part.find("}", pos)
        if open_at == -1:
            if close_at != -1:
                raise ConfigError(
                    f"shard pattern {pattern!r}: unbalanced '}}' at position {close_at} in {part!r}"
                )
            pieces.append([part[pos:]])
            break
        if close_at != -1 and close_at < open_at:
            raise ConfigError(
                f"shard pattern {pattern!r}: unbalanced '}}' at position {close_at} in {part!r}"
            )
        if close_at == -1:
            raise ConfigError(
                f"shard pattern {pattern!r}: unbalanced '{{' at position {open_at} in {part!r}"
            )
        nested = part.find("{", open_at + 1)
        if nested != -1 and nested < close_at:
            raise ConfigError(f"shard pattern {pattern!r}: nested braces are not supported")
        pieces.append([part[pos:open_at]])
        pieces.append(_alternatives(part[open_at + 1 : close_at], pattern))
        pos = close_at + 1

    total = 1
    for alts in pieces:
        total *= len(alts)
    if total > MAX_EXPANDED:
        raise ConfigError(
            f"shard pattern {pattern!r} expands to {total} names (more than {MAX_EXPANDED})"
        )
    return ["".join(combo) for combo in itertools.product(*pieces)]


def _alternatives(body: str, pattern: str) -> list[str]:
    """The alternatives of one brace group body: a numeric range or a comma list."""
    if body == "":
        raise ConfigError(f"shard pattern {pattern!r}: empty braces '{{}}'")
    if ".." in body:
        match = _RANGE.fullmatch(body)
        if match is None:
            raise ConfigError(
                f"shard pattern {pattern!r}: brace range {{{body}}} must be two "
                "non-negative integers like {00000..00099}"
            )
        first, last = match.group(1), match.group(2)
        lo, hi = int(first), int(last)
        if lo > hi:
            raise ConfigError(
                f"shard pattern {pattern!r}: reversed brace range {{{body}}} ({lo} > {hi})"
            )
        if hi - lo + 1 > MAX_EXPANDED:
            raise ConfigError(
                f"shard pattern {pattern!r}: brace range {{{body}}} has more than "
                f"{MAX_EXPANDED} values"
            )
        # braceexpand's rule, so that this lists the very names WebDataset and
        # open_clip will open: a bound with a leading zero pads every value
        # to the wider bound ({8..010} -> 008 009 010); otherwise no padding.
        padded = any(b.startswith("0") and b != "0" for b in (first, last))
        width = max(len(first), len(last)) if padded else 0
        return [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    if "," in body:
        return body.split(",")
    raise ConfigError(
        f"shard pattern {pattern!r}: brace group {{{body}}} is neither a range "
        "{a..b} nor a list {a,b}"
    )


def expand_pattern(pattern: str) -> list[str]:
    """Expand a WebDataset-style shard pattern into names, in order, without any I/O.

    "::" separates list items; each item may hold several brace groups,
    ``{00000..00099}`` (zero padded as braceexpand pads) or ``{a,b,c}``.
    Malformed patterns raise :class:`ConfigError` naming the pattern.
    """
    if not isinstance(pattern, str) or not pattern.strip():
        raise ConfigError(f"shard pattern is empty: {pattern!r}")
    out: list[str] = []
    for part in _split_list(pattern):
        if not part.strip():
            raise ConfigError(f"shard pattern {pattern!r}: empty item between '::' separators")
        out.extend(_expand_braces(part, pattern))
        if len(out) > MAX_EXPANDED:
            raise ConfigError(
                f"shard pattern {pattern!r} expands to more than {MAX_EXPANDED} names"
            )
    return out


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _tidy(path: str) -> str:
    """A local path without '.' segments or repeated '/'. '..' is left as written: after a
    symbolic link it is not the parent the text names (normpath read another file)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return ("/" if path.startswith("/") else "") + "/".join(parts)


def _to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The canonical string for a file: a plain absolute path locally, else a URL.

    The same file must always get the same string however it was named
    (explicitly, by glob, by directory), because the fallback uid hashes it.
    """
    if _is_local(fs):
        return path
    return fs.unstrip_protocol(path)


def _has_glob(s: str) -> bool:
    return any(c in s for c in _GLOB_CHARS)


def _glob_root(path: str) -> str:
    """The directory part of a glob before its first wildcard."""
    first = min(i for i in (path.find(c) for c in _GLOB_CHARS) if i >= 0)
    return posixpath.dirname(path[:first])


def _summarise(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    if len(items) > _SHOW:
        shown += f", ... ({len(items) - _SHOW} more)"
    return shown


def _list_tars(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    entries = fs.ls(path, detail=True)
    names = [
        e["name"]
        for e in entries
        if e.get("type") == "file" and posixpath.basename(e["name"]).endswith(_SHARD_SUFFIXES)
    ]
    return sorted(names)


def resolve_shards(pattern: str, check_exists: bool = True) -> list[str]:
    """Resolve a shard specification to a list of shard URLs.

    Accepts everything :func:`expand_pattern` does, and also, per item, a
    directory (all ``*.tar``, ``*.tar.gz`` and ``*.tgz`` directly in it, sorted) or a ``*``/``?`` glob
    (matching files, sorted), on local paths or any fsspec URL. Local shards
    come back as absolute paths, others as URLs with their protocol.

    Raises :class:`ConfigError` when nothing matches, when a shard is listed
    twice, and (with ``check_exists``) when shards are missing.
    """
    resolved: list[str] = []
    missing: list[str] = []
    # Explicit files to check, grouped by parent so that one listing per
    # directory replaces one request per shard.
    to_check: dict[tuple[int, str], list[tuple[fsspec.AbstractFileSystem, str, str]]] = defaultdict(
        list
    )

    for item in expand_pattern(pattern):
        if "::" in item:
            # A chained fsspec URL: passed through untouched (it cannot be
            # globbed or listed reliably, and opening it is what tells).
            resolved.append(item)
            continue
        try:
            fs, path = fsspec.core.url_to_fs(item)
        except Exception as exc:  # unknown protocol, missing driver, bad URL
            raise ConfigError(f"shard {item!r} (from {pattern!r}): {exc}") from exc
        if _is_local(fs):
            # One file, one string: '/d/./x.tar' and '/d//x.tar' hashed to other uids,
            # and the same shard listed both ways was scored twice (review).
            path = _tidy(path)

        if _has_glob(path):
            try:
                fs.invalidate_cache(_glob_root(path))
                found = fs.glob(path, detail=True)
            except Exception as exc:
                raise ConfigError(f"shard glob {item!r} cannot be listed: {exc}") from exc
            matches = sorted(name for name, info in found.items() if info.get("type") == "file")
            if not matches and check_exists:
                missing.append(f"{item} (glob matches no file)")
            resolved.extend(_to_url(fs, p) for p in matches)
            continue

        base = posixpath.basename(path.rstrip("/"))
        looks_like_file = not item.endswith("/") and base.endswith(_SHARD_SUFFIXES)
        is_dir = False
        if not looks_like_file:
            try:
                is_dir = fs.isdir(path)
            except Exception as exc:
                if check_exists:
                    raise ConfigError(f"shard {item!r} cannot be inspected: {exc}") from exc
        if is_dir:
            try:
                fs.invalidate_cache(path)
                tars = _list_tars(fs, path)
            except Exception as exc:
                raise ConfigError(f"shard directory {item!r} cannot be listed: {exc}") from exc
            twice = [n for n, c in Counter(shard_name(t) for t in tars).items() if c > 1]
            if twice:
                both = [posixpath.basename(t) for t in tars if shard_name(t) == twice[0]]
                raise ConfigError(
                    f"shard directory {item!r} holds {' and '.join(both)}: the same shard "
                    "twice (compressed and not?); its rows would be scored twice. Remove one, "
                    "or list the shards to read"
                )
            if not tars and check_exists:
                missing.append(f"{item} (directory without *.tar, *.tar.gz or *.tgz files)")
            resolved.extend(_to_url(fs, p) for p in tars)
            continue
        if item.endswith("/"):  # written as a directory: not a shard file of that name
            if check_exists:
                missing.append(f"{item} (no such directory)")
            continue

        if base.lower().endswith(_NOT_SHARDS):
            raise ConfigError(
                f"shard {item!r} is a {base.rsplit('.', 1)[-1]} file, not a tar shard; give "
                "the shards (a brace pattern, a glob or their directory)"
            )
        url = _to_url(fs, path)
        resolved.append(url)
        if check_exists:
            to_check[(id(fs), posixpath.dirname(path))].append((fs, path, url))

    for (_, parent), entries in to_check.items():
        fs = entries[0][0]
        try:
            # Object-store filesystems cache listings; shards written by
            # another process since the last listing must not look missing.
            fs.invalidate_cache(parent)
            present = {}
            for e in fs.ls(parent, detail=True):
                # an object store may list an object and a prefix of the same name: the
                # object is the shard
                name = e["name"].rstrip("/")
                present[name] = "file" if present.get(name) == "file" else e.get("type")
        except FileNotFoundError:
            present = {}
        except Exception as listing:
            # Listing refused (e.g. no ListBucket permission): ask per file.
            try:
                present = {p: None for _, p, _ in entries if fs.exists(p)}
            except Exception as exc:  # the store itself unreachable: say so, in one line
                raise ConfigError(
                    f"shards in {_to_url(fs, parent)} cannot be listed ({_short(listing)}) "
                    f"nor checked ({_short(exc)})"
                ) from exc
        for _, path, url in entries:
            if path not in present:
                missing.append(url)
            elif present[path] == "directory":  # refused now, not after --max-attempts reads
                missing.append(f"{url} (a directory, not a shard file)")

    if not resolved:
        detail = f": {_summarise(missing)}" if missing else ""
        raise ConfigError(f"no shards match {pattern!r}{detail}")
    if missing:
        raise ConfigError(f"{len(missing)} shard(s) of {pattern!r} missing: {_summarise(missing)}")
    counts = Counter(resolved)
    dups = [u for u, n in counts.items() if n > 1]
    if dups:
        raise ConfigError(
            f"{len(dups)} shard(s) listed more than once in {pattern!r}: {_summarise(dups)}"
        )
    return resolved


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _url_path(url: str) -> str:
    """The path part of a shard URL (last link of a chain, without query)."""
    last = url.rsplit("::", 1)[-1]
    if "://" in last:
        return urlsplit(last).path
    return last


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def shard_name(url: str) -> str:
    """A short, file-name-safe, deterministic name for a shard ("00012" for .../00012.tar).

    Used to name per-shard part files. Two shards of a list may get the same
    name (same basename in different directories): use :func:`shard_names`.
    """
    base = posixpath.basename(_url_path(url).rstrip("/"))
    for suffix in _SHARD_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    name = _UNSAFE.sub("_", base).strip("._")
    # Never an empty or hidden name; fall back to a hash of the whole URL.
    return name or f"shard-{_short_hash(url)}"


def _parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url else ""


def shard_names(urls: list[str]) -> list[str]:
    """Unique names for a list of shards, in order.

    Names are :func:`shard_name`'s, except where two shards would collide:
    those get a short hash of their parent directory as a prefix
    ("3f2a9c1b-00012"), and if they still collide (same directory, e.g.
    ``x.tar`` and ``x.tar.gz``) a hash of the whole URL. The result depends
    only on the list, so reruns name part files identically.
    """
    counts = Counter(urls)
    dups = [u for u, n in counts.items() if n > 1]
    if dups:
        raise ConfigError(f"shard listed more than once: {_summarise(dups)}")
    names = [shard_name(u) for u in urls]
    clashing = {n for n, c in Counter(names).items() if c > 1}
    names = [
        f"{_short_hash(_parent(u))}-{n}" if n in clashing else n
        for u, n in zip(urls, names, strict=True)
    ]
    clashing = {n for n, c in Counter(names).items() if c > 1}
    names = [
        f"{_short_hash(u)}-{shard_name(u)}" if n in clashing else n
        for u, n in zip(urls, names, strict=True)
    ]
    if len(set(names)) != len(names):  # pragma: no cover - needs a hash collision
        raise ConfigError("shard names collide even after disambiguation")
    return names


def sidecars(url: str) -> dict[str, str]:
    """The URLs img2dataset writes beside a shard: ``parquet`` and ``stats`` (``_stats.json``).

    ``.../00012.tar`` -> ``.../00012.parquet`` and ``.../00012_stats.json``.
    Whether they exist is not checked (they are optional metadata: the tar
    alone defines the samples).
    """
    stem = url
    for suffix in _SHARD_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return {"parquet": f"{stem}.parquet", "stats": f"{stem}_stats.json"}


# What a filesystem's file info calls the version of a file, most specific first:
# an object store's entity tag (S3 gives the same one in a listing and a HEAD,
# unlike its LastModified, whose precision differs), a GCS generation, an HTTP
# server's Last-Modified, else the local modification time.
_VERSION_KEYS = ("ETag", "etag", "generation", "Last-Modified", "mtime")


def _version(info: dict[str, Any]) -> str | None:
    for key in _VERSION_KEYS:
        value = info.get(key)
        if value is not None:
            if key.lower() == "etag":  # some S3-compatible stores quote it in HEAD only
                value = str(value).removeprefix("W/").strip('"')
            return f"{key.lower()}:{value}"
    return None


def _stamp(info: dict[str, Any]) -> dict[str, Any]:
    return {"size": info.get("size"), "version": _version(info)}


def shard_stamp(url: str) -> dict[str, Any] | None:
    """The size and version (ETag or mtime) of a shard file, or None when it cannot be asked.

    Stored with each scored part, so a shard rewritten in place under the
    same name is scored again instead of keeping the old file's scores.
    """
    try:
        fs, path = fsspec.core.url_to_fs(url)
        fs.invalidate_cache(path)
        return _stamp(fs.info(path))
    except Exception:  # noqa: BLE001 - no stamp is an answer: the caller rescores
        return None


def _listed_stamp(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """A listing entry's stamp, when it says what :func:`shard_stamp` would.

    A listing may say less than asking for the file: no size (an HTTP index
    page) or, for a symbolic link, the link's own mtime where ``info``
    follows it. Those are asked for one by one.
    """
    if entry is None or entry.get("islink") or entry.get("size") is None:
        return None
    stamp = _stamp(entry)
    return stamp if stamp["version"] is not None else None


def shard_stamps(urls: list[str]) -> dict[str, dict[str, Any] | None]:
    """:func:`shard_stamp` of many shards, one listing per directory rather than one request each."""
    by_parent: defaultdict[str, list[str]] = defaultdict(list)
    for url in urls:
        by_parent[_parent(url)].append(url)
    out: dict[str, dict[str, Any] | None] = {}
    for parent, members in by_parent.items():
        listed: dict[str, dict[str, Any]] = {}
        try:
            fs, ppath = fsspec.core.url_to_fs(parent)
            fs.invalidate_cache(ppath)
            listed = {e["name"].rstrip("/"): e for e in fs.ls(ppath, detail=True)}
            paths = [fsspec.core.url_to_fs(u)[1] for u in members]
        except Exception:  # noqa: BLE001 - fall back to asking for each file
            paths = [None] * len(members)
        for url, path in zip(members, paths, strict=True):
            stamp = _listed_stamp(listed.get(path) if path is not None else None)
            out[url] = stamp if stamp is not None else shard_stamp(url)
    return out


def expected_samples(url: str) -> int | None:
    """Samples img2dataset says it wrote to a shard (``successes`` in ``_stats.json``), else None."""
    import json

    path = sidecars(url)["stats"]
    try:
        with fsspec.open(path, "rb") as f:
            stats = json.loads(f.read())
    except (FileNotFoundError, ValueError, OSError):
        return None
    value = stats.get("successes") if isinstance(stats, dict) else None
    return value if isinstance(value, int) and value >= 0 else None
