"""Diffusion schedule, x0 loss and the DDPM/DDIM samplers against independent hand computations.

The reference case is a Gaussian data distribution x0 ~ N(mu, s^2 I): its posterior mean
E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + b^2) (x_t - a mu) (a = sqrt(abar_t), b^2 = 1 - abar_t) is the optimal
x0 predictor, and with it every sampler step is an affine map of x_t plus Gaussian noise, so the exact
output distribution follows from a scalar mean/variance recursion written here in numpy.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avi_jax.errors import ConfigError
from avi_jax.models import diffusion as dm

T = 100
MU = np.array([1.5, -0.5], np.float64)
S2 = np.array([0.25, 2.0], np.float64)


@dataclasses.dataclass(frozen=True)
class GaussianX0:
    """Exact E[x0 | x_t] for x0 ~ N(mu, diag(s2)); args = (mu (D,), s2 (D,))."""
    schedule: dm.NoiseSchedule

    def __call__(self, args, x_t, t):
        mu, s2 = args
        abar = jnp.asarray(self.schedule.alphas_cumprod, jnp.float32)[t]
        abar = abar.reshape(abar.shape + (1,) * (x_t.ndim - 1))
        a = jnp.sqrt(abar)
        return mu + a * s2 / (abar * s2 + (1.0 - abar)) * (x_t - a * mu)


def _gain(abar, s2):
    """Numpy: E[x0|x_t] = mu + g (x_t - a mu), g = a s2 / (a^2 s2 + b^2)."""
    return np.sqrt(abar) * s2 / (abar * s2 + 1.0 - abar)


def _hand_abar(kind):
    if kind == "cosine":
        f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
        abar = np.array([f((t + 1) / T) / f(0.0) for t in range(T)])
        betas = np.minimum(1 - abar / np.concatenate([[1.0], abar[:-1]]), 0.999)
        return np.cumprod(1 - betas)
    betas = np.linspace(0.1 / T, 20.0 / T, T)
    return np.cumprod(1 - betas)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_matches_formulas(kind):
    s = dm.make_schedule(kind, T)
    assert s.num_timesteps == T
    np.testing.assert_allclose(s.alphas_cumprod, _hand_abar(kind), rtol=1e-9)
    assert np.all(np.diff(s.alphas_cumprod) < 0)
    assert s.alphas_cumprod[-1] < 1e-2 if kind == "cosine" else s.alphas_cumprod[-1] < 5e-3


def test_posterior_is_bayes_rule():
    """q(x_{t-1} | x_t, x0) from Gaussian conditioning: prior N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}),
    likelihood x_t | x_{t-1} ~ N(sqrt(alpha_t) x_{t-1}, beta_t)."""
    s = dm.make_schedule("cosine", T)
    abar, beta = s.alphas_cumprod, s.betas_np
    x0 = np.array([[0.7, -1.2]] * T)
    xt = np.array([[-0.3, 0.4]] * T)
    t = np.arange(T)
    mean, var = jax.device_get(dm.q_posterior(s, jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32),
                                              jnp.asarray(t)))
    for k in range(1, T):
        prior_var = 1 - abar[k - 1]
        post_var = 1.0 / (1.0 / prior_var + (1 - beta[k]) / beta[k])
        post_mean = post_var * (np.sqrt(abar[k - 1]) * x0[k] / prior_var + np.sqrt(1 - beta[k]) * xt[k] / beta[k])
        np.testing.assert_allclose(mean[k], post_mean, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(var[k, 0], post_var, rtol=2e-5)
    np.testing.assert_allclose(mean[0], x0[0], rtol=1e-6)     # abar_{-1} = 1: x_{-1} = x0 exactly
    assert var[0, 0] == 0.0


def test_q_sample_and_x0_loss_by_hand():
    s = dm.make_schedule("linear", T)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((5, 3)).astype(np.float32)
    noise = rng.standard_normal((5, 3)).astype(np.float32)
    t = np.array([0, 10, 50, 98, 99])
    abar = s.alphas_cumprod[t][:, None]
    xt_hand = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    np.testing.assert_allclose(dm.q_sample(s, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise)), xt_hand,
                               rtol=1e-5, atol=1e-6)

    def denoise(w, x, tt):            # a toy "model": x0_hat = w * x_t
        return w * x

    w = 0.8
    loss = dm.x0_loss(denoise, w, s, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
    np.testing.assert_allclose(float(loss), np.mean((w * xt_hand - x0) ** 2), rtol=1e-5)
    weights = np.array([1, 0, 1, 0, 1], np.float32)
    per = np.mean((w * xt_hand - x0) ** 2, axis=1)
    wl = dm.x0_loss(denoise, w, s, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise), jnp.asarray(weights))
    np.testing.assert_allclose(float(wl), np.sum(per * weights) / 3, rtol=1e-5)


def test_optimal_x0_loss_is_the_posterior_variance():
    """E||E[x0|x_t] - x0||^2 / D = mean_d s2 b^2 / (a^2 s2 + b^2); any other predictor does worse."""
    s = dm.make_schedule("cosine", T)
    n, t_fix = 200_000, 40
    key0, key1 = jax.random.split(jax.random.key(0))
    x0 = jnp.asarray(MU, jnp.float32) + jnp.sqrt(jnp.asarray(S2, jnp.float32)) * jax.random.normal(key0, (n, 2))
    noise = jax.random.normal(key1, (n, 2))
    t = jnp.full((n,), t_fix, jnp.int32)
    args = (jnp.asarray(MU, jnp.float32), jnp.asarray(S2, jnp.float32))
    model = GaussianX0(s)
    loss = float(dm.x0_loss(model, args, s, x0, t, noise))
    abar = s.alphas_cumprod[t_fix]
    expected = np.mean(S2 * (1 - abar) / (abar * S2 + 1 - abar))
    assert loss == pytest.approx(expected, rel=0.02)
    worse = float(dm.x0_loss(lambda a, x, tt: model(a, x, tt) + 0.1, args, s, x0, t, noise))
    assert worse > loss + 0.009


def _ddpm_moments(s, mu, s2):
    """Exact mean/variance of the DDPM sampler output with the optimal predictor (per dimension)."""
    abar, c1, c2, pv = s.alphas_cumprod, s.posterior_mean_coef1, s.posterior_mean_coef2, s.posterior_variance
    m, v = np.zeros_like(mu), np.ones_like(mu)
    for t in range(T - 1, -1, -1):
        g = _gain(abar[t], s2)
        # x0_hat = mu + g (x - a mu) = g x + (1 - g a) mu; x' = c1 x0_hat + c2 x + sqrt(pv) z
        A = c1[t] * g + c2[t]
        B = c1[t] * (1 - g * np.sqrt(abar[t])) * mu
        m, v = A * m + B, A * A * v + pv[t]
    return m, v


def test_ddpm_output_distribution_matches_hand_recursion():
    s = dm.make_schedule("cosine", T)
    n = 40_000
    k_init, k_steps = jax.random.split(jax.random.key(1))
    x_T = jax.random.normal(k_init, (n, 2))
    args = (jnp.asarray(MU, jnp.float32), jnp.asarray(S2, jnp.float32))
    out = np.asarray(dm.ddpm_sample(GaussianX0(s), args, x_T, k_steps, schedule=s), np.float64)
    m, v = _ddpm_moments(s, MU, S2)
    assert np.all(np.abs(out.mean(0) - m) < 5 * np.sqrt(v / n)), (out.mean(0), m)
    assert np.all(np.abs(out.var(0) / v - 1) < 5 * np.sqrt(2 / n)), (out.var(0), v)
    # and the exact recursion itself lands near the data distribution (DDPM with 100 steps); the
    # variance comes out a few percent low because the reverse steps use the posterior variance
    # betatilde_t and ignore Var[x0 | x_t] (Ho et al.'s lower-bound choice)
    np.testing.assert_allclose(m, MU, atol=1e-3)
    assert np.all(v < S2) and np.all(v > 0.9 * S2), v


def _ddim_numpy(s, x_T, mu, s2, steps, eta=0.0, zs=None):
    ts = np.round(np.linspace(T - 1, 0, steps)).astype(int)
    abar_all = s.alphas_cumprod
    x = np.asarray(x_T, np.float64)
    for i, t in enumerate(ts):
        a, ap = abar_all[t], (abar_all[ts[i + 1]] if i + 1 < len(ts) else 1.0)
        x0 = mu + _gain(a, s2) * (x - np.sqrt(a) * mu)
        eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
        sigma = eta * np.sqrt((1 - ap) / (1 - a)) * np.sqrt(1 - a / ap)
        x = np.sqrt(ap) * x0 + np.sqrt(max(1 - ap - sigma ** 2, 0.0)) * eps + (sigma * zs[i] if eta else 0.0)
    return x


@pytest.mark.parametrize("steps", [1, 5, 20])
def test_ddim_is_deterministic_and_matches_numpy(steps):
    s = dm.make_schedule("cosine", T)
    x_T = jax.random.normal(jax.random.key(2), (64, 2))
    args = (jnp.asarray(MU, jnp.float32), jnp.asarray(S2, jnp.float32))
    out1 = dm.ddim_sample(GaussianX0(s), args, x_T, jax.random.key(3), schedule=s, num_steps=steps, eta=0.0)
    out2 = dm.ddim_sample(GaussianX0(s), args, x_T, jax.random.key(4), schedule=s, num_steps=steps, eta=0.0)
    np.testing.assert_array_equal(out1, out2)              # eta = 0: the step noise does not matter
    ref = _ddim_numpy(s, np.asarray(x_T), MU, S2, steps)
    np.testing.assert_allclose(out1, ref, rtol=1e-4, atol=1e-4)


def test_ddim_output_distribution_matches_hand_recursion():
    """Deterministic DDIM with the exact predictor is an affine map x_T -> A x_T + B per dimension, so
    its output is N(B, A^2); the sampler's sample moments match it, and as the number of steps grows
    the map approaches the probability-flow ODE's exact transport to N(mu, s2)."""
    s = dm.make_schedule("cosine", T)
    n = 40_000
    x_T = jax.random.normal(jax.random.key(5), (n, 2))
    args = (jnp.asarray(MU, jnp.float32), jnp.asarray(S2, jnp.float32))
    out = np.asarray(dm.ddim_sample(GaussianX0(s), args, x_T, jax.random.key(0), schedule=s, num_steps=10),
                     np.float64)

    def moments(steps):
        b = _ddim_numpy(s, np.zeros((1, 2)), MU, S2, steps)[0]
        a = _ddim_numpy(s, np.ones((1, 2)), MU, S2, steps)[0] - b
        return b, a * a

    m, v = moments(10)
    assert np.all(np.abs(out.mean(0) - m) < 5 * np.sqrt(v / n)), (out.mean(0), m)
    assert np.all(np.abs(out.var(0) / v - 1) < 5 * np.sqrt(2 / n)), (out.var(0), v)
    errors = []
    for steps in (5, 10, 20, 50, 100):
        m, v = moments(steps)
        np.testing.assert_allclose(m, MU, atol=2e-3)
        errors.append(np.max(np.abs(v / S2 - 1)))
    assert np.all(np.diff(errors) < 0) and errors[-1] < 0.05, errors


