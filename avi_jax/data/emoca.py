"""EMOCA output folders -> per-clip FLAME coefficient arrays at 25 fps (paper Sec. III-A, IV-A).

AVI-Talking's motion targets are FLAME coefficients reconstructed from the videos by EMOCA (Danecek et al.,
CVPR 2022). EMOCA's video demo (``demos/test_emoca_on_video.py --save_codes True``) writes one folder per
detected face per frame::

    <clip folder>/<model_name>/<frame>_<detection>/{exp,pose,shape,...}.npy      (our expected layout)
    <clip folder>/results/<model_name>/<frame>_<detection>/...                   (as EMOCA writes it)

``<frame>`` is the video frame number (ffmpeg's ``%06d``, 1-based; 0-based numbering is recognised when a
frame 0 exists), ``<detection>`` the face index in that frame: only ``_000`` (the first face) is read.
Per frame: ``exp.npy`` (50,) FLAME expression psi, ``pose.npy`` (6,) = global (head) rotation 3 + jaw
rotation 3 (axis-angle, radians), ``shape.npy`` (100,) identity beta; a leading batch axis of 1 is accepted.

Policy for missing frames and length mismatches (:func:`align_to_audio`), with T = round(N / 640), the
clip's frame count at 25 fps for N audio samples at 16 kHz:

1. Frames are ordered by their number (numerically, not as strings), re-timed from ``fps`` to 25 fps by
   linear interpolation when ``fps != 25``.
2. Any NaN/inf in a frame's arrays refuses the clip (the error names the frame file).
3. Frames past the end of the audio: up to ``frame_tolerance`` (default 2) are trimmed; more refuse the
   clip (a length mismatch: wrong audio, wrong video, or a different frame rate).
4. Missing frames inside [0, T) (face not detected, a frame not processed, the video ending early) are
   filled by linear interpolation between their neighbours (held constant before the first and after the
   last frame) as long as they are at most ``max_missing`` (default 10 %) of T; more refuse the clip.
5. ``shape`` is the per-clip median of the per-frame shape codes.
6. Optional pose smoothing (:func:`smooth_pose`): a zero-phase Butterworth low-pass (2.5 Hz cutoff at 25 Hz,
   ``scipy.signal.filtfilt``) of the head rotation, as the AVI-Talking authors did. Jaw pose is never
   smoothed by default (it moves at syllable rate, 3-7 Hz).

Refusals raise :class:`avi_jax.errors.InputError` naming the clip folder (and file); dataset sources turn
them into :class:`avi_jax.data.records.Refusal` entries.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import numpy as np

from avi_jax.data import schema
from avi_jax.errors import InputError

MAX_MISSING_FRACTION = 0.10     # missing frames (of the audio's T) beyond which a clip is refused
FRAME_TOLERANCE = 2             # extra trailing frames trimmed before a clip is refused
SMOOTH_CUTOFF_HZ = 2.5
SMOOTH_ORDER = 4
_FRAME_RE = re.compile(r"^(\d+)_(\d+)$")


@dataclasses.dataclass
class EmocaFrames:
    """Raw per-frame EMOCA codes of one clip, ordered by frame number.

    frames: int64 (K,) frame numbers, 0-based (1-based EMOCA numbering shifted by one), strictly increasing.
    expression: float32 (K, n_exp) with n_exp >= 50 as saved; pose: float32 (K, 6); shape: float32 (K, n_shape).
    folder: the folder the frames were read from (for messages).
    """
    frames: np.ndarray
    expression: np.ndarray
    pose: np.ndarray
    shape: np.ndarray
    folder: str


@dataclasses.dataclass
class EmocaClip:
    """Per-clip FLAME coefficients at 25 fps, aligned to the clip's audio.

    expression float32 (T, 50); jaw_pose float32 (T, 3) and global_pose float32 (T, 3), axis-angle in
    radians; shape float32 (100,); missing int: frames filled by interpolation; trimmed int: trailing
    frames dropped.
    """
    expression: np.ndarray
    jaw_pose: np.ndarray
    global_pose: np.ndarray
    shape: np.ndarray
    missing: int = 0
    trimmed: int = 0

    def as_record_fields(self) -> dict:
        """The schema fields: expression, jaw_pose, global_pose, shape."""
        return {"expression": self.expression, "jaw_pose": self.jaw_pose, "global_pose": self.global_pose,
                "shape": self.shape}


def _frame_dirs(folder: str) -> list[tuple[int, str]]:
    """(frame number, path) of the ``<frame>_000`` subfolders of ``folder``."""
    out = []
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for name in names:
        m = _FRAME_RE.match(name)
        if m and int(m.group(2)) == 0 and os.path.isdir(os.path.join(folder, name)):
            out.append((int(m.group(1)), os.path.join(folder, name)))
    return out


def find_frames_folder(clip_folder: str | os.PathLike, model_name: str | None = None) -> str:
    """The folder holding ``<frame>_000`` subfolders for one clip.

    Looks at ``clip_folder/<model_name>``, ``clip_folder/results/<model_name>`` and, when ``model_name``
    is None, at the single subfolder of ``clip_folder`` (or of ``clip_folder/results``) that holds frame
    folders, or at ``clip_folder`` itself.

    Raises:
      InputError: no such folder, no frame folders, or several candidate model folders (pass model_name).
    """
    clip_folder = os.fspath(clip_folder)
    if not os.path.isdir(clip_folder):
        raise InputError(f"{clip_folder}: EMOCA output folder does not exist")
    if model_name:
        for cand in (os.path.join(clip_folder, model_name), os.path.join(clip_folder, "results", model_name)):
            if os.path.isdir(cand) and _frame_dirs(cand):
                return cand
        raise InputError(f"{clip_folder}: no EMOCA frame folders (<frame>_000/) under {model_name}/ or "
                         f"results/{model_name}/")
    if _frame_dirs(clip_folder):
        return clip_folder
    cands = []
    for base in (clip_folder, os.path.join(clip_folder, "results")):
        if not os.path.isdir(base):
            continue
        for name in sorted(os.listdir(base)):
            sub = os.path.join(base, name)
            if os.path.isdir(sub) and _frame_dirs(sub):
                cands.append(sub)
    if not cands:
        raise InputError(f"{clip_folder}: no EMOCA frame folders (<model_name>/<frame>_000/ with exp.npy, "
                         "pose.npy, shape.npy)")
    if len(cands) > 1:
        raise InputError(f"{clip_folder}: EMOCA output of several models {[os.path.basename(c) for c in cands]}; "
                         "choose one with model_name (--emoca_model)")
    return cands[0]


def _load_code(path: str, width: int | None, name: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise InputError(f"{path}: missing EMOCA {name} file")
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:
        raise InputError(f"{path}: unreadable .npy ({type(e).__name__}: {e})") from e
    a = np.asarray(a)
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.number):
        raise InputError(f"{path}: EMOCA {name} code must be a numeric vector, got shape {a.shape} {a.dtype}")
    if width is not None and a.shape[0] < width:
        raise InputError(f"{path}: EMOCA {name} code has {a.shape[0]} values, expected at least {width}")
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise InputError(f"{path}: EMOCA {name} code holds NaN or infinite values")
    return a


def read_emoca_frames(clip_folder: str | os.PathLike, model_name: str | None = None) -> EmocaFrames:
    """Read all ``<frame>_000/{exp,pose,shape}.npy`` of one clip (see :func:`find_frames_folder`).

    Frames are ordered numerically; numbering is 1-based (EMOCA/ffmpeg) unless a frame 0 exists.

    Raises:
      InputError: naming the clip folder or the frame file: missing folder/files, unreadable or wrongly
        shaped arrays (exp < 50 values, pose != 6, shape < 100), NaN/inf values.
    """
    folder = find_frames_folder(clip_folder, model_name)
    dirs = sorted(_frame_dirs(folder))
    base = 0 if dirs[0][0] == 0 else 1
    exp, pose, shape = [], [], []
    for _, d in dirs:
        exp.append(_load_code(os.path.join(d, "exp.npy"), schema.N_EXPRESSION, "expression (exp)"))
        p = _load_code(os.path.join(d, "pose.npy"), 6, "pose")
        if p.shape[0] != 6:
            raise InputError(f"{os.path.join(d, 'pose.npy')}: EMOCA pose must have 6 values (global 3 + jaw 3), "
                             f"got {p.shape[0]}")
        pose.append(p)
        shape.append(_load_code(os.path.join(d, "shape.npy"), schema.N_SHAPE, "shape"))
    n_exp = {e.shape[0] for e in exp}
    n_shape = {s.shape[0] for s in shape}
    if len(n_exp) > 1 or len(n_shape) > 1:
        raise InputError(f"{folder}: EMOCA codes change width across frames (exp {sorted(n_exp)}, "
                         f"shape {sorted(n_shape)})")
    return EmocaFrames(frames=np.asarray([f - base for f, _ in dirs], np.int64), expression=np.stack(exp),
                       pose=np.stack(pose), shape=np.stack(shape), folder=folder)


def _interp_fill(values: np.ndarray, frames: np.ndarray, t_out: np.ndarray) -> np.ndarray:
    """Linear interpolation of (K, D) samples at ``frames`` to times ``t_out`` (edges held)."""
    out = np.empty((t_out.shape[0], values.shape[1]), np.float32)
    for j in range(values.shape[1]):
        out[:, j] = np.interp(t_out, frames, values[:, j])
    return out


def align_to_audio(raw: EmocaFrames, num_samples: int, *, fps: float = schema.FPS,
                   max_missing: float = MAX_MISSING_FRACTION, frame_tolerance: int = FRAME_TOLERANCE,
                   smooth: bool = False, clip: str = "") -> EmocaClip:
    """Align raw EMOCA frames to ``num_samples`` of 16 kHz audio: T = round(num_samples / 640) frames at 25 fps.

    Applies the module's policy (trailing frames past the audio: trim up to ``frame_tolerance``, refuse
    beyond; missing frames within the audio's span: interpolate up to ``max_missing`` of them, refuse
    beyond; re-time from ``fps`` to 25 fps by linear interpolation; optional pose smoothing).

    Args:
      raw: frames from :func:`read_emoca_frames` (frame numbers at ``fps``).
      num_samples: audio length N at 16 kHz.
      fps: frame rate of the video EMOCA ran on (MEAD videos are 30 fps, RAVDESS 29.97; re-encode them at
        25 fps before EMOCA or pass their rate here).
      smooth: low-pass the head rotation (``global_pose``) with :func:`smooth_pose`.
      clip: clip id for messages.

    Raises:
      InputError: naming the clip and the EMOCA folder, for too many missing frames or a length mismatch.
    """
    where = f"{clip}: {raw.folder}" if clip else raw.folder
    t = int(round(num_samples / schema.SAMPLES_PER_FRAME))
    if t < 1:
        raise InputError(f"{where}: the audio is shorter than one frame ({num_samples} samples)")
    fps = float(fps)
    if fps <= 0:
        raise InputError(f"{where}: fps must be positive, got {fps}")
    # The span of the audio in source frames, and where each 25 fps output frame falls in source frames.
    span = int(round(num_samples / schema.SAMPLE_RATE * fps))
    frames = raw.frames
    extra = int(np.sum(frames >= span))
    if extra > frame_tolerance:
        raise InputError(
            f"{where}: EMOCA frames run past the audio: the last frame is number {int(frames[-1])} "
            f"(0-based) at {fps:g} fps but the audio lasts {num_samples / schema.SAMPLE_RATE:.3f} s "
            f"({span} frames); at most {frame_tolerance} extra frames are trimmed")
    keep = frames < span
    frames = frames[keep]
    if frames.size == 0:
        raise InputError(f"{where}: no EMOCA frame within the audio's {span} frames")
    missing = span - int(frames.size)
    if missing > max_missing * span:
        raise InputError(
            f"{where}: {missing} of {span} EMOCA frames are missing ({100.0 * missing / span:.0f} % > "
            f"{100.0 * max_missing:.0f} % allowed; first absent frames: "
            f"{sorted(set(range(span)) - set(frames.tolist()))[:5]})")
    t_out = np.arange(t, dtype=np.float64) * (fps / schema.FPS)
    need = missing > 0 or abs(fps - schema.FPS) > 1e-9 or t != span
    if need:
        fr = frames.astype(np.float64)
        expression = _interp_fill(raw.expression[keep][:, :schema.N_EXPRESSION], fr, t_out)
        pose = _interp_fill(raw.pose[keep], fr, t_out)
    else:
        expression = raw.expression[keep][:, :schema.N_EXPRESSION]
        pose = raw.pose[keep]
    global_pose = np.ascontiguousarray(pose[:, :3], np.float32)
    jaw = np.ascontiguousarray(pose[:, 3:6], np.float32)
    if smooth:
        global_pose = smooth_pose(global_pose)
    shape = np.median(raw.shape[keep], axis=0)[:schema.N_SHAPE].astype(np.float32)
    return EmocaClip(expression=np.ascontiguousarray(expression, np.float32), jaw_pose=jaw,
                     global_pose=global_pose, shape=shape, missing=missing, trimmed=extra)


def smooth_pose(pose: np.ndarray, *, fps: float = schema.FPS, cutoff_hz: float = SMOOTH_CUTOFF_HZ,
                order: int = SMOOTH_ORDER) -> np.ndarray:
    """Zero-phase Butterworth low-pass of a (T, D) pose track along time (scipy.signal.butter + filtfilt).

    Defaults follow the AVI-Talking authors: 25 Hz sampling, 2.5 Hz cutoff; order 4. Tracks shorter than
    filtfilt's default padding use a shorter pad; a track of fewer than 2 frames is returned unchanged.
    Returns float32 (T, D).
    """
    from scipy import signal
    pose = np.asarray(pose, np.float32)
    if pose.shape[0] < 2:
        return pose.copy()
    b, a = signal.butter(int(order), float(cutoff_hz), btype="low", fs=float(fps))
    padlen = min(3 * max(len(a), len(b)), pose.shape[0] - 1)
    return signal.filtfilt(b, a, pose.astype(np.float64), axis=0, padlen=padlen).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class CoefficientOptions:
    """How EMOCA output is read: model folder name (None = the only one), video frame rate, smoothing of
    the head rotation, the missing-frame and trailing-frame tolerances (see :func:`load_emoca_clip`)."""
    model_name: str | None = None
    fps: float = schema.FPS
    smooth_pose: bool = True
    max_missing: float = MAX_MISSING_FRACTION
    frame_tolerance: int = FRAME_TOLERANCE


def load_emoca_clip(clip_folder: str | os.PathLike, num_samples: int, *, model_name: str | None = None,
                    fps: float = schema.FPS, max_missing: float = MAX_MISSING_FRACTION,
                    frame_tolerance: int = FRAME_TOLERANCE, smooth: bool = False, clip: str = "") -> EmocaClip:
    """:func:`read_emoca_frames` + :func:`align_to_audio`: one clip's coefficients for N audio samples.

    Returns an :class:`EmocaClip` with expression (T, 50), jaw_pose (T, 3), global_pose (T, 3), shape
    (100,), T = round(num_samples / 640).

    Raises:
      InputError: naming the clip folder/file (see the two functions).
    """
    raw = read_emoca_frames(clip_folder, model_name)
    return align_to_audio(raw, num_samples, fps=fps, max_missing=max_missing, frame_tolerance=frame_tolerance,
                          smooth=smooth, clip=clip)


def write_emoca_clip(clip_folder: str | os.PathLike, expression: np.ndarray, pose: np.ndarray,
                     shape: np.ndarray, *, model_name: str = "EMOCA", first_frame: int = 1,
                     skip: Sequence[int] = ()) -> str:
    """Write per-frame ``<clip_folder>/<model_name>/<frame:06d>_000/{exp,pose,shape}.npy`` (EMOCA's layout).

    For fixtures and tools. expression (T, >=50), pose (T, 6), shape (100,) or (T, 100); frame numbers
    start at ``first_frame``; frame indices (0-based) in ``skip`` are not written. Returns the model folder.
    """
    folder = os.path.join(os.fspath(clip_folder), model_name)
    expression = np.asarray(expression, np.float32)
    pose = np.asarray(pose, np.float32)
    shape = np.asarray(shape, np.float32)
    skip = set(int(s) for s in skip)
    for i in range(expression.shape[0]):
        if i in skip:
            continue
        d = os.path.join(folder, f"{i + first_frame:06d}_000")
        os.makedirs(d, exist_ok=True)
        np.save(os.path.join(d, "exp.npy"), expression[i])
        np.save(os.path.join(d, "pose.npy"), pose[i])
        np.save(os.path.join(d, "shape.npy"), shape if shape.ndim == 1 else shape[i])
    return folder
