"""Streaming MP4 writer: RGB frames -> H.264 (libx264, yuv420p) with the speech muxed in as AAC, through
PyAV (its wheel ships FFmpeg). The result plays in browsers and QuickTime (``render.mp4`` of ``python -m avi_jax.infer``).

Frames are encoded as they arrive (a 10-minute video is never held in memory); the audio samples that
belong to each frame are encoded next to it, and the audio is padded with silence or trimmed so that
its duration equals the video's. The file appears under its name only when complete.
"""
from __future__ import annotations

import contextlib
import fractions
import os
from typing import Iterable

import numpy as np

from avi_jax.data import schema
from avi_jax.errors import InputError

VIDEO_CODEC = "libx264"
PIXEL_FORMAT = "yuv420p"
AUDIO_CODEC = "aac"
AUDIO_BIT_RATE = 96_000   # bits/s, mono speech
X264_OPTIONS = {"crf": "18", "preset": "fast"}


def _audio_waveform(audio, path: str) -> np.ndarray:
    """float mono waveform (N,) float32 in [-1, 1]: int PCM is scaled, (N, C) channels are averaged."""
    a = np.asarray(audio)
    if a.dtype.kind in "iu":
        a = a.astype(np.float32) / float(np.iinfo(a.dtype).max)
    elif a.dtype.kind != "f":
        raise InputError(f"{path}: audio must be a float (or integer PCM) waveform, got dtype {a.dtype}")
    if a.ndim == 2 and a.shape[1] <= 8:
        a = a.mean(axis=1)            # downmix (N, C) to mono
    if a.ndim != 1:
        raise InputError(f"{path}: audio must be a mono (N,) or (N, C) waveform, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise InputError(f"{path}: audio contains NaN or inf")
    return np.clip(a, -1.0, 1.0).astype(np.float32)


def _frame_batches(frames: Iterable) -> Iterable[np.ndarray]:
    """Each item of ``frames`` ((H, W, 3) or (n, H, W, 3)) as an (n, H, W, 3) array."""
    for item in frames:
        batch = np.asarray(item)
        yield batch[None] if batch.ndim == 3 else batch


def _even(frame: np.ndarray) -> np.ndarray:
    """yuv420p needs even width and height: an odd one gets its last row/column repeated."""
    h, w = frame.shape[:2]
    if h % 2 or w % 2:
        frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return frame


def write_video(path: str, frames: Iterable, *, fps: int = schema.FPS, audio=None,
                sample_rate: int = schema.SAMPLE_RATE) -> int:
    """Encodes frames (and the speech) to an MP4 file, streaming.

    Args:
      path: the output ``.mp4``; its folder is created. Written to ``path + '.tmp.mp4'`` and renamed to
        ``path`` only when complete.
      frames: an iterable (e.g. a generator) of (H, W, 3) uint8 RGB frames, rows top to bottom, or of
        (n, H, W, 3) chunks; all the same size. An odd H or W is padded by one repeated row/column.
      fps: video frame rate, frames per second (the project's 25).
      audio: None (no audio stream), or the waveform: (N,) float32 mono in [-1, 1] (int PCM is scaled,
        (N, C) is downmixed) at ``sample_rate``. It is padded with silence or trimmed to the video's
        duration, T / fps seconds (T * 640 samples at 16 kHz and 25 fps).
      sample_rate: Hz of ``audio``.

    Returns:
      T, the number of video frames written.

    Raises:
      InputError: no frames, a frame that is not uint8 (H, W, 3) or differs in size from the first, bad
        ``audio``/``fps``/``sample_rate``. Any error (including one raised by the ``frames`` iterator)
        removes the temporary file and leaves no ``path`` behind; an existing ``path`` is kept.
    """
    import av

    fps = fractions.Fraction(fps).limit_denominator(1001)
    if fps <= 0 or int(sample_rate) != sample_rate or sample_rate <= 0:
        raise InputError(f"{path}: need fps > 0 and a positive integer sample_rate, got {fps}, {sample_rate}")
    sample_rate = int(sample_rate)
    wave = None if audio is None else _audio_waveform(audio, path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp.mp4"
    try:
        with av.open(tmp, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            n_frames = _encode(container, frames, fps, wave, sample_rate, path)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return n_frames


def _encode(container, frames: Iterable, fps: fractions.Fraction, wave: np.ndarray | None, sample_rate: int,
            path: str) -> int:
    """Adds the streams (sized by the first frame) and encodes everything; returns T."""
    import av

    video = audio = None
    shape = None
    n_frames = 0
    sample_time_base = fractions.Fraction(1, sample_rate)

    def samples_before(frame_index: int) -> int:     # audio samples in the first ``frame_index`` frames
        return int(frame_index * sample_rate / fps)

    for batch in _frame_batches(frames):
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise InputError(f"{path}: frames must be (H, W, 3) uint8 RGB, "
                             f"got {batch.dtype} {batch.shape[1:]}")
        if video is None:
            shape = batch.shape[1:]
            h, w = shape[0] + shape[0] % 2, shape[1] + shape[1] % 2
            video = container.add_stream(VIDEO_CODEC, rate=fps)
            video.width, video.height, video.pix_fmt = w, h, PIXEL_FORMAT
            video.options = dict(X264_OPTIONS)
            if wave is not None:
                audio = container.add_stream(AUDIO_CODEC, rate=sample_rate, layout="mono")
                audio.bit_rate = AUDIO_BIT_RATE
        elif batch.shape[1:] != shape:
            raise InputError(f"{path}: frame {n_frames} is {batch.shape[1:]}, the first frame was {shape}")
        for image in batch:
            frame = av.VideoFrame.from_ndarray(_even(np.ascontiguousarray(image)), format="rgb24")
            frame.pts, frame.time_base = n_frames, 1 / fps
            container.mux(video.encode(frame))
            if audio is not None:
                start, stop = samples_before(n_frames), samples_before(n_frames + 1)
                chunk = np.zeros((1, stop - start), np.float32)
                piece = wave[start:stop]
                chunk[0, :piece.shape[0]] = piece        # silence past the end of the speech
                aframe = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                aframe.sample_rate, aframe.pts, aframe.time_base = sample_rate, start, sample_time_base
                container.mux(audio.encode(aframe))
            n_frames += 1
    if video is None:
        raise InputError(f"{path}: no frames to write")
    container.mux(video.encode(None))
    if audio is not None:
        container.mux(audio.encode(None))
    return n_frames
