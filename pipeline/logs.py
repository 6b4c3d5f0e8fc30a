"""Readable logs for people: one format, third-party chatter turned down."""

from __future__ import annotations

import logging
import os
import warnings


def setup(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in (
        "ray",
        "urllib3",
        "botocore",
        "aiobotocore",
        "s3fs",
        "fsspec",
        "PIL",
        "matplotlib",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # torch.jit.script's deprecation warning fires inside open_clip on every model build.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # inherited by Ray workers
