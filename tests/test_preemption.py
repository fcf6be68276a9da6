"""A run survives its interruptions (issue 10), on the cheapest stage (the demo's lm, 6 tiny steps):

* SIGTERM on a step that is also a checkpoint step saves once, waits, raises ``Preempted`` (with the CLI's
  exit status) and the restart equals an uninterrupted run;
* a damaged latest checkpoint (truncated data files, a missing ``manifest.ocdbt``, a missing data-iterator
  file, flipped bytes in the index or in the array data) is skipped: the run resumes from the step before
  and ends with the same parameters as an uninterrupted run; with no intact checkpoint, one ``CheckpointError``;
* after a resume, ``train_metrics.jsonl`` holds each step once (rows past the restored step are dropped);
* a SIGKILL while an async save is being committed resumes like an uninterrupted run;
* a truncated ``params.safetensors`` is a ``CheckpointError`` naming the file.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from avi_jax import sharding as mesh_lib
from avi_jax.checkpoints.exported import export_params, load_exported
from avi_jax.errors import CheckpointError
from avi_jax.training.experiment import train_and_evaluate
from avi_jax.training.loop import Preempted
from configs import instruct
from helpers import free_port, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("preemption_data")


def _config(data_dir, every):
    return tiny_config(instruct, **{"data.dir": str(data_dir), "stages": ("lm",), "checkpoint.every": every,
                                    "lm.total_steps": 6, "lm.log_every": 1})


def _rows(workdir):
    with open(os.path.join(workdir, "lm", "train_metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["step"] for r in rows], np.array([r["loss"] for r in rows])


def _assert_same_run(workdir, straight):
    """The same history (each step once, loss for loss) and the same final parameters."""
    steps, losses = _rows(workdir)
    assert steps == list(range(1, 7))
    np.testing.assert_allclose(losses, _rows(straight)[1], rtol=1e-6)
    got = load_file(os.path.join(workdir, "lm", "params.safetensors"))
    want = load_file(os.path.join(straight, "lm", "params.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
    """6 uninterrupted steps."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    train_and_evaluate(_config(data_dir, 1000), workdir)
    return workdir


def _interrupt_at(monkeypatch, batch: int, action) -> None:
    """Call ``action()`` when the ``batch``-th batch (1-based) is sharded, i.e. during step ``batch``."""
    real = mesh_lib.shard_batch
    calls = {"n": 0}

    def shard(b, mesh):
        calls["n"] += 1
        if calls["n"] == batch:
            action()
        return real(b, mesh)

    monkeypatch.setattr(mesh_lib, "shard_batch", shard)


# ---- SIGTERM ------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("step", [1, 3], ids=["first-step", "interval-step"])
def test_sigterm_on_a_checkpoint_step_saves_once_and_resumes_exactly(step, tmp_path, data_dir, straight,
                                                                     monkeypatch):
    """Orbax saves step 1 and every multiple of checkpoint.every (3) by itself: the preemption reuses that
    save instead of saving the step again (StepAlreadyExistsError)."""
    config, workdir = _config(data_dir, 3), str(tmp_path / "run")
    _interrupt_at(monkeypatch, step, lambda: os.kill(os.getpid(), signal.SIGTERM))
    stopped = rf"stage lm: stopped at step {step} by a preemption notice \(SIGTERM\); checkpoint saved"
    with pytest.raises(Preempted, match=stopped) as info:
        train_and_evaluate(config, workdir)
    assert info.value.exit_code == Preempted.exit_code == 42
    checkpoints = os.path.join(workdir, "lm", "checkpoints")
    assert max(int(s) for s in os.listdir(checkpoints) if s.isdigit()) == step
    assert os.path.exists(os.path.join(checkpoints, str(step), "commit_success.txt"))   # waited for
    assert _rows(workdir)[0] == list(range(1, step + 1))
    monkeypatch.undo()
    train_and_evaluate(config, workdir)
    _assert_same_run(workdir, straight)


# ---- damaged checkpoints and the metrics history --------------------------------------------------------

@pytest.fixture(scope="module")
def crashed(tmp_path_factory, data_dir):
    """A run killed during step 6 (checkpoint.every 2): checkpoints 1, 2 and 4; metrics rows 1..5."""
    workdir = str(tmp_path_factory.mktemp("crashed"))

    def crash():
        raise RuntimeError("killed")

    with pytest.MonkeyPatch.context() as mp:
        _interrupt_at(mp, 6, crash)
        with pytest.raises(RuntimeError, match="killed"):
            train_and_evaluate(_config(data_dir, 2), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "lm", "checkpoints"))) == ["1", "2", "4"]
    assert _rows(workdir)[0] == [1, 2, 3, 4, 5]
    return workdir


