"""How the stages read a sample: which members hold its image and caption, and the pixel cap.

These are the reader options every stage shares, so that a shard is read the
same way (the same rows ok) by training, scoring and the stages after them.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from pipeline.data.reader import MAX_IMAGE_PIXELS

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TEXT_KEYS = ("txt",)

# What valid_keys checks, worded for a ConfigError ("image_keys: must be ...").
KEYS_RULE = (
    "must be non-empty lower-case extensions without '/', ';', ',', whitespace or a leading '.'"
)


def _valid_key(key: object) -> bool:
    # The reader lower-cases member extensions, so an upper-case key never
    # matches; ';' ',' and whitespace are list separators pasted into one key.
    return (
        isinstance(key, str)
        and bool(key)
        and key == key.lower()
        and not key.startswith(".")
        and not any(c in "/;," or c.isspace() for c in key)
    )


def valid_keys(keys: list[str]) -> bool:
    """True when ``keys`` is a non-empty list of extensions the reader can match (``KEYS_RULE``)."""
    return bool(keys) and all(_valid_key(k) for k in keys)


# Members that hold an image in WebDataset pools (the reader decodes any PIL can).
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"})


def key_misuse(image_keys: list[str], text_keys: list[str]) -> tuple[str, str] | None:
    """(field, why) when a key names a member of another role, else None.

    Walkthrough: ``--text-key json`` was accepted, the whole metadata document scored as
    the caption, and prune wrote it into open_clip's ``.txt`` members.
    """
    if not (valid_keys(image_keys) and valid_keys(text_keys)):
        return None  # the spelling checks say what is wrong
    for key in text_keys:
        if key == "json":
            return (
                "text_keys",
                "must not hold 'json': it is the sample's metadata (the reader takes its uid "
                "there), not a caption member (img2dataset writes the caption as txt)",
            )
        if key in IMAGE_EXTENSIONS or key in image_keys:
            return ("text_keys", f"must not hold {key!r}: that member is an image")
    for key in image_keys:
        if key in ("json", "txt"):
            return ("image_keys", f"must not hold {key!r}: that member is text, not an image")
    return None


# PIL refuses images over twice its MAX_IMAGE_PIXELS (a decompression bomb) before
# the reader sees their size: a larger pixel cap could not be honoured.
# (None: another library switched PIL's check off.)
PIL_PIXEL_LIMIT = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
PIXEL_CAP_RULE = (
    f"must be >= 1 and at most {PIL_PIXEL_LIMIT} (PIL's decompression-bomb limit)"
    if PIL_PIXEL_LIMIT
    else "must be >= 1"
)


def pixel_cap_ok(cap: int) -> bool:
    return 1 <= cap and (PIL_PIXEL_LIMIT is None or cap <= PIL_PIXEL_LIMIT)


def reader_options(
    image_keys: list[str], text_keys: list[str], max_image_pixels: int = MAX_IMAGE_PIXELS
) -> dict[str, Any]:
    """Keyword arguments for pipeline.data.reader.iter_shard."""
    return {
        "image_keys": tuple(image_keys),
        "text_keys": tuple(text_keys),
        "max_image_pixels": int(max_image_pixels),
    }


def recorded_reader_options(
    recorded: dict[str, Any], fallback: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The reader options of a stage's recorded config; a missing one comes from ``fallback``,
    else its default (a config recorded before the option existed was read with the default).
    """
    fallback = fallback or {}
    return reader_options(
        recorded.get("image_keys", fallback.get("image_keys", IMAGE_KEYS)),
        recorded.get("text_keys", fallback.get("text_keys", TEXT_KEYS)),
        recorded.get("max_image_pixels", fallback.get("max_image_pixels", MAX_IMAGE_PIXELS)),
    )
