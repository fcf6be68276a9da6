"""Hugging Face ``LlamaForCausalLM`` folder -> ``avi_jax.models.llama.Llama`` parameters.

An explicit key-map table (``llama_table``) applied by ``convert.build_params``: each tensor is read
lazily from the folder (safetensors, sharded safetensors, or ``pytorch_model*.bin`` via the restricted
unpickler), transposed where needed, cast, and -- when shardings are given -- put straight onto its
devices, so a 7B model never needs a second full host copy. The result is checked against
``jax.eval_shape`` of the model. For a scanned model (``LlamaConfig.scan``) the per-layer tensors are
converted the same way, then stacked layer by layer into ``layers/...`` (``stack_layers``).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from avi_jax.checkpoints.convert import Row, build_params, identity, linear
from avi_jax.checkpoints.hf_folder import HFCheckpoint
from avi_jax.errors import CheckpointError, ConfigError
from avi_jax.models.llama import LlamaConfig, abstract_params


def llama_table(config: LlamaConfig) -> list[Row]:
    """Rows ``(flax_path, hf_key, transform)`` for every parameter of ``Llama(config)``.

    Flax paths are relative to the params tree (``layers_0/self_attn/q_proj/kernel``). Linear weights
    (out, in) are transposed to kernels (in, out); embeddings and norm weights are copied. With tied
    embeddings there is no ``lm_head.weight`` row (the head reuses ``model.embed_tokens.weight``).
    The rows are those of the per-layer layout (``layers_{i}/...``) whatever ``config.scan`` says.
    """
    rows: list[Row] = [("embed_tokens/embedding", "model.embed_tokens.weight", identity)]
    for i in range(config.num_hidden_layers):
        f, h = f"layers_{i}", f"model.layers.{i}"
        rows += [(f"{f}/input_layernorm/scale", f"{h}.input_layernorm.weight", identity),
                 (f"{f}/post_attention_layernorm/scale", f"{h}.post_attention_layernorm.weight", identity)]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            rows.append((f"{f}/self_attn/{name}/kernel", f"{h}.self_attn.{name}.weight", linear))
            if config.attention_bias:
                rows.append((f"{f}/self_attn/{name}/bias", f"{h}.self_attn.{name}.bias", identity))
        for name in ("gate_proj", "up_proj", "down_proj"):
            rows.append((f"{f}/mlp/{name}/kernel", f"{h}.mlp.{name}.weight", linear))
            if config.mlp_bias:
                rows.append((f"{f}/mlp/{name}/bias", f"{h}.mlp.{name}.bias", identity))
    rows.append(("norm/scale", "model.norm.weight", identity))
    if not config.tie_word_embeddings:
        rows.append(("lm_head/kernel", "lm_head.weight", linear))
    return rows


def param_shardings(config: LlamaConfig, mesh: Mesh, rules: Any) -> dict:
    """``NamedSharding`` tree (same structure as ``load_llama``'s params) from the logical axis names
    of every weight and logical->mesh ``rules`` (e.g. ``configs.common.logical_axis_rules()``)."""
    specs = nn.get_partition_spec(abstract_params(config))
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def stack_layers(params: dict, num_layers: int, shardings: Any | None = None) -> dict:
    """Per-layer params (``layers_{i}/...``, as the table builds them) -> the scanned layout ``layers/...``
    with a leading (num_layers,) axis (``LlamaConfig.scan``).

    Stacks one weight at a time and drops the per-layer pieces as it goes, so the peak extra memory is one
    stacked weight. ``shardings``: the scanned model's sharding tree (``param_shardings``); each stacked
    weight is built directly on its sharding (jitted ``jnp.stack`` with ``out_shardings``). Without it,
    host numpy arrays.
    """
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    layers = [params[f"layers_{i}"] for i in range(num_layers)]
    flat = [traverse_util.flatten_dict(layer, sep="/") for layer in layers]
    flat_shardings = (traverse_util.flatten_dict(shardings["layers"], sep="/")
                      if shardings is not None else {})
    stacked = {}
    for path in list(flat[0]):
        pieces = [f.pop(path) for f in flat]
        if path in flat_shardings:
            stacked[path] = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=flat_shardings[path])(*pieces)
        else:
            stacked[path] = np.stack([np.asarray(x) for x in pieces])
        del pieces
    out["layers"] = traverse_util.unflatten_dict(stacked, sep="/")
    return out


def _layer_shardings(shardings: Any, num_layers: int) -> dict:
    """The per-layer shardings (``layers_{i}/...``) of a scanned model's sharding tree: each stacked
    weight's sharding without its leading layer axis."""
    drop = lambda s: NamedSharding(s.mesh, PartitionSpec(*tuple(s.spec)[1:]))   # noqa: E731
    out = {k: v for k, v in shardings.items() if k != "layers"}
    per_layer = jax.tree.map(drop, shardings["layers"])
    out.update({f"layers_{i}": per_layer for i in range(num_layers)})
    return out


def load_llama(folder: str, *, shardings: Any | None = None, dtype: Any = np.float32,
               compute_dtype: Any | None = None, **config_overrides) -> tuple[LlamaConfig, dict]:
    """Load a local Hugging Face LLaMA / Vicuna folder.

    Args:
      folder: holds ``config.json`` and ``model.safetensors`` / ``model.safetensors.index.json`` +
        shards / ``pytorch_model.bin`` (+ index). Nothing is downloaded.
      shardings: optional tree of ``jax.sharding.Sharding`` shaped like the returned params (see
        ``param_shardings``); each tensor is placed on its sharding as soon as it is converted. Without
        it, leaves are host numpy arrays.
      dtype: storage dtype of the weights (e.g. ``np.float32``, ``jnp.bfloat16``); becomes the
        config's ``param_dtype``.
      compute_dtype: the config's ``dtype`` (activations / KV cache); default ``dtype``.
      config_overrides: further ``LlamaConfig`` fields (e.g. ``remat=True``, ``scan=True``: the weights
        are then stacked into the scanned layout, see ``stack_layers``; ``shardings`` are the scanned
        model's).

    Returns:
      ``(config, params)``: the bare params tree, for ``Llama(config).apply({'params': params}, ...)``.

    Raises:
      CheckpointError: missing folder/config/weights, a missing tensor, or a shape that disagrees
        with config.json. ConfigError: an unsupported config (e.g. RoPE scaling).
    """
    ckpt = HFCheckpoint(folder)
    name = np.dtype(dtype).name
    try:
        config = LlamaConfig.from_hf(ckpt.config, param_dtype=name,
                                     dtype=np.dtype(compute_dtype or dtype).name, **config_overrides)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}/config.json: not a LLaMA config ({e!r})") from e
    except ConfigError as e:
        raise ConfigError(f"{folder}/config.json: {e}") from e
    per_layer = config.replace(scan=False)
    abstract = nn.meta.unbox(abstract_params(per_layer))
    layer_shardings = (_layer_shardings(shardings, config.num_hidden_layers)
                       if config.scan and shardings is not None else shardings)
    params = build_params(ckpt, llama_table(per_layer), abstract=abstract, shardings=layer_shardings,
                          dtype=dtype, source=folder)
    if config.scan:
        params = stack_layers(params, config.num_hidden_layers, shardings)
    return config, params


def count_params(params: Any) -> int:
    """Total number of parameters in a (possibly abstract) params tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
