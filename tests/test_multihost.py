"""Multi-host training (issue 12), on one machine: ``launch/local_multiprocess.sh`` starts 2 processes of 2
fake CPU devices each (``jax.distributed`` on localhost, a free port), compared with a 1-process run on 4
devices (this process, ``mesh.data=4``):

* the tiny instruct config (its ``lm`` stage) and the tiny motion config train to the same
  ``train_metrics.jsonl``, step for step;
* the examples each process reads (the loop's ``--verbosity=1`` debug line per step) are its block of each
  global batch; together, step for step, they are the 1-process run's batches, and every epoch is read
  whole, each record by one process;
* a checkpoint of the 2-process run restores in a new 2-process run and continues to the uninterrupted
  run's losses and parameters, also when its newest step is damaged for one process only: both processes
  fall back to the same older step (issue 10).

Tolerance (losses, rtol 1e-5): the 2 processes sum gradients across processes in another order than one
process does over its 4 devices, so parameters drift apart by float32 rounding; measured over the 6 steps:
|loss difference| <= 4.8e-7 (lm, relative 8e-8) and <= 2.4e-7 (motion), 0 at step 1. Rows in another order
would meet other per-row random draws (instruction templates, dropout masks, target windows) and change
the losses; the rows themselves are compared exactly (the example indices here, every
array in tests/test_data_pipeline.py).
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from avi_jax.data import builder, demo
from avi_jax.training.experiment import train_and_evaluate
from configs import instruct, motion_prior
from helpers import free_port, tiny_config

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6          # the tiny configs' total_steps: 6 batches of 8 = 2 epochs of the 24 training clips
READ = re.compile(r"stage (\w+): step (\d+): process (\d+) read examples \[([\d, ]*)\]")
FAMILIES = {  # family: (config module, config spec, stage, overrides beyond data.dir)
    "instruct": (instruct, "configs/instruct.py:tiny", "lm", {"stages": ("lm",)}),
    "motion": (motion_prior, "configs/motion_prior.py:tiny", "motion", {}),
}


def _reads(lines) -> dict[tuple[int, int], list[int]]:
    """``{(step, process): record indices}`` from the loop's debug lines."""
    out = {}
    for line in lines:
        m = READ.search(line)
        if m:
            out[int(m[2]), int(m[3])] = [int(i) for i in m[4].split(",")]
    return out


def start(workdir: str, spec: str, overrides: dict, log: str) -> subprocess.Popen:
    """``launch/local_multiprocess.sh 2 --config SPEC --workdir WORKDIR --config.K=V ... --verbosity=1`` with
    2 fake CPU devices per process, in its own process group, output to ``log``."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PORT": str(free_port()), "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    args = [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}" for k, v in overrides.items()]
    with open(log, "w") as f:
        return subprocess.Popen(["bash", str(REPO / "launch" / "local_multiprocess.sh"), "2", "--config", spec,
                                 "--workdir", workdir, "--verbosity=1", *args], cwd=REPO, env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: str) -> str:
    """Wait for :func:`start`'s job (killing its process group after 15 minutes); its output (asserts exit
    status 0)."""
    try:
        code = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = open(log).read()
    assert code == 0, text[-3000:]
    return text


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        if "read examples" in str(record.msg):
            self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The tiny configs' demo corpus (both families use the same one), built before any run."""
    path = tmp_path_factory.mktemp("multihost_data")
    prepared = demo.prepare_demo(str(path), seed=0, num_speakers=4, clip_seconds=1.0)
    assert len(builder.open_split(prepared, "train")) == 24
    return str(path)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def runs(request, tmp_path_factory, data_dir):
    """The family's tiny run as 2 processes (``local_multiprocess.sh``) and as 1 process on 4 devices."""
    module, spec, stage, extra = FAMILIES[request.param]
    overrides = {"data.dir": data_dir, **extra}
    root = tmp_path_factory.mktemp(f"multihost_{request.param}")
    multi, log = str(root / "two_processes"), str(root / "two_processes.log")
    job = start(multi, spec, overrides, log)          # runs while this process trains the reference
    one = str(root / "one_process")
    recorder, logger = _Recorder(), logging.getLogger()
    level = logger.level
    logger.addHandler(recorder)
    logger.setLevel(logging.DEBUG)
    try:
        train_and_evaluate(tiny_config(module, **overrides, **{"mesh.data": 4}), one)
    except BaseException:
        os.killpg(job.pid, signal.SIGKILL)
        raise
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(level)
    log = finish(job, log)
    return {"stage": stage, "spec": spec, "overrides": overrides, "multi": multi, "one": one,
            "multi_reads": _reads(log.splitlines()), "one_reads": _reads(recorder.lines)}


