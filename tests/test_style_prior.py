"""Stage 2b: the instruction aligner, the x0 diffusion prior, the Diversity score and the style stage."""
from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avi_jax.errors import ConfigError, InputError
from avi_jax.metrics.diversity import diversity, pairwise_mean_distance
from avi_jax.models import diffusion
from avi_jax.models import style_prior as sp
from configs import style_prior as style_configs
from helpers import tiny_config


def _init(cfg, b=3, key=0):
    k1, k2 = jax.random.split(jax.random.key(key))
    aligner = sp.InstructionAligner(cfg).init(k1, jnp.ones((b, cfg.text_dim)))["params"]
    z = jnp.zeros((b, cfg.style_dim))
    prior = sp.DiffusionPrior(cfg).init(k2, z, jnp.zeros((b,), jnp.int32), z)["params"]
    return aligner, prior


# ---- model ------------------------------------------------------------------------------------


def test_paper_scale_builds_abstractly_with_expected_shapes():
    cfg = sp.paper()
    assert (cfg.style_dim, cfg.width, cfg.depth, cfg.num_heads, cfg.head_dim) == (128, 128, 6, 8, 64)
    assert (cfg.num_timesteps, cfg.cond_drop_prob, cfg.no_diffusion) == (100, 0.2, False)
    boxed_a, boxed_p = jax.eval_shape(lambda: _init(cfg, b=2))
    for tree in (boxed_a, boxed_p):       # every weight carries logical axis names
        leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    a, p = nn.meta.unbox(boxed_a), nn.meta.unbox(boxed_p)
    assert a["in_proj"]["kernel"].shape == (768, 512) and a["out"]["kernel"].shape == (512, 128)
    assert a["temp"].shape == ()
    assert sorted(k for k in p if k.startswith("layers_")) == [f"layers_{i}" for i in range(6)]
    att = p["layers_0"]["attention"]
    assert att["query"]["kernel"].shape == (128, 512) and att["out"]["kernel"].shape == (512, 128)
    assert p["positions"].shape == (4, 128) and p["null_condition"].shape == (128,)
    assert p["out"]["kernel"].shape == (128, 128) and p["x_in"]["kernel"].shape == (128, 128)


def test_paper_config_values():
    c = style_configs.get_config("paper")
    assert c.style.x0_weight == 30.0 and c.style.batch_size == 256
    assert c.sampler.method == "ddpm" and c.sampler.guidance_scale == 3.5
    assert c.model.text_encoder.preset == "clip_vit_l14" and c.data.max_text_tokens == 77
    assert c.eval.diversity_samples == 10 and c.family == "style" and c.stages == ("style",)


def test_null_condition_replaces_the_instruction():
    cfg = sp.tiny()
    _, prior = _init(cfg)
    model = sp.DiffusionPrior(cfg)
    x = jax.random.normal(jax.random.key(1), (3, cfg.style_dim))
    t = jnp.array([0, 4, 9])
    c1 = jax.random.normal(jax.random.key(2), (3, cfg.style_dim))
    c2 = jax.random.normal(jax.random.key(3), (3, cfg.style_dim))
    drop = jnp.zeros(3, bool)
    np.testing.assert_array_equal(model.apply({"params": prior}, x, t, c1, drop),
                                  model.apply({"params": prior}, x, t, c2, drop))
    assert not np.allclose(model.apply({"params": prior}, x, t, c1), model.apply({"params": prior}, x, t, c2))
    with pytest.raises(InputError):
        model.apply({"params": prior}, x, t[:2], c1)


def test_timestep_embedding():
    e = np.asarray(sp.timestep_embedding(jnp.array([0, 5]), 6))
    np.testing.assert_allclose(e[0], [1, 1, 1, 0, 0, 0], atol=1e-7)
    freqs = np.exp(-np.log(10_000.0) * np.arange(3) / 3)
    np.testing.assert_allclose(e[1], np.concatenate([np.cos(5 * freqs), np.sin(5 * freqs)]), rtol=1e-5)


def _params(cfg, mean, scale):
    aligner, prior = _init(cfg)
    out = {"aligner": nn.meta.unbox(aligner), "style_norm": nn.meta.unbox(sp.style_norm_params(mean, scale))}
    if not cfg.no_diffusion:
        out["prior"] = nn.meta.unbox(prior)
    return out


