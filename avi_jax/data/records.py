"""Clip records: what one clip of any corpus becomes before it is written (:func:`schema.features`).

:func:`validate_record` checks and encodes a record dict (shapes, finite values, the coefficient frame count
against the audio length) and raises :class:`InputError` naming the clip; a source for real data yields a
:class:`Refusal` (clip id + reason naming the file at fault) in place of a record it cannot use.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from avi_jax.data import schema
from avi_jax.errors import InputError

FRAME_TOLERANCE = 2        # coefficient frames that may be trimmed/padded to match the audio length


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A clip a source cannot use: its id and why (the reason names the file at fault).

    Yielded by a source in place of a record; :class:`avi_jax.data.builder.ClipDataset` collects it
    (``split`` is filled in by the builder) instead of aborting the build, unless ``strict``.
    """
    clip_id: str
    reason: str
    split: str = ""

    def __str__(self) -> str:
        return f"{self.clip_id}: {self.reason}"


def _as_array(rec: dict, key: str, clip: str, shape_tail: tuple[int, ...] | None) -> np.ndarray | None:
    v = rec.get(key)
    if v is None:
        return None
    try:
        a = np.asarray(v, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InputError(f"{clip}: '{key}' is not a numeric array ({e})") from e
    if shape_tail is not None and (a.ndim != 1 + len(shape_tail) or a.shape[1:] != shape_tail):
        want = "(T, " + ", ".join(map(str, shape_tail)) + ")" if shape_tail else "(N,)"
        raise InputError(f"{clip}: '{key}' has shape {a.shape}, expected {want}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{clip}: '{key}' holds NaN or infinite values")
    return a


def _fit_frames(a: np.ndarray, t: int, key: str, clip: str) -> np.ndarray:
    """Trim or edge-pad ``a`` (T', D) to ``t`` frames when |T' - t| <= FRAME_TOLERANCE, else InputError."""
    if a.shape[0] == t:
        return a
    if abs(a.shape[0] - t) > FRAME_TOLERANCE:
        raise InputError(
            f"{clip}: '{key}' has {a.shape[0]} frames but the audio has {t} frames at {schema.FPS} fps "
            f"(round(samples / {schema.SAMPLES_PER_FRAME})); at most {FRAME_TOLERANCE} frames of mismatch "
            "are trimmed/padded")
    if a.shape[0] > t:
        return a[:t]
    if a.shape[0] == 0:
        return np.zeros((t, a.shape[1]), np.float32)
    return np.concatenate([a, np.repeat(a[-1:], t - a.shape[0], axis=0)], axis=0)


def validate_record(rec: Mapping[str, Any]) -> dict:
    """Validate one clip record and return it encoded for :func:`schema.features`.

    Input keys: ``clip_id`` (str, required), ``audio`` (float (N,) in [-1, 1] at 16 kHz, or int16 PCM;
    required, N > 0), ``instructions`` (list[str]) or ``instruction`` (str), optional ``speaker`` (str),
    ``emotion`` (name in ``schema.EMOTIONS``, id, or None/'' -> -1 unknown), ``intensity`` (0..3; 0 =
    unknown), ``expression`` (T, 50) and ``jaw_pose`` (T, 3) float (both or neither), ``global_pose`` (T, 3),
    ``shape`` (100,), ``has_coefficients`` (False: coefficient arrays are ignored). Extra keys (``split``,
    ``gender``...) are ignored. Validating an already-validated record returns it unchanged.

    Coefficients must have T == round(N / 640) frames; up to ``FRAME_TOLERANCE`` frames of mismatch are
    trimmed/padded (edge values), more raises.

    Raises:
      InputError: naming the clip, for missing/empty/non-finite audio, wrong shapes, NaN/inf coefficients,
        a frame-count mismatch, unknown emotion, bad intensity or empty instructions.
    """
    clip = str(rec.get("clip_id") or "")
    if not clip:
        raise InputError(f"record without a clip_id (keys: {sorted(rec)})")
    audio = rec.get("audio")
    if audio is None:
        raise InputError(f"{clip}: record has no audio")
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise InputError(f"{clip}: audio must be mono (N,), got shape {audio.shape}")
    if audio.size == 0:
        raise InputError(f"{clip}: audio is empty")
    if audio.dtype == np.int16:
        pcm = audio
    else:
        if not np.issubdtype(audio.dtype, np.floating):
            raise InputError(f"{clip}: audio must be float in [-1, 1] or int16 PCM, got dtype {audio.dtype}")
        if not np.all(np.isfinite(audio)):
            raise InputError(f"{clip}: audio holds NaN or infinite samples")
        pcm = schema.pcm16(audio)
    n = pcm.size
    t = int(round(n / schema.SAMPLES_PER_FRAME))

    texts = rec.get("instructions")
    if texts is None:
        texts = [rec["instruction"]] if rec.get("instruction") is not None else []
    if isinstance(texts, str):
        texts = [texts]
    texts = [str(x) for x in texts]
    if not texts or any(not x.strip() for x in texts):
        raise InputError(f"{clip}: needs at least one non-empty instruction")

    emotion = rec.get("emotion")
    if emotion is None or emotion == "":
        emo_id = -1
    elif isinstance(emotion, str):
        if emotion.lower() not in schema.EMOTIONS:
            raise InputError(f"{clip}: unknown emotion {emotion!r}; expected one of {schema.EMOTIONS}")
        emo_id = schema.EMOTIONS.index(emotion.lower())
    else:
        emo_id = int(emotion)
        if not -1 <= emo_id < len(schema.EMOTIONS):
            raise InputError(f"{clip}: emotion id {emo_id} out of range")
    try:
        intensity = int(rec.get("intensity") or 0)
    except (TypeError, ValueError) as e:
        raise InputError(f"{clip}: intensity must be an integer 0..3, got {rec.get('intensity')!r}") from e
    if not 0 <= intensity <= 3:
        raise InputError(f"{clip}: intensity must be 0 (unknown) or 1..3, got {intensity}")

    if rec.get("has_coefficients") is not None and not bool(rec["has_coefficients"]):
        expression = jaw = gpose = None       # an already-encoded record without coefficients
    else:
        expression = _as_array(rec, "expression", clip, (schema.N_EXPRESSION,))
        jaw = _as_array(rec, "jaw_pose", clip, (schema.N_JAW,))
        gpose = _as_array(rec, "global_pose", clip, (3,))
    shape = _as_array(rec, "shape", clip, None)
    if shape is not None and shape.shape != (schema.N_SHAPE,):
        raise InputError(f"{clip}: 'shape' has shape {shape.shape}, expected ({schema.N_SHAPE},)")
    if (expression is None) != (jaw is None):
        raise InputError(f"{clip}: give both 'expression' and 'jaw_pose' coefficients, or neither")
    has_coeff = expression is not None
    if has_coeff:
        expression = _fit_frames(expression, t, "expression", clip)
        jaw = _fit_frames(jaw, t, "jaw_pose", clip)
        gpose = np.zeros((t, 3), np.float32) if gpose is None else _fit_frames(gpose, t, "global_pose", clip)
    else:
        expression = np.zeros((0, schema.N_EXPRESSION), np.float32)
        jaw = np.zeros((0, schema.N_JAW), np.float32)
        gpose = np.zeros((0, 3), np.float32)
    return {
        "clip_id": clip,
        "speaker": str(rec.get("speaker") or ""),
        "audio": pcm,
        "emotion": emo_id,
        "intensity": np.int32(intensity),
        "instructions": texts,
        "has_coefficients": bool(has_coeff),
        "expression": expression.astype(np.float32),
        "jaw_pose": jaw.astype(np.float32),
        "global_pose": gpose.astype(np.float32),
        "shape": (np.zeros(schema.N_SHAPE, np.float32) if shape is None else shape).astype(np.float32),
    }
