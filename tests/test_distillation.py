"""Style distillation of stage 2a (paper Sec. IV-A-2): EMOTE's linear styling network as the style
encoder's teacher. The teacher against a hand computation; the loss term only with weight > 0, equal to a
hand computation; a teacher loaded from a user's file is frozen."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avi_jax.assembly import motion as A
from avi_jax.checkpoints.exported import export_params
from avi_jax.data import schema
from avi_jax.errors import CheckpointError, ConfigError
from avi_jax.models.motion import MotionPrior
from avi_jax.training import motion as M
from configs import motion_prior
from helpers import tiny_config

B, FRAMES = 4, 12


def _batch():
    rng = np.random.default_rng(0)
    n = FRAMES * schema.SAMPLES_PER_FRAME
    return {"audio": jnp.asarray(rng.normal(0, 0.1, (B, n)), jnp.float32), "audio_mask": jnp.ones((B, n), bool),
            "expression": jnp.asarray(rng.normal(size=(B, FRAMES, schema.N_EXPRESSION)), jnp.float32),
            "jaw_pose": jnp.asarray(rng.normal(0, 0.1, (B, FRAMES, schema.N_JAW)), jnp.float32),
            "coeff_mask": jnp.ones((B, FRAMES), bool), "valid": jnp.ones(B, bool),
            "emotion": jnp.array([5, 1, -1, 5], jnp.int32), "intensity": jnp.array([3, 1, 0, 2], jnp.int32)}


def _stage(tmp_path, **overrides):
    config = tiny_config(motion_prior, **overrides)
    setup = A.MotionSetup(config, str(tmp_path), data=False)
    return M.MotionStage(setup)


def _params(stage, batch):
    params = jax.jit(lambda r: nn.meta.unbox(stage.setup.init_params(r, batch, with_statistics=False)))(
        jax.random.key(0))
    rng = np.random.default_rng(1)
    params["generator"]["out"]["kernel"] = jnp.asarray(      # a non-trivial (zero-initialised) output layer
        rng.normal(0, 0.5, params["generator"]["out"]["kernel"].shape), jnp.float32)
    return params


def test_teacher_is_a_linear_map_of_one_hot_labels(tmp_path):
    stage = _stage(tmp_path, **{"motion.distill.weight": 0.5})
    params = _params(stage, _batch())
    lin = params["style_teacher"]["linear"]
    assert lin["kernel"].shape == (len(schema.EMOTIONS) + 4, stage.setup.model_config.style_embed_dim)
    emotion, intensity = np.array([0, 5, 8]), np.array([1, 3, 0])
    got = stage.model.apply({"params": params}, jnp.asarray(emotion), jnp.asarray(intensity),
                            method=MotionPrior.teacher_style)
    kernel, bias = np.asarray(lin["kernel"]), np.asarray(lin["bias"])
    want = kernel[emotion] + kernel[len(schema.EMOTIONS) + intensity] + bias
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_distillation_term_only_with_weight_and_equals_hand_computation(tmp_path):
    batch, rng = _batch(), jax.random.key(7)
    off = _stage(tmp_path / "off", **{"motion.distill.weight": 0.0})
    on = _stage(tmp_path / "on", **{"motion.distill.weight": 0.5})
    p_on = _params(on, batch)
    p_off = {k: v for k, v in p_on.items() if k != "style_teacher"}
    assert set(_params(off, batch)) == set(p_off) and "style_teacher" not in off.trainable
    assert "style_teacher" in on.trainable and on.source("style_teacher") == "init"
    loss_off, t_off = jax.jit(off.loss)(p_off, batch, rng)
    loss_on, t_on = jax.jit(on.loss)(p_on, batch, rng)
    assert "distill" not in t_off and "teacher_loss" not in t_off
    np.testing.assert_allclose(loss_off, t_off["reconstruction"] + 0.5 * t_off["velocity"], rtol=1e-6)
    # by hand: the reference frames of the loss's split, the student's embedding of them, the teacher's
    # (one-hot rows of the kernel + bias), the squared error averaged over dimensions and labelled clips
    split_rng, _ = jax.random.split(rng)
    motion = np.concatenate([batch["expression"], batch["jaw_pose"]], -1)
    target, reference = M.split_target(split_rng, jnp.ones((B, FRAMES), bool), 0.5, 2)
    student = np.asarray(on.model.apply({"params": p_on}, jnp.asarray(motion), reference, method=MotionPrior.style))
    lin = p_on["style_teacher"]["linear"]
    kernel, bias = np.asarray(lin["kernel"]), np.asarray(lin["bias"])
    teacher = kernel[np.asarray(batch["emotion"])] + kernel[9 + np.asarray(batch["intensity"])] + bias
    known = np.array([True, True, False, True])          # clip 2 has no emotion label
    want = np.mean(np.square(student - teacher), -1)[known].mean()
    np.testing.assert_allclose(float(t_on["distill"]), want, rtol=1e-5)
    # the student's terms are those without distillation; the total adds w * distill and the teacher's loss
    np.testing.assert_allclose(float(t_on["reconstruction"]), float(t_off["reconstruction"]), rtol=1e-6)
    assert float(t_on["teacher_loss"]) > 0
    np.testing.assert_allclose(float(loss_on), float(loss_off) + 0.5 * want + float(t_on["teacher_loss"]),
                               rtol=1e-5)
    # the distillation term pulls the student only: no gradient reaches the teacher through it
    g = jax.grad(lambda p: M.distillation_loss(
        on.model.apply({"params": p}, jnp.asarray(motion), reference, method=MotionPrior.style),
        on.model.apply({"params": p}, batch["emotion"], batch["intensity"], method=MotionPrior.teacher_style),
        jnp.asarray(known)))(p_on)
    assert float(jnp.abs(g["style_teacher"]["linear"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(g["style_encoder"]["out"]["kernel"]).max()) > 0


def test_teacher_from_a_file_is_frozen(tmp_path):
    batch = _batch()
    trained = _stage(tmp_path / "a", **{"motion.distill.weight": 1.0})
    teacher = {"style_teacher": _params(trained, batch)["style_teacher"]}
    path = str(tmp_path / "teacher.safetensors")
    export_params(teacher, path)
    stage = _stage(tmp_path / "b", **{"motion.distill.weight": 1.0, "motion.distill.teacher_path": path})
    assert stage.source("style_teacher") == "file" and "style_teacher" not in stage.trainable
    params = _params(stage, batch)
    loaded = stage.load_component("style_teacher", params["style_teacher"], None)
    np.testing.assert_array_equal(loaded["linear"]["kernel"], teacher["style_teacher"]["linear"]["kernel"])
    _, terms = jax.jit(stage.loss)({**params, "style_teacher": loaded}, batch, jax.random.key(0))
    assert "distill" in terms and "teacher_loss" not in terms
    missing = _stage(tmp_path / "c", **{"motion.distill.weight": 1.0,
                                        "motion.distill.teacher_path": str(tmp_path / "none.safetensors")})
    with pytest.raises((ConfigError, CheckpointError), match="none.safetensors"):
        missing.load_component("style_teacher", params["style_teacher"], None)


def test_on_by_default_off_in_the_demo_and_absent_from_older_configs():
    """Paper-like default (the paper distils; off in the demo, whose speakers' expression offsets an
    emotion/intensity code cannot carry); a config without the field (an older run's config.json) builds the
    model without a teacher."""
    for variant in ("paper", "tiny"):
        assert motion_prior.get_config(variant).motion.distill.weight == 1.0
    assert motion_prior.get_config("demo").motion.distill.weight == 0.0
    assert A.motion_model_config(motion_prior.get_config("tiny")).style_teacher
    old = motion_prior.get_config("tiny")
    del old.motion["distill"]
    assert A.distill_weight(old) == 0.0 and not A.motion_model_config(old).style_teacher