def test_no_diffusion_returns_the_aligner_output_and_has_zero_diversity():
    cfg = sp.tiny(no_diffusion=True)
    mean, scale = np.linspace(-1, 1, cfg.style_dim), 2.5
    params = _params(cfg, mean, scale)
    text = jax.random.normal(jax.random.key(4), (5, cfg.text_dim))
    out = np.asarray(sp.sample_style(cfg, params, text, jax.random.key(0), num_samples=4))
    aligned = sp.InstructionAligner(cfg).apply({"params": params["aligner"]}, text)
    assert out.shape == (5, 4, cfg.style_dim)
    for k in range(4):
        np.testing.assert_allclose(out[:, k], np.asarray(aligned) * scale + mean, rtol=1e-6)
    assert diversity(out) == 0.0


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_sample_style_guidance_one_is_the_conditional_model(method):
    cfg = sp.tiny()
    mean, scale = np.zeros(cfg.style_dim), 1.7
    params = _params(cfg, mean, scale)
    text = jax.random.normal(jax.random.key(5), (4, cfg.text_dim))
    rng = jax.random.key(6)
    kw = dict(method=method, num_steps=4, eta=0.3)
    got = sp.sample_style(cfg, params, text, rng, guidance_scale=1.0, **kw)[:, 0]
    aligned = sp.InstructionAligner(cfg).apply({"params": params["aligner"]}, text)
    model = sp.DiffusionPrior(cfg)

    def conditional(prior_params, x, t):        # the conditional model alone, no guidance machinery
        return model.apply({"params": prior_params}, x, t, aligned, jnp.ones(x.shape[0], bool))

    want = diffusion.sample(conditional, params["prior"], rng, (4, cfg.style_dim),
                            schedule=cfg.noise_schedule, **kw) * scale
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    guided = sp.sample_style(cfg, params, text, rng, guidance_scale=3.5, **kw)[:, 0]
    assert not np.allclose(guided, want)
    # seeded: same key -> same samples; K samples per instruction differ from each other
    many = np.asarray(sp.sample_style(cfg, params, text, rng, num_samples=3, **kw))
    np.testing.assert_array_equal(many, sp.sample_style(cfg, params, text, rng, num_samples=3, **kw))
    assert diversity(many) > 0


# ---- Diversity --------------------------------------------------------------------------------


def test_diversity_hand_cases():
    assert pairwise_mean_distance(np.array([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    tri = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])     # equilateral, side 1
    assert pairwise_mean_distance(tri) == pytest.approx(1.0)
    square = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # 4 sides 1, 2 diagonals sqrt 2
    assert pairwise_mean_distance(square) == pytest.approx((4 + 2 * np.sqrt(2)) / 6)
    samples = np.stack([np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]]),     # (5 + 0 + 5) / 3
                        np.zeros((3, 2))])
    assert diversity(samples) == pytest.approx(10 / 3 / 2)
    assert diversity(samples, valid=np.array([True, False])) == pytest.approx(10 / 3)
    assert diversity(np.ones((4, 10, 7))) == 0.0
    with pytest.raises(InputError):
        diversity(np.zeros((3, 1, 2)))
    with pytest.raises(InputError):
        diversity(np.zeros((3, 2)))
    with pytest.raises(InputError):
        diversity(np.zeros((2, 2, 2)), valid=np.array([False, False]))


# ---- the stage (motion_workdir: see conftest.py) -------------------------------------------------


def _style_config(motion_workdir, **overrides):
    return tiny_config(style_configs, motion_workdir=motion_workdir, **overrides)


@pytest.fixture(scope="module")
def tiny_style_run(tmp_path_factory, motion_workdir):
    from avi_jax.training.experiment import train_and_evaluate
    workdir = str(tmp_path_factory.mktemp("style_run"))
    return workdir, train_and_evaluate(_style_config(motion_workdir), workdir)