def _copy(crashed, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(crashed, workdir)
    return workdir


def _truncate_data(step_dir):
    """Every array-data file of the state, cut to half its size."""
    files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def _remove_manifest(step_dir):
    os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


def _remove_iterator_state(step_dir):
    files = glob.glob(os.path.join(step_dir, "data", "process_*.json"))
    assert files
    for f in files:
        os.remove(f)


def _invert_64_bytes(path):
    """64 bytes inverted in the middle of the file."""
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    with open(path, "wb") as fh:
        fh.write(bytes(data))


def _flip_bytes(step_dir):
    """In the state's b-tree file (tensorstore's own checksums catch this)."""
    (f,) = glob.glob(os.path.join(step_dir, "state", "d", "*"))
    _invert_64_bytes(f)


def _flip_array_bytes(step_dir):
    """In the largest array-data file: tensorstore does not checksum these (it would restore other
    numbers silently); the step's SHA-256 record catches it."""
    _invert_64_bytes(max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")),
                         key=os.path.getsize))


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_truncate_data, _remove_manifest, _remove_iterator_state, _flip_bytes,
                                    _flip_array_bytes],
                         ids=["truncated-data", "no-manifest", "no-iterator-state", "flipped-bytes",
                              "flipped-array-bytes"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_step(damage, crashed, straight, tmp_path,
                                                                   data_dir, caplog):
    workdir = _copy(crashed, tmp_path)
    damage(os.path.join(workdir, "lm", "checkpoints", "4"))
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(_config(data_dir, 2), workdir)
    skipped = [r.getMessage() for r in caplog.records if "checkpoint step 4 is damaged" in r.getMessage()]
    assert len(skipped) == 1 and "stage lm" in skipped[0] and "\n" not in skipped[0], skipped
    assert len(skipped[0]) < 600
    assert any("resumed from checkpoint step 2 instead of the damaged step(s) [4]" in r.getMessage()
               for r in caplog.records)
    aside = os.listdir(os.path.join(workdir, "lm", "damaged_checkpoints"))
    assert len(aside) == 1 and aside[0].startswith("4-")
    _assert_same_run(workdir, straight)     # steps 3..6 trained again, rows 3..5 of the crash dropped


@pytest.mark.slow
def test_no_intact_checkpoint_is_one_clear_error(crashed, tmp_path, data_dir):
    workdir = _copy(crashed, tmp_path)
    for step in ("1", "2", "4"):
        _remove_manifest(os.path.join(workdir, "lm", "checkpoints", step))
    with pytest.raises(CheckpointError, match=r"lm/checkpoints: no intact checkpoint \(steps \[4, 2, 1\] all "
                                              r"failed to restore; the last: .*manifest.ocdbt: missing"):
        train_and_evaluate(_config(data_dir, 2), workdir)
    # nothing was moved or trained
    assert sorted(os.listdir(os.path.join(workdir, "lm", "checkpoints"))) == ["1", "2", "4"]
    assert not os.path.exists(os.path.join(workdir, "lm", "damaged_checkpoints"))


@pytest.mark.slow
def test_resume_drops_the_metrics_rows_past_the_restored_step(crashed, straight, tmp_path, data_dir):
    """Killed during step 6 after logging step 5 (and mid-write of a row): resumed from 4, the file holds
    steps 1..6 once each, equal to an uninterrupted run."""
    workdir = _copy(crashed, tmp_path)
    with open(os.path.join(workdir, "lm", "train_metrics.jsonl"), "a") as f:
        f.write('{"step": 6, "lo')        # a row torn by the kill
    train_and_evaluate(_config(data_dir, 2), workdir)
    _assert_same_run(workdir, straight)


# ---- exported parameters ------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0.5, 0.999, 16], ids=["half", "last-bytes", "header-only"])
def test_truncated_params_safetensors_is_a_checkpoint_error(keep, tmp_path):
    path = str(tmp_path / "lm" / "params.safetensors")
    params = {"llm": {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64)}}
    export_params(params, path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep) if keep < 1 else int(keep))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(path)}: .*damaged or truncated"):
        load_exported(path, abstract)


# ---- two processes --------------------------------------------------------------------------------------

