"""Stage 2a, the motion prior: shapes, style-encoder masking, target/reference splits, losses against hand
computations, the tiny run end to end (with and without FLAME), the paper-scale model built abstractly."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avi_jax.data import builder, schema
from avi_jax.errors import ConfigError, InputError
from avi_jax.checkpoints.flame import load_flame_model
from avi_jax.metrics.lip_vertex_error import lip_vertex_error
from avi_jax.models import flame as flame_lib
from avi_jax.models import motion as motion_lib
from avi_jax.models.motion import MOTION_DIM, MotionConfig, MotionPrior, StyleEncoder
from avi_jax.assembly import common, motion as A
from avi_jax.training import motion as M
from avi_jax.training.experiment import train_and_evaluate
from configs import motion_prior
from helpers import tiny_config

B, N = 2, 640 * 12 + 100        # 12 whole frames (+ a partial one that is dropped)
F = N // 640


def test_motion_layout_matches_the_record_schema():
    """models/motion.py restates the records' motion layout (models do not import data/): they must agree."""
    assert (motion_lib.N_EXPRESSION, motion_lib.N_JAW) == (schema.N_EXPRESSION, schema.N_JAW)
    assert motion_lib.SAMPLES_PER_FRAME == schema.SAMPLES_PER_FRAME == schema.SAMPLE_RATE // schema.FPS


@pytest.fixture(scope="module")
def tiny():
    cfg = A.motion_model_config(motion_prior.get_config("tiny"))
    model = MotionPrior(cfg)
    rng = np.random.default_rng(0)
    audio = jnp.asarray(rng.normal(0, 0.1, (B, N)), jnp.float32)
    audio_mask = jnp.asarray(np.arange(N)[None, :] < np.array([[N], [640 * 7 + 3]]))
    ref = jnp.asarray(rng.normal(0, 1, (B, F, MOTION_DIM)), jnp.float32)
    ref_mask = jnp.ones((B, F), bool)
    params = jax.jit(model.init)(jax.random.key(1), audio, audio_mask, ref, ref_mask)["params"]
    params = nn.meta.unbox(params)
    # a non-trivial generator output layer (it is zero-initialised) and normaliser
    params["generator"]["out"]["kernel"] = jnp.asarray(
        rng.normal(0, 0.5, params["generator"]["out"]["kernel"].shape), jnp.float32)
    params["normalizer"] = {"mean": jnp.asarray(rng.normal(0, 0.1, MOTION_DIM), jnp.float32),
                            "scale": jnp.asarray(rng.uniform(0.5, 2.0, MOTION_DIM), jnp.float32)}
    # one compiled forward pass, reused: (params, reference motion, reference mask) -> motion (B, F, 53)
    forward = jax.jit(lambda p, r, m: model.apply({"params": p}, audio, audio_mask, r, m))
    return cfg, model, params, audio, audio_mask, ref, forward


def test_shapes(tiny):
    cfg, model, params, audio, audio_mask, ref, forward = tiny

    @jax.jit
    def parts(p):
        v = {"params": p}
        content, frame_mask = model.apply(v, audio, audio_mask, method=MotionPrior.content)
        return content, frame_mask, model.apply(v, ref, jnp.ones((B, F), bool), method=MotionPrior.style)

    content, frame_mask, style = parts(params)
    assert content.shape == (B, F, cfg.content_dim) and frame_mask.shape == (B, F)
    # frame f is real when its first sample is: clip 1 has 7 * 640 + 3 samples -> 8 frames
    np.testing.assert_array_equal(frame_mask.sum(-1), [F, 8])
    assert np.all(np.asarray(content)[1, 8:] == 0)
    assert style.shape == (B, cfg.style_embed_dim)
    out = forward(params, ref, jnp.ones((B, F), bool))
    assert out.shape == (B, F, MOTION_DIM) and out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))
    v = {"params": params}
    with pytest.raises(InputError, match="shorter than one 25 fps frame"):
        jax.eval_shape(lambda: model.apply(v, audio[:, :600], audio_mask[:, :600], ref, ref[..., 0] > 0))
    with pytest.raises(InputError, match="at most"):
        long = jnp.zeros((1, cfg.max_style_frames + 1, MOTION_DIM))
        jax.eval_shape(lambda: model.apply(v, long, jnp.ones(long.shape[:2], bool), method=MotionPrior.style))


def test_untrained_model_predicts_the_mean(tiny):
    cfg, model, params, audio, audio_mask, ref, forward = tiny
    zero_out = jax.tree.map(jnp.zeros_like, params["generator"]["out"])
    p = {**params, "generator": {**params["generator"], "out": zero_out}}
    out = forward(p, ref, jnp.ones((B, F), bool))
    np.testing.assert_allclose(out, jnp.broadcast_to(params["normalizer"]["mean"], out.shape), atol=1e-6)


