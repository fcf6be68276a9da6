"""Contrastive and language-model losses (stages 1a, 1b and 2b).

- ``info_nce``: symmetric audio<->text InfoNCE (AVI-Talking Eq. 6; BLIP-2 image-text contrastive
  loss, ITC, with the max-over-queries similarity of LAVIS ``blip2_qformer.py``); stage 2b's
  instruction<->style InfoNCE (Eq. 7) is the same function.
- ``lm_cross_entropy``: token cross-entropy of the instruction tokens (stage 1b).
- ``identical_sequences``: the multi-positive pairs of a batch (duplicate instructions).

The retrieval metrics are ``avi_jax.metrics.retrieval``.

All functions are pure ``jax.numpy`` and jit-able; reductions are done in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from avi_jax.errors import InputError
from avi_jax.models.layers import l2_normalize

TEMPERATURE_MIN = 0.001
TEMPERATURE_MAX = 0.5
_NEG = -1e9  # logit of excluded (padded) candidates; exp underflows to exactly 0 in float32


def _soft_cross_entropy(logits: jax.Array, targets: jax.Array, candidate: jax.Array) -> jax.Array:
    """Per-row -sum_j targets_ij log softmax(logits_i)_j over candidates (N, M) -> (N,)."""
    logits = jnp.where(candidate, logits, _NEG)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.where(targets > 0, targets * logp, 0.0), axis=-1)


def _check_pairs(audio_emb: jax.Array, text_emb: jax.Array, valid: jax.Array | None,
                 targets_equal: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``info_nce``'s inputs checked: audio (B, Q, D), valid (B,) bool, positives (B, B) bool (with the
    diagonal). Raises ``InputError`` naming the inconsistent shape."""
    if audio_emb.ndim == 2:
        audio_emb = audio_emb[:, None, :]
    if audio_emb.ndim != 3 or text_emb.ndim != 2:
        raise InputError(f"info_nce expects audio (B, Q, D) or (B, D) and text (B, D), got "
                         f"{audio_emb.shape} and {text_emb.shape}")
    b, _, d = audio_emb.shape
    if text_emb.shape != (b, d):
        raise InputError(f"info_nce: text_emb shape {text_emb.shape} does not match audio "
                         f"batch/width {(b, d)}")
    valid = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid).astype(bool)
    if valid.shape != (b,):
        raise InputError(f"info_nce: valid must be ({b},), got {valid.shape}")
    positives = jnp.eye(b, dtype=bool)
    if targets_equal is not None:
        targets_equal = jnp.asarray(targets_equal).astype(bool)
        if targets_equal.shape != (b, b):
            raise InputError(f"info_nce: targets_equal must be ({b}, {b}), got {targets_equal.shape}")
        positives = targets_equal | positives
    return audio_emb, valid, positives


def _direction(logits: jax.Array, positives: jax.Array, valid: jax.Array, label_smoothing: float
               ) -> tuple[jax.Array, jax.Array]:
    """One direction of ``info_nce``: (mean cross-entropy, arg-max accuracy) over the valid anchors
    (rows) of logits (B, B), with soft targets spread over each row's positives."""
    candidate = jnp.broadcast_to(valid[None, :], logits.shape)
    target = positives / jnp.maximum(positives.sum(-1, keepdims=True), 1)
    if label_smoothing:
        num_cand = jnp.maximum(candidate.sum(-1, keepdims=True), 1)
        target = (1.0 - label_smoothing) * target + label_smoothing * candidate / num_cand
    per_row = _soft_cross_entropy(logits, target, candidate)
    pred = jnp.argmax(jnp.where(candidate, logits, _NEG), axis=-1)
    correct = jnp.take_along_axis(positives, pred[:, None], axis=-1)[:, 0]
    n = jnp.maximum(valid.sum(), 1)
    return (jnp.sum(jnp.where(valid, per_row, 0.0)) / n,
            jnp.sum(jnp.where(valid, correct, False)) / n)


