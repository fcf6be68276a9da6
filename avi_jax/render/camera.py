"""The perspective camera that frames a FLAME head from the front.

World units are metres in the FLAME convention: +y up, +z towards the viewer, the head centred near the
origin (about 0.2 m tall). The camera looks down -z from a point in front of the face; OpenGL clip-space
conventions (right-handed eye space, the camera looking down its -z axis).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from avi_jax.errors import InputError

_MIN_HALF_EXTENT = 1e-3   # metres: a degenerate (flat or point) mesh is still framed


@dataclasses.dataclass(frozen=True)
class Camera:
    """A pinhole camera.

    Attributes:
      eye: (3,) camera position, metres.
      target: (3,) the point looked at, metres.
      up: (3,) the world direction that is up in the image (+y for FLAME).
      fov_y: vertical field of view, degrees.
      near, far: clip-plane distances from the eye along the view axis, metres (0 < near < far).
    """

    eye: tuple[float, float, float]
    target: tuple[float, float, float] = (0.0, 0.0, 0.0)
    up: tuple[float, float, float] = (0.0, 1.0, 0.0)
    fov_y: float = 20.0
    near: float = 0.01
    far: float = 10.0

    def __post_init__(self):
        eye, target, up = (np.asarray(v, np.float64) for v in (self.eye, self.target, self.up))
        if eye.shape != (3,) or target.shape != (3,) or up.shape != (3,):
            raise InputError(f"Camera: eye, target and up must be 3-vectors, got {self.eye}, {self.target}, "
                             f"{self.up}")
        if not (np.isfinite(eye).all() and np.isfinite(target).all() and np.isfinite(up).all()):
            raise InputError("Camera: eye, target and up must be finite")
        forward = target - eye
        if np.linalg.norm(forward) < 1e-12:
            raise InputError(f"Camera: eye {self.eye} and target {self.target} coincide")
        up_norm = np.linalg.norm(up)
        if up_norm == 0.0 or np.linalg.norm(np.cross(forward / np.linalg.norm(forward), up / up_norm)) < 1e-9:
            raise InputError(f"Camera: up {self.up} is parallel to the view direction (or zero)")
        if not 0.0 < self.fov_y < 180.0:
            raise InputError(f"Camera: fov_y must be in (0, 180) degrees, got {self.fov_y}")
        if not 0.0 < self.near < self.far:
            raise InputError(f"Camera: need 0 < near < far, got near={self.near}, far={self.far}")

    @classmethod
    def framing(cls, vertices, *, aspect: float = 1.0, fov_y: float = 20.0, margin: float = 1.15) -> "Camera":
        """The frontal camera (looking down -z) that fits the bounding box of ``vertices`` in the image.

        Args:
          vertices: (V, 3) float, metres (one frame; typically the first of a sequence).
          aspect: image width / height.
          fov_y: vertical field of view, degrees.
          margin: >= 1; the box's larger image-plane extent fills 1 / margin of the view.

        Returns:
          A :class:`Camera` centred on the box, at the distance where the box's front face fits.

        Raises:
          InputError: ``vertices`` is not (V, 3) with V > 0, or has NaN/inf.
        """
        v = np.asarray(vertices, np.float64)
        if v.ndim != 2 or v.shape[1] != 3 or v.shape[0] == 0:
            raise InputError(f"Camera.framing: vertices must be (V, 3) with V > 0, got shape {v.shape}")
        if not np.isfinite(v).all():
            raise InputError("Camera.framing: vertices contain NaN or inf")
        lo, hi = v.min(axis=0), v.max(axis=0)
        centre = (lo + hi) / 2.0
        half = np.maximum((hi - lo) / 2.0, _MIN_HALF_EXTENT)
        tan_half = math.tan(math.radians(fov_y) / 2.0)
        fit = max(half[1], half[0] / aspect) * margin
        distance = half[2] + fit / tan_half          # eye -> box centre; the box's front face fits
        radius = float(np.linalg.norm(half))
        near = max(distance - 2.0 * radius, distance * 1e-3)
        far = distance + 2.0 * radius
        eye = centre + np.array([0.0, 0.0, distance])
        return cls(eye=tuple(map(float, eye)), target=tuple(map(float, centre)), fov_y=fov_y,
                   near=float(near), far=float(far))

    def view_matrix(self) -> np.ndarray:
        """(4, 4) float64 world -> eye transform (rigid; row-major, column vectors)."""
        eye, target, up = (np.asarray(v, np.float64) for v in (self.eye, self.target, self.up))
        f = target - eye
        f /= np.linalg.norm(f)
        s = np.cross(f, up)
        s /= np.linalg.norm(s)
        u = np.cross(s, f)
        m = np.eye(4)
        m[0, :3], m[1, :3], m[2, :3] = s, u, -f
        m[:3, 3] = -m[:3, :3] @ eye
        return m

    def projection_matrix(self, aspect: float) -> np.ndarray:
        """(4, 4) float64 OpenGL perspective projection (eye -> clip) for width / height ``aspect``."""
        t = 1.0 / math.tan(math.radians(self.fov_y) / 2.0)
        n, f = self.near, self.far
        m = np.zeros((4, 4))
        m[0, 0], m[1, 1] = t / aspect, t
        m[2, 2], m[2, 3] = (f + n) / (n - f), 2.0 * f * n / (n - f)
        m[3, 2] = -1.0
        return m
