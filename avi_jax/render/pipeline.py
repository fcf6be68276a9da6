"""vertices + speech -> ``render.mp4``: the mesh renderer streamed into the video writer."""
from __future__ import annotations

import numpy as np

from avi_jax.data import schema
from avi_jax.errors import InputError
from avi_jax.render import normals as normals_lib
from avi_jax.render.camera import Camera
from avi_jax.render.mesh_renderer import MeshRenderer
from avi_jax.render.video import write_video


def render_video(path: str, vertices, faces, audio, *, size=512, fps: int = schema.FPS,
                 sample_rate: int = schema.SAMPLE_RATE, camera: Camera | None = None, chunk: int = 32,
                 **options) -> int:
    """Renders a FLAME vertex sequence and writes it with the speech as an MP4 (H.264 + AAC).

    Frames are rendered ``chunk`` at a time and encoded as they are made, so memory stays bounded for
    long sequences (``vertices`` may be a memory-mapped array).

    Args:
      path: the output ``.mp4``, written atomically (see :func:`write_video`).
      vertices: (T, V, 3) float32 positions in metres (FLAME convention: +y up, +z towards the viewer),
        one row per video frame.
      faces: (F, 3) integer triangle vertex indices.
      audio: (N,) float32 mono waveform in [-1, 1] at ``sample_rate`` Hz, or None for a silent video; it
        is padded with silence or trimmed to T / fps seconds.
      size: pixels, an int (square) or (width, height); odd sizes are padded to even for yuv420p.
      fps: frames per second of ``vertices`` and of the video (25).
      sample_rate: Hz of ``audio`` (16000).
      camera: a :class:`Camera`; None frames the first frame's bounding box from the front.
      chunk: frames rendered per batch.
      **options: ``samples``, ``color``, ``background`` of :class:`MeshRenderer`.

    Returns:
      T, the number of frames written.

    Raises:
      InputError: bad shapes or values (nothing is written).
      RenderError: no headless OpenGL via EGL (raised before any file is created; ``--no-render`` skips).
    """
    shape = np.shape(vertices)
    if len(shape) != 3 or shape[2] != 3 or shape[0] == 0:
        raise InputError(f"{path}: vertices must be (T, V, 3) positions in metres with T > 0, "
                         f"got shape {shape}")
    faces = normals_lib.check_faces(faces, shape[1], where=f"{path}: faces")
    with MeshRenderer(faces, size=size, camera=camera, **options) as renderer:
        return write_video(path, renderer.frames(vertices, chunk=chunk), fps=fps, audio=audio,
                           sample_rate=sample_rate)
