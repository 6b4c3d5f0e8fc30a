"""`ray job submit` entrypoint for the score stage.

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml \
        -- python jobs/score.py --data 's3://bucket/pool/{00000..00099}.tar' --run s3://bucket/runs/r1

Same flags as `diffin score`, and `-v`. Inside a Ray job the driver connects to the
job's cluster (RAY_ADDRESS, set by Ray), so `--address` defaults to `auto`
here. Rerunning the same command resumes from the shards already scored.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import main as diffin

    args = list(sys.argv[1:] if argv is None else argv)
    # -v is diffin's own flag, before the subcommand
    verbose = [a for a in args if a in ("-v", "--verbose")][:1]
    args = [a for a in args if a not in ("-v", "--verbose")]
    if not any(a == "--address" or a.startswith("--address=") for a in args):
        args += ["--address", "auto"]
    return diffin([*verbose, "score", *args])


if __name__ == "__main__":
    sys.exit(main())