def _losses(workdir):
    with open(os.path.join(workdir, "style", "train_metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["step"] for r in rows], np.array([r["loss"] for r in rows])


def _loss_setup(config, workdir):
    """A StyleStage on ``config`` without a dataset (the demo tokenizer written to ``workdir``), its
    parameters and a batch of 4 clips."""
    from avi_jax.assembly.style import StyleSetup
    from avi_jax.data import schema
    from avi_jax.data.tokenizer import train_word_tokenizer
    from avi_jax.training.style import StyleStage
    train_word_tokenizer(["a happy man speaks.", "a sad woman talks."], os.path.join(workdir, "tokenizer"))
    setup = StyleSetup(config, workdir, data=False)
    stage = StyleStage(setup)
    f, n = 6, int(config.data.max_text_tokens)
    ids, mask = setup.tokenize(["a happy man speaks.", "a sad woman talks.", "a happy man speaks.", "a man."])
    rng = np.random.default_rng(0)
    batch = {"text_ids": jnp.asarray(ids), "text_mask": jnp.asarray(mask),
             "expression": jnp.asarray(rng.normal(size=(4, f, schema.N_EXPRESSION)), jnp.float32),
             "jaw_pose": jnp.asarray(rng.normal(size=(4, f, schema.N_JAW)), jnp.float32),
             "coeff_mask": jnp.ones((4, f), bool), "valid": jnp.ones(4, bool),
             "emotion": jnp.array([5, 6, 5, 0]), "intensity": jnp.array([1, 2, 1, 3])}
    assert ids.shape == (4, n)
    params = jax.jit(lambda r: nn.meta.unbox(setup.init_params(r, batch, with_statistics=False)))(
        jax.random.key(0))
    return stage, params, batch


def test_no_contrastive_drops_eq7(tmp_path, motion_workdir):
    """``no_contrastive`` (Table 4 "w/o Cont Align"): no temperature parameter, no InfoNCE term; the loss
    is exactly lambda x the x0-MSE, which equals the full system's x0-MSE at the same parameters and rng."""
    full = _style_config(motion_workdir)
    ablated = _style_config(motion_workdir, **{"model.prior.overrides.no_contrastive": True})
    stage_f, params_f, batch = _loss_setup(full, str(tmp_path / "f"))
    stage_a, params_a, _ = _loss_setup(ablated, str(tmp_path / "a"))
    assert "temp" in params_f["aligner"] and "temp" not in params_a["aligner"]
    assert stage_a.trainable == stage_f.trainable
    params_a = {**params_f, "aligner": {k: v for k, v in params_f["aligner"].items() if k != "temp"}}
    rng = jax.random.key(3)
    loss_f, m_f = jax.jit(stage_f.loss)(params_f, batch, rng)
    loss_a, m_a = jax.jit(stage_a.loss)(params_a, batch, rng)
    assert "info_nce" in m_f and not {"info_nce", "temperature", "acc_t2s"} & set(m_a)
    lam = float(full.style.x0_weight)
    assert float(m_a["x0_mse"]) > 0
    np.testing.assert_allclose(float(loss_a), lam * float(m_a["x0_mse"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_a["x0_mse"]), float(m_f["x0_mse"]), rtol=1e-6)
    np.testing.assert_allclose(float(loss_f), float(m_f["info_nce"]) + lam * float(m_f["x0_mse"]), rtol=1e-6)
    # the gradient reaches the aligner through the diffusion loss alone
    grads = jax.jit(jax.grad(lambda p: stage_a.loss({**params_a, "aligner": p}, batch, rng)[0]))(
        params_a["aligner"])
    assert float(jnp.abs(grads["out"]["kernel"]).max()) > 0


def test_missing_motion_run_is_a_clear_error(tmp_path):
    from avi_jax.training.experiment import train_and_evaluate
    config = style_configs.get_config("tiny")
    with pytest.raises(ConfigError, match=r"motion_workdir is empty.*motion_prior\.py"):
        train_and_evaluate(config, str(tmp_path / "a"))
    config.motion_workdir = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"config\.json not found"):
        train_and_evaluate(config, str(tmp_path / "b"))


@pytest.mark.slow
def test_tiny_style_run_writes_metrics_and_exports(tiny_style_run):
    from safetensors import safe_open
    workdir, metrics = tiny_style_run
    with open(os.path.join(workdir, "style", "final_metrics.json")) as f:
        on_disk = json.load(f)
    for key in ("retrieval_top1", "retrieval_top5", "retrieval_chance", "aligner_retrieval_top1",
                "style_cosine", "diversity"):
        assert key in on_disk and np.isfinite(on_disk[key]), key
    # 8 eval clips (max_eval_clips) of test speaker 2 = 8 (emotion, level) classes: chance 1/6 after
    # merging neutral's three levels (neutral l1-l3, angry l1-l3, contempt l1-l2)
    assert on_disk["retrieval_chance"] == pytest.approx(1 / 6)
    assert on_disk["retrieval_queries"] == 24       # 3 instructions per clip
    assert on_disk["diversity"] > 0
    steps, losses = _losses(workdir)
    assert steps == list(range(1, 7)) and np.all(np.isfinite(losses))
    with safe_open(os.path.join(workdir, "style", "params.safetensors"), "numpy") as f:
        comps = {k.split("/")[0] for k in f.keys()}
    assert comps == {"aligner", "prior", "style_norm", "text_encoder"}


@pytest.mark.slow
def test_setup_samples_styles_from_a_finished_workdir(tiny_style_run, motion_workdir):
    from avi_jax.assembly.style import StyleSetup
    from avi_jax.checkpoints.exported import load_exported
    workdir, _ = tiny_style_run
    config = _style_config(motion_workdir)
    setup = StyleSetup(config, workdir, data=False)
    abstract = jax.eval_shape(lambda: nn.meta.unbox(_init(setup.prior_config)))
    params = {name: load_exported(os.path.join(workdir, "style", "params.safetensors"), tree,
                                                prefix=f"{name}/")
              for name, tree in zip(("aligner", "prior"), abstract)}
    params["style_norm"] = load_exported(
        os.path.join(workdir, "style", "params.safetensors"),
        {"mean": jax.ShapeDtypeStruct((setup.prior_config.style_dim,), jnp.float32),
         "scale": jax.ShapeDtypeStruct((), jnp.float32)}, prefix="style_norm/")
    text_abs = jax.eval_shape(lambda: setup.text_model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"])
    params["text_encoder"] = load_exported(
        os.path.join(workdir, "style", "params.safetensors"), nn.meta.unbox(text_abs), prefix="text_encoder/")
    texts = ["A very happy man speaks with lip corner strongly pulled.", "A calm woman talks."]
    keys = jax.random.split(jax.random.key(0), 2)
    a = setup.sample(params, texts, keys, num_samples=3)
    b = setup.sample(params, texts, keys, num_samples=3)
    assert a.shape == (2, 3, setup.prior_config.style_dim)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a[:, 0] - a[:, 1]).max() > 0                   # K samples differ
    alone = setup.sample(params, texts[1:], keys[1:], num_samples=3)     # a text's samples: its own
    np.testing.assert_allclose(alone[0], a[1], atol=1e-5)


@pytest.mark.slow
def test_no_diffusion_has_zero_diversity_and_no_prior(tmp_path, motion_workdir):
    from safetensors import safe_open
    from avi_jax.training.experiment import train_and_evaluate
    config = _style_config(motion_workdir)
    config.model.prior.overrides.no_diffusion = True
    metrics = train_and_evaluate(config, str(tmp_path))
    assert metrics["diversity"] == 0.0
    assert metrics["retrieval_top1"] == metrics["aligner_retrieval_top1"]
    with safe_open(str(tmp_path / "style" / "params.safetensors"), "numpy") as f:
        assert not any(k.startswith("prior/") for k in f.keys())


def test_paper_config_without_paths_names_the_fields(tmp_path, motion_workdir):
    from avi_jax.training.experiment import train_and_evaluate
    config = style_configs.get_config("paper")
    config.motion_workdir = motion_workdir
    with pytest.raises(ConfigError, match=r"config\.data\.dir is empty"):
        train_and_evaluate(config, str(tmp_path / "a"))
    config.data.dir = str(tmp_path)
    with pytest.raises(ConfigError, match=r"config\.model\.text_encoder\.hf_path is empty.*CLIP"):
        train_and_evaluate(config, str(tmp_path / "b"))


# ---- the "w/o LLM" system: the style prior conditioned on the Q-Former's aligned audio embedding ------


@pytest.fixture(scope="module")
def align_workdir(tmp_path_factory):
    """A fake finished tiny stage-1 align run: config.json, the demo tokenizer and seeded-init exported
    audio encoder, Q-Former and text encoder (what the audio condition needs from it)."""
    from avi_jax.assembly.instruct import InstructSetup
    from avi_jax.checkpoints.exported import export_params
    from avi_jax.data.tokenizer import train_word_tokenizer
    from avi_jax.models.instructor import Instructor
    from avi_jax.training.experiment import save_config
    from configs import instruct
    workdir = str(tmp_path_factory.mktemp("align_run"))
    config = instruct.get_config("tiny")
    save_config(config, workdir)
    train_word_tokenizer(["a happy man speaks.", "a sad woman talks."], os.path.join(workdir, "tokenizer"))
    setup = InstructSetup(config, workdir, data=False)
    n = 1600
    params = jax.jit(lambda r: nn.meta.unbox(setup.model.init(
        r, jnp.zeros((1, n)), jnp.ones((1, n), bool), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), bool),
        method=Instructor.align))["params"])(jax.random.key(1))
    export_params(params, os.path.join(workdir, "align", "params.safetensors"))
    return workdir


