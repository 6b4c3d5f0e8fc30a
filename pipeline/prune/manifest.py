"""Select the kept rows and write the manifest of DESIGN.md.

RUN/prune/NAME/shards/{00000..0NNNN}.tar + sizes.json   resharded kept samples, all members
RUN/prune/NAME/uids.npy                                  DataComp subset format
RUN/prune/NAME/keep.parquet                              kept uids, keys, scores
RUN/prune/NAME/manifest.json                             rule, counts, --train-data
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import time
import uuid
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import split_protocol, url_to_fs

from pipeline.data.reader import ShardReadError, iter_raw, json_uid, normal_name
from pipeline.data.shards import absolute_pattern, shard_stamps
from pipeline.data.tarwriter import ShardWriter, brace_pattern
from pipeline.errors import ConfigError
from pipeline.prune.config import PruneConfig
from pipeline.prune.datacomp import save_uid_halves, uid_halves
from pipeline.prune.select import Selection, plan
from pipeline.rundir import (
    RunDir,
    exists,
    join,
    leftovers,
    makedirs,
    open_atomic,
    read_json,
    remove,
    replace_dir,
    write_json,
)
from pipeline.score.merge import recorded_stamps
from pipeline.score.table import (
    check_scores_current,
    ensemble_record,
    fingerprint_hash,
    require_scores,
    scored_reader_options,
    table_identity,
    table_metadata,
)


def select(table: pa.Table, method: str, keep: float) -> pa.Table:
    """The top ``keep`` fraction of ok rows by score (ties broken by uid: deterministic)."""
    if method not in table.column_names:
        scored = [
            c
            for c in table.column_names
            if c not in ("uid", "key", "shard", "index", "status", "error", "caption")
        ]
        raise ConfigError(f"method: no column {method!r} in the score table; columns: {scored}")
    ok = table.filter(pa.compute.equal(table.column("status"), "ok"))
    scores = ok.column(method).to_numpy(zero_copy_only=False)
    finite = np.isfinite(scores)
    ok, scores = ok.filter(pa.array(finite)), scores[finite]
    n_keep = max(1, int(round(keep * len(scores)))) if len(scores) else 0
    uids = np.asarray(ok.column("uid").to_pylist())
    order = np.lexsort((uids, -scores))[:n_keep]
    return ok.take(pa.array(np.sort(order)))


log = logging.getLogger(__name__)


def write_manifest(cfg: PruneConfig) -> dict[str, Any]:
    """Apply ``cfg``'s keep rule to RUN/scores.parquet and write RUN/prune/NAME/ whole.

    The score table is streamed (see :mod:`pipeline.prune.select`): kept rows
    go to ``keep.parquet`` batch by batch and are resharded shard by shard
    as they arrive (the table is in shard order), so memory holds one batch,
    one shard's kept keys and the kept uids as two 64-bit integers each.
    """
    cfg.validate()
    run = RunDir(cfg.run)
    require_scores(run)
    check_scores_current(run)
    others = [RunDir(u) for u in cfg.ensemble or []]
    for other in others:
        require_scores(other)
        check_scores_current(other)
    # refuses unknown columns, and an ensemble of other rows, before anything is removed
    selection = plan(cfg, run.scores, ensemble=[o.scores for o in others])
    # what the manifest ranks (its columns' values and the rows), so a rescore that changes
    # them shows the manifest is out of date, and one that only adds or drops other scorers
    # does not
    by = cfg.balance_by if cfg.rule == "balanced" else None
    scores = (
        # clusters come from the images through the proxy's last checkpoint, which no column
        # holds: the whole table's identity, which changes with the checkpoints (review)
        table_identity(run.scores)
        if by == "cluster"
        else table_identity(run.scores, [*selection.score_columns, *([by] if by else [])])
    )
    # what each other run's table ranked by, as `scores` is --run's (`diffin status` marks a
    # manifest stale from `scores` alone: a rescore of another run of the ensemble is not)
    ensemble = ensemble_record([o.url for o in others], selection.score_columns)
    if selection.kept == 0:
        # An empty manifest is nothing open_clip can train on: refuse it here,
        # before any output is touched.
        raise ConfigError(
            f"{cfg.rule}: the rule keeps none of the {selection.scorable} scorable rows "
            f"({selection.rows_error} error rows of {selection.rows})"
        )
    fp = table_metadata(run.scores).get("fingerprint")
    stamps = recorded_stamps(run.part("x"), fingerprint_hash(fp)) if fp else {}
    kept_shards = _kept_shards(selection) if stamps else []
    _refuse_changed_shards(kept_shards, stamps)
    out = run.prune_dir(cfg.manifest_name)
    name = cfg.manifest_name
    for left in leftovers(run.path("prune"), (f".{name}.tmp-", f"{name}.old-")):
        log.warning(
            "prune: %s was left by a prune of %s that did not finish (a partial build, or the "
            "previous manifest set aside); remove it once no other prune of that name runs",
            left,
            name,
        )
    # Built beside its final place and swapped in whole: a failed rerun
    # leaves the previous manifest as it was.
    build = run.prune_dir(f".{cfg.manifest_name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        manifest = _build(
            cfg,
            selection,
            build,
            final=out,
            reader=scored_reader_options(run),
            scores=scores,
            ensemble=ensemble,
        )
        _refuse_changed_shards(kept_shards, stamps)  # again: one rewritten while it was read
    except BaseException:
        remove(build, recursive=True)
        raise
    if exists(join(out, "manifest.json")):
        # a reused --name: said, since the earlier manifest is gone once this one is in place
        # (walkthrough: replaced without a word)
        rule = read_json(join(out, "manifest.json")).get("rule") or {}

        def setting(r: dict) -> dict:  # what selects the rows (not where, not how cut)
            return {k: v for k, v in r.items() if k not in ("run", "name", "shard_size")}

        if setting(rule) != setting(manifest.get("rule") or {}):
            log.warning(
                "prune: %s replaces the manifest of that name, built with other settings "
                "(rule %s, method %s, keep %s); --name keeps manifests apart",
                name,
                rule.get("rule"),
                rule.get("method"),
                rule.get("keep"),
            )
    try:
        replace_dir(build, out, last="manifest.json")
    except BaseException:
        # On an object store the swap is a copy: the complete new manifest
        # stays in the build directory (a rerun writes a new one).
        log.error("prune: the new manifest could not be moved to %s; it is whole in %s", out, build)
        raise
    run.update_run_json(
        f"prune/{cfg.manifest_name}",
        {
            "config": cfg.to_dict(),
            "kept": manifest["kept"],
            "seconds": manifest["seconds"],
            "scores": scores,
            **({"ensemble": ensemble} if ensemble else {}),
        },
    )
    return {**manifest, "dir": absolute_pattern(out)}


def _build(
    cfg: PruneConfig,
    selection: Selection,
    build: str,
    final: str,
    reader: dict[str, Any],
    scores: dict[str, Any],
    ensemble: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write the manifest directory at ``build``; its paths name ``final``, where it will live.

    ``reader``: the image and text keys the rows were scored with; ``scores``: the score
    table's identity (:func:`pipeline.score.table.table_identity`); ``ensemble``: the other
    runs whose scores were averaged in, with their tables' identities.
    """
    t0 = time.time()
    makedirs(build)
    digits = shard_digits(selection.kept, cfg.shard_size)
    base = ["uid", "key", "shard", "index"]
    columns = base + [c for c in selection.score_columns if c not in base]
    uid_hi: list[np.ndarray] = []
    uid_lo: list[np.ndarray] = []
    kept = 0
    counts: Counter[str] = Counter()
    min_score = np.inf
    pending: tuple[str, set[str]] | None = None  # the shard being gathered, its kept keys
    writer = ShardWriter(join(build, "shards"), cfg.shard_size, digits=digits)
    try:
        with open_atomic(join(build, "keep.parquet")) as f:
            pw: pq.ParquetWriter | None = None
            try:
                for batch in selection.kept_batches(columns):
                    if pw is None:
                        pw = pq.ParquetWriter(f, batch.schema)
                    pw.write_batch(batch)
                    kept += batch.num_rows
                    score = batch.column(cfg.score_name).to_numpy(zero_copy_only=False)
                    if len(score):
                        min_score = min(min_score, float(np.min(score)))
                    hi, lo = uid_halves(batch.column("uid").to_pylist())
                    uid_hi.append(hi)
                    uid_lo.append(lo)
                    for shard, key in zip(
                        batch.column("shard").to_pylist(),
                        batch.column("key").to_pylist(),
                        strict=True,
                    ):
                        if pending is None or pending[0] != shard:
                            if pending is not None:
                                counts.update(_reshard(writer, *pending, reader))
                            pending = (shard, set())
                        pending[1].add(normal_name(key))
                if pending is not None:
                    counts.update(_reshard(writer, *pending, reader))
                if pw is None:
                    empty = pa.schema(
                        [selection.table.schema.field(c) for c in columns]
                        + (
                            [pa.field(cfg.score_name, pa.float64())]
                            if cfg.score_name not in columns
                            else []
                        )
                    )
                    pw = pq.ParquetWriter(f, empty)
            finally:
                if pw is not None:
                    pw.close()
    except BaseException:
        writer.abort()
        raise
    writer.close()
    if kept != selection.kept:
        raise RuntimeError(f"the rule chose {selection.kept} rows but {kept} were written")
    n_shards, sizes = len(writer.shards), writer.sizes

    n_uids = save_uid_halves(join(build, "uids.npy"), uid_hi, uid_lo)
    # absolute: the manifest is read from wherever open_clip or the user runs
    shards_dir = absolute_pattern(join(final, "shards"))
    pattern = brace_pattern(shards_dir, 0, n_shards - 1, digits) if n_shards else ""
    train_data, reader_note = open_clip_train_data(pattern)
    rule: dict[str, Any] = {"kind": cfg.rule, **cfg.to_dict()}
    argv = [
        "--dataset-type",
        "webdataset",
        "--train-data",
        train_data,
        "--train-num-samples",
        str(sum(sizes.values())),
    ]
    dropped = {k: counts[f"dropped: {k}"] for k in DROPPED}
    added = {k: n for k, n in sorted(counts.items()) if " added as " in k}
    unread = {k: n for k, n in sorted(counts.items()) if k.startswith(_UNREAD)}
    no_uid = counts["no DataComp uid in json"]
    notes = "open_clip needs at least workers x world_size shards; set --shard-size accordingly"
    notes += reader_note
    if unread:
        notes += (
            f"; {counts['samples unread']} kept samples would be retrained on another caption or "
            "image than the one scored (open_clip_unread)"
        )
        log.warning(
            "prune: open_clip would not read the scored members of some samples: %s", unread
        )
    if no_uid:
        notes += (
            f"; {no_uid} kept samples have no DataComp uid in their json: their uids.npy entry is "
            "diffin's hash of shard URL and key, which DataComp's resharder cannot match"
        )
    manifest = {
        "rule": rule,
        "score": cfg.score_name,
        "scores": scores,
        **({"ensemble": ensemble} if ensemble else {}),
        "rows_in_table": selection.rows,
        "rows_ok": selection.rows_ok,
        "rows_error": selection.rows_error,
        "rows_scorable": selection.scorable,
        "kept": kept,
        "unique_uids": n_uids,
        "threshold": float(min_score) if kept else None,
        "selection": {**selection.info, "in_memory": selection.in_memory},
        "shards": n_shards,
        "sizes": sizes,
        "members_dropped": dropped,
        # the scored caption or image, added where open_clip reads them
        "open_clip_added": added,
        "open_clip_unread": unread,
        "kept_without_datacomp_uid": no_uid,
        "train_data": train_data,
        "shards_url": pattern,  # the same shards as an fsspec URL pattern
        "train_num_samples": sum(sizes.values()),
        # One shell-quoted string (README: eval "set -- $(jq -r .open_clip_args M)") and
        # the same arguments as a list, for programs and paths with odd characters.
        "open_clip_args": shlex.join(argv),
        "open_clip_argv": argv,
        "note": notes,
        "seconds": round(time.time() - t0, 2),
    }
    write_json(join(build, "manifest.json"), manifest)
    return manifest


