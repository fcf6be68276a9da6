"""Optimizer: the warmup-cosine schedule's values and frozen parameter patterns."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from avi_jax.training.state import make_optimizer, make_schedule, stop_frozen_gradients
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
