"""The mesh renderer in a spawned child process, for processes where TensorFlow is loaded.

Mesa's llvmpipe (the software OpenGL driver of a CPU machine) crashes inside its draw calls when
TensorFlow is loaded in the same process (both carry LLVM and TensorFlow's symbols win). TensorFlow
arrives with clu's TensorBoard writer, i.e. in any process that trained (a notebook, the test suite).
:class:`avi_jax.render.MeshRenderer` then hands its work to a :class:`ChildRenderer`: a child started with
``spawn`` (which never imports TensorFlow) renders the frames that the parent streams to it a chunk at a
time, and sends the images back; errors come back as the same project error types.
"""
from __future__ import annotations

import multiprocessing
import sys
from typing import Any

import numpy as np


def needs_isolation() -> bool:
    """True when rendering in this process would share it with TensorFlow."""
    return "tensorflow" in sys.modules


def _serve(conn, faces: np.ndarray, options: dict) -> None:
    from avi_jax.render.mesh_renderer import MeshRenderer
    try:
        renderer = MeshRenderer(faces, **options)
    except Exception as e:           # sent back and raised again in the parent
        conn.send(("error", type(e).__name__, str(e)))
        return
    conn.send(("ok", {"samples": renderer.samples, "renderer_name": renderer.renderer_name}))
    with renderer:
        while (vertices := conn.recv()) is not None:
            try:
                conn.send(("ok", renderer.render(vertices)))
            except Exception as e:
                conn.send(("error", type(e).__name__, str(e)))


class ChildRenderer:
    """``render(vertices) -> frames`` by a :class:`MeshRenderer` in a spawned child process (same
    arguments, results and errors)."""

    def __init__(self, faces: np.ndarray, **options: Any):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child, np.asarray(faces), options), daemon=True)
        self._process.start()
        child.close()
        try:
            self.info = self._reply()     # {'samples', 'renderer_name'} of the child's renderer
        except Exception:
            self.close()
            raise

    def _reply(self) -> Any:
        from avi_jax import errors
        try:
            reply = self._conn.recv()
        except (EOFError, ConnectionResetError):
            self.close()
            raise errors.RenderError(f"the renderer process died (exit code {self._process.exitcode})") from None
        if reply[0] == "ok":
            return reply[1]
        kind = getattr(errors, reply[1], None)
        if not (isinstance(kind, type) and issubclass(kind, errors.AviJaxError)):
            kind = errors.RenderError
        raise kind(reply[2])

    def render(self, vertices) -> np.ndarray:
        if self._conn is None:
            from avi_jax.errors import RenderError
            raise RenderError("MeshRenderer.render: the renderer is closed")
        self._conn.send(np.asarray(vertices))
        return self._reply()

    def close(self) -> None:
        if self._conn is None:
            return
        try:
            self._conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self._conn.close()
        self._conn = None
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)
