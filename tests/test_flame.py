"""FLAME layer: restricted loading of (synthetic) official model files and parity with smplx.

The real FLAME files need a registration at https://flame.is.tue.mpg.de, so the tests write
synthetic files with the exact structure of the official ones: 5023 vertices, 9976 faces, 5 joints,
shapedirs (5023, 3, 400), posedirs (5023, 3, 36), a scipy-sparse J_regressor, the FLAME kinematic tree
with the root parent stored as uint32 -1, skinning weights rows summing to 1; as a Python-3
protocol-2 pickle, as a Python-2-style pickle whose arrays are chumpy objects (a fake ``chumpy.ch.Ch``
made here), and in a FLAME-2023-like layout. Reference: ``smplx.FLAME`` (PyTorch), built offline
from the same synthetic file plus a synthetic landmark embedding.
"""
from __future__ import annotations

import builtins
import os
import pickle
import struct
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp

from avi_jax.checkpoints import flame as flame_ckpt
from avi_jax.errors import CheckpointError, ConfigError, InputError, UnsafePickleError
from avi_jax.models import flame as F

V, NF, J = F.NUM_VERTICES, F.NUM_FACES, F.NUM_JOINTS
ROOT_UINT32 = np.uint32(2**32 - 1)
MASK_NAMES = ("lips", "forehead", "eye_region", "face", "nose", "neck")


# ------------------------------------------------------------------------------------------
# Synthetic model files.
# ------------------------------------------------------------------------------------------