def test_style_encoder_ignores_masked_frames(tiny):
    cfg, model, params, audio, audio_mask, ref, forward = tiny
    enc = StyleEncoder(cfg)
    apply = jax.jit(lambda m, k: enc.apply({"params": params["style_encoder"]}, m, k))
    rng = np.random.default_rng(3)
    mask = jnp.asarray(rng.random((B, F)) < 0.6).at[:, 0].set(True)
    base = apply(ref, mask)
    changed = jnp.where(mask[..., None], ref, 100.0 * rng.normal(size=ref.shape))
    np.testing.assert_array_equal(apply(changed, mask), base)
    nan = jnp.where(mask[..., None], ref, jnp.nan)
    np.testing.assert_array_equal(apply(nan, mask), base)
    # ... while a reference frame does matter (the test can fail)
    first = ref.at[:, 0].add(1.0)
    assert not np.allclose(apply(first, mask), base, atol=1e-4)


def test_predicted_frames_do_not_reach_the_style_encoder(tiny):
    """The training split: changing the target (current) frames' motion leaves the prediction unchanged."""
    cfg, model, params, audio, audio_mask, ref, forward = tiny
    valid = jnp.arange(F)[None, :] < jnp.array([[F], [8]])
    target, reference = M.split_target(jax.random.key(5), valid, 0.5, 2)
    pred = forward(params, ref, reference)
    other = jnp.where(target[..., None], ref + 5.0, ref)
    np.testing.assert_array_equal(forward(params, other, reference), pred)
    leak = jnp.where(reference[..., None], ref + 5.0, ref)
    assert not np.allclose(forward(params, leak, reference), pred, atol=1e-4)


def test_split_target_and_heldout_halves():
    f = 40
    lengths = np.array([40, 25, 9, 1])
    mask = jnp.asarray(np.arange(f)[None, :] < lengths[:, None])
    for seed in range(20):
        target, reference = (np.asarray(x) for x in M.split_target(jax.random.key(seed), mask, 0.5, 2))
        for row, n in enumerate(lengths):
            idx = np.nonzero(target[row])[0]
            want = min(max(int(np.round(0.5 * n)), 1), n)
            assert len(idx) == want and np.all(np.diff(idx) == 1) and idx[-1] < n
            s, e = idx[0], idx[-1] + 1
            ref_idx = np.nonzero(reference[row])[0]
            assert np.all((ref_idx < s - 2) | (ref_idx >= e + 2)) and np.all(ref_idx < n)
            expect = [i for i in range(n) if i < s - 2 or i >= e + 2]
            assert list(ref_idx) == expect
    (ta, ra), (tb, rb) = (tuple(np.asarray(x) for x in pair) for pair in M.heldout_halves(mask, 2))
    np.testing.assert_array_equal(ta | tb, np.asarray(mask))
    assert not np.any(ta & tb) and not np.any(ta & ra) and not np.any(tb & rb)
    # clip of 25 frames: a = [0, 12), refs of a = [14, 25); b = [12, 25), refs of b = [0, 10)
    np.testing.assert_array_equal(np.nonzero(ra[1])[0], np.arange(14, 25))
    np.testing.assert_array_equal(np.nonzero(rb[1])[0], np.arange(0, 10))


def _hand_losses(pred, target, mask, scale, kind, we, wj):
    err = (lambda x: abs(x)) if kind == "l1" else (lambda x: x * x)
    b_, f_, d_ = pred.shape
    sums = {"e": 0.0, "j": 0.0, "ve": 0.0, "vj": 0.0}
    n = nv = 0
    for b in range(b_):
        for f in range(f_):
            if mask[b, f]:
                n += 1
                for k in range(d_):
                    sums["e" if k < 50 else "j"] += err((pred[b, f, k] - target[b, f, k]) / scale[k])
            if f and mask[b, f] and mask[b, f - 1]:
                nv += 1
                for k in range(d_):
                    now, before = pred[b, f, k] - target[b, f, k], pred[b, f - 1, k] - target[b, f - 1, k]
                    dv = (now - before) / scale[k]
                    sums["ve" if k < 50 else "vj"] += err(dv)
    exp, jaw = sums["e"] / (n * 50), sums["j"] / (n * 3)
    return {"expression": exp, "jaw": jaw, "reconstruction": we * exp + wj * jaw,
            "velocity": we * sums["ve"] / (nv * 50) + wj * sums["vj"] / (nv * 3)}


