"""The FID Inception weights (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``) -> Flax variables.

The file is a ``torch.save`` state dict (read without torch by :mod:`avi_jax.checkpoints.torch_bin`, either
format) of pytorch-fid's ``fid_inception_v3()``: torchvision ``Inception3`` names such as
``Mixed_6b.branch7x7_2.conv.weight`` and ``Mixed_6b.branch7x7_2.bn.{weight,bias,running_mean,running_var}``,
plus the classifier ``fc.*`` (1008 classes), which pool3 features do not use. The map is name for name
(:mod:`avi_jax.models.inception` keeps the PyTorch module names): conv ``weight`` (out, in, kh, kw) ->
``kernel`` (kh, kw, in, out); BatchNorm ``weight``/``bias`` -> ``params`` ``scale``/``bias``;
``running_mean``/``running_var`` -> ``batch_stats`` ``mean``/``var``.

Users get the file from pytorch-fid's GitHub release (``FID_WEIGHTS_URL``); nothing downloads at run time.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from avi_jax.checkpoints.convert import Row, build_params, identity
from avi_jax.checkpoints.torch_bin import load_torch_bin
from avi_jax.errors import CheckpointError
from avi_jax.models.inception import FIDInceptionV3

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
# State-dict entries the pool3 features do not use.
_UNUSED = ("fc.weight", "fc.bias")
_TORCH_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                "var": "running_var"}


def conv2d(w: np.ndarray) -> np.ndarray:
    """PyTorch ``nn.Conv2d.weight`` (out, in, kh, kw) -> Flax ``nn.Conv.kernel`` (kh, kw, in, out)."""
    return np.transpose(w, (2, 3, 1, 0))


def abstract_variables() -> dict:
    """``{'params': ..., 'batch_stats': ...}`` of :class:`FIDInceptionV3` as ``jax.ShapeDtypeStruct`` (unboxed)."""
    model = FIDInceptionV3(resize_input=False)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3), jnp.float32)))
    return meta.unbox(dict(variables))


def inception_table(abstract: dict) -> list[Row]:
    """Rows ``(flax path, torch key, transform)`` for every variable of ``abstract``
    (``params/Mixed_5b/branch1x1/conv/kernel`` <- ``Mixed_5b.branch1x1.conv.weight``)."""
    rows = []
    for path in traverse_util.flatten_dict(abstract, sep="/"):
        collection, *modules, leaf = path.split("/")
        key = ".".join(modules + [_TORCH_NAMES[leaf]])
        rows.append((path, key, conv2d if leaf == "kernel" else identity))
    return rows


def missing_weights_reason(path: str | None) -> str:
    """Why FID/KID cannot be computed without the weights file: names the file and where to get it."""
    where = f"{path!r} does not exist" if path else "no --inception-weights given"
    return (f"needs the FID Inception weights {WEIGHTS_FILE} ({where}); download it from pytorch-fid's "
            f"GitHub release {FID_WEIGHTS_URL} and pass its path")


def load_inception(path: str) -> dict:
    """Read the FID Inception weights into ``{'params': ..., 'batch_stats': ...}`` (numpy float32) for
    ``FIDInceptionV3().apply``.

    Raises:
      CheckpointError: the file is missing or unreadable (see ``load_torch_bin``), a tensor is missing or
        has the wrong shape, or the file holds tensors the FID Inception does not have (another network's
        weights); the message names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file; {missing_weights_reason(None)}")
    state = load_torch_bin(path)
    abstract = abstract_variables()
    table = inception_table(abstract)
    used = {key for _, key, _ in table} | set(_UNUSED)
    extra = sorted(k for k in state if k not in used and not k.endswith(".num_batches_tracked"))
    if extra:
        raise CheckpointError(f"{path}: tensors the FID Inception does not have: {extra[:6]} ({len(extra)} "
                              "in all); is this pytorch-fid's pt_inception-2015-12-05 file?")
    return build_params(state, table, abstract=abstract, source=path)

