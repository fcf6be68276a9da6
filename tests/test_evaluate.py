"""python -m avi_jax.evaluate's pieces that need no dataset: the tables, the video section's reasons, the
prediction loader, the generalised pairwise distance and the batched FLAME vertices."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from avi_jax import evaluate
from avi_jax.errors import ConfigError, InputError, UnsafePickleError
from avi_jax.metrics import report
from avi_jax.metrics.diversity import pairwise_mean_distance
from avi_jax.metrics.predictions import find_samples, load_prediction


def _result(video):
    return {"motion": {"metrics": {"mve_mm": 0.5}, "variants": {"mve_mm": "v"}, "unavailable": {"lve_max_sq_mm2": "why"},
                       "counts": {"clips": 1, "frames": 2, "frames_trimmed": 0, "missing": 0, "no_reference": 0,
                                  "vertex_only": 0}},
            "instructions": {"metrics": {"BLEU_1": 0.474}, "unavailable": {"SPICE": "no jars"}},
            "diversity": {"metrics": {"diversity_style": 0.433}, "unavailable": {}}, "video": video}


def _args(**kw):
    base = dict(render=True, inception_weights=None, syncnet_weights=None, fid_stride=1)
    base.update(kw)
    return argparse.Namespace(**base)


def test_tables_show_reasons_never_zero():
    video = evaluate.video_section(_args(), {"clips": []}, flame=object())
    text = report.format_report(_result(video), "ours")
    t3 = report.table3(_result(video), "ours")
    assert "47.4" in t3 and "SPICE ↑    n/a (2)" in t3 and "(2) no jars" in t3           # x 100, reason below
    assert "METEOR ↑   n/a (1)" in t3 and "(1) not computed" in t3
    t1 = report.table1(_result(video), "ours")
    assert "pt_inception-2015-12-05-6726825d.pth" in t1 and "syncnet_v2.model" in t1 and "GT" in t1
    assert t1.count("n/a (1)") == 2 and t1.count("n/a (2)") == 4                       # FID, KID; 4 x LSE
    t4 = report.table4(_result(video), "ours")
    assert "0.433" in t4 and "Diversity" in t4
    assert "lve_max_sq_mm2" in text and "n/a (1)" in report.motion_table(_result(video))
    assert " 0 " not in t1 + t3 + t4 and "Div. coef." not in t4
    coef = _result(video)
    coef["diversity"]["metrics"]["diversity_coefficient"] = 0.25          # no FLAME model: its own column
    assert "Div. coef. ↑" in report.table4(coef, "ours") and "0.25" in report.table4(coef, "ours")


def test_video_section_reasons_and_merge():
    v = evaluate.video_section(_args(render=False), {}, flame=object())
    assert set(v["unavailable"]) == set(report.VIDEO_METRICS) and "--no-render" in v["unavailable"]["fid"]
    v = evaluate.video_section(_args(), {}, flame=None)
    assert "--flame-model" in v["unavailable"]["lse_d"]
    merged = _result({"metrics": {"fid": 12.5, "gt_lse_d": 9.36}, "unavailable": {"kid": "k"}})
    t1 = report.table1(merged, "ours")
    assert "12.5" in t1 and "9.36" in t1 and "(1) k" in t1
    with pytest.raises(ConfigError, match="no such file"):
        evaluate._check_inputs(_args(inception_weights="/nowhere.pth", spice_jars=None))


def test_pairwise_mean_distance_over_sequences():
    """K = 3 samples of (T=2, V=1, 3): sample 1 = sample 0 + (3, 4, 0) in frame 0 only -> distance 5 then 0;
    sample 2 = sample 0 + (0, 0, 1) everywhere. Pairs (0,1): 2.5, (0,2): 1, (1,2): (sqrt(26) + 1) / 2."""
    x = np.zeros((3, 2, 1, 3))
    x[1, 0, 0] = (3, 4, 0)
    x[2] += (0, 0, 1)
    assert pairwise_mean_distance(x) == pytest.approx((2.5 + 1 + (np.sqrt(26) + 1) / 2) / 3)
    with pytest.raises(InputError):
        pairwise_mean_distance(np.zeros((1, 4)))


def test_prediction_layouts(tmp_path):
    (tmp_path / "a" / "sample_1").mkdir(parents=True)
    (tmp_path / "a" / "sample_0").mkdir()
    for s in (1, 0):
        np.savez(tmp_path / "a" / f"sample_{s}" / "coefficients.npz", expression=np.zeros((4, 50)),
                 jaw_pose=np.zeros((4, 3)), style=np.ones(8))
    assert [p.split("/")[-2] for p in find_samples(str(tmp_path), "a")] == ["sample_0", "sample_1"]
    assert load_prediction(find_samples(str(tmp_path), "a")[0]).style.shape == (1, 8)
    np.save(tmp_path / "b.npy", np.zeros((4, 53)))
    p = load_prediction(find_samples(str(tmp_path), "b")[0])
    assert p.expression.shape == (4, 50) and p.jaw_pose.shape == (4, 3) and p.vertices is None
    np.savez(tmp_path / "c.npz", verts=np.zeros((4, 10, 3)))
    assert load_prediction(str(tmp_path / "c.npz"), num_vertices=10).vertices.shape == (4, 10, 3)
    with pytest.raises(InputError, match=r"c.npz: verts has shape \(4, 10, 3\), expected vertices \(T, 12, 3\)"):
        load_prediction(str(tmp_path / "c.npz"), num_vertices=12)
    np.savez(tmp_path / "d.npz", expression=np.full((4, 50), np.nan), jaw_pose=np.zeros((4, 3)))
    with pytest.raises(InputError, match="NaN"):
        load_prediction(str(tmp_path / "d.npz"))
    np.savez(tmp_path / "e.npz", something=np.zeros(3))
    with pytest.raises(InputError, match="e.npz: no FLAME coefficients"):
        load_prediction(str(tmp_path / "e.npz"))
    assert find_samples(str(tmp_path), "zzz") == []
    import pickle
    with open(tmp_path / "f.pkl", "wb") as f:        # EMOTE's save_flame: a pickled dict with our keys
        pickle.dump({"expression": np.ones((4, 50), np.float32), "jaw_pose": np.zeros((4, 3), np.float32),
                     "shape": np.zeros((4, 100), np.float32)}, f)
    p = load_prediction(find_samples(str(tmp_path), "f")[0])
    assert p.expression.shape == (4, 50) and float(p.expression.sum()) == 200
    with open(tmp_path / "g.pkl", "wb") as f:
        pickle.dump({"expression": argparse.Namespace()}, f)
    with pytest.raises(UnsafePickleError, match="g.pkl"):
        load_prediction(str(tmp_path / "g.pkl"))


def test_batched_flame_vertices_match_one_by_one(tmp_path):
    import jax
    from avi_jax.checkpoints.flame import load_flame_model
    from avi_jax.data.demo_head import demo_head_paths
    from avi_jax.metrics import evaluate_motion
    from avi_jax.models.flame import motion_to_vertices
    flame = load_flame_model(str(demo_head_paths(tmp_path).model))
    rng = np.random.default_rng(0)
    motions = [rng.normal(size=(t, 53)).astype(np.float32) * 0.3 for t in (5, 70, 3)]
    old = evaluate_motion.BATCH_FRAMES
    evaluate_motion.BATCH_FRAMES = 32                 # several groups; the 70-frame clip spans 3 chunks
    try:
        got = list(evaluate_motion.flame_vertices_mm(flame, [motions[0], None, motions[1], motions[2]]))
    finally:
        evaluate_motion.BATCH_FRAMES = old
    assert got[1] is None
    for g, m in zip([got[0], got[2], got[3]], motions):
        np.testing.assert_allclose(g, np.asarray(jax.jit(motion_to_vertices)(flame, m)) * 1000, rtol=1e-5, atol=1e-4)


class _FakeFace:
    """Stands in for inference.system.TalkingFace: the instruction names the window's first audio sample's
    sign; styles are (instruction index, sample index) in 2-d; motion repeats the style's first entry."""

    def instructions(self, audio, mask):
        return [f"text {int(a[0] > 0)}" for a in audio]

    def styles(self, texts, keys, k):
        return np.array([[[float(i), float(s)] for s in range(k)] for i in range(len(texts))], np.float32)

    def motion(self, audio, mask, style):
        return np.repeat(style[:, None, :1], audio.shape[1] // 640, 1).repeat(53, -1)


def test_export_stores_each_windows_style(tmp_path):
    """Each sample's coefficients.npz holds ``style`` (W, D): the embedding that drove each window."""
    from avi_jax.inference import pipeline
    from avi_jax.inference.outputs import write_result
    audio = np.full(16000 * 3, -0.5, np.float32)
    audio[16000:] = 0.5                  # windows [0, 2) s and [1, 3) s: the second starts in the positive part
    opts = pipeline.Options(num_samples=2, window_seconds=2.0, overlap_seconds=0.5, bucket_seconds=(2.0,))
    results = pipeline.synthesize(_FakeFace(), [audio], opts)[0]
    for s, r in enumerate(results):
        assert [t for _, _, t in r.instructions] == ["text 0", "text 1"]
        np.testing.assert_array_equal(r.style, [[0, s], [1, s]])      # sorted distinct texts: index 0, 1
        write_result(str(tmp_path / f"sample_{s}"), r)
        with np.load(tmp_path / f"sample_{s}" / "coefficients.npz") as z:
            assert z["style"].dtype == np.float32 and z["style"].shape == (2, 2)
        assert load_prediction(str(tmp_path / f"sample_{s}" / "coefficients.npz")).style.shape == (2, 2)
