#!/usr/bin/env bash
# Run a training job as N local processes (one host, CPU or one GPU each), the way a multi-host job runs:
#   launch/local_multiprocess.sh 2 --config configs/instruct.py:tiny --workdir runs/mp
# Each process gets JAX_PROCESS_ID; process 0 is the coordinator on localhost:${PORT:-12355}.
set -euo pipefail
n=${1:?usage: $0 NUM_PROCESSES TRAIN_ARGS...}; shift
port=${PORT:-12355}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS="localhost:${port}" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i" \
    python -m avi_jax.train --distributed "$@" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
