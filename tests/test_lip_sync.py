"""LSE-D / LSE-C (avi_jax/metrics/lip_sync.py): MFCCs against python_speech_features, the offset search and
scores against a direct NumPy transcription of syncnet_python's ``calc_pdist`` / ``evaluate``, the crop
against hand-computed pixels, and the whole clip path against its parts."""
from __future__ import annotations

import numpy as np
import pytest

from avi_jax.errors import InputError
from avi_jax.metrics import lip_sync
from avi_jax.models.syncnet import SyncNet
from avi_jax.render.camera import Camera
from helpers import random_syncnet_variables


# ----------------------------------------------------------------------------------------------- audio

@pytest.mark.parametrize("n", [300, 400, 401, 16000 + 123])
def test_mfcc_matches_python_speech_features(n):
    psf = pytest.importorskip("python_speech_features")      # the "test" extra
    rng = np.random.default_rng(n)
    t = np.arange(n) / 16000.0
    wave = 8000 * np.sin(2 * np.pi * 220 * t) + rng.normal(0, 500, n)
    pcm = np.clip(np.rint(wave), -32768, 32767)
    pcm[: n // 10] = 0.0                                           # silent frames: the eps floor
    want = psf.mfcc(pcm.astype(np.int16), 16000)
    got = lip_sync.mfcc(pcm)
    assert got.shape == want.shape == (1 if n <= 400 else 1 + int(np.ceil((n - 400) / 160)), 13)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_pcm16_scale_and_checks():
    np.testing.assert_array_equal(lip_sync.pcm16(np.array([0.0, 0.5, -1.0, 1.0, 1e-5])),
                                  [0.0, 16384.0, -32768.0, 32767.0, 0.0])
    ints = np.array([-32768, 5, 32767], np.int16)
    np.testing.assert_array_equal(lip_sync.pcm16(ints), ints.astype(np.float64))
    np.testing.assert_array_equal(lip_sync.pcm16(np.array([[0.5, 0.0], [0.25, 0.25]])), [8192.0, 8192.0])
    assert lip_sync.pcm16(np.zeros(32000), sample_rate=32000).shape == (16000,)
    for bad in (np.zeros(0), np.array([0.0, np.nan]), np.zeros((2, 2, 2))):
        with pytest.raises(InputError):
            lip_sync.pcm16(bad)


# --------------------------------------------------------------------------------------- offset search

def _calc_pdist_numpy(video, audio, vshift):
    """syncnet_python's calc_pdist, transcribed with NumPy loops."""
    pad = np.concatenate([np.zeros((vshift, audio.shape[1])), audio, np.zeros((vshift, audio.shape[1]))])
    return np.array([[np.linalg.norm(video[i] - pad[i + j] + 1e-6) for j in range(2 * vshift + 1)]
                     for i in range(len(video))])


def test_offset_distances_match_calc_pdist():
    rng = np.random.default_rng(0)
    video, audio = rng.normal(size=(9, 6)), rng.normal(size=(9, 6))
    got = lip_sync.offset_distances(video.astype(np.float32), audio.astype(np.float32), vshift=4)
    np.testing.assert_allclose(got, _calc_pdist_numpy(video, audio, 4), rtol=1e-5)


def test_scores_from_hand_distances():
    # mean over windows: [3, 2, 1.5, 4, 5] -> min 1.5 at j = 2, median 3
    d = np.array([[2.0, 1.0, 1.0, 4.0, 6.0], [4.0, 3.0, 2.0, 4.0, 4.0]])
    lse_d, lse_c, offset = lip_sync.scores_from_distances(d, vshift=2)
    assert lse_d == pytest.approx(1.5) and lse_c == pytest.approx(1.5) and offset == 0
    d = np.array([[1.0, 7.0, 3.0, 5.0, 9.0]])               # min 1 at j = 0: the audio leads by 2 frames
    assert lip_sync.scores_from_distances(d, vshift=2) == pytest.approx((1.0, 4.0, 2))


def test_shifted_audio_is_found():
    """Audio embeddings equal to the video ones delayed by 3 windows: the best offset is -3."""
    rng = np.random.default_rng(1)
    video = rng.normal(size=(40, 8)).astype(np.float32)
    audio = np.concatenate([rng.normal(size=(3, 8)), video[:-3]]).astype(np.float32)
    lse_d, lse_c, offset = lip_sync.scores_from_distances(lip_sync.offset_distances(video, audio))
    assert offset == -3 and lse_c > 1.0
    assert lse_d == pytest.approx(np.mean(_calc_pdist_numpy(video, audio, 15)[:, 18]), rel=1e-5)


# ----------------------------------------------------------------------------------------------- video

def test_face_boxes_from_lips():
    lips = np.array([[100.0, 300.0], [150.0, 305.0], [125.0, 310.0]])      # width 50, centre (125, 305)
    points = np.repeat(lips[None], 20, axis=0)
    points[7] += 40.0                                                      # a one-frame jump is filtered out
    boxes = lip_sync.face_boxes_from_lips(points)
    np.testing.assert_allclose(boxes, np.tile([125.0, 305.0 - 0.4 * 70.0, 70.0], (20, 1)))
    with pytest.raises(InputError, match="zero width"):
        lip_sync.face_boxes_from_lips(np.zeros((3, 4, 2)))
    with pytest.raises(InputError):
        lip_sync.face_boxes_from_lips(np.zeros((3, 4)))


def test_bilinear_resize_on_ramps():
    """cv2 INTER_LINEAR geometry: halving a ramp samples it at 2d + 0.5; doubling replicates the edges."""
    image = np.arange(8.0)[:, None, None] + 10.0 * np.arange(8.0)[None, :, None]     # value = row + 10 col
    half = lip_sync.resize_bilinear(image, 4)
    centres = np.array([0.5, 2.5, 4.5, 6.5])
    np.testing.assert_allclose(half[..., 0], centres[:, None] + 10.0 * centres[None, :])
    double = lip_sync.resize_bilinear(np.array([0.0, 4.0])[:, None, None] * np.ones((1, 2, 3)), 4)
    np.testing.assert_allclose(double[:, 0, 1], [0.0, 1.0, 3.0, 4.0])


def test_crop_faces_geometry():
    """s = 80: the crop is 2.8 s = 224 pixels, no resampling: rows y-80 .. y+144, columns x-112 .. x+112
    of the frame, BGR, grey (110) outside it."""
    rng = np.random.default_rng(2)
    frame = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    crops = lip_sync.crop_faces(frame[None], np.array([[100.0, 100.0, 80.0]]))
    assert crops.shape == (1, 224, 224, 3) and crops.dtype == np.uint8
    np.testing.assert_array_equal(crops[0, :, 12:-12], frame[20:244, :, ::-1])
    assert (crops[0, :, :12] == 110).all() and (crops[0, :, -12:] == 110).all()
    with pytest.raises(InputError):
        lip_sync.crop_faces(frame[None].astype(np.float32), np.array([[100.0, 100.0, 80.0]]))
    with pytest.raises(InputError):
        lip_sync.crop_faces(frame[None], np.array([[100.0, 100.0, 80.0]] * 2))


def test_project_to_pixels():
    camera = Camera(eye=(0.0, 0.0, 1.0), target=(0.0, 0.0, 0.0), fov_y=90.0)
    px = lip_sync.project_to_pixels(np.array([[0.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.5, 0.0, 0.0]]), camera, 200, 100)
    # fov 90 at distance 1: y = 0.5 is half-way to the top edge; x scaled by the aspect (2)
    np.testing.assert_allclose(px, [[100.0, 50.0], [100.0, 25.0], [125.0, 50.0]], atol=1e-9)


# ------------------------------------------------------------------------------------------ whole clip

@pytest.fixture(scope="module")
def variables():
    return random_syncnet_variables()


def test_embed_windows_are_the_reference_windows(variables):
    rng = np.random.default_rng(3)
    crops = rng.integers(0, 256, (9, 224, 224, 3), dtype=np.uint8)
    mfccs = rng.normal(size=(36, 13))
    video, audio = lip_sync.embed_windows(crops, mfccs, 9, variables, batch_size=3)
    assert video.shape == audio.shape == (4, 1024)                 # 9 - 5 windows
    model = SyncNet()
    want_v = model.apply(variables, crops[2:7].astype(np.float32)[None], method=SyncNet.embed_lips)
    want_a = model.apply(variables, mfccs[8:28].T[None].astype(np.float32), method=SyncNet.embed_audio)
    for got, want in ((video[2], want_v[0]), (audio[2], want_a[0])):   # same windows, batched differently
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    assert np.max(np.abs(video[1] - want_v[0])) > 1e-2 * np.max(np.abs(want_v[0]))   # a neighbour differs
    with pytest.raises(InputError, match="at least 6 frames"):
        lip_sync.embed_windows(crops[:5], mfccs, 5, variables)
    with pytest.raises(InputError, match="MFCC frames"):
        lip_sync.embed_windows(crops, mfccs[:31], 9, variables)     # window 3 needs MFCC frames 12 .. 31


def test_lip_sync_score_of_a_clip(variables):
    rng = np.random.default_rng(4)
    frames = rng.integers(0, 256, (12, 240, 240, 3), dtype=np.uint8)
    audio = rng.uniform(-0.3, 0.3, 11 * 640)       # 11 frames of audio set the length (43 MFCC frames)
    lips = np.tile(np.array([[100.0, 150.0], [140.0, 150.0]]), (12, 1, 1))
    score = lip_sync.lip_sync_score(frames, audio, variables, lip_points=lips, vshift=3, batch_size=3)
    assert score.num_frames == 11 and score.short_clip
    boxes = lip_sync.face_boxes_from_lips(lips)
    crops = lip_sync.crop_faces(frames, boxes)
    video, speech = lip_sync.embed_windows(crops, lip_sync.mfcc(lip_sync.pcm16(audio)), 11, variables,
                                           batch_size=3)
    d = _calc_pdist_numpy(video.astype(np.float64), speech.astype(np.float64), 3).mean(0)
    assert score.lse_d == pytest.approx(d.min(), rel=1e-5)
    assert score.lse_c == pytest.approx(np.median(d) - d.min(), rel=1e-4, abs=1e-5)
    assert score.offset == 3 - int(np.argmin(d))
    same = lip_sync.lip_sync_score(frames, audio, variables, face_boxes=boxes, vshift=3, batch_size=3)
    assert same == score
    with pytest.raises(InputError, match="exactly one"):
        lip_sync.lip_sync_score(frames, audio, variables)
    summary = lip_sync.average_scores([score, same])
    assert summary["lse_d"] == pytest.approx(score.lse_d) and summary["short_clips"] == 2
