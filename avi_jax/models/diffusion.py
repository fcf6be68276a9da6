"""Gaussian diffusion for an x0-predicting model: noise schedules, q_sample, the DDPM posterior, and the
DDPM / DDIM samplers with classifier-free guidance (paper Sec. III-D, Eq. 8; DALL-E 2's diffusion prior).

Notation (Ho et al. 2020, "DDPM"; Nichol & Dhariwal 2021, "Improved DDPM"; Song et al. 2021, "DDIM"):
timesteps ``t = 0 .. T-1``; ``beta_t`` the noise schedule, ``alpha_t = 1 - beta_t``,
``abar_t = prod_{s <= t} alpha_s`` and ``abar_{-1} = 1``;

* forward process ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` (:func:`q_sample`);
* posterior ``q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, betatilde_t I)`` with
  ``c1_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t)``, ``c2_t = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)``,
  ``betatilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)`` (:func:`q_posterior`);
* the model predicts ``x_0`` directly (not the noise): ``x0_hat = denoise(args, x_t, t)``.

DDPM ancestral sampling (:func:`ddpm_sample`) draws ``x_{T-1} ~ N(0, I)`` and steps
``x_{t-1} = c1_t x0_hat + c2_t x_t + sqrt(betatilde_t) z`` down to ``t = 0`` (where ``c1_0 = 1``,
``c2_0 = betatilde_0 = 0``, so the output is the final ``x0_hat``). DDIM (:func:`ddim_sample`) visits
``num_steps`` timesteps ``tau_1 > ... > tau_n = 0`` spaced evenly over ``[0, T-1]`` and steps
``x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z`` with
``eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)`` and
``sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)``; ``eta = 0`` is
deterministic, and ``eta = 1`` with ``num_steps = T`` is exactly the DDPM sampler.

Classifier-free guidance (Ho & Salimans 2022, on x0 as DALL-E 2's prior): ``x0_hat = u + s (c - u)`` with ``c``
the conditional and ``u`` the unconditional (null-condition) prediction, computed in one batched call
(:class:`Guided`). ``s = 1`` is the conditional model.

Both samplers are ``jax.jit``-compiled with the step loop inside (``lax.scan``), batched (any leading
shape) and seeded (``rng``). The denoiser is a static argument, so pass the *same* hashable callable
each time (module-level function, or a frozen dataclass such as :class:`Guided`) and put everything
array-valued (parameters, conditions, guidance scale) into ``args`` (a pytree, traced).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from avi_jax.errors import ConfigError, InputError

# denoise(args, x_t (B, ...) float32, t (B,) int32) -> x0_hat (B, ...) float32
Denoiser = Callable[[Any, jax.Array, jax.Array], jax.Array]
SCHEDULES = ("cosine", "linear")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """A discrete noise schedule ``beta_0 .. beta_{T-1}`` (float64, hashable) and its derived terms.

    The derived arrays are numpy float64 of shape (T,); the ``*_at`` helpers gather them at integer
    timesteps (B,) as float32 and broadcast against (B, ...) data.
    """
    betas: tuple[float, ...]

    def __post_init__(self):
        b = np.asarray(self.betas, np.float64)
        if b.ndim != 1 or b.size < 1 or np.any(b <= 0) or np.any(b >= 1):
            raise ConfigError(f"NoiseSchedule: betas must be a non-empty 1-d sequence in (0, 1), got {b}")

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def betas_np(self) -> np.ndarray:
        return np.asarray(self.betas, np.float64)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """``abar_t`` (T,)."""
        return np.cumprod(1.0 - self.betas_np)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        """``abar_{t-1}`` (T,) with ``abar_{-1} = 1``."""
        return np.concatenate([[1.0], self.alphas_cumprod[:-1]])

    @property
    def posterior_variance(self) -> np.ndarray:
        """``betatilde_t`` (T,) (0 at t = 0)."""
        return self.betas_np * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_mean_coef1(self) -> np.ndarray:
        """``c1_t`` (T,), the weight of x0 in the posterior mean."""
        return self.betas_np * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_mean_coef2(self) -> np.ndarray:
        """``c2_t`` (T,), the weight of x_t in the posterior mean."""
        return (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - self.betas_np) / (1.0 - self.alphas_cumprod)


def _at(values: np.ndarray, t: jax.Array, like: jax.Array) -> jax.Array:
    """Gather a (T,) table at timesteps ``t`` (B,) and reshape to broadcast against ``like`` (B, ...)."""
    out = jnp.asarray(values, jnp.float32)[t]
    return out.reshape(out.shape + (1,) * (like.ndim - out.ndim))


def make_schedule(kind: str = "cosine", num_timesteps: int = 100, *, cosine_s: float = 0.008,
                  linear_start: float = 1e-4, linear_end: float = 0.02, max_beta: float = 0.999
                  ) -> NoiseSchedule:
    """Build a noise schedule.

    'cosine' (Nichol & Dhariwal 2021, Eq. 17; DALL-E 2's prior): ``abar(t) = f(t) / f(0)`` with
    ``f(t) = cos(((t / T) + s) / (1 + s) * pi / 2)^2``, ``beta_t = min(1 - abar(t+1) / abar(t), max_beta)``.
    'linear' (Ho et al. 2020): betas evenly spaced from ``linear_start`` to ``linear_end``, both scaled by
    ``1000 / T`` (so any T spans the same noise range as the 1000-step original).

    Raises:
      ConfigError: unknown kind or ``num_timesteps < 1``.
    """
    if num_timesteps < 1:
        raise ConfigError(f"make_schedule: num_timesteps must be >= 1, got {num_timesteps}")
    if kind == "cosine":
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        f = np.cos((steps + cosine_s) / (1.0 + cosine_s) * math.pi / 2) ** 2
        abar = f / f[0]
        betas = np.clip(1.0 - abar[1:] / abar[:-1], 1e-8, max_beta)
    elif kind == "linear":
        scale = 1000.0 / num_timesteps
        betas = np.linspace(scale * linear_start, scale * linear_end, num_timesteps, dtype=np.float64)
        betas = np.clip(betas, 1e-8, max_beta)
    else:
        raise ConfigError(f"make_schedule: unknown schedule {kind!r}; expected one of {SCHEDULES}")
    return NoiseSchedule(tuple(float(b) for b in betas))


def q_sample(schedule: NoiseSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Diffuse ``x0`` (B, ...) to timesteps ``t`` (B,) int: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
    abar = schedule.alphas_cumprod
    return _at(np.sqrt(abar), t, x0) * x0 + _at(np.sqrt(1.0 - abar), t, x0) * noise


def q_posterior(schedule: NoiseSchedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """Mean (B, ...) and variance (B, 1, ...) of ``q(x_{t-1} | x_t, x0)`` (DDPM Eq. 6-7) at ``t`` (B,)."""
    mean = _at(schedule.posterior_mean_coef1, t, x_t) * x0 + _at(schedule.posterior_mean_coef2, t, x_t) * x_t
    return mean, _at(schedule.posterior_variance, t, x_t)


def sample_timesteps(rng: jax.Array, batch: int, num_timesteps: int) -> jax.Array:
    """Training timesteps, uniform over ``[0, T)``: (batch,) int32."""
    return jax.random.randint(rng, (batch,), 0, num_timesteps, dtype=jnp.int32)


def x0_mse(x0_pred: jax.Array, x0: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """The x0 regression loss of paper Eq. 8: mean squared error over the feature dims, averaged over
    the examples with weight (B,) (default all 1; 0 for padded rows). Returns () float32."""
    if x0_pred.shape != x0.shape:
        raise InputError(f"x0_mse: prediction {x0_pred.shape} and target {x0.shape} differ")
    per = jnp.mean(jnp.square(x0_pred.astype(jnp.float32) - x0.astype(jnp.float32)),
                   axis=tuple(range(1, x0.ndim)))
    if weights is None:
        return jnp.mean(per)
    w = weights.astype(jnp.float32)
    return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def x0_loss(denoise: Denoiser, args: Any, schedule: NoiseSchedule, x0: jax.Array, t: jax.Array,
            noise: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """``x0_mse(denoise(args, q_sample(x0, t, noise), t), x0)``: the diffusion term of Eq. 8.

    Args: x0 (B, ...) clean data; t (B,) int timesteps (see :func:`sample_timesteps`); noise like x0
    (standard normal); weights (B,) optional. Returns () float32.
    """
    return x0_mse(denoise(args, q_sample(schedule, x0, t, noise), t), x0, weights)


@dataclasses.dataclass(frozen=True)
class Guided:
    """Classifier-free guidance around a conditional model (hashable: pass it as the sampler's denoiser).

    ``model(shared, per_example, x_t, t, keep) -> x0_hat``: ``shared`` is passed through unchanged
    (parameters), ``per_example`` is a pytree of (B, ...) arrays (the conditions), and ``keep`` (B,)
    bool says whether each row sees its condition (False = the null condition). As a denoiser,
    ``Guided(model)((shared, per_example, scale), x_t, t)`` runs the model once on the doubled batch
    ``[cond; uncond]`` and returns ``u + scale * (c - u)``; ``scale`` is a traced scalar (changing it
    does not recompile), and ``scale = 1`` gives the conditional prediction.
    """
    model: Callable[[Any, Any, jax.Array, jax.Array, jax.Array], jax.Array]

    def __call__(self, args: tuple[Any, Any, jax.Array], x_t: jax.Array, t: jax.Array) -> jax.Array:
        shared, per_example, scale = args
        b = x_t.shape[0]
        keep = jnp.concatenate([jnp.ones((b,), bool), jnp.zeros((b,), bool)])
        doubled = jax.tree.map(lambda x: jnp.concatenate([x, x]), per_example)
        out = self.model(shared, doubled, jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), keep)
        cond, uncond = out[:b], out[b:]
        return uncond + jnp.asarray(scale, out.dtype) * (cond - uncond)


def _check_start(x_T: jax.Array) -> None:
    if x_T.ndim < 1:
        raise InputError(f"sampler: x_T must have a batch dimension, got shape {x_T.shape}")


@functools.partial(jax.jit, static_argnames=("denoise", "schedule"))
def ddpm_sample(denoise: Denoiser, args: Any, x_T: jax.Array, rng: jax.Array, *,
                schedule: NoiseSchedule) -> jax.Array:
    """DDPM ancestral sampling over all T timesteps (paper: 100) with an x0-predicting denoiser.

    Args:
      denoise: ``denoise(args, x_t, t) -> x0_hat`` (static; e.g. ``Guided(model)`` for guidance).
      args: pytree of arrays passed to ``denoise`` (parameters, conditions, guidance scale).
      x_T: (B, ...) float32 starting noise, standard normal (e.g. ``jax.random.normal(key, (B, D))``).
      rng: PRNG key for the per-step noise (step ``i`` of the loop uses ``split(rng, T)[i]``).
      schedule: the noise schedule (static).

    Returns:
      (B, ...) float32 samples of x0.
    """
    _check_start(x_T)
    steps = schedule.num_timesteps
    b = x_T.shape[0]
    sqrt_var = np.sqrt(schedule.posterior_variance)

    def step(x, inp):
        t, key = inp
        tb = jnp.full((b,), t, jnp.int32)
        x0 = denoise(args, x, tb)
        mean, _ = q_posterior(schedule, x0, x, tb)
        z = jax.random.normal(key, x.shape, x.dtype)
        return mean + _at(sqrt_var, tb, x) * z, None

    ts = jnp.arange(steps - 1, -1, -1, dtype=jnp.int32)
    x, _ = jax.lax.scan(step, x_T.astype(jnp.float32), (ts, jax.random.split(rng, steps)))
    return x


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """The DDIM visiting order: ``num_steps`` distinct timesteps evenly spaced from T-1 down to 0 (int)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ConfigError(f"DDIM: num_steps must be in [1, {num_timesteps}], got {num_steps}")
    if num_steps == 1:
        return np.array([num_timesteps - 1])
    return np.round(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int64)


@functools.partial(jax.jit, static_argnames=("denoise", "schedule", "num_steps"))
def ddim_sample(denoise: Denoiser, args: Any, x_T: jax.Array, rng: jax.Array, *,
                schedule: NoiseSchedule, num_steps: int, eta: float | jax.Array = 0.0) -> jax.Array:
    """DDIM sampling (Song et al. 2021, Eq. 12) in ``num_steps`` steps with an x0-predicting denoiser.

    Args: as :func:`ddpm_sample`, plus ``num_steps`` (static; timesteps from :func:`ddim_timesteps`;
    the last visited timestep is 0, whose ``abar_prev = 1`` makes the output the final ``x0_hat``)
    and ``eta`` (traced; 0 = deterministic given x_T, 1 with ``num_steps = T`` = DDPM).

    Returns:
      (B, ...) float32 samples of x0.
    """
    _check_start(x_T)
    ts = ddim_timesteps(schedule.num_timesteps, num_steps)
    abar_all = schedule.alphas_cumprod
    abar = abar_all[ts]
    abar_prev = np.concatenate([abar_all[ts[1:]], [1.0]])
    b = x_T.shape[0]
    eta = jnp.asarray(eta, jnp.float32)

    def step(x, inp):
        t, a, a_prev, key = inp
        tb = jnp.full((b,), t, jnp.int32)
        x0 = denoise(args, x, tb)
        eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
        sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a)) * jnp.sqrt(1.0 - a / a_prev)
        direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma ** 2, 0.0))
        z = jax.random.normal(key, x.shape, x.dtype)
        return jnp.sqrt(a_prev) * x0 + direction * eps + sigma * z, None

    xs = (jnp.asarray(ts, jnp.int32), jnp.asarray(abar, jnp.float32), jnp.asarray(abar_prev, jnp.float32),
          jax.random.split(rng, len(ts)))
    x, _ = jax.lax.scan(step, x_T.astype(jnp.float32), xs)
    return x


