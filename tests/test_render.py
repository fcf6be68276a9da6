"""avi_jax.render: headless GL frames, the H.264 + AAC writer, per-frame meshes, and their errors.

A procedural icosphere (0.1 m across, like a small head) stands in for FLAME. GL tests skip where EGL is
missing; here they run on Mesa llvmpipe.
"""
import os

import numpy as np
import pytest

from avi_jax.errors import AviJaxError, InputError, RenderError
from avi_jax.render import Camera, MeshRenderer, render_frames, render_video, write_meshes, write_video
from avi_jax.render import isolated
from avi_jax.render.normals import vertex_normals

SIZE = 96
FPS = 25
SR = 16_000


def _sphere(subdivisions=2):
    import trimesh
    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.05)
    return np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces, np.int32)


def _moving(n_frames, step=(0.01, 0.0, 0.0)):
    """(T, V, 3): the sphere translated by ``step`` metres per frame."""
    v, f = _sphere()
    shifts = np.arange(n_frames, dtype=np.float32)[:, None, None] * np.asarray(step, np.float32)
    return v[None] + shifts, f


@pytest.fixture(scope="module")
def egl():
    try:
        MeshRenderer(_sphere()[1], size=8).close()
    except RenderError as e:
        pytest.skip(f"no headless OpenGL through EGL here: {e}")


def _foreground(frame):
    """bool (H, W): pixels that differ from the (corner) background."""
    return np.abs(frame.astype(int) - frame[0, 0].astype(int)).max(axis=-1) > 12


def _centroid(frame):
    rows, cols = np.nonzero(_foreground(frame))
    return rows.mean(), cols.mean()


def test_render_frames_visible_centred_and_moving(egl):
    vertices, faces = _moving(4)
    frames = np.stack(list(render_frames(vertices, faces, size=SIZE, chunk=3)))
    assert frames.shape == (4, SIZE, SIZE, 3) and frames.dtype == np.uint8
    # the background is uniform and dark; the mesh covers a good part of the auto-framed image
    assert (frames[:, 0, 0] == frames[0, 0, 0]).all() and frames[0, 0, 0].max() < 60
    fg = _foreground(frames[0])
    assert 0.2 < fg.mean() < 0.8
    assert frames[0][fg].mean() > 100      # lit
    row, col = _centroid(frames[0])        # the first frame is framed centred
    assert abs(row - SIZE / 2) < 3 and abs(col - SIZE / 2) < 3
    # +x moves right in the image; the camera stays where the first frame put it
    cols = [_centroid(f)[1] for f in frames]
    assert all(b > a + 1 for a, b in zip(cols, cols[1:]))
    assert not np.array_equal(frames[0], frames[1])


def test_camera_override_up_is_up_and_non_square(egl):
    vertices, faces = _moving(2, step=(0.0, 0.03, 0.0))
    camera = Camera(eye=(0.0, 0.0, 0.6), target=(0.0, 0.0, 0.0), fov_y=25.0)
    with MeshRenderer(faces, size=(SIZE, 64), camera=camera, samples=0) as renderer:
        assert renderer.samples == 0
        frames = renderer.render(vertices)
        single = renderer.render(vertices[0])
    assert frames.shape == (2, 64, SIZE, 3) and single.shape == (64, SIZE, 3)
    np.testing.assert_array_equal(single, frames[0])
    (r0, c0), (r1, _) = _centroid(frames[0]), _centroid(frames[1])
    assert abs(r0 - 32) < 3 and abs(c0 - SIZE / 2) < 3
    assert r1 < r0 - 3                     # +y (FLAME up) is up in the image


def test_render_errors(egl):
    vertices, faces = _moving(2)
    with pytest.raises(InputError, match="outside"):
        render_frames(vertices, faces + vertices.shape[1])
    bad = vertices.copy()
    bad[1, 3, 0] = np.nan
    with MeshRenderer(faces, size=16) as renderer:
        with pytest.raises(InputError, match="NaN"):
            renderer.render(bad)
    with pytest.raises(RenderError, match="closed"):
        renderer.render(vertices)


def test_render_error_names_packages_when_egl_is_missing(monkeypatch):
    import moderngl

    def no_egl(*args, **kwargs):
        raise Exception("(detect) eglGetDisplay failed\nlibEGL.so.1: cannot open shared object file")

    monkeypatch.setattr(moderngl, "create_context", no_egl)
    monkeypatch.setattr(isolated, "needs_isolation", lambda: False)   # this process's moderngl
    with pytest.raises(RenderError) as info:
        MeshRenderer(_sphere()[1])
    message = str(info.value)
    assert isinstance(info.value, AviJaxError) and "\n" not in message
    assert "apt-get install libegl1" in message and "libgl1-mesa-dri" in message and "--no-render" in message


def test_vertex_normals_of_a_sphere_point_outwards():
    v, f = _sphere(3)
    n = vertex_normals(v[None], f)[0]
    np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-5)
    assert (np.sum(n * v / np.linalg.norm(v, axis=-1, keepdims=True), axis=-1) > 0.99).all()


