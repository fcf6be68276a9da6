"""Batched autoregressive generation with a KV cache for ``avi_jax.models.llama.Llama``.

One jitted function per (config, max_new_tokens, greedy/sampling, ids/embeds) runs the
prefill over the (left- or right-padded) prompt and then a ``jax.lax.while_loop`` of single-token decode
steps that stops as soon as every sequence has emitted EOS. ``jax.jit`` itself caches one executable
per (batch, prompt length, number of EOS ids) shape; EOS/pad ids, temperature and top_p are traced
arguments, so repeated calls with the same shapes never recompile. Semantics follow
``transformers`` ``GenerationMixin.generate``: greedy argmax when ``temperature == 0``, otherwise
temperature scaling followed by nucleus (top-p) filtering (Holtzman et al. 2020) and sampling; the
EOS token is emitted and every later token of that sequence is ``pad_token_id``.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from avi_jax.errors import InputError
from avi_jax.models.llama import KVCache, Llama, LlamaConfig


def top_p_mask(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Boolean (..., V) nucleus: the smallest set of most-probable tokens whose probability mass
    reaches ``top_p`` (HF ``TopPLogitsWarper``: a token is kept when the mass of the tokens strictly
    more probable than it is below ``top_p``; the top token is always kept; ``top_p >= 1`` keeps all).
    Tokens tied with the least probable kept token are kept too."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    sorted_probs = jnp.flip(jnp.sort(probs, axis=-1), axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = (mass_before < top_p) | (jnp.arange(probs.shape[-1]) == 0)
    threshold = jnp.min(jnp.where(keep_sorted, sorted_probs, jnp.inf), axis=-1, keepdims=True)
    return (probs >= threshold) | (top_p >= 1.0)


def sample_token(logits: jax.Array, rng: jax.Array, *, temperature: jax.Array | float,
                 top_p: jax.Array | float = 1.0) -> jax.Array:
    """Sample (B,) int32 from logits (B, V): divide by ``temperature`` (> 0), keep the top-p nucleus
    of the tempered distribution, sample from the renormalised nucleus."""
    scaled = logits.astype(jnp.float32) / temperature
    scaled = jnp.where(top_p_mask(scaled, top_p), scaled, -jnp.inf)
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)


def _last_valid(mask: jax.Array) -> jax.Array:
    """Index (B,) of the last True per row of a (B, L) mask (L - 1 for left padding)."""
    l = mask.shape[1]
    return l - 1 - jnp.argmax(jnp.flip(mask, axis=1), axis=1)


@functools.lru_cache(maxsize=32)
def _compiled(config: LlamaConfig, max_new_tokens: int, greedy: bool, embeds: bool):
    """The jitted generation function for one (config, N, greedy, prompt kind); jax.jit adds one
    executable per (B, L, number of EOS ids) shape. EOS/pad ids, temperature, top_p are traced."""
    model = Llama(config)

    def pick(logits, rng, temperature, top_p):
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return sample_token(logits, rng, temperature=temperature, top_p=top_p)

    @jax.jit
    def run(params, prompt, mask, rng, eos, pad, temperature, top_p):
        def is_eos(tok):
            return jnp.any(tok[:, None] == eos[None, :], axis=1)

        b, l = mask.shape
        cache = KVCache.init(config, b, l + max_new_tokens)
        kw = {"inputs_embeds": prompt} if embeds else {"input_ids": prompt}
        logits, cache = model.apply(params, attention_mask=mask, cache=cache, **kw)
        last = jnp.take_along_axis(logits, _last_valid(mask)[:, None, None], axis=1)[:, 0]
        rng, sub = jax.random.split(rng)
        tok = pick(last, sub, temperature, top_p)
        out = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(tok)
        done = is_eos(tok)

        def cond(state):
            i, _, done, _, _, _ = state
            return (i < max_new_tokens) & ~jnp.all(done)

        def body(state):
            i, tok, done, cache, out, rng = state
            logits, cache = model.apply(params, input_ids=tok[:, None],
                                        attention_mask=jnp.ones((b, 1), bool), cache=cache)
            rng, sub = jax.random.split(rng)
            nxt = jnp.where(done, pad, pick(logits[:, 0], sub, temperature, top_p))
            out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
            return i + 1, nxt, done | is_eos(nxt), cache, out, rng

        state = (jnp.ones((), jnp.int32), tok, done, cache, out, rng)
        return jax.lax.while_loop(cond, body, state)[4]

    return run


def generate(model: Llama, params, *, inputs_embeds: jax.Array | None = None,
             input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
             max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, rng: jax.Array | None = None,
             temperature: float = 0.0, top_p: float = 1.0) -> jax.Array:
    """Generate continuations of a batch of prompts.

    Args:
      model: a ``Llama``; only its (hashable) ``config`` is used, so compiled functions are shared.
      params: the variables ``{'params': params}`` as for ``model.apply`` (possibly sharded).
      inputs_embeds: (B, L, E) prompt embeddings (soft prompt), or
      input_ids: (B, L) int prompt ids; exactly one of the two.
      attention_mask: (B, L) bool, True = real token; left padding (or right padding: generation
        continues from each row's last real token). Default: all real.
      max_new_tokens: N >= 1, the number of tokens generated per row at most.
      eos_token_id: id or ids that end a sequence (default ``config.eos_token_id``; None: never stop).
      pad_token_id: filler after EOS (default ``config.pad_token_id``, else the first EOS id, else 0).
      rng: PRNG key; required when ``temperature > 0``.
      temperature: 0 = greedy argmax; > 0 scales logits before sampling.
      top_p: nucleus mass in (0, 1]; 1 disables the filter.

    Returns:
      (B, N) int32 tokens; the EOS token is included and every later slot is ``pad_token_id``.
      Decoding stops early (inside the compiled loop) when every row has finished.

    Raises:
      InputError: bad arguments (both/neither prompt kinds, shapes, N < 1, temperature < 0,
        top_p outside (0, 1], sampling without ``rng``).
    """
    cfg = model.config
    if (inputs_embeds is None) == (input_ids is None):
        raise InputError("generate: pass exactly one of inputs_embeds (B, L, E) or input_ids (B, L)")
    prompt = jnp.asarray(input_ids if inputs_embeds is None else inputs_embeds)
    if inputs_embeds is None and prompt.ndim != 2:
        raise InputError(f"generate: input_ids must be (B, L), got {prompt.shape}")
    if inputs_embeds is not None and (prompt.ndim != 3 or prompt.shape[-1] != cfg.hidden_size):
        raise InputError(f"generate: inputs_embeds must be (B, L, {cfg.hidden_size}), got {prompt.shape}")
    b, l = prompt.shape[:2]
    mask = jnp.ones((b, l), bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    if mask.shape != (b, l):
        raise InputError(f"generate: attention_mask shape {mask.shape} != prompt (B, L) {(b, l)}")
    if int(max_new_tokens) < 1:
        raise InputError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise InputError(f"generate: temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise InputError(f"generate: top_p must be in (0, 1], got {top_p}")
    greedy = temperature == 0
    if rng is None:
        if not greedy:
            raise InputError("generate: sampling (temperature > 0) needs an rng key")
        rng = jax.random.PRNGKey(0)
    if eos_token_id is None:
        eos_token_id = cfg.eos_token_id
    eos = () if eos_token_id is None else (
        (int(eos_token_id),) if isinstance(eos_token_id, int) else tuple(int(e) for e in eos_token_id))
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)
    if inputs_embeds is None:
        prompt = prompt.astype(jnp.int32)
    fn = _compiled(cfg, int(max_new_tokens), greedy, inputs_embeds is not None)
    eos_ids = jnp.asarray(eos if eos else (-1,), jnp.int32)
    return fn(params, prompt, mask, rng, eos_ids, jnp.int32(pad_token_id),
              jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p))
