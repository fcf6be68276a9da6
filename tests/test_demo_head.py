"""The procedural stand-in head (avi_jax/data/demo_head.py): FLAME file layout read by the real loader,
determinism and reuse, a mouth that the jaw opens, and expression blendshapes that move the face the way
the demo corpus' coefficients are described (through the real flame_forward / linear blend skinning)."""
from __future__ import annotations

import os
import pickle

import jax
import numpy as np
import pytest
import scipy.sparse as sp

from avi_jax.checkpoints.flame import load_flame_masks, load_flame_model
from avi_jax.data import demo, demo_head as DH
from avi_jax.data import instructions as instr
from avi_jax.errors import ConfigError, InputError
from avi_jax.models.flame import flame_forward

MM = 1e-3


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo_head")
    path = DH.write_demo_head(folder, seed=0)
    return path, path.with_name(DH.MASKS_FILE)


@pytest.fixture(scope="module")
def model(head):
    return load_flame_model(*head)


@pytest.fixture(scope="module")
def template(model):
    return np.asarray(flame_forward(model, None, None).vertices, np.float64)


def forward(model, expression=None, pose=None, shape=None):
    return np.asarray(flame_forward(model, shape, expression, pose).vertices, np.float64)


@pytest.fixture(scope="module")
def front_skin(model, template):
    """(V,) bool: skin on the front half (not eyeballs, not the mouth's inside)."""
    out = template[:, 2] > 0.04
    for region in ("left_eyeball", "right_eyeball", "mouth_interior"):
        out[np.asarray(model.mask(region))] = False
    return out


def near(template, front_skin, x, y, radius=0.006):
    """Front skin vertices within ``radius`` of (x, y) in the image plane (template positions)."""
    d2 = (template[:, 0] - x) ** 2 + (template[:, 1] - y) ** 2
    idx = np.nonzero((d2 < radius ** 2) & front_skin)[0]
    assert idx.size, (x, y)
    return idx


# ------------------------------------------------------------------------------------------
# Files.
# ------------------------------------------------------------------------------------------

def test_files_have_the_flame_layout(head, model):
    path, masks_path = head
    assert path.name == "generic_model.pkl" and path.parent.name == f"demo_head_v{DH.VERSION}_seed0"
    blob = path.read_bytes()
    assert blob[:2] == b"\x80\x02"  # pickle protocol 2
    raw = pickle.loads(blob)  # our own file: a plain dict of numpy arrays + a scipy CSC matrix
    v = raw["v_template"].shape[0]
    assert set(raw) == {"v_template", "f", "shapedirs", "posedirs", "J_regressor", "J", "kintree_table",
                        "weights", "bs_style", "bs_type"}
    assert raw["shapedirs"].shape == (v, 3, 400) and raw["posedirs"].shape == (v, 3, 36)
    assert sp.issparse(raw["J_regressor"]) and raw["J_regressor"].shape == (5, v)
    assert raw["weights"].shape == (v, 5) and raw["f"].shape[1] == 3
    assert raw["kintree_table"].tolist() == [[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]]
    assert (raw["bs_style"], raw["bs_type"]) == ("lbs", "lrotmin")
    np.testing.assert_allclose(raw["J"], raw["J_regressor"] @ raw["v_template"], atol=1e-6)
    # the expression components the demo corpus never uses are zero; posedirs are zero (documented).
    assert not raw["shapedirs"][:, :, 350:].any() and not raw["posedirs"].any()
    assert np.abs(raw["shapedirs"][:, :, 300:330]).max() > 1e-3

    # the real (restricted) loader reads it, also given the folder, with all components.
    assert model.num_vertices == v and model.parents == (-1, 0, 1, 1, 1)
    full = load_flame_model(path.parent, masks_path, n_shape=300, n_exp=100)
    assert full.shapedirs.shape == (v, 3, 300) and full.exprdirs.shape == (v, 3, 100)
    weights = np.asarray(model.lbs_weights)
    assert weights.min() >= 0 and np.allclose(weights.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model.j_regressor).sum(1), 1.0, atol=1e-6)

    masks = load_flame_masks(masks_path, v)
    assert set(DH.REGIONS) <= set(masks) and {"lips", "forehead", "eye_region", "face"} <= set(masks)
    assert all(len(masks[r]) for r in DH.REGIONS)
    corners = np.asarray(masks["lip_corners"])
    assert corners.shape == (2,) and np.asarray(model.v_template)[corners[0], 0] > 0  # left = +x
    assert set(np.asarray(masks["lip_centres"]).tolist()) <= set(np.asarray(masks["lips"]).tolist())


