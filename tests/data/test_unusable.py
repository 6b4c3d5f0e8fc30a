"""Counting unusable rows by kind of reason (the proxy's pool and a --target keep no table)."""

from __future__ import annotations

from pipeline.data.sample import Sample
from pipeline.data.unusable import Unusable, reason_kind


def test_the_kind_of_a_reason_is_its_words_before_any_detail():
    assert reason_kind("undecodable image: cannot identify image file") == "undecodable image"
    assert reason_kind("missing image (expected one of jpg, png); missing caption (txt)") == (
        "missing image"
    )
    assert reason_kind("image too large: 30000x30000 pixels (cap 67108864)") == "image too large"
    assert reason_kind("") == reason_kind(None) == "unknown"


def test_rows_and_damaged_shards_are_counted_apart_and_said():
    u = Unusable()
    assert u.said() == "" and u.record() == {"error_reasons": {}}
    for i, error in enumerate(["empty caption", "empty caption", "undecodable image: x"]):
        u.add(Sample(uid=f"{i:032x}", key=str(i), shard="a.tar", index=i, error=error))
    u.add(
        Sample(
            uid="f" * 32,
            key="__shard__",
            shard="b.tar",
            index=0,
            error="unreadable shard: not a tar file: empty file",
            whole_shard=True,
        )
    )
    assert u.rows == 3
    assert u.record("target_") == {
        "target_error_reasons": {"empty caption": 2, "undecodable image": 1},
        "target_shards_damaged": {"b.tar": "unreadable shard: not a tar file: empty file"},
    }
    assert u.said() == (
        "; 3 rows unusable (2 empty caption, 1 undecodable image); 1 shard(s) not read to the "
        "end (b.tar: unreadable shard: not a tar file: empty file)"
    )


def test_reasons_past_the_three_said_are_counted_not_dropped():
    """Walkthrough: "31 rows unusable (27 missing caption, 1 ..., 1 ...)" added up to 29."""
    u = Unusable()
    errors = ["missing caption"] * 5 + ["undecodable image: x", "caption is not UTF-8: y"]
    errors += ["empty caption", "incomplete sample: z"]
    for i, error in enumerate(errors):
        u.add(Sample(uid=f"{i:032x}", key=str(i), shard="a.tar", index=i, error=error))
    said = u.said()
    assert said.startswith("; 9 rows unusable (5 missing caption, ")
    assert said.endswith(", 2 for 2 other reason(s))")
