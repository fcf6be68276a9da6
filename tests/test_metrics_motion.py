"""Motion metrics (LVE variants, FDD, MVE, coefficient errors) against values computed by hand, and the
``python -m avi_jax.evaluate`` CLI on a synthetic export of a tiny demo dataset."""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

from avi_jax.errors import InputError
from avi_jax.metrics import motion


def _lips_case():
    """T=2, V=4, lips = vertices 0 and 1; vertex 2 (not a lip) carries a large error that must be ignored.
    Frame 0: squared errors 1 (v0 = (1,0,0)), 4 (v1 = (0,2,0)) -> max 4.
    Frame 1: squared errors 3 (v0 = (1,1,1)), 1 (v1 = (0,0,1)) -> max 3."""
    pred = np.zeros((2, 4, 3))
    gt = np.zeros((2, 4, 3))
    gt[0, 0], gt[0, 1], gt[0, 2] = (1, 0, 0), (0, 2, 0), (10, 0, 0)
    gt[1, 0], gt[1, 1], gt[1, 2] = (1, 1, 1), (0, 0, 1), (0, 10, 0)
    return pred + 7.0, gt + 7.0, [0, 1]        # a common offset changes nothing


def test_lip_max_sq_error_and_both_lve_variants():
    pred, gt, lips = _lips_case()
    np.testing.assert_allclose(motion.lip_max_sq_error(pred, gt, lips), [4.0, 3.0])
    assert motion.lve_max_sq([pred], [gt], lips) == pytest.approx(3.5)                  # (4 + 3) / 2
    assert motion.lve_max_l2([pred], [gt], lips) == pytest.approx((2 + math.sqrt(3)) / 2)  # (sqrt4 + sqrt3) / 2


def test_lve_is_frame_weighted_over_sequences():
    pred, gt, lips = _lips_case()
    p2, g2 = np.zeros((1, 4, 3)), np.zeros((1, 4, 3))
    g2[0, 1] = (0, 3, 0)                                       # one frame, max squared error 9
    assert motion.lve_max_sq([pred, p2], [gt, g2], lips) == pytest.approx((4 + 3 + 9) / 3)
    assert motion.lve_max_l2([pred, p2], [gt, g2], lips) == pytest.approx((2 + math.sqrt(3) + 3) / 3)


def _fdd_case():
    """T=3, V=4, upper face = vertices 2 and 3, template (V, 3) with vertex 2 at (5, 5, 5).
    GT: v2 displaced (0,0,0), (1,0,0), (2,0,0) -> squared norms [0, 1, 4], mean 5/3,
        variance ((25 + 4 + 49) / 9) / 3 = 26/9, std sqrt(26)/3; v3 displaced (0,0,3) always -> std 0.
        Dynamics = (sqrt(26)/3 + 0) / 2 = sqrt(26)/6.
    Pred: v2 and v3 squared norms [0, 0, 1] -> mean 1/3, variance (1/9 + 1/9 + 4/9) / 3 = 2/9, std sqrt(2)/3.
        Dynamics = sqrt(2)/3.
    FDD = sqrt(26)/6 - sqrt(2)/3. Vertices 0 and 1 move wildly in both but are not upper face."""
    template = np.zeros((4, 3))
    template[2] = (5, 5, 5)
    gt = np.tile(template, (3, 1, 1))
    pred = gt.copy()
    gt[:, 2] += [(0, 0, 0), (1, 0, 0), (2, 0, 0)]
    gt[:, 3] += (0, 0, 3)
    pred[2, 2] += (0, 1, 0)
    pred[2, 3] += (0, 0, -1)
    rng = np.random.default_rng(0)
    gt[:, :2] += rng.normal(size=(3, 2, 3)) * 50
    pred[:, :2] += rng.normal(size=(3, 2, 3)) * 50
    return pred, gt, template, [2, 3]


