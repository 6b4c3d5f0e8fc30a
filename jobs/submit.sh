#!/usr/bin/env bash
# Submit the whole pipeline to a Ray cluster, stage by stage (see docs/operations.md).
#   RAY_API=http://127.0.0.1:8265 DATA='s3://bucket/pool/{00000..00099}.tar' RUN=s3://bucket/runs/r1 \
#     TARGET='s3://bucket/curated/{00000..00003}.tar' jobs/submit.sh
# Optional: MODEL (default diffin-small), STEPS (default: diffin train's), WORKERS (4),
# THREADS (torch threads and Ray CPUs per scoring actor: at most a worker node's CPUs;
# default: diffin's; the training driver keeps its node's cores), KEEP (0.7), TARGET (a curated
# target set: recommended, docs/accuracy.md section 2), GPUS (GPUs per scoring actor: set 1
# on infra/'s clusters, whose GPU workers may have scaled to zero when scoring starts;
# default: diffin's, which counts the GPUs up at that moment), POLL (seconds between status
# checks, 10). DATA, RUN and TARGET must be absolute paths or URLs: a job runs in a
# temporary copy of this directory. On a token-authenticated cluster (infra/kuberay) export
# RAY_AUTH_MODE=token and RAY_AUTH_TOKEN first.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_API:=http://127.0.0.1:8265}" "${DATA:?set DATA}" "${RUN:?set RUN}"
: "${WORKERS:=4}" "${KEEP:=0.7}" "${MODEL:=diffin-small}"
train=(--model "$MODEL") score=()
if [ -n "${STEPS:-}" ]; then train+=(--steps "$STEPS"); fi
if [ -n "${TARGET:-}" ]; then score+=(--target "$TARGET"); fi
if [ -n "${THREADS:-}" ]; then score+=(--threads "$THREADS"); fi
if [ -n "${GPUS:-}" ]; then score+=(--gpus-per-worker "$GPUS"); fi
# The job's state, once it is no longer pending or running. Ray 2.60 prints "Job 'ID'
# succeeded" when it is done (earlier: "Status for job 'ID': SUCCEEDED") and "Status for job
# 'ID': RUNNING" before; the job's own message cannot name its ID in those words.
wait_for() {
  local id=$1 status misses=0
  while :; do
    if status=$(ray job status --address "$RAY_API" "$id" 2>&1); then
      misses=0
      case "$status" in
        *"job '$id': PENDING"* | *"job '$id': RUNNING"*) ;;
        *) printf '%s\n' "$status"; return ;;
      esac
    elif ((++misses >= 30)); then
      echo "submit.sh: no status for job $id from $RAY_API ($status); it may still be" \
           "running: ray job status --address $RAY_API $id" >&2
      exit 1
    fi
    sleep "${POLL:-10}"
  done
}
submit() {
  local id status
  id="diffin-$(date +%s)-$RANDOM"
  ray job submit --no-wait --address "$RAY_API" --submission-id "$id" \
      --runtime-env jobs/runtime_env.yaml -- "$@"
  # The log stream can drop (a `ray dashboard` tunnel closing during a long stage) while
  # the job goes on: the stream is only for reading, the status decides.
  ray job logs --follow --address "$RAY_API" "$id" ||
    echo "submit.sh: lost the log stream of job $id; waiting for it to finish" >&2
  status=$(wait_for "$id")
  # A job stopped with `ray job stop` ends too: go on only after a stage that succeeded.
  if [[ "$status" != *"Job '$id' succeeded"* && "$status" != *"job '$id': SUCCEEDED"* ]]; then
    printf '%s\n' "$status" >&2
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