def test_geometry_is_a_closed_head(model, template):
    trimesh = pytest.importorskip("trimesh")
    mesh = trimesh.Trimesh(template, np.asarray(model.faces), process=False)
    parts = sorted(mesh.split(only_watertight=False), key=lambda m: -len(m.vertices))
    assert len(parts) == 3  # skin (with the mouth pocket) and two eyeballs
    for part in parts:
        assert part.is_watertight and part.is_winding_consistent and part.volume > 0  # outward faces
    face = template[np.asarray(model.mask("face"))]
    crown, chin = template[:, 1].max(), face[:, 1].min()
    assert 0.17 < crown - chin < 0.23  # ~0.2 m from chin to crown
    lo, hi = template.min(0), template.max(0)
    assert np.all(np.abs((lo + hi) / 2) < 0.03) and 0.14 < hi[0] - lo[0] < 0.19
    nose_tip = template[np.asarray(model.mask("nose"))][:, 2].max()
    assert nose_tip == pytest.approx(template[:, 2].max())  # +z is the front: the nose leads
    # mirror symmetric: every vertex has a mirror image.
    mirrored = template * np.array([-1.0, 1.0, 1.0])
    tree = __import__("scipy.spatial", fromlist=["cKDTree"]).cKDTree(template)
    assert tree.query(mirrored)[0].max() < 1e-6


def test_deterministic_idempotent_and_atomic(tmp_path, head):
    path0, masks0 = head
    again = DH.write_demo_head(tmp_path / "a", seed=0)
    assert again.read_bytes() == path0.read_bytes()
    assert again.with_name(DH.MASKS_FILE).read_bytes() == masks0.read_bytes()
    # a second call reuses the files (same inode, untouched)
    stat = again.stat()
    assert DH.write_demo_head(tmp_path / "a", seed=0) == again
    assert again.stat().st_mtime_ns == stat.st_mtime_ns and again.stat().st_ino == stat.st_ino
    paths = DH.demo_head_paths(tmp_path / "a", seed=0)
    assert paths.model == again and paths.masks == again.with_name(DH.MASKS_FILE)
    # a damaged file is detected (SHA-256 in demo_head.json) and rewritten
    again.write_bytes(b"truncated")
    assert DH.write_demo_head(tmp_path / "a", seed=0).read_bytes() == path0.read_bytes()
    assert sorted(os.listdir(again.parent)) == sorted([DH.MODEL_FILE, DH.MASKS_FILE, DH.INFO_FILE])
    # another seed: a different expression basis, the same geometry, identity and masks
    m0, k0 = DH.build_demo_head(0)
    m1, k1 = DH.build_demo_head(1)
    for key in ("v_template", "f", "weights", "posedirs", "kintree_table"):
        np.testing.assert_array_equal(m0[key], m1[key])
    np.testing.assert_array_equal(m0["shapedirs"][:, :, :300], m1["shapedirs"][:, :, :300])
    assert not np.array_equal(m0["shapedirs"][:, :, 300:], m1["shapedirs"][:, :, 300:])
    assert all(np.array_equal(k0[r], k1[r]) for r in DH.REGIONS)
    assert DH.demo_head_dir(tmp_path, 1).name.endswith("seed1")
    for bad in (-1, 1.5, "0", True):
        with pytest.raises(ConfigError, match="seed"):
            DH.write_demo_head(tmp_path, seed=bad)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match="cannot write the demo head"):
        DH.write_demo_head(blocker, seed=0)


# ------------------------------------------------------------------------------------------
# Jaw, eyes and identity through flame_forward.
# ------------------------------------------------------------------------------------------

def test_jaw_rotation_opens_the_mouth(model, template, front_skin):
    up, low = np.asarray(model.mask("lip_centres"))
    np.testing.assert_array_equal(template[up], template[low])  # a closed mouth at rest
    opened = forward(model, pose={"jaw_pose": np.array([0.3, 0.0, 0.0], np.float32)})
    gap = opened[up, 1] - opened[low, 1]
    assert gap > 20 * MM  # the lips part by centimetres
    assert opened[low, 1] - template[low, 1] < -20 * MM  # the lower lip goes down
    lower_lip = np.asarray(model.mask("lower_lip"))
    assert np.all(opened[lower_lip, 1] <= template[lower_lip, 1] + 1e-6)
    chin = near(template, front_skin, 0.0, template[low, 1] - 0.03)
    assert np.all(opened[chin, 1] - template[chin, 1] < -15 * MM)
    for still in ("forehead", "eye_region", "nose", "upper_lip", "left_eyeball", "scalp"):
        idx = np.asarray(model.mask(still))
        if still == "upper_lip":  # towards the corners the upper lip follows the jaw a little
            idx = idx[np.abs(template[idx, 0]) < 0.012]
        assert np.abs(opened[idx] - template[idx]).max() < 1e-6, still
    corners = np.asarray(model.mask("lip_corners"))
    assert np.all(opened[corners, 1] - template[corners, 1] < -5 * MM)  # corners: halfway
    # half-open: monotone
    half = forward(model, pose={"jaw_pose": np.array([0.15, 0.0, 0.0], np.float32)})
    assert 0 < half[up, 1] - half[low, 1] < gap


