#!/usr/bin/env bash
# Submit the whole pipeline to a Ray cluster, stage by stage (see docs/operations.md).
#   RAY_API=http://127.0.0.1:8265 DATA='s3://bucket/pool/{00000..00099}.tar' RUN=s3://bucket/runs/r1 \
#     TARGET='s3://bucket/curated/{00000..00003}.tar' jobs/submit.sh
# Optional: MODEL (default diffin-small), STEPS (default: diffin train's), WORKERS (4),
# THREADS (torch threads and Ray CPUs per scoring actor: at most a worker node's CPUs;
# default: diffin's; the training driver keeps its node's cores), KEEP (0.7), TARGET (a curated
# target set: recommended, docs/accuracy.md section 2). DATA, RUN and TARGET must be
# absolute paths or URLs: a job runs in a temporary copy of this directory.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_API:=http://127.0.0.1:8265}" "${DATA:?set DATA}" "${RUN:?set RUN}"
: "${WORKERS:=4}" "${KEEP:=0.7}" "${MODEL:=diffin-small}"
train=(--model "$MODEL") score=()
if [ -n "${STEPS:-}" ]; then train+=(--steps "$STEPS"); fi
if [ -n "${TARGET:-}" ]; then score+=(--target "$TARGET"); fi
if [ -n "${THREADS:-}" ]; then score+=(--threads "$THREADS"); fi
submit() {
  local id
  id="diffin-$(date +%s)-$RANDOM"
  ray job submit --address "$RAY_API" --submission-id "$id" \
      --runtime-env jobs/runtime_env.yaml -- "$@"
  # `ray job submit` exits 0 for a job stopped with `ray job stop` too: go on only after
  # a stage that succeeded.
  # (the output captured first: grep -q closing the pipe early fails it under pipefail)
  # Ray 2.60 prints "Job 'ID' succeeded" (earlier: "Status for job 'ID': SUCCEEDED"); the
  # job's own message, printed after a failure, cannot name its ID in those words.
  local status
  status=$(ray job status --address "$RAY_API" "$id")
  if [[ "$status" != *"Job '$id' succeeded"* && "$status" != *"job '$id': SUCCEEDED"* ]]; then
    echo "submit.sh: job $id ($*) did not succeed; stopping before the next stage" >&2
    exit 1
  fi
}
# ${a[@]+"${a[@]}"}: an empty array under set -u, which bash before 4.4 (macOS) refuses
submit python jobs/stage.py train --data "$DATA" --run "$RUN" "${train[@]}"
submit python jobs/score.py --data "$DATA" --run "$RUN" --workers "$WORKERS" --max-attempts 3 \
    ${score[@]+"${score[@]}"}
submit python jobs/stage.py prune --run "$RUN" --keep "$KEEP" --method diffin
submit python jobs/stage.py report --run "$RUN"
