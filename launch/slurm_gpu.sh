#!/usr/bin/env bash
# SLURM, one process per GPU. jax.distributed.initialize() reads the SLURM variables itself.
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-task=1 launch/slurm_gpu.sh \
#       --config configs/instruct.py --workdir /shared/runs/paper --config.data.dir=... --config.model.llm.hf_path=...
# Preemption: SIGTERM (SLURM sends it two minutes before the time limit, see --signal) makes every process
# save a checkpoint at the next step and exit with status 42 (avi_jax.training.loop.Preempted.exit_code);
# this script then requeues the job, which resumes from that checkpoint. Any other status ends the job.
#SBATCH --job-name=avi_jax
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append         # a requeued job appends to the same log
#SBATCH --requeue
#SBATCH --signal=TERM@120          # SIGTERM two minutes before the time limit: a checkpoint is saved
set -euo pipefail
PREEMPTED=42
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
status=0
srun --kill-on-bad-exit=1 python -m avi_jax.train --distributed "$@" || status=$?
if [[ $status -eq $PREEMPTED ]]; then
  echo "avi_jax: preempted, checkpoint saved; requeueing job ${SLURM_JOB_ID} (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 )))"
  scontrol requeue "${SLURM_JOB_ID}"
fi
exit $status