def test_upper_face_dynamics_and_fdd():
    pred, gt, template, upper = _fdd_case()
    assert motion.upper_face_dynamics(gt, template, upper) == pytest.approx(math.sqrt(26) / 6)
    assert motion.upper_face_dynamics(pred, template, upper) == pytest.approx(math.sqrt(2) / 3)
    want = math.sqrt(26) / 6 - math.sqrt(2) / 3
    assert motion.fdd([pred], [gt], [template], upper) == pytest.approx(want)
    # averaged over sequences (not frames); the swapped pair gives the negative value
    assert motion.fdd([pred, gt], [gt, pred], [template, template], upper) == pytest.approx(0.0, abs=1e-12)
    assert motion.fdd([pred, gt[:2]], [gt, gt[:2]], [template] * 2, upper) == pytest.approx(want / 2)
    with pytest.raises(InputError):
        motion.fdd([pred], [gt], [], upper)


def test_mean_vertex_error():
    """One frame, two vertices: errors |(3,4,0)| = 5 and |(0,0,1)| = 1 -> MVE 3; only vertex 0 -> 5.
    A second sequence of two frames with error 0 makes it (5 + 1 + 0 + 0 + 0 + 0) / 6 = 1 (frame-weighted)."""
    pred = np.zeros((1, 2, 3))
    gt = np.array([[[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]]])
    assert motion.mean_vertex_error([pred], [gt]) == pytest.approx(3.0)
    assert motion.mean_vertex_error([pred], [gt], [0]) == pytest.approx(5.0)
    assert motion.mean_vertex_error([pred, np.zeros((2, 2, 3))], [gt, np.zeros((2, 2, 3))]) == pytest.approx(1.0)
    with pytest.raises(InputError, match=r"\(T, V, 3\)"):
        motion.mean_vertex_error([pred], [gt[:, :1]])


def test_coefficient_errors():
    """T=3. Expression: prediction 0, reference 1 in frame 0 only -> 50 squared errors of 1 over 150 = 1/3.
    Jaw opening: reference twice the prediction -> r = 1; errors 0.1, 0.2, 0.3 in component 0 only ->
    (0.01 + 0.04 + 0.09) / 9. Reversed reference -> r = -1."""
    pe, ge = np.zeros((3, 50)), np.zeros((3, 50))
    ge[0] = 1.0
    pj = np.array([[0.1, 0, 0], [0.2, 0, 0], [0.3, 0, 0]])
    gj = 2 * pj
    out = motion.coefficient_errors([pe], [ge], [pj], [gj])
    assert out["expression_mse"] == pytest.approx(1 / 3)
    assert out["jaw_mse"] == pytest.approx(0.14 / 9)
    assert out["jaw_open_pearson"] == pytest.approx(1.0)
    assert motion.coefficient_errors([pe], [ge], [pj], [gj[::-1]])["jaw_open_pearson"] == pytest.approx(-1.0)
    with pytest.raises(InputError, match=r"\(T, 3\)"):
        motion.coefficient_errors([pe], [ge], [pj[:, :2]], [gj])


# ---------------------------------------------------------------------------------------------
# The CLI on a synthetic export.
# ---------------------------------------------------------------------------------------------

SPLIT = "validation"       # 24 clips of 25 frames in the 4-speaker, 1 s demo


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from avi_jax.data import builder, demo
    path = demo.prepare_demo(tmp_path_factory.mktemp("data"), seed=0, num_speakers=4, clip_seconds=1.0)
    src = builder.open_split(path, SPLIT)
    recs = {builder.text(src[i]["clip_id"]): (np.asarray(src[i]["expression"]), np.asarray(src[i]["jaw_pose"]))
            for i in range(len(src))}
    return path, recs


@pytest.fixture(scope="module")
def flame_path(tmp_path_factory):
    from avi_jax.data.demo_head import demo_head_paths
    return str(demo_head_paths(tmp_path_factory.mktemp("head")).model)


def _write(folder, clip_id, expression, jaw, sample=False):
    d = os.path.join(folder, clip_id, "sample_0") if sample else os.path.join(folder, clip_id)
    os.makedirs(d, exist_ok=True)
    np.savez(os.path.join(d, "coefficients.npz"), expression=expression.astype(np.float32),
             jaw_pose=jaw.astype(np.float32), global_pose=np.zeros((len(jaw), 3), np.float32))