def test_audio_condition_uses_no_text_encoder_and_depends_on_the_audio(tmp_path, motion_workdir, align_workdir):
    """condition='audio' (Table 1 "w/o LLM"): no tokenizer, text encoder or LLM parameters; the aligner
    embeds the align run's Q-Former embedding (its width), loaded from the align export; the loss and the
    sampled styles depend on the audio."""
    from avi_jax.assembly.style import StyleSetup
    from avi_jax.data import schema
    from avi_jax.training.style import StyleStage
    config = _style_config(motion_workdir, **{"model.prior.overrides.condition": "audio",
                                              "instruct_workdir": align_workdir})
    setup = StyleSetup(config, str(tmp_path), data=False)
    assert setup.tokenizer is None and setup.text_model is None
    assert setup.prior_config.text_dim == setup.audio.setup.model_config.qformer.embed_dim
    assert setup.source_of("qformer") == setup.source_of("audio_encoder") == "instruct"
    f, n = 4, 4 * schema.SAMPLES_PER_FRAME
    rng = np.random.default_rng(0)
    audio = jnp.asarray(0.1 * rng.normal(size=(4, n)), jnp.float32)
    batch = {"audio": audio, "audio_mask": jnp.ones((4, n), bool),
             "expression": jnp.asarray(rng.normal(size=(4, f, schema.N_EXPRESSION)), jnp.float32),
             "jaw_pose": jnp.zeros((4, f, schema.N_JAW)), "coeff_mask": jnp.ones((4, f), bool),
             "valid": jnp.ones(4, bool), "emotion": jnp.array([5, 6, 5, 0]), "intensity": jnp.array([1, 2, 1, 3])}
    params = jax.jit(lambda r: nn.meta.unbox(setup.init_params(r, batch, with_statistics=False)))(jax.random.key(0))
    assert set(params) == {"audio_encoder", "qformer", "style_encoder", "normalizer", "aligner", "prior",
                           "style_norm"}
    # the frozen audio path is the align run's, not a seeded init
    loaded = setup.load("qformer", "instruct", params["qformer"], None)
    from avi_jax.checkpoints.exported import load_exported
    direct = load_exported(os.path.join(align_workdir, "align", "params.safetensors"), params["qformer"],
                           prefix="qformer/")
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(direct)):
        np.testing.assert_array_equal(a, b)
    params.update({c: setup.load(c, "instruct", params[c], None) for c in ("audio_encoder", "qformer")})
    feats = np.asarray(jax.jit(setup.condition_features)(params, audio, batch["audio_mask"]))
    assert feats.shape == (4, setup.prior_config.text_dim)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, rtol=1e-5)
    assert np.abs(feats[0] - feats[1]).max() > 1e-4
    stage = StyleStage(setup)
    loss_fn = jax.jit(stage.loss)
    loss, metrics = loss_fn(params, batch, jax.random.key(2))
    assert np.isfinite(float(loss)) and "info_nce" in metrics
    loss2, _ = loss_fn(params, {**batch, "audio": audio[::-1]}, jax.random.key(2))
    assert float(loss2) != float(loss)
    keys = jnp.stack([jax.random.key(3)] * 2)
    mask = np.ones((2, n), bool)
    a = setup.sample_audio(params, np.asarray(audio[:2]), mask, keys, num_samples=2)
    b = setup.sample_audio(params, np.asarray(audio[2:]), mask, keys, num_samples=2)
    assert a.shape == (2, 2, setup.prior_config.style_dim) and np.abs(a - b).max() > 1e-4
    with pytest.raises(ConfigError, match="conditioned on the audio|conditioned on audio"):
        setup.sample(params, ["a happy man speaks."], keys[:1])


