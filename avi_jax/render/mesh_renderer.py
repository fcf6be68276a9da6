"""Headless OpenGL rendering of a FLAME mesh sequence to RGB frames (moderngl on EGL).

One :class:`MeshRenderer` owns one EGL context (Mesa llvmpipe on a CPU-only machine, the NVIDIA driver
on a GPU one), a vertex buffer of interleaved positions and smooth normals, the triangle index buffer and
an off-screen framebuffer (4x MSAA where the driver offers it, resolved before read-back). Each frame is
one buffer upload, one draw call and one read-back; normals for a chunk of frames are computed together
in numpy (see ``normals.py``). Shading is Blinn-Phong with one light from the camera side, a neutral skin
colour and a dark background; back faces (e.g. inside the mouth) are lit as if facing the camera.

An EGL context is current in the thread that created it: use a renderer from that thread only. Environment:
``GLCONTEXT_DEVICE_INDEX`` picks the EGL device (GPU) on a multi-GPU machine; ``LP_NUM_THREADS`` caps
llvmpipe's rasteriser threads on a CPU one.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from avi_jax.errors import InputError, RenderError
from avi_jax.render import isolated, normals as normals_lib
from avi_jax.render.camera import Camera

# Debian/Ubuntu packages that give glcontext's EGL backend libEGL.so.1 (libegl1, which pulls in Mesa's
# EGL vendor library libegl-mesa0), libGL.so.1 (libgl1) and Mesa's software/hardware drivers.
EGL_PACKAGES = "libegl1 libgl1 libgl1-mesa-dri"

SKIN = (0.80, 0.71, 0.66)          # RGB in [0, 1] (written to the frame as is, no gamma)
BACKGROUND = (0.09, 0.09, 0.11)
LIGHT_DIRECTION = (-0.35, 0.45, 1.0)  # eye space, towards the light: from the camera, a little up-left

_VERTEX_SHADER = """
#version 330
uniform mat4 view;        // world -> eye (rigid)
uniform mat4 projection;  // eye -> clip
in vec3 in_position;
in vec3 in_normal;
out vec3 v_position;      // eye space
out vec3 v_normal;        // eye space
void main() {
    vec4 p = view * vec4(in_position, 1.0);
    v_position = p.xyz;
    v_normal = mat3(view) * in_normal;
    gl_Position = projection * p;
}
"""

_FRAGMENT_SHADER = """
#version 330
uniform vec3 color;
uniform vec3 light_direction;  // eye space, towards the light
uniform float ambient;
uniform float specular;
uniform float shininess;
in vec3 v_position;
in vec3 v_normal;
out vec4 f_color;
void main() {
    vec3 n = normalize(v_normal);
    if (!gl_FrontFacing) n = -n;
    vec3 l = normalize(light_direction);
    vec3 v = normalize(-v_position);
    float diffuse = max(dot(n, l), 0.0);
    float highlight = specular * pow(max(dot(n, normalize(l + v)), 0.0), shininess);
    vec3 c = color * (ambient + (1.0 - ambient) * diffuse) + vec3(highlight);
    f_color = vec4(clamp(c, 0.0, 1.0), 1.0);
}
"""


def _image_size(size) -> tuple[int, int]:
    """``size`` (int or (width, height)) -> (width, height) in pixels; InputError if not 1..16384."""
    try:
        width, height = (size, size) if np.isscalar(size) else tuple(size)
        ok = all(int(x) == x and 1 <= x <= 16384 for x in (width, height))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"render size must be a pixel count or (width, height) in 1..16384, got {size!r}")
    return int(width), int(height)


class MeshRenderer:
    """Renders frames of one triangle mesh whose vertices move (a FLAME sequence).

    Where TensorFlow is loaded in the process, the GL work runs in a spawned child process
    (:mod:`avi_jax.render.isolated`: Mesa's llvmpipe crashes beside TensorFlow); the API is the same.

    Use as a context manager (or call :meth:`close`) so the EGL context is released::

        with MeshRenderer(faces, size=512) as renderer:
            frames = renderer.render(vertices)          # (T, 512, 512, 3) uint8

    Args:
      faces: (F, 3) integer vertex indices (FLAME: 9976 triangles over 5023 vertices), counter-clockwise
        seen from outside.
      size: image size in pixels, an int (square) or (width, height).
      camera: a :class:`Camera`; None frames the first rendered frame's bounding box from the front
        (:meth:`Camera.framing`) and keeps that camera for every later frame and call.
      samples: MSAA samples (anti-aliasing); clipped to what the driver offers, 0 or 1 for none.
      color, background: RGB in [0, 1] of the mesh and of the background.

    Raises:
      RenderError: no headless OpenGL 3.3 via EGL on this machine (the message names the packages to
        install; ``--no-render`` skips rendering).
      InputError: bad ``faces``, ``size`` or colours.
    """

    def __init__(self, faces, *, size=512, camera: Camera | None = None, samples: int = 4,
                 color=SKIN, background=BACKGROUND):
        self._child = None
        if isolated.needs_isolation():      # TensorFlow is loaded here: render in a child process
            self.width, self.height = _image_size(size)
            self._child = isolated.ChildRenderer(faces, size=size, camera=camera, samples=samples,
                                                 color=color, background=background)
            self.samples, self.renderer_name = self._child.info["samples"], self._child.info["renderer_name"]
            self.ctx = None
            return
        self.faces = normals_lib.check_faces(faces)
        self.width, self.height = _image_size(size)
        self.camera = camera
        self.color = self._rgb(color, "color")
        self.background = self._rgb(background, "background")
        self._incidence = None
        self._n_vertices = 0
        self._vbo = self._vao = None
        self._camera_set = False
        self.ctx = _create_context()
        try:
            self._setup(samples)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _rgb(value, name: str) -> tuple[float, float, float]:
        rgb = np.asarray(value, np.float64)
        if rgb.shape != (3,) or not np.isfinite(rgb).all() or rgb.min() < 0 or rgb.max() > 1:
            raise InputError(f"MeshRenderer: {name} must be 3 floats in [0, 1], got {value!r}")
        return tuple(map(float, rgb))

    def _setup(self, samples: int) -> None:
        import moderngl

        ctx = self.ctx
        self.renderer_name = ctx.info.get("GL_RENDERER", "unknown")
        self._program = ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
        self._program["color"].value = self.color
        self._program["light_direction"].value = LIGHT_DIRECTION
        self._program["ambient"].value = 0.28
        self._program["specular"].value = 0.12
        self._program["shininess"].value = 24.0
        self._ibo = ctx.buffer(self.faces.tobytes())
        size = (self.width, self.height)
        self._resolve = ctx.framebuffer(color_attachments=[ctx.renderbuffer(size, 4)],
                                        depth_attachment=ctx.depth_renderbuffer(size))
        self._msaa = None
        self.samples = min(int(samples), int(ctx.max_samples)) if samples > 1 else 0
        if self.samples > 1:
            try:
                self._msaa = ctx.framebuffer(
                    color_attachments=[ctx.renderbuffer(size, 4, samples=self.samples)],
                    depth_attachment=ctx.depth_renderbuffer(size, samples=self.samples))
            except moderngl.Error:   # the driver refused multisampling: render without it
                self._msaa, self.samples = None, 0
        ctx.enable(moderngl.DEPTH_TEST)
        # The projection flips clip-space y so that GL's bottom-up read-back is a top-down image; that
        # mirrors the winding on screen, so counter-clockwise-from-outside triangles appear clockwise.
        ctx.front_face = "cw"

    def _ensure_buffers(self, n_vertices: int) -> None:
        if n_vertices == self._n_vertices:
            return
        self.faces = normals_lib.check_faces(self.faces, n_vertices, where="MeshRenderer faces")
        for obj in (self._vao, self._vbo):
            if obj is not None:
                obj.release()
        self._vbo = self.ctx.buffer(reserve=n_vertices * 6 * 4)
        self._vao = self.ctx.vertex_array(self._program, [(self._vbo, "3f 3f", "in_position", "in_normal")],
                                          index_buffer=self._ibo, index_element_size=4)
        self._incidence = normals_lib.incidence_matrix(self.faces, n_vertices)
        self._n_vertices = n_vertices

    def _set_camera(self, first_frame: np.ndarray) -> None:
        aspect = self.width / self.height
        if self.camera is None:
            self.camera = Camera.framing(first_frame, aspect=aspect)
        flip_y = np.diag([1.0, -1.0, 1.0, 1.0])
        projection = flip_y @ self.camera.projection_matrix(aspect)
        # GLSL matrices are column-major: the bytes of M.T (row-major) are M column by column.
        self._program["view"].write(self.camera.view_matrix().T.astype(np.float32).tobytes())
        self._program["projection"].write(projection.T.astype(np.float32).tobytes())
        self._camera_set = True

    def render(self, vertices) -> np.ndarray:
        """Renders a chunk of frames.

        Args:
          vertices: (T, V, 3) float32 positions in metres (FLAME: +y up, +z towards the viewer), or one
            (V, 3) frame.

        Returns:
          (T, H, W, 3) uint8 RGB images, rows top to bottom ((H, W, 3) for a (V, 3) input), where
          (W, H) = ``size``.

        Raises:
          InputError: wrong shape, NaN/inf, or a face index >= V.
          RenderError: the renderer was closed.
        """
        if self._child is not None:
            return self._child.render(vertices)
        if self.ctx is None:
            raise RenderError("MeshRenderer.render: the renderer is closed")
        single = np.ndim(vertices) == 2
        v = normals_lib.check_vertices(vertices)
        self._ensure_buffers(v.shape[1])
        if not self._camera_set:
            self._set_camera(v[0])
        interleaved = np.concatenate([v, normals_lib.vertex_normals(v, self.faces, self._incidence)], axis=-1)
        frames = np.empty((v.shape[0], self.height, self.width, 3), np.uint8)
        target = self._msaa if self._msaa is not None else self._resolve
        for t in range(v.shape[0]):
            self._vbo.write(interleaved[t])
            target.use()
            target.clear(*self.background, 1.0, depth=1.0)
            self._vao.render()                                 # one draw call: all triangles
            if self._msaa is not None:
                self.ctx.copy_framebuffer(self._resolve, self._msaa)
            self._resolve.read_into(frames[t], components=3, alignment=1)
        return frames[0] if single else frames

    def frames(self, vertices, *, chunk: int = 32) -> Iterator[np.ndarray]:
        """Yields the (H, W, 3) uint8 frame of each of ``vertices``' T frames, rendering ``chunk`` at a time.

        ``vertices`` is sliced per chunk, so it may be a memory-mapped or device array of a long sequence:
        memory stays bounded by ``chunk`` frames. Errors as in :meth:`render`.
        """
        shape = np.shape(vertices)
        if len(shape) != 3 or shape[2] != 3:
            raise InputError(f"vertices: must be (T, V, 3) positions in metres, got shape {shape}")
        if chunk < 1:
            raise InputError(f"chunk must be >= 1, got {chunk}")
        for start in range(0, shape[0], chunk):
            yield from self.render(vertices[start:start + chunk])

    def close(self) -> None:
        """Releases the GL objects and the EGL context (idempotent)."""
        if self._child is not None:
            self._child.close()
        if getattr(self, "ctx", None) is None:
            return
        for name in ("_vao", "_vbo", "_ibo", "_msaa", "_resolve", "_program"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.release()
                setattr(self, name, None)
        self.ctx.release()
        self.ctx = None

    def __enter__(self) -> "MeshRenderer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _create_context():
    """A standalone OpenGL >= 3.3 core context on EGL, or a one-line :class:`RenderError`."""
    try:
        import moderngl
    except ImportError as e:
        raise RenderError(f"rendering needs the Python package moderngl ({e}): "
                          "pip install 'moderngl>=5.10,<6'; --no-render skips rendering") from e
    try:
        return moderngl.create_context(standalone=True, backend="egl", require=330)
    except Exception as e:   # glcontext raises plain Exceptions (library not found, no display/device)
        reason = " ".join(str(e).split()) or type(e).__name__
        raise RenderError(
            f"cannot create a headless OpenGL 3.3 context through EGL ({reason}); install EGL and Mesa's "
            f"drivers (Debian/Ubuntu: apt-get install {EGL_PACKAGES}; with an NVIDIA GPU its driver's EGL "
            f"library), or pass --no-render to skip rendering") from e


def render_frames(vertices, faces, *, size=512, camera: Camera | None = None, chunk: int = 32,
                  **options) -> Iterable[np.ndarray]:
    """Renders a FLAME vertex sequence to RGB frames, lazily.

    Args:
      vertices: (T, V, 3) float32 positions in metres (FLAME convention: +y up, +z towards the viewer).
      faces: (F, 3) integer triangle vertex indices.
      size: pixels, int (square) or (width, height).
      camera: a :class:`Camera`; None frames the first frame's bounding box from the front.
      chunk: frames rendered together (memory is bounded by ``chunk`` frames).
      **options: ``samples``, ``color``, ``background`` of :class:`MeshRenderer`.

    Returns:
      An iterator over T (H, W, 3) uint8 frames. The EGL context is created when iteration starts and
      released when it ends (or the iterator is closed); ``np.stack(list(...))`` gives (T, H, W, 3).

    Raises:
      InputError: bad shapes or values (shapes at call time; values as their chunk is rendered).
      RenderError: no headless OpenGL via EGL (when iteration starts).
    """
    shape = np.shape(vertices)
    if len(shape) != 3 or shape[2] != 3:
        raise InputError(f"vertices: must be (T, V, 3) positions in metres, got shape {shape}")
    faces = normals_lib.check_faces(faces, shape[1])
    _image_size(size)

    def generate():
        with MeshRenderer(faces, size=size, camera=camera, **options) as renderer:
            yield from renderer.frames(vertices, chunk=chunk)

    return generate()
