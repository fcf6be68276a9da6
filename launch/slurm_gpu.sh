#!/usr/bin/env bash
# SLURM, one process per GPU. jax.distributed.initialize() reads the SLURM variables itself.
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-task=1 launch/slurm_gpu.sh \
#       --config configs/instruct.py --workdir /shared/runs/paper --config.data.dir=... --config.model.llm.hf_path=...
#SBATCH --job-name=avi_jax
#SBATCH --output=%x-%j.out
#SBATCH --signal=TERM@120          # SIGTERM two minutes before the time limit: a checkpoint is saved
set -euo pipefail
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
srun --kill-on-bad-exit=1 python -m avi_jax.train --distributed "$@"
