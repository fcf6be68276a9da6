"""Audio file I/O: any soundfile-readable file -> 16 kHz mono float32.

The paper's encoders (HuBERT for stage 1, Wav2Vec2 for stage 2; paper Sec. III) consume 16 kHz mono
speech. Files at any other rate are resampled with soxr (high quality), multi-channel files are downmixed
by averaging the channels. Unreadable, empty or non-finite audio raises :class:`InputError` naming the file.
"""
from __future__ import annotations

import os

import numpy as np

from avi_jax.data.schema import SAMPLE_RATE
from avi_jax.errors import InputError

# Containers soundfile/libsndfile reads; m4a/mp4/aac decoding is not supported yet.
SUPPORTED_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".aiff", ".aif", ".au", ".mp3", ".w64", ".caf")
_UNSUPPORTED = (".m4a", ".mp4", ".aac", ".mov", ".webm", ".mkv", ".wma")


def resample(audio: np.ndarray, rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a mono float waveform ``(N,)`` from ``rate`` Hz to ``target_rate`` Hz with soxr ('HQ').

    Returns float32 ``(round(N * target_rate / rate),)``; the input is returned unchanged (as float32) when
    the rates agree.
    """
    audio = np.asarray(audio, dtype=np.float32)
    if int(rate) == int(target_rate):
        return audio
    import soxr
    return np.asarray(soxr.resample(audio, int(rate), int(target_rate), quality="HQ"), dtype=np.float32)


def to_mono(audio: np.ndarray) -> np.ndarray:
    """``(N,)`` or ``(N, C)`` float waveform -> ``(N,)`` float32 (mean over channels)."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    elif audio.ndim != 1:
        raise ValueError(f"audio must be (N,) or (N, C), got shape {audio.shape}")
    return audio


def load_audio(path: str | os.PathLike, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as float32 ``(N,)`` mono at ``target_rate`` Hz (default 16 kHz), values in [-1, 1].

    Reads wav/flac/ogg (anything libsndfile decodes) with soundfile, downmixes channels by their mean and
    resamples with soxr from any sample rate.

    Raises:
      InputError: the file is missing, in an unsupported container (m4a/mp4/aac: convert it to wav or flac
        first, e.g. ``ffmpeg -i in.m4a -ac 1 -ar 16000 out.wav``), unreadable, empty (no samples), or holds
        NaN/inf samples. The message names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: audio file does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext in _UNSUPPORTED:
        raise InputError(
            f"{path}: '{ext}' audio is not supported yet; convert it to wav or flac first "
            f"(e.g. ffmpeg -i {os.path.basename(path)} -ac 1 -ar {SAMPLE_RATE} out.wav)")
    import soundfile as sf
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError on bad files.
        raise InputError(f"{path}: unreadable audio file ({type(e).__name__}: {e})") from e
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise InputError(f"{path}: audio file is empty (0 samples)")
    if not np.all(np.isfinite(data)):
        raise InputError(f"{path}: audio holds NaN or infinite samples")
    mono = to_mono(data)
    out = resample(mono, rate, target_rate)
    if out.size == 0:
        raise InputError(f"{path}: audio is empty after resampling {rate} Hz -> {target_rate} Hz")
    if not np.all(np.isfinite(out)):
        raise InputError(f"{path}: audio became non-finite after resampling")
    return out
