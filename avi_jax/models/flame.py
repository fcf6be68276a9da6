"""FLAME: the head model that turns coefficients into a 3D mesh (linear blend skinning).

FLAME (Li, Bolkart, Black, Li, Romero; "Learning a model of facial shape and expression from 4D
scans", SIGGRAPH Asia 2017, Sec. 3) maps identity shape ``beta``, expression ``psi`` and the
axis-angle rotations of its 5 joints (global/root, neck, jaw, left eye, right eye) to the 5023
vertices of a head mesh (9976 triangles), in metres:

1. ``v_shaped = v_template + S beta + E psi``                 (shape and expression blendshapes)
2. ``J = J_regressor v_shaped``                                 (joint locations, 5 x 3)
3. ``R_k = rodrigues(theta_k)``                                 (axis-angle -> rotation matrix)
4. ``v_posed = v_shaped + P vec(R_1..4 - I)``                   (pose correctives, 36 features)
5. ``v = sum_k w_k G_k(theta, J) [v_posed; 1]``                 (kinematic chain + linear blend skinning)

The same computation as the ``smplx`` package's ``FLAME`` layer (``smplx.lbs.lbs``), written in JAX:
batched over frames, ``jax.jit``-able and differentiable everywhere (also at zero rotation). The API
is functions over a ``FlameModel`` pytree rather than a Flax module, because FLAME has no trainable
parameters: ``flame_forward`` is a pure function of (model, coefficients) that can be closed over or
passed through ``jax.jit``.

This module reads no files. The official model files (``generic_model.pkl`` of FLAME 2020,
``flame2023.pkl`` of FLAME 2023, ``FLAME_masks.pkl``; obtained from https://flame.is.tue.mpg.de) are
read into a ``FlameModel`` by ``avi_jax.checkpoints.flame.load_flame_model`` /
``load_flame_masks`` (restricted unpickling); ``avi_jax.data.demo_head`` writes a procedural
stand-in head in the same file layout for machines without FLAME.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from avi_jax.errors import ConfigError, InputError

__all__ = [
    "FLAME_URL", "NUM_VERTICES", "NUM_FACES", "NUM_JOINTS", "SHAPE_SPACE_DIM", "EXPRESSION_SPACE_DIM",
    "NUM_POSE_FEATURES", "POSE_KEYS", "FlameModel", "FlameOutput", "flame_forward",
    "motion_to_vertices", "batch_rodrigues",
]

FLAME_URL = "https://flame.is.tue.mpg.de"
NUM_VERTICES = 5023
NUM_FACES = 9976
NUM_JOINTS = 5  # root (global), neck, jaw, left eye, right eye
SHAPE_SPACE_DIM = 300  # shapedirs[..., :300] = identity; shapedirs[..., 300:] = expression
EXPRESSION_SPACE_DIM = 100
NUM_POSE_FEATURES = 9 * (NUM_JOINTS - 1)  # 36 columns of posedirs
# pose dict keys and their widths, in the order of the 15-d full pose vector (smplx FLAME order).
POSE_KEYS: tuple[tuple[str, int], ...] = (
    ("global_pose", 3), ("neck_pose", 3), ("jaw_pose", 3), ("eye_pose", 6))
_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------

@flax.struct.dataclass
class FlameModel:
    """The FLAME model as a pytree of float32/int32 ``jnp`` arrays (pass it through ``jax.jit``).

    Attributes:
      v_template: (V, 3) float32, template vertices in metres (V = 5023 for FLAME).
      shapedirs: (V, 3, n_shape) float32, identity blendshapes (the first ``n_shape`` of 300).
      exprdirs: (V, 3, n_exp) float32, expression blendshapes (the first ``n_exp`` of 100).
      posedirs: (V, 3, 36) float32, pose-corrective blendshapes over vec(R_1..4 - I).
      j_regressor: (J, V) float32 (dense), joints = j_regressor @ vertices (J = 5).
      lbs_weights: (V, J) float32, skinning weights (rows sum to 1).
      faces: (F, 3) int32 vertex indices of the triangles (F = 9976).
      masks: {region name: (n,) int32 vertex indices} from ``FLAME_masks.pkl`` ('lips', 'face',
        'forehead', 'eye_region', 'nose', ...); empty when no masks file was given.
      parents: static tuple of J ints, the kinematic tree (FLAME: (-1, 0, 1, 1, 1)).
    """

    v_template: jax.Array
    shapedirs: jax.Array
    exprdirs: jax.Array
    posedirs: jax.Array
    j_regressor: jax.Array
    lbs_weights: jax.Array
    faces: jax.Array
    masks: dict[str, jax.Array]
    parents: tuple[int, ...] = flax.struct.field(pytree_node=False)

    @property
    def n_shape(self) -> int:
        return int(self.shapedirs.shape[-1])

    @property
    def n_exp(self) -> int:
        return int(self.exprdirs.shape[-1])

    @property
    def num_vertices(self) -> int:
        return int(self.v_template.shape[0])

    def mask(self, name: str) -> jax.Array:
        """(n,) int32 vertex indices of region ``name``; ``ConfigError`` if masks lack it."""
        if name not in self.masks:
            have = sorted(self.masks) or "none (no FLAME_masks.pkl was loaded: set config.flame.masks_path)"
            raise ConfigError(f"FLAME vertex mask {name!r} is not loaded; available: {have}")
        return self.masks[name]


class FlameOutput(NamedTuple):
    """Result of ``flame_forward``: ``vertices`` (..., V, 3) and posed ``joints`` (..., J, 3),
    float32, metres."""

    vertices: jax.Array
    joints: jax.Array


# ---------------------------------------------------------------------------------------------
# Forward pass.
# ---------------------------------------------------------------------------------------------

def batch_rodrigues(rotvec: jax.Array) -> jax.Array:
    """Axis-angle (..., 3) in radians -> rotation matrices (..., 3, 3) (Rodrigues' formula).

    ``R = I + sin(t)/t K + (1 - cos(t))/t^2 K^2`` with K the cross-product matrix of the rotation
    vector and t its norm; a Taylor expansion near t = 0 keeps the value and the gradient finite
    at zero rotation (smplx's ``batch_rodrigues`` instead adds 1e-8 before the norm).
    """
    rotvec = jnp.asarray(rotvec)
    theta2 = jnp.sum(rotvec * rotvec, axis=-1)[..., None, None]
    small = theta2 < 1e-10
    theta2_safe = jnp.where(small, 1.0, theta2)
    theta = jnp.sqrt(theta2_safe)
    a = jnp.where(small, 1.0 - theta2 / 6.0, jnp.sin(theta) / theta)
    half_sin = jnp.sin(0.5 * theta)
    b = jnp.where(small, 0.5 - theta2 / 24.0, 2.0 * half_sin * half_sin / theta2_safe)
    x, y, z = rotvec[..., 0], rotvec[..., 1], rotvec[..., 2]
    zero = jnp.zeros_like(x)
    k = jnp.stack([zero, -z, y, z, zero, -x, -y, x, zero], axis=-1).reshape(rotvec.shape[:-1] + (3, 3))
    eye = jnp.eye(3, dtype=rotvec.dtype)
    return eye + a * k + b * jnp.matmul(k, k, precision=_HIGHEST)


def _full_pose(pose: jax.Array | Mapping[str, jax.Array], dtype: Any) -> jax.Array:
    """pose array (..., 15) / (..., 6) or dict -> (..., 15) in FLAME joint order."""
    if isinstance(pose, Mapping):
        unknown = set(pose) - {k for k, _ in POSE_KEYS}
        if unknown:
            raise InputError(f"flame_forward: unknown pose keys {sorted(unknown)}; expected a subset "
                             f"of {[k for k, _ in POSE_KEYS]}")
        if not pose:
            raise InputError("flame_forward: the pose dict is empty")
        parts = {k: jnp.asarray(v, dtype) for k, v in pose.items()}
        for k, width in POSE_KEYS:
            if k in parts and parts[k].shape[-1:] != (width,):
                raise InputError(f"flame_forward: pose[{k!r}] has shape {parts[k].shape}, expected "
                                 f"(..., {width}) axis-angle in radians")
        lead = jnp.broadcast_shapes(*(v.shape[:-1] for v in parts.values()))
        return jnp.concatenate([jnp.broadcast_to(parts[k], lead + (w,)) if k in parts
                                else jnp.zeros(lead + (w,), dtype) for k, w in POSE_KEYS], axis=-1)
    pose = jnp.asarray(pose, dtype)
    if pose.ndim >= 1 and pose.shape[-1] == 15:
        return pose
    if pose.ndim >= 1 and pose.shape[-1] == 6:  # EMOCA / DECA: global (3) + jaw (3)
        zeros = jnp.zeros(pose.shape[:-1] + (3,), dtype)
        return jnp.concatenate([pose[..., :3], zeros, pose[..., 3:], zeros, zeros], axis=-1)
    raise InputError(f"flame_forward: pose has shape {pose.shape}; expected (..., 15) = global, "
                     f"neck, jaw, left eye, right eye axis-angles, (..., 6) = global + jaw (EMOCA), "
                     f"or a dict with keys {[k for k, _ in POSE_KEYS]}")


def flame_forward(model: FlameModel, shape: jax.Array | None, expression: jax.Array | None,
                  pose: jax.Array | Mapping[str, jax.Array] | None = None, *,
                  translation: jax.Array | None = None) -> FlameOutput:
    """FLAME vertices and joints from coefficients (linear blend skinning; FLAME paper Sec. 3).

    Matches ``smplx.FLAME`` / ``smplx.lbs.lbs`` (vertices to ~1e-6 m in float32). Batched over any
    leading dimensions ``...`` (frames, or batch x frames), which broadcast between the inputs
    (e.g. one identity ``shape`` (1, n) for many frames). ``jax.jit``-able and differentiable.

    Args:
      model: from ``avi_jax.checkpoints.flame.load_flame_model``.
      shape: (..., k) float identity coefficients, k <= model.n_shape (the first k components;
        missing ones are zero); None = mean identity.
      expression: (..., k) float expression coefficients, k <= model.n_exp; None = neutral.
      pose: axis-angle rotations in radians, either (..., 15) = [global, neck, jaw, left eye,
        right eye] x 3 (smplx order), (..., 6) = [global, jaw] (EMOCA/DECA ``pose``), or a dict with
        any of 'global_pose' (..., 3), 'neck_pose' (..., 3), 'jaw_pose' (..., 3), 'eye_pose'
        (..., 6) (left then right), missing parts zero; None = rest pose.
      translation: optional (..., 3) metres added to vertices and joints.

    Returns:
      FlameOutput(vertices (..., V, 3), joints (..., J, 3)), float32, metres.

    Raises:
      InputError: wrong trailing dimensions or unknown pose keys.
    """
    dtype = jnp.float32
    leads: list[tuple[int, ...]] = []

    def coeffs(x: jax.Array | None, width: int, name: str) -> jax.Array:
        if x is None:
            return jnp.zeros((width,), dtype)
        x = jnp.asarray(x, dtype)
        if x.ndim == 0 or x.shape[-1] > width:
            raise InputError(f"flame_forward: {name} has shape {x.shape}; expected (..., k) with "
                             f"k <= {width} (the model was loaded with {width} {name} components)")
        leads.append(x.shape[:-1])
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])

    betas = coeffs(shape, model.n_shape, "shape")
    psi = coeffs(expression, model.n_exp, "expression")
    full_pose = jnp.zeros((15,), dtype) if pose is None else _full_pose(pose, dtype)
    if pose is not None:
        leads.append(full_pose.shape[:-1])
    if translation is not None:
        translation = jnp.asarray(translation, dtype)
        if translation.shape[-1:] != (3,):
            raise InputError(f"flame_forward: translation has shape {translation.shape}, "
                             f"expected (..., 3) metres")
        leads.append(translation.shape[:-1])
    try:
        lead = jnp.broadcast_shapes(*leads) if leads else ()
    except ValueError as e:
        raise InputError(f"flame_forward: leading (batch) dimensions do not broadcast: {leads}") from e
    num_joints = len(model.parents)
    if full_pose.shape[-1] != 3 * num_joints:
        raise InputError(f"flame_forward: pose has {full_pose.shape[-1]} values, the model has "
                         f"{num_joints} joints")

    batch = int(np.prod(lead)) if lead else 1
    betas = jnp.broadcast_to(betas, lead + betas.shape[-1:]).reshape(batch, -1)
    psi = jnp.broadcast_to(psi, lead + psi.shape[-1:]).reshape(batch, -1)
    full_pose = jnp.broadcast_to(full_pose, lead + (3 * num_joints,)).reshape(batch, num_joints, 3)

    # 1. identity + expression blendshapes.
    v_shaped = (model.v_template
                + jnp.einsum("bl,vcl->bvc", betas, model.shapedirs, precision=_HIGHEST)
                + jnp.einsum("bl,vcl->bvc", psi, model.exprdirs, precision=_HIGHEST))
    # 2. joints regressed from the shaped (unposed) mesh.
    joints_rest = jnp.einsum("jv,bvc->bjc", model.j_regressor, v_shaped, precision=_HIGHEST)
    # 3-4. rotations and pose correctives over the non-root joints.
    rot = batch_rodrigues(full_pose)  # (B, J, 3, 3)
    pose_feature = (rot[:, 1:] - jnp.eye(3, dtype=dtype)).reshape(batch, -1)  # (B, 9 (J-1))
    v_posed = v_shaped + jnp.einsum("bp,vcp->bvc", pose_feature, model.posedirs, precision=_HIGHEST)

    # 5. kinematic chain: global rotation/translation of each joint.
    g_rot: list[jax.Array] = []
    g_trans: list[jax.Array] = []
    for j, parent in enumerate(model.parents):
        if parent < 0:
            g_rot.append(rot[:, j])
            g_trans.append(joints_rest[:, j])
        else:
            local_t = joints_rest[:, j] - joints_rest[:, parent]
            g_rot.append(jnp.matmul(g_rot[parent], rot[:, j], precision=_HIGHEST))
            g_trans.append(jnp.einsum("bij,bj->bi", g_rot[parent], local_t, precision=_HIGHEST)
                           + g_trans[parent])
    g_rot_all = jnp.stack(g_rot, axis=1)  # (B, J, 3, 3)
    joints_posed = jnp.stack(g_trans, axis=1)  # (B, J, 3)
    # transforms relative to the rest pose: x -> G_R (x - J_rest) + J_posed.
    rel_trans = joints_posed - jnp.einsum("bjik,bjk->bji", g_rot_all, joints_rest, precision=_HIGHEST)

    # linear blend skinning.
    t_rot = jnp.einsum("vj,bjik->bvik", model.lbs_weights, g_rot_all, precision=_HIGHEST)
    t_trans = jnp.einsum("vj,bji->bvi", model.lbs_weights, rel_trans, precision=_HIGHEST)
    vertices = jnp.einsum("bvik,bvk->bvi", t_rot, v_posed, precision=_HIGHEST) + t_trans

    if translation is not None:
        trans = jnp.broadcast_to(translation, lead + (3,)).reshape(batch, 1, 3)
        vertices = vertices + trans
        joints_posed = joints_posed + trans
    return FlameOutput(vertices=vertices.reshape(lead + vertices.shape[1:]),
                       joints=joints_posed.reshape(lead + joints_posed.shape[1:]))


def motion_to_vertices(model: FlameModel, motion: jax.Array, shape: jax.Array | None = None,
                       *, n_exp: int = 50) -> jax.Array:
    """Vertices of the AVI-Talking motion target: (..., n_exp + 3) = expression psi + jaw pose.

    Head pose and neck/eyes are at rest and identity is ``shape`` (or the mean), as in the paper's
    53-d target (50 FLAME expression + 3 jaw axis-angle in radians, 25 fps).

    Args:
      model: from ``avi_jax.checkpoints.flame.load_flame_model`` with ``model.n_exp >= n_exp``.
      motion: (..., n_exp + 3) float.
      shape: optional (..., k) identity coefficients, broadcast against ``motion``'s leading dims.

    Returns:
      (..., V, 3) float32 vertices in metres.

    Raises:
      InputError: ``motion``'s last dimension is not n_exp + 3, or n_exp > model.n_exp.
    """
    motion = jnp.asarray(motion, jnp.float32)
    if motion.ndim == 0 or motion.shape[-1] != n_exp + 3:
        raise InputError(f"motion_to_vertices: motion has shape {motion.shape}, expected "
                         f"(..., {n_exp + 3}) = {n_exp} expression + 3 jaw pose")
    return flame_forward(model, shape, motion[..., :n_exp],
                         {"jaw_pose": motion[..., n_exp:]}).vertices
