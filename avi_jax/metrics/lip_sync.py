"""LSE-D and LSE-C: lip-sync error of a rendered talking face, scored by SyncNet.

The metrics of Wav2Lip (Prajwal et al., ACM MM 2020), used by the paper's Table 1, computed as
syncnet_python computes them (``SyncNetInstance.evaluate``, ``run_pipeline.crop_video``):

1. **Audio.** The 16 kHz waveform as 16-bit PCM values (the reference reads ``pcm_s16le`` with
   ``scipy.io.wavfile``: integers in [-32768, 32767], not [-1, 1]) -> 13 MFCCs at 100 Hz with
   python_speech_features' defaults (:func:`mfcc`, a re-implementation tested against that package).
2. **Video.** 25 fps frames -> 224 x 224 face crops, BGR pixel values 0..255 (cv2's channel order),
   unnormalised (:func:`crop_faces`).
3. **Windows.** With ``L = min(frames, floor(samples / 640))``, window ``i`` in ``0 .. L - 6`` (the
   reference stops at ``L - 5``) is video frames ``i .. i+4`` and MFCC frames ``4i .. 4i+19`` (0.2 s each);
   each is embedded by :class:`avi_jax.models.syncnet.SyncNet`.
4. **Offsets.** For every video window ``i`` and offset ``j`` in ``-vshift .. vshift`` (vshift = 15
   frames), the distance ``|| v_i - a_{i+j} + 1e-6 ||_2`` (``torch.nn.functional.pairwise_distance``),
   where audio embeddings outside the clip are zeros (the reference pads them so);
   ``mdist[j]`` = the mean over ``i``.
5. **Scores.** LSE-D = ``min_j mdist[j]``, LSE-C = ``median_j mdist[j] - min_j mdist[j]``, AV offset =
   ``-argmin_j`` in frames (positive: the audio leads); per clip, then averaged over clips.

**Departure from the reference: the crop.** syncnet_python finds the face with the S3FD detector, tracks
it, median-filters the box centre and half-size ``s`` over 13 frames, and crops rows ``y - s .. y + 1.8 s``
and columns ``x - 1.4 s .. x + 1.4 s`` of the frame padded with grey (110), resized to 224 x 224. We render
the mesh ourselves, so the box comes from the projected lip vertices instead of a detector
(:func:`face_boxes_from_lips`): the face half-size is ``1.4 x`` the mouth width and the face centre sits
``0.4 s`` above the lips (typical proportions of a frontal S3FD box: the crop is centred on the lips, its
side 2.8 s, about 3.9 mouth widths); the median filter, padding, crop and resize are the reference's.
Not reproduced: the reference's lossy round trip of the crops through an XVID .avi and JPEG frames, and
cv2's 11-bit fixed-point interpolation weights (our bilinear resize is exact, then rounded).

**Short clips.** The reference keeps only face tracks of more than 100 frames (``--min_track 100``); a
clip of 100 frames or fewer is scored here and flagged (``short_clip``), never dropped. Clips need at
least 6 frames (one window).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft
import scipy.signal

from avi_jax.data import audio as audio_lib
from avi_jax.data.schema import SAMPLE_RATE, SAMPLES_PER_FRAME
from avi_jax.errors import InputError
from avi_jax.models import syncnet as syncnet_lib

VSHIFT = 15                 # frames searched either side (run_syncnet.py --vshift)
MIN_TRACK_FRAMES = 100      # run_pipeline.py --min_track: tracks need more frames than this
MFCC_PER_FRAME = 4          # 100 Hz MFCC frames per 25 fps video frame
PAIRWISE_EPS = 1e-6         # torch.nn.functional.pairwise_distance's eps
CROP_SCALE = 0.4            # run_pipeline.py --crop_scale
CROP_PAD_VALUE = 110        # grey padding of frames before cropping
BOX_MEDIAN_KERNEL = 13      # median filter (frames) of box centres and sizes
FACE_PER_MOUTH_WIDTH = 1.4  # face-box half-size / mouth width (our substitute for the detector)
# python_speech_features.mfcc defaults
_WIN, _STEP, _NFFT, _NFILT, _NCEP, _PREEMPH, _LIFTER = 400, 160, 512, 26, 13, 0.97, 22


# ----------------------------------------------------------------------------------------------- audio

def pcm16(audio: Any, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Speech as the 16-bit PCM values the reference reads: (N,) float64 integers in [-32768, 32767].

    Args:
      audio: (N,) or (N, C) waveform: float in [-1, 1] (converted as ffmpeg's ``pcm_s16le`` encoder does:
        ``round(x * 32768)``, clipped) or int16 (taken as is); any rate (resampled to 16 kHz, soxr HQ),
        channels averaged.
      sample_rate: Hz of ``audio``.

    Raises:
      InputError: empty, not 1-D/2-D, or non-finite audio.
    """
    a = np.asarray(audio)
    if a.ndim not in (1, 2) or a.size == 0:
        raise InputError(f"lip-sync audio must be a non-empty (N,) or (N, C) waveform, got shape {a.shape}")
    if a.dtype == np.int16:
        a = a.astype(np.float64) / 32768.0
    if not np.isfinite(a).all():
        raise InputError("lip-sync audio contains NaN or inf")
    a = audio_lib.resample(audio_lib.to_mono(a), int(sample_rate), SAMPLE_RATE).astype(np.float64)
    return np.clip(np.rint(a * 32768.0), -32768.0, 32767.0)