def open_clip_train_data(pattern: str) -> tuple[str, str]:
    """``pattern`` (an fsspec URL pattern of the kept shards) as open_clip's WebDataset
    loader opens it, and a note for the manifest when it cannot.

    That loader opens plain paths with ``open()`` (no ``~``, relative to where
    it runs), http(s) and ``gs://`` with command-line tools, ``pipe:`` commands,
    and nothing else: an ``s3://`` pattern is refused and its pipeline retries
    forever. So local paths become absolute and S3 becomes the usual ``pipe:aws
    s3 cp URL -`` (the AWS CLI reads ``AWS_ENDPOINT_URL`` for other stores).
    """
    if not pattern:
        return "", ""
    protocol, _ = split_protocol(pattern)
    if protocol in (None, "file", "local"):
        return url_to_fs(pattern)[1], ""
    if protocol in ("s3", "s3a"):
        return f"pipe:aws s3 cp {shlex.quote('s3://' + pattern.split('://', 1)[1])} -", ""
    if protocol in ("http", "https", "gs"):
        return pattern, ""
    return pattern, (
        f"; open_clip's WebDataset loader cannot open {protocol}:// URLs: "
        "copy the shards where it can, or give it a pipe: command"
    )


def shard_digits(rows: int, shard_size: int) -> int:
    """Zero-padded width of the output shard names (at least 5).

    Every name must be as wide as the last one: braceexpand (open_clip) pads
    each value of ``{00000..100000}`` to the widest bound.
    """
    n_shards = max(1, math.ceil(rows / shard_size))
    return max(5, len(str(n_shards - 1)))


