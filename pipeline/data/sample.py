"""The unit every stage passes around: one image-text pair read from a shard."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Sample:
    """One sample of a WebDataset shard, decoded safely.

    A sample that could not be decoded still exists: ``error`` holds the
    reason and ``image``/``caption`` may be ``None``. Rows in = rows out.
    """

    uid: str  # 32 lowercase hex digits (DataComp/img2dataset uid, else a hash)
    key: str  # the WebDataset key (member name up to the first dot)
    shard: str  # the shard URL as the user gave it (after pattern expansion)
    index: int  # position of the sample within its shard, from 0
    # RGB, pixel count capped; or what the reader's ``transform`` made of it
    image: Image.Image | Any = None
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # the decoded KEY.json
    error: str | None = None  # None when ok
    # The row of a shard's own failure (key ``__shard__``), not a sample: a real sample
    # may be keyed ``__shard__`` too. Not a table column.
    whole_shard: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None
