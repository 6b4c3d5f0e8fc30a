"""``diffin report``: one self-contained HTML page per run (figures and thumbnails inlined)."""
