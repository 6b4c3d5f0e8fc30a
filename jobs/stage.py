"""`ray job submit` entrypoint for the stages that run in the driver: `python jobs/stage.py make-data|train|prune|evaluate|report ...`.

These stages run in the job's driver process (training is one process by
default), so the entrypoint is `diffin` itself; this wrapper only exists so
every stage is submitted the same way:

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml \
        -- python jobs/stage.py train --data 's3://bucket/pool/{00000..00099}.tar' --run s3://bucket/runs/r1
"""

from __future__ import annotations

import sys

STAGES = ("make-data", "train", "prune", "evaluate", "report")


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import main as diffin

    args = list(sys.argv[1:] if argv is None else argv)
    # -v is diffin's own flag, before the subcommand; accept it anywhere
    verbose = [a for a in args if a in ("-v", "--verbose")][:1]
    args = [a for a in args if a not in ("-v", "--verbose")]
    usage = f"usage: python jobs/stage.py [-v] {{{','.join(STAGES)}}} ARGS...  (STAGE --help: its flags)"
    if args in (["-h"], ["--help"]):
        print(usage)
        return 0
    if not args or args[0] not in STAGES:
        print(usage, file=sys.stderr)
        return 2
    return diffin([*verbose, *args])


if __name__ == "__main__":
    sys.exit(main())
