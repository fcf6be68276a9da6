#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every worker; jax.distributed.initialize() auto-detects the pod.
#   launch/tpu_pod.sh my-tpu us-central2-b --config configs/instruct.py --workdir gs://bucket/runs/paper ...
# Preemption (a maintenance event's SIGTERM): every worker saves a checkpoint at the step they agree on
# and exits with status 42 (avi_jax.training.loop.Preempted.exit_code); this script then reruns the same
# command, which resumes from that checkpoint, once the TPU is READY again, at most MAX_RESTARTS times
# (default 20). Any other outcome ends the script with the command's status.
set -uo pipefail
PREEMPTED=42
tpu=${1:?usage: $0 TPU_NAME ZONE TRAIN_ARGS...}; zone=${2:?zone}; shift 2
args=$(printf '%q ' "$@")
max_restarts=${MAX_RESTARTS:-20}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for ((restart = 0; ; restart++)); do
  # each worker prints a marker line when it exits with 42 (gcloud may not pass a worker's status through)
  gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
    "cd ~/avi_jax && pip install -q -e . && { python -m avi_jax.train --distributed $args; s=\$?; \
     [ \$s -eq $PREEMPTED ] && echo avi_jax-preempted; exit \$s; }" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  if ! grep -q 'avi_jax-preempted' "$log" || [[ $restart -ge $max_restarts ]]; then
    exit "$status"
  fi
  echo "avi_jax: preempted, checkpoint saved; rerunning (restart $((restart + 1)) of at most $max_restarts)"
  until [[ "$(gcloud compute tpus tpu-vm describe "$tpu" --zone "$zone" --format='value(state)')" == READY ]]; do
    sleep 30
  done
done