@functools.cache
def _mel_filterbank() -> np.ndarray:
    """(26, 257) triangular filters on FFT bins, python_speech_features' ``get_filterbanks`` layout:
    edges evenly spaced in mel (2595 log10(1 + f/700)) from 0 to 8 kHz, floored to bins of (NFFT+1)/rate."""
    mel = np.linspace(0.0, 2595.0 * np.log10(1.0 + (SAMPLE_RATE / 2) / 700.0), _NFILT + 2)
    edges = np.floor((_NFFT + 1) * 700.0 * (10.0 ** (mel / 2595.0) - 1.0) / SAMPLE_RATE)
    bins = np.arange(_NFFT // 2 + 1, dtype=np.float64)[None, :]
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        rising = np.where((bins >= lo) & (bins < mid), (bins - lo) / (mid - lo), 0.0)
        falling = np.where((bins >= mid) & (bins < hi), (hi - bins) / (hi - mid), 0.0)
    return rising + falling


def mfcc(pcm: np.ndarray) -> np.ndarray:
    """MFCCs of 16 kHz speech as ``python_speech_features.mfcc(pcm, 16000)`` computes them.

    25 ms rectangular windows every 10 ms (the last zero-padded; at least one), pre-emphasis 0.97, power
    spectrum ``|rfft_512|^2 / 512``, 26 mel filters, log, orthonormal DCT-II, first 13 kept, sinusoidal
    lifter 22, coefficient 0 replaced by the log frame energy (zeros floored to float64 eps).

    Args:
      pcm: (N,) samples at 16 kHz in the reference's scale (:func:`pcm16`).

    Returns:
      (F, 13) float64 with ``F = 1 + ceil((N - 400) / 160)`` (1 when N <= 400).
    """
    x = np.asarray(pcm, np.float64)
    x = np.append(x[0], x[1:] - _PREEMPH * x[:-1])
    n_frames = 1 if len(x) <= _WIN else 1 + math.ceil((len(x) - _WIN) / _STEP)
    x = np.concatenate([x, np.zeros((n_frames - 1) * _STEP + _WIN - len(x))])
    frames = x[np.arange(n_frames)[:, None] * _STEP + np.arange(_WIN)[None, :]]
    power = np.square(np.abs(np.fft.rfft(frames, _NFFT))) / _NFFT
    eps = np.finfo(np.float64).eps
    energy = np.sum(power, axis=1)
    energy = np.where(energy == 0, eps, energy)
    bands = power @ _mel_filterbank().T
    bands = np.where(bands == 0, eps, bands)
    cep = scipy.fft.dct(np.log(bands), type=2, axis=1, norm="ortho")[:, :_NCEP]
    cep = cep * (1.0 + (_LIFTER / 2.0) * np.sin(np.pi * np.arange(_NCEP) / _LIFTER))
    cep[:, 0] = np.log(energy)
    return cep


# ----------------------------------------------------------------------------------------------- video

def face_boxes_from_lips(lip_points: Any) -> np.ndarray:
    """Per-frame face boxes ``(x, y, s)`` (centre and half-size, pixels) from projected lip vertices.

    Our substitute for syncnet_python's S3FD detections (see the module docstring): ``s`` = 1.4 x the
    lips' horizontal extent, ``x`` = the lips' centre, ``y`` = the lips' centre minus ``0.4 s``; then,
    as ``run_pipeline.crop_video`` does, each of x, y, s median-filtered over 13 frames
    (``scipy.signal.medfilt``, zero-padded at the clip's ends like the reference).

    Args:
      lip_points: (T, L, 2) float pixel coordinates (column, row; rows top to bottom) of the lip vertices
        in each frame, e.g. :func:`project_to_pixels` of FLAME's ``lips`` region.

    Returns:
      (T, 3) float64 ``(x, y, s)``.

    Raises:
      InputError: not (T, L, 2) with T, L >= 1, non-finite, or lips of zero width.
    """
    p = np.asarray(lip_points, np.float64)
    if p.ndim != 3 or p.shape[2] != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise InputError(f"lip points must be (T, L, 2) pixel coordinates, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise InputError("lip points contain NaN or inf")
    lo, hi = p.min(axis=1), p.max(axis=1)
    width = hi[:, 0] - lo[:, 0]
    if (width <= 0).any():
        raise InputError(f"lip points of frame {int(np.argmin(width))} have zero width")
    s = FACE_PER_MOUTH_WIDTH * width
    centre = (lo + hi) / 2.0
    boxes = np.stack([centre[:, 0], centre[:, 1] - CROP_SCALE * s, s], axis=1)
    with warnings.catch_warnings():      # clips under 13 frames: zero-padded, as the reference's are
        warnings.simplefilter("ignore", UserWarning)
        return np.stack([scipy.signal.medfilt(boxes[:, k], BOX_MEDIAN_KERNEL) for k in range(3)], axis=1)


def project_to_pixels(vertices: Any, camera: Any, width: int, height: int) -> np.ndarray:
    """(..., V, 3) metres -> (..., V, 2) float64 pixel (column, row) positions, rows top to bottom, where the
    mesh renderer draws them (``avi_jax/render/mesh_renderer.py`` flips clip-space y for a top-down image).

    Args:
      vertices: positions in world units (metres), e.g. FLAME's ``lips`` vertices of each frame.
      camera: the render camera (``avi_jax.render.camera.Camera``: its view and projection matrices).
      width, height: the rendered image size in pixels.
    """
    v = np.asarray(vertices, np.float64)
    m = camera.projection_matrix(width / height) @ camera.view_matrix()
    clip = np.concatenate([v, np.ones(v.shape[:-1] + (1,))], -1) @ m.T
    ndc = clip[..., :2] / clip[..., 3:4]
    return np.stack([(ndc[..., 0] + 1.0) / 2.0 * width, (1.0 - ndc[..., 1]) / 2.0 * height], -1)


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps of cv2.resize INTER_LINEAR along one axis (half-pixel centres, no antialiasing, edges
    replicated): output ``i`` = ``(1 - frac) * in[lo] + frac * in[hi]``; returns (lo, hi, frac)."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    lo = np.floor(src)
    frac = src - lo
    lo = lo.astype(np.int64)
    return np.clip(lo, 0, n_in - 1), np.clip(lo + 1, 0, n_in - 1), frac


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """(h, w, C) float -> (size, size, C) float64, resampled with :func:`_linear_taps` along rows, then columns."""
    lo, hi, f = _linear_taps(image.shape[0], size)
    rows = image[lo] * (1.0 - f)[:, None, None] + image[hi] * f[:, None, None]
    lo, hi, f = _linear_taps(image.shape[1], size)
    return rows[:, lo] * (1.0 - f)[None, :, None] + rows[:, hi] * f[None, :, None]


def crop_faces(frames: Any, boxes: Any, size: int = syncnet_lib.CROP_SIZE) -> np.ndarray:
    """``run_pipeline.crop_video``'s crops: (T, H, W, 3) uint8 RGB frames -> (T, size, size, 3) uint8 BGR.

    Frame ``t`` is padded by ``int(1.8 s)`` grey (110) pixels, rows ``int(y - s) .. int(y + 1.8 s)`` and
    columns ``int(x - 1.4 s) .. int(x + 1.4 s)`` of the padded frame are cut (``int`` truncates, as the
    reference's does) and resized bilinearly to ``size`` x ``size``.

    Args:
      frames: (T, H, W, 3) uint8 RGB (the renderer's output).
      boxes: (T, 3) ``(x, y, s)`` pixel face boxes (:func:`face_boxes_from_lips`).

    Raises:
      InputError: wrong shapes or dtype, a box count that differs from the frame count, or a box of
        less than one pixel.
    """
    frames = np.asarray(frames)
    boxes = np.asarray(boxes, np.float64)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InputError(f"frames must be (T, H, W, 3) uint8 RGB, got {frames.dtype} {frames.shape}")
    if boxes.shape != (frames.shape[0], 3) or not np.isfinite(boxes).all() or (boxes[:, 2] < 0.5).any():
        raise InputError(f"face boxes must be ({frames.shape[0]}, 3) finite (x, y, s) with s >= 0.5 pixel, "
                         f"got shape {boxes.shape}")
    h, w = frames.shape[1:3]
    out = np.empty((frames.shape[0], size, size, 3), np.uint8)
    for t, (x, y, s) in enumerate(boxes):
        pad = int(s * (1 + 2 * CROP_SCALE))
        rows = np.arange(int(y + pad - s), int(y + pad + s * (1 + 2 * CROP_SCALE))) - pad
        cols = np.arange(int(x + pad - s * (1 + CROP_SCALE)), int(x + pad + s * (1 + CROP_SCALE))) - pad
        crop = np.full((len(rows), len(cols), 3), CROP_PAD_VALUE, np.float64)
        r_ok, c_ok = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
        crop[np.ix_(r_ok, c_ok)] = frames[t][np.ix_(rows[r_ok], cols[c_ok])][..., ::-1]
        out[t] = np.clip(np.rint(resize_bilinear(crop, size)), 0, 255).astype(np.uint8)
    return out


# ------------------------------------------------------------------------------------------- embeddings

@functools.cache
def _embedders(model: syncnet_lib.SyncNet):
    audio = jax.jit(lambda v, x: model.apply(v, x, method=syncnet_lib.SyncNet.embed_audio))
    lips = jax.jit(lambda v, x: model.apply(v, x.astype(jnp.float32), method=syncnet_lib.SyncNet.embed_lips))
    return audio, lips


def embed_windows(crops: np.ndarray, mfccs: np.ndarray, num_frames: int, variables: Any, *,
                  model: syncnet_lib.SyncNet | None = None, batch_size: int = 20
                  ) -> tuple[np.ndarray, np.ndarray]:
    """SyncNet embeddings of a clip's ``N = num_frames - 5`` video and audio windows.

    Args:
      crops: (T, 224, 224, 3) uint8 BGR face crops (:func:`crop_faces`), 25 fps.
      mfccs: (F, 13) MFCCs at 100 Hz (:func:`mfcc`).
      num_frames: the reference's ``min(T, floor(audio samples / 640))``.
      variables: SyncNet ``{'params', 'batch_stats'}`` (``avi_jax.checkpoints.syncnet.load_syncnet``).
      model: the module (default ``SyncNet()``).
      batch_size: windows per jitted call (the last batch is padded; results do not depend on it).

    Returns:
      (video, audio) embeddings, each (N, D) float32; window ``i`` = frames ``i .. i+4`` and MFCC frames
      ``4i .. 4i+19``.

    Raises:
      InputError: ``num_frames`` < 6, or more frames or MFCC windows than ``crops`` / ``mfccs`` hold.
    """
    model = model or syncnet_lib.SyncNet()
    n = num_frames - syncnet_lib.VIDEO_WINDOW
    if n < 1:
        raise InputError(f"a lip-sync clip needs at least {syncnet_lib.VIDEO_WINDOW + 1} frames of video and "
                         f"audio (25 fps, 640 samples a frame), got {num_frames}")
    if num_frames > len(crops) or (n - 1) * MFCC_PER_FRAME + syncnet_lib.AUDIO_WINDOW > len(mfccs):
        raise InputError(f"{num_frames} frames to score but only {len(crops)} crops and {len(mfccs)} MFCC frames")
    embed_audio, embed_lips = _embedders(model)
    video_out, audio_out = [], []
    for start in range(0, n, batch_size):
        idx = np.minimum(np.arange(start, start + batch_size), n - 1)     # pad the last batch
        frames = crops[idx[:, None] + np.arange(syncnet_lib.VIDEO_WINDOW)[None, :]]
        audio = mfccs[idx[:, None] * MFCC_PER_FRAME + np.arange(syncnet_lib.AUDIO_WINDOW)[None, :]]
        count = min(batch_size, n - start)
        video_out.append(np.asarray(embed_lips(variables, frames))[:count])
        audio_out.append(np.asarray(embed_audio(variables, audio.transpose(0, 2, 1).astype(np.float32)))[:count])
    return np.concatenate(video_out), np.concatenate(audio_out)


# -------------------------------------------------------------------------------------------- the score

def offset_distances(video: jax.Array, audio: jax.Array, vshift: int = VSHIFT) -> jax.Array:
    """``calc_pdist``: (N, 2 vshift + 1) float32 distances ``|| v_i - a_{i + j - vshift} + 1e-6 ||_2``.

    Args:
      video, audio: (N, D) embeddings of matching windows; audio windows outside ``0 .. N-1`` are zeros.
    """
    video, audio = jnp.asarray(video, jnp.float32), jnp.asarray(audio, jnp.float32)
    if video.ndim != 2 or video.shape != audio.shape:
        raise InputError(f"video and audio embeddings must be two (N, D) arrays of one shape, got "
                         f"{video.shape} and {audio.shape}")
    n, width = video.shape[0], 2 * vshift + 1
    padded = jnp.pad(audio, ((vshift, vshift), (0, 0)))
    shifted = padded[jnp.arange(n)[:, None] + jnp.arange(width)[None, :]]          # (N, W, D)
    return jnp.sqrt(jnp.sum(jnp.square(video[:, None, :] - shifted + PAIRWISE_EPS), axis=-1))


def scores_from_distances(distances: jax.Array, vshift: int = VSHIFT) -> tuple[float, float, int]:
    """(LSE-D, LSE-C, AV offset in frames) from (N, 2 vshift + 1) distances: ``mdist`` = mean over windows,
    LSE-D = ``min mdist``, LSE-C = ``median mdist - min mdist``, offset = ``vshift - argmin mdist`` (the
    first minimum)."""
    mdist = np.asarray(jnp.mean(jnp.asarray(distances, jnp.float32), axis=0))
    best = int(np.argmin(mdist))
    return float(mdist[best]), float(np.median(mdist) - mdist[best]), vshift - best


@dataclasses.dataclass(frozen=True)
class LipSyncScore:
    """One clip's lip-sync figures.

    Attributes:
      lse_d: LSE-D (mean SyncNet distance at the best offset; lower is better).
      lse_c: LSE-C (median minus minimum of the mean distances over offsets; higher is better).
      offset: the best AV offset in frames (25 fps); positive when the audio leads the video.
      num_frames: frames scored, ``min(video frames, floor(audio samples / 640))``.
      short_clip: ``num_frames <= 100``: syncnet_python's pipeline would have dropped the clip.
    """
    lse_d: float
    lse_c: float
    offset: int
    num_frames: int
    short_clip: bool


def lip_sync_score(frames: Any, audio: Any, variables: Any, *, lip_points: Any = None, face_boxes: Any = None,
                   sample_rate: int = SAMPLE_RATE, model: syncnet_lib.SyncNet | None = None,
                   vshift: int = VSHIFT, batch_size: int = 20) -> LipSyncScore:
    """LSE-D / LSE-C of one rendered clip (the module docstring gives the steps and the crop's departure).

    Args:
      frames: (T, H, W, 3) uint8 RGB frames at 25 fps (rows top to bottom, as the renderer writes them).
      audio: the clip's speech, (N,) or (N, C), float in [-1, 1] or int16, at ``sample_rate`` Hz.
      variables: SyncNet variables (``avi_jax.checkpoints.syncnet.load_syncnet('syncnet_v2.model')``).
      lip_points: (T, L, 2) pixel positions of the lip vertices per frame (:func:`project_to_pixels`), or
      face_boxes: (T, 3) ``(x, y, s)`` face boxes in pixels; exactly one of the two.
      sample_rate: Hz of ``audio`` (resampled to 16 kHz).
      model: the SyncNet module (default ``SyncNet()``).
      vshift: offsets searched either side, in frames.
      batch_size: windows per jitted SyncNet call.

    Raises:
      InputError: bad frames, audio, points or boxes; both or neither of ``lip_points`` / ``face_boxes``;
        fewer than 6 frames of video and audio.
    """
    if (lip_points is None) == (face_boxes is None):
        raise InputError("lip_sync_score needs exactly one of lip_points or face_boxes")
    boxes = face_boxes_from_lips(lip_points) if face_boxes is None else face_boxes
    pcm = pcm16(audio, sample_rate)
    crops = crop_faces(frames, boxes)
    num_frames = min(len(crops), len(pcm) // SAMPLES_PER_FRAME)
    video, speech = embed_windows(crops, mfcc(pcm), num_frames, variables, model=model, batch_size=batch_size)
    lse_d, lse_c, offset = scores_from_distances(offset_distances(video, speech, vshift), vshift)
    return LipSyncScore(lse_d, lse_c, offset, num_frames, num_frames <= MIN_TRACK_FRAMES)


def average_scores(scores: Sequence[LipSyncScore]) -> dict[str, Any]:
    """Mean LSE-D and LSE-C over clips (each clip weighted once, as the Wav2Lip evaluation averages them),
    with the clip count and the clips flagged short. Raises InputError for no clips."""
    if not scores:
        raise InputError("no clips to average lip-sync scores over")
    return {"lse_d": float(np.mean([s.lse_d for s in scores])),
            "lse_c": float(np.mean([s.lse_c for s in scores])),
            "clips": len(scores), "short_clips": sum(s.short_clip for s in scores),
            "min_track_frames": MIN_TRACK_FRAMES}


class LipSyncFrames:
    """A frame consumer of ``avi_jax.metrics.evaluate_video.render_clips``: scores every clip's prediction and
    reference renders (all frames, ``stride`` 1) with :func:`lip_sync_score`, the crop from the rendered lip
    vertices projected with the render camera; :meth:`result` is the report section with ``lse_d``,
    ``lse_c`` and the ground truth's ``gt_lse_d``, ``gt_lse_c`` (paper Table 1's GT row).

    Args:
      variables: SyncNet variables (``avi_jax.checkpoints.syncnet.load_syncnet``).
      audio: ``{clip_id: (N,) speech at 16 kHz}`` of the clips rendered.
      lip_vertices: (L,) int indices of the lip vertices (FLAME's ``lips`` region).
    """
    stride = 1

    def __init__(self, variables: Any, audio: dict[str, np.ndarray], lip_vertices: Any, *, batch_size: int = 20):
        self._variables, self._audio, self._batch_size = variables, audio, batch_size
        self._lips = np.asarray(lip_vertices, np.int64)
        self._model = syncnet_lib.SyncNet()
        self._current: tuple[str, str] | None = None
        self._frames: list[np.ndarray] = []
        self._points: list[np.ndarray] = []
        self._scores: dict[str, list[LipSyncScore]] = {"prediction": [], "reference": []}
        self._unscored: list[str] = []

    def consume(self, batch: Any) -> None:
        """Take a ``FrameBatch``; a clip's frames arrive in order, one side after the other."""
        if (batch.clip_id, batch.side) != self._current:
            self._flush()
            self._current = (batch.clip_id, batch.side)
        height, width = batch.frames.shape[1:3]
        self._frames.append(batch.frames)
        self._points.append(project_to_pixels(batch.vertices[:, self._lips], batch.camera, width, height))

    def _flush(self) -> None:
        if self._current is None or not self._frames:
            return
        clip_id, side = self._current
        frames, points = np.concatenate(self._frames), np.concatenate(self._points)
        self._frames, self._points = [], []
        if min(len(frames), len(self._audio[clip_id]) // SAMPLES_PER_FRAME) < 6:
            self._unscored.append(f"{clip_id} ({side})")
            return
        self._scores[side].append(lip_sync_score(frames, self._audio[clip_id], self._variables, lip_points=points,
                                                 model=self._model, batch_size=self._batch_size))

    def result(self) -> dict[str, Any]:
        self._flush()
        self._current = None
        metrics, unavailable, counts = {}, {}, {"lse_unscored_clips": self._unscored}
        for side, prefix in (("prediction", ""), ("reference", "gt_")):
            if not self._scores[side]:
                for k in ("lse_d", "lse_c"):
                    unavailable[prefix + k] = "no clip of 6 frames or more to score"
                continue
            mean = average_scores(self._scores[side])
            metrics.update({prefix + "lse_d": mean["lse_d"], prefix + "lse_c": mean["lse_c"]})
            counts.update({f"{prefix}lse_clips": mean["clips"], f"{prefix}lse_short_clips": mean["short_clips"]})
        counts["lse_min_track_frames"] = MIN_TRACK_FRAMES
        variant = ("syncnet_python (SyncNetInstance.evaluate): SyncNet distance of 5-frame face crops vs MFCC "
                   f"windows over offsets +-{VSHIFT}, mean over clips; crop from the projected lip vertices "
                   "instead of S3FD (avi_jax.metrics.lip_sync)")
        variants = {"lse_d": "LSE-D, min over offsets of the mean distance; " + variant,
                    "lse_c": "LSE-C, median minus min of the mean distances; " + variant}
        variants.update({"gt_" + k: v + " (ground-truth renders)" for k, v in list(variants.items())})
        return {"metrics": metrics, "variants": {k: v for k, v in variants.items() if k in metrics},
                "counts": counts, "unavailable": unavailable}


__all__ = ["LipSyncFrames", "LipSyncScore", "lip_sync_score", "average_scores", "pcm16", "mfcc", "face_boxes_from_lips",
           "project_to_pixels", "resize_bilinear", "crop_faces", "embed_windows", "offset_distances",
           "scores_from_distances", "VSHIFT", "MIN_TRACK_FRAMES"]
