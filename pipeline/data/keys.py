"""Which members of a sample hold its image and its caption (reader options shared by the stages)."""

from __future__ import annotations

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TEXT_KEYS = ("txt",)


def valid_keys(keys: list[str]) -> bool:
    return bool(keys) and all(k and "/" not in k and not k.startswith(".") for k in keys)


def reader_options(image_keys: list[str], text_keys: list[str]) -> dict[str, tuple[str, ...]]:
    """Keyword arguments for pipeline.data.reader.iter_shard."""
    return {"image_keys": tuple(image_keys), "text_keys": tuple(text_keys)}
