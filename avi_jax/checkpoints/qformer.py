"""Hugging Face folders -> ``avi_jax.models.qformer.QFormer`` parameters.

Two kinds of local folder (config.json + safetensors / pytorch_model.bin), told apart by
config.json ``model_type``:

* ``bert`` (e.g. bert-base-uncased, keys bare or under ``bert.``): BLIP-2's initialisation of the
  Q-Former (LAVIS ``Blip2Base.init_Qformer`` builds ``BertLMHeadModel.from_pretrained('bert-base-uncased')``
  with cross-attention inserted every ``cross_attention_freq``-th layer; ``Blip2Qformer.__init__`` then
  copies each ``*_query`` feed-forward from BERT's ``intermediate`` / ``output``). Self-attention, the
  query feed-forward and the embedding LayerNorm (which BLIP-2's ``BertEmbeddings`` applies to the
  query embeddings) come from BERT; the cross-attention blocks, the learnable queries, the audio
  LayerNorm (LAVIS ``ln_vision``), the projection heads and the temperature keep a fresh
  initialisation. BERT's word/position embeddings and pooler are unused (the queries have no tokens).
* ``blip_2_qformer`` (a transformers ``Blip2QFormerModel`` saved with ``save_pretrained``): every Q-Former
  layer weight and the embedding LayerNorm; the learnable queries (which transformers keeps outside this
  model, in ``Blip2Model.query_tokens``), the audio LayerNorm, the heads and the temperature stay fresh.

Rows are ``(flax_path, hf_key, transform)`` tables as in ``convert.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from avi_jax.checkpoints.convert import Row, build_params
from avi_jax.checkpoints.hf_folder import HFCheckpoint, read_config
from avi_jax.checkpoints.text_encoder import _dense, _find_prefix, _norm
from avi_jax.errors import CheckpointError
from avi_jax.models.qformer import QFormer, QFormerConfig

_KINDS = {"bert": (("", "bert."), "embeddings.LayerNorm.weight"),
          "blip_2_qformer": (("",), "layernorm.weight")}


def _kind(folder: str, cfg: dict) -> str:
    kind = cfg.get("model_type")
    if kind not in _KINDS:
        raise CheckpointError(f"{folder}: config.json model_type is {kind!r}; a Q-Former initialises from "
                              f"'bert' or loads from 'blip_2_qformer'")
    return kind


def qformer_config(folder: str, base: QFormerConfig) -> QFormerConfig:
    """``base`` with the layer architecture read from ``folder``'s config.json.

    From the file: ``hidden_size``, ``num_layers``, ``num_heads``, ``intermediate_size``,
    ``layer_norm_eps``, ``hidden_act`` (and ``cross_attention_freq`` for a ``blip_2_qformer`` folder);
    kept from ``base``: the number of queries, the BERT-init cross-attention frequency (BLIP-2: 2),
    ``embed_dim``, dropout, temperature, ``audio_layer_norm``, ``remat``.

    Raises:
      CheckpointError: missing/unreadable config.json, or a ``model_type`` other than 'bert' /
        'blip_2_qformer'.
    """
    cfg = read_config(folder)
    kind = _kind(folder, cfg)
    arch = dict(hidden_size=int(cfg["hidden_size"]), num_layers=int(cfg["num_hidden_layers"]),
                num_heads=int(cfg["num_attention_heads"]),
                intermediate_size=int(cfg["intermediate_size"]),
                layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
                hidden_act=str(cfg.get("hidden_act", "gelu")))
    if kind == "blip_2_qformer":
        arch["cross_attention_freq"] = int(cfg.get("cross_attention_frequency", 2))
    return dataclasses.replace(base, **arch)


def bert_init_table(config: QFormerConfig, prefix: str = "") -> list[Row]:
    """Rows copying BERT (transformers ``BertModel`` keys under ``prefix``) into the Q-Former's
    embedding LayerNorm, self-attention and query feed-forward of every layer (BLIP-2 init)."""
    p = prefix
    rows = _norm("embed_norm", f"{p}embeddings.LayerNorm")
    for i in range(config.num_layers):
        f, h = f"layers_{i}", f"{p}encoder.layer.{i}"
        for name in ("query", "key", "value"):
            rows += _dense(f"{f}/self_attn/{name}", f"{h}.attention.self.{name}")
        rows += _dense(f"{f}/self_attn/out", f"{h}.attention.output.dense")
        rows += _norm(f"{f}/self_attn_norm", f"{h}.attention.output.LayerNorm")
        rows += _dense(f"{f}/mlp_in", f"{h}.intermediate.dense")
        rows += _dense(f"{f}/mlp_out", f"{h}.output.dense")
        rows += _norm(f"{f}/mlp_norm", f"{h}.output.LayerNorm")
    return rows


def blip2_qformer_table(config: QFormerConfig, prefix: str = "") -> list[Row]:
    """Rows mapping transformers ``Blip2QFormerModel`` keys (under ``prefix``) to ``QFormer`` params:
    ``layernorm`` -> ``embed_norm``; per layer ``attention.*`` -> ``self_attn``, ``crossattention.*`` ->
    ``cross_attn`` (layers with ``i % cross_attention_freq == 0``), ``intermediate_query`` /
    ``output_query`` -> ``mlp_*``."""
    p = prefix
    rows = _norm("embed_norm", f"{p}layernorm")
    for i in range(config.num_layers):
        f, h = f"layers_{i}", f"{p}encoder.layer.{i}"
        blocks = [("self_attn", "attention")]
        if config.has_cross_attention(i):
            blocks.append(("cross_attn", "crossattention"))
        for ours, theirs in blocks:
            for name in ("query", "key", "value"):
                rows += _dense(f"{f}/{ours}/{name}", f"{h}.{theirs}.attention.{name}")
            rows += _dense(f"{f}/{ours}/out", f"{h}.{theirs}.output.dense")
            rows += _norm(f"{f}/{ours}_norm", f"{h}.{theirs}.output.LayerNorm")
        rows += _dense(f"{f}/mlp_in", f"{h}.intermediate_query.dense")
        rows += _dense(f"{f}/mlp_out", f"{h}.output_query.dense")
        rows += _norm(f"{f}/mlp_norm", f"{h}.output_query.LayerNorm")
    return rows


def fresh_params(config: QFormerConfig, rng: jax.Array, *, audio_width: int, text_width: int,
                 shardings: Any | None = None) -> dict:
    """A seeded ``QFormer(config)`` initialisation (unboxed params), made by one jitted function with
    ``out_shardings=shardings`` when given (never materialised unsharded). ``audio_width``: E of the
    (B, T, E) speech features; ``text_width``: W of the (B, W) text [CLS] features."""
    def init():
        audio = jnp.zeros((1, 1, audio_width), jnp.float32)
        variables = QFormer(config).init(rng, audio, jnp.ones((1, 1), bool),
                                         jnp.zeros((1, text_width), jnp.float32), method=QFormer.init_all)
        return meta.unbox(variables)["params"]
    return jax.jit(init, out_shardings=shardings)()


def _table(ckpt: HFCheckpoint, config: QFormerConfig) -> list[Row]:
    kind = _kind(ckpt.folder, ckpt.config)
    prefixes, probe = _KINDS[kind]
    prefix = _find_prefix(ckpt, probe, prefixes, "BERT" if kind == "bert" else "Blip2QFormerModel")
    return (bert_init_table if kind == "bert" else blip2_qformer_table)(config, prefix)


def load_qformer(folder: str, config: QFormerConfig, rng: jax.Array, *, audio_width: int,
                 text_width: int, shardings: Any | None = None, dtype: Any = np.float32
                 ) -> tuple[dict, list[str]]:
    """Q-Former parameters initialised from a BERT folder (BLIP-2 init) or loaded from a
    ``Blip2QFormerModel`` folder; everything the folder does not provide is ``fresh_params``.

    Args:
      folder: local transformers folder, config.json ``model_type`` 'bert' or 'blip_2_qformer'.
      config: the Q-Former's config; its layer architecture must equal the folder's (build it with
        ``qformer_config(folder, base)``).
      rng: PRNG key of the fresh parameters.
      audio_width, text_width: E and W of the speech / text features (see ``fresh_params``).
      shardings: optional params-shaped tree of ``jax.sharding.Sharding``; every tensor is placed on it.
      dtype: numpy dtype of the loaded tensors (default float32).

    Returns:
      ``(params, loaded)``: the unboxed params tree for ``QFormer(config)``, and the sorted '/'-joined
      paths of the leaves taken from the folder (the others are fresh).

    Raises:
      CheckpointError: missing folder/config/weights, another ``model_type``, a missing tensor, or a
        shape that disagrees with ``config`` (e.g. cross-attention keys of another audio width).
    """
    ckpt = HFCheckpoint(folder)
    table = _table(ckpt, config)
    fresh = fresh_params(config, rng, audio_width=audio_width, text_width=text_width,
                         shardings=shardings)
    flat = traverse_util.flatten_dict(fresh, sep="/")
    wanted = {path: jax.ShapeDtypeStruct(flat[path].shape, flat[path].dtype)
              for path, _, _ in table if path in flat}   # build_params names any other path
    loaded = build_params(ckpt, table, abstract=traverse_util.unflatten_dict(wanted, sep="/"),
                          shardings=shardings, dtype=dtype, source=folder)
    flat_loaded = traverse_util.flatten_dict(loaded, sep="/")
    if shardings is None:
        flat_loaded = {p: jnp.asarray(v) for p, v in flat_loaded.items()}
    params = traverse_util.unflatten_dict({**flat, **flat_loaded}, sep="/")
    return params, sorted(flat_loaded)


__all__ = ["qformer_config", "bert_init_table", "blip2_qformer_table", "fresh_params", "load_qformer"]
