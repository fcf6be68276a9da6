"""Hugging Face HuBERT / Wav2Vec2 checkpoints -> ``AudioEncoder`` params.

An explicit key map (``audio_encoder_table``) from transformers ``HubertModel`` / ``Wav2Vec2Model``
state-dict keys to the Flax tree of ``avi_jax.models.audio_encoder``. Folders saved from a head model
(``HubertForCTC``, ``Wav2Vec2ForCTC``, ``...ForSequenceClassification``, ``Wav2Vec2ForPreTraining``) carry
a ``hubert.`` / ``wav2vec2.`` prefix; the loader detects it, and the positional-conv weight-norm key
style (``parametrizations.weight.original0/1`` from torch>=2.1 ``parametrizations.weight_norm``, or the
legacy ``weight_g`` / ``weight_v``). Head weights (``lm_head``, ``projector``, quantizer) and
``masked_spec_embed`` are ignored.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from avi_jax.checkpoints import convert
from avi_jax.checkpoints.convert import Row
from avi_jax.checkpoints.hf_folder import HFCheckpoint, read_config
from avi_jax.errors import CheckpointError, ConfigError
from avi_jax.models.audio_encoder import AudioEncoder, AudioEncoderConfig, receptive_field

WEIGHT_NORM_KEYS = {
    "parametrizations": ("parametrizations.weight.original0", "parametrizations.weight.original1"),
    "legacy": ("weight_g", "weight_v"),
}


PREPROCESSOR_CONFIG = "preprocessor_config.json"
_ATTENTION = (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj"))


def _norm(flax_path: str, hf_key: str) -> list[Row]:
    return [(f"{flax_path}/scale", f"{hf_key}.weight", convert.identity),
            (f"{flax_path}/bias", f"{hf_key}.bias", convert.identity)]


def _dense(flax_path: str, hf_key: str) -> list[Row]:
    return [(f"{flax_path}/kernel", f"{hf_key}.weight", convert.linear),
            (f"{flax_path}/bias", f"{hf_key}.bias", convert.identity)]


def audio_encoder_table(config: AudioEncoderConfig, *, prefix: str = "",
                        weight_norm: str = "parametrizations") -> list[Row]:
    """Rows ``(flax_path, hf_key, transform)`` for every ``AudioEncoder`` parameter.

    Args:
      config: the encoder config (decides which norm/bias rows exist).
      prefix: prepended to every HF key: '' for ``HubertModel``/``Wav2Vec2Model`` folders, 'hubert.' or
        'wav2vec2.' for folders saved from head models (see ``detect_layout``).
      weight_norm: 'parametrizations' (``conv.parametrizations.weight.original0/1``) or 'legacy'
        (``conv.weight_g/weight_v``) naming of the positional-conv weight norm.

    Transforms: ``linear`` (out, in) -> (in, out); ``conv1d`` (out, in/groups, k) -> (k, in/groups, out),
    applied to both weight-norm tensors (g (1, 1, K) -> (K, 1, 1)).
    """
    if weight_norm not in WEIGHT_NORM_KEYS:
        raise ValueError(f"weight_norm={weight_norm!r}: expected one of {sorted(WEIGHT_NORM_KEYS)}")
    rows: list[Row] = []
    for i in range(len(config.conv_dim)):
        f, h = f"feature_extractor/conv_layers_{i}", f"feature_extractor.conv_layers.{i}"
        rows.append((f"{f}/conv/kernel", f"{h}.conv.weight", convert.conv1d))
        if config.conv_bias:
            rows.append((f"{f}/conv/bias", f"{h}.conv.bias", convert.identity))
        if config.feat_extract_norm == "layer" or i == 0:
            rows += _norm(f"{f}/layer_norm", f"{h}.layer_norm")
    if config.feat_proj_layer_norm:
        rows += _norm("feature_projection/layer_norm", "feature_projection.layer_norm")
    rows += _dense("feature_projection/projection", "feature_projection.projection")
    g_key, v_key = WEIGHT_NORM_KEYS[weight_norm]
    rows += [
        ("encoder/pos_conv_embed/weight_g", f"encoder.pos_conv_embed.conv.{g_key}", convert.conv1d),
        ("encoder/pos_conv_embed/weight_v", f"encoder.pos_conv_embed.conv.{v_key}", convert.conv1d),
        ("encoder/pos_conv_embed/bias", "encoder.pos_conv_embed.conv.bias", convert.identity),
    ]
    rows += _norm("encoder/layer_norm", "encoder.layer_norm")
    for layer in range(config.num_hidden_layers):
        f, h = f"encoder/layers_{layer}", f"encoder.layers.{layer}"
        for ours, theirs in _ATTENTION:
            rows += _dense(f"{f}/attention/{ours}", f"{h}.attention.{theirs}")
        rows += _norm(f"{f}/layer_norm", f"{h}.layer_norm")
        rows += _dense(f"{f}/feed_forward/intermediate_dense", f"{h}.feed_forward.intermediate_dense")
        rows += _dense(f"{f}/feed_forward/output_dense", f"{h}.feed_forward.output_dense")
        rows += _norm(f"{f}/final_layer_norm", f"{h}.final_layer_norm")
    return [(path, prefix + key, transform) for path, key, transform in rows]


def detect_layout(keys: Iterable[str], *, source: str = "checkpoint") -> tuple[str, str]:
    """(prefix, weight_norm) of a HuBERT/Wav2Vec2 state dict from its keys.

    Raises ``CheckpointError`` when no positional-conv weight is found under any known prefix.
    """
    keys = set(keys)
    for prefix in ("", "hubert.", "wav2vec2."):
        for style, (g_key, _) in WEIGHT_NORM_KEYS.items():
            if f"{prefix}encoder.pos_conv_embed.conv.{g_key}" in keys:
                return prefix, style
    if any(k.endswith("encoder.pos_conv_embed.conv.weight") for k in keys):
        raise CheckpointError(f"{source}: positional conv has no weight norm (conv_pos_batch_norm "
                              "checkpoints are not supported)")
    raise CheckpointError(
        f"{source}: no HuBERT/Wav2Vec2 positional-conv weights found (looked for "
        "[hubert.|wav2vec2.]encoder.pos_conv_embed.conv.{parametrizations.weight.original0|weight_g}); "
        "is this a HubertModel / Wav2Vec2Model folder?")


def abstract_params(config: AudioEncoderConfig) -> Any:
    """``jax.eval_shape`` of the module init: a params tree of ``jax.ShapeDtypeStruct`` (unboxed)."""
    model = AudioEncoder(config)
    n = receptive_field(config)   # one output frame; shapes only, nothing is computed
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, n), jnp.float32)))
    return meta.unbox(variables["params"])


def audio_config(folder: str) -> AudioEncoderConfig:
    """``AudioEncoderConfig`` of a local HF HuBERT / Wav2Vec2 folder: ``config.json`` plus the feature
    extractor's ``do_normalize`` from ``preprocessor_config.json``.

    A folder without ``preprocessor_config.json`` gets ``Wav2Vec2FeatureExtractor``'s default
    (``do_normalize=True``) and a warning. Raises ``CheckpointError`` (missing/malformed files) or
    ``ConfigError`` (unsupported options), naming the file.
    """
    try:
        config = read_config(folder)
        if os.path.isfile(os.path.join(folder, PREPROCESSOR_CONFIG)):
            preprocessor = read_config(folder, PREPROCESSOR_CONFIG)
        else:
            logging.warning("%s: no %s; normalising waveforms as Wav2Vec2FeatureExtractor does by "
                            "default (do_normalize=True)", folder, PREPROCESSOR_CONFIG)
            preprocessor = {"do_normalize": True}
        return AudioEncoderConfig.from_hf(config, preprocessor)
    except ConfigError as e:
        raise ConfigError(f"{folder}/config.json: {e}") from e


def load_audio_encoder(folder: str, *, shardings: Any | None = None,
                       dtype: Any = np.float32) -> tuple[AudioEncoderConfig, dict]:
    """Load a local Hugging Face HuBERT / Wav2Vec2 folder into ``AudioEncoder`` params.

    Args:
      folder: holds ``config.json`` (model_type 'hubert' or 'wav2vec2'), optionally
        ``preprocessor_config.json`` (see :func:`audio_config`), and ``model.safetensors``
        (optionally sharded) or ``pytorch_model.bin`` (read without torch, see ``torch_bin``).
      shardings: optional tree of ``jax.sharding.Sharding`` matching the params; each tensor is placed
        on its sharding as it is converted.
      dtype: numpy dtype of the returned leaves.

    Returns:
      ``(config, params)``; use as ``AudioEncoder(config).apply({'params': params}, wav)``.

    Raises:
      CheckpointError: folder/weights missing or not matching ``config.json``.
      ConfigError: unsupported model type or options in ``config.json``.
    """
    ckpt = HFCheckpoint(folder)
    config = audio_config(folder)
    prefix, weight_norm = detect_layout(ckpt.keys(), source=folder)
    table = audio_encoder_table(config, prefix=prefix, weight_norm=weight_norm)
    params = convert.build_params(ckpt, table, abstract=abstract_params(config), shardings=shardings,
                                  dtype=dtype, source=folder)
    return config, params
