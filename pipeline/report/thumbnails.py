"""Small JPEG thumbnails of chosen rows, read back through the safe shard reader."""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from pipeline.data.reader import iter_shard

log = logging.getLogger(__name__)

THUMB_PX = 96


CHANGED = "(the shard changed since scoring: this row now holds another sample)"
MISSING = "(the shard no longer holds this row)"


def thumbnails(
    rows: Sequence[tuple[str, int, str]], options: dict[str, Any], size: int = THUMB_PX
) -> dict[tuple[str, int], tuple[bytes | None, str]]:
    """(JPEG bytes or None, caption) for each (shard, index, uid); only the shards named are read.

    A row is shown only when the shard still holds that uid at that index: a
    shard rewritten since scoring would otherwise put another pair's pixels
    and caption beside this row's score. Such rows get no image and a caption
    that says so (``CHANGED``, ``MISSING``, or why the shard cannot be read now).
    """
    wanted: dict[str, dict[int, str]] = defaultdict(dict)
    for shard, index, uid in rows:
        wanted[shard][int(index)] = uid
    out: dict[tuple[str, int], tuple[bytes | None, str]] = {}
    for shard, uids in wanted.items():
        left = len(uids)
        unreadable = None
        for s in iter_shard(shard, **options):
            if s.whole_shard:  # the row for a shard it cannot read (to its end): not a sample
                unreadable = s.error
                continue
            if s.index not in uids:
                continue
            out[(shard, s.index)] = (
                (_jpeg(s.image, size) if s.image is not None else None, s.caption or "")
                if s.uid == uids[s.index]
                else (None, CHANGED)
            )
            left -= 1
            if not left:
                break
        if unreadable:
            log.warning("report: shard %s cannot be read now: %s", shard, unreadable)
        gone = f"(the shard cannot be read now: {unreadable})" if unreadable else MISSING
        for index in uids:
            out.setdefault((shard, index), (None, gone))
    return out


def _jpeg(image: Any, size: int) -> bytes:
    img = image.copy()
    img.thumbnail((size, size))
    if img.width < size // 2:  # tiny generated images: enlarge, pixelated on purpose
        scale = size // max(img.width, img.height)
        img = img.resize((img.width * scale, img.height * scale), resample=0)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=85)
    return buf.getvalue()