def test_audio_condition_needs_a_finished_align_run(tmp_path, motion_workdir):
    from avi_jax.assembly.style import StyleSetup
    config = _style_config(motion_workdir, **{"model.prior.overrides.condition": "audio"})
    with pytest.raises(ConfigError, match=r"align/params\.safetensors not found.*instruct_workdir"):
        StyleSetup(config, str(tmp_path), data=False)
    config = _style_config(motion_workdir, **{"model.prior.overrides.condition": "speech"})
    with pytest.raises(ConfigError, match="condition must be one of"):
        StyleSetup(config, str(tmp_path), data=False)


@pytest.mark.slow
def test_no_llm_system_trains_and_infers_from_audio_alone(tmp_path, system_workdir):
    """``ablation`` "w/o LLM" on a finished tiny system: the style stage retrained with condition='audio'
    (its params hold no text encoder), then inference samples styles from the audio without loading or
    running stage 1's LLM; different speech gives different styles and motion."""
    import shutil
    from safetensors import safe_open
    from avi_jax.data import demo
    from avi_jax.errors import InputError
    from avi_jax.inference import pipeline
    from avi_jax.inference.system import TalkingFace
    from avi_jax.training.experiment import train_and_evaluate
    from configs import avi_talking
    workdir = str(tmp_path / "run")
    shutil.copytree(system_workdir, workdir)
    shutil.rmtree(os.path.join(workdir, "style"))
    config = avi_talking.get_config("variant=tiny,stage=style")
    config.style.model.prior.overrides.condition = "audio"
    metrics = train_and_evaluate(config, workdir)
    assert np.isfinite(metrics["retrieval_top1"]) and metrics["diversity"] > 0
    with safe_open(os.path.join(workdir, "style", "params.safetensors"), "numpy") as f:
        assert {k.split("/")[0] for k in f.keys()} == {"aligner", "prior", "style_norm"}
    face = TalkingFace.load(workdir)
    assert face.audio_conditioned and face.style.text_model is None
    inf = config.inference
    options = pipeline.Options(num_samples=2, window_seconds=inf.window_seconds,
                               overlap_seconds=inf.overlap_seconds, bucket_seconds=tuple(inf.bucket_seconds),
                               batch_size=inf.batch_size)
    clips = [demo.generate_clip(0, 1, e, 3, clip_seconds=1.0, num_speakers=4)["audio"] for e in ("happy", "sad")]
    happy, sad = pipeline.synthesize(face, clips, options)
    assert face._instruct is None                      # stage 1's LLM was never loaded
    assert happy[0].instruction == pipeline.NO_INSTRUCTION
    # the condition is the audio's: different speech, different aligned embeddings and (through the few-step
    # tiny prior, only slightly) different styles
    n = clips[0].shape[0]
    feats = np.asarray(face.style.condition_features(face.style_params, jnp.asarray(np.stack(clips)),
                                                     jnp.ones((2, n), bool)))
    assert np.abs(feats[0] - feats[1]).max() > 1e-3
    assert np.abs(happy[0].style - sad[0].style).max() > 0
    assert np.abs(happy[0].style - happy[1].style).max() > 0           # K samples differ
    assert np.abs(happy[0].motion - sad[0].motion).max() > 0
    again = pipeline.synthesize(face, clips[:1], options)[0]             # a clip's outputs are its own
    np.testing.assert_allclose(again[0].style, happy[0].style, atol=1e-5)
    with pytest.raises(InputError, match="conditioned on the audio"):
        pipeline.synthesize(face, clips[:1], dataclasses.replace(options, instruction="A happy man speaks."))
