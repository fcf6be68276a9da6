"""The demo head's template mesh, joints, skinning weights and region masks (steps 1-4 of
:mod:`avi_jax.data.demo_head`, which writes them as FLAME-layout files).

**Not FLAME and not a real face**: a procedural stand-in. All numpy, positions in metres; +y up, +z = the
face's front, +x = the subject's left, as FLAME. Nothing here depends on the demo corpus' seed.

- :func:`build_head`: the skin (a latitude/longitude grid following a head profile, with facial feature
  bumps), the mouth cut into upper and lower lip with a watertight pocket behind it, and two eyeballs;
  returned as a :class:`Head` with the bookkeeping the later steps need.
- :func:`jaw_weights` / :func:`skinning_weights`: LBS weights over FLAME's 5 joints (:data:`JOINT_NAMES`).
- :func:`joint_regressor`: (5, V) convex weights over symmetric vertex sets.
- :func:`region_masks`: ``{region: vertex indices}`` for :data:`REGIONS` (FLAME_masks.pkl's layout).
- :func:`smoothstep`, :func:`gauss`, :func:`mirror`: the small field helpers shared with
  :mod:`avi_jax.data.demo_head_blendshapes`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np
import scipy.interpolate
import trimesh

__all__ = [
    "JOINT_NAMES", "REGIONS", "EYE_X", "EYE_Y", "Head", "build_head", "jaw_weights", "skinning_weights",
    "joint_regressor", "region_masks", "smoothstep", "gauss", "mirror",
]

JOINT_NAMES = ("root", "neck", "jaw", "left_eye", "right_eye")  # FLAME's joint order
# Regions of FLAME_masks.pkl written (FLAME's names, plus the demo's lip_corners / lip_centres / ...).
REGIONS = ("lips", "upper_lip", "lower_lip", "lip_corners", "lip_centres", "mouth_interior", "jaw",
           "forehead", "eye_region", "left_eye_region", "right_eye_region", "left_eyeball",
           "right_eyeball", "nose", "face", "neck", "scalp", "left_ear", "right_ear", "boundary")

_N_RINGS = 64         # latitude steps from crown (ring 0 = pole) to neck bottom (ring 64 = pole)
_N_COLS = 80          # longitude columns; column _N_COLS // 2 is the midline of the face (phi = 0)
_EYE_RADIUS = 0.0125
_EYE_PROUD = 0.007    # how far the eyeball's front stands out of the socket's skin
EYE_X, EYE_Y = 0.033, 0.020
_MOUTH_Y = -0.040     # target height of the mouth ring
_MOUTH_HALF_WIDTH = 0.025
_HINGE = (-0.012, 0.0)  # (y, z) of the jaw hinge target (between the ears)
_N_POCKET = 3         # rings of the mouth pocket on each side


# ---------------------------------------------------------------------------------------------
# Small helpers.
# ---------------------------------------------------------------------------------------------

def smoothstep(x: np.ndarray, a: float, b: float) -> np.ndarray:
    t = np.clip((np.asarray(x, np.float64) - a) / (b - a), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def gauss(p: np.ndarray, centre: Sequence[float], sigma: float | Sequence[float]) -> np.ndarray:
    """exp(-|(p - centre) / sigma|^2 / 2) for points p (N, 3); sigma a scalar or per axis."""
    d = (p - np.asarray(centre, np.float64)) / np.asarray(sigma, np.float64)
    return np.exp(-0.5 * np.sum(d * d, axis=-1))


def mirror(p: Sequence[float]) -> np.ndarray:
    return np.asarray(p, np.float64) * np.array([-1.0, 1.0, 1.0])


def _inverse_cdf(density: Callable[[np.ndarray], np.ndarray], lo: float, hi: float,
                 u: np.ndarray) -> np.ndarray:
    """Points at quantiles u in [0, 1] of a positive density on [lo, hi] (for graded grid spacing)."""
    grid = np.linspace(lo, hi, 20001)
    d = density(grid)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (d[1:] + d[:-1]) * np.diff(grid))])
    return np.interp(u, cdf / cdf[-1], grid)


# ---------------------------------------------------------------------------------------------
# Geometry.
# ---------------------------------------------------------------------------------------------

class Head(NamedTuple):
    """The built template and its bookkeeping (all numpy, float64 positions in metres)."""

    verts: np.ndarray          # (V, 3)
    faces: np.ndarray          # (F, 3) int64, outward-oriented
    skin: np.ndarray           # (V,) bool: grid vertices and their lower-lip copies (not pocket/eyes)
    pocket_side: np.ndarray    # (V,) int: +1 upper pocket, -1 lower pocket, 0 otherwise
    eye: np.ndarray            # (V,) int: 1 left eyeball, 2 right eyeball, 0 otherwise
    eye_centres: np.ndarray    # (2, 3) left, right
    lip_side: np.ndarray       # (V,) float in [0, 1]: 1 = upper lip side, 0 = lower (jaw) side
    phi: np.ndarray            # (V,) longitude of grid vertices (0 = face midline, + = left), 0 elsewhere
    ring: np.ndarray           # (V,) ring index of grid vertices, -1 elsewhere
    corners: tuple[int, int]   # lip corner vertices (left, right)
    centres: tuple[int, int]   # upper / lower lip centre vertices (coincident at rest)
    mouth_y: float
    pocket_edge: np.ndarray    # (V,) for pocket vertices the lip-edge vertex of their column, else -1
    nose_w: np.ndarray         # (V,) nose bump weight (for masks)
    ear_w: np.ndarray          # (V,) ear bump weight (for masks)


def _profile(theta: np.ndarray) -> tuple[np.ndarray, ...]:
    """Horizontal section of the head at polar angle theta (0 = crown, pi = neck bottom).

    Returns (y, a, bf, bb, zc): height, half-width in x, depth in front of / behind the section centre
    and the centre's z, in metres. Cranium = an ellipsoid; below the ear line, hand-placed key sections
    (jaw, chin, under-chin, neck) joined by monotone cubic interpolation.
    """
    deg = np.concatenate([np.arange(0.0, 91.0, 5.0), [95, 105, 115, 122, 129, 135, 140, 145, 150, 158,
                                                      166, 172, 176, 180]])
    up = np.radians(deg[deg <= 90])
    ell = np.stack([0.010 + 0.105 * np.cos(up), 0.077 * np.sin(up), 0.092 * np.sin(up),
                    0.100 * np.sin(up), 0.0 * up], axis=1)
    low = np.array([  # y, a, bf, bb, zc
        [0.001, 0.0768, 0.0917, 0.0995, 0.0],
        [-0.017, 0.0755, 0.0910, 0.0960, 0.0],
        [-0.036, 0.0720, 0.0900, 0.0890, 0.0],
        [-0.050, 0.0670, 0.0890, 0.0820, 0.0],
        [-0.064, 0.0610, 0.0870, 0.0720, -0.002],
        [-0.074, 0.0560, 0.0820, 0.0620, -0.004],
        [-0.081, 0.0520, 0.0700, 0.0540, -0.008],
        [-0.087, 0.0500, 0.0540, 0.0490, -0.012],
        [-0.093, 0.0490, 0.0460, 0.0470, -0.015],
        [-0.106, 0.0490, 0.0450, 0.0470, -0.016],
        [-0.125, 0.0500, 0.0460, 0.0480, -0.016],
        [-0.140, 0.0470, 0.0430, 0.0450, -0.016],
        [-0.146, 0.0350, 0.0320, 0.0340, -0.016],
        [-0.149, 0.0, 0.0, 0.0, -0.016],
    ])
    keys = np.concatenate([ell, low], axis=0)
    f = scipy.interpolate.PchipInterpolator(np.radians(deg), keys, axis=0)
    out = f(theta)
    return tuple(out[..., i] for i in range(5))


def _section_points(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    y, a, bf, bb, zc = _profile(theta)
    c = np.cos(phi)
    z = zc + c * 0.5 * (bf + bb) + c * c * 0.5 * (bf - bb)  # bf at the front, bb at the back, smooth
    return np.stack([a * np.sin(phi), y, z], axis=-1)


def _feature_bumps(p: np.ndarray, phi: np.ndarray, mouth_y: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Displacements (N, 3) of the facial features at profile points p (N, 3) with longitude phi.

    Returns (displacement, nose weight, ear weight).
    """
    x, y = p[:, 0], p[:, 1]
    front = smoothstep(np.cos(phi), 0.2, 0.6)
    d = np.zeros_like(p)
    # nose: a ridge from the nasion (y ~ 0.025) to the tip (y ~ -0.01), 2 cm proud at the tip.
    h = np.interp(y, [-0.030, -0.024, -0.019, -0.012, -0.008, 0.005, 0.025, 0.035],
                  [0.0, 0.002, 0.008, 0.019, 0.020, 0.013, 0.004, 0.0])
    sig = np.interp(y, [-0.030, -0.012, 0.0, 0.025], [0.011, 0.009, 0.0065, 0.0065])
    nose = h * np.exp(-0.5 * (x / sig) ** 2)
    alae = 0.005 * sum(np.exp(-0.5 * (((x - s * 0.012) / 0.005) ** 2 + ((y + 0.014) / 0.005) ** 2))
                       for s in (1.0, -1.0))
    d[:, 2] += front * (nose + alae)
    # eye sockets, brow ridge, cheekbones.
    for s in (1.0, -1.0):
        ex, ey = x - s * EYE_X, y - EYE_Y
        d[:, 2] -= front * 0.010 * np.exp(-0.5 * ((ex / 0.014) ** 2 + (ey / 0.009) ** 2))
        # lids: the skin around an almond-shaped opening comes forward over the eyeball.
        opening = np.exp(-(((ex / 0.012) ** 2 + (ey / 0.005) ** 2) ** 1.5))
        d[:, 2] += front * 0.008 * np.exp(-0.5 * ((ex / 0.016) ** 2 + (ey / 0.012) ** 2)) * (1.0 - opening)
        d[:, 2] += front * 0.004 * np.exp(-0.5 * (((x - s * 0.045) / 0.013) ** 2
                                                  + ((y + 0.003) / 0.010) ** 2))
    d[:, 2] += front * 0.004 * np.exp(-0.5 * ((y - 0.036) / 0.005) ** 2) * np.exp(-(x / 0.05) ** 4)
    # muzzle (the teeth under the lips), lips, the groove below the lower lip, chin.
    d[:, 2] += front * 0.004 * np.exp(-0.5 * (((y - mouth_y) / 0.015) ** 2 + (x / 0.03) ** 2))
    lip_x = np.exp(-(np.abs(x) / 0.027) ** 4)
    d[:, 2] += front * lip_x * (0.0045 * np.exp(-0.5 * ((y - mouth_y - 0.004) / 0.004) ** 2)
                                + 0.0055 * np.exp(-0.5 * ((y - mouth_y + 0.005) / 0.0045) ** 2))
    d[:, 2] -= front * 0.002 * np.exp(-0.5 * (((y - mouth_y + 0.016) / 0.003) ** 2 + (x / 0.015) ** 2))
    d[:, 2] += front * 0.006 * np.exp(-0.5 * (((y - mouth_y + 0.032) / 0.009) ** 2 + (x / 0.014) ** 2))
    # ears: flaps sticking out sideways.
    side = smoothstep(np.abs(np.sin(phi)), 0.8, 0.97)
    ear = side * np.exp(-0.5 * (((y - 0.005) / 0.022) ** 2 + ((p[:, 2] + 0.010) / 0.011) ** 2))
    d[:, 0] += np.sign(x) * 0.011 * ear
    return d, nose + alae, ear