def _evaluate(*args):
    from avi_jax import evaluate
    return evaluate.main([str(a) for a in args])


def test_cli_exact_export_scores_zero(reference, flame_path, tmp_path, capsys):
    path, recs = reference
    ids = sorted(recs)
    export = tmp_path / "exact"
    for k, c in enumerate(ids[:-1]):        # the last clip is missing; clip 1 in sample_0; clip 2 5 frames longer
        e, j = recs[c]
        if k == 2:
            e, j = np.concatenate([e, np.ones((5, 50))]), np.concatenate([j, np.ones((5, 3))])
        _write(export, c, e, j, sample=(k == 1))
    (export / "instructions.jsonl").write_text(
        json.dumps({"clip_id": ids[0], "instruction": "A happy man speaks.", "references": ["a happy man speaks"]})
        + "\n")
    out = tmp_path / "m.json"
    assert _evaluate("--export", export, "--dataset", path, "--split", SPLIT, "--flame-model", flame_path,
                     "--out", out) == 0
    captured = capsys.readouterr()
    assert ids[-1] in captured.err and "lve_max_sq_mm2" in captured.out
    for title in ("Table 1", "Table 3", "Table 4"):
        assert title in captured.out
    assert re.search(r"BLEU_1 ↑ +100\.0\n", captured.out) and "pt_inception-2015-12-05-6726825d.pth" in captured.out
    res = json.loads(out.read_text())
    assert res["instructions"]["metrics"]["BLEU_1"] == pytest.approx(1.0)
    assert res["instructions"]["counts"]["instructions"] == 1 and "SPICE" in res["instructions"]["unavailable"]
    assert "one sample per clip" in res["diversity"]["unavailable"]["diversity_style"]
    assert set(res["video"]["unavailable"]) >= {"fid", "kid", "lse_d", "lse_c", "gt_lse_d", "gt_lse_c"}
    m = res["motion"]["metrics"]
    assert m["expression_mse"] == 0 and m["jaw_mse"] == 0 and m["jaw_open_pearson"] == pytest.approx(1.0)
    for k in ("lve_max_sq_mm2", "lve_max_l2_mm", "fdd_mm2", "mve_mm"):
        assert m[k] == pytest.approx(0.0, abs=1e-6), k
        assert k in res["motion"]["variants"]
    frames = sum(len(recs[c][0]) for c in ids[:-1])
    assert res["motion"]["counts"] == {"clips": len(ids) - 1, "frames": frames, "frames_trimmed": 5,
                                       "reference_clips": len(ids), "missing": 1, "no_reference": 0,
                                       "vertex_only": 0}
    assert res["motion"]["missing"] == [ids[-1]]
    assert res["versions"]["numpy"] == np.__version__ and "avi_jax" in res["versions"]