def info_nce(audio_emb: jax.Array, text_emb: jax.Array, temperature: jax.Array | float, *,
             valid: jax.Array | None = None, targets_equal: jax.Array | None = None,
             label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE between audio (query) embeddings and text embeddings (paper Eq. 6).

    ``sim[i, j]`` = max over queries q of cos(audio_emb[i, q], text_emb[j]) (for (B, D) audio just
    the cosine; BLIP-2 ITC ``sim_i2t = max_q image_feats @ text_feat``, and the same max-over-queries
    matrix transposed for text->audio). ``logits = sim / clip(temperature, 0.001, 0.5)``; the loss
    is the mean of the audio->text and text->audio cross-entropies, each averaged over the valid
    anchors. Negatives are all other (valid) items of the batch. Inputs are L2-normalised here
    (a no-op for the already normalised outputs of ``QFormer.embed_audio/embed_text``).

    Under ``jax.jit`` with the batch dimension sharded over devices, the (B, B) similarity is
    computed by GSPMD over the *global* batch (XLA inserts the all-gathers), so every example sees
    the negatives of all devices and the value equals the unsharded computation: no explicit
    ``all_gather`` is needed (unlike BLIP-2's ``concat_all_gather``).

    The clip of the temperature stops its gradient outside [0.001, 0.5]; BLIP-2 instead clamps the
    parameter in place each step (``temp.clamp_``), which gives the same forward value.

    Args:
      audio_emb: (B, Q, D) or (B, D) float.
      text_emb: (B, D) float.
      temperature: scalar float (the ``QFormer.temperature()`` parameter).
      valid: optional (B,) bool; False rows (batch padding) are neither anchors nor negatives and
        do not change the loss or metrics. Default: all valid.
      targets_equal: optional (B, B) bool, True where audio i and text j are a positive pair (e.g.
        several clips with the same instruction text in MEAD). The diagonal is always positive.
        Each anchor's target distribution spreads uniformly over its valid positives (multi-positive
        soft targets); audio->text uses rows, text->audio columns. Default: identity.
      label_smoothing: mixes the targets with a uniform distribution over the valid candidates
        (BLIP-2 uses 0.1; paper Eq. 6 is 0).

    Returns:
      ``(loss, metrics)``: loss () float32; metrics ``loss``, ``loss_a2t``, ``loss_t2a``,
      ``acc_a2t``, ``acc_t2a`` (fraction of valid anchors whose arg-max candidate is a positive),
      ``temperature`` (clipped), ``num_valid``.

    Raises:
      InputError: inconsistent shapes.
    """
    audio_emb, valid, positives = _check_pairs(audio_emb, text_emb, valid, targets_equal)
    temp = jnp.clip(jnp.asarray(temperature, jnp.float32), TEMPERATURE_MIN, TEMPERATURE_MAX)
    a = l2_normalize(audio_emb)
    t = l2_normalize(text_emb)
    sim = jnp.max(jnp.einsum("bqd,cd->bcq", a, t), axis=-1)  # (B audio, B text)
    logits = sim / temp
    pair_ok = valid[:, None] & valid[None, :]
    positives = positives & pair_ok

    loss_a2t, acc_a2t = _direction(logits, positives, valid, label_smoothing)
    loss_t2a, acc_t2a = _direction(logits.T, positives.T, valid, label_smoothing)
    loss = 0.5 * (loss_a2t + loss_t2a)
    metrics = {"loss": loss, "loss_a2t": loss_a2t, "loss_t2a": loss_t2a,
               "acc_a2t": acc_a2t.astype(jnp.float32), "acc_t2a": acc_t2a.astype(jnp.float32),
               "temperature": temp, "num_valid": valid.sum().astype(jnp.float32)}
    return loss, metrics


def lm_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted next-token cross-entropy (stage 1b: only the instruction tokens carry weight).

    The caller aligns the arrays: ``logits[:, l]`` is the prediction for ``targets[:, l]`` (i.e. the
    logits at position l-1 of the input, already shifted). The log-softmax is taken in float32.

    Args:
      logits: (B, L, V) float (any float dtype; vocab may be sharded).
      targets: (B, L) int token ids in [0, V).
      weights: (B, L) float or bool; 0 for prompt/padding tokens.

    Returns:
      ``(loss, metrics)``: loss = sum(w * nll) / sum(w) (0 when sum(w) == 0), () float32; metrics
      ``loss``, ``accuracy`` (weighted arg-max token accuracy), ``num_tokens`` (sum of weights),
      ``perplexity`` (exp(loss)).

    Raises:
      InputError: inconsistent shapes.
    """
    if logits.ndim != 3 or targets.shape != logits.shape[:2] or weights.shape != targets.shape:
        raise InputError(f"lm_cross_entropy expects logits (B, L, V), targets and weights (B, L); got "
                         f"{logits.shape}, {targets.shape}, {weights.shape}")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    w = weights.astype(jnp.float32)
    total = jnp.sum(w)
    denom = jnp.maximum(total, 1e-8)
    loss = jnp.sum(nll * w) / denom
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    accuracy = jnp.sum(correct * w) / denom
    return loss, {"loss": loss, "accuracy": accuracy, "num_tokens": total,
                  "perplexity": jnp.exp(loss)}


def identical_sequences(ids: jax.Array, mask: jax.Array) -> jax.Array:
    """(B, B) bool: rows whose valid tokens are identical (B, L) — duplicate instructions in a batch,
    the positives of a multi-positive ``info_nce``."""
    ids = jnp.where(mask, ids, -1)
    return jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)
