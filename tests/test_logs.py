"""pipeline/logs.py: a user reads diffin's lines, not the libraries' chatter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import logging
from pipeline import logs
logs.setup()
for name in ("ray", "botocore", "aiobotocore", "s3fs", "fsspec", "pipeline.score.driver"):
    print(name, logging.getLogger(name).isEnabledFor(logging.INFO))
"""


def test_third_party_chatter_is_turned_down_and_ours_is_not():
    # a process of its own: pytest's logging set-up is not a user's
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    enabled = dict(line.split() for line in out.splitlines())
    # aiobotocore: "Found credentials in environment variables." on every s3:// run
    assert enabled == {
        "ray": "False",
        "botocore": "False",
        "aiobotocore": "False",
        "s3fs": "False",
        "fsspec": "False",
        "pipeline.score.driver": "True",
    }
