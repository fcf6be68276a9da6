#!/usr/bin/env bash
# SLURM, one process per GPU. jax.distributed.initialize() reads the SLURM variables itself.
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-task=1 launch/slurm_gpu.sh \
#       --config configs/instruct.py --workdir /shared/runs/paper --config.data.dir=... --config.model.llm.hf_path=...
# Dry run (prints the commands it would run, runs nothing; also outside SLURM):
#   DRY_RUN=1 launch/slurm_gpu.sh --config configs/instruct.py ...   (or: launch/slurm_gpu.sh --dry-run --config ...)
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
dry_run=${DRY_RUN:-0}
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi
safe='^[A-Za-z0-9_./:=,@%+-]+$'
show() {  # print a command as shell words (quoted only where needed), the form a dry run prints
  local a out=()
  for a in "$@"; do if [[ $a =~ $safe ]]; then out+=("$a"); else out+=("${a@Q}"); fi; done
  echo "${out[*]}"
}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
train=(srun --kill-on-bad-exit=1 python -m avi_jax.train --distributed "$@")
if [[ $dry_run == 1 ]]; then
  echo "export XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"
  show "${train[@]}"
  echo "# then, on exit status $PREEMPTED (preempted, checkpoint saved):"
  echo "scontrol requeue ${SLURM_JOB_ID:-\$SLURM_JOB_ID}"
  exit 0
fi
status=0
"${train[@]}" || status=$?
if [[ $status -eq $PREEMPTED ]]; then
  echo "avi_jax: preempted, checkpoint saved; requeueing job ${SLURM_JOB_ID}" \
       "(restart $(( ${SLURM_RESTART_COUNT:-0} + 1 )))"
  scontrol requeue "${SLURM_JOB_ID}"
fi
exit $status
