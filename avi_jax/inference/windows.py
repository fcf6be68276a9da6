"""Long audio in overlapping windows, and the length buckets that bound compilation.

A recording of any length (0.5 s to an hour) is cut into windows of at most ``window`` frames (25 fps)
that overlap by ``overlap`` frames; each window runs through the models on its own, so memory is bounded
by the window length and not by the recording's (attention over a whole 10-minute clip would need
memory quadratic in its length). The per-frame outputs of the windows are blended across each overlap
with linear cross-fade weights (``blend``), so the result has no seam: at a window's edge its weight is
~0 and the neighbour's ~1.

Each window also gets its own visual instruction and style (``avi_jax.inference.pipeline``): the emotion of
a long recording can change, and the models were trained on clips of a few seconds with one emotion
each, so a window of ~10 s is the scale at which an instruction describes the speech. The style
embeddings are blended with the motion they drive, through the cross-fade.

A window's audio is padded to the next *bucket* length (``bucket_frames``) before batching; the models
are compiled once per bucket (and batch size), and padding does not change a window's outputs (the
audio encoders use masked statistics; every attention is masked).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from avi_jax.errors import ConfigError


class Window(NamedTuple):
    """Frames ``[start, stop)`` of a recording at 25 fps (audio samples ``[start * 640, stop * 640)``)."""
    start: int
    stop: int


def plan_windows(num_frames: int, window: int, overlap: int) -> list[Window]:
    """Cover ``num_frames`` frames with windows of ``window`` frames overlapping by ``overlap``.

    One window ``[0, num_frames)`` when the recording fits; otherwise the fewest full-length windows whose
    starts are evenly spaced from 0 to ``num_frames - window``, so consecutive windows overlap by at least
    ``overlap`` frames (and only neighbours overlap).

    Raises ``ConfigError`` unless ``0 <= 2 * overlap < window`` (the two ramps of a window must not meet).
    """
    if window < 1 or overlap < 0 or 2 * overlap >= window:
        raise ConfigError(f"inference windows: need 0 <= 2 * overlap < window, got window={window} frames, "
                          f"overlap={overlap} frames")
    if num_frames <= window:
        return [Window(0, int(num_frames))]
    count = -(-(num_frames - overlap) // (window - overlap))
    starts = np.round(np.linspace(0, num_frames - window, count)).astype(int)
    return [Window(int(s), int(s) + window) for s in starts]


def crossfade_weights(windows: Sequence[Window]) -> list[np.ndarray]:
    """Per-window blending weights (each (stop - start,) float64, > 0): 1 except over the overlap with a
    neighbour, where the two windows' weights ramp linearly in opposite directions (a cross-fade)."""
    out = []
    for i, w in enumerate(windows):
        n = w.stop - w.start
        weight = np.ones(n)
        t = np.arange(n) + 0.5
        if i > 0:                                   # ramp up over the overlap with the previous window
            left = windows[i - 1].stop - w.start
            if left > 0:
                weight = np.minimum(weight, t / left)
        if i + 1 < len(windows):                    # ramp down over the overlap with the next window
            right = w.stop - windows[i + 1].start
            if right > 0:
                weight = np.minimum(weight, (n - t) / right)
        out.append(weight)
    return out


def blend(windows: Sequence[Window], outputs: Sequence[np.ndarray], num_frames: int) -> np.ndarray:
    """Blend per-window outputs (each (stop - start, ...)) into one (num_frames, ...) float32 sequence
    with :func:`crossfade_weights`. Frames covered by one window are that window's output exactly."""
    total = np.zeros((num_frames,) + outputs[0].shape[1:], np.float64)
    norm = np.zeros(num_frames)
    for w, out, weight in zip(windows, outputs, crossfade_weights(windows)):
        shape = (-1,) + (1,) * (out.ndim - 1)
        total[w.start:w.stop] += np.asarray(out, np.float64) * weight.reshape(shape)
        norm[w.start:w.stop] += weight
    return (total / norm.reshape((-1,) + (1,) * (total.ndim - 1))).astype(np.float32)


def bucket_frames(num_frames: int, buckets: Sequence[int]) -> int:
    """The smallest bucket (in frames) holding ``num_frames``; above the largest, ``num_frames`` itself."""
    for b in sorted(buckets):
        if num_frames <= b:
            return int(b)
    return int(num_frames)