def test_ddim_eta1_all_steps_equals_ddpm():
    s = dm.make_schedule("linear", T)
    x_T = jax.random.normal(jax.random.key(6), (16, 2))
    args = (jnp.asarray(MU, jnp.float32), jnp.asarray(S2, jnp.float32))
    key = jax.random.key(7)
    ddpm = dm.ddpm_sample(GaussianX0(s), args, x_T, key, schedule=s)
    ddim = dm.ddim_sample(GaussianX0(s), args, x_T, key, schedule=s, num_steps=T, eta=1.0)
    np.testing.assert_allclose(ddim, ddpm, rtol=1e-4, atol=1e-4)


def test_ddim_timesteps():
    np.testing.assert_array_equal(dm.ddim_timesteps(100, 1), [99])
    ts = dm.ddim_timesteps(100, 10)
    assert ts[0] == 99 and ts[-1] == 0 and len(set(ts)) == 10 and np.all(np.diff(ts) < 0)
    np.testing.assert_array_equal(dm.ddim_timesteps(100, 100), np.arange(99, -1, -1))
    with pytest.raises(ConfigError):
        dm.ddim_timesteps(100, 101)


def _toy_conditional(shared, cond, x_t, t, keep):
    """A model whose output depends on the condition only for keep = True rows."""
    c = jnp.where(keep[:, None], cond, shared["null"])
    return shared["w"] * x_t + c + 0.01 * t[:, None].astype(jnp.float32)


