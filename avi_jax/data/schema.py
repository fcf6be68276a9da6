"""The record schema shared by every dataset (demo corpus, manifests, MEAD/MeadText, RAVDESS).

One record is one clip. Facts (paper Sec. III-A, IV-A): audio is 16 kHz mono, stored as
int16 PCM; FLAME coefficients are at 25 fps (640 audio samples per frame): expression psi (T, 50) and
jaw pose (T, 3, axis-angle radians). A clip without coefficients stores T = 0 rows and
``has_coefficients = False``.
"""
from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16_000          # Hz
FPS = 25                      # coefficient frames per second
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS   # 640
N_EXPRESSION = 50             # FLAME expression coefficients used (of up to 100)
N_JAW = 3                     # jaw pose, axis-angle (radians)
N_SHAPE = 100                 # FLAME identity shape coefficients stored per clip

# MEAD's 8 emotions, plus RAVDESS's "calm". The order fixes the ClassLabel ids.
EMOTIONS = ("neutral", "angry", "contempt", "disgusted", "fear", "happy", "sad", "surprised", "calm")
MEAD_EMOTIONS = EMOTIONS[:8]
INTENSITY_LEVELS = (1, 2, 3)  # MEAD level_1..level_3; RAVDESS uses 1 (normal) and 2 (strong); 0 = unknown


def features():
    """The tfds ``FeaturesDict`` of a clip record."""
    import tensorflow_datasets as tfds
    return tfds.features.FeaturesDict({
        "clip_id": tfds.features.Text(),
        "speaker": tfds.features.Text(),
        "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16),
        "emotion": tfds.features.ClassLabel(names=EMOTIONS),
        "intensity": tfds.features.Scalar(dtype=np.int32),
        "instructions": tfds.features.Sequence(tfds.features.Text()),
        "has_coefficients": tfds.features.Scalar(dtype=np.bool_),
        "expression": tfds.features.Tensor(shape=(None, N_EXPRESSION), dtype=np.float32),
        "jaw_pose": tfds.features.Tensor(shape=(None, N_JAW), dtype=np.float32),
        "global_pose": tfds.features.Tensor(shape=(None, 3), dtype=np.float32),
        "shape": tfds.features.Tensor(shape=(N_SHAPE,), dtype=np.float32),
    })


def pcm16(audio: np.ndarray) -> np.ndarray:
    """float waveform in [-1, 1] -> int16 PCM (clipped)."""
    return np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)


def from_pcm16(pcm: np.ndarray) -> np.ndarray:
    """int16 PCM -> float32 waveform in [-1, 1]."""
    return pcm.astype(np.float32) / 32767.0
