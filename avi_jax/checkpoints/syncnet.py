"""Load syncnet_python's ``syncnet_v2.model`` into the Flax :class:`avi_jax.models.syncnet.SyncNet`.

The file is what ``SyncNetInstance.loadParameters`` reads with ``torch.load``: a state dict of ``S``
(keys ``netcnnaud.<i>.*``, ``netfcaud.<i>.*``, ``netcnnlip.<i>.*``, ``netfclip.<i>.*``; torch's legacy
serialization for the released file, the zip format for a re-saved one). It is read without torch by the
restricted reader :func:`avi_jax.checkpoints.torch_bin.load_torch_bin`; nothing in it is executed.

Key map (reference ``<stack>.<i>`` -> Flax ``<stack'>/layers_<i>``, stacks ``netcnnaud -> audio_cnn``,
``netfcaud -> audio_fc``, ``netcnnlip -> lip_cnn``, ``netfclip -> lip_fc``):

- Conv2d/Conv3d ``weight`` (O, I, *k) -> ``kernel`` (*k, I, O); ``bias`` -> ``bias``;
- Linear ``weight`` (O, I) -> ``kernel`` (I, O); ``bias`` -> ``bias``;
- BatchNorm ``weight`` -> ``scale``, ``bias`` -> ``bias`` (params); ``running_mean`` -> ``mean``,
  ``running_var`` -> ``var`` (``batch_stats``); ``num_batches_tracked`` (torch >= 0.4.1) is ignored.

Every parameter of the model must be in the file with its exact shape, and the file may hold nothing
else (``loadParameters`` fails on an unknown key too); otherwise ``CheckpointError`` names the file and
the keys. Where users get the file: ``download_model.sh`` of https://github.com/joonson/syncnet_python
(http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model).
"""
from __future__ import annotations

import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from avi_jax.checkpoints.torch_bin import load_torch_bin
from avi_jax.errors import CheckpointError
from avi_jax.models import syncnet as syncnet_lib

STACKS = {"netcnnaud": "audio_cnn", "netfcaud": "audio_fc", "netcnnlip": "lip_cnn", "netfclip": "lip_fc"}
_IGNORED = ("num_batches_tracked",)
# reference tensor name -> (Flax collection, Flax leaf name)
_LEAVES = {"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def abstract_variables(model: syncnet_lib.SyncNet) -> dict[str, Any]:
    """The ``{'params', 'batch_stats'}`` shapes of ``model`` (``jax.ShapeDtypeStruct`` leaves, unboxed)."""
    mfcc = jnp.zeros((1, syncnet_lib.MFCC_COEFFICIENTS, syncnet_lib.AUDIO_WINDOW))
    frames = jnp.zeros((1, syncnet_lib.VIDEO_WINDOW, syncnet_lib.CROP_SIZE, syncnet_lib.CROP_SIZE, 3))
    shapes = jax.eval_shape(model.init, jax.random.key(0), mfcc, frames)
    return flax.core.unfreeze(flax.linen.meta.unbox(shapes))


def _target(name: str, array: np.ndarray, is_bn: bool) -> tuple[str, tuple[str, ...], np.ndarray]:
    """(collection, Flax path, converted array) of the reference tensor ``name``; ('', ()) if unknown."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in STACKS or not parts[1].isdigit():
        return "", (), array
    stack, index, leaf = parts
    module = (STACKS[stack], f"layers_{index}")
    if leaf in _LEAVES:
        collection, flax_leaf = _LEAVES[leaf]
        return collection, module + (flax_leaf,), array
    if leaf == "bias":
        return "params", module + ("bias",), array
    if leaf != "weight":
        return "", (), array
    if is_bn:
        return "params", module + ("scale",), array
    if array.ndim >= 2:   # Conv (O, I, *k) -> (*k, I, O); Linear (O, I) -> (I, O)
        array = np.transpose(array, tuple(range(2, array.ndim)) + (1, 0))
    return "params", module + ("kernel",), array


def variables_from_state_dict(state: dict[str, np.ndarray], model: syncnet_lib.SyncNet, *,
                              source: str = "<state dict>") -> dict[str, Any]:
    """Convert a reference state dict to ``{'params', 'batch_stats'}`` of ``model`` (float32 numpy leaves).

    Raises:
      CheckpointError: a key of the model is missing, a key of the file is not the model's, or a tensor's
        shape differs (the message names ``source`` and the keys).
    """
    abstract = abstract_variables(model)
    expected = {(c,) + path: leaf.shape for c in abstract
                for path, leaf in flax.traverse_util.flatten_dict(abstract[c]).items()}
    bn_modules = {path[1:-1] for path in expected if path[0] == "batch_stats"}
    found: dict[tuple[str, ...], np.ndarray] = {}
    unknown = []
    for name, array in state.items():
        if name.rsplit(".", 1)[-1] in _IGNORED:
            continue
        parts = name.split(".")
        is_bn = len(parts) == 3 and (STACKS.get(parts[0]), f"layers_{parts[1]}") in bn_modules
        collection, path, converted = _target(name, np.asarray(array), is_bn)
        key = (collection,) + path
        if key not in expected:
            unknown.append(name)
            continue
        if converted.shape != expected[key]:
            raise CheckpointError(f"{source}: tensor '{name}' has shape {tuple(np.shape(array))}, the SyncNet "
                                  f"(embed_dim={model.embed_dim}) expects {expected[key]} after conversion")
        found[key] = np.asarray(converted, np.float32)
    missing = sorted("/".join(k) for k in expected if k not in found)
    if unknown or missing:
        raise CheckpointError(f"{source}: not a syncnet_python S state dict: unknown keys {sorted(unknown)[:5]}"
                              f"{' ...' if len(unknown) > 5 else ''}, missing {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}")
    out: dict[str, Any] = {}
    for collection in abstract:
        out[collection] = flax.traverse_util.unflatten_dict(
            {k[1:]: v for k, v in found.items() if k[0] == collection})
    return out


def load_syncnet(path: str | os.PathLike[str], model: syncnet_lib.SyncNet | None = None) -> dict[str, Any]:
    """Read ``syncnet_v2.model`` (or a re-saved copy) into SyncNet variables, without torch.

    Args:
      path: the ``torch.save`` file (legacy or zip format) of syncnet_python's ``S`` state dict.
      model: the module the variables are for (default ``SyncNet()``, embed_dim 1024).

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` of float32 numpy arrays, for ``model.apply``.

    Raises:
      CheckpointError: the file is missing, unreadable, unsafe (``UnsafePickleError``) or not the
        model's state dict (missing/unknown keys, wrong shapes).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: SyncNet weights not found; get syncnet_v2.model from syncnet_python's "
                              "download_model.sh (http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/"
                              "syncnet_v2.model) and pass its path")
    return variables_from_state_dict(load_torch_bin(path), model or syncnet_lib.SyncNet(), source=path)


__all__ = ["load_syncnet", "variables_from_state_dict", "abstract_variables", "STACKS"]
