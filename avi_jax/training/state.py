"""Train state and optimizer: AdamW with linear warmup + cosine decay and global-norm clipping.

Frozen parameters (pretrained HuBERT, text encoder, LLaMA) live outside the optimizer in a separate
tree: gradients are taken with respect to the trainable tree only, so a frozen 7B LLM costs no gradient
or optimizer memory.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


@flax.struct.dataclass
class TrainState:
    """step () int32; params: trainable tree; opt_state: optax state of ``params``."""
    step: jax.Array
    params: Any
    opt_state: Any


def make_schedule(opt_config: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * final_lr_ratio``."""
    warmup = min(int(opt_config.warmup_steps), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(opt_config.lr), warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=float(opt_config.lr) * float(opt_config.final_lr_ratio))


def make_optimizer(opt_config: Any, total_steps: int) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay on >=2-d weights only) + ``make_schedule`` + global-norm clipping.

    ``opt_config`` fields: lr, warmup_steps, final_lr_ratio, weight_decay, b1, b2, clip_norm, and
    optionally ``frozen_patterns``: regular expressions over '/'-joined parameter paths (e.g.
    ``audio_encoder/feature_extractor/``) whose parameters are kept fixed inside a trained component
    (like transformers' ``freeze_feature_encoder``); the train step wraps them in
    :func:`stop_frozen_gradients`, so their gradients are never computed.
    """
    decay_mask = lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
    adamw = optax.chain(
        optax.clip_by_global_norm(float(opt_config.clip_norm)),
        optax.adamw(make_schedule(opt_config, total_steps), b1=float(opt_config.b1),
                    b2=float(opt_config.b2), weight_decay=float(opt_config.weight_decay),
                    mask=decay_mask),
    )
    if not opt_config.get("frozen_patterns", ()):
        return adamw
    labels = lambda params: jax.tree.map(lambda f: "frozen" if f else "trained",
                                         frozen_mask(opt_config, params))
    return optax.multi_transform({"trained": adamw, "frozen": optax.set_to_zero()}, labels)


def frozen_mask(opt_config: Any, params: Any) -> Any:
    """Tree of bools like ``params``: True where a '/'-joined path matches ``opt_config.frozen_patterns``."""
    patterns = [re.compile(p) for p in opt_config.get("frozen_patterns", ())]
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict({k: any(p.search(k) for p in patterns) for k in flat}, sep="/")


def stop_frozen_gradients(opt_config: Any, params: Any) -> Any:
    """``params`` with ``lax.stop_gradient`` on the ``frozen_patterns`` leaves.

    Applied inside the loss, so XLA never computes those gradients (e.g. no backward pass through a
    frozen conv feature encoder); the optimizer's ``set_to_zero`` branch then keeps them fixed.
    """
    if not opt_config.get("frozen_patterns", ()):
        return params
    return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params,
                        frozen_mask(opt_config, params))


def optimizer_shardings(tx: optax.GradientTransformation, boxed_params: Any, mesh: jax.sharding.Mesh,
                        rules: Sequence[tuple[str, Any]]) -> Any:
    """``NamedSharding`` per leaf of ``tx.init(params)``, derived from the abstract optimizer state.

    ``tx.init`` is traced (``jax.eval_shape``) over the *boxed* parameters (leaves
    ``nn.LogicallyPartitioned``): optax builds its moments with ``tree_map`` over the parameters, so
    Adam's ``mu``/``nu`` keep each parameter's logical axes and the rules that shard a parameter shard
    its moments too (flax ``examples/lm1b``; MaxText ``maxtext_utils.get_abstract_state``). This holds
    for :func:`make_optimizer`'s chain, its masked weight decay and its ``multi_transform`` over
    ``frozen_patterns`` (the frozen branch holds no state). Leaves without a box (step counts, and any
    state an optax transformation builds other than by mapping over the parameters) are replicated.

    Args:
      tx: the optimizer.
      boxed_params: the trainable parameters, boxed; arrays or ``ShapeDtypeStruct`` leaves.
      mesh: the device mesh.
      rules: logical axis -> mesh axes (``config.logical_axis_rules``).

    Returns:
      A tree of ``NamedSharding`` with the structure of the unboxed ``tx.init(params)``.
    """
    abstract = jax.eval_shape(tx.init, boxed_params)
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, list(rules))