def sample(denoise: Denoiser, args: Any, rng: jax.Array, shape: tuple[int, ...], *,
           schedule: NoiseSchedule, method: str = "ddpm", num_steps: int | None = None,
           eta: float = 0.0) -> jax.Array:
    """Draw ``x_T ~ N(0, I)`` of ``shape`` (B, ...) from ``rng`` and run the chosen sampler.

    ``method``: 'ddpm' (all T steps) or 'ddim' (``num_steps``, default T // 10 or 1, and ``eta``).
    ``rng`` is split into the starting-noise key and the sampler's step key, so the same ``rng`` gives
    the same samples. Returns (B, ...) float32.

    Raises:
      ConfigError: unknown method or bad ``num_steps``.
    """
    k_init, k_steps = jax.random.split(rng)
    x_T = jax.random.normal(k_init, shape, jnp.float32)
    if method == "ddpm":
        return ddpm_sample(denoise, args, x_T, k_steps, schedule=schedule)
    if method == "ddim":
        n = num_steps if num_steps else max(schedule.num_timesteps // 10, 1)
        return ddim_sample(denoise, args, x_T, k_steps, schedule=schedule, num_steps=int(n), eta=eta)
    raise ConfigError(f"unknown sampler {method!r}; expected 'ddpm' or 'ddim'")


__all__ = ["NoiseSchedule", "make_schedule", "q_sample", "q_posterior", "sample_timesteps",
           "x0_mse", "x0_loss", "Guided", "ddpm_sample", "ddim_timesteps", "ddim_sample", "sample", "SCHEDULES"]