def _probe(path):
    import av
    with av.open(path) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        info = {"codec": video.codec_context.name, "pix_fmt": video.codec_context.pix_fmt,
                "size": (video.codec_context.width, video.codec_context.height),
                "audio_codec": audio.codec_context.name if audio else None,
                "audio_seconds": float(audio.duration * audio.time_base) if audio else None,
                "audio_rate": audio.sample_rate if audio else None}
        info["frames"] = sum(1 for _ in container.decode(video=0))
    return info


@pytest.mark.parametrize("audio_seconds", [0.3, 0.9])     # shorter (padded) and longer (trimmed)
def test_write_video_round_trip(tmp_path, audio_seconds):
    n_frames = 13
    rng = np.random.default_rng(0)
    frames = (rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(n_frames))
    t = np.arange(int(audio_seconds * SR)) / SR
    audio = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    path = str(tmp_path / "out" / "render.mp4")
    assert write_video(path, frames, fps=FPS, audio=audio, sample_rate=SR) == n_frames
    info = _probe(path)
    assert info["frames"] == n_frames and info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert info["size"] == (64, 48)
    assert info["audio_codec"] == "aac" and info["audio_rate"] == SR
    assert abs(info["audio_seconds"] - n_frames / FPS) < 1 / FPS
    assert os.listdir(tmp_path / "out") == ["render.mp4"]


def test_write_video_odd_size_chunks_and_no_audio(tmp_path):
    chunks = [np.full((3, 33, 35, 3), 90, np.uint8), np.full((2, 33, 35, 3), 200, np.uint8)]
    path = str(tmp_path / "silent.mp4")
    assert write_video(path, iter(chunks)) == 5
    info = _probe(path)
    assert info["frames"] == 5 and info["size"] == (36, 34) and info["audio_codec"] is None


def test_write_video_leaves_nothing_when_frames_fail(tmp_path):
    def frames():
        for _ in range(3):
            yield np.zeros((32, 32, 3), np.uint8)
        raise RuntimeError("renderer died")

    path = str(tmp_path / "render.mp4")
    with pytest.raises(RuntimeError, match="renderer died"):
        write_video(path, frames(), audio=np.zeros(SR, np.float32))
    assert os.listdir(tmp_path) == []
    with pytest.raises(InputError, match="no frames"):
        write_video(path, iter([]))
    with pytest.raises(InputError, match="uint8"):
        write_video(path, [np.zeros((32, 32, 3), np.float32)])
    assert os.listdir(tmp_path) == []


def test_render_video(tmp_path, egl):
    vertices, faces = _moving(6)
    path = str(tmp_path / "render.mp4")
    audio = np.zeros(3 * 640, np.float32)
    assert render_video(path, vertices, faces, audio, size=64, chunk=4) == 6
    info = _probe(path)
    assert info["frames"] == 6 and info["size"] == (64, 64)
    assert abs(info["audio_seconds"] - 6 / FPS) < 1 / FPS


@pytest.mark.parametrize("fmt", ["obj", "ply"])
def test_write_meshes(tmp_path, fmt):
    import trimesh
    vertices, faces = _moving(3)
    paths = write_meshes(str(tmp_path / "meshes"), vertices, faces, fmt=fmt)
    assert [os.path.basename(p) for p in paths] == [f"frame_{i:06d}.{fmt}" for i in range(3)]
    assert sorted(os.listdir(tmp_path / "meshes")) == sorted(os.path.basename(p) for p in paths)
    for i, path in enumerate(paths):
        mesh = trimesh.load(path, process=False)
        assert mesh.vertices.shape == vertices[i].shape and mesh.faces.shape == faces.shape
        np.testing.assert_allclose(mesh.vertices, vertices[i], atol=1e-6)
        np.testing.assert_array_equal(mesh.faces, faces)


def test_write_meshes_rejects_bad_input_before_writing(tmp_path):
    vertices, faces = _moving(3)
    vertices[2, 0, 0] = np.inf
    with pytest.raises(InputError, match="NaN or inf"):
        write_meshes(str(tmp_path / "m"), vertices, faces)
    with pytest.raises(InputError, match="format"):
        write_meshes(str(tmp_path / "m"), vertices, faces, fmt="stl")
    assert not (tmp_path / "m").exists()


def test_renders_beside_tensorflow_in_a_child_process(egl, monkeypatch):
    """Mesa's llvmpipe crashes in a process that loaded TensorFlow; the renderer then works through a
    spawned child (forced here), with the same frames and errors."""
    v, faces = _sphere()
    frames = np.stack([v, v + np.float32([0.01, 0.0, 0.0])])
    with MeshRenderer(faces, size=SIZE) as renderer:
        direct = renderer.render(frames)
    monkeypatch.setattr(isolated, "needs_isolation", lambda: True)
    with MeshRenderer(faces, size=SIZE) as renderer:
        assert renderer._child is not None
        np.testing.assert_array_equal(renderer.render(frames), direct)
        with pytest.raises(InputError):
            renderer.render(frames[:, :5])
