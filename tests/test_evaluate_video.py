"""The video evaluator: each frame of both sides drawn once with one camera and handed to the consumers; FID
and KID of the renders equal the metrics of features computed directly; missing weights are reported."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avi_jax.errors import RenderError
from avi_jax.metrics import image_quality
from avi_jax.metrics.evaluate_motion import Clip
from avi_jax.metrics.evaluate_video import InceptionFeatures, evaluate_video, face_camera
from avi_jax.metrics.predictions import Prediction

SIZE = 64


@pytest.fixture(scope="module")
def flame(tmp_path_factory):
    from avi_jax.checkpoints.flame import load_flame_model
    from avi_jax.data.demo_head import demo_head_paths
    from avi_jax.render import MeshRenderer
    paths = demo_head_paths(tmp_path_factory.mktemp("head"))
    model = load_flame_model(paths.model, paths.masks)
    try:
        MeshRenderer(np.asarray(model.faces), size=8).close()
    except RenderError as e:
        pytest.skip(f"no headless OpenGL through EGL here: {e}")
    return model


def _motion(rng, t, jaw_scale=0.15):
    m = np.zeros((t, 53))
    m[:, :50] = rng.normal(0, 1.0, (t, 50))
    m[:, 50] = jaw_scale * (1 + np.sin(np.arange(t)))          # jaw opening, radians
    return m


def _clips(rng):
    """Clip 'same': prediction == reference (7 frames); clip 'other': another motion, one frame longer than
    its 5-frame reference (cut to 5)."""
    same = _motion(rng, 7)
    other_gt, other_pred = _motion(rng, 5), _motion(rng, 6, jaw_scale=0.3)
    return [Clip("same", same, [Prediction("same.npz", same[:, :50], same[:, 50:])]),
            Clip("other", other_gt, [Prediction("other.npz", other_pred[:, :50], other_pred[:, 50:])])]


class Recorder:
    def __init__(self, stride):
        self.stride, self.batches = stride, []

    def consume(self, batch):
        self.batches.append(batch)

    def result(self):
        return {"metrics": {f"frames_seen_{self.stride}": float(sum(len(b.index) for b in self.batches))},
                "counts": {}, "variants": {}, "unavailable": {}}


def test_frames_drawn_once_with_one_camera(flame):
    every, second = Recorder(1), Recorder(2)
    out = evaluate_video(_clips(np.random.default_rng(0)), flame, consumers=[every, second], size=SIZE,
                         progress=False)
    assert out["counts"]["frames"] == 7 + 5 and out["counts"]["frames_rendered"] == 2 * (7 + 5)
    seen = {(b.clip_id, b.side): b for b in every.batches}
    assert sorted(seen) == [(c, s) for c in ("other", "same") for s in ("prediction", "reference")]
    assert len(every.batches) == 4                                        # one chunk per clip and side
    for (clip_id, _), b in seen.items():
        np.testing.assert_array_equal(b.index, np.arange(7 if clip_id == "same" else 5))
        assert b.frames.shape == (len(b.index), SIZE, SIZE, 3) and b.frames.dtype == np.uint8
        assert b.camera == face_camera(flame)
    np.testing.assert_array_equal(seen["same", "prediction"].frames, seen["same", "reference"].frames)
    assert np.abs(seen["other", "prediction"].frames.astype(int) - seen["other", "reference"].frames).max() > 50
    # The stride-2 consumer gets frames 0, 2, 4, ... of the same renders.
    for b in second.batches:
        np.testing.assert_array_equal(b.index % 2, 0)
        np.testing.assert_array_equal(b.frames, seen[b.clip_id, b.side].frames[b.index])
    # No weights: FID/KID unavailable, naming the file and where to get it; the other consumers still run.
    assert set(out["unavailable"]) == {"fid", "kid"}
    assert "pt_inception-2015-12-05-6726825d.pth" in out["unavailable"]["fid"]
    assert "github.com/mseitzer/pytorch-fid/releases" in out["unavailable"]["kid"]
    assert out["metrics"] == {"frames_seen_1": 24.0, "frames_seen_2": 14.0}


def test_vertex_predictions_render_like_their_coefficients(flame):
    from avi_jax.models.flame import motion_to_vertices
    clips = _clips(np.random.default_rng(1))
    pred = clips[1].samples[0]
    verts = np.asarray(motion_to_vertices(flame, jnp.asarray(pred.motion[None]))[0])
    as_vertices = Clip("other", clips[1].gt, [Prediction("other.npy", vertices=verts)])
    a, b = Recorder(1), Recorder(1)
    evaluate_video([clips[1]], flame, consumers=[a], size=SIZE, progress=False)
    evaluate_video([as_vertices], flame, consumers=[b], size=SIZE, progress=False)
    for x, y in zip(a.batches, b.batches):
        assert np.mean(x.frames != y.frames) < 0.002          # float rounding flips a few edge pixels at most


@pytest.mark.slow
def test_fid_kid_of_renders_equal_direct_features(flame):
    """Random Inception weights: the evaluator's FID/KID equal image_quality's on features of the same
    frames computed by the Flax Inception directly (rendered once more through render_frames)."""
    from avi_jax.models.inception import FIDInceptionV3
    from avi_jax.render import render_frames
    model = FIDInceptionV3()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3)))
    clips = _clips(np.random.default_rng(2))
    out = evaluate_video(clips, flame, consumers=[InceptionFeatures(variables, stride=2, batch_size=4)],
                         size=SIZE, progress=False)
    assert out["unavailable"] == {}
    counts = out["counts"]
    assert counts["fid_frames_prediction"] == counts["fid_frames_reference"] == 4 + 3
    assert counts["fid_frame_stride"] == 2 and counts["kid_subset_size"] == 7
    # Direct path: vertices -> frames (same camera) -> features, all frames of a side in one call.
    from avi_jax.models.flame import motion_to_vertices
    camera = face_camera(flame)
    feats = {}
    for side in ("prediction", "reference"):
        frames = []
        for c in clips:
            t = min(len(c.gt), c.samples[0].num_frames)
            motion = (c.samples[0].motion if side == "prediction" else c.gt.astype(np.float32))[:t:2]
            v = np.asarray(motion_to_vertices(flame, jnp.asarray(motion[None]))[0])
            frames += list(render_frames(v, np.asarray(flame.faces), size=SIZE, camera=camera))
        feats[side] = np.asarray(model.apply(variables, np.stack(frames).astype(np.float32) / 255.0))
    want_fid = image_quality.fid(feats["prediction"], feats["reference"])
    want_kid = image_quality.kid(feats["prediction"], feats["reference"])["kid"]
    assert want_fid > 0
    assert out["metrics"]["fid"] == pytest.approx(want_fid, rel=1e-3, abs=1e-6)
    assert out["metrics"]["kid"] == pytest.approx(want_kid, rel=1e-3, abs=1e-7)


def test_lip_sync_consumer_scores_both_sides_of_each_clip(flame):
    """LipSyncFrames (random SyncNet weights) on the shared renders: each clip's prediction and reference get
    the score of lip_sync_score on the same frames with the projected lip vertices; the reference side is
    the GT row. A clip under 6 frames cannot be scored and is named."""
    from avi_jax.metrics import lip_sync
    from helpers import random_syncnet_variables
    variables = random_syncnet_variables()
    rng = np.random.default_rng(3)
    long_gt, long_pred = _motion(rng, 8), _motion(rng, 8, jaw_scale=0.3)
    clips = [Clip("long", long_gt, [Prediction("long.npz", long_pred[:, :50], long_pred[:, 50:])],
                  rng.normal(0, 0.1, 8 * 640).astype(np.float32)),
             Clip("short", long_gt[:5], [Prediction("short.npz", long_pred[:5, :50], long_pred[:5, 50:])],
                  rng.normal(0, 0.1, 5 * 640).astype(np.float32))]
    frames = Recorder(1)
    consumer = lip_sync.LipSyncFrames(variables, {c.clip_id: c.audio for c in clips}, flame.masks["lips"])
    out = evaluate_video(clips, flame, consumers=[consumer, frames], size=SIZE, progress=False)
    assert out["counts"]["lse_unscored_clips"] == ["short (prediction)", "short (reference)"]
    assert out["counts"]["lse_clips"] == out["counts"]["gt_lse_clips"] == 1
    assert out["counts"]["lse_short_clips"] == 1                        # 8 frames <= 100: flagged, scored
    for side, prefix in (("prediction", ""), ("reference", "gt_")):
        (b,) = [b for b in frames.batches if (b.clip_id, b.side) == ("long", side)]
        points = lip_sync.project_to_pixels(b.vertices[:, np.asarray(flame.masks["lips"])], b.camera, SIZE, SIZE)
        want = lip_sync.lip_sync_score(b.frames, clips[0].audio, variables, lip_points=points)
        assert out["metrics"][prefix + "lse_d"] == pytest.approx(want.lse_d, rel=1e-6)
        assert out["metrics"][prefix + "lse_c"] == pytest.approx(want.lse_c, rel=1e-6)
    assert out["metrics"]["lse_d"] != out["metrics"]["gt_lse_d"]
    assert "S3FD" in out["variants"]["gt_lse_d"] and "ground-truth" in out["variants"]["gt_lse_d"]
