"""Tests of avi_jax.training.losses against independent numpy hand computations."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from avi_jax.errors import InputError
from avi_jax.training import losses


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _rand(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# info_nce


def test_info_nce_hand_3x3_single_query():
    a = _unit(_rand((3, 4), 0))
    t = _unit(_rand((3, 4), 1))
    temp = 0.1
    s = [[float(np.dot(a[i], t[j])) for j in range(3)] for i in range(3)]
    e = [[math.exp(s[i][j] / temp) for j in range(3)] for i in range(3)]
    # audio -> text: row i, positive j = i
    a2t = [-math.log(e[0][0] / (e[0][0] + e[0][1] + e[0][2])),
           -math.log(e[1][1] / (e[1][0] + e[1][1] + e[1][2])),
           -math.log(e[2][2] / (e[2][0] + e[2][1] + e[2][2]))]
    # text -> audio: column j, positive i = j
    t2a = [-math.log(e[0][0] / (e[0][0] + e[1][0] + e[2][0])),
           -math.log(e[1][1] / (e[0][1] + e[1][1] + e[2][1])),
           -math.log(e[2][2] / (e[0][2] + e[1][2] + e[2][2]))]
    expected = 0.5 * (sum(a2t) / 3 + sum(t2a) / 3)
    loss, metrics = losses.info_nce(jnp.asarray(a), jnp.asarray(t), temp)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_a2t"]), sum(a2t) / 3, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_t2a"]), sum(t2a) / 3, rtol=1e-5)
    acc_a2t = np.mean([int(np.argmax(s[i]) == i) for i in range(3)])
    acc_t2a = np.mean([int(np.argmax([s[0][j], s[1][j], s[2][j]]) == j) for j in range(3)])
    assert float(metrics["acc_a2t"]) == pytest.approx(acc_a2t)
    assert float(metrics["acc_t2a"]) == pytest.approx(acc_t2a)


def test_info_nce_hand_3x3_max_over_queries_and_unnormalized_inputs():
    a = _rand((3, 2, 5), 2) * 3.0  # not unit length: the loss normalises (cosine similarity)
    t = _rand((3, 5), 3) * 0.5
    temp = 0.2
    an, tn = _unit(a), _unit(t)
    s = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            s[i, j] = max(float(np.dot(an[i, 0], tn[j])), float(np.dot(an[i, 1], tn[j])))
    e = np.exp(s / temp)
    a2t = -np.log(np.array([e[i, i] / (e[i, 0] + e[i, 1] + e[i, 2]) for i in range(3)]))
    t2a = -np.log(np.array([e[j, j] / (e[0, j] + e[1, j] + e[2, j]) for j in range(3)]))
    loss, _ = losses.info_nce(jnp.asarray(a), jnp.asarray(t), jnp.float32(temp))
    np.testing.assert_allclose(float(loss), 0.5 * (a2t.mean() + t2a.mean()), rtol=1e-5)


def test_info_nce_symmetry():
    a = jnp.asarray(_rand((5, 8), 4))
    t = jnp.asarray(_rand((5, 8), 5))
    l1, m1 = losses.info_nce(a, t, 0.07)
    l2, m2 = losses.info_nce(t, a, 0.07)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    np.testing.assert_allclose(float(m1["loss_a2t"]), float(m2["loss_t2a"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["loss_t2a"]), float(m2["loss_a2t"]), rtol=1e-6)
    # the two directions differ in general (the test could tell them apart)
    assert abs(float(m1["loss_a2t"]) - float(m1["loss_t2a"])) > 1e-4


def test_info_nce_temperature_effect_and_clamp():
    x = jnp.eye(4, 6)  # perfectly aligned, orthogonal pairs
    hot, _ = losses.info_nce(x, x, 0.5)
    cold, _ = losses.info_nce(x, x, 0.05)
    assert float(cold) < float(hot)
    # hand value for aligned orthogonal pairs: -log(e^{1/T} / (e^{1/T} + 3))
    np.testing.assert_allclose(float(hot), -math.log(math.exp(2) / (math.exp(2) + 3)), rtol=1e-6)
    # BLIP-2 clamp to [0.001, 0.5]
    a = jnp.asarray(_rand((4, 6), 6))
    t = jnp.asarray(_rand((4, 6), 7))
    assert float(losses.info_nce(a, t, 3.0)[0]) == pytest.approx(float(losses.info_nce(a, t, 0.5)[0]))
    assert float(losses.info_nce(a, t, 1e-6)[0]) == pytest.approx(
        float(losses.info_nce(a, t, 0.001)[0]))
    assert float(losses.info_nce(a, t, 3.0)[1]["temperature"]) == pytest.approx(0.5)


def test_info_nce_valid_mask_ignores_padded_rows():
    a = _rand((3, 2, 6), 8)
    t = _rand((3, 6), 9)
    ref, ref_m = losses.info_nce(jnp.asarray(a), jnp.asarray(t), 0.1)
    for seed in (10, 11):
        pad_a = np.concatenate([a, _rand((2, 2, 6), seed)], 0)
        pad_t = np.concatenate([t, _rand((2, 6), seed + 100)], 0)
        # also make a padded text identical to a real audio's best match: must not act as a negative
        pad_t[3] = a[0, 0]
        valid = jnp.asarray([True, True, True, False, False])
        loss, m = losses.info_nce(jnp.asarray(pad_a), jnp.asarray(pad_t), 0.1, valid=valid)
        np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
        for key in ("loss_a2t", "loss_t2a", "acc_a2t", "acc_t2a"):
            np.testing.assert_allclose(float(m[key]), float(ref_m[key]), rtol=1e-6)
        assert float(m["num_valid"]) == 3
    # without the mask the padded rows do change the loss
    unmasked, _ = losses.info_nce(jnp.asarray(pad_a), jnp.asarray(pad_t), 0.1)
    assert abs(float(unmasked) - float(ref)) > 1e-3


def test_info_nce_multi_positive_targets():
    a = _unit(_rand((3, 4), 12))
    t = _unit(_rand((3, 4), 13))
    # clips 0 and 1 are marked as sharing an instruction. (With bit-identical text embeddings the
    # multi-positive loss equals the identity-target loss, so distinct embeddings are used here.)
    same = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
    temp = 0.1
    s = a @ t.T
    e = np.exp(s / temp)
    p_row = e / e.sum(1, keepdims=True)  # audio -> text
    p_col = e / e.sum(0, keepdims=True)  # text -> audio
    a2t = [-(0.5 * math.log(p_row[0, 0]) + 0.5 * math.log(p_row[0, 1])),
           -(0.5 * math.log(p_row[1, 0]) + 0.5 * math.log(p_row[1, 1])),
           -math.log(p_row[2, 2])]
    t2a = [-(0.5 * math.log(p_col[0, 0]) + 0.5 * math.log(p_col[1, 0])),
           -(0.5 * math.log(p_col[0, 1]) + 0.5 * math.log(p_col[1, 1])),
           -math.log(p_col[2, 2])]
    loss, m = losses.info_nce(jnp.asarray(a), jnp.asarray(t), temp, targets_equal=jnp.asarray(same))
    np.testing.assert_allclose(float(m["loss_a2t"]), np.mean(a2t), rtol=1e-5)
    np.testing.assert_allclose(float(m["loss_t2a"]), np.mean(t2a), rtol=1e-5)
    # an audio predicting either text of its group counts as correct
    acc = np.mean([same[i, np.argmax(s[i])] for i in range(3)])
    assert float(m["acc_a2t"]) == pytest.approx(acc)
    default, _ = losses.info_nce(jnp.asarray(a), jnp.asarray(t), temp)
    assert abs(float(default) - float(loss)) > 1e-3


def test_info_nce_label_smoothing_hand():
    a = _unit(_rand((3, 4), 14))
    t = _unit(_rand((3, 4), 15))
    temp, eps = 0.1, 0.1
    logp = np.log(np.exp(a @ t.T / temp) / np.exp(a @ t.T / temp).sum(1, keepdims=True))
    target = (1 - eps) * np.eye(3) + eps / 3
    expected = -(target * logp).sum(1).mean()
    _, m = losses.info_nce(jnp.asarray(a), jnp.asarray(t), temp, label_smoothing=eps)
    np.testing.assert_allclose(float(m["loss_a2t"]), expected, rtol=1e-5)


def test_info_nce_sharded_global_batch_matches_unsharded():
    devices = np.array(jax.devices())
    assert devices.size == 8, "conftest sets 8 fake CPU devices"
    mesh = Mesh(devices, ("data",))
    b = 16
    a = jnp.asarray(_rand((b, 3, 8), 16))
    t = jnp.asarray(_rand((b, 8), 17))
    valid = jnp.asarray(np.arange(b) < 13)
    same = jnp.asarray(np.equal.outer(np.arange(b) // 2, np.arange(b) // 2))

    def f(a, t, valid, same):
        return losses.info_nce(a, t, 0.07, valid=valid, targets_equal=same)

    ref_loss, ref_m = jax.jit(f)(a, t, valid, same)
    ref_grad = jax.grad(lambda a, t: f(a, t, valid, same)[0], argnums=(0, 1))(a, t)
    rows = NamedSharding(mesh, P("data"))
    args = (jax.device_put(a, rows), jax.device_put(t, rows), jax.device_put(valid, rows),
            jax.device_put(same, rows))
    assert len(args[0].sharding.device_set) == 8
    loss, m = jax.jit(f)(*args)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for key in ref_m:
        np.testing.assert_allclose(float(m[key]), float(ref_m[key]), rtol=1e-6)
    grad = jax.jit(jax.grad(lambda a, t, v, s: f(a, t, v, s)[0], argnums=(0, 1)))(*args)
    for g, r in zip(grad, ref_grad):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-7)
    # each shard alone (per-device negatives) would give a different loss
    local = np.mean([float(losses.info_nce(a[i:i + 2], t[i:i + 2], 0.07)[0]) for i in range(0, b, 2)])
    assert abs(local - float(losses.info_nce(a, t, 0.07)[0])) > 1e-3


def test_info_nce_shape_errors():
    with pytest.raises(InputError):
        losses.info_nce(jnp.zeros((3, 4)), jnp.zeros((2, 4)), 0.1)
    with pytest.raises(InputError):
        losses.info_nce(jnp.zeros((3, 4)), jnp.zeros((3, 4)), 0.1, valid=jnp.ones((2,), bool))
    with pytest.raises(InputError):
        losses.info_nce(jnp.zeros((3, 4)), jnp.zeros((3, 4)), 0.1, targets_equal=jnp.eye(2))


# ---------------------------------------------------------------------------------------------
# lm_cross_entropy


def test_lm_cross_entropy_hand():
    logits = _rand((2, 3, 5), 18) * 2
    targets = np.array([[1, 4, 0], [2, 2, 3]])
    weights = np.array([[1.0, 0.0, 1.0], [0.5, 1.0, 0.0]], np.float32)
    nll_sum, w_sum, correct = 0.0, 0.0, 0.0
    for b in range(2):
        for l in range(3):
            row = [float(v) for v in logits[b, l]]
            lse = math.log(sum(math.exp(v) for v in row))
            nll_sum += weights[b, l] * (lse - row[targets[b, l]])
            w_sum += weights[b, l]
            correct += weights[b, l] * float(int(np.argmax(row)) == targets[b, l])
    loss, m = losses.lm_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    np.testing.assert_allclose(float(loss), nll_sum / w_sum, rtol=1e-5)
    np.testing.assert_allclose(float(m["accuracy"]), correct / w_sum, rtol=1e-6)
    assert float(m["num_tokens"]) == pytest.approx(3.5)
    # bool weights and bfloat16 logits (log-softmax in float32)
    loss_b, m_b = losses.lm_cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets),
                                          jnp.asarray(weights > 0))
    assert loss_b.dtype == jnp.float32
    assert float(m_b["num_tokens"]) == 4
    # all-zero weights: zero loss, no NaN
    loss0, _ = losses.lm_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.zeros((2, 3)))
    assert float(loss0) == 0.0
    with pytest.raises(InputError):
        losses.lm_cross_entropy(jnp.asarray(logits), jnp.asarray(targets[:, :2]), jnp.asarray(weights))
