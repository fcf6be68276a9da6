"""The shared train loop, for every stage family: SIGTERM -> checkpoint -> restart resumes exactly; a sharded
run equals the 1-device run; one data iterator per stage; the NaN/inf guard; the profiler option."""
from __future__ import annotations

import glob
import json
import os
import signal
import threading

import jax
import numpy as np
import pytest

from avi_jax import sharding as mesh_lib
from avi_jax.errors import TrainingDivergedError
from avi_jax.training.experiment import train_and_evaluate
from avi_jax.training.instruct import LmStage
from avi_jax.training.loop import Preempted
from configs import instruct, motion_prior, style_prior
from helpers import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The tiny demo corpus, prepared once for this module (every family reads the same one)."""
    return tmp_path_factory.mktemp("loop_data")


def _losses(workdir, stage):
    with open(os.path.join(workdir, stage, "train_metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["step"] for r in rows], np.array([r["loss"] for r in rows])


def _instruct_lm(data_dir, request):
    return tiny_config(instruct, **{"data.dir": str(data_dir), "stages": ("lm",)}), "lm"


def _instruct_align(data_dir, request):
    return tiny_config(instruct, **{"data.dir": str(data_dir), "stages": ("align",)}), "align"


def _motion(data_dir, request):
    return tiny_config(motion_prior, **{"data.dir": str(data_dir), "motion.total_steps": 6,
                                        "motion.log_every": 1, "motion.eval_every": 0}), "motion"


def _style(data_dir, request):
    """The style stage over a fake finished motion run (conftest's ``motion_workdir``)."""
    return tiny_config(style_prior, **{"data.dir": str(data_dir), "style.total_steps": 6,
                                       "motion_workdir": request.getfixturevalue("motion_workdir")}), "style"


@pytest.mark.slow
@pytest.mark.parametrize("make_config", [_instruct_lm, _motion, _style], ids=["instruct-lm", "motion", "style"])
def test_sigterm_then_restart_matches_straight_run(make_config, tmp_path, monkeypatch, request):
    """3 steps + SIGTERM (checkpoint) + restart + 3 steps == 6 straight steps, loss for loss."""
    config, stage = make_config(tmp_path / "data", request)
    config.checkpoint.every = 1000        # only the preemption checkpoint exists
    straight = str(tmp_path / "straight")
    train_and_evaluate(config, straight)

    resumed = str(tmp_path / "resumed")
    real_shard = mesh_lib.shard_batch
    calls = {"n": 0}

    def shard_and_kill(batch, mesh):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_shard(batch, mesh)

    monkeypatch.setattr(mesh_lib, "shard_batch", shard_and_kill)
    with pytest.raises(Preempted):
        train_and_evaluate(config, resumed)
    monkeypatch.setattr(mesh_lib, "shard_batch", real_shard)
    assert _losses(resumed, stage)[0] == [1, 2, 3]
    assert not os.path.exists(os.path.join(resumed, stage, "final_metrics.json"))
    train_and_evaluate(config, resumed)
    steps, losses = _losses(resumed, stage)
    assert steps == list(range(1, 7))
    np.testing.assert_allclose(losses, _losses(straight, stage)[1], rtol=1e-6)


# The evaluation metrics each family must reproduce on the sharded mesh, with their relative tolerance
# (0: exactly; the losses always to 1e-5).
_EQUAL_METRICS = {"align": {"retrieval_top1": 0, "retrieval_top5": 0},
                  "motion": {"coeff_mse": 1e-5, "jaw_correlation": 1e-4},
                  "style": {"retrieval_top1": 0, "aligner_retrieval_top1": 0, "style_cosine": 1e-3,
                            "diversity": 1e-3}}


@pytest.mark.slow
@pytest.mark.parametrize("make_config", [_instruct_align, _motion, _style],
                         ids=["instruct-align", "motion", "style"])
def test_mesh_2x2x2_matches_single_device(make_config, tmp_path, data_dir, request):
    """The same steps on a (data 2, fsdp 2, tensor 2) mesh of 8 CPU devices and on 1 device: the same
    losses (global-batch means, InfoNCE over the global batch, sharded optimizer state) and the same
    evaluation (sharded evaluation batches)."""
    assert jax.device_count() >= 8, "conftest sets 8 fake CPU devices"
    results = {}
    for name, (d, f, t) in {"one": (1, 1, 1), "eight": (2, 2, 2)}.items():
        config, stage = make_config(data_dir, request)
        config[stage].total_steps = 3
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = d, f, t
        workdir = str(tmp_path / name)
        results[name] = (train_and_evaluate(config, workdir), _losses(workdir, stage)[1])
    np.testing.assert_allclose(results["eight"][1], results["one"][1], rtol=1e-5)
    for key, rtol in _EQUAL_METRICS[stage].items():
        np.testing.assert_allclose(results["eight"][0][key], results["one"][0][key], rtol=rtol, err_msg=key)


# ---- the loop's own machinery, on the cheapest stage (the demo's lm) ----------------------------------

class _CountingDataset:
    """A training dataset that counts the iterators made from it."""

    def __init__(self, dataset):
        self.dataset, self.iterators = dataset, 0

    def __iter__(self):
        self.iterators += 1
        return iter(self.dataset)


def _grain_threads() -> int:
    return sum(t.name.startswith("grain") for t in threading.enumerate())


@pytest.fixture(scope="module")
def profiled_lm_run(tmp_path_factory, data_dir):
    """3 lm steps with ``config.profile`` on step 1, recording the iterators made from the training data
    and the live grain threads at each step."""
    workdir = str(tmp_path_factory.mktemp("profiled"))
    config = tiny_config(instruct, **{"data.dir": str(data_dir), "stages": ("lm",), "lm.total_steps": 3,
                                      "profile.start_step": 1, "profile.num_steps": 1})
    datasets, threads = [], []
    real_dataset, real_shard = LmStage.train_dataset, mesh_lib.shard_batch

    def counting_dataset(self):
        datasets.append(_CountingDataset(real_dataset(self)))
        return datasets[-1]

    def shard_and_count(batch, mesh):
        threads.append(_grain_threads())
        return real_shard(batch, mesh)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LmStage, "train_dataset", counting_dataset)
        mp.setattr(mesh_lib, "shard_batch", shard_and_count)
        train_and_evaluate(config, workdir)
    return workdir, config, datasets, threads


