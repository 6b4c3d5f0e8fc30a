"""Which members of a sample hold its image and its caption (reader options shared by the stages)."""

from __future__ import annotations

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


def reader_options(image_keys: list[str], text_keys: list[str]) -> dict[str, tuple[str, ...]]:
    """Keyword arguments for pipeline.data.reader.iter_shard."""
    return {"image_keys": tuple(image_keys), "text_keys": tuple(text_keys)}