def synthetic_flame(seed: int = 0, V: int = V, NF: int = NF) -> dict:
    """A dict with the keys, shapes and dtypes of FLAME 2020 ``generic_model.pkl`` (random values);
    smaller V/NF give a cheap model of the same layout for tests that do not need the real sizes."""
    rng = np.random.default_rng(seed)
    v_template = rng.normal(0.0, 0.05, (V, 3))  # a ~10 cm blob, metres
    shapedirs = rng.normal(0.0, 1e-3, (V, 3, 400))
    posedirs = rng.normal(0.0, 1e-3, (V, 3, 36))
    jreg = np.zeros((J, V))
    for j in range(J):
        idx = rng.choice(V, 30, replace=False)
        jreg[j, idx] = rng.dirichlet(np.ones(30))
    weights = rng.dirichlet(np.full(J, 0.3), size=V)
    kintree = np.array([[ROOT_UINT32, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.uint32)
    faces = rng.integers(0, V, (NF, 3)).astype(np.uint32)
    return {
        "v_template": v_template, "shapedirs": shapedirs, "posedirs": posedirs,
        "J_regressor": sp.csc_matrix(jreg), "kintree_table": kintree, "weights": weights,
        "f": faces, "J": jreg @ v_template, "bs_style": "lbs", "bs_type": "lrotmin",
    }


def synthetic_masks(seed: int = 1, V: int = V) -> dict:
    rng = np.random.default_rng(seed)
    return {name: np.sort(rng.choice(V, V // 25 + 10 * i, replace=False)).astype(np.int64)
            for i, name in enumerate(MASK_NAMES)}


class _Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote: bytes as BINSTRING (read back as latin1 str)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_bytes_py2(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_bytes_py2


def py2_style_dumps(obj: object) -> bytes:
    """Protocol 2 with Python-2 module names (``numpy.core``, ``scipy.sparse.csc``, ``__builtin__``)."""
    import io
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2, fix_imports=True).dump(obj)
    data = buf.getvalue()
    # GLOBAL opcodes are text "c<module>\n<name>\n": rename modules to the numpy-1 / old scipy paths.
    for new, old in ((b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"),
                     (b"cscipy.sparse._csc\n", b"cscipy.sparse.csc\n")):
        data = data.replace(new, old)
    assert b"numpy._core" not in data and b"_codecs" not in data
    return data


@pytest.fixture()
def fake_chumpy(monkeypatch):
    """Modules ``chumpy``, ``chumpy.ch`` (class Ch) and ``chumpy.reordering`` (Reshape) that pickle
    like chumpy: no ``__reduce__``, ``__getstate__`` returns the instance dict (array under 'x')."""

    class Ch:
        def __init__(self, x=None, **terms):
            if x is not None:
                self.x = np.asarray(x, np.float64)
            self.__dict__.update(terms)
            self._dirty_vars = {"x"}
            self._itr = None
            self._depends_on_deps = {}
            self._make_dense = False
            self._make_sparse = False
            self._parents = "weakref dict, dropped on pickling"
            self._cache = {"r": None}

        def __getstate__(self):
            state = dict(self.__dict__)
            del state["_parents"], state["_cache"]
            return state

        def __setstate__(self, state):  # pragma: no cover - only pickled here
            self.__dict__.update(state)

    class Reshape(Ch):
        pass

    ch_mod = types.ModuleType("chumpy.ch")
    reo_mod = types.ModuleType("chumpy.reordering")
    pkg = types.ModuleType("chumpy")
    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    Reshape.__module__, Reshape.__qualname__ = "chumpy.reordering", "Reshape"
    ch_mod.Ch, reo_mod.Reshape = Ch, Reshape
    pkg.ch, pkg.reordering = ch_mod, reo_mod
    monkeypatch.setitem(sys.modules, "chumpy", pkg)
    monkeypatch.setitem(sys.modules, "chumpy.ch", ch_mod)
    monkeypatch.setitem(sys.modules, "chumpy.reordering", reo_mod)
    return types.SimpleNamespace(Ch=Ch, Reshape=Reshape)


@pytest.fixture(scope="module")
def flame_files(tmp_path_factory):
    """generic_model.pkl + FLAME_masks.pkl (protocol 2), and an smplx folder beside them."""
    root = tmp_path_factory.mktemp("flame")
    data = synthetic_flame()
    with open(root / "generic_model.pkl", "wb") as f:
        pickle.dump(data, f, protocol=2)
    with open(root / "FLAME_masks.pkl", "wb") as f:
        pickle.dump(synthetic_masks(), f, protocol=2)
    smplx_dir = root / "smplx"
    smplx_dir.mkdir()
    os.symlink(root / "generic_model.pkl", smplx_dir / "FLAME_NEUTRAL.pkl")
    rng = np.random.default_rng(2)
    with open(smplx_dir / "flame_static_embedding.pkl", "wb") as f:  # synthetic landmark embedding
        pickle.dump({"lmk_face_idx": rng.integers(0, NF, 51).astype(np.int64),
                     "lmk_b_coords": rng.dirichlet(np.ones(3), 51)}, f, protocol=2)
    return types.SimpleNamespace(root=root, data=data, model=root / "generic_model.pkl",
                                 masks=root / "FLAME_masks.pkl", smplx_dir=smplx_dir)


@pytest.fixture(scope="module")
def model(flame_files):
    return flame_ckpt.load_flame_model(flame_files.model, flame_files.masks)


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    """A FLAME-layout file with 300 vertices / 500 faces, for the cheaper tests."""
    root = tmp_path_factory.mktemp("flame_small")
    data = synthetic_flame(seed=4, V=300, NF=500)
    with open(root / "generic_model.pkl", "wb") as f:
        pickle.dump(data, f, protocol=2)
    with open(root / "FLAME_masks.pkl", "wb") as f:
        pickle.dump(synthetic_masks(V=300), f, protocol=2)
    return types.SimpleNamespace(root=root, data=data, model=root / "generic_model.pkl",
                                 masks=root / "FLAME_masks.pkl")


@pytest.fixture(scope="module")
def small_model(small_files):
    return flame_ckpt.load_flame_model(small_files.model, small_files.masks)


def random_inputs(seed: int, batch: int, n_shape: int, n_exp: int, pose_scale: float = 0.4):
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 1.0, (batch, n_shape)).astype(np.float32),
            rng.normal(0, 2.0, (batch, n_exp)).astype(np.float32),
            rng.normal(0, pose_scale, (batch, 15)).astype(np.float32))


# ------------------------------------------------------------------------------------------
# Loading.
# ------------------------------------------------------------------------------------------

def test_load_structure(model, flame_files):
    d = flame_files.data
    assert model.v_template.shape == (V, 3) and model.v_template.dtype == jnp.float32
    assert model.shapedirs.shape == (V, 3, 100) and model.exprdirs.shape == (V, 3, 50)
    assert model.posedirs.shape == (V, 3, 36) and model.j_regressor.shape == (J, V)
    assert model.lbs_weights.shape == (V, J) and model.faces.shape == (NF, 3)
    assert model.faces.dtype == jnp.int32 and model.parents == (-1, 0, 1, 1, 1)
    np.testing.assert_allclose(model.exprdirs, d["shapedirs"][:, :, 300:350].astype(np.float32))
    np.testing.assert_allclose(model.j_regressor, d["J_regressor"].toarray().astype(np.float32))
    assert set(model.masks) == set(MASK_NAMES)
    np.testing.assert_array_equal(model.masks["lips"], synthetic_masks()["lips"])
    lips = F.flame_forward(model, None, None).vertices[model.mask("lips")]
    assert lips.shape == (len(synthetic_masks()["lips"]), 3)
    with pytest.raises(ConfigError, match="not loaded"):
        model.mask("tongue")


def test_chumpy_py2_pickle_loads_like_numpy(tmp_path, fake_chumpy, model, flame_files):
    d = dict(flame_files.data)
    d["shapedirs"] = fake_chumpy.Ch(d["shapedirs"])
    d["posedirs"] = fake_chumpy.Ch(d["posedirs"])
    d["v_template"] = fake_chumpy.Reshape(a=fake_chumpy.Ch(d["v_template"].ravel()), newshape=(V, 3))
    blob = py2_style_dumps(d)
    for ref in (b"cchumpy.ch\nCh\n", b"cchumpy.reordering\nReshape\n", b"cnumpy.core.multiarray\n",
                b"cscipy.sparse.csc\ncsc_matrix\n", b"c__builtin__\nset\n"):
        assert ref in blob, ref  # the pickle really references chumpy / Python-2 module paths
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(blob)
    masks_path = tmp_path / "FLAME_masks.pkl"
    masks_path.write_bytes(py2_style_dumps(synthetic_masks()))
    loaded = flame_ckpt.load_flame_model(tmp_path, masks_path)  # a folder works too
    jax.tree.map(np.testing.assert_array_equal, loaded, model)  # same tree (parents too) and values
    assert loaded.parents == model.parents


@pytest.mark.parametrize("protocol", [0, 1])
def test_chumpy_old_protocols_load(tmp_path, fake_chumpy, small_files, small_model, protocol):
    """Protocols 0/1 rebuild chumpy objects through copy_reg._reconstructor (admitted for stand-ins)."""
    d = dict(small_files.data)
    d["shapedirs"] = fake_chumpy.Ch(d["shapedirs"])
    blob = pickle.dumps(d, protocol=protocol)
    assert b"copy_reg" in blob and b"_reconstructor" in blob
    (tmp_path / "m.pkl").write_bytes(blob)
    loaded = flame_ckpt.load_flame_model(tmp_path / "m.pkl", small_files.masks)
    jax.tree.map(np.testing.assert_array_equal, loaded, small_model)  # same tree (parents too) and values


def test_flame2023_layout_loads(tmp_path, model, flame_files):
    """FLAME 2023 (flame2023.pkl): plain float32 numpy (no chumpy), kintree int64 root 2**32-1,
    a CSR J_regressor, extra entries and no bs_style/bs_type; the forward pass is unchanged."""
    d = {k: v for k, v in flame_files.data.items() if k not in ("bs_style", "bs_type")}
    for k in ("v_template", "shapedirs", "posedirs", "weights"):
        d[k] = d[k].astype(np.float32)
    d["kintree_table"] = flame_files.data["kintree_table"].astype(np.int64)
    d["J_regressor"] = sp.csr_matrix(flame_files.data["J_regressor"])
    d["lmk_faces_idx"] = np.arange(68, dtype=np.int64)
    d["version"] = "FLAME 2023"
    with open(tmp_path / "flame2023.pkl", "wb") as f:
        pickle.dump(d, f, protocol=pickle.HIGHEST_PROTOCOL)
    m23 = flame_ckpt.load_flame_model(tmp_path / "flame2023.pkl", n_shape=100, n_exp=50)
    shape, exp, pose = random_inputs(3, 2, 100, 50)
    np.testing.assert_allclose(F.flame_forward(m23, shape, exp, pose).vertices,
                               F.flame_forward(model, shape, exp, pose).vertices, atol=1e-6)


def test_missing_file_config_error(tmp_path, flame_files):
    for call in (lambda: flame_ckpt.load_flame_model(tmp_path / "nope.pkl"),
                 lambda: flame_ckpt.load_flame_model(tmp_path),  # folder without a model file
                 lambda: flame_ckpt.load_flame_model(flame_files.model, tmp_path / "FLAME_masks.pkl")):
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert "https://flame.is.tue.mpg.de" in msg and "registration" in msg
        assert "config.flame." in msg and "--flame-" in msg
    with pytest.raises(ConfigError, match="config.flame.model_path.*--flame-model"):
        flame_ckpt.load_flame_model(tmp_path / "nope.pkl")


def test_bad_entries_raise_checkpoint_error(tmp_path, small_files):
    cases = {
        "missing": lambda d: d.pop("posedirs"),
        "shape": lambda d: d.__setitem__("posedirs", d["posedirs"][:, :, :30]),
        "nan": lambda d: d["v_template"].__setitem__((0, 0), np.nan),
        "tree": lambda d: d.__setitem__("kintree_table",
                                        np.array([[ROOT_UINT32, 2, 0, 1, 1], [0, 1, 2, 3, 4]])),
        "bs": lambda d: d.__setitem__("bs_type", "lrotmin_quat"),
    }
    for name, corrupt in cases.items():
        d = {k: (v.copy() if hasattr(v, "copy") else v) for k, v in small_files.data.items()}
        corrupt(d)
        path = tmp_path / f"{name}.pkl"
        with open(path, "wb") as f:
            pickle.dump(d, f, protocol=2)
        with pytest.raises(CheckpointError, match=str(path)):
            flame_ckpt.load_flame_model(path)
    with pytest.raises(ConfigError, match="n_shape=301"):
        flame_ckpt.load_flame_model(small_files.model, n_shape=301)
    (tmp_path / "garbage.pkl").write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(UnsafePickleError, match="garbage.pkl"):
        flame_ckpt.load_flame_model(tmp_path / "garbage.pkl")


class _Evil:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("attack", ["os.system", "builtins.exec", "subprocess.call", "nested_chumpy",
                                    "masks"])
@pytest.mark.parametrize("protocol", [0, 2])
def test_malicious_pickle_is_refused(tmp_path, fake_chumpy, flame_files, attack, protocol):
    marker = tmp_path / "pwned"
    nested = fake_chumpy.Ch()
    nested.x = _Evil(os.system, (f"touch {marker}",))
    payload = {
        "os.system": _Evil(os.system, (f"touch {marker}",)),
        "builtins.exec": _Evil(builtins.exec, (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess.call": _Evil(subprocess.call, (["touch", str(marker)],)),
        "nested_chumpy": nested,
        "masks": _Evil(os.system, (f"touch {marker}",)),
    }[attack]
    evil = tmp_path / "evil.pkl"
    if attack == "masks":
        with open(evil, "wb") as f:
            pickle.dump({"lips": payload}, f, protocol=protocol)
        call = lambda: flame_ckpt.load_flame_model(flame_files.model, evil)  # noqa: E731
    else:
        d = {"v_template": payload, "f": flame_files.data["f"][:3]}
        with open(evil, "wb") as f:
            pickle.dump(d, f, protocol=protocol)
        call = lambda: flame_ckpt.load_flame_model(evil)  # noqa: E731
    # sanity: an ordinary unpickler would run the payload (kept off: it is exactly what we refuse)
    assert b"system" in evil.read_bytes() or b"exec" in evil.read_bytes() or b"call" in evil.read_bytes()
    with pytest.raises(UnsafePickleError, match="evil.pkl") as e:
        call()
    assert "refusing" in str(e.value)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------
# Forward pass.
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_shape,n_exp", [(100, 50), (300, 100)])
def test_parity_with_smplx(flame_files, n_shape, n_exp):
    torch = pytest.importorskip("torch")
    smplx = pytest.importorskip("smplx")
    batch = 4
    ref_model = smplx.FLAME(model_path=str(flame_files.smplx_dir), num_betas=n_shape,
                            num_expression_coeffs=n_exp, batch_size=batch, use_face_contour=False)
    ours = flame_ckpt.load_flame_model(flame_files.model, n_shape=n_shape, n_exp=n_exp)
    for seed, pose_scale in ((0, 0.4), (1, 1.5), (2, 0.0)):
        shape, exp, pose = random_inputs(seed, batch, n_shape, n_exp, pose_scale)
        t = {k: torch.from_numpy(v) for k, v in
             dict(global_orient=pose[:, :3], neck_pose=pose[:, 3:6], jaw_pose=pose[:, 6:9],
                  leye_pose=pose[:, 9:12], reye_pose=pose[:, 12:]).items()}
        with torch.no_grad():
            ref = ref_model(betas=torch.from_numpy(shape), expression=torch.from_numpy(exp), **t)
        out = jax.jit(F.flame_forward)(ours, shape, exp, pose)
        assert out.vertices.shape == (batch, V, 3) and out.vertices.dtype == jnp.float32
        np.testing.assert_allclose(out.vertices, ref.vertices.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(out.joints, ref.joints[:, :J].numpy(), atol=1e-5, rtol=0)
        # the pose really moves the mesh (so the comparison covers skinning and correctives)
        if pose_scale:
            rest = F.flame_forward(ours, shape, exp, None).vertices
            assert float(jnp.abs(out.vertices - rest).max()) > 1e-2


def test_pose_formats_and_broadcasting(small_model):
    model = small_model
    V = model.num_vertices
    shape, exp, pose = random_inputs(5, 3, 100, 50)
    ref = F.flame_forward(model, shape, exp, pose)
    as_dict = F.flame_forward(model, shape, exp, {"global_pose": pose[:, :3], "neck_pose": pose[:, 3:6],
                                                  "jaw_pose": pose[:, 6:9], "eye_pose": pose[:, 9:]})
    np.testing.assert_array_equal(ref.vertices, as_dict.vertices)
    # EMOCA (B, 6) = global + jaw, neck/eyes at rest; partial dicts default to zero
    emoca = np.concatenate([pose[:, :3], pose[:, 6:9]], axis=-1)
    full = np.concatenate([pose[:, :3], 0 * pose[:, :3], pose[:, 6:9], 0 * pose[:, 9:]], axis=-1)
    np.testing.assert_allclose(F.flame_forward(model, shape, exp, emoca).vertices,
                               F.flame_forward(model, shape, exp, full).vertices, atol=1e-7)
    np.testing.assert_allclose(F.flame_forward(model, shape, exp, {"jaw_pose": pose[:, 6:9]}).vertices,
                               F.motion_to_vertices(model, np.concatenate([exp, pose[:, 6:9]], -1),
                                                    shape), atol=1e-7)
    # (B, T) leading dims; one identity (n,) broadcast over frames; fewer shape components = zero-padded
    seq = F.flame_forward(model, shape[0, :40], exp[None].repeat(2, 0), pose[None].repeat(2, 0),
                          translation=np.array([0.0, 0.0, 1.0], np.float32))
    padded = np.pad(shape[0, :40], (0, 60))
    one = F.flame_forward(model, padded[None], exp, pose)
    assert seq.vertices.shape == (2, 3, V, 3) and seq.joints.shape == (2, 3, J, 3)
    np.testing.assert_allclose(seq.vertices[1], one.vertices + np.array([0, 0, 1.0]), atol=1e-6)
    for bad in (lambda: F.flame_forward(model, shape, exp, pose[:, :9]),
                lambda: F.flame_forward(model, np.zeros((3, 101)), exp, pose),
                lambda: F.flame_forward(model, shape, exp, {"head_pose": pose[:, :3]}),
                lambda: F.motion_to_vertices(model, np.zeros((3, 50)))):
        with pytest.raises(InputError):
            bad()


def test_rodrigues():
    rng = np.random.default_rng(0)
    r = rng.normal(0, 1.0, (64, 3)).astype(np.float32)
    rot = np.asarray(F.batch_rodrigues(r))
    np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape),
                               atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-5)
    np.testing.assert_allclose(rot @ r[:, :, None], r[:, :, None], atol=1e-5)  # axis is fixed
    np.testing.assert_allclose(F.batch_rodrigues(np.zeros((2, 3), np.float32)), np.eye(3)[None].repeat(2, 0))


def test_jit_and_gradients_finite(small_model):
    model = small_model
    shape, exp, pose = random_inputs(7, 2, 100, 50)
    proj = jnp.asarray(np.random.default_rng(8).normal(size=(model.num_vertices, 3)), jnp.float32)

    def loss(shape, exp, pose, m):
        return jnp.sum(F.flame_forward(m, shape, exp, pose).vertices * proj)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    for p in (pose, np.zeros_like(pose)):  # zero rotation is the singular point of Rodrigues
        gs, ge, gp = grad(shape, exp, p, model)
        for g in (gs, ge, gp):
            assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
    # the pose gradient at zero matches finite differences
    eps = 1e-2
    e = np.zeros_like(pose)
    e[0, 7] = eps  # jaw, y axis
    fd = (loss(shape, exp, e, model) - loss(shape, exp, -e, model)) / (2 * eps)
    _, _, gp0 = grad(shape, exp, np.zeros_like(pose), model)
    np.testing.assert_allclose(float(gp0[0, 7]), float(fd), rtol=2e-2)
