"""Paper Fig. 2 for a set of recordings: speech -> instruction -> style -> FLAME motion, in windows and
batches (see ``windows.py`` for the windowing and the length buckets).

``synthesize(face, clips, options)`` returns, for each clip and each of K samples, the blended FLAME
motion (T, 53) with T = round(seconds x 25), the instruction of every window with its time span, and
the seed. All model calls are batched across clips, windows and samples, padded to a bucket length, and a
row's result depends only on that row: a clip's outputs are the same alone or beside other clips.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from avi_jax.data import schema
from avi_jax.errors import InputError
from avi_jax.inference.windows import Window, blend, bucket_frames, plan_windows

MIN_SECONDS = 0.5
NO_INSTRUCTION = "(no instruction: the w/o LLM system samples the style from the audio)"
SILENCE = 1e-4    # peak amplitude below which a recording counts as silent


@dataclasses.dataclass(frozen=True)
class Options:
    """What to synthesise (CLI flags of ``python -m avi_jax.infer``).

    Attributes:
      num_samples: K styles sampled per clip (diverse outputs from the diffusion prior).
      seed: PRNG seed of the style sampling: every window's K styles are drawn from ``key(seed)``
        (so one instruction gives the same K styles wherever it occurs).
      instruction: a user-written instruction for every clip (skips the LLM; paper Sec. III-A).
      reference_motion: (S, 53) reference motion whose style (motion prior's encoder) drives every clip.
      window_seconds, overlap_seconds: the inference windows (``config.inference``).
      bucket_seconds: padded window lengths, one compilation each.
      batch_size: rows per model call.
    """
    num_samples: int = 1
    seed: int = 0
    instruction: str | None = None
    reference_motion: np.ndarray | None = None
    window_seconds: float = 10.0
    overlap_seconds: float = 1.0
    bucket_seconds: tuple[float, ...] = (1.0, 2.0, 4.0, 6.0, 8.0, 10.0)
    batch_size: int = 8


@dataclasses.dataclass
class Result:
    """One clip's sample: motion (T, 53) float32 = expression (50) ++ jaw_pose (3, axis-angle radians);
    instructions [(start_s, end_s, text)] per window; the sample index and seed; style (W, D) float32: the
    style embedding that drove each window (the paper's Diversity is measured on these)."""
    motion: np.ndarray
    instructions: list[tuple[float, float, str]]
    sample: int
    seed: int
    style: np.ndarray | None = None

    @property
    def instruction(self) -> str:
        """The instruction; with several windows one line per window: ``[0.00-10.00 s] text``."""
        if len(self.instructions) == 1:
            return self.instructions[0][2]
        return "\n".join(f"[{a:.2f}-{b:.2f} s] {t}" for a, b, t in self.instructions)


def num_frames(num_samples: int) -> int:
    """T = round(seconds x 25) for a 16 kHz recording of ``num_samples`` samples."""
    return int(round(num_samples / schema.SAMPLES_PER_FRAME))


def check_waveform(audio: np.ndarray, source: str) -> np.ndarray:
    """A 16 kHz mono recording that the pipeline accepts (returned unchanged).

    Raises ``InputError`` naming ``source`` when it is shorter than 0.5 s or silent.
    """
    seconds = audio.shape[0] / schema.SAMPLE_RATE
    if seconds < MIN_SECONDS:
        raise InputError(f"{source}: too short ({seconds:.3f} s); at least {MIN_SECONDS} s of speech is needed")
    if float(np.max(np.abs(audio))) < SILENCE:
        raise InputError(f"{source}: the recording is silent (peak amplitude below {SILENCE})")
    return audio


def _padded(audio: np.ndarray, window: Window, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """A window's samples zero-padded to ``frames`` frames, and the mask of the window's own frames (the
    recording's last partial frame counts as part of it: its samples past the end are silence)."""
    spf = schema.SAMPLES_PER_FRAME
    out = np.zeros(frames * spf, np.float32)
    piece = audio[window.start * spf:window.stop * spf]
    out[:piece.shape[0]] = piece
    mask = np.zeros(frames * spf, bool)
    mask[:(window.stop - window.start) * spf] = True
    return out, mask


def _batched(rows: list, options: Options, run) -> list:
    """``run(rows_of_one_bucket) -> outputs`` over rows grouped by bucket length and batch size; each row
    is (bucket_frames, ...). Returns the outputs in the rows' order."""
    out: list = [None] * len(rows)
    by_bucket: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_bucket.setdefault(row[0], []).append(i)
    for frames, idx in sorted(by_bucket.items()):
        for start in range(0, len(idx), options.batch_size):
            part = idx[start:start + options.batch_size]
            pad = options.batch_size - len(part)      # always the same batch: one compilation per bucket
            results = run([rows[i] for i in part] + [rows[part[0]]] * pad)
            for i, r in zip(part, results):
                out[i] = r
    return out


def synthesize(face, clips: Sequence[np.ndarray], options: Options) -> list[list[Result]]:
    """Instructions, styles and FLAME motion for each clip (16 kHz mono float32, checked by
    :func:`check_waveform`); returns ``results[clip][sample]``."""
    fps = schema.FPS
    window = max(int(round(options.window_seconds * fps)), 1)
    overlap = int(round(options.overlap_seconds * fps))
    buckets = [int(round(s * fps)) for s in options.bucket_seconds]
    plans = [plan_windows(num_frames(a.shape[0]), window, overlap) for a in clips]
    # (bucket frames, clip, window index) for every window of every clip
    rows = [(bucket_frames(w.stop - w.start, buckets), c, j) for c, p in enumerate(plans) for j, w in enumerate(p)]

    def audio_batch(part):
        pairs = [_padded(clips[c], plans[c][j], f) for f, c, j in part]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    audio_conditioned = getattr(face, "audio_conditioned", False)     # the "w/o LLM" system (Table 1)
    if options.instruction is not None and audio_conditioned:
        raise InputError("--instruction: this system's style prior is conditioned on the audio (trained with "
                         "model.prior.overrides.condition='audio', the paper's w/o LLM system); it takes no "
                         "instruction")
    if options.instruction is not None:
        texts = [options.instruction] * len(rows)
    elif audio_conditioned:
        texts = [NO_INSTRUCTION] * len(rows)
    else:
        texts = _batched(rows, options, lambda part: face.instructions(*audio_batch(part)))
    k = int(options.num_samples)
    if options.reference_motion is not None:
        ref = face.reference_style(options.reference_motion)
        styles = np.broadcast_to(ref, (len(rows), k, ref.shape[-1]))
    elif audio_conditioned:
        base = jax.random.key(int(options.seed))      # every window's K styles from key(seed), as below
        styles = np.stack(_batched(rows, options, lambda part: list(face.audio_styles(
            *audio_batch(part), jnp.stack([base] * len(part)), k))))
    else:
        base = jax.random.key(int(options.seed))
        distinct = sorted(set(texts))          # the same instruction gives the same styles
        sampled = face.styles(distinct, jnp.stack([base] * len(distinct)), k)
        styles = np.stack([sampled[distinct.index(t)] for t in texts])            # (rows, K, D)
    motion_rows = [(f, c, j, s) for (f, c, j) in rows for s in range(k)]
    index = {(c, j): i for i, (_, c, j) in enumerate(rows)}

    def run_motion(part):
        audio, mask = audio_batch([(f, c, j) for f, c, j, _ in part])
        style = np.stack([styles[index[(c, j)], s] for _, c, j, s in part])
        return list(face.motion(audio, mask, style))

    motions = dict(zip([(c, j, s) for _, c, j, s in motion_rows], _batched(motion_rows, options, run_motion)))
    results = []
    for c, plan in enumerate(plans):
        t = num_frames(clips[c].shape[0])
        # each window's instruction covers the frames where it dominates the blend (overlap midpoints)
        cuts = [0.0] + [(a.stop + b.start) / 2 / fps for a, b in zip(plan, plan[1:])] + [t / fps]
        spans = [(cuts[j], cuts[j + 1], texts[index[(c, j)]]) for j in range(len(plan))]
        per_sample = []
        for s in range(k):
            outs = [motions[(c, j, s)][:w.stop - w.start] for j, w in enumerate(plan)]
            style = np.stack([styles[index[(c, j)], s] for j in range(len(plan))]).astype(np.float32)
            per_sample.append(Result(blend(plan, outs, t), spans, s, int(options.seed), style))
        results.append(per_sample)
    return results
