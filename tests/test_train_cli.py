"""`python -m avi_jax.train` before any training: config values validated up front (each bad field named by
its dotted path, nothing created), the CLI's one-line errors (exit status 2; a traceback only with
--verbose), and a workdir that cannot silently change its config (the per-stage records, the refusal with
the differing fields, --retrain_from)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from avi_jax.errors import ConfigError, WorkdirConfigError
from avi_jax.training import experiment
from avi_jax.training.validation import validate
from configs import avi_talking, instruct, motion_prior, style_prior

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- config values ------------------------------------------------------------------------------------

def _system(**overrides):
    config = avi_talking.get_config("tiny")
    config.update_from_flattened_dict(overrides)
    return config


@pytest.mark.parametrize("config_fn, field, value, accepts", [
    (lambda: _system(), "motion.motion.total_steps", 0, r"integer >= 1"),
    (lambda: _system(), "instruct.align.total_steps", -3, r"integer >= 1"),
    (lambda: _system(), "motion.checkpoint.every", 0, r"integer >= 1"),
    (lambda: _system(), "style.checkpoint.keep", 0, r"integer >= 1"),
    (lambda: _system(), "instruct.lm.log_every", 0, r"integer >= 1"),
    (lambda: _system(), "style.style.eval_every", -1, r"integer >= 0"),
    (lambda: _system(), "instruct.tune.optimizer.lr", 0.0, r"number > 0"),
    (lambda: _system(), "instruct.tune.optimizer.b2", 1.0, r"\[0, 1\)"),
    (lambda: _system(), "mesh.data", 0, r"-1"),
    (lambda: instruct.get_config("tiny"), "align.total_steps", 0, r"integer >= 1"),
    (lambda: instruct.get_config("tiny"), "checkpoint.every", 0, r"integer >= 1"),
    (lambda: motion_prior.get_config("tiny"), "motion.eval_batch_size", 0, r"integer >= 1"),
    (lambda: style_prior.get_config("tiny"), "data.demo.num_speakers", 2, r"integer >= 4"),
    (lambda: style_prior.get_config("tiny"), "data.source", "web", r"'demo' or 'prepared'"),
])
def test_each_invalid_value_names_its_field(config_fn, field, value, accepts):
    config = config_fn()
    validate(config)                                  # the variant itself is valid
    config.update_from_flattened_dict({field: value})
    pattern = rf"^{re.escape(f'config.{field} = {value!r}')}: must be .*{accepts}"
    with pytest.raises(ConfigError, match=pattern) as e:
        validate(config)
    assert "\n" not in str(e.value)


def test_batch_size_must_divide_over_processes(monkeypatch):
    """A global batch of 8 over 3 processes would read 2 examples per process (6 of 8)."""
    config = _system()
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    with pytest.raises(ConfigError, match=r"config\.instruct\.lm\.batch_size = 8: must be divisible by the "
                                          r"number of processes \(3\)"):
        validate(config)


def test_batch_size_must_divide_over_the_mesh_batch_axes():
    config = instruct.get_config("tiny")
    config.mesh.data, config.mesh.fsdp = 4, 2            # 8 devices (conftest) split the batch
    config.align.batch_size = 12
    with pytest.raises(ConfigError, match=r"config\.align\.batch_size = 12: .*8 devices of the mesh"):
        validate(config)


def test_only_the_stages_that_run_are_checked():
    config = instruct.get_config("variant=tiny,stage=tune")
    config.lm.total_steps = 0                          # not trained by this run
    validate(config)


def test_invalid_values_stop_before_the_workdir_exists(tmp_path):
    """total_steps = 0 used to mark the stage finished with untrained weights, checkpoint.every = 0 to divide
    by zero after creating the workdir."""
    config = instruct.get_config("tiny")
    config.stages = ("lm",)
    config.lm.total_steps = 0
    config.checkpoint.every = 0
    with pytest.raises(ConfigError, match=r"2 invalid config values: .*config\.checkpoint\.every = 0.*"
                                          r"config\.lm\.total_steps = 0"):
        experiment.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# ---- a workdir and its config ---------------------------------------------------------------------------

class _FakeSetup:
    def __init__(self, config, workdir):
        self.config, self.workdir = config, workdir


class _FakeStage:
    def __init__(self, name, setup):
        self.name, self.setup = name, setup
        self.stage_dir = os.path.join(setup.workdir, name)


@pytest.fixture
def fake_training(monkeypatch):
    """``train_and_evaluate`` with everything but the stages' training: each stage of the plan 'trains' by
    writing a checkpoint folder, params.safetensors and final_metrics.json (skipped when finished, like
    ``run_stage``). Returns the list of stages trained."""
    trained = []
    real_plan = experiment.stage_plan

    def plan(config, workdir):
        real_plan(config, workdir)                    # unknown stages still raise
        fam = {s: f for f in experiment.run_families(config) for s in experiment.family_stages(f)}
        return [(name, lambda setup, name=name: _FakeStage(name, setup), _FakeSetup,
                 experiment.family_config(config, fam[name], workdir)) for name in config.stages]

    def run(stage, config):
        final = os.path.join(stage.stage_dir, "final_metrics.json")
        if os.path.exists(final):
            return {"steps": 1}
        assert os.path.isfile(os.path.join(stage.stage_dir, "config.json")), "recorded before training"
        os.makedirs(os.path.join(stage.stage_dir, "checkpoints", "1"), exist_ok=True)
        for f in ("params.safetensors", "final_metrics.json"):
            with open(os.path.join(stage.stage_dir, f), "w") as fh:
                fh.write("{}")
        trained.append(stage.name)
        return {"steps": 1}

    monkeypatch.setattr(experiment, "stage_plan", plan)
    monkeypatch.setattr(experiment, "run_stage", run)
    return trained


def _read(path):
    with open(path) as f:
        return f.read()


def test_changed_config_on_a_trained_workdir_is_refused(tmp_path, fake_training):
    workdir = str(tmp_path / "run")
    experiment.train_and_evaluate(_system(), workdir)
    assert fake_training == ["lm", "align", "tune", "motion", "style"]
    record = json.loads(_read(os.path.join(workdir, "motion", "config.json")))
    assert record["family"] == "motion" and record["motion"]["total_steps"] == 6
    before = _read(os.path.join(workdir, "config.json"))

    changed = _system(**{"instruct.align.batch_size": 16, "motion.model.motion.preset": "demo"})
    with pytest.raises(WorkdirConfigError) as e:
        experiment.train_and_evaluate(changed, workdir)
    msg = str(e.value)
    assert "\n" not in msg
    assert "stage(s) align, tune, motion were trained with a different config" in msg
    assert "config.instruct.align.batch_size: 8 -> 16 (align, tune)" in msg      # tune was trained from align
    assert 'config.motion.model.motion.preset: "tiny" -> "demo" (motion)' in msg
    assert "new --workdir" in msg and "--retrain_from align,motion" in msg
    for stage in ("align", "tune", "motion", "style"):
        assert os.path.join(workdir, stage) in msg          # what --retrain_from would delete
    assert os.path.join(workdir, "lm") + "," not in msg
    assert _read(os.path.join(workdir, "config.json")) == before      # not rewritten
    assert fake_training == ["lm", "align", "tune", "motion", "style"]

    shared = _system(seed=1)
    with pytest.raises(WorkdirConfigError, match=r"config\.seed: 0 -> 1 \(lm, align, tune, motion, style\)"):
        experiment.train_and_evaluate(shared, workdir)


def test_fields_that_do_not_define_a_stage_may_change(tmp_path, fake_training):
    workdir = str(tmp_path / "run")
    experiment.train_and_evaluate(_system(), workdir)
    changed = _system(**{"instruct.lm.log_every": 5, "style.style.eval_every": 2, "motion.checkpoint.every": 9,
                         "motion.checkpoint.keep": 1, "instruct.checkpoint.async_save": False,
                         "style.profile.start_step": 2, "mesh.data": 2, "mesh.fsdp": 4,
                         "instruct.generation.max_new_tokens": 3, "style.sampler.guidance_scale": 2.0,
                         "instruct.data.max_eval_clips": 4})
    experiment.train_and_evaluate(changed, workdir)
    saved = json.loads(_read(os.path.join(workdir, "config.json")))
    assert saved["instruct"]["lm"]["log_every"] == 5 and saved["mesh"]["fsdp"] == 4
    assert len(fake_training) == 5


def test_a_restricted_run_checks_the_stages_it_builds_on(tmp_path, fake_training):
    """`:stage=tune` with a changed align block: tune would be trained on an align that no longer
    matches config.json."""
    workdir = str(tmp_path / "run")
    experiment.train_and_evaluate(instruct.get_config("tiny"), workdir)
    config = instruct.get_config("variant=tiny,stage=tune")
    config.align.total_steps = 7
    with pytest.raises(WorkdirConfigError, match=r"config\.align\.total_steps: 6 -> 7 \(align, tune\).*"
                                                 r"rerun with a config that trains align \(this one trains only "
                                                 r"tune\) with --retrain_from align "):
        experiment.train_and_evaluate(config, workdir)
    config.align.total_steps = 6
    config.tune.total_steps = 9              # the later stage's block does not concern align
    with pytest.raises(WorkdirConfigError, match=r"stage\(s\) tune .*config\.tune\.total_steps: 6 -> 9 \(tune\)"):
        experiment.train_and_evaluate(config, workdir)


def test_retrain_from_deletes_the_stage_and_those_trained_from_it(tmp_path, fake_training, caplog):
    workdir = str(tmp_path / "run")
    experiment.train_and_evaluate(_system(), workdir)
    fake_training.clear()
    changed = _system(**{"instruct.align.batch_size": 16})
    with caplog.at_level("WARNING"):
        experiment.train_and_evaluate(changed, workdir, retrain_from="align")
    assert fake_training == ["align", "tune"]
    assert "deleting" in caplog.text and os.path.join(workdir, "tune") in caplog.text
    record = json.loads(_read(os.path.join(workdir, "align", "config.json")))
    assert record["align"]["batch_size"] == 16
    assert json.loads(_read(os.path.join(workdir, "config.json")))["instruct"]["align"]["batch_size"] == 16

    fake_training.clear()
    os.makedirs(os.path.join(workdir, "tokenizer"))      # the demo tokenizer, built by the first stage-1 stage
    experiment.train_and_evaluate(_system(**{"instruct.align.batch_size": 16, "motion.motion.total_steps": 7}),
                                  workdir, retrain_from=["motion"])
    assert fake_training == ["motion", "style"]          # style's frozen style encoder is this run's motion
    assert os.path.isdir(os.path.join(workdir, "tokenizer"))

    fake_training.clear()
    experiment.train_and_evaluate(_system(**{"instruct.align.batch_size": 16, "motion.motion.total_steps": 7,
                                             "instruct.data.demo.num_speakers": 5}),
                                  workdir, retrain_from="lm,motion")
    assert fake_training == ["lm", "align", "tune", "motion", "style"]
    assert not os.path.exists(os.path.join(workdir, "tokenizer"))     # trained again from the new data


def test_retrain_from_names_a_stage_of_the_run(tmp_path, fake_training):
    with pytest.raises(ConfigError, match=r"--retrain_from styl: not a stage of this run; expected one of "
                                          r"lm, align, tune"):
        experiment.train_and_evaluate(instruct.get_config("tiny"), str(tmp_path / "a"), retrain_from="styl")
    with pytest.raises(ConfigError, match=r"--retrain_from align: this run does not train align"):
        experiment.train_and_evaluate(instruct.get_config("variant=tiny,stage=tune"), str(tmp_path / "b"),
                                      retrain_from="align")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_workdir_written_before_stage_records_is_checked_against_its_config_json(tmp_path, fake_training):
    workdir = str(tmp_path / "run")
    experiment.train_and_evaluate(motion_prior.get_config("tiny"), workdir)
    os.remove(os.path.join(workdir, "motion", "config.json"))          # as before stages had records
    config = motion_prior.get_config("tiny")
    config.loss.velocity_weight = 0.0
    with pytest.raises(WorkdirConfigError, match=r"config\.loss\.velocity_weight: 0\.5 -> 0\.0 \(motion\)"):
        experiment.train_and_evaluate(config, workdir)


def test_a_stage_that_trained_nothing_takes_the_new_config(tmp_path, fake_training, monkeypatch):
    """A stage that failed before its first checkpoint (e.g. a missing Hugging Face folder) is no drift."""
    workdir = str(tmp_path / "run")

    def fail(stage, config):
        raise ConfigError("config.model.audio_encoder.hf_path is empty")

    monkeypatch.setattr(experiment, "run_stage", fail)
    with pytest.raises(ConfigError, match="hf_path is empty"):
        experiment.train_and_evaluate(motion_prior.get_config("tiny"), workdir)
    assert os.path.isfile(os.path.join(workdir, "motion", "config.json"))
    config = motion_prior.get_config("tiny")
    config.model.audio_encoder.feature_layer = -2
    assert experiment.check_workdir(config, workdir) == []


def test_a_workdir_of_another_family_is_refused(tmp_path, fake_training):
    workdir = str(tmp_path / "run")
    experiment.train_and_evaluate(motion_prior.get_config("tiny"), workdir)
    config = style_prior.get_config("tiny")
    config.motion_workdir = workdir
    with pytest.raises(WorkdirConfigError, match=r"holds stage\(s\) motion, which this 'style' config does not "
                                                 r"train.*new --workdir"):
        experiment.train_and_evaluate(config, workdir)


# ---- the command line ------------------------------------------------------------------------------------

def _train(*args, cwd=REPO):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "avi_jax.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_cli_misspelt_override_is_one_line(tmp_path):
    """It used to be three chained tracebacks (KeyError, KeyError, AttributeError)."""
    p = _train("--config", "configs/instruct.py:tiny", "--workdir", str(tmp_path / "run"),
               "--config.align.total_stepz=3")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert _error_lines(p.stderr) == ["error: --config.align.total_stepz: unknown config field "
                                      "config.align.total_stepz (did you mean config.align.total_steps?)"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("verbose", [False, True], ids=["plain", "verbose"])
def test_cli_project_errors_are_one_line_with_status_2(tmp_path, verbose):
    p = _train("--config", "configs/instruct.py:tiny", "--workdir", str(tmp_path / "run"),
               "--config.align.total_steps=0", *(["--verbose"] if verbose else []))
    assert p.returncode == 2, p.stderr
    assert _error_lines(p.stderr) == ["error: config.align.total_steps = 0: must be an integer >= 1 "
                                      "(optimizer steps)"]
    assert ("Traceback" in p.stderr) == verbose
    assert not (tmp_path / "run").exists()
