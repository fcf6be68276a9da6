"""The demo corpus: determinism, speaker-disjoint splits, audio/jaw coupling, emotion separability."""
from __future__ import annotations

import numpy as np
import pytest

from avi_jax.data import demo
from avi_jax.data import instructions as I
from avi_jax.data.schema import MEAD_EMOTIONS, N_EXPRESSION, SAMPLES_PER_FRAME


@pytest.fixture(scope="module")
def corpus():
    return list(demo.demo_clips(None, seed=0))


def _equal(a: dict, b: dict) -> bool:
    for k in a:
        if isinstance(a[k], np.ndarray):
            if not np.array_equal(a[k], b[k]):
                return False
        elif a[k] != b[k]:
            return False
    return True


def test_clip_format():
    c = demo.generate_clip(0, 3, "happy", 2, 2.0)
    assert c["audio"].shape == (32000,) and c["audio"].dtype == np.float32
    assert np.all(np.isfinite(c["audio"])) and np.abs(c["audio"]).max() <= 1.0
    assert c["expression"].shape == (50, N_EXPRESSION) and c["expression"].dtype == np.float32
    assert c["jaw_pose"].shape == (50, 3) and c["global_pose"].shape == (50, 3) and c["shape"].shape == (100,)
    assert np.all(c["global_pose"] == 0)
    assert c["jaw_pose"][:, 0].min() >= 0 and c["jaw_pose"][:, 0].max() <= 0.35
    assert len(c["instructions"]) == 3 and c["gender"] == "female"
    assert all(I.emotion_from_text(t) == "happy" for t in c["instructions"])
    c3 = demo.generate_clip(0, 3, "happy", 2, 3.3)
    assert c3["audio"].shape == (52800,) and c3["expression"].shape[0] == round(52800 / SAMPLES_PER_FRAME)


def test_determinism():
    a = demo.generate_clip(0, 5, "fear", 3)
    b = demo.generate_clip(0, 5, "fear", 3)
    assert _equal(a, b)
    c = demo.generate_clip(1, 5, "fear", 3)
    assert not np.array_equal(a["audio"], c["audio"])
    assert not np.array_equal(a["expression"], c["expression"])
    assert not np.array_equal(a["shape"], c["shape"])
    d = demo.generate_clip(0, 5, "fear", 2)
    assert not np.array_equal(a["audio"], d["audio"])


def test_splits_are_speaker_disjoint(corpus):
    assert len(corpus) == 12 * 8 * 3
    by_split = {}
    for c in corpus:
        by_split.setdefault(c["split"], set()).add(c["speaker"])
    assert set(by_split) == {"train", "validation", "test"}
    assert by_split["test"] == {"demo_spk10", "demo_spk11"}
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["validation"])
    assert not (by_split["validation"] & by_split["test"])
    assert sum(c["split"] == "train" for c in corpus) == 216
    assert len({c["clip_id"] for c in corpus}) == len(corpus)
    # Both genders on both sides.
    assert {c["gender"] for c in corpus if c["split"] == "test"} == {"male", "female"}
    # Larger corpora hold out one speaker in eight.
    splits = [demo.demo_split(s, 32) for s in range(32)]
    assert splits[-5:] == ["validation"] + ["test"] * 4 and splits.count("train") == 27


def test_jaw_follows_the_audio_envelope(corpus):
    cors = []
    for c in corpus:
        t = c["jaw_pose"].shape[0]
        frames = c["audio"][:t * SAMPLES_PER_FRAME].reshape(t, SAMPLES_PER_FRAME)
        rms = np.sqrt((frames ** 2).mean(1))
        cors.append(np.corrcoef(rms, c["jaw_pose"][:, 0])[0, 1])
    cors = np.array(cors)
    assert np.median(cors) > 0.8 and cors.min() > 0.6, (np.median(cors), cors.min())


def test_expression_follows_emotion_and_intensity(corpus):
    # The expression pattern (time mean, speaker offset aside) grows with intensity and differs per emotion.
    means = {}
    for c in corpus:
        if c["split"] == "train":
            means.setdefault((c["emotion"], c["intensity"]), []).append(c["expression"].mean(0))
    m = {k: np.mean(v, 0) for k, v in means.items()}
    neutral = m[("neutral", 3)]
    for e in MEAD_EMOTIONS[1:]:
        d = [np.linalg.norm(m[(e, k)] - neutral) for k in (1, 2, 3)]
        assert d[0] < d[1] < d[2], (e, d)
    pats = np.stack([m[(e, 3)] - neutral for e in MEAD_EMOTIONS[1:]])
    cos = pats @ pats.T / np.outer(np.linalg.norm(pats, axis=1), np.linalg.norm(pats, axis=1))
    assert (cos - np.eye(len(pats))).max() < 0.95


def _crude_spectral_features(audio: np.ndarray, sr: int = 16000, n_fft: int = 512, hop: int = 256,
                             n_bands: int = 16) -> np.ndarray:
    """log-energy in 16 mel-spaced bands averaged over time + variance of the frame log-energy."""
    n = 1 + (len(audio) - n_fft) // hop
    idx = np.arange(n_fft)[None] + hop * np.arange(n)[:, None]
    power = np.abs(np.fft.rfft(audio[idx] * np.hanning(n_fft)[None], axis=1)) ** 2
    freqs = np.fft.rfftfreq(n_fft, 1 / sr)
    mel = np.linspace(2595 * np.log10(1 + 50 / 700), 2595 * np.log10(1 + 8000 / 700), n_bands + 2)
    hz = 700 * (10 ** (mel / 2595) - 1)
    fb = np.stack([np.clip(np.minimum((freqs - hz[b]) / (hz[b + 1] - hz[b]),
                                      (hz[b + 2] - freqs) / (hz[b + 2] - hz[b + 1])), 0, None)
                   for b in range(n_bands)])
    bands = np.log(power @ fb.T + 1e-8)
    frame_energy = np.log(power.sum(1) + 1e-8)
    return np.concatenate([bands.mean(0), [frame_energy.var()]])


def _softmax_regression(x, y, k, steps=1500, lr=0.5, l2=1e-3):
    w, b = np.zeros((x.shape[1], k)), np.zeros(k)
    for _ in range(steps):
        z = x @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(y)), y] -= 1
        w -= lr * (x.T @ p / len(y) + l2 * w)
        b -= lr * p.mean(0)
    return w, b


def test_emotions_separable_on_unseen_speakers(corpus):
    x = np.stack([_crude_spectral_features(c["audio"]) for c in corpus])
    y = np.array([MEAD_EMOTIONS.index(c["emotion"]) for c in corpus])
    train = np.array([c["split"] == "train" for c in corpus])
    test = np.array([c["split"] == "test" for c in corpus])
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    xn = (x - mu) / sd
    w, b = _softmax_regression(xn[train], y[train], len(MEAD_EMOTIONS))
    acc = ((xn[test] @ w + b).argmax(1) == y[test]).mean()
    assert acc > 0.85, acc
    # Chance-level control: the same features cannot predict a shuffled label.
    y_perm = np.random.default_rng(0).permutation(y)
    w, b = _softmax_regression(xn[train], y_perm[train], len(MEAD_EMOTIONS))
    assert ((xn[test] @ w + b).argmax(1) == y_perm[test]).mean() < 0.5
