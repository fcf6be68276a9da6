"""The files inference writes for each input and sample (the project's output format, README.md), each atomically (a temporary
name in the same folder, then ``os.replace``), so an interrupted run never leaves a half-written file:

* ``instruction.txt``: the generated (or given) instruction; one ``[start-end s] text`` line per window
  for a recording longer than one window;
* ``coefficients.npz``: ``expression`` (T, 50) float32, ``jaw_pose`` (T, 3) float32 axis-angle radians,
  ``global_pose`` (T, 3) zeros, ``shape`` (100,) zeros (the neutral identity, as in the paper), ``fps`` 25,
  ``sample_rate`` 16000, ``instruction`` (str), ``seed``, ``sample``, the per-window
  ``instructions`` (W,) str with their ``instruction_spans`` (W, 2) float32 seconds, and ``style`` (W, D)
  float32, the style embedding of each window (D = 128 in the paper; ``python -m avi_jax.evaluate`` measures
  the paper's Diversity on it); T = round(seconds x 25);
* ``render.mp4``: the FLAME mesh rendered headless (H.264 yuv420p, 25 fps, the speech as AAC);
* ``meshes/frame_NNNNNN.{obj,ply}`` with ``--meshes``.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import jax
import numpy as np

from avi_jax.data import schema
from avi_jax.inference.pipeline import Result

def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file beside ``path`` and rename it to ``path`` on success
    (the temporary file is removed on failure)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path), suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)             # mkstemp's 0600 -> the usual permissions
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def coefficient_arrays(result: Result) -> dict[str, np.ndarray]:
    """The ``coefficients.npz`` fields of one result (see the module docstring)."""
    t = result.motion.shape[0]
    ne = schema.N_EXPRESSION
    return {
        "expression": result.motion[:, :ne].astype(np.float32),
        "jaw_pose": result.motion[:, ne:].astype(np.float32),
        "global_pose": np.zeros((t, 3), np.float32),
        "shape": np.zeros((schema.N_SHAPE,), np.float32),
        "fps": np.int32(schema.FPS),
        "sample_rate": np.int32(schema.SAMPLE_RATE),
        "instruction": np.array(result.instruction),
        "instructions": np.array([text for _, _, text in result.instructions]),
        "instruction_spans": np.array([(a, b) for a, b, _ in result.instructions], np.float32).reshape(-1, 2),
        "seed": np.int64(result.seed),
        "sample": np.int32(result.sample),
        **({"style": np.asarray(result.style, np.float32)} if result.style is not None else {}),
    }


def write_result(folder: str, result: Result) -> None:
    """``instruction.txt`` and ``coefficients.npz`` of one result into ``folder`` (created)."""
    atomic_write(os.path.join(folder, "instruction.txt"),
                 lambda f: f.write(result.instruction + "\n"), mode="w")
    atomic_write(os.path.join(folder, "coefficients.npz"),
                 lambda f: np.savez(f, **coefficient_arrays(result)))


class LazyVertices:
    """FLAME vertices (T, V, 3) float32 of a motion sequence (T, 53), computed a block of ``chunk`` frames
    at a time when indexed (an int or a slice), so a long recording's vertices never all exist at once.
    ``flame`` from ``checkpoints.flame.load_flame_model``; one compilation (fixed block size)."""

    chunk = 64
    ndim = 3

    def __init__(self, flame: Any, motion: np.ndarray):
        self.flame, self.motion = flame, np.asarray(motion, np.float32)
        self.shape = (self.motion.shape[0], int(flame.v_template.shape[0]), 3)
        self._block: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def _get_block(self, b: int) -> np.ndarray:
        if self._block is None or self._block[0] != b:
            part = self.motion[b * self.chunk:(b + 1) * self.chunk]
            padded = np.zeros((self.chunk, part.shape[1]), np.float32)
            padded[:part.shape[0]] = part
            self._block = (b, np.asarray(_flame_vertices(self.flame, padded))[:part.shape[0]])
        return self._block[1]

    def __getitem__(self, index: int | slice) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            i = int(index) % self.shape[0]
            return self._get_block(i // self.chunk)[i % self.chunk]
        start, stop, step = index.indices(self.shape[0])
        if step != 1:
            raise IndexError("LazyVertices: only contiguous slices")
        if stop <= start:
            return np.zeros((0,) + self.shape[1:], np.float32)
        blocks = range(start // self.chunk, (stop - 1) // self.chunk + 1)
        whole = np.concatenate([self._get_block(b) for b in blocks])
        offset = blocks[0] * self.chunk
        return whole[start - offset:stop - offset]


@jax.jit
def _flame_vertices(flame: Any, motion: jax.Array) -> jax.Array:
    from avi_jax.models.flame import motion_to_vertices
    return motion_to_vertices(flame, motion)


def write_render(folder: str, flame: Any, result: Result, audio: np.ndarray | None, *, size: int,
                 render: bool = True, meshes: str | None = None) -> None:
    """``render.mp4`` (with ``render``) and, with ``meshes`` = 'obj' | 'ply', ``meshes/frame_NNNNNN.{fmt}``
    of one result. Raises ``RenderError`` where headless EGL is missing."""
    from avi_jax.render import render_video, write_meshes
    vertices = LazyVertices(flame, result.motion)
    faces = np.asarray(flame.faces)
    if meshes:
        write_meshes(os.path.join(folder, "meshes"), vertices, faces, meshes)
    if render:
        render_video(os.path.join(folder, "render.mp4"), vertices, faces, audio, size=size)
