"""Hugging Face BERT / CLIP-text folders -> ``avi_jax.models.text_encoder`` parameters.

Explicit key-map tables (rows ``(flax_path, hf_key, transform)``, see ``convert.py``) for
transformers ``BertModel`` (keys bare, or under ``bert.`` as saved by ``BertForPreTraining`` /
``BertForMaskedLM`` etc.; sentence-transformers folders such as all-MiniLM-L6-v2 are bare ``BertModel``
folders) and for ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` / ``CLIPModel`` (keys bare or under
``text_model.``; ``text_projection.weight`` at the top level).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from avi_jax.checkpoints.convert import Row, build_params, identity, linear
from avi_jax.checkpoints.hf_folder import HFCheckpoint
from avi_jax.errors import CheckpointError, ConfigError
from avi_jax.models.text_encoder import (BertConfig, BertEncoder, ClipTextConfig, ClipTextEncoder)

_BERT_PREFIXES = ("", "bert.")
_CLIP_PREFIXES = ("text_model.", "")


def _dense(path: str, key: str, bias: bool = True) -> list[Row]:
    rows = [(f"{path}/kernel", f"{key}.weight", linear)]
    if bias:
        rows.append((f"{path}/bias", f"{key}.bias", identity))
    return rows


def _norm(path: str, key: str) -> list[Row]:
    return [(f"{path}/scale", f"{key}.weight", identity), (f"{path}/bias", f"{key}.bias", identity)]


def bert_table(config: BertConfig, prefix: str = "") -> list[Row]:
    """Rows mapping transformers ``BertModel`` keys (under ``prefix``, e.g. 'bert.') to ``BertEncoder``
    params. The pooler rows are present iff ``config.add_pooler``."""
    p = prefix
    rows: list[Row] = [
        ("embeddings/word_embeddings/embedding", f"{p}embeddings.word_embeddings.weight", identity),
        ("embeddings/position_embeddings/embedding", f"{p}embeddings.position_embeddings.weight",
         identity),
        ("embeddings/token_type_embeddings/embedding", f"{p}embeddings.token_type_embeddings.weight",
         identity),
        *_norm("embeddings/LayerNorm", f"{p}embeddings.LayerNorm"),
    ]
    for i in range(config.num_hidden_layers):
        f, h = f"layer_{i}", f"{p}encoder.layer.{i}"
        for ours, theirs in (("query", "query"), ("key", "key"), ("value", "value")):
            rows += _dense(f"{f}/attention/{ours}", f"{h}.attention.self.{theirs}")
        rows += _dense(f"{f}/attention/out", f"{h}.attention.output.dense")
        rows += _norm(f"{f}/attention_norm", f"{h}.attention.output.LayerNorm")
        rows += _dense(f"{f}/intermediate", f"{h}.intermediate.dense")
        rows += _dense(f"{f}/output", f"{h}.output.dense")
        rows += _norm(f"{f}/output_norm", f"{h}.output.LayerNorm")
    if config.add_pooler:
        rows += _dense("pooler", f"{p}pooler.dense")
    return rows


def clip_text_table(config: ClipTextConfig, prefix: str = "text_model.") -> list[Row]:
    """Rows mapping transformers CLIP text keys (tower under ``prefix``; ``text_projection.weight`` at
    the top level) to ``ClipTextEncoder`` params. The projection row is present iff
    ``config.projection_dim``."""
    p = prefix
    rows: list[Row] = [
        ("token_embedding/embedding", f"{p}embeddings.token_embedding.weight", identity),
        ("position_embedding/embedding", f"{p}embeddings.position_embedding.weight", identity),
    ]
    for i in range(config.num_hidden_layers):
        f, h = f"layer_{i}", f"{p}encoder.layers.{i}"
        rows += _norm(f"{f}/layer_norm1", f"{h}.layer_norm1")
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                             ("out", "out_proj")):
            rows += _dense(f"{f}/self_attn/{ours}", f"{h}.self_attn.{theirs}")
        rows += _norm(f"{f}/layer_norm2", f"{h}.layer_norm2")
        rows += _dense(f"{f}/fc1", f"{h}.mlp.fc1")
        rows += _dense(f"{f}/fc2", f"{h}.mlp.fc2")
    rows += _norm("final_layer_norm", f"{p}final_layer_norm")
    if config.projection_dim:
        rows += _dense("text_projection", "text_projection", bias=False)
    return rows


def abstract_params(module: Any, length: int = 8) -> dict:
    """``params`` tree of ``jax.ShapeDtypeStruct`` (unboxed) of a text encoder, via ``jax.eval_shape``."""
    ids = jnp.zeros((1, min(length, module.config.max_position_embeddings)), jnp.int32)
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids))
    return meta.unbox(variables)["params"]


def _find_prefix(ckpt: HFCheckpoint, probe: str, prefixes: tuple[str, ...], what: str) -> str:
    for prefix in prefixes:
        if prefix + probe in ckpt:
            return prefix
    raise CheckpointError(
        f"{ckpt.folder}: not a {what} checkpoint: no tensor "
        f"{' / '.join(repr(p + probe) for p in prefixes)}")


def _bert_setup(folder: str, overrides: dict) -> tuple[HFCheckpoint, str, BertConfig]:
    ckpt = HFCheckpoint(folder)
    model_type = ckpt.config.get("model_type", "bert")
    if model_type != "bert":
        raise CheckpointError(f"{folder}: config.json model_type is {model_type!r}, expected 'bert'")
    prefix = _find_prefix(ckpt, "embeddings.word_embeddings.weight", _BERT_PREFIXES, "BERT")
    overrides = dict(overrides)
    overrides.setdefault("add_pooler", f"{prefix}pooler.dense.weight" in ckpt)
    return ckpt, prefix, BertConfig.from_hf(ckpt.config, **overrides)


def _clip_setup(folder: str, overrides: dict) -> tuple[HFCheckpoint, str, ClipTextConfig]:
    ckpt = HFCheckpoint(folder)
    model_type = ckpt.config.get("model_type", "clip")
    if model_type not in ("clip", "clip_text_model"):
        raise CheckpointError(f"{folder}: config.json model_type is {model_type!r}, expected 'clip' "
                              "or 'clip_text_model'")
    prefix = _find_prefix(ckpt, "embeddings.token_embedding.weight", _CLIP_PREFIXES, "CLIP text")
    overrides = dict(overrides)
    if "text_projection.weight" not in ckpt:
        overrides.setdefault("projection_dim", None)
    else:   # the projection width comes from the weight itself (one small tensor read)
        overrides.setdefault("projection_dim", int(ckpt["text_projection.weight"].shape[0]))
    return ckpt, prefix, ClipTextConfig.from_hf(ckpt.config, **overrides)


def bert_config(folder: str, **overrides) -> BertConfig:
    """The ``BertConfig`` that ``load_bert(folder)`` returns, without converting weights: config.json
    plus ``add_pooler`` from whether the folder has pooler weights. Build abstract params from this
    (``BertConfig.from_hf`` alone assumes a pooler). Raises as ``load_bert``."""
    return _bert_setup(folder, overrides)[2]


def clip_text_config(folder: str, **overrides) -> ClipTextConfig:
    """The ``ClipTextConfig`` that ``load_clip_text(folder)`` returns (``projection_dim`` from the
    weights), without converting weights. Raises as ``load_clip_text``."""
    return _clip_setup(folder, overrides)[2]


def load_bert(folder: str, *, shardings: Any | None = None, dtype: Any = np.float32,
              **config_overrides) -> tuple[BertConfig, dict]:
    """Load a local transformers BERT folder (config.json + safetensors / pytorch_model.bin).

    Args:
      folder: e.g. a bert-base-uncased or sentence-transformers/all-MiniLM-L6-v2 snapshot; keys bare
        (``BertModel``) or under ``bert.`` (``BertForPreTraining``, ``BertForMaskedLM``, ...).
      shardings: optional params-shaped tree of ``jax.sharding.Sharding`` (each tensor is placed as
        it is converted).
      dtype: numpy dtype of the parameters (default float32).
      config_overrides: ``BertConfig`` fields to set (e.g. ``pooling='mean', normalize=True``).

    Returns:
      (config, params) for ``BertEncoder(config).apply({'params': params}, ...)``. ``add_pooler`` is
      set from whether the folder has ``pooler.dense`` weights (see ``bert_config``).

    Raises:
      CheckpointError: missing folder/config/weights, unknown key layout, shape mismatch.
      ConfigError: an unsupported BERT variant (relative positions, decoder).
    """
    ckpt, prefix, config = _bert_setup(folder, config_overrides)
    abstract = abstract_params(BertEncoder(config))
    params = build_params(ckpt, bert_table(config, prefix), abstract=abstract, shardings=shardings,
                          dtype=dtype, source=folder)
    return config, params


def load_clip_text(folder: str, *, shardings: Any | None = None, dtype: Any = np.float32,
                   **config_overrides) -> tuple[ClipTextConfig, dict]:
    """Load the text tower of a local transformers CLIP folder (``CLIPModel``, ``CLIPTextModel`` or
    ``CLIPTextModelWithProjection``; tower keys under ``text_model.`` or bare).

    Args: as ``load_bert``.

    Returns:
      (config, params) for ``ClipTextEncoder(config)``; ``projection_dim`` is None when the folder has
      no ``text_projection.weight``.

    Raises:
      CheckpointError: missing folder/config/weights, not a CLIP folder, shape mismatch.
    """
    ckpt, prefix, config = _clip_setup(folder, config_overrides)
    abstract = abstract_params(ClipTextEncoder(config))
    params = build_params(ckpt, clip_text_table(config, prefix), abstract=abstract,
                          shardings=shardings, dtype=dtype, source=folder)
    return config, params


def load_text_encoder(folder: str, **kwargs) -> tuple[BertConfig | ClipTextConfig, dict]:
    """``load_bert`` or ``load_clip_text`` by config.json ``model_type`` ('bert' / 'clip',
    'clip_text_model'); build the module with ``text_encoder_for(config)``.

    Raises:
      CheckpointError: as the loaders. ConfigError: another model_type.
    """
    from avi_jax.checkpoints.hf_folder import read_config
    model_type = read_config(folder).get("model_type")
    if model_type == "bert":
        return load_bert(folder, **kwargs)
    if model_type in ("clip", "clip_text_model"):
        return load_clip_text(folder, **kwargs)
    raise ConfigError(f"{folder}: text encoder model_type {model_type!r} is not supported "
                      "(expected 'bert', 'clip' or 'clip_text_model')")


__all__ = ["bert_table", "clip_text_table", "abstract_params", "bert_config", "clip_text_config",
           "load_bert", "load_clip_text", "load_text_encoder"]
