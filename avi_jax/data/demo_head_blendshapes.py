"""The demo head's deformation spaces (steps 5-6 of :mod:`avi_jax.data.demo_head`): expression and
identity blendshapes over the template of :mod:`avi_jax.data.demo_head_geometry`.

- :func:`action_fields` / :func:`action_displacements`: one displacement field per FACS action of
  :data:`avi_jax.data.instructions.ACTIONS` (plus the demo corpus' lip-parting speech direction).
- :func:`expression_blendshapes`: the 50 expression components, solved so that the demo corpus'
  coefficient directions (``demo.action_basis(seed)``, ``demo.mouth_direction(seed)``) produce those fields.
- :func:`identity_blendshapes`: 10 named identity variations and 20 fixed smooth random fields.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from avi_jax.data import demo
from avi_jax.data import instructions as instr
from avi_jax.data.demo_head_geometry import (EYE_X, EYE_Y, Head, build_head, gauss, jaw_weights, mirror,
                                             smoothstep)
from avi_jax.data.schema import N_EXPRESSION

__all__ = ["action_fields", "action_displacements", "expression_blendshapes", "identity_blendshapes"]

_N_IDENTITY_NAMED = 10
_N_IDENTITY_RANDOM = 20


# ---------------------------------------------------------------------------------------------
# Expression: one displacement field per FACS action, solved into the demo corpus' basis.
# ---------------------------------------------------------------------------------------------

class _Landmarks(NamedTuple):
    corner: np.ndarray       # left lip corner (+x); the right one is its mirror image
    lip_centre: np.ndarray   # centre of the mouth line
    brow_inner: np.ndarray
    brow_mid: np.ndarray
    brow_outer: np.ndarray
    upper_lid: np.ndarray
    lower_lid: np.ndarray
    cheek: np.ndarray
    nose_side: np.ndarray
    nose_bridge: np.ndarray
    chin: np.ndarray


def _landmarks(h: Head) -> _Landmarks:
    front = np.nonzero(h.skin & (np.cos(h.phi) > 0.3))[0]

    def skin_point(x: float, y: float) -> np.ndarray:
        p = h.verts[front]
        return p[np.argmin((p[:, 0] - x) ** 2 + (p[:, 1] - y) ** 2)].copy()

    return _Landmarks(
        corner=h.verts[h.corners[0]].copy(), lip_centre=h.verts[h.centres[0]].copy(),
        brow_inner=skin_point(0.015, 0.036), brow_mid=skin_point(0.030, 0.037),
        brow_outer=skin_point(0.047, 0.034), upper_lid=skin_point(EYE_X, EYE_Y + 0.011),
        lower_lid=skin_point(EYE_X, EYE_Y - 0.010), cheek=skin_point(0.040, -0.008),
        nose_side=skin_point(0.010, 0.004), nose_bridge=skin_point(0.0, 0.012),
        chin=skin_point(0.0, h.mouth_y - 0.030))


def action_fields(h: Head) -> dict[str, np.ndarray]:
    """{action name: (V, 3) metres} for each of instructions.ACTION_NAMES, plus 'mouth_opening'."""
    p = h.verts
    x, y = p[:, 0], p[:, 1]
    movable = (h.eye == 0).astype(np.float64)  # eyeballs never deform
    outward = np.tanh(x / 0.004)                # +1 on the left (+x), -1 on the right
    upper, lower = h.lip_side, 1.0 - h.lip_side
    lm = _landmarks(h)
    jaw = jaw_weights(h)

    def pair(centre: np.ndarray, sigma: Any) -> np.ndarray:  # left + mirrored right region
        return gauss(p, centre, sigma) + gauss(p, mirror(centre), sigma)

    def field(dx: Any = 0.0, dy: Any = 0.0, dz: Any = 0.0) -> np.ndarray:
        return np.stack(np.broadcast_arrays(dx, dy, dz, x)[:3], axis=1) * movable[:, None]

    corners = pair(lm.corner, 0.012)
    brows_in = pair(lm.brow_inner, (0.012, 0.010, 0.02))
    brows_out = pair(lm.brow_outer, (0.013, 0.010, 0.02))
    brows = pair(lm.brow_mid, (0.018, 0.009, 0.02))
    upper_lids = pair(lm.upper_lid, (0.010, 0.005, 0.015))
    lower_lids = pair(lm.lower_lid, (0.010, 0.005, 0.015))
    cheeks = pair(lm.cheek, (0.016, 0.012, 0.02))
    lips = gauss(p, lm.lip_centre, (0.025, 0.008, 0.02))
    forehead = gauss(p, (0.0, 0.058, 0.08), (0.03, 0.015, 0.03))
    nose = pair(lm.nose_side, (0.008, 0.010, 0.02)) + gauss(p, lm.nose_bridge, 0.008)
    chin = gauss(p, lm.chin, (0.018, 0.012, 0.02))
    below_corners = pair(lm.corner - np.array([0.0, 0.008, 0.0]), 0.010)
    upper_lip = gauss(p, lm.lip_centre, (0.020, 0.006, 0.02)) * upper
    lower_lip = gauss(p, lm.lip_centre, (0.022, 0.012, 0.02)) * lower
    smirk = gauss(p, lm.corner, 0.010) + 0.3 * gauss(p, mirror(lm.corner), 0.010)
    dm = y - h.mouth_y  # height above the mouth line: compressing it never crosses the lips

    fields = {
        # AU1: inner brows up (and the middle of the forehead a little).
        "inner_brow_raiser": field(dy=0.005 * brows_in + 0.002 * forehead),
        # AU2: outer brows up.
        "outer_brow_raiser": field(dy=0.005 * brows_out),
        # AU4: brows down and drawn together.
        "brow_lowerer": field(dx=-0.0025 * outward * brows, dy=-0.004 * brows, dz=0.0008 * brows),
        # AU5: upper lids up and back (more eyeball shows).
        "upper_lid_raiser": field(dy=0.003 * upper_lids, dz=-0.0015 * upper_lids),
        # AU6: cheeks raised and pushed forward, lower lids up.
        "cheek_raiser": field(dy=0.004 * cheeks + 0.0015 * lower_lids,
                              dz=0.0015 * cheeks + 0.0005 * lower_lids),
        # AU7: lower lids up and forward, upper lids a little down.
        "lid_tightener": field(dy=0.0022 * lower_lids - 0.001 * upper_lids,
                               dz=0.0015 * lower_lids + 0.001 * upper_lids),
        # AU9: nose sides and bridge pulled up, brows a little down, upper lip a little up.
        "nose_wrinkler": field(dy=0.003 * nose - 0.0015 * brows + 0.001 * upper_lip, dz=0.001 * nose),
        # AU10: upper lip raised.
        "upper_lip_raiser": field(dy=0.0035 * upper_lip, dz=0.001 * upper_lip),
        # AU12: lip corners up, outwards and back (a smile), cheeks a little up.
        "lip_corner_puller": field(dx=0.004 * outward * corners, dy=0.006 * corners + 0.0015 * cheeks,
                                   dz=-0.002 * corners),
        # AU14: the (mostly left) lip corner tightened back into a dimple, slightly up.
        "dimpler": field(dx=0.0015 * outward * smirk, dy=0.0015 * smirk, dz=-0.003 * smirk),
        # AU15: lip corners down.
        "lip_corner_depressor": field(dx=0.001 * outward * corners,
                                      dy=-0.005 * corners - 0.002 * below_corners),
        # AU17: chin and lips pushed up, lower lip out.
        "chin_raiser": field(dy=0.003 * chin + 0.002 * lips, dz=0.001 * chin + 0.002 * lips * lower),
        # AU20: lips stretched sideways (corners out, a little down and back).
        "lip_stretcher": field(dx=0.005 * outward * corners, dy=-0.001 * corners, dz=-0.0015 * corners),
        # AU23: lips narrowed and thinned.
        "lip_tightener": field(dx=-0.12 * x * lips, dy=-0.25 * dm * lips, dz=-0.001 * lips),
        # AU24: lips pressed together (thinner, back).
        "lip_pressor": field(dy=-0.35 * dm * lips, dz=-0.002 * lips),
        # AU26: the lower face dropped (the jaw-skinned region down and a little back).
        "jaw_drop": field(dy=-0.004 * jaw, dz=-0.001 * jaw),
        # AU41: upper lids drooped (down and forward over the eyeball).
        "lid_droop": field(dy=-0.0025 * upper_lids, dz=0.0015 * upper_lids),
        # the demo corpus' speech direction: lips parting.
        "mouth_opening": field(dy=-0.002 * lower_lip + 0.0015 * upper_lip, dz=-0.0005 * lower_lip),
    }
    missing = set(instr.ACTION_NAMES) - set(fields)
    if missing:  # pragma: no cover - a new action in instructions.py needs a field here
        raise AssertionError(f"demo head: no displacement field for actions {sorted(missing)}")
    return fields


def expression_blendshapes(h: Head, seed: int) -> np.ndarray:
    """(V, 3, 50): E with E @ action_basis(seed)[a] = D_a and E @ mouth_direction(seed) = D_mouth.

    Minimum-norm least squares: E = D (B B^T)^-1 B with B (18, 50) the stacked directions.
    """
    fields = action_fields(h)
    names = list(instr.ACTION_NAMES) + ["mouth_opening"]
    b = np.concatenate([demo.action_basis(seed), demo.mouth_direction(seed)[None]], axis=0)
    b = b.astype(np.float64)
    d = np.stack([fields[n].reshape(-1) for n in names], axis=1)  # (3V, 18)
    e = d @ np.linalg.solve(b @ b.T, b)                             # (3V, 50)
    return e.reshape(len(h.verts), 3, N_EXPRESSION)


def action_displacements() -> dict[str, np.ndarray]:
    """The demo head's displacement field of each FACS action (what a coefficient vector means).

    Returns:
      ``{name: (V, 3) float64 metres}`` for every name of ``instructions.ACTION_NAMES`` (full strength,
      i.e. the displacement of ``expression = demo.action_basis(seed)[a]``) and 'mouth_opening' (the
      displacement of ``expression = demo.mouth_direction(seed)``), on the neutral template.
    """
    return action_fields(build_head())


# ---------------------------------------------------------------------------------------------
# Identity.
# ---------------------------------------------------------------------------------------------

def identity_blendshapes(h: Head) -> np.ndarray:
    """(V, 3, 300): named identity variations (0..9), smooth random symmetric fields (10..29), zeros."""
    eye = h.eye > 0
    # eyeballs move rigidly with the field at their centre.
    p = h.verts.copy()
    p[h.eye == 1] = h.eye_centres[0]
    p[h.eye == 2] = h.eye_centres[1]
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    zeros = np.zeros_like(x)
    front = smoothstep(z, 0.0, 0.05)
    nose = np.where(eye, 0.0, h.nose_w) / 0.02
    lips = np.exp(-0.5 * (((y - h.mouth_y) / 0.008) ** 2 + (x / 0.025) ** 2)) * front
    lower_face = smoothstep(-y, 0.0, 0.06) * (1.0 - smoothstep(-y, 0.09, 0.11))
    chin_down = (smoothstep(-y, -h.mouth_y, -h.mouth_y + 0.035) * (1.0 - smoothstep(-y, 0.09, 0.12))
                 * smoothstep(z, -0.02, 0.03))
    cheeks = sum(gauss(p, (s * 0.045, -0.02, 0.06), 0.02) for s in (1.0, -1.0))
    named = [
        (0.006 * x / 0.077, zeros, zeros),                                   # head width
        (zeros, 0.007 * y / 0.115, zeros),                                   # head height
        (0.005 * x / 0.06 * lower_face, zeros, zeros),                       # jaw width
        (zeros, -0.0012 * nose, 0.006 * nose),                               # nose length
        (zeros, -0.006 * chin_down, zeros),                                  # face length (chin)
        (0.003 * np.tanh(x / 0.004) * cheeks, zeros, 0.003 * cheeks),        # cheek fullness
        (zeros, zeros, 0.003 * np.exp(-0.5 * ((y - 0.036) / 0.006) ** 2)
         * np.exp(-(x / 0.05) ** 4) * front),                                # brow ridge
        (zeros, zeros, 0.002 * lips),                                        # lip fullness
        (zeros, zeros, 0.008 * np.minimum(z, 0.0) / 0.1 * smoothstep(y, -0.05, 0.0)),  # skull depth
        (zeros, zeros, 0.004 * smoothstep(y, 0.03, 0.09) * front),           # forehead slope
    ]
    out = np.zeros((len(p), 3, 300))
    for k, (dx, dy, dz) in enumerate(named):
        out[:, :, k] = np.stack([dx, dy, dz], axis=1)
    rng = np.random.default_rng(20_240_402)  # fixed: the identity space does not depend on the seed
    skin_ids = np.nonzero(h.skin)[0]
    for k in range(_N_IDENTITY_NAMED, _N_IDENTITY_NAMED + _N_IDENTITY_RANDOM):
        c = h.verts[skin_ids[rng.integers(len(skin_ids))]]
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        sigma = rng.uniform(0.02, 0.05)
        f = 0.0015 * (gauss(p, c, sigma)[:, None] * direction
                      + gauss(p, mirror(c), sigma)[:, None] * mirror(direction))
        out[:, :, k] = f
    return out
