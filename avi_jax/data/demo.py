"""The DEMO CORPUS: a deterministic, seeded synthetic stand-in for MEAD / MeadText.

Every clip is synthesized voiced "speech" with FLAME-format coefficients and MeadText-style instructions, so
the whole system (stage 1 and stage 2) trains end to end anywhere, with nothing to download.

Audio (16 kHz mono): a harmonic (glottal) source ``sum_h a_h(t) sin(h phi(t))`` whose harmonic amplitudes
follow a spectral tilt ``h**-tilt`` times a formant envelope (three resonances, vowel-like, changing per
syllable), gated by a syllable envelope (3-7 syllables/s), plus aspiration noise and a little background
noise. Speaker identity = base pitch (male ~110 Hz / female ~210 Hz, +-10 %) and formant scaling.
Emotion and intensity change the prosody strongly and consistently across speakers: pitch level (semitones
relative to the speaker's base), pitch range and contour shape, per-syllable accents, energy, speaking rate,
spectral tilt (brightness), breathiness, tremolo and jitter, and a formant shift (e.g. smiling raises
formants). Intensity scales the deviation from neutral (:data:`PROSODY_SCALE`).

Coefficients at 25 fps (640 samples per frame): ``jaw_pose[:, 0]`` = opening angle in radians (0..~0.35)
driven by the syllable envelope (scaled by the emotion's energy and its jaw-drop action); ``expression``
(T, 50) = sum of FACS action-unit basis vectors (sparse, seeded) weighted by the emotion/intensity action
strengths of :mod:`avi_jax.data.instructions` + small per-speaker offsets + a mouth component that follows
the envelope; ``global_pose`` zeros; ``shape`` (100,) per speaker. The 3 instructions of a clip come from
:func:`instructions.describe` with the same action strengths, so adverbs agree with the coefficients.

Everything is a pure function of ``seed`` (each clip uses ``np.random.default_rng((seed, speaker, emotion
id, intensity))``).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np

from avi_jax.data import instructions as instr
from avi_jax.data.schema import (EMOTIONS, MEAD_EMOTIONS, N_EXPRESSION, N_JAW, N_SHAPE, SAMPLE_RATE,
                                 SAMPLES_PER_FRAME)

DEMO_SPLITS = ("train", "validation", "test")
INSTRUCTIONS_PER_CLIP = 3


@dataclasses.dataclass(frozen=True)
class Prosody:
    """Prosodic parameters of one clip (the demo's emotion model).

    pitch: semitones relative to the speaker's base f0.   pitch_range: semitones spanned by the contour.
    contour: 'falling' | 'rising' | 'rise_fall' | 'flat'.   accent: semitones of per-syllable pitch bumps.
    gain_db: level relative to neutral (dB).   rate: syllables per second.   tilt: harmonic amplitude
    exponent (a_h ~ h**-tilt; lower = brighter).   breath: aspiration noise level relative to the voice.
    tremolo: f0 tremolo depth (semitones, ~6.5 Hz; amplitude tremolo follows).   jitter: random f0
    perturbation depth (semitones).   formant: formant frequency scale (smiling > 1).
    """
    pitch: float
    pitch_range: float
    contour: str
    accent: float
    gain_db: float
    rate: float
    tilt: float
    breath: float
    tremolo: float
    jitter: float
    formant: float


# Full-intensity (level 3) prosody per emotion; intensity blends from neutral by PROSODY_SCALE.
EMOTION_PROSODY: dict[str, Prosody] = {
    "neutral": Prosody(0.0, 2.5, "falling", 0.8, 0.0, 4.5, 1.45, 0.05, 0.0, 0.05, 1.00),
    "angry": Prosody(3.0, 5.0, "falling", 2.0, 10.0, 5.6, 0.60, 0.02, 0.0, 0.40, 1.02),
    "contempt": Prosody(-2.0, 5.0, "rise_fall", 2.5, -1.0, 3.4, 1.30, 0.10, 0.0, 0.05, 1.03),
    "disgusted": Prosody(-3.0, 5.0, "falling", 1.0, -2.0, 3.8, 1.60, 0.15, 0.0, 0.50, 0.93),
    "fear": Prosody(7.0, 1.5, "flat", 0.3, -4.0, 6.6, 1.50, 0.35, 0.8, 0.30, 1.04),
    "happy": Prosody(6.0, 6.0, "rise_fall", 3.0, 4.0, 5.2, 1.10, 0.04, 0.0, 0.05, 1.09),
    "sad": Prosody(-4.0, 1.0, "falling", 0.2, -8.0, 2.6, 2.30, 0.35, 0.35, 0.10, 0.96),
    "surprised": Prosody(11.0, 9.0, "rising", 1.0, 3.0, 4.2, 1.20, 0.25, 0.0, 0.05, 1.06),
    "calm": Prosody(-1.5, 1.0, "flat", 0.3, -5.0, 3.4, 1.70, 0.15, 0.0, 0.02, 1.00),
}
# Intensity level -> fraction of the deviation from neutral (level 1 small, level 3 full).
PROSODY_SCALE: dict[int, float] = {1: 0.5, 2: 0.75, 3: 1.0}

# (F1, F2, F3) in Hz for an adult male vocal tract (after Peterson & Barney 1952).
_VOWELS = np.array([[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010], [570, 840, 2410],
                    [300, 870, 2240], [660, 1720, 2410], [490, 1350, 1690]], dtype=np.float32)
_BANDWIDTHS = np.array([90.0, 110.0, 160.0], dtype=np.float32)
_FORMANT_GAINS = np.array([1.0, 0.6, 0.35], dtype=np.float32)
_HOP = 80                 # control-rate hop in samples (5 ms)
_MAX_HARMONIC_HZ = 7000.0
_NEUTRAL_RMS = 0.045      # target RMS of a neutral, 0 dB clip


def gender_of(speaker: int) -> str:
    """Demo speakers alternate: even -> 'male', odd -> 'female'."""
    return "male" if speaker % 2 == 0 else "female"


def num_test_speakers(num_speakers: int) -> int:
    """Held-out test speakers of a demo corpus: one in eight, at least 2 (one of each gender)."""
    return max(2, num_speakers // 8)


def demo_split(speaker: int, num_speakers: int) -> str:
    """Speaker-disjoint split: the last :func:`num_test_speakers` speakers -> 'test', the one before ->
    'validation', the rest 'train'.

    With 12 speakers: 0-8 train, 9 validation, 10-11 test; with 32: 0-26 train, 27 validation, 28-31 test.
    Needs ``num_speakers >= 4``.
    """
    if num_speakers < 4:
        raise ValueError(f"the demo corpus needs at least 4 speakers, got {num_speakers}")
    n_test = num_test_speakers(num_speakers)
    if speaker >= num_speakers - n_test:
        return "test"
    if speaker == num_speakers - n_test - 1:
        return "validation"
    return "train"


def blend_prosody(emotion: str, intensity: int) -> Prosody:
    """Prosody of ``emotion`` at MEAD ``intensity`` (1..3): neutral + scale * (emotion - neutral)."""
    if emotion not in EMOTION_PROSODY:
        raise ValueError(f"unknown emotion {emotion!r}; expected one of {EMOTIONS}")
    k = PROSODY_SCALE[int(intensity)]
    neu, emo = EMOTION_PROSODY["neutral"], EMOTION_PROSODY[emotion]
    vals = {}
    for f in dataclasses.fields(Prosody):
        a, b = getattr(neu, f.name), getattr(emo, f.name)
        vals[f.name] = b if isinstance(a, str) else float(a + k * (b - a))
    return Prosody(**vals)


@dataclasses.dataclass(frozen=True)
class Speaker:
    """A demo speaker: gender, base f0 (Hz), formant scale, small rate/tilt/gain offsets, FLAME shape (100,),
    and an expression offset (50,)."""
    index: int
    gender: str
    f0: float
    formant_scale: float
    rate_scale: float
    tilt_offset: float
    gain_db: float
    shape: np.ndarray
    expression_offset: np.ndarray


def make_speaker(seed: int, speaker: int) -> Speaker:
    """Deterministic speaker ``speaker`` of the corpus with ``seed``."""
    rng = np.random.default_rng((seed, speaker, 1_000_003))
    gender = gender_of(speaker)
    base = 110.0 if gender == "male" else 210.0
    decay = 1.0 / np.sqrt(1.0 + np.arange(N_SHAPE))
    offset = np.zeros(N_EXPRESSION, np.float32)
    offset[:10] = 0.08 * rng.standard_normal(10)
    return Speaker(
        index=speaker, gender=gender,
        f0=float(base * (1.0 + rng.uniform(-0.1, 0.1))),
        formant_scale=float((1.0 if gender == "male" else 1.16) * (1.0 + rng.uniform(-0.04, 0.04))),
        rate_scale=float(1.0 + rng.uniform(-0.06, 0.06)),
        tilt_offset=float(rng.uniform(-0.08, 0.08)),
        gain_db=float(rng.uniform(-1.0, 1.0)),
        shape=(rng.standard_normal(N_SHAPE) * decay).astype(np.float32),
        expression_offset=offset)


def action_basis(seed: int) -> np.ndarray:
    """(len(instructions.ACTIONS), 50) float32: one sparse expression-space direction per FACS action unit."""
    rng = np.random.default_rng((seed, 2_000_003))
    basis = np.zeros((len(instr.ACTION_NAMES), N_EXPRESSION), np.float32)
    for i in range(len(instr.ACTION_NAMES)):
        dims = rng.choice(30, size=4, replace=False)
        v = rng.standard_normal(4)
        basis[i, dims] = 1.5 * v / np.linalg.norm(v)
    return basis


def mouth_direction(seed: int) -> np.ndarray:
    """(50,) float32 expression direction that follows the speech envelope (mouth opening)."""
    rng = np.random.default_rng((seed, 3_000_017))
    v = np.zeros(N_EXPRESSION, np.float32)
    v[:4] = rng.standard_normal(4)
    return v / np.linalg.norm(v)


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    if width <= 1:
        return x
    k = np.hanning(width + 2)[1:-1]
    k = k / k.sum()
    pad = np.pad(x, (width, width), mode="edge")
    return np.convolve(pad, k, mode="same")[width:-width]


def _contour(kind: str, u: np.ndarray) -> np.ndarray:
    if kind == "falling":
        return 0.5 - u
    if kind == "rising":
        return u * u - 1.0 / 3.0
    if kind == "rise_fall":
        return np.sin(np.pi * u) - 2.0 / np.pi
    if kind == "flat":
        return np.zeros_like(u)
    raise ValueError(f"unknown contour {kind!r}")


def _syllables(rng: np.random.Generator, rate: float, seconds: float):
    """Syllable (start, end) times in seconds, with a short lead-in and occasional pauses."""
    t = float(rng.uniform(0.04, 0.12))
    out = []
    while t < seconds:
        d = float(rng.uniform(0.75, 1.25)) / rate
        out.append((t, t + d))
        t += d
        if rng.uniform() < 0.12:
            t += 0.5 / rate
    return out


def synthesize(rng: np.random.Generator, speaker: Speaker, emotion: str, intensity: int,
               num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthesize one clip.

    Returns:
      audio: float32 (num_samples,) in [-1, 1] at 16 kHz.
      envelope: float32 (num_samples,) the syllable envelope in [0, 1] (before gain and tremolo).
    """
    p = blend_prosody(emotion, intensity)
    sr = SAMPLE_RATE
    seconds = num_samples / sr
    n_ctrl = -(-num_samples // _HOP) + 1
    tc = np.arange(n_ctrl, dtype=np.float64) * _HOP / sr            # control-rate times (s)
    rate = p.rate * speaker.rate_scale
    syl = _syllables(rng, rate, seconds + 0.5)
    starts = np.array([s for s, _ in syl])
    ends = np.array([e for _, e in syl])
    amps = rng.uniform(0.65, 1.0, len(syl))
    accents = p.accent * rng.uniform(0.4, 1.0, len(syl)) * rng.choice([1.0, 0.5, 1.0], len(syl))
    vowels = rng.integers(len(_VOWELS), size=len(syl))

    def syllable_state(t: np.ndarray):
        i = np.clip(np.searchsorted(starts, t, side="right") - 1, 0, len(syl) - 1)
        ph = (t - starts[i]) / (ends[i] - starts[i])
        inside = (ph >= 0.0) & (ph <= 1.0)
        return i, np.clip(ph, 0.0, 1.0), inside

    # Syllable envelope at the sample rate.
    ts = np.arange(num_samples, dtype=np.float64) / sr
    i_s, ph_s, in_s = syllable_state(ts)
    env = np.where(in_s, amps[i_s] * np.sin(np.pi * ph_s) ** 0.8, 0.0).astype(np.float32)

    # Pitch track (semitones re the speaker's base) at the control rate.
    i_c, ph_c, in_c = syllable_state(tc)
    u = tc / seconds
    neu = EMOTION_PROSODY["neutral"]
    k = PROSODY_SCALE[int(intensity)]
    contour = (1.0 - k) * neu.pitch_range * _contour(neu.contour, u) + k * p.pitch_range * _contour(p.contour, u)
    st = p.pitch + contour + np.where(in_c, accents[i_c] * np.sin(np.pi * ph_c), 0.0)
    trem_phase = rng.uniform(0, 2 * np.pi)
    trem = np.sin(2 * np.pi * 6.5 * tc + trem_phase)
    st = st + p.tremolo * trem
    st = st + p.jitter * _smooth(rng.standard_normal(n_ctrl), 5) * 2.0
    f0_c = speaker.f0 * 2.0 ** (st / 12.0)

    # Formant tracks (Hz) at the control rate, smoothed across syllable boundaries.
    scale = speaker.formant_scale * p.formant
    formants = np.stack([_smooth(_VOWELS[vowels[i_c], j].astype(np.float64), 7) for j in range(3)], 0) * scale
    bw = _BANDWIDTHS[:, None] * scale

    # Harmonic amplitudes (H, n_ctrl): tilt x formant envelope, zero above _MAX_HARMONIC_HZ.
    n_harm = int(_MAX_HARMONIC_HZ // f0_c.min())
    h = np.arange(1, n_harm + 1, dtype=np.float64)[:, None]
    fh = h * f0_c[None, :]
    fenv = 0.04 + sum(_FORMANT_GAINS[j] / (1.0 + ((fh - formants[j][None]) / (0.5 * bw[j][None])) ** 2)
                      for j in range(3))
    amp = (h ** -(p.tilt + speaker.tilt_offset)) * fenv * (fh < _MAX_HARMONIC_HZ)
    amp = amp / np.sqrt(0.5 * np.sum(amp ** 2, axis=0, keepdims=True))   # unit voice power per control step
    amp = amp.astype(np.float32)

    # Phase at the sample rate; linear interpolation of the amplitudes to the sample rate.
    f0_s = np.interp(ts, tc, f0_c)
    phase = (2 * np.pi * np.cumsum(f0_s) / sr + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    n_blocks = n_ctrl - 1
    w = (np.arange(_HOP, dtype=np.float32) / _HOP)[None, None, :]
    a_full = (amp[:, :-1, None] * (1.0 - w) + amp[:, 1:, None] * w).reshape(n_harm, n_blocks * _HOP)
    a_full = a_full[:, :num_samples]
    hh = np.arange(1, n_harm + 1, dtype=np.float32)[:, None]
    voice = np.einsum("hn,hn->n", a_full, np.sin(hh * phase[None, :]))
    voice /= np.sqrt(np.mean(voice ** 2)) + 1e-8

    # Aspiration noise (high-passed white noise), gated by the envelope; background noise floor.
    noise = rng.standard_normal(num_samples).astype(np.float32)
    breath = np.diff(noise, prepend=0.0).astype(np.float32) / np.sqrt(2.0)
    trem_s = 1.0 + 0.35 * min(p.tremolo, 1.0) * np.sin(2 * np.pi * 6.5 * ts + trem_phase).astype(np.float32)
    sig = env * trem_s * (voice + 2.0 * p.breath * breath)
    gain = _NEUTRAL_RMS * 10.0 ** ((p.gain_db + speaker.gain_db) / 20.0)
    sig = gain * sig / (np.sqrt(np.mean(env ** 2)) + 1e-8)
    sig = sig + 1e-3 * rng.standard_normal(num_samples).astype(np.float32)
    return np.clip(sig, -1.0, 1.0).astype(np.float32), env


def frame_envelope(env: np.ndarray, num_frames: int) -> np.ndarray:
    """(N,) sample envelope -> (num_frames,) mean per 640-sample frame (zero-padded at the end)."""
    n = num_frames * SAMPLES_PER_FRAME
    e = np.zeros(n, np.float32)
    e[:min(n, env.size)] = env[:n]
    return e.reshape(num_frames, SAMPLES_PER_FRAME).mean(axis=1)


def generate_clip(seed: int, speaker: int, emotion: str, intensity: int, clip_seconds: float = 2.0,
                  *, num_speakers: int = 12) -> dict:
    """One demo clip as a record (see :mod:`avi_jax.data.schema`).

    Returns a dict: clip_id str, speaker str, split str, gender str, audio float32 (N,) 16 kHz with
    N = round(clip_seconds * 16000), emotion str, intensity int, instructions list[str] (3),
    expression float32 (T, 50), jaw_pose float32 (T, 3) radians, global_pose float32 (T, 3) zeros,
    shape float32 (100,), with T = round(N / 640) frames at 25 fps.
    """
    spk = make_speaker(seed, speaker)
    emo_id = EMOTIONS.index(emotion)
    rng = np.random.default_rng((seed, speaker, emo_id, int(intensity)))
    n = int(round(clip_seconds * SAMPLE_RATE))
    t = int(round(n / SAMPLES_PER_FRAME))
    audio, env = synthesize(rng, spk, emotion, intensity, n)
    p = blend_prosody(emotion, intensity)
    strengths = instr.action_strengths(emotion, intensity)

    env_f = frame_envelope(env, t)
    energy = 10.0 ** (p.gain_db / 40.0)                       # 0.63 (sad) .. 1.68 (angry)
    jaw_open = 0.2 * energy * env_f + 0.08 * strengths.get("jaw_drop", 0.0)
    jaw = np.zeros((t, N_JAW), np.float32)
    jaw[:, 0] = np.clip(jaw_open, 0.0, 0.35)
    jaw[:, 1:] = 0.004 * rng.standard_normal((t, 2))

    basis = action_basis(seed)
    w = np.array([strengths.get(a, 0.0) for a in instr.ACTION_NAMES], np.float32)
    pattern = w @ basis                                       # (50,)
    drift = 1.0 + 0.08 * _smooth(rng.standard_normal(t), 9)[:, None]
    expression = (pattern[None, :] * drift + spk.expression_offset[None, :]
                  + (1.5 * energy * env_f)[:, None] * mouth_direction(seed)[None, :]
                  + 0.02 * rng.standard_normal((t, N_EXPRESSION)))
    texts = [instr.describe(emotion, intensity, spk.gender, strengths, rng) for _ in range(INSTRUCTIONS_PER_CLIP)]
    return {
        "clip_id": f"demo_s{speaker:02d}_{emotion}_l{int(intensity)}",
        "speaker": f"demo_spk{speaker:02d}",
        "split": demo_split(speaker, num_speakers),
        "gender": spk.gender,
        "audio": audio,
        "emotion": emotion,
        "intensity": int(intensity),
        "instructions": texts,
        "expression": expression.astype(np.float32),
        "jaw_pose": jaw,
        "global_pose": np.zeros((t, 3), np.float32),
        "shape": spk.shape,
    }


def demo_clips(split: str | None = None, *, seed: int = 0, num_speakers: int = 12, clip_seconds: float = 2.0,
               emotions: tuple[str, ...] = MEAD_EMOTIONS, intensities: tuple[int, ...] = (1, 2, 3)
               ) -> Iterator[dict]:
    """Generate the demo clips of ``split`` (or all splits when None), ordered speaker, emotion, intensity.

    Default: 12 speakers x 8 MEAD emotions x 3 intensities = 288 clips of 2.0 s (216 train, 24 validation,
    48 test; speaker-disjoint, see :func:`demo_split`).
    """
    if split is not None and split not in DEMO_SPLITS:
        raise ValueError(f"split must be one of {DEMO_SPLITS}, got {split!r}")
    for s in range(num_speakers):
        if split is not None and demo_split(s, num_speakers) != split:
            continue
        for e in emotions:
            for k in intensities:
                yield generate_clip(seed, s, e, k, clip_seconds, num_speakers=num_speakers)


def demo_source(*, seed: int = 0, num_speakers: int = 12, clip_seconds: float = 2.0) -> dict:
    """``{split: zero-arg callable -> iterator of records}`` for :class:`avi_jax.data.builder.ClipDataset`."""
    def make(split):
        return lambda: demo_clips(split, seed=seed, num_speakers=num_speakers, clip_seconds=clip_seconds)
    return {s: make(s) for s in DEMO_SPLITS}


def prepare_demo(data_dir: str | os.PathLike, *, seed: int = 0, num_speakers: int = 12,
                 clip_seconds: float = 2.0) -> str:
    """Prepare the demo corpus as ArrayRecord (:func:`avi_jax.data.builder.prepare`); idempotent.

    Default: 12 speakers x 8 MEAD emotions x 3 intensities = 288 clips of 2.0 s; splits train (speakers
    0-8, 216 clips), validation (speaker 9, 24), test (speakers 10-11, 48). Re-preparing with the same
    parameters returns the existing directory. Returns the dataset directory for
    :func:`avi_jax.data.builder.open_split`.
    """
    from avi_jax.data.builder import prepare     # tfds, only when preparing
    name = f"demo-seed{int(seed)}-spk{int(num_speakers)}-{float(clip_seconds):g}s"
    return prepare(demo_source(seed=seed, num_speakers=num_speakers, clip_seconds=clip_seconds),
                   data_dir, name, description=f"avi_jax demo corpus ({name})",
                   metadata={"kind": "demo", "seed": int(seed), "num_speakers": int(num_speakers),
                             "clip_seconds": float(clip_seconds)})
