"""A clip's outputs must not depend on the other clips in its batch or on its right padding.

DESIGN.md Sec. 4: "A file's outputs never depend on the other files batched with it." For every encoder
layout (group-norm conv = HuBERT/Wav2Vec2-base, layer-norm conv = HuBERT-large; post-/pre-LN;
``do_normalize`` on/off; even/odd positional conv) a clip of ``n`` samples run alone (no mask, no
padding) must give the same valid frames as the same clip right-padded to 2-3x its length in a batch
next to other clips, and the same Q-Former audio tokens and LLM soft prompt downstream.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avi_jax.models import llama as llama_lib
from avi_jax.models.audio_encoder import AudioEncoder, AudioEncoderConfig, feature_lengths
from avi_jax.models.instructor import Instructor, InstructorConfig
from avi_jax.models.qformer import QFormer, QFormerConfig

ATOL = 1e-5

ENCODER_CASES = {
    # group-norm conv encoder (HuBERT-base / Wav2Vec2-base layout), post-LN
    "hubert_group_postln": dict(model_type="hubert"),
    "wav2vec2_group_postln_bias_norm_odd": dict(
        model_type="wav2vec2", conv_bias=True, do_normalize=True, num_conv_pos_embeddings=15),
    "hubert_group_stable": dict(model_type="hubert", do_stable_layer_norm=True, do_normalize=True),
    # layer-norm conv encoder (HuBERT-large layout), pre-LN
    "hubert_layer_stable": dict(model_type="hubert", feat_extract_norm="layer", conv_bias=True,
                                do_stable_layer_norm=True),
    "hubert_layer_stable_norm": dict(model_type="hubert", feat_extract_norm="layer", conv_bias=True,
                                     do_stable_layer_norm=True, do_normalize=True),
    "wav2vec2_layer_postln_odd": dict(model_type="wav2vec2", feat_extract_norm="layer",
                                      num_conv_pos_embeddings=15, num_conv_pos_embedding_groups=2),
}

CLIP = 4321          # the clip under test: 13 frames at the real 320x strides
OTHERS = (12000, 7000)   # its batch mates; the batch is padded to 12000 samples (~2.8x the clip)


def _perturb(params, seed: int):
    """Non-trivial norm scales/biases (init has ones/zeros) so every parameter matters."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) if x.ndim == 1 else x
              for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)


def _waves(seed: int = 0):
    """The clip (with a DC offset and loud start, so per-clip statistics matter) and its batch mates."""
    rng = np.random.default_rng(seed)
    clip = (0.3 * rng.standard_normal(CLIP) + 0.05).astype(np.float32)
    clip[:800] *= 4.0
    others = [(0.1 * rng.standard_normal(n) - 0.02).astype(np.float32) for n in OTHERS]
    return clip, others


def _batch(clip, others, row: int, pad_value: str = "zeros", seed: int = 1):
    """Right-padded batch (B, N) and mask with ``clip`` at ``row``; padding zeros or noise."""
    waves = list(others)
    waves.insert(row, clip)
    n = max(len(w) for w in waves)
    rng = np.random.default_rng(seed)
    audio = (np.zeros((len(waves), n), np.float32) if pad_value == "zeros"
             else rng.standard_normal((len(waves), n)).astype(np.float32))
    mask = np.zeros((len(waves), n), bool)
    for i, w in enumerate(waves):
        audio[i, :len(w)], mask[i, :len(w)] = w, True
    return jnp.asarray(audio), jnp.asarray(mask)


@functools.lru_cache(maxsize=None)
def _encoder(case: str):
    cfg = AudioEncoderConfig.tiny(**ENCODER_CASES[case])
    model = AudioEncoder(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 2000)))["params"]
    params = _perturb(nn.meta.unbox(params), 1)
    apply = jax.jit(lambda p, a, m: model.apply({"params": p}, a, m, output_hidden_states=True))
    return cfg, params, apply


