#!/usr/bin/env bash
# Submit the whole pipeline to a Ray cluster, stage by stage (see docs/operations.md).
#   RAY_API=http://127.0.0.1:8265 DATA='s3://bucket/pool/{00000..00099}.tar' RUN=s3://bucket/runs/r1 jobs/submit.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_API:=http://127.0.0.1:8265}" "${DATA:?set DATA}" "${RUN:?set RUN}"
: "${WORKERS:=4}" "${KEEP:=0.7}"
submit() { ray job submit --address "$RAY_API" --runtime-env jobs/runtime_env.yaml -- "$@"; }
submit python jobs/stage.py train --data "$DATA" --run "$RUN" --model diffin-small
submit python jobs/score.py --data "$DATA" --run "$RUN" --workers "$WORKERS" --max-attempts 3
submit python jobs/stage.py prune --run "$RUN" --keep "$KEEP" --method diffin
