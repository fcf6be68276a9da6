"""The cluster launchers (issue 12): ``launch/slurm_gpu.sh`` and ``launch/tpu_pod.sh``.

A dry run (``DRY_RUN=1`` or ``--dry-run``) prints the exact commands and runs none of them; a real run,
with stand-ins for ``srun``/``scontrol``/``gcloud`` on the PATH that record their arguments, requeues or
reruns the job on the preemption status (42) and on nothing else.
"""
from __future__ import annotations

import os
import pathlib
import shlex
import subprocess

import pytest

from avi_jax.training.loop import Preempted

REPO = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--config", "configs/instruct.py", "--workdir", "/shared/runs/paper", "--config.data.dir=/data/my set",
        "--config.stages=('align',)"]
TRAIN = ["python", "-m", "avi_jax.train", "--distributed", *ARGS]
SEP = "\x1f"
# A stand-in for srun, scontrol and gcloud: records its name and arguments, then behaves as FAKE_<NAME> says.
FAKE = r"""#!/usr/bin/env bash
name=$(basename "$0")
(IFS=$'\x1f'; echo "$name$IFS$*") >> "$CALLS"
case "$name $1 $4" in
  "srun "*) exit "${FAKE_SRUN_STATUS:-0}" ;;
  "gcloud compute ssh")
    n=$(grep -c "ssh" "$CALLS")
    if (( n <= ${FAKE_PREEMPTIONS:-0} )); then echo "avi_jax-preempted"; exit 42; fi; exit 0 ;;
  "gcloud compute describe") echo READY ;;
esac
"""


@pytest.fixture
def tools(tmp_path):
    """PATH with recording stand-ins for srun, scontrol and gcloud; returns (env, calls())."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol", "gcloud"):
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(log),
           "SLURM_JOB_ID": "777"}
    env.pop("DRY_RUN", None)

    def calls() -> list[list[str]]:
        return [line.split(SEP) for line in log.read_text().splitlines()] if log.exists() else []

    return env, calls


def _run(script: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "launch" / script), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def _commands(stdout: str) -> list[list[str]]:
    """The printed commands (comment lines dropped) as argument lists."""
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize("how", ["env", "flag"])
def test_slurm_dry_run_prints_the_commands_and_runs_none(tools, how):
    env, calls = tools
    args = ["--dry-run", *ARGS] if how == "flag" else ARGS
    out = _run("slurm_gpu.sh", args, {**env, "DRY_RUN": "1"} if how == "env" else env)
    assert out.returncode == 0, out.stderr
    assert _commands(out.stdout) == [["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"],
                                     ["srun", "--kill-on-bad-exit=1", *TRAIN],
                                     ["scontrol", "requeue", "777"]]
    assert f"on exit status {Preempted.exit_code}" in out.stdout
    assert calls() == []


@pytest.mark.parametrize("status", [0, 1, Preempted.exit_code])
def test_slurm_requeues_on_the_preemption_status_only(tools, status):
    env, calls = tools
    out = _run("slurm_gpu.sh", ARGS, {**env, "FAKE_SRUN_STATUS": str(status)})
    assert out.returncode == status
    requeue = [["scontrol", "requeue", "777"]] if status == Preempted.exit_code else []
    assert calls() == [["srun", "--kill-on-bad-exit=1", *TRAIN], *requeue]


def _remote_train(command: list[str]) -> list[str]:
    """The training command inside the ``--command`` of ``gcloud ... ssh``."""
    remote = shlex.split(command[command.index("--command") + 1])
    start = remote.index("python")
    return remote[start:remote.index(";", start)]


@pytest.mark.parametrize("how", ["env", "flag"])
def test_tpu_dry_run_prints_the_commands_and_runs_none(tools, how):
    env, calls = tools
    args = ["my-tpu", "us-central2-b", *ARGS]
    out = _run("tpu_pod.sh", ["--dry-run", *args] if how == "flag" else args,
               {**env, "DRY_RUN": "1"} if how == "env" else env)
    assert out.returncode == 0, out.stderr
    ssh, describe = _commands(out.stdout)
    assert ssh[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone", "us-central2-b",
                       "--worker=all"]
    assert _remote_train(ssh) == TRAIN
    assert describe == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-tpu", "--zone", "us-central2-b",
                        "--format=value(state)"]
    assert calls() == []


@pytest.mark.parametrize("preemptions", [0, 2])
def test_tpu_reruns_after_each_preemption(tools, preemptions):
    """Each preempted attempt (a worker printed the marker) is followed by a READY check and a rerun."""
    env, calls = tools
    out = _run("tpu_pod.sh", ["my-tpu", "us-central2-b", *ARGS], {**env, "FAKE_PREEMPTIONS": str(preemptions)})
    assert out.returncode == 0, out.stderr
    kinds = [c[4] for c in calls()]
    assert kinds == ["ssh", "describe"] * preemptions + ["ssh"]
    assert all(_remote_train(c) == TRAIN for c in calls() if c[4] == "ssh")
    assert out.stdout.count("rerunning (restart") == preemptions


def test_tpu_gives_up_after_max_restarts(tools):
    env, calls = tools
    out = _run("tpu_pod.sh", ["my-tpu", "us-central2-b", *ARGS],
               {**env, "FAKE_PREEMPTIONS": "5", "MAX_RESTARTS": "1"})
    assert out.returncode == Preempted.exit_code
    assert [c[4] for c in calls()] == ["ssh", "describe", "ssh"]
