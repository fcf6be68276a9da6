#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every worker; jax.distributed.initialize() auto-detects the pod.
#   launch/tpu_pod.sh my-tpu us-central2-b --config configs/instruct.py --workdir /mnt/shared/runs/paper ...
# The workdir, data and model folders are paths every worker reads and writes alike (a shared filesystem:
# Filestore/NFS or a gcsfuse mount; the workdir is written with plain file I/O, so not a gs:// URL), and
# ~/avi_jax is this repository on every worker.
# Dry run (prints the gcloud commands it would run, runs nothing):
#   DRY_RUN=1 launch/tpu_pod.sh my-tpu us-central2-b --config ...   (or: launch/tpu_pod.sh --dry-run my-tpu ...)
# Preemption (a maintenance event's SIGTERM): every worker saves a checkpoint at the step they agree on
# and exits with status 42 (avi_jax.training.loop.Preempted.exit_code); this script then reruns the same
# command, which resumes from that checkpoint, once the TPU is READY again, at most MAX_RESTARTS times
# (default 20). Any other outcome ends the script with the command's status.
set -uo pipefail
PREEMPTED=42
dry_run=${DRY_RUN:-0}
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi
safe='^[A-Za-z0-9_./:=,@%+-]+$'
show() {  # print a command as shell words (quoted only where needed), the form a dry run prints
  local a out=()
  for a in "$@"; do if [[ $a =~ $safe ]]; then out+=("$a"); else out+=("${a@Q}"); fi; done
  echo "${out[*]}"
}
tpu=${1:?usage: $0 [--dry-run] TPU_NAME ZONE TRAIN_ARGS...}; zone=${2:?zone}; shift 2
args=$(printf '%q ' "$@")
max_restarts=${MAX_RESTARTS:-20}
# each worker prints a marker line when it exits with 42 (gcloud may not pass a worker's status through)
remote="cd ~/avi_jax && pip install -q -e . && { python -m avi_jax.train --distributed $args; s=\$?; \
[ \$s -eq $PREEMPTED ] && echo avi_jax-preempted; exit \$s; }"
train=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$remote")
state=(gcloud compute tpus tpu-vm describe "$tpu" --zone "$zone" "--format=value(state)")
if [[ $dry_run == 1 ]]; then
  show "${train[@]}"
  echo "# then, when a worker printed avi_jax-preempted (at most $max_restarts times):"
  echo "# every 30 s until it prints READY,"
  show "${state[@]}"
  echo "# and the first command again"
  exit 0
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for ((restart = 0; ; restart++)); do
  "${train[@]}" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  if ! grep -q 'avi_jax-preempted' "$log" || [[ $restart -ge $max_restarts ]]; then
    exit "$status"
  fi
  echo "avi_jax: preempted, checkpoint saved; rerunning (restart $((restart + 1)) of at most $max_restarts)"
  until [[ "$("${state[@]}")" == READY ]]; do
    sleep 30
  done
done
