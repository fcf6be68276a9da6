"""Stage 2b: the instruction aligner, the x0 diffusion prior, the Diversity score and the style stage."""
from __future__ import annotations

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
