"""Train AVI-Talking stages: ``python -m avi_jax.train --config configs/instruct.py:demo --workdir runs/demo``.

Any config field can be overridden (``--config.align.total_steps=100``). Multi-host jobs call
``jax.distributed.initialize()`` (set ``--distributed`` or run under SLURM/TPU/coordinator env vars).
Rerunning the same command with the same workdir resumes; a rerun with a config that differs in a field
that defines an already trained stage stops and says so (``--retrain_from STAGE`` trains that stage and the
ones trained from it again).

Exit status: 0 when every stage finished; ``Preempted.exit_code`` (``avi_jax.training.loop``) after a
preemption checkpoint (one line ``preempted: ...``; rerunning resumes); 2 for a bad command line, config or
workdir, or any other error of the project's (``avi_jax.errors``), printed as one line ``error: ...`` on
stderr (with the traceback under ``--verbose``); 1 for anything else (a bug: the traceback is printed).
"""
from __future__ import annotations

import difflib
import logging as std_logging
import os
import re
import sys
from typing import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

EXIT_ERROR = 2     # the project's errors, as `python -m avi_jax.infer`

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
_RETRAIN_FROM = flags.DEFINE_list(
    "retrain_from", [], "Delete the workdir's folders of these stages (comma-separated) and of the stages "
    "trained from them, then train them again (e.g. after changing a field that defines them).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the traceback of errors too (not only one line).")
flags.mark_flags_as_required(["config", "workdir"])


def _one_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (a KeyError's key without its quotes)."""
    text = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _root_cause(e: BaseException) -> BaseException:
    seen = {id(e)}
    while (e.__cause__ or e.__context__) is not None and id(e.__cause__ or e.__context__) not in seen:
        e = e.__cause__ or e.__context__
        seen.add(id(e))
    return e


def _config_spec(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _unknown_override(argv: Sequence[str]) -> str | None:
    """``--config.a.b=V: unknown config field config.a.b (did you mean config.a.c?)`` for the first
    override naming a field the config does not have, or None."""
    import ml_collections
    spec = _config_spec(argv)
    if spec is None:
        return None
    try:
        config = flags.FLAGS["config"].parser.parse(spec)
    except Exception:   # noqa: BLE001 (reported by the caller from the original error)
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0]
        node, parts = config, path.split(".")
        for j, part in enumerate(parts):
            parent = ".".join(["config", *parts[:j]])
            if isinstance(node, ml_collections.ConfigDict) and part in node:
                node = node[part]
                continue
            if not isinstance(node, ml_collections.ConfigDict):
                return f"--config.{path}: {parent} is a {type(node).__name__} value, not a block of fields"
            close = difflib.get_close_matches(part, list(node.keys()), n=1)
            hint = f"did you mean {parent}.{close[0]}?" if close else f"{parent} has: {', '.join(sorted(node.keys()))}"
            return f"--config.{path}: unknown config field {parent}.{part} ({hint})"
    return None


def _flag_error(e: BaseException, argv: Sequence[str]) -> str:
    """One line for an error raised while parsing the command line (absl flags and config_flags: a config
    file that cannot be loaded, a ``get_config`` argument it rejects, a misspelt or mistyped override)."""
    root = _root_cause(e)
    if isinstance(root, (KeyError, AttributeError)) or isinstance(e, (KeyError, AttributeError)):
        unknown = _unknown_override(argv)
        if unknown:
            return unknown
    text = str(e)
    if "Failed loading config file" in text:
        detail = [line.strip() for line in text.splitlines() if "Errno" in line or "Error" in line.split(":")[0]]
        return f"--config {_config_spec(argv)}: cannot load the config file" + (f" ({detail[-1]})" if detail else "")
    first = _one_line(e)
    if root is not e and first.rstrip().endswith(":"):       # "flag --config=...: Error whilst parsing config file:"
        first = re.sub(r"Error whilst parsing config file:\s*$", "", first).rstrip(": ") + ": " + _one_line(root)
    return first


def _verbose_requested(argv: Sequence[str]) -> bool:
    return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in argv)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with each error as one line ``error: ...`` on stderr and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:   # noqa: BLE001 (every parse error of absl and config_flags)
        if _verbose_requested(argv):
            import traceback
            traceback.print_exc()
        print(f"error: {_flag_error(e, argv)}", file=sys.stderr)
        print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
        sys.exit(EXIT_ERROR)


def _cluster_detected() -> bool:
    env = os.environ
    return bool(env.get("JAX_COORDINATOR_ADDRESS")) or int(env.get("SLURM_NTASKS", "1")) > 1 or \
        bool(env.get("TPU_WORKER_HOSTNAMES") and "," in env.get("TPU_WORKER_HOSTNAMES", ""))


class _QuietLibraries(std_logging.Filter):
    """Drop INFO chatter of orbax/tfds (every checkpoint step logs a dozen lines)."""

    def filter(self, record):
        noisy = ("/orbax/", "/tensorflow_datasets/", "/grain/")
        return record.levelno >= 30 or not any(n in record.pathname for n in noisy)


def _loaded_config():
    """``--config``'s value; a config file that could not be loaded (config_flags reports that only when
    the value is first read) is one line ``error: ...`` and exit status 2."""
    try:
        config = _CONFIG.value
        config.get("family")
        return config
    except OSError as e:
        if _VERBOSE.value:
            logging.exception("config")
        print(f"error: {_flag_error(e, sys.argv)}", file=sys.stderr)
        sys.exit(EXIT_ERROR)


def main(argv):
    del argv
    config = _loaded_config()
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
    from avi_jax.errors import AviJaxError
    from avi_jax.training.experiment import train_and_evaluate
    from avi_jax.training.loop import Preempted
    try:
        train_and_evaluate(config, _WORKDIR.value, retrain_from=_RETRAIN_FROM.value)
    except Preempted as e:          # a checkpoint was saved: one line, and the status the launchers requeue on
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 1))
    except AviJaxError as e:
        if _VERBOSE.value:
            logging.exception("%s", type(e).__name__)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
