#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every worker; jax.distributed.initialize() auto-detects the pod.
#   launch/tpu_pod.sh my-tpu us-central2-b --config configs/instruct.py --workdir gs://bucket/runs/paper ...
set -euo pipefail
tpu=${1:?usage: $0 TPU_NAME ZONE TRAIN_ARGS...}; zone=${2:?zone}; shift 2
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/avi_jax && pip install -q -e . && python -m avi_jax.train --distributed $args"