def _grid_index(ring: int, col: int) -> int:
    """Vertex index of grid ring 1..63, column 0..79 (0 = crown pole, last = neck pole)."""
    return 1 + (ring - 1) * _N_COLS + col % _N_COLS


def build_head() -> Head:
    n_r, n_c = _N_RINGS, _N_COLS
    thetas = _inverse_cdf(lambda t: 1.0 + 3.0 * smoothstep(t, np.radians(45), np.radians(60))
                          * (1.0 - smoothstep(t, np.radians(135), np.radians(150))),
                          0.0, np.pi, np.arange(n_r + 1) / n_r)
    half = _inverse_cdf(lambda f: 1.0 + 3.0 * (1.0 - smoothstep(np.abs(f), np.radians(45), np.radians(65))),
                        -np.pi, np.pi, np.arange(n_c // 2, n_c + 1) / n_c)
    phis = np.concatenate([-half[:0:-1], half[:-1]])  # exactly mirror-symmetric, phis[n_c // 2] = 0
    phis[0] = -np.pi

    # grid: crown pole, rings 1..n_r-1, neck pole.
    ring_of = np.concatenate([[0], np.repeat(np.arange(1, n_r), n_c), [n_r]])
    col_of = np.concatenate([[0], np.tile(np.arange(n_c), n_r - 1), [0]])
    th = thetas[ring_of]
    ph = np.where((ring_of == 0) | (ring_of == n_r), 0.0, phis[col_of])
    base = _section_points(th, ph)
    ring_y = _profile(thetas)[0]
    r_m = int(np.argmin(np.abs(ring_y[1:-1] - _MOUTH_Y))) + 1
    mouth_y = float(ring_y[r_m])
    bump, nose_w, ear_w = _feature_bumps(base, ph, mouth_y)
    verts = base + bump
    n_grid = len(verts)

    # mouth: the columns of ring r_m between the corners are cut; the lower lip gets copies.
    mid = n_c // 2
    a_m = _profile(np.array([thetas[r_m]]))[1][0]
    half_angle = np.arcsin(_MOUTH_HALF_WIDTH / a_m)
    m = int(np.argmin(np.abs(phis[mid:] - half_angle)))
    corner_cols = (mid + m, mid - m)  # left (+x), right
    inner_cols = np.arange(mid - m + 1, mid + m)
    upper_ids = np.array([_grid_index(r_m, c) for c in inner_cols])
    lower_ids = n_grid + np.arange(len(inner_cols))
    lower_of = dict(zip(upper_ids.tolist(), lower_ids.tolist()))
    verts = np.concatenate([verts, verts[upper_ids]], axis=0)

    faces = []
    for c in range(n_c):
        faces.append((0, _grid_index(1, c), _grid_index(1, c + 1)))
        faces.append((_grid_index(n_r - 1, c), n_grid - 1, _grid_index(n_r - 1, c + 1)))
    for r in range(1, n_r - 1):
        for c in range(n_c):
            a, b = _grid_index(r, c), _grid_index(r, c + 1)
            cc, d = _grid_index(r + 1, c + 1), _grid_index(r + 1, c)
            if r == r_m:  # faces below the mouth ring use the lower-lip copies
                a, b = lower_of.get(a, a), lower_of.get(b, b)
            faces.append((a, d, b))
            faces.append((b, d, cc))

    # the mouth pocket: rings behind the upper and lower lip, closed at the back.
    corner_l, corner_r = _grid_index(r_m, corner_cols[0]), _grid_index(r_m, corner_cols[1])
    n_in = len(inner_cols)
    xs = verts[upper_ids, 0]
    taper = np.sqrt(np.clip(1.0 - (xs / verts[corner_l, 0]) ** 2, 0.0, 1.0))
    depth = (0.005, 0.012, 0.020)
    rise = {1: (0.003, 0.006, 0.007), -1: (-0.003, -0.007, -0.009)}
    pocket_rows: dict[int, list[np.ndarray]] = {1: [], -1: []}
    pocket_side = [np.zeros(len(verts), int)]
    start = len(verts)
    new = []
    for side in (1, -1):
        for k in range(_N_POCKET):
            e = verts[upper_ids]
            p = np.stack([e[:, 0] * (1.0 - 0.12 * (k + 1)),
                          mouth_y + rise[side][k] * (0.3 + 0.7 * taper),
                          e[:, 2] - depth[k] * (0.35 + 0.65 * taper)], axis=1)
            pocket_rows[side].append(start + len(new) * n_in + np.arange(n_in))
            new.append(p)
            pocket_side.append(np.full(n_in, side))
    verts = np.concatenate([verts] + new, axis=0)
    up_edge = np.concatenate([[corner_r], upper_ids, [corner_l]])   # right corner -> left corner (+x)
    low_edge = np.concatenate([[corner_r], lower_ids, [corner_l]])
    for side, edge in ((1, up_edge), (-1, low_edge)):
        rows = pocket_rows[side]
        first = rows[0]
        # edge (n_in + 2) -> first ring (n_in): a strip with a triangle at each corner.
        strip = [(edge[0], edge[1], first[0])]
        for i in range(n_in - 1):
            strip += [(edge[i + 1], edge[i + 2], first[i + 1]), (edge[i + 1], first[i + 1], first[i])]
        strip.append((edge[n_in], edge[n_in + 1], first[n_in - 1]))
        for k in range(_N_POCKET - 1):
            ra, rb = rows[k], rows[k + 1]
            for i in range(n_in - 1):
                strip += [(ra[i], ra[i + 1], rb[i + 1]), (ra[i], rb[i + 1], rb[i])]
        if side == 1:  # the upper half is the mirror image of the lower in y: reverse the winding
            strip = [(t[0], t[2], t[1]) for t in strip]
        faces += strip
    # close the pocket: the corner triangles joining the two halves, and the back wall.
    for k in range(_N_POCKET):
        u, lo = pocket_rows[1][k], pocket_rows[-1][k]
        if k == 0:
            faces += [(corner_r, lo[0], u[0]), (corner_l, u[-1], lo[-1])]
        else:
            pu, pl = pocket_rows[1][k - 1], pocket_rows[-1][k - 1]
            faces += [(pu[0], pl[0], lo[0]), (pu[0], lo[0], u[0]),
                      (pu[-1], u[-1], lo[-1]), (pu[-1], lo[-1], pl[-1])]
    u, lo = pocket_rows[1][-1], pocket_rows[-1][-1]
    for i in range(n_in - 1):
        faces += [(u[i], lo[i + 1], u[i + 1]), (u[i], lo[i], lo[i + 1])]

    # eyeballs.
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=1.0)
    unit = np.asarray(sphere.vertices, np.float64)
    cornea = 0.12 * smoothstep(unit[:, 2], np.cos(np.radians(40)), np.cos(np.radians(15)))
    eye_shape = unit * (1.0 + cornea[:, None])  # a 1.5 mm corneal bulge: the eye looks along +z
    eye_ids = []
    eye_centres = []
    for s in (1.0, -1.0):
        # the skin's depth at the socket centre: the mean of the 4 nearest front grid vertices.
        g = verts[:n_grid]
        near = np.argsort((g[:, 0] - s * EYE_X) ** 2 + (g[:, 1] - EYE_Y) ** 2
                          + 1e3 * (g[:, 2] < 0))[:4]
        z_skin = float(np.mean(g[near, 2]))
        centre = np.array([s * EYE_X, EYE_Y, z_skin - _EYE_RADIUS + _EYE_PROUD])
        eye_centres.append(centre)
        eye_ids.append(len(verts) + np.arange(len(unit)))
        faces += (np.asarray(sphere.faces) + len(verts)).tolist()
        verts = np.concatenate([verts, centre + _EYE_RADIUS * eye_shape], axis=0)

    n_v = len(verts)
    faces_arr = np.asarray(faces, np.int64)
    skin = np.zeros(n_v, bool)
    skin[:n_grid + n_in] = True
    eye = np.zeros(n_v, int)
    eye[eye_ids[0]], eye[eye_ids[1]] = 1, 2
    side_arr = np.concatenate(pocket_side + [np.zeros(n_v - start - 2 * _N_POCKET * n_in, int)])
    phi_all = np.zeros(n_v)
    phi_all[:n_grid] = ph
    phi_all[lower_ids] = ph[upper_ids]
    ring_all = np.full(n_v, -1)
    ring_all[:n_grid] = ring_of
    ring_all[lower_ids] = r_m
    # lip side: 1 above the mouth line, 0 below; the cut decides on the mouth ring itself.
    lip_side = smoothstep(verts[:, 1], mouth_y - 0.0015, mouth_y + 0.0015)
    lip_side[upper_ids] = 1.0
    lip_side[lower_ids] = 0.0
    lip_side[[corner_l, corner_r]] = 0.5
    lip_side[side_arr == 1] = 1.0
    lip_side[side_arr == -1] = 0.0
    lip_side[eye > 0] = 1.0
    centre_col = int(np.nonzero(inner_cols == mid)[0][0])
    pocket_edge = np.full(n_v, -1)
    for side, edge_ids in ((1, upper_ids), (-1, lower_ids)):
        for row in pocket_rows[side]:
            pocket_edge[row] = edge_ids
    nose_all = np.zeros(n_v)
    nose_all[:n_grid] = nose_w
    ear_all = np.zeros(n_v)
    ear_all[:n_grid] = ear_w

    return Head(verts=verts, faces=faces_arr, skin=skin, pocket_side=side_arr, eye=eye,
                 eye_centres=np.stack(eye_centres), lip_side=lip_side, phi=phi_all, ring=ring_all,
                 corners=(corner_l, corner_r),
                 centres=(int(upper_ids[centre_col]), int(lower_ids[centre_col])),
                 mouth_y=mouth_y, pocket_edge=pocket_edge, nose_w=nose_all, ear_w=ear_all)


# ---------------------------------------------------------------------------------------------
# Skinning, joints, regions.
# ---------------------------------------------------------------------------------------------

def jaw_weights(h: Head) -> np.ndarray:
    """(V,) jaw skinning weight: 1 on the lower lip, chin, jaw and mouth floor, 0 above the mouth line,
    smooth towards the cheeks (the line rises from the lip corners to the hinge) and the neck."""
    v = h.verts
    ang = np.abs(h.phi)
    corner_ang = abs(h.phi[h.corners[0]])
    y_line = h.mouth_y + (_HINGE[0] - h.mouth_y) * smoothstep(ang, corner_ang, np.radians(80))
    width = 0.0015 + 0.0135 * smoothstep(ang, corner_ang - np.radians(5), corner_ang + np.radians(25))
    w = 1.0 - smoothstep(v[:, 1], y_line - width, y_line + width)
    w *= smoothstep(v[:, 2], -0.02, 0.01) * smoothstep(v[:, 1], -0.100, -0.080)
    # the cut mouth ring: lower-lip copies 1 and upper lip 0 over the middle 60 %, both tending to
    # the corners' 0.5 over the outer 40 % (a lens-shaped opening).
    cut = h.skin & (h.ring == h.ring[h.corners[0]]) & (h.lip_side != 0.5) & (ang < corner_ang)
    taper = smoothstep(1.0 - np.abs(v[cut, 0] / v[h.corners[0], 0]), 0.0, 0.4)
    w[cut] = 0.5 + 0.5 * taper * (1.0 - 2.0 * h.lip_side[cut])
    pocket = h.pocket_edge >= 0
    w[pocket] = w[h.pocket_edge[pocket]]  # the mouth's inside follows its lip edge
    w[h.eye > 0] = 0.0
    return w


def skinning_weights(h: Head) -> np.ndarray:
    """(V, 5) LBS weights over (root, neck, jaw, left eye, right eye); rows sum to 1."""
    jaw = jaw_weights(h)
    body = (h.eye == 0).astype(np.float64)
    root = body * (1.0 - jaw) * (1.0 - smoothstep(h.verts[:, 1], -0.135, -0.105))
    neck = body - jaw - root
    return np.stack([root, neck, jaw, (h.eye == 1).astype(np.float64),
                     (h.eye == 2).astype(np.float64)], axis=1)


def _ring_near(h: Head, y: float) -> int:
    rings = np.arange(1, _N_RINGS)
    ys = np.array([h.verts[_grid_index(r, 0), 1] for r in rings])
    return int(rings[np.argmin(np.abs(ys - y))])


def joint_regressor(h: Head) -> np.ndarray:
    """(5, V) dense: rows are convex weights over symmetric vertex sets (their mean is the joint)."""
    n_v = len(h.verts)
    reg = np.zeros((5, n_v))
    cols = np.arange(_N_COLS)
    phis = h.phi[[_grid_index(1, c) for c in cols]]
    arc = (np.roll(phis, -1) - np.roll(phis, 1)) % (2 * np.pi) / 2.0  # arc length per column
    for j, y in ((0, -0.135), (1, -0.095)):  # root at the neck base, neck at the top of the neck
        r = _ring_near(h, y)
        reg[j, [_grid_index(r, c) for c in cols]] = arc / arc.sum()
    grid = np.arange(1, 1 + (_N_RINGS - 1) * _N_COLS)
    g = h.verts[grid]
    for s in (1.0, -1.0):  # jaw: the 4 vertices beside each ear nearest to the hinge
        target = np.array([s * 0.08, _HINGE[0], _HINGE[1]])
        near = grid[np.argsort(np.sum((g - target) ** 2, axis=1), kind="stable")[:4]]
        reg[2, near] = 1.0 / 8.0
    sphere = np.asarray(trimesh.creation.icosphere(subdivisions=2, radius=1.0).vertices)
    band = np.abs(sphere[:, 2]) < 0.35  # an equatorial band: symmetric, away from the cornea
    for j, e in ((3, 1), (4, 2)):
        ids = np.nonzero(h.eye == e)[0][band]
        reg[j, ids] = 1.0 / len(ids)
    return reg


def region_masks(h: Head, jaw: np.ndarray) -> dict[str, np.ndarray]:
    v = h.verts
    x, y = v[:, 0], v[:, 1]
    skin = h.skin
    front = skin & (np.cos(h.phi) > 0.3)
    lips = front & ((x / 0.031) ** 2 + ((y - h.mouth_y) / 0.011) ** 2 <= 1.0)
    eyes = {}
    for name, s in (("left", 1.0), ("right", -1.0)):
        eyes[name] = front & (((x - s * EYE_X) / 0.020) ** 2 + ((y - EYE_Y) / 0.014) ** 2 <= 1.0)
    face = front & (y > h.mouth_y - 0.045) & (y < 0.075)
    ears = {"left": skin & (h.ear_w > 0.3) & (x > 0), "right": skin & (h.ear_w > 0.3) & (x < 0)}
    masks = {
        "lips": lips,
        "upper_lip": lips & (h.lip_side >= 0.5),
        "lower_lip": lips & (h.lip_side <= 0.5),
        "lip_corners": np.array(h.corners),
        "lip_centres": np.array(h.centres),
        "mouth_interior": h.pocket_side != 0,
        "jaw": (skin | (h.pocket_side != 0)) & (jaw > 0.5),
        "forehead": front & (y > 0.045) & (y < 0.09) & (np.abs(x) < 0.055),
        "eye_region": eyes["left"] | eyes["right"],
        "left_eye_region": eyes["left"],
        "right_eye_region": eyes["right"],
        "left_eyeball": h.eye == 1,
        "right_eyeball": h.eye == 2,
        "nose": front & (h.nose_w > 0.002),
        "face": face,
        "neck": skin & (y < -0.09),
        "scalp": skin & ~face & ~ears["left"] & ~ears["right"]
        & ((y > 0.035) | ((v[:, 2] < -0.02) & (y > -0.03))),
        "left_ear": ears["left"],
        "right_ear": ears["right"],
        "boundary": np.isin(np.arange(len(v)), [_grid_index(_N_RINGS - 1, c) for c in range(_N_COLS)]),
    }
    out = {}
    for name in REGIONS:
        m = masks[name]
        out[name] = (np.asarray(m, np.int64) if m.dtype != bool else np.nonzero(m)[0]).astype(np.int64)
    return out
