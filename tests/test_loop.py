"""The shared train loop, for every stage family: SIGTERM -> checkpoint -> restart resumes exactly."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from avi_jax import sharding as mesh_lib
from avi_jax.training.experiment import train_and_evaluate
from avi_jax.training.loop import Preempted
from configs import instruct, motion_prior, style_prior
from helpers import tiny_config


def _losses(workdir, stage):
    with open(os.path.join(workdir, stage, "train_metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["step"] for r in rows], np.array([r["loss"] for r in rows])


def _instruct_lm(data_dir, request):
    return tiny_config(instruct, **{"data.dir": str(data_dir), "stages": ("lm",)}), "lm"


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