@pytest.mark.slow
def test_one_data_iterator_per_stage(profiled_lm_run):
    """The example batch that shapes the model comes from the training iterator itself: no second
    iterator (with its own prefetch threads) lives through the stage."""
    _, config, datasets, threads = profiled_lm_run
    assert [d.iterators for d in datasets] == [1]
    # one pipeline's read threads at every step (3 training steps, then the evaluation's batches: the
    # training iterator is closed when training ends)
    assert len(threads) > 3 and max(threads) <= 4, threads


@pytest.mark.slow
def test_profile_writes_a_trace_of_the_chosen_steps(profiled_lm_run):
    workdir = profiled_lm_run[0]
    traces = glob.glob(os.path.join(workdir, "lm", "profile", "**", "*.xplane.pb"), recursive=True)
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    assert _losses(workdir, "lm")[0] == [1, 2, 3]
    assert instruct.get_config("tiny").profile.start_step == -1        # off by default


@pytest.mark.slow
def test_nan_metric_stops_the_stage_without_checkpointing_it(tmp_path, data_dir, monkeypatch):
    """A loss that turns NaN at step 2 stops the stage there, naming the stage, the step and the metrics,
    with no checkpoint, export or final metrics of the broken state (the step-1 checkpoint stays)."""
    config = tiny_config(instruct, **{"data.dir": str(data_dir), "stages": ("lm",), "lm.total_steps": 4,
                                      "lm.log_every": 10, "checkpoint.every": 1})
    real_loss, real_host_batch = LmStage.loss, LmStage.host_batch
    seen = {"n": 0}

    def host_batch(self, batch):
        seen["n"] += 1
        poison = np.full(batch["valid"].shape, np.nan if seen["n"] == 2 else 0.0, np.float32)
        return {**real_host_batch(self, batch), "poison": poison}

    def loss(self, params, batch, rng):
        value, metrics = real_loss(self, params, batch, rng)
        return value + 0.0 * batch["poison"].sum(), metrics

    monkeypatch.setattr(LmStage, "host_batch", host_batch)
    monkeypatch.setattr(LmStage, "loss", loss)
    workdir = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match=r"stage lm: .*step 2: loss = nan"):
        train_and_evaluate(config, str(workdir))
    assert sorted(os.listdir(workdir / "lm" / "checkpoints")) == ["1"]
    assert not (workdir / "lm" / "params.safetensors").exists()
    assert not (workdir / "lm" / "final_metrics.json").exists()
    assert not (workdir / "lm" / "train_metrics.jsonl").exists()      # nothing logged yet (log_every 10)