def test_eyes_and_neck_rotate_their_parts(model, template):
    left = np.asarray(model.mask("left_eyeball"))
    right = np.asarray(model.mask("right_eyeball"))
    eyes = forward(model, pose={"eye_pose": np.array([0.0, 0.4, 0.0, 0.0, 0.0, 0.0], np.float32)})
    moved = np.abs(eyes - template).max(axis=1) > 1e-6
    assert set(np.nonzero(moved)[0]) <= set(left.tolist()) and moved[left].any()
    centre = np.asarray(flame_forward(model, None, None).joints)[3]  # the left eye joint
    np.testing.assert_allclose(np.linalg.norm(eyes[left] - centre, axis=1),
                               np.linalg.norm(template[left] - centre, axis=1), atol=1e-6)  # rotates
    assert not moved[right].any()
    neck = forward(model, pose={"neck_pose": np.array([0.0, 0.5, 0.0], np.float32)})
    face = np.asarray(model.mask("face"))
    base = np.asarray(model.mask("boundary"))
    assert np.abs(neck[face] - template[face]).max() > 10 * MM
    assert np.abs(neck[base] - template[base]).max() < 1e-6  # the neck's base stays with the root


def test_identity_components_change_the_head(model, template):
    width = forward(model, shape=np.eye(1, 100, 0, dtype=np.float32)[0])
    assert (width[:, 0].max() - width[:, 0].min()) - (template[:, 0].max() - template[:, 0].min()) > 5 * MM
    speaker = demo.make_speaker(0, 3)
    v = forward(model, shape=speaker.shape)
    assert np.abs(v - template).max() > 2 * MM
    up, low = np.asarray(model.mask("lip_centres"))
    np.testing.assert_allclose(v[up], v[low], atol=1e-7)  # the mouth stays closed for every identity
    joints = np.asarray(flame_forward(model, speaker.shape, None).joints)
    np.testing.assert_allclose(joints[:3, 0], 0.0, atol=1e-6)  # root, neck, jaw on the midline


# ------------------------------------------------------------------------------------------
# Expression: the demo corpus' coefficients move the face as their instructions say.
# ------------------------------------------------------------------------------------------

def _region_checks(t, skin, corner_l, corner_r, up, low):
    """action -> check(displacement (V, 3)) -> bool."""
    mouth_y = t[up, 1]
    sym = lambda x, y: (near(t, skin, x, y), near(t, skin, -x, y))  # noqa: E731
    brow_in, brow_out, brow = sym(0.015, 0.036), sym(0.047, 0.034), sym(0.030, 0.037)
    lid_up, lid_low = sym(0.033, 0.031), sym(0.033, 0.010)
    cheek, nose = sym(0.040, -0.008), sym(0.010, 0.004)
    chin = near(t, skin, 0.0, mouth_y - 0.030)
    corners = np.array([corner_l, corner_r])
    side = np.sign(t[corners, 0])

    def dy(d, regions):
        return min(d[r, 1].mean() for r in regions)

    def dy_max(d, regions):
        return max(d[r, 1].mean() for r in regions)

    return {
        "inner_brow_raiser": lambda d: dy(d, brow_in) > 3 * MM,
        "outer_brow_raiser": lambda d: dy(d, brow_out) > 3 * MM,
        "brow_lowerer": lambda d: dy_max(d, brow) < -2.5 * MM
        and all(np.mean(d[r, 0] * np.sign(t[r, 0])) < -1 * MM for r in brow),  # drawn together
        "upper_lid_raiser": lambda d: dy(d, lid_up) > 1.5 * MM,
        "cheek_raiser": lambda d: dy(d, cheek) > 2.5 * MM,
        "lid_tightener": lambda d: dy(d, lid_low) > 1 * MM,
        "nose_wrinkler": lambda d: dy(d, nose) > 1.5 * MM,
        "upper_lip_raiser": lambda d: d[up, 1] > 2 * MM and abs(d[low, 1]) < 1 * MM,
        "lip_corner_puller": lambda d: np.all(d[corners, 1] > 4 * MM)
        and np.all(d[corners, 0] * side > 2 * MM),
        "dimpler": lambda d: d[corner_l, 2] < -2 * MM and d[corner_l, 2] < 2 * d[corner_r, 2],
        "lip_corner_depressor": lambda d: np.all(d[corners, 1] < -3.5 * MM),
        "chin_raiser": lambda d: d[chin, 1].mean() > 2 * MM,
        "lip_stretcher": lambda d: np.all(d[corners, 0] * side > 3.5 * MM),
        "lip_tightener": lambda d: np.all(d[corners, 0] * side < -1.5 * MM),
        "lip_pressor": lambda d: d[near(t, skin, 0.0, mouth_y + 0.004, 0.002), 1].mean() < -0.5 * MM
        and d[near(t, skin, 0.0, mouth_y - 0.004, 0.002), 1].mean() > 0.5 * MM,
        "jaw_drop": lambda d: d[low, 1] < -3 * MM and abs(d[up, 1]) < 0.5 * MM
        and d[chin, 1].mean() < -3 * MM,
        "lid_droop": lambda d: dy_max(d, lid_up) < -1.5 * MM,
    }


