"""Audio file I/O: any supported audio file -> 16 kHz mono float32.

The paper's encoders (HuBERT for stage 1, Wav2Vec2 for stage 2; paper Sec. III) consume 16 kHz mono
speech. wav/flac/ogg/mp3... are read with soundfile (libsndfile); m4a/mp4/aac/mov/mkv/webm (MEAD ships its
audio as AAC in m4a, RAVDESS's audio-visual files are mp4) are decoded with PyAV (FFmpeg bindings; the
``av`` wheel ships its own FFmpeg). Files at any other rate are resampled with soxr (high quality),
multi-channel files are downmixed by averaging the channels. Unreadable, truncated, empty or non-finite
audio raises :class:`InputError` naming the file.
"""
from __future__ import annotations

import os
import struct

import numpy as np

from avi_jax.data.schema import SAMPLE_RATE
from avi_jax.errors import InputError

# Containers soundfile/libsndfile reads.
SOUNDFILE_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".aiff", ".aif", ".au", ".mp3", ".w64", ".caf")
# Containers decoded with PyAV (FFmpeg): the first audio stream is used.
AV_EXTENSIONS = (".m4a", ".mp4", ".aac", ".mov", ".webm", ".mkv")
SUPPORTED_EXTENSIONS = SOUNDFILE_EXTENSIONS + AV_EXTENSIONS
# A decoded stream may fall short of the duration its container declares by this much before the file is
# called truncated (AAC decoders round to whole 1024-sample frames; container durations are rounded).
TRUNCATION_TOLERANCE_S = 0.1


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


def _check_riff_complete(path: str) -> None:
    """Raise InputError when a RIFF/WAVE file's ``data`` chunk declares more bytes than the file holds.

    libsndfile silently reads a truncated wav as a shorter one; the header says how long it should be.
    Streaming writers that leave the size unset (0 or 0xFFFFFFFF) are not checked.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return                                       # not RIFF/WAVE (RF64, W64...): soundfile decides
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            cid, n = struct.unpack("<4sI", f.read(8))
            if cid == b"data":
                if n in (0, 0xFFFFFFFF):
                    return
                have = size - (pos + 8)
                if have < n:
                    raise InputError(
                        f"{path}: truncated wav file: its header declares {n} bytes of audio data, the file "
                        f"holds {have}")
                return
            pos += 8 + n + (n & 1)


def _read_av(path: str) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of ``path`` with PyAV -> float32 ``(N, C)`` and the rate in Hz."""
    try:
        import av
    except ImportError as e:   # pragma: no cover - av is an install requirement
        raise InputError(f"{path}: decoding m4a/mp4 audio needs PyAV (pip install av)") from e
    try:
        with av.open(path, mode="r") as container:
            streams = container.streams.audio
            if not streams:
                raise InputError(f"{path}: the file has no audio stream")
            stream = streams[0]
            rate = int(stream.rate or stream.codec_context.sample_rate or 0)
            chunks = []
            resampler = None
            for frame in container.decode(stream):
                if resampler is None:   # only converts the sample format to planar float: same rate/layout
                    rate = int(frame.sample_rate or rate)
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=rate)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
            if resampler is not None:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray())
            declared = None
            if stream.duration is not None and stream.time_base is not None:
                declared = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                declared = float(container.duration) / 1e6   # AV_TIME_BASE
    except InputError:
        raise
    except Exception as e:  # av.error.FFmpegError (InvalidDataError...), OSError, ValueError
        raise InputError(f"{path}: unreadable or truncated audio ({type(e).__name__}: {e})") from e
    if not chunks or rate <= 0:
        raise InputError(f"{path}: audio file is empty (0 samples)")
    data = np.concatenate(chunks, axis=1).T.astype(np.float32, copy=False)     # (N, C)
    if declared is not None and declared > 0:
        want = int(round(declared * rate))
        if data.shape[0] < want - int(TRUNCATION_TOLERANCE_S * rate):
            raise InputError(f"{path}: truncated audio: decoded {data.shape[0] / rate:.3f} s of the "
                             f"{declared:.3f} s its container declares")
        data = data[:want]            # drop the decoder's padding of the last frame
    return data, rate


def load_audio(path: str | os.PathLike, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as float32 ``(N,)`` mono at ``target_rate`` Hz (default 16 kHz), values in [-1, 1].

    wav/flac/ogg/mp3 (anything libsndfile decodes) are read with soundfile, m4a/mp4/aac/mov/mkv/webm with
    PyAV (first audio stream, trimmed to the duration the container declares); channels are downmixed by
    their mean and any sample rate is resampled with soxr.

    Raises:
      InputError: the file is missing, in an unsupported container, unreadable, truncated (a wav whose
        data chunk is shorter than its header says; an m4a/mp4 that fails to decode or decodes to less than
        its declared duration), empty (no samples), or holds NaN/inf samples. The message names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: audio file does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext in AV_EXTENSIONS:
        data, rate = _read_av(path)
    else:
        if ext == ".wav":
            _check_riff_complete(path)
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


def write_m4a(path: str | os.PathLike, audio: np.ndarray, rate: int, *, bitrate: int = 128_000) -> None:
    """Write float audio ``(N,)`` or ``(N, C)`` (C = 1 or 2, values in [-1, 1]) at ``rate`` Hz as AAC in an
    MPEG-4 container (m4a; an audio-only mp4 when ``path`` ends in .mp4).

    For fixtures and tools (MEAD's format); encodes with PyAV's FFmpeg AAC encoder. Raises ValueError for
    a bad shape.
    """
    import av
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] not in (1, 2):
        raise ValueError(f"audio must be (N,) or (N, C) with C in (1, 2), got {np.shape(audio)}")
    layout = "mono" if x.shape[1] == 1 else "stereo"
    fmt = "mp4" if os.fspath(path).lower().endswith(".mp4") else "ipod"
    with av.open(os.fspath(path), mode="w", format=fmt) as container:
        stream = container.add_stream("aac", rate=int(rate), layout=layout)
        stream.bit_rate = int(bitrate)
        step = 1024
        for i in range(0, x.shape[0], step):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[i:i + step].T), format="fltp", layout=layout)
            frame.sample_rate = int(rate)
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