# Extensions WebDataset's default decoders unpickle (pickle.loads, torch.load):
# open_clip_train would run code from them, so they never reach a manifest.
PICKLE_EXTENSIONS = frozenset({"pyd", "pickle", "pth"})


def is_pickle(ext: str) -> bool:
    """Whether WebDataset's default decoders would unpickle a member with this extension.

    They gunzip ``.gz`` members first and decode what remains (``x.pyd.gz`` is a
    pickle), and open_clip groups members with lower-cased extensions.
    """
    parts = ext.lower().split(".")
    while len(parts) > 1 and parts[-1] == "gz":
        parts.pop()
    return parts[-1] in PICKLE_EXTENSIONS


# open_clip_train decodes *every* member of a sample (wds.decode("pilrgb")), by the
# last part of its extension, before it picks the image and caption it trains on.
# From webdataset 0.2.86's autodecode: PIL opens these with no format list and no
# pixel cap (``eps`` runs Ghostscript), ...
DECODED_AS_IMAGES = frozenset(
    "blp bmp dib bufr cur pcx dcx dds ps eps fit fits fli flc ftc ftu gbr gif grib h5 hdf "
    "png apng jp2 j2k jpc jpf jpx j2c icns ico im iim tif tiff jfif jpe jpg jpeg mpg mpeg "
    "msp pcd pxr pbm pgm ppm pnm psd bw rgb rgba sgi ras tga icb vda vst webp wmf emf xbm "
    "xpm".split()
)
# ... these are parsed by their own decoders (tensors, msgpack, cbor, numpy), and
# ``.gz`` members are gunzipped whole in memory first (a few KB can hide GBs).
DECODED_AS_DATA = frozenset({"cbor", "mp", "msg", "npy", "npz", "ten", "tb"})
# Left as they are, or decoded as text, JSON or an int: harmless.