def test_cli_perturbed_export_known_errors(reference, flame_path, tmp_path):
    """Expression + 0.1 everywhere -> expression MSE 0.01; jaw opening 0.5 x + 0.01 (one affine map for all
    clips) -> pooled r = 1 and jaw MSE = sum over frames of (0.5 x - 0.01)^2 / (3 frames) (only component
    0 differs; computed here from the float32 values written)."""
    path, recs = reference
    export = tmp_path / "perturbed"
    jaw_sq, n = 0.0, 0
    for c, (e, j) in recs.items():
        pj = j.astype(np.float64).copy()
        pj[:, 0] = 0.5 * j[:, 0] + 0.01
        _write(export, c, e + 0.1, pj)
        pj32 = pj.astype(np.float32).astype(np.float64)
        jaw_sq += np.sum(np.square(pj32 - j.astype(np.float64)))
        n += len(j)
    out = tmp_path / "m.json"
    assert _evaluate("--export", export, "--dataset", path, "--split", SPLIT, "--out", out) == 0
    res = json.loads(out.read_text())
    m = res["motion"]["metrics"]
    assert m["expression_mse"] == pytest.approx(0.01, rel=1e-4)
    assert m["jaw_mse"] == pytest.approx(jaw_sq / (3 * n), rel=1e-6)
    assert m["jaw_open_pearson"] == pytest.approx(1.0, abs=1e-5)
    assert "lve_max_sq_mm2" not in m and "--flame-model" in res["motion"]["unavailable"]["lve_max_sq_mm2"]
    # with the head: a changed expression moves the lips, and max-of-squares >= (mean of max)^2 (Jensen)
    assert _evaluate("--export", export, "--dataset", path, "--split", SPLIT, "--flame-model", flame_path,
                     "--out", out) == 0
    m = json.loads(out.read_text())["motion"]["metrics"]
    assert m["lve_max_l2_mm"] > 0 and m["mve_mm"] > 0
    assert m["lve_max_sq_mm2"] >= m["lve_max_l2_mm"] ** 2 - 1e-9
    # motion damped to half (expression and jaw) is less dynamic than the reference: FDD (GT - pred) > 0
    damped = tmp_path / "damped"
    for c, (e, j) in recs.items():
        _write(damped, c, 0.5 * e, 0.5 * j)
    assert _evaluate("--export", damped, "--dataset", path, "--split", SPLIT, "--flame-model", flame_path,
                     "--out", out) == 0
    m = json.loads(out.read_text())["motion"]["metrics"]
    assert m["fdd_mm2"] > 0 and m["jaw_open_pearson"] == pytest.approx(1.0, abs=1e-5)


def test_cli_errors(reference, tmp_path, capsys):
    path, recs = reference
    assert _evaluate("--export", tmp_path / "none", "--dataset", path, "--split", SPLIT) == 2
    assert capsys.readouterr().err.startswith("error: ")
    os.makedirs(tmp_path / "empty")
    assert _evaluate("--export", tmp_path / "empty", "--dataset", path, "--split", SPLIT) == 2
    assert "none of the" in capsys.readouterr().err
    c = sorted(recs)[0]
    _write(tmp_path / "bad", c, np.zeros((25, 40)), np.zeros((25, 3)))
    assert _evaluate("--export", tmp_path / "bad", "--dataset", path, "--split", SPLIT) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "coefficients.npz" in err and "(T, 50)" in err
    assert _evaluate("--export", tmp_path / "bad", "--dataset", path, "--split", SPLIT,
                     "--flame-model", tmp_path / "nowhere" / "generic_model.pkl") == 2
    assert "FLAME_masks.pkl" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Other methods' formats, and diversity over samples.
# ---------------------------------------------------------------------------------------------

def _flame(path):
    from avi_jax.checkpoints.flame import load_flame_model
    return load_flame_model(path, os.path.join(os.path.dirname(path), "FLAME_masks.pkl"))


def test_cli_other_methods_formats(reference, flame_path, tmp_path):
    """DiffPoseTalk-style .npz (exp + pose (T, 6), jaw = pose[:, 3:]), EMOTE-style (exp + jaw) and bare
    .npy (T, 53) give the same figures as our layout; FaceFormer-style (T, V*3) vertices of the reference
    score LVE/MVE 0 and have no coefficient metrics."""
    import jax
    from avi_jax.models.flame import motion_to_vertices
    path, recs = reference
    ids = sorted(recs)
    mixed, verts = tmp_path / "mixed", tmp_path / "verts"
    os.makedirs(mixed), os.makedirs(verts)
    flame = _flame(flame_path)
    for k, c in enumerate(ids):
        e, j = recs[c]
        e2 = e + 0.1
        if k % 3 == 0:
            np.savez(mixed / f"{c}.npz", exp=e2, pose=np.concatenate([np.full_like(j, 9.0), j], -1))
        elif k % 3 == 1:
            np.savez(mixed / f"{c}.npz", exp=e2, jaw=j)
        else:
            np.save(mixed / f"{c}.npy", np.concatenate([e2, j], -1))
        v = np.asarray(jax.jit(motion_to_vertices)(flame, np.concatenate([e, j], -1).astype(np.float32)))
        np.save(verts / f"{c}.npy", v.reshape(len(v), -1))
    out = tmp_path / "m.json"
    assert _evaluate("--export", mixed, "--dataset", path, "--split", SPLIT, "--out", out) == 0
    res = json.loads(out.read_text())
    m = res["motion"]["metrics"]
    assert m["expression_mse"] == pytest.approx(0.01, rel=1e-4) and m["jaw_mse"] == pytest.approx(0.0, abs=1e-12)
    assert "instructions.jsonl not found" in res["instructions"]["unavailable"]["BLEU_1"]
    assert _evaluate("--export", verts, "--dataset", path, "--split", SPLIT, "--flame-model", flame_path,
                     "--out", out) == 0
    res = json.loads(out.read_text())["motion"]
    assert res["counts"]["vertex_only"] == len(ids) and "expression_mse" in res["unavailable"]
    for k in ("lve_max_sq_mm2", "lve_max_l2_mm", "mve_mm", "fdd_mm2"):
        assert res["metrics"][k] == pytest.approx(0.0, abs=1e-3), k


