"""The stage-1 composite: prompt assembly, teacher forcing alignment, and the paper-scale build."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avi_jax.models import llama as llama_lib
from avi_jax.models.audio_encoder import AudioEncoderConfig
from avi_jax.models.instructor import Instructor, InstructorConfig, left_pack
from avi_jax.models.qformer import QFormerConfig
from avi_jax.models.text_encoder import bert_base, tiny as bert_tiny


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_left_pack_moves_padding_first_and_keeps_order():
    x = jnp.arange(2 * 5, dtype=jnp.float32).reshape(2, 5, 1)
    mask = jnp.array([[True, False, True, False, True], [True, True, True, True, True]])
    packed, pmask = left_pack(x, mask)
    np.testing.assert_array_equal(pmask, [[False, False, True, True, True], [True] * 5])
    np.testing.assert_array_equal(packed[0, 2:, 0], [0, 2, 4])
    np.testing.assert_array_equal(packed[1, :, 0], x[1, :, 0])


def _tiny_instructor():
    llm = llama_lib.tiny(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    cfg = InstructorConfig(audio=AudioEncoderConfig.tiny(), qformer=QFormerConfig.tiny(),
                           text=bert_tiny(vocab_size=50), llm=llm)
    return Instructor(cfg), llm


def test_continuation_logits_equal_the_plain_lm_on_the_concatenated_ids():
    """Text-only prompt BOS + template (with per-row template padding) + targets must give the same
    next-token logits as LLaMA run directly on the unpadded token sequence of each row."""
    model, llm_cfg = _tiny_instructor()
    rng = np.random.default_rng(0)
    t_ids = jnp.asarray(rng.integers(3, 50, (2, 4)), jnp.int32)
    t_mask = jnp.array([[True, True, True, True], [True, True, False, False]])
    y_ids = jnp.asarray(rng.integers(3, 50, (2, 3)), jnp.int32)
    y_mask = jnp.ones((2, 3), bool)
    params = model.init(jax.random.key(0), t_ids, t_mask, y_ids, y_mask, method=Instructor.init_lm)
    logits = model.apply(params, *model.apply(params, None, t_ids, t_mask, method=Instructor.prompt),
                         y_ids, y_mask, method=Instructor.continuation_logits)
    llm = llama_lib.Llama(llm_cfg)
    for row in range(2):
        seq = np.concatenate([[1], np.asarray(t_ids[row])[np.asarray(t_mask[row])], np.asarray(y_ids[row])])
        ref = llm.apply({"params": params["params"]["llm"]}, jnp.asarray(seq)[None])
        p = len(seq) - 3
        np.testing.assert_allclose(logits[row], ref[0, p - 1:p + 2], rtol=1e-5, atol=1e-5)


def test_soft_prompt_changes_the_continuation():
    model, _ = _tiny_instructor()
    audio = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8000)) * 0.1, jnp.float32)
    amask = jnp.ones((2, 8000), bool)
    t_ids, t_mask = jnp.ones((2, 3), jnp.int32) * 5, jnp.ones((2, 3), bool)
    y_ids, y_mask = jnp.ones((2, 4), jnp.int32) * 7, jnp.ones((2, 4), bool)
    params = model.init(jax.random.key(0), audio, amask, t_ids, t_mask, y_ids, y_mask,
                        method=Instructor.init_tune)
    assert set(params["params"]) == {"audio_encoder", "qformer", "llm_proj", "llm"}
    out = model.apply(params, audio, amask, t_ids, t_mask, y_ids, y_mask, method=Instructor.init_tune)
    assert out.shape == (2, 4, 50)
    # different audio -> different soft prompt -> different logits
    out2 = model.apply(params, audio[::-1], amask, t_ids, t_mask, y_ids, y_mask, method=Instructor.init_tune)
    assert not np.allclose(out[0], out2[0])


def test_paper_scale_instructor_builds_abstractly():
    """HuBERT-large + BLIP-2-sized Q-Former + BERT-base + LLaMA-7B, nothing allocated."""
    cfg = InstructorConfig(audio=AudioEncoderConfig.hubert_large(), qformer=QFormerConfig.paper(),
                           text=bert_base(), llm=llama_lib.llama_7b())
    model = Instructor(cfg)
    audio = jax.ShapeDtypeStruct((2, 96_000), jnp.float32)
    amask = jax.ShapeDtypeStruct((2, 96_000), jnp.bool_)
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    mask = jax.ShapeDtypeStruct((2, 16), jnp.bool_)
    align = nn.meta.unbox(jax.eval_shape(
        lambda a, m, i, k: model.init(jax.random.key(0), a, m, i, k, method=Instructor.align),
        audio, amask, ids, mask))["params"]
    tune = nn.meta.unbox(jax.eval_shape(
        lambda a, m, i, k: model.init(jax.random.key(0), a, m, i, k, i, k, method=Instructor.init_tune),
        audio, amask, ids, mask))["params"]
    assert set(align) == {"audio_encoder", "qformer", "text_encoder"}
    assert set(tune) == {"audio_encoder", "qformer", "llm_proj", "llm"}
    assert abs(_count(align["audio_encoder"]) - 316e6) / 316e6 < 0.01      # HuBERT-large
    assert _count(align["text_encoder"]) == 109_482_240                     # BERT-base
    assert _count(tune["llm"]) == 6_738_415_616                             # LLaMA-7B
    assert _count(tune["llm_proj"]) == 768 * 4096 + 4096                    # Q-Former width -> LLM width
    assert 100e6 < _count(align["qformer"]) < 110e6


def test_soft_prompt_projection_output_is_the_llm_embedding_axis():
    """The projection's output is the LLM's embedding width, so it is sharded like ``embed`` (as the
    LLM's token embeddings it is fed next to), not like an MLP hidden layer."""
    model, _ = _tiny_instructor()
    audio, amask = jax.ShapeDtypeStruct((2, 8000), jnp.float32), jax.ShapeDtypeStruct((2, 8000), jnp.bool_)
    ids, mask = jax.ShapeDtypeStruct((2, 3), jnp.int32), jax.ShapeDtypeStruct((2, 3), jnp.bool_)
    specs = nn.get_partition_spec(jax.eval_shape(
        lambda a, m, i, k: model.init(jax.random.key(0), a, m, i, k, i, k, method=Instructor.init_tune),
        audio, amask, ids, mask))["params"]
    assert tuple(specs["llm_proj"]["kernel"]) == (None, "embed")
    assert tuple(specs["llm_proj"]["bias"]) == ("embed",)
    assert tuple(specs["llm"]["embed_tokens"]["embedding"])[-1] == "embed"
