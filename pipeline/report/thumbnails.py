"""Small JPEG thumbnails of chosen rows, read back through the safe shard reader."""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from pipeline.data.reader import iter_shard

THUMB_PX = 96


def thumbnails(
    rows: Sequence[tuple[str, int]], options: dict[str, Any], size: int = THUMB_PX
) -> dict[tuple[str, int], tuple[bytes | None, str]]:
    """(JPEG bytes or None, caption) for each (shard, index); only the shards named are read."""
    wanted: dict[str, set[int]] = defaultdict(set)
    for shard, index in rows:
        wanted[shard].add(int(index))
    out: dict[tuple[str, int], tuple[bytes | None, str]] = {}
    for shard, indices in wanted.items():
        for s in iter_shard(shard, **options):
            if s.index not in indices:
                continue
            jpeg = None
            if s.image is not None:
                img = s.image.copy()
                img.thumbnail((size, size))
                if img.width < size // 2:  # tiny generated images: enlarge, pixelated on purpose
                    scale = size // max(img.width, img.height)
                    img = img.resize((img.width * scale, img.height * scale), resample=0)
                buf = io.BytesIO()
                img.convert("RGB").save(buf, format="JPEG", quality=85)
                jpeg = buf.getvalue()
            out[(shard, s.index)] = (jpeg, s.caption or "")
            if len(indices) == sum(1 for k in out if k[0] == shard):
                break
    return out
