"""The reader options the stages share, and how a later stage recovers them from a record."""

from __future__ import annotations

from pipeline.data.keys import IMAGE_KEYS, TEXT_KEYS, reader_options, recorded_reader_options
from pipeline.data.reader import MAX_IMAGE_PIXELS
from pipeline.score.config import ScoreConfig
from pipeline.train.config import TrainConfig


def test_each_config_hands_the_reader_its_options():
    for cfg in (
        ScoreConfig(data="d", run="r", image_keys=["png"], max_image_pixels=99),
        TrainConfig(data="d", run="r", image_keys=["png"], max_image_pixels=99),
    ):
        assert cfg.reader_options() == {
            "image_keys": ("png",),
            "text_keys": TEXT_KEYS,
            "max_image_pixels": 99,
        }


def test_a_record_wins_then_the_fallback_then_the_default():
    fallback = reader_options(["webp"], ["caption"], 500)
    assert recorded_reader_options({"max_image_pixels": 7}, fallback) == {
        "image_keys": ("webp",),
        "text_keys": ("caption",),
        "max_image_pixels": 7,
    }
    # a config recorded before the cap was an option was read with the default cap
    assert recorded_reader_options({"image_keys": ["png"], "text_keys": ["txt"]}) == {
        "image_keys": ("png",),
        "text_keys": ("txt",),
        "max_image_pixels": MAX_IMAGE_PIXELS,
    }
    assert recorded_reader_options({}) == reader_options(list(IMAGE_KEYS), list(TEXT_KEYS))
