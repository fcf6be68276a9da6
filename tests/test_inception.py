"""The FID InceptionV3 (Flax) against pytorch-fid's network with the same random weights, read from a .pth
file in both torch.save formats; and the weights reader's errors.

The reference is written here in PyTorch following torchvision's ``models/inception.py`` (``Inception3``,
``BasicConv2d``, ``InceptionA..E``) and pytorch-fid's ``inception.py`` (``FIDInceptionA``, ``FIDInceptionC``,
``FIDInceptionE_1``, ``FIDInceptionE_2``; ``InceptionV3([3])``: resize to 299 bilinear, 2x - 1, pool3):
torchvision builds for torch 2.13 are not installable beside the CPU torch, so the classes are restated with
the same module names, hence the same state-dict keys as ``pt_inception-2015-12-05-6726825d.pth``.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from avi_jax.checkpoints.inception import FID_WEIGHTS_URL, load_inception
from avi_jax.errors import CheckpointError
from avi_jax.models.inception import FIDInceptionV3, resize_bilinear

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional


class _BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _fid_avg(x):        # pytorch-fid's patch: TensorFlow's average pool ignores the padding
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _A(nn.Module):    # FIDInceptionA
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = _BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = _BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = _BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = _BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_fid_avg(x))], 1)


class _B(nn.Module):    # torchvision InceptionB
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = _BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _C(nn.Module):    # FIDInceptionC
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = _BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = _BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = _BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = _BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = _BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = _BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_fid_avg(x))], 1)


class _D(nn.Module):    # torchvision InceptionD
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = _BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = _BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = _BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = _BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _E(nn.Module):    # FIDInceptionE_1 (average pool) / FIDInceptionE_2 (max pool)
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = _BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = _BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _fid_avg(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class TorchFIDInception(nn.Module):
    """pytorch-fid ``InceptionV3(output_blocks=[3])`` on ``fid_inception_v3()`` (state-dict names of
    torchvision's ``Inception3(num_classes=1008, aux_logits=False)``)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = _BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = _BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = _BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = _BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _A(192, 32), _A(256, 64), _A(288, 64)
        self.Mixed_6a = _B(288)
        self.Mixed_6b, self.Mixed_6c = _C(768, 128), _C(768, 160)
        self.Mixed_6d, self.Mixed_6e = _C(768, 160), _C(768, 192)
        self.Mixed_7a = _D(768)
        self.Mixed_7b, self.Mixed_7c = _E(1280, False), _E(2048, True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):                       # (B, 3, H, W) in [0, 1] -> (B, 2048)
        x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def _randomized(seed: int = 0) -> TorchFIDInception:
    """Random weights that keep activations O(1) through the 94 layers: He-scaled convs, BatchNorm with
    random affine and running statistics (so every term of the normalisation is exercised)."""
    gen = torch.Generator().manual_seed(seed)
    model = TorchFIDInception().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    return model


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = _randomized()
    folder = tmp_path_factory.mktemp("inception")
    paths = {}
    for fmt, zip_format in (("zip", True), ("legacy", False)):
        paths[fmt] = str(folder / f"pt_inception_{fmt}.pth")
        torch.save(model.state_dict(), paths[fmt], _use_new_zipfile_serialization=zip_format)
    return model, paths


def _rel_err(got, want) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_parity_with_pytorch_fid_network(reference):
    """Same random weights (read from the legacy .pth, as the real 2019 file is written) -> same pool3
    features, rel. error <= 1e-4, on a non-square input that exercises the 299x299 resize."""
    model, paths = reference
    images = np.random.default_rng(1).uniform(0, 1, (2, 72, 96, 3)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    variables = load_inception(paths["legacy"])
    got = np.asarray(FIDInceptionV3().apply(variables, images))
    assert got.shape == (2, 2048) and want.std() > 1e-2
    assert _rel_err(got, want) <= 1e-4, _rel_err(got, want)
    # The zip format gives the same variables.
    jax.tree.map(np.testing.assert_array_equal, variables, load_inception(paths["zip"]))


@pytest.mark.parametrize("shape", [(2, 40, 64, 3), (1, 512, 384, 3)])
def test_resize_matches_torch_interpolate(shape):
    """Up- and down-sampling to 299 as ``F.interpolate(bilinear, align_corners=False)`` (no antialias)."""
    images = np.random.default_rng(2).uniform(0, 1, shape).astype(np.float32)
    want = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                         align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(resize_bilinear(images)), want, atol=2e-6)


def test_load_errors_name_the_file(reference, tmp_path):
    model, _ = reference
    with pytest.raises(CheckpointError, match=FID_WEIGHTS_URL.replace(".", r"\.")):
        load_inception(str(tmp_path / "absent.pth"))
    state = model.state_dict()
    missing = dict(state)
    del missing["Mixed_6c.branch7x7dbl_3.bn.running_var"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing\.pth: missing tensor 'Mixed_6c\.branch7x7dbl_3\.bn"):
        load_inception(str(tmp_path / "missing.pth"))
    other = dict(state, **{"AuxLogits.fc.weight": torch.zeros(2, 2)})
    torch.save(other, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other\.pth: tensors the FID Inception does not have"):
        load_inception(str(tmp_path / "other.pth"))
    wrong = dict(state, **{"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 5, 5)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match=r"wrong\.pth: 'Conv2d_1a_3x3\.conv\.weight' has shape"):
        load_inception(str(tmp_path / "wrong.pth"))
