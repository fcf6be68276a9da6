"""avi_jax.metrics: retrieval accuracy, lip vertex error and Pearson correlation against hand computations
(Diversity: tests/test_style_prior.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avi_jax.errors import InputError
from avi_jax.metrics.correlation import pearson
from avi_jax.metrics.lip_vertex_error import lip_vertex_error
from avi_jax.metrics.retrieval import retrieval_metrics


def test_retrieval_metrics_hand():
    sim = np.array([
        [0.9, 0.1, 0.2, 0.3, 0.0, 0.4],   # positive 0 ranks 1st
        [0.9, 0.5, 0.8, 0.7, 0.6, 0.0],   # positive 1 ranks 5th (4 negatives above)
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.1],   # positive 5 ranks 6th
        [0.1, 0.2, 0.3, 0.9, 0.8, 0.0],   # positives {0, 4}: best (0.8) ranks 2nd
    ], np.float32)
    pos = np.zeros((4, 6), bool)
    pos[0, 0] = pos[1, 1] = pos[2, 5] = pos[3, 0] = pos[3, 4] = True
    for out in (retrieval_metrics(jnp.asarray(sim), jnp.asarray(pos)), retrieval_metrics(sim, pos),
                jax.jit(retrieval_metrics)(sim, pos)):
        assert float(out["top1"]) == pytest.approx(1 / 4)
        assert float(out["top5"]) == pytest.approx(3 / 4)
        assert float(out["retrieval_chance"]) == pytest.approx(1 / 6)
        assert float(out["positive_rate"]) == pytest.approx((1 + 1 + 1 + 2) / 6 / 4)
        assert float(out["num_queries"]) == 4
    # ties count against the query
    tie = retrieval_metrics(jnp.ones((2, 3)), jnp.eye(2, 3, dtype=bool), ks=(1, 3))
    assert float(tie["top1"]) == 0.0 and float(tie["top3"]) == 1.0
    # a query without positives is left out
    none = retrieval_metrics(sim[:2], np.stack([pos[0], np.zeros(6, bool)]))
    assert float(none["num_queries"]) == 1 and float(none["top1"]) == 1.0
    with pytest.raises(InputError):
        retrieval_metrics(sim, pos[:, :5])


def test_lip_vertex_error_is_the_per_frame_max_over_lip_vertices():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(2, 3, 10, 3)).astype(np.float32)
    target = rng.normal(size=(2, 3, 10, 3)).astype(np.float32)
    lips = np.array([1, 4, 7])
    got = np.asarray(jax.jit(lip_vertex_error)(pred, target, lips))
    assert got.shape == (2, 3)
    for b in range(2):
        for f in range(3):
            want = max(np.linalg.norm(pred[b, f, i].astype(np.float64) - target[b, f, i]) for i in lips)
            np.testing.assert_allclose(got[b, f], want, rtol=1e-6)
    # only the lip vertices count
    far = pred.copy()
    far[..., 0, :] += 100.0
    np.testing.assert_allclose(np.asarray(lip_vertex_error(far, target, lips)), got, rtol=1e-6)
    assert float(lip_vertex_error(target, target, lips).max()) == 0.0
    with pytest.raises(InputError):
        lip_vertex_error(pred, target[..., :2], lips)


def test_pearson():
    a = np.array([0.0, 1.0, 2.0, 3.0])
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert pearson(a, -a) == pytest.approx(-1.0)
    assert pearson(a, np.ones(4)) == 0.0
    b = np.array([1.0, 0.0, 3.0, 2.0])
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    with pytest.raises(InputError):
        pearson(a, a[:3])