def test_cli_other_formats_wrong_shape(reference, flame_path, tmp_path, capsys):
    path, recs = reference
    c = sorted(recs)[0]
    os.makedirs(tmp_path / "v")
    np.save(tmp_path / "v" / f"{c}.npy", np.zeros((25, 100, 3)))
    assert _evaluate("--export", tmp_path / "v", "--dataset", path, "--split", SPLIT,
                     "--flame-model", flame_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{c}.npy" in err and "expected vertices" in err
    os.makedirs(tmp_path / "p")
    np.savez(tmp_path / "p" / f"{c}.npz", exp=np.zeros((25, 50)), pose=np.zeros((25, 3)))
    assert _evaluate("--export", tmp_path / "p", "--dataset", path, "--split", SPLIT) == 2
    assert "pose has shape (25, 3)" in capsys.readouterr().err


def test_diversity_of_samples(reference, flame_path, tmp_path):
    """Two samples per clip. Styles (1, 2) (0,0) and (3,4) -> 5 for every clip. Sample 1 = sample 0 with
    expression + 0.2 and the same jaw -> coefficient diversity = |0.2 * ones(50)| = 0.2 sqrt(50); with
    FLAME the vertex diversity equals the mean vertex distance between the two samples' meshes."""
    import jax
    from avi_jax.models.flame import motion_to_vertices
    path, recs = reference
    export = tmp_path / "k2"
    for c, (e, j) in recs.items():
        for s in range(2):
            d = export / c / f"sample_{s}"
            os.makedirs(d)
            np.savez(d / "coefficients.npz", expression=e + 0.2 * s, jaw_pose=j,
                     style=np.array([[3.0 * s, 4.0 * s]], np.float32))
    out = tmp_path / "m.json"
    assert _evaluate("--export", export, "--dataset", path, "--split", SPLIT, "--out", out) == 0
    d = json.loads(out.read_text())["diversity"]
    assert d["metrics"]["diversity_style"] == pytest.approx(5.0)
    assert d["metrics"]["diversity_coefficient"] == pytest.approx(0.2 * math.sqrt(50), rel=1e-5)
    assert d["counts"] == {"clips": len(recs), "samples_per_clip": [2]}
    assert _evaluate("--export", export, "--dataset", path, "--split", SPLIT, "--flame-model", flame_path,
                     "--out", out) == 0
    got = json.loads(out.read_text())["diversity"]["metrics"]["diversity_vertex_mm"]
    flame = _flame(flame_path)
    f = jax.jit(motion_to_vertices)
    want = np.mean([np.mean(np.linalg.norm(np.asarray(f(flame, np.concatenate([e + 0.2, j], -1).astype(np.float32)))
                                           - np.asarray(f(flame, np.concatenate([e, j], -1).astype(np.float32))),
                                           axis=-1)) * 1000 for e, j in recs.values()])
    assert got == pytest.approx(want, rel=1e-4)