def _rows(workdir, stage):
    with open(os.path.join(workdir, stage, "train_metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["step"] for r in rows], np.array([r["loss"] for r in rows])


def test_two_processes_train_like_one(runs):
    steps, losses = _rows(runs["multi"], runs["stage"])
    want_steps, want = _rows(runs["one"], runs["stage"])
    assert steps == want_steps == list(range(1, STEPS + 1))
    np.testing.assert_allclose(losses, want, rtol=1e-5)


def test_processes_read_disjoint_blocks_of_every_epoch(runs):
    multi, one = runs["multi_reads"], runs["one_reads"]
    assert sorted(multi) == [(s, p) for s in range(1, STEPS + 1) for p in (0, 1)]
    assert sorted(one) == [(s, 0) for s in range(1, STEPS + 1)]
    for s in range(1, STEPS + 1):
        assert len(multi[s, 0]) == len(multi[s, 1]) == 4
        assert multi[s, 0] + multi[s, 1] == one[s, 0], s     # the global batch, row for row
    per_epoch = 24 // 8
    for e in range(STEPS // per_epoch):
        steps = range(e * per_epoch + 1, (e + 1) * per_epoch + 1)
        host = [[i for s in steps for i in multi[s, p]] for p in (0, 1)]
        assert len(set(host[0])) == len(host[0]) == 12 and not set(host[0]) & set(host[1]), e
        assert sorted(host[0] + host[1]) == list(range(24)), e


@pytest.mark.parametrize("damage", [None, "process-1-iterator-state"])
def test_a_two_process_checkpoint_resumes_exactly(runs, damage, tmp_path):
    """The finished 2-process run with its end undone (as if killed in step 6): a new 2-process run resumes
    from checkpoint 3, trains steps 4..6 again and ends with the same losses and parameters. Not damaged:
    checkpoint 6 was never written. Damaged: checkpoint 6 lacks process 1's data-iterator file (and the
    checksum record, so that process 0 alone restores it): both processes skip it and resume from 3."""
    if runs["stage"] != "lm":
        pytest.skip("one family is enough (the cheapest stage)")
    stage = runs["stage"]
    workdir = str(tmp_path / "run")
    shutil.copytree(runs["multi"], workdir)
    checkpoints = os.path.join(workdir, stage, "checkpoints")
    assert sorted(int(s) for s in os.listdir(checkpoints) if s.isdigit())[-2:] == [3, STEPS]
    for f in (os.path.join(stage, "final_metrics.json"), os.path.join(stage, "params.safetensors"),
              "final_metrics.json"):
        os.remove(os.path.join(workdir, f))
    if damage:
        os.remove(os.path.join(checkpoints, str(STEPS), "data", "process_1-of-2.json"))
        record = os.path.join(checkpoints, str(STEPS), "avi_jax_checksums.json")
        if os.path.exists(record):
            os.remove(record)
    else:
        shutil.rmtree(os.path.join(checkpoints, str(STEPS)))
    log = finish(start(workdir, runs["spec"], runs["overrides"], str(tmp_path / "resume.log")),
                 str(tmp_path / "resume.log"))
    assert log.count(f"stage {stage}: resumed from step 3") == 2, log[-3000:]
    if damage:
        assert log.count(f"checkpoint step {STEPS} is damaged") == 2
        assert log.count(f"resumed from checkpoint step 3 instead of the damaged step(s) [{STEPS}]") == 2
        assert [d.split("-")[0] for d in os.listdir(os.path.join(workdir, stage, "damaged_checkpoints"))] == \
            [str(STEPS)]
    steps, losses = _rows(workdir, stage)
    want_steps, want = _rows(runs["multi"], stage)
    assert steps == want_steps
    np.testing.assert_allclose(losses, want, rtol=1e-6)
    got = load_file(os.path.join(workdir, stage, "params.safetensors"))
    expected = load_file(os.path.join(runs["multi"], stage, "params.safetensors"))
    assert got.keys() == expected.keys()
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-6, atol=1e-7, err_msg=k)