def test_guidance_combines_cond_and_uncond_and_scale_one_is_conditional():
    guided = dm.Guided(_toy_conditional)
    shared = {"w": jnp.float32(0.5), "null": jnp.array([0.3, -0.2])}
    cond = jnp.array([[1.0, 2.0], [-1.0, 0.5], [0.0, 0.0]])
    x = jnp.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    t = jnp.array([3, 7, 0])
    c = _toy_conditional(shared, cond, x, t, jnp.ones(3, bool))
    u = _toy_conditional(shared, cond, x, t, jnp.zeros(3, bool))
    np.testing.assert_allclose(guided((shared, cond, 1.0), x, t), c, rtol=1e-6)
    np.testing.assert_allclose(guided((shared, cond, 3.5), x, t), u + 3.5 * (c - u), rtol=1e-6)
    np.testing.assert_allclose(guided((shared, cond, 0.0), x, t), u, rtol=1e-6)


@dataclasses.dataclass(frozen=True)
class _CondOnly:
    def __call__(self, args, x_t, t):
        shared, cond = args
        return _toy_conditional(shared, cond, x_t, t, jnp.ones(x_t.shape[0], bool))


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_samplers_with_guidance_one_equal_the_conditional_model(method):
    s = dm.make_schedule("cosine", 20)
    shared = {"w": jnp.float32(0.5), "null": jnp.array([0.3, -0.2])}
    cond = jnp.array([[1.0, 2.0], [-1.0, 0.5], [0.0, 0.0], [2.0, 2.0]])
    key = jax.random.key(8)
    kw = dict(schedule=s, method=method, num_steps=5, eta=0.5)
    guided = dm.sample(dm.Guided(_toy_conditional), (shared, cond, 1.0), key, (4, 2), **kw)
    plain = dm.sample(_CondOnly(), (shared, cond), key, (4, 2), **kw)
    np.testing.assert_allclose(guided, plain, rtol=1e-5, atol=1e-5)
    other = dm.sample(dm.Guided(_toy_conditional), (shared, cond, 3.5), key, (4, 2), **kw)
    assert not np.allclose(other, plain)


def test_samplers_are_seeded_and_batched():
    s = dm.make_schedule("cosine", 10)
    args = (jnp.asarray(MU, jnp.float32), jnp.asarray(S2, jnp.float32))
    model = GaussianX0(s)
    for method in ("ddpm", "ddim"):
        kw = dict(schedule=s, method=method, num_steps=4, eta=1.0)
        a = dm.sample(model, args, jax.random.key(0), (3, 5, 2), **kw)
        b = dm.sample(model, args, jax.random.key(0), (3, 5, 2), **kw)
        c = dm.sample(model, args, jax.random.key(1), (3, 5, 2), **kw)
        assert a.shape == (3, 5, 2) and a.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)
        assert not np.allclose(a, c)
    with pytest.raises(ConfigError):
        dm.sample(model, args, jax.random.key(0), (3, 2), schedule=s, method="euler")


def test_bad_schedules_raise():
    with pytest.raises(ConfigError):
        dm.make_schedule("quadratic", 10)
    with pytest.raises(ConfigError):
        dm.make_schedule("cosine", 0)
    with pytest.raises(ConfigError):
        dm.NoiseSchedule((0.1, 1.0))
