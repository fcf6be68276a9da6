"""Train AVI-Talking stages: ``python -m avi_jax.train --config configs/instruct.py:demo --workdir runs/demo``.

Any config field can be overridden (``--config.align.total_steps=100``). Multi-host jobs call
``jax.distributed.initialize()`` (set ``--distributed`` or run under SLURM/TPU/coordinator env vars).
Rerunning the same command with the same workdir resumes.
"""
from __future__ import annotations

import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/instruct.py:demo.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Call jax.distributed.initialize() (default: when a cluster environment "
    "is detected: JAX_COORDINATOR_ADDRESS, SLURM_NTASKS>1, or a TPU pod).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (else JAX_COORDINATOR_ADDRESS / cluster auto-detection).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (else JAX_NUM_PROCESSES / auto).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (else JAX_PROCESS_ID / auto).")
flags.mark_flags_as_required(["config", "workdir"])


def _cluster_detected() -> bool:
    env = os.environ
    return bool(env.get("JAX_COORDINATOR_ADDRESS")) or int(env.get("SLURM_NTASKS", "1")) > 1 or \
        bool(env.get("TPU_WORKER_HOSTNAMES") and "," in env.get("TPU_WORKER_HOSTNAMES", ""))


class _QuietLibraries(std_logging.Filter):
    """Drop INFO chatter of orbax/tfds (every checkpoint step logs a dozen lines)."""

    def filter(self, record):
        noisy = ("/orbax/", "/tensorflow_datasets/", "/grain/")
        return record.levelno >= 30 or not any(n in record.pathname for n in noisy)


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_QuietLibraries())
    import jax
    distributed = _DISTRIBUTED.value if _DISTRIBUTED.value is not None else _cluster_detected()
    if distributed:
        env = os.environ
        num = _NUM_PROCESSES.value or (int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None)
        pid = _PROCESS_ID.value
        if pid is None and "JAX_PROCESS_ID" in env:
            pid = int(env["JAX_PROCESS_ID"])
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=num, process_id=pid)
    jax.config.update("jax_threefry_partitionable", True)
    logging.info("JAX %s: process %d/%d, %d local / %d global devices (%s)", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform)
    from avi_jax.training.experiment import train_and_evaluate
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
