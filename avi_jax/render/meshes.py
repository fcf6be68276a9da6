"""Per-frame mesh export: one ``frame_000000.obj`` (or ``.ply``) per frame, through trimesh."""
from __future__ import annotations

import contextlib
import os

import numpy as np

from avi_jax.errors import InputError
from avi_jax.render import normals as normals_lib

FORMATS = ("obj", "ply")


def mesh_filename(index: int, fmt: str = "obj") -> str:
    """The file name of frame ``index``: ``frame_000000.obj``."""
    return f"frame_{index:06d}.{fmt}"


def write_meshes(folder: str, vertices, faces, fmt: str = "obj") -> list[str]:
    """Writes each frame of a vertex sequence as a mesh file.

    Args:
      folder: created if missing; receives ``frame_000000.<fmt>``, ``frame_000001.<fmt>``, ... (an
        existing file of the same name is replaced).
      vertices: (T, V, 3) float positions in metres (FLAME: 5023 vertices); a (V, 3) frame is T = 1.
        Written as float32 (OBJ as text, PLY as binary little-endian).
      faces: (F, 3) integer triangle vertex indices (written unchanged: ``process=False``).
      fmt: ``'obj'`` or ``'ply'``.

    Returns:
      The T paths written, in frame order. Each file is written to a temporary name and renamed, so a
      file under its final name is complete.

    Raises:
      InputError: unknown ``fmt``, bad shapes, NaN/inf, or a face index >= V.
    """
    import trimesh

    if fmt not in FORMATS:
        raise InputError(f"{folder}: mesh format must be one of {FORMATS}, got {fmt!r}")
    if np.ndim(vertices) == 2:
        vertices = np.asarray(vertices)[None]
    shape = np.shape(vertices)
    if len(shape) != 3 or shape[2] != 3 or shape[0] == 0 or shape[1] == 0:
        raise InputError(f"{folder}: vertices must be (T, V, 3) positions in metres, got shape {shape}")
    faces = normals_lib.check_faces(faces, shape[1], where=f"{folder}: faces")
    for start in range(0, shape[0], 256):   # reject bad values before writing any file
        normals_lib.check_vertices(vertices[start:start + 256],
                                   where=f"{folder}: vertices from frame {start}")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for index in range(shape[0]):      # one frame at a time: a long (memory-mapped) sequence is not copied
        frame = normals_lib.check_vertices(vertices[index], where=f"{folder}: vertices frame {index}")[0]
        mesh = trimesh.Trimesh(vertices=frame, faces=faces, process=False)
        data = mesh.export(file_type=fmt)
        path = os.path.join(folder, mesh_filename(index, fmt))
        tmp = path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        paths.append(path)
    return paths