@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_coefficient_losses_match_hand_computation(kind):
    rng = np.random.default_rng(7)
    pred, target = rng.normal(size=(2, 5, 53)), rng.normal(size=(2, 5, 53))
    mask = np.array([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], bool)
    scale = rng.uniform(0.2, 2.0, 53)
    got = M.coefficient_losses(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                               jnp.asarray(mask), jnp.asarray(scale, jnp.float32), kind=kind,
                               exp_weight=0.7, jaw_weight=3.0)
    want = _hand_losses(pred, target, mask, scale, kind, 0.7, 3.0)
    for key, value in want.items():
        np.testing.assert_allclose(float(got[key]), value, rtol=1e-5, err_msg=key)
    with pytest.raises(ConfigError):
        M.coefficient_losses(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask), jnp.ones(53),
                             kind="l3")


def _small_flame(v=60, nf=40, seed=0):
    rng = np.random.default_rng(seed)
    jreg = np.zeros((5, v))
    for j in range(5):
        idx = rng.choice(v, 8, replace=False)
        jreg[j, idx] = rng.dirichlet(np.ones(8))
    return {"v_template": rng.normal(0, 0.05, (v, 3)), "shapedirs": rng.normal(0, 1e-3, (v, 3, 400)),
            "posedirs": rng.normal(0, 1e-3, (v, 3, 36)), "J_regressor": jreg,
            "kintree_table": np.array([[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.uint32),
            "weights": rng.dirichlet(np.full(5, 0.3), size=v), "f": rng.integers(0, v, (nf, 3))}


@pytest.fixture(scope="module")
def flame_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flame")
    with open(root / "generic_model.pkl", "wb") as f:
        pickle.dump(_small_flame(), f, protocol=2)
    with open(root / "FLAME_masks.pkl", "wb") as f:
        pickle.dump({"lips": np.arange(10, 22), "face": np.arange(0, 50)}, f, protocol=2)
    return root / "generic_model.pkl", root / "FLAME_masks.pkl"


def test_vertex_losses_and_lve_match_hand_computation(flame_files):
    model = load_flame_model(*flame_files)
    lips = model.mask("lips")
    rng = np.random.default_rng(8)
    pred = rng.normal(0, 0.5, (2, 3, 53)).astype(np.float32)
    target = rng.normal(0, 0.5, (2, 3, 53)).astype(np.float32)
    pred[..., 50:] *= 0.3
    target[..., 50:] *= 0.3
    mask = np.array([[1, 0, 1], [1, 1, 0]], bool)
    got = jax.jit(M.vertex_losses)(model, jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask), lips)
    verts = jax.jit(flame_lib.motion_to_vertices)
    lve = np.asarray(lip_vertex_error(verts(model, jnp.asarray(pred)) * 1000,
                                      verts(model, jnp.asarray(target)) * 1000, lips))
    per_all, per_lip = [], []
    for b in range(2):
        for f in range(3):
            vp = np.asarray(verts(model, pred[b, f]), np.float64) * 1000
            vt = np.asarray(verts(model, target[b, f]), np.float64) * 1000
            d2 = ((vp - vt) ** 2).sum(-1)
            np.testing.assert_allclose(lve[b, f], np.sqrt(d2[np.asarray(lips)]).max(), rtol=1e-4)
            if mask[b, f]:
                per_all.append(d2.mean())
                per_lip.append(d2[np.asarray(lips)].mean())
    np.testing.assert_allclose(float(got["vertex"]), np.mean(per_all), rtol=1e-4)
    np.testing.assert_allclose(float(got["lip_vertex"]), np.mean(per_lip), rtol=1e-4)
    assert float(got["lip_vertex"]) > 0


def test_paper_config_builds_abstractly(tmp_path):
    config = motion_prior.get_config("paper")
    with pytest.raises(ConfigError, match=r"model\.audio_encoder\.hf_path"):
        A.MotionSetup(config, str(tmp_path), data=False)
    with pytest.raises(ConfigError, match=r"config\.data\.dir"):
        train_and_evaluate(config, str(tmp_path))
    config.model.audio_encoder.source = "init"          # the wav2vec2_base preset, no weights needed
    setup = A.MotionSetup(config, str(tmp_path), data=False)
    samples = int(config.data.max_audio_seconds * 16000)
    params = setup.abstract_params(samples, batch_size=2)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    # transformers Wav2Vec2Model (base) has 94,371,712 parameters incl. the 768-d masked_spec_embed
    assert count(params["audio_encoder"]) == 94_371_712 - 768
    se, gen = params["style_encoder"], params["generator"]
    assert sorted(k for k in se if k.startswith("layers_")) == ["layers_0", "layers_1", "layers_2"]
    assert se["input"]["kernel"].shape == (53, 256)
    assert se["layers_2"]["attention"]["query"]["kernel"].shape == (256, 256)
    assert se["layers_0"]["mlp_in"]["kernel"].shape == (256, 1024)
    assert se["out"]["kernel"].shape == (256, 128)
    assert len([k for k in gen if k.startswith("layers_")]) == 6
    assert gen["style_in"]["kernel"].shape == (128, 256) and gen["out"]["kernel"].shape == (256, 53)
    assert params["content_encoder"]["merge"]["kernel"].shape == (2 * 768, 256)
    assert params["normalizer"]["mean"].shape == (53,)
    out = jax.eval_shape(lambda p: setup.model.apply(
        {"params": p}, jnp.zeros((2, samples)), jnp.ones((2, samples), bool),
        jnp.zeros((2, 150, 53)), jnp.ones((2, 150), bool)), params)
    assert out.shape == (2, 150, 53)
    assert MotionConfig.paper().style_heads == 8 and MotionConfig.paper().max_style_frames == 256


def test_wav2vec2_from_a_hugging_face_folder(tmp_path):
    """source 'hf': the model config comes from config.json and the weights load onto the model's tree."""
    transformers = pytest.importorskip("transformers")
    tiny_audio = A.motion_model_config(motion_prior.get_config("tiny")).audio
    transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**tiny_audio.to_hf())).save_pretrained(tmp_path)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(tmp_path)
    config = motion_prior.get_config("tiny")
    config.model.audio_encoder.source = "hf"
    config.model.audio_encoder.hf_path = str(tmp_path)
    setup = A.MotionSetup(config, str(tmp_path / "work"), data=False)
    assert setup.model_config.audio == dataclasses.replace(tiny_audio, do_normalize=True)
    assert setup.source_of("audio_encoder") == "hf" and setup.source_of("generator") == "init"
    abstract = setup.abstract_params(640 * 4)["audio_encoder"]
    loaded = setup.load("audio_encoder", "hf", abstract, None)
    assert jax.tree.map(lambda x: x.shape, loaded) == jax.tree.map(lambda x: x.shape, abstract)
    config.model.audio_encoder.hf_path = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="wav2vec2"):
        A.MotionSetup(config, str(tmp_path / "work"), data=False)


