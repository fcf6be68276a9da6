"""EMOCA output folders -> per-clip coefficients: ordering, layouts, the missing/length policy, smoothing."""
from __future__ import annotations

import os

import numpy as np
import pytest

from avi_jax.data import emoca, schema
from avi_jax.errors import InputError


def _codes(t: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    exp = rng.standard_normal((t, 50)).astype(np.float32)
    pose = (0.1 * rng.standard_normal((t, 6))).astype(np.float32)
    shape = rng.standard_normal(100).astype(np.float32)
    return exp, pose, shape


def test_frames_ordered_numerically_and_split_into_fields(tmp_path):
    # 120 frames: string order would put 000100 before 000011 only with unpadded names; use unpadded names
    # to make sure the order is numeric.
    t = 120
    exp, pose, shape = _codes(t)
    folder = tmp_path / "clip" / "EMOCA_v2_lr_mse_20"
    for i in range(t):
        d = folder / f"{i + 1}_000"              # unpadded: "100_000" < "11_000" as strings
        d.mkdir(parents=True)
        np.save(d / "exp.npy", exp[i][None])     # EMOCA may save a leading batch axis of 1
        np.save(d / "pose.npy", pose[i])
        np.save(d / "shape.npy", shape)
    (folder / "7_001").mkdir()                   # a second face in frame 7: ignored
    np.save(folder / "7_001" / "exp.npy", np.full(50, 99.0, np.float32))
    out = emoca.load_emoca_clip(tmp_path / "clip", t * schema.SAMPLES_PER_FRAME)
    np.testing.assert_array_equal(out.expression, exp)
    np.testing.assert_array_equal(out.global_pose, pose[:, :3])
    np.testing.assert_array_equal(out.jaw_pose, pose[:, 3:])
    np.testing.assert_array_equal(out.shape, shape)
    assert out.missing == 0 and out.trimmed == 0
    assert out.expression.dtype == np.float32 and out.expression.shape == (t, 50)


def test_results_layout_model_choice_and_wider_codes(tmp_path):
    t = 10
    exp, pose, shape = _codes(t, 1)
    wide = np.concatenate([exp, np.ones((t, 50), np.float32)], 1)       # 100 expression values saved
    emoca.write_emoca_clip(tmp_path / "c" / "results", wide, pose, shape, model_name="EMOCA")
    emoca.write_emoca_clip(tmp_path / "c" / "results", exp, pose, shape, model_name="DECA")
    with pytest.raises(InputError, match="several models"):
        emoca.load_emoca_clip(tmp_path / "c", t * 640)
    out = emoca.load_emoca_clip(tmp_path / "c", t * 640, model_name="EMOCA")
    np.testing.assert_array_equal(out.expression, exp)                    # first 50 kept
    with pytest.raises(InputError, match="no EMOCA frame folders"):
        emoca.load_emoca_clip(tmp_path / "c", t * 640, model_name="SPECTRE")
    with pytest.raises(InputError, match="does not exist"):
        emoca.load_emoca_clip(tmp_path / "absent", t * 640)


def test_missing_frames_interpolated_within_tolerance(tmp_path):
    t = 40
    exp, pose, shape = _codes(t, 2)
    emoca.write_emoca_clip(tmp_path / "c", exp, pose, shape, skip=[0, 10, 11, 39])   # 4/40 = 10 %
    out = emoca.load_emoca_clip(tmp_path / "c", t * 640, clip="c")
    assert out.missing == 4 and out.expression.shape == (t, 50)
    np.testing.assert_allclose(out.expression[0], exp[1])                  # held at the start
    np.testing.assert_allclose(out.expression[39], exp[38])                # held at the end
    np.testing.assert_allclose(out.expression[10], exp[9] + (exp[12] - exp[9]) / 3, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.jaw_pose[11], pose[9, 3:] + 2 * (pose[12, 3:] - pose[9, 3:]) / 3,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.expression[5], exp[5])


def test_too_many_missing_frames_refused_naming_the_clip(tmp_path):
    t = 40
    exp, pose, shape = _codes(t, 3)
    emoca.write_emoca_clip(tmp_path / "M003_sad_level_2_004", exp, pose, shape, skip=range(5, 17))   # 30 %
    with pytest.raises(InputError, match=r"M003_sad_level_2_004.*12 of 40 EMOCA frames are missing"):
        emoca.load_emoca_clip(tmp_path / "M003_sad_level_2_004", t * 640, clip="M003_sad_level_2_004")


def test_nan_refused_naming_the_frame_file(tmp_path):
    exp, pose, shape = _codes(10, 4)
    pose[6, 4] = np.nan
    emoca.write_emoca_clip(tmp_path / "c", exp, pose, shape)
    with pytest.raises(InputError, match=r"000007_000.pose\.npy: EMOCA pose code holds NaN"):
        emoca.load_emoca_clip(tmp_path / "c", 10 * 640)


def test_length_mismatch_trim_and_refuse(tmp_path):
    exp, pose, shape = _codes(27, 5)
    emoca.write_emoca_clip(tmp_path / "c", exp, pose, shape)
    out = emoca.load_emoca_clip(tmp_path / "c", 25 * 640)                 # 2 extra frames: trimmed
    assert out.trimmed == 2 and out.expression.shape == (25, 50)
    np.testing.assert_array_equal(out.expression, exp[:25])
    with pytest.raises(InputError, match="run past the audio"):
        emoca.load_emoca_clip(tmp_path / "c", 20 * 640)                   # 7 extra frames
    with pytest.raises(InputError, match="missing"):
        emoca.load_emoca_clip(tmp_path / "c", 40 * 640)                   # 13 of 40 absent at the end


def test_bad_shapes_refused(tmp_path):
    exp, pose, shape = _codes(5, 6)
    emoca.write_emoca_clip(tmp_path / "a", exp, pose[:, :3], shape)
    with pytest.raises(InputError, match=r"pose\.npy: EMOCA pose code has 3 values"):
        emoca.load_emoca_clip(tmp_path / "a", 5 * 640)
    emoca.write_emoca_clip(tmp_path / "b", exp[:, :20], pose, shape)
    with pytest.raises(InputError, match=r"exp\.npy: EMOCA expression \(exp\) code has 20 values"):
        emoca.load_emoca_clip(tmp_path / "b", 5 * 640)
    emoca.write_emoca_clip(tmp_path / "c", exp, pose, shape)
    os.remove(tmp_path / "c" / "EMOCA" / "000003_000" / "shape.npy")
    with pytest.raises(InputError, match=r"000003_000.shape\.npy: missing EMOCA shape file"):
        emoca.load_emoca_clip(tmp_path / "c", 5 * 640)


def test_retime_30fps_to_25fps(tmp_path):
    fps = 30.0
    n = 2 * schema.SAMPLE_RATE                                  # 2 s: 60 source frames, 50 output frames
    tt = np.arange(60) / fps
    exp = np.zeros((60, 50), np.float32)
    exp[:, 0] = tt                                               # linear in time: interpolation is exact
    pose = np.zeros((60, 6), np.float32)
    pose[:, 3] = 2 * tt
    emoca.write_emoca_clip(tmp_path / "c", exp, pose, np.zeros(100))
    out = emoca.load_emoca_clip(tmp_path / "c", n, fps=fps)
    assert out.expression.shape == (50, 50)
    np.testing.assert_allclose(out.expression[:, 0], np.arange(50) / 25.0, atol=1e-6)
    np.testing.assert_allclose(out.jaw_pose[:, 0], 2 * np.arange(50) / 25.0, atol=1e-6)


def test_smooth_pose_is_a_zero_phase_lowpass():
    t = np.arange(200) / 25.0
    slow = 0.2 * np.sin(2 * np.pi * 0.5 * t)
    fast = 0.05 * np.sin(2 * np.pi * 8.0 * t)
    x = np.stack([slow + fast, slow, fast], 1).astype(np.float32)
    y = emoca.smooth_pose(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    inner = slice(25, 175)
    np.testing.assert_allclose(y[inner, 0], slow[inner], atol=5e-3)      # 8 Hz removed, 0.5 Hz kept in phase
    assert np.abs(y[inner, 2]).max() < 2e-3
    assert emoca.smooth_pose(x[:4]).shape == (4, 3)                      # short tracks work
    # smoothing applies to the head rotation only
    exp = np.zeros((200, 50), np.float32)
    pose = np.concatenate([x, x], 1)
    raw = emoca.EmocaFrames(np.arange(200), exp, pose, np.zeros((200, 100), np.float32), "mem")
    out = emoca.align_to_audio(raw, 200 * 640, smooth=True)
    np.testing.assert_allclose(out.global_pose, y, atol=1e-6)
    np.testing.assert_array_equal(out.jaw_pose, x)