def test_every_action_moves_its_region(model, template, front_skin):
    t = template
    corner_l, corner_r = np.asarray(model.mask("lip_corners")).tolist()
    up, low = np.asarray(model.mask("lip_centres")).tolist()
    checks = _region_checks(t, front_skin, corner_l, corner_r, up, low)
    assert set(checks) == set(instr.ACTION_NAMES)
    basis = demo.action_basis(0)
    moved = jax.jit(lambda e: flame_forward(model, None, e).vertices)(basis)  # (17, V, 3)
    disp = np.asarray(moved, np.float64) - t
    fields = DH.action_displacements()
    back = t[:, 2] < -0.02
    eyeballs = np.concatenate([np.asarray(model.mask("left_eyeball")), np.asarray(model.mask("right_eyeball"))])
    for a, name in enumerate(instr.ACTION_NAMES):
        d = disp[a]
        assert checks[name](d), name
        # exactly the designed field (E @ action_basis[a] = D_a), local, eyeballs rigid
        np.testing.assert_allclose(d, fields[name], atol=2e-6, err_msg=name)
        assert np.abs(d[back]).max() < 1e-4 and np.abs(d[eyeballs]).max() < 1e-6, name
        assert 1 * MM < np.abs(d).max() < 12 * MM, name


def test_speech_direction_parts_the_lips(model, template):
    up, low = np.asarray(model.mask("lip_centres"))
    d = forward(model, demo.mouth_direction(0)) - template
    assert d[up, 1] - d[low, 1] > 2 * MM
    np.testing.assert_allclose(d, DH.action_displacements()["mouth_opening"], atol=2e-6)


def test_happy_clip_has_higher_lip_corners_than_sad(model):
    fwd = jax.jit(lambda s, e, j: flame_forward(model, s, e, {"jaw_pose": j}).vertices)
    heights = {}
    for emotion in ("happy", "sad", "neutral"):
        per_speaker = []
        for speaker in (0, 1):
            clip = demo.generate_clip(0, speaker, emotion, 3)
            v = fwd(clip["shape"], clip["expression"], clip["jaw_pose"])  # all frames, with the jaw
            h = DH.lip_corner_height(v, model.masks)
            assert h.shape == (clip["expression"].shape[0],) and h.dtype == np.float32
            per_speaker.append(float(h.mean()))
            # the clip's mean expression (no jaw) says the same
            mean_v = forward(model, clip["expression"].mean(0), shape=clip["shape"])
            per_speaker.append(float(DH.lip_corner_height(mean_v[None], model.masks)[0]))
        heights[emotion] = np.array(per_speaker)
    assert np.all(heights["happy"] - heights["sad"] > 6 * MM), heights
    assert np.all(heights["happy"] > heights["neutral"] + 3 * MM), heights
    assert np.all(heights["sad"] < heights["neutral"] - 3 * MM), heights
    assert np.all(np.abs(heights["neutral"]) < 2.5 * MM), heights


def test_lip_corner_height_api(model, template):
    masks = model.masks
    corners = np.asarray(masks["lip_corners"])
    centres = np.asarray(masks["lip_centres"])
    smile = forward(model, demo.action_basis(0)[instr.ACTION_NAMES.index("lip_corner_puller")])
    stack = np.stack([np.stack([template, smile]), np.stack([smile, template])])  # (2, 2, V, 3)
    h = DH.lip_corner_height(stack, masks)
    assert h.shape == (2, 2)
    assert h[0, 0] == pytest.approx(0.0, abs=1e-7) and h[0, 1] > 4 * MM and h[1, 0] == h[0, 1]
    np.testing.assert_allclose(DH.lip_corner_height(stack, corners, centres), h)
    absolute = DH.lip_corner_height(stack, corners)  # without references: the corners' mean y
    np.testing.assert_allclose(absolute, stack[..., corners, 1].mean(-1), rtol=1e-6)
    for bad in (lambda: DH.lip_corner_height(template[:, :2], masks),
                lambda: DH.lip_corner_height(template, {"lips": corners}),
                lambda: DH.lip_corner_height(template, [len(template)])):
        with pytest.raises(InputError):
            bad()