# ------------------------------------------------------------------------------ end to end (tiny)

def _config(data_dir, **overrides):
    return tiny_config(motion_prior, **{"data.dir": str(data_dir), **overrides})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("motion_data")


def _rows(workdir):
    with open(os.path.join(workdir, "motion", "train_metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    metrics = train_and_evaluate(_config(data_dir), workdir)
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        on_disk = json.load(f)
    for key in ("jaw_correlation", "coeff_mse", "mean_pose_mse", "expression_mse", "jaw_mse"):
        assert np.isfinite(on_disk[key]) and on_disk[key] == metrics[key], key
    assert on_disk["num_eval_frames"] == 8 * 25         # 8 eval clips of 1 s
    assert "lve_mm" not in on_disk
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(np.isfinite(r["loss"]) for r in rows)
    # the exported parameters rebuild the model from the workdir alone
    setup, params = A.load_motion_workdir(workdir, ("style_encoder", "normalizer"))
    mean, std = A.motion_statistics(builder.open_split(common.dataset_path(setup.config, workdir), "train"))
    np.testing.assert_allclose(params["normalizer"]["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(params["normalizer"]["scale"], std, rtol=1e-6)
    ref = jnp.asarray(np.random.default_rng(0).normal(size=(1, 10, 53)), jnp.float32)
    emb = setup.model.apply({"params": params}, ref, jnp.ones((1, 10), bool), method=MotionPrior.style)
    assert emb.shape == (1, setup.model_config.style_embed_dim)


@pytest.mark.slow
def test_tiny_run_with_flame_adds_vertex_loss_and_lve(tmp_path, data_dir, flame_files):
    config = _config(data_dir, **{"flame.model_path": str(flame_files[0]),
                                  "flame.masks_path": str(flame_files[1]), "motion.total_steps": 2})
    metrics = train_and_evaluate(config, str(tmp_path / "run"))
    assert np.isfinite(metrics["lve_mm"]) and metrics["lve_mm"] > 0
    rows = _rows(str(tmp_path / "run"))
    assert all(r["vertex"] > 0 and r["lip_vertex"] > 0 for r in rows)