def _launch(workdir, data_dir, port, tmp_path, tag):
    """``python -m avi_jax.train`` as 2 processes of one CPU device each (what launch/local_multiprocess.sh
    does); returns the processes and their log files."""
    import subprocess
    import sys
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "JAX_NUM_PROCESSES": "2",
           "JAX_COORDINATOR_ADDRESS": f"localhost:{port}"}
    procs, logs = [], []
    for i in range(2):
        logs.append(str(tmp_path / f"{tag}{i}.log"))
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "avi_jax.train", "--distributed",
                 "--config", "configs/instruct.py:tiny", "--workdir", workdir,
                 f"--config.data.dir={data_dir}", "--config.stages=('lm',)",
                 "--config.lm.total_steps=60", "--config.lm.log_every=1", "--config.checkpoint.every=1000"],
                env={**env, "JAX_PROCESS_ID": str(i)}, stdout=log, stderr=subprocess.STDOUT,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    return procs, logs


@pytest.mark.slow
def test_two_processes_stop_at_one_agreed_step_and_resume(tmp_path, data_dir, straight):
    """SIGTERM to process 0 of 2: JAX's preemption service (no Python handler replaces its notifier) has
    both stop at the same step, save it once, print one line and exit 42; the rerun resumes and logs each
    step once."""
    import time
    workdir = str(tmp_path / "run")
    metrics = os.path.join(workdir, "lm", "train_metrics.jsonl")
    procs, logs = _launch(workdir, data_dir, free_port(), tmp_path, "first")
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (os.path.exists(metrics) and len(open(metrics).readlines()) > 2):
            assert all(p.poll() is None for p in procs), [open(f).read()[-2000:] for f in logs]
            time.sleep(0.2)
        procs[0].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    last = [open(f).read().strip().splitlines()[-1] for f in logs]
    assert codes == [Preempted.exit_code] * 2, last
    assert last[0] == last[1] and last[0].startswith("preempted: stage lm: stopped at step "), last
    step = int(last[0].split("at step ")[1].split()[0])
    assert 3 <= step < 60
    saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "lm", "checkpoints")) if s.isdigit())
    assert saved[-1] == step, saved

    procs, logs = _launch(workdir, data_dir, free_port(), tmp_path, "second")
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], [open(f).read()[-2000:] for f in logs]
    assert f"resumed from step {step}" in open(logs[0]).read()
    steps, _ = _rows(workdir)
    assert steps == list(range(1, 61))


# ---- SIGKILL while an async save is being committed ------------------------------------------------------

_PAUSE_BEFORE_COMMIT = r"""
import glob, os, sys, time
import orbax.checkpoint as ocp
from absl import app
from avi_jax import train

checkpoints, marker = sys.argv.pop(1), sys.argv.pop(1)
real_options = ocp.CheckpointManagerOptions


def pause():
    # Orbax calls this in its background thread once step 4's files are written and finalized, before it
    # renames the temporary folder to "4" (the commit): the last moment of an async save.
    if glob.glob(os.path.join(checkpoints, "4.orbax-checkpoint-tmp*")):
        open(marker, "w").close()
        time.sleep(600)


ocp.CheckpointManagerOptions = lambda **kw: real_options(
    **kw, async_options=ocp.AsyncOptions(post_finalization_callback=pause))
app.run(train.main, flags_parser=train._parse_flags)
"""


@pytest.mark.slow
def test_sigkill_during_an_async_save_resumes_like_an_uninterrupted_run(tmp_path, data_dir, straight):
    """The process is killed while step 4 is being committed (its files written, not yet renamed): the
    rerun resumes from step 2 and ends equal to an uninterrupted run (losses, metrics rows, parameters);
    the committed steps carry a SHA-256 record that verifies."""
    import subprocess
    import sys
    import time
    workdir = str(tmp_path / "run")
    checkpoints, marker = os.path.join(workdir, "lm", "checkpoints"), str(tmp_path / "paused")
    overrides = {"data.dir": str(data_dir), "stages": "('lm',)", "checkpoint.every": 2, "lm.total_steps": 6,
                 "lm.log_every": 1}
    child = subprocess.Popen(
        [sys.executable, "-c", _PAUSE_BEFORE_COMMIT, checkpoints, marker, "--config",
         "configs/instruct.py:tiny", "--workdir", workdir] + [f"--config.{k}={v}" for k, v in overrides.items()],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
    try:
        deadline = time.time() + 300
        while not os.path.exists(marker):
            assert child.poll() is None, child.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "step 4's save never reached its commit"
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
    assert sorted(s for s in os.listdir(checkpoints) if s.isdigit()) == ["1", "2"]
    assert glob.glob(os.path.join(checkpoints, "4.orbax-checkpoint-tmp*"))     # killed mid-save
    train_and_evaluate(_config(data_dir, 2), workdir)
    _assert_same_run(workdir, straight)
    from avi_jax.training.checkpointing import CHECKSUMS, verify_checksums
    for step in ("2", "4", "6"):
        assert os.path.exists(os.path.join(checkpoints, step, CHECKSUMS)), step
        verify_checksums(os.path.join(checkpoints, step))
