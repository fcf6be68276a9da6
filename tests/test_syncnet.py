"""SyncNet (avi_jax/models/syncnet.py) against a PyTorch module of syncnet_python's ``S`` architecture with the
same random weights, saved as ``syncnet_v2.model`` is (a torch.save state dict, legacy and zip formats)
and read back without torch by avi_jax/checkpoints/syncnet.py."""
from __future__ import annotations

import numpy as np
import pytest

from avi_jax.checkpoints import syncnet as ckpt
from avi_jax.errors import CheckpointError, InputError
from avi_jax.models.syncnet import SyncNet

torch = pytest.importorskip("torch")
nn = torch.nn


class ReferenceS(nn.Module):
    """syncnet_python SyncNetModel.S, layer for layer (written out here, independently of our spec tables)."""

    def __init__(self, d: int = 1024):
        super().__init__()
        self.netcnnaud = nn.Sequential(
            nn.Conv2d(1, 64, (3, 3), (1, 1), (1, 1)), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d((1, 1), (1, 1)),
            nn.Conv2d(64, 192, (3, 3), (1, 1), (1, 1)), nn.BatchNorm2d(192), nn.ReLU(), nn.MaxPool2d((3, 3), (1, 2)),
            nn.Conv2d(192, 384, (3, 3), padding=(1, 1)), nn.BatchNorm2d(384), nn.ReLU(),
            nn.Conv2d(384, 256, (3, 3), padding=(1, 1)), nn.BatchNorm2d(256), nn.ReLU(),
            nn.Conv2d(256, 256, (3, 3), padding=(1, 1)), nn.BatchNorm2d(256), nn.ReLU(),
            nn.MaxPool2d((3, 3), (2, 2)),
            nn.Conv2d(256, 512, (5, 4), padding=(0, 0)), nn.BatchNorm2d(512), nn.ReLU())
        self.netfcaud = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, d))
        self.netfclip = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, d))
        self.netcnnlip = nn.Sequential(
            nn.Conv3d(3, 96, (5, 7, 7), (1, 2, 2), 0), nn.BatchNorm3d(96), nn.ReLU(),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            nn.Conv3d(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(),
            nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(),
            nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            nn.Conv3d(256, 512, (1, 6, 6), padding=0), nn.BatchNorm3d(512), nn.ReLU())

    def forward_aud(self, x):
        return self.netfcaud(self.netcnnaud(x).flatten(1))

    def forward_lip(self, x):
        return self.netfclip(self.netcnnlip(x).flatten(1))


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = ReferenceS().eval()
    with torch.no_grad():                       # non-trivial BatchNorm statistics and affine terms
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module", params=["legacy", "zip"])
def weights_file(request, reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("syncnet") / f"syncnet_{request.param}.model"
    torch.save(reference.state_dict(), path, _use_new_zipfile_serialization=request.param == "zip")
    return path


def test_parity_with_reference(reference, weights_file):
    variables = ckpt.load_syncnet(weights_file)
    model = SyncNet()
    rng = np.random.default_rng(0)
    mfcc = rng.normal(0.0, 10.0, (3, 13, 20)).astype(np.float32)
    frames = rng.uniform(0.0, 255.0, (2, 5, 224, 224, 3)).astype(np.float32)   # BGR 0..255, channels-last
    with torch.no_grad():
        want_audio = reference.forward_aud(torch.from_numpy(mfcc)[:, None]).numpy()
        want_lips = reference.forward_lip(torch.from_numpy(frames).permute(0, 4, 1, 2, 3)).numpy()
    got_audio = model.apply(variables, mfcc, method=SyncNet.embed_audio)
    got_lips = model.apply(variables, frames, method=SyncNet.embed_lips)
    assert got_audio.shape == (3, 1024) and got_lips.shape == (2, 1024)
    assert _rel(got_audio, want_audio) <= 1e-4
    assert _rel(got_lips, want_lips) <= 1e-4


def test_a_wrong_weight_is_detected(reference):
    """The parity check can fail: one BatchNorm statistic changed moves the embeddings."""
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    variables = ckpt.variables_from_state_dict(state, SyncNet())
    state["netcnnaud.5.running_mean"] = state["netcnnaud.5.running_mean"] + 1.0
    changed = ckpt.variables_from_state_dict(state, SyncNet())
    mfcc = np.random.default_rng(1).normal(0.0, 10.0, (2, 13, 20)).astype(np.float32)
    a = SyncNet().apply(variables, mfcc, method=SyncNet.embed_audio)
    b = SyncNet().apply(changed, mfcc, method=SyncNet.embed_audio)
    assert _rel(a, b) > 1e-3


def test_state_dict_errors(reference, tmp_path):
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    missing = {k: v for k, v in state.items() if k != "netfclip.3.weight"}
    with pytest.raises(CheckpointError, match="missing.*lip_fc/layers_3/kernel"):
        ckpt.variables_from_state_dict(missing, SyncNet(), source="x.model")
    with pytest.raises(CheckpointError, match="unknown keys.*__S__.extra"):
        ckpt.variables_from_state_dict({**state, "__S__.extra": np.zeros(1)}, SyncNet())
    wrong = {**state, "netcnnlip.0.weight": np.zeros((96, 3, 5, 7, 6), np.float32)}
    with pytest.raises(CheckpointError, match="netcnnlip.0.weight"):
        ckpt.variables_from_state_dict(wrong, SyncNet())
    with pytest.raises(CheckpointError, match="syncnet_v2.model"):
        ckpt.load_syncnet(tmp_path / "absent.model")
    small = ckpt.variables_from_state_dict(state, SyncNet())       # num_batches_tracked ignored, nothing else
    assert set(small) == {"params", "batch_stats"}


def test_input_shapes_are_checked(reference):
    variables = ckpt.variables_from_state_dict({k: v.numpy() for k, v in reference.state_dict().items()},
                                               SyncNet())
    with pytest.raises(InputError, match="audio windows"):
        SyncNet().apply(variables, np.zeros((1, 13, 19), np.float32), method=SyncNet.embed_audio)
    with pytest.raises(InputError, match="lip windows"):
        SyncNet().apply(variables, np.zeros((1, 5, 112, 112, 3), np.float32), method=SyncNet.embed_lips)


def _reference_evaluate(model, crops_bgr, pcm, vshift=15, batch_size=4):
    """SyncNetInstance.evaluate from the loaded frames and wav on, transcribed (CPU, no files)."""
    import math

    psf = pytest.importorskip("python_speech_features")
    im = np.transpose(np.expand_dims(np.stack(list(crops_bgr), axis=3), 0), (0, 3, 4, 1, 2))
    imtv = torch.from_numpy(im.astype(float)).float()
    mfcc = np.stack([np.array(i) for i in zip(*psf.mfcc(pcm, 16000))])
    cct = torch.from_numpy(np.expand_dims(np.expand_dims(mfcc, 0), 0).astype(float)).float()
    min_length = min(len(crops_bgr), math.floor(len(pcm) / 640))
    lastframe = min_length - 5
    im_feat, cc_feat = [], []
    with torch.no_grad():
        for i in range(0, lastframe, batch_size):
            frames = range(i, min(lastframe, i + batch_size))
            im_feat.append(model.forward_lip(torch.cat([imtv[:, :, v:v + 5] for v in frames], 0)))
            cc_feat.append(model.forward_aud(torch.cat([cct[:, :, :, v * 4:v * 4 + 20] for v in frames], 0)))
    im_feat, cc_feat = torch.cat(im_feat, 0), torch.cat(cc_feat, 0)
    feat2p = torch.nn.functional.pad(cc_feat, (0, 0, vshift, vshift))
    dists = [torch.nn.functional.pairwise_distance(im_feat[[i], :].repeat(2 * vshift + 1, 1),
                                                   feat2p[i:i + 2 * vshift + 1, :]) for i in range(len(im_feat))]
    mdist = torch.mean(torch.stack(dists, 1), 1)
    minval, minidx = torch.min(mdist, 0)
    scores = float(minval), float(torch.median(mdist) - minval), int(vshift - minidx)
    return scores, torch.stack(dists).numpy()


def test_scores_match_reference_evaluate(reference, weights_file):
    """From face crops and 16-bit audio on, the (window, offset) distances and LSE-D / LSE-C / offset equal
    those of the reference's evaluate() run with a PyTorch S holding the same weights. (With random weights
    the zero-padded offsets win, so the distance matrix is the stronger check here.)"""
    from avi_jax.metrics import lip_sync

    rng = np.random.default_rng(5)
    crops = rng.integers(0, 256, (14, 224, 224, 3), dtype=np.uint8)
    pcm = np.rint(rng.normal(0.0, 3000.0, 13 * 640 + 200)).astype(np.int16)   # the audio sets the length
    want, want_dists = _reference_evaluate(reference, crops, pcm)
    variables = ckpt.load_syncnet(weights_file)
    samples = lip_sync.pcm16(pcm)
    video, audio = lip_sync.embed_windows(crops, lip_sync.mfcc(samples), len(samples) // 640, variables,
                                          batch_size=4)
    dists = np.asarray(lip_sync.offset_distances(video, audio))
    assert dists.shape == want_dists.shape == (8, 31)                # min(14, 13) - 5 windows
    assert _rel(dists, want_dists) <= 1e-4
    got = lip_sync.scores_from_distances(dists)
    assert got[2] == want[2]
    assert got[0] == pytest.approx(want[0], rel=1e-4) and got[1] == pytest.approx(want[1], rel=1e-3, abs=1e-3)
