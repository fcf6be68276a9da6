"""Optimizer: the warmup-cosine schedule's values, frozen parameter patterns and the optimizer state's
shardings."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from avi_jax import sharding as mesh_lib
from avi_jax.training.state import make_optimizer, make_schedule, optimizer_shardings, stop_frozen_gradients
from configs import common


def test_schedule_matches_the_formula():
    cfg = common.optimizer_config(lr=1e-3, warmup_steps=10)
    sched = make_schedule(cfg, total_steps=110)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == np.float32(5e-4)
    np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
    # cosine from lr to lr * final_lr_ratio over the remaining 100 steps
    t = 40 / 100
    want = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * t))
    np.testing.assert_allclose(float(sched(50)), want, rtol=1e-5)
    np.testing.assert_allclose(float(sched(110)), 1e-4, rtol=1e-5)


def test_frozen_patterns_keep_matching_parameters_fixed():
    cfg = common.optimizer_config(lr=1e-2, warmup_steps=0)
    cfg.frozen_patterns = ("^enc/conv/",)
    tx = make_optimizer(cfg, total_steps=10)
    params = {"enc": {"conv": {"kernel": jnp.ones((3, 3))}, "proj": {"kernel": jnp.ones((3, 3))}},
              "head": {"bias": jnp.ones((3,))}}
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["enc"]["conv"]["kernel"], params["enc"]["conv"]["kernel"])
    assert np.all(np.asarray(new["enc"]["proj"]["kernel"]) < 1.0)
    assert np.all(np.asarray(new["head"]["bias"]) < 1.0)
    # without patterns everything moves
    plain = make_optimizer(common.optimizer_config(lr=1e-2, warmup_steps=0), total_steps=10)
    updates, _ = plain.update(grads, plain.init(params), params)
    assert np.all(np.asarray(optax.apply_updates(params, updates)["enc"]["conv"]["kernel"]) < 1.0)


def test_frozen_patterns_get_no_gradient_inside_the_loss():
    cfg = common.optimizer_config(lr=1e-2, warmup_steps=0)
    cfg.frozen_patterns = ("^enc/conv/",)
    params = {"enc": {"conv": {"kernel": jnp.full((2,), 2.0)}, "proj": {"kernel": jnp.full((2,), 3.0)}}}
    loss = lambda p: jnp.sum(p["enc"]["conv"]["kernel"] * p["enc"]["proj"]["kernel"])
    grads = jax.grad(lambda p: loss(stop_frozen_gradients(cfg, p)))(params)
    np.testing.assert_array_equal(grads["enc"]["conv"]["kernel"], [0.0, 0.0])
    np.testing.assert_array_equal(grads["enc"]["proj"]["kernel"], [2.0, 2.0])
    # the frozen branch's backward is gone from the compiled program, not merely zeroed
    hlo = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(stop_frozen_gradients(cfg, p)["enc"]["conv"]["kernel"])))
                  ).lower(params).as_text()
    assert "cosine" not in hlo
    assert stop_frozen_gradients(common.optimizer_config(lr=1e-2, warmup_steps=0), params) is params


def _boxed_params():
    box = lambda shape, names: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names)
    return {"enc": {"conv": {"kernel": box((4, 8), ("embed", "mlp"))},
                    "proj": {"kernel": box((8, 4), ("mlp", "embed")), "bias": box((4,), ("embed",))}},
            "scale": jax.ShapeDtypeStruct((6,), jnp.float32)}     # unannotated: replicated


@pytest.mark.parametrize("frozen", [(), ("^enc/conv/",)], ids=["adamw", "frozen_patterns"])
def test_optimizer_state_is_sharded_like_its_parameters(frozen):
    """Adam's moments take their parameter's sharding through the boxes of the abstract state, also
    through the masked weight decay and the multi_transform of frozen_patterns; counts are replicated."""
    mesh = mesh_lib.make_mesh(common.mesh_config(2, 2, 2))
    cfg = common.optimizer_config(lr=1e-3, warmup_steps=2)
    cfg.frozen_patterns = frozen
    tx = make_optimizer(cfg, total_steps=10)
    boxed = _boxed_params()
    shardings = optimizer_shardings(tx, boxed, mesh, common.logical_axis_rules())
    # the structure of the state tx.init builds from the plain parameters
    state = jax.eval_shape(tx.init, nn.meta.unbox(boxed))
    assert jax.tree.structure(state) == jax.tree.structure(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    want = {("enc", "conv", "kernel"): P("fsdp", "tensor"), ("enc", "proj", "kernel"): P("tensor", "fsdp"),
            ("enc", "proj", "bias"): P("fsdp"), ("scale",): P()}
    moments = {}
    for path, sharding in jax.tree_util.tree_flatten_with_path(shardings)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
        if "mu" in keys or "nu" in keys:
            param = keys[keys.index("mu" if "mu" in keys else "nu") + 1:]
            moments.setdefault(param, []).append(sharding.spec)
        else:
            assert sharding.spec == P(), keys          # step counts
    trained = {k for k in want if not (frozen and k[:2] == ("enc", "conv"))}
    assert set(moments) == trained
    for param, specs in moments.items():
        assert specs == [want[param]] * 2, param        # mu and nu
