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


def test_a_key_naming_a_member_of_another_role_is_refused():
    """Walkthrough: --text-key json scored the metadata document as the caption, and prune
    wrote it into open_clip's .txt members."""
    import pytest

    from pipeline.data.keys import key_misuse
    from pipeline.errors import ConfigError

    assert key_misuse(["jpg", "png"], ["txt", "caption"]) is None
    assert key_misuse(["image"], ["caption"]) is None
    assert key_misuse(["jpg"], ["json"])[0] == "text_keys"
    assert key_misuse(["jpg"], ["txt", "png"]) == (
        "text_keys",
        "must not hold 'png': that member is an image",
    )
    assert key_misuse(["pic"], ["pic"])[0] == "text_keys"
    assert key_misuse(["txt"], ["caption"]) == (
        "image_keys",
        "must not hold 'txt': that member is text, not an image",
    )
    assert key_misuse(["Bad Key"], ["json"]) is None  # the spelling check speaks first
    for make in (ScoreConfig, TrainConfig):
        with pytest.raises(ConfigError, match=r"^text_keys: must not hold 'json': it is the sa"):
            make(data="d", run="r", text_keys=["json"]).validate()
        with pytest.raises(ConfigError, match=r"^image_keys: must not hold 'json'"):
            make(data="d", run="r", image_keys=["json"]).validate()