def unsafe_member(ext: str) -> str | None:
    """Why open_clip's loader must not decode an (unscored) member with this extension, or None.

    The scored image passed the reader's checks (format list, pixel cap), so
    it is kept; any other member open_clip would decode unchecked is not.
    """
    if is_pickle(ext):
        return "pickle"
    last = ext.lower().rsplit(".", 1)[-1]
    if last == "gz":
        return "gzip"
    if last in DECODED_AS_IMAGES:
        return "unscored image"
    if last in DECODED_AS_DATA:
        return "decoded data"
    return None


# the reasons members are left out of a manifest, as manifest.json counts them
DROPPED = ("no extension", "dot extension", "pickle", "gzip", "unscored image", "decoded data")


# open_clip_train.data keeps samples with a ``txt`` member and one of these, then
# trains on the first of them present (wds.rename(image="jpg;png;jpeg;webp", text="txt")).
OPEN_CLIP_IMAGES = ("jpg", "png", "jpeg", "webp")


# as_open_clip_reads' events that say open_clip would not train on what was scored
_UNREAD = ("open_clip reads", "image in")


def _image_ext(data: bytes) -> str | None:
    """The open_clip image extension that names this image's format, if any."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def as_open_clip_reads(
    members: dict[str, bytes], image_keys: tuple[str, ...], text_keys: tuple[str, ...]
) -> tuple[dict[str, bytes], list[str]]:
    """``members`` with the scored caption and image added where open_clip reads them.

    A pool scored with other keys (``--text-key caption``, ``--image-key tif``)
    would otherwise be retrained on nothing (open_clip drops samples without
    ``txt``) or on another member. Members are only added, never replaced:
    where open_clip would read a member other than the scored one, the sample
    is written as it is and the returned events say so.
    """
    out = dict(members)
    events = []
    text = next((k for k in text_keys if k in members), None)
    if text is None:
        pass  # not a scored sample (an error row's members)
    elif "txt" not in members:
        out["txt"] = members[text]
        events.append("caption added as txt")
    elif members["txt"] != members[text]:
        events.append("open_clip reads another caption (txt)")
    image = next((k for k in image_keys if k in members), None)
    read = next((k for k in OPEN_CLIP_IMAGES if k in members), None)
    if image is None:
        pass
    elif read is None:
        ext = _image_ext(members[image])
        if ext is None:
            events.append("image in a format open_clip reads under no extension")
        else:
            out[ext] = members[image]
            events.append(f"image added as {ext}")
    elif members[read] != members[image]:
        events.append(f"open_clip reads another image ({read})")
    shown = next((k for k in OPEN_CLIP_IMAGES if k in out), None)  # what open_clip reads
    if image is not None and shown is not None and out[shown] == members[image]:
        if _sixteen_bit_gray(members[image]):
            # diffin scores its tones scaled to 8 bits; PIL's convert("RGB"), open_clip's
            # decoder, clips them to 255: the retrained image is mostly white (review)
            events.append("open_clip reads a 16-bit grayscale image clipped to white")
    return out, events


def _sixteen_bit_gray(data: bytes) -> bool:
    """A PNG of 16-bit grayscale (IHDR bit depth 16, colour type 0)."""
    return _image_ext(data) == "png" and data[12:16] == b"IHDR" and data[24:26] == b"\x10\x00"


def _has_json_uid(members: dict[str, bytes]) -> bool:
    """Whether the sample's json has the uid DataComp's tools look its row up by."""
    try:
        return json_uid(json.loads(members["json"])) is not None if "json" in members else False
    except (ValueError, RecursionError):
        return False


def _kept_shards(selection: Selection) -> list[str]:
    """The shards holding kept rows, in table order."""
    kept: dict[str, None] = {}
    for batch in selection.kept_batches(["shard"]):
        for shard in pa.compute.unique(batch.column("shard")).to_pylist():
            kept.setdefault(shard)
    return list(kept)


def _refuse_changed_shards(kept: list[str], stamps: dict[str, dict[str, Any]]) -> None:
    """Refuse kept samples whose shard (of ``kept``) moved or was rewritten since it was
    scored (asked before the manifest is built, and again before it is put in place).

    Kept samples are re-read by key: a shard rewritten in place would put pairs
    that were never scored in the manifest, under the scores of others. The
    kept shards are asked for with one listing per directory, not one request
    each (a pool on an object store has thousands); shards without kept rows, or
    without a stamped record (tables written by hand), are not asked for.
    """
    check = [shard for shard in kept if shard in stamps]
    if not check:
        return
    now = shard_stamps(check)
    changed = [shard for shard in check if now[shard] != stamps[shard]]
    if not changed:
        return
    first, others = changed[0], changed[1:]
    what = "cannot be found or read" if now[first] is None else "was rewritten"
    more = f" (and {len(others)} more kept shard(s), e.g. {others[:3]})" if others else ""
    raise ConfigError(
        f"data: {first} {what} since it was scored{more} (its size and version differ from "
        "its completion record); restore it, or run `diffin score` again (it scores changed "
        "shards anew)"
    )


def _reshard(
    writer: ShardWriter, shard: str, keys: set[str], reader: dict[str, Any]
) -> Counter[str]:
    """Copy the kept samples of one input shard, every member byte for byte, in tar order.

    Left out, and counted: members with no extension (no WebDataset reader
    groups them into a sample), those whose extension starts with a dot
    (``0..bak``: no writer names them unambiguously), and those open_clip's
    loader would decode unchecked (:func:`unsafe_member`: pickles, gzipped
    members, images other than the scored one, binary data). Where open_clip would not read the scored caption or image,
    they are added under its names (:func:`as_open_clip_reads`), and counted.
    Samples whose json has no DataComp uid are counted too (``uids.npy``
    then holds diffin's hash of shard and key for them).
    """
    seen: set[str] = set()
    counts: Counter[str] = Counter()
    damage: ShardReadError | None = None
    try:
        for key, members in iter_raw(shard):
            if key in keys and key not in seen:  # a repeated key was an error row
                kept = {}
                scored = next((k for k in reader["image_keys"] if k in members), None)
                for ext, data in members.items():
                    why = unsafe_member(ext) if ext != scored else None
                    if not ext:
                        counts["dropped: no extension"] += 1
                    elif ext.startswith("."):
                        counts["dropped: dot extension"] += 1
                    elif why is not None:
                        counts[f"dropped: {why}"] += 1
                    else:
                        kept[ext] = data
                kept, events = as_open_clip_reads(
                    kept, tuple(reader["image_keys"]), tuple(reader["text_keys"])
                )
                counts.update(events)
                counts["samples unread"] += any(e.startswith(_UNREAD) for e in events)
                counts["no DataComp uid in json"] += not _has_json_uid(members)
                writer.write(_unique_key(writer, _safe_key(key)), kept)
                seen.add(key)
                if len(seen) == len(keys):
                    break
    except ShardReadError as exc:
        damage = exc  # harmless if it comes after the samples we need
    if seen != keys:
        why = f"{damage}" if damage is not None else "their keys are no longer in it"
        raise ConfigError(
            f"data: {shard}: {len(keys - seen)} kept samples could not be re-read ({why}); "
            "was the shard moved or rewritten since it was scored?"
        )
    return counts


def _safe_key(key: str) -> str:
    # WebDataset keys may contain '/' (sub-directories in the tar) and a
    # leading './' (tar -cf x.tar .); flatten them into one plain name.
    key = normal_name(key).replace("/", "_").replace(".", "_")
    # '__name__' members are WebDataset metadata, not samples.
    return f"k{key}" if key.startswith("__") else key


def _unique_key(writer: ShardWriter, key: str) -> str:
    """``key``, or ``key_N`` if the output shard already holds it.

    Keys need only be unique within an input shard (two shards may both
    have a sample "0"), and flattening can merge two ("a/b" and "a_b").
    """
    name, n = key, 0
    while writer.holds(name):
        n += 1
        name = f"{key}_{n}"
    return name