def _assert_valid_frames_equal(alone, batched, row: int, t: int):
    for a, b in zip(alone.hidden_states + (alone.last_hidden_state,),
                    batched.hidden_states + (batched.last_hidden_state,)):
        np.testing.assert_allclose(np.asarray(b[row, :t]), np.asarray(a[0]), rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", sorted(ENCODER_CASES))
def test_encoder_valid_frames_do_not_depend_on_the_batch(case):
    cfg, params, apply = _encoder(case)
    clip, others = _waves()
    t = feature_lengths(cfg, CLIP)
    alone = apply(params, jnp.asarray(clip)[None], None)
    assert alone.last_hidden_state.shape[1] == t
    # The clip alone with an all-ones mask is the same computation as without a mask.
    alone_masked = apply(params, jnp.asarray(clip)[None], jnp.ones((1, CLIP), bool))
    _assert_valid_frames_equal(alone, alone_masked, 0, t)
    for row in (0, 1, 2):
        audio, mask = _batch(clip, others, row)
        batched = apply(params, audio, mask)
        fm = np.asarray(batched.feature_mask)
        assert fm[row].sum() == t and fm[row, :t].all()
        _assert_valid_frames_equal(alone, batched, row, t)
    # The longest clip (no padding of its own) is unaffected by its shorter batch mates.
    audio, mask = _batch(clip, others, 0)
    long_alone = apply(params, audio[1:2], None)
    batched = apply(params, audio, mask)
    _assert_valid_frames_equal(long_alone, batched, 1, long_alone.last_hidden_state.shape[1])


@pytest.mark.parametrize("case", ["hubert_group_postln", "hubert_layer_stable"])
def test_encoder_ignores_the_values_in_the_padding(case):
    """Whatever the padded samples hold (noise here), only the mask counts."""
    cfg, params, apply = _encoder(case)
    clip, others = _waves(seed=2)
    t = feature_lengths(cfg, CLIP)
    alone = apply(params, jnp.asarray(clip)[None], None)
    audio, mask = _batch(clip, others, 1, pad_value="noise")
    _assert_valid_frames_equal(alone, apply(params, audio, mask), 1, t)


def test_qformer_ignores_padded_frames():
    cfg = QFormerConfig.tiny()
    model = QFormer(cfg)
    rng = np.random.default_rng(3)
    feats = jnp.asarray(rng.standard_normal((1, 13, 24)), jnp.float32)
    params = model.init(jax.random.key(0), feats, None, jnp.zeros((1, 8)), method=QFormer.init_all)
    alone = model.apply(params, feats, None)
    padded = jnp.concatenate([feats, 100.0 * jnp.asarray(rng.standard_normal((1, 27, 24)), jnp.float32)], 1)
    batch = jnp.concatenate([jnp.asarray(rng.standard_normal((1, 40, 24)), jnp.float32), padded], 0)
    mask = jnp.arange(40)[None, :] < jnp.array([[40], [13]])
    np.testing.assert_allclose(np.asarray(model.apply(params, batch, mask)[1]), np.asarray(alone[0]),
                               rtol=0, atol=ATOL)


def _instructor(audio: AudioEncoderConfig, feature_layer: int):
    llm = llama_lib.tiny(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    return Instructor(InstructorConfig(audio=audio, qformer=QFormerConfig.tiny(), llm=llm,
                                       feature_layer=feature_layer))


@pytest.mark.parametrize("case,feature_layer", [("hubert_group_postln", -1), ("hubert_group_stable", 1),
                                                ("hubert_layer_stable_norm", -1)])
def test_instructor_soft_prompt_does_not_depend_on_the_batch(case, feature_layer):
    model = _instructor(AudioEncoderConfig.tiny(**ENCODER_CASES[case]), feature_layer)
    clip, others = _waves(seed=4)
    audio, mask = _batch(clip, others, 1)
    # soft_prompt touches the audio encoder, the Q-Former and the LLM projection (not the LLM itself).
    params = jax.jit(lambda a, m: model.init(jax.random.key(0), a, m, method=Instructor.soft_prompt))(
        audio, mask)
    params = {"params": _perturb(nn.meta.unbox(params["params"]), 5)}

    def tokens_and_soft_prompt(module, a, m):
        tokens = module.audio_tokens(a, m)
        return tokens, module.soft_prompt(a, m)

    run = jax.jit(lambda p, a, m: model.apply(p, a, m, method=tokens_and_soft_prompt))
    batched = run(params, audio, mask)
    alone = run(params, jnp.asarray(clip)[None], jnp.ones((1, CLIP), bool))
    for b, a in zip(batched, alone):
        np.testing.assert_allclose(np.asarray(b[1]), np.asarray(a[0]), rtol=0, atol=ATOL)
