"""avi_jax.render: FLAME vertices -> shaded frames (moderngl on headless EGL) -> ``render.mp4`` (H.264 +
AAC speech), and per-frame mesh files.

The GL and video libraries are imported when first used, so ``import avi_jax.render`` is cheap and works
where EGL is missing (rendering then raises :class:`avi_jax.errors.RenderError`).
"""
from avi_jax.render.camera import Camera
from avi_jax.render.mesh_renderer import MeshRenderer, render_frames
from avi_jax.render.meshes import write_meshes
from avi_jax.render.pipeline import render_video
from avi_jax.render.video import write_video

__all__ = ["Camera", "MeshRenderer", "render_frames", "render_video", "write_meshes", "write_video"]
