"""Batched KV-cache generation: greedy parity with transformers ``generate``, EOS/pad handling, soft
prompts, nucleus sampling and compile caching."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from avi_jax.checkpoints.llama import load_llama  # noqa: E402
from avi_jax.errors import InputError  # noqa: E402
from avi_jax.models import generate as G  # noqa: E402
from avi_jax.models.llama import Llama  # noqa: E402

N = 10   # max_new_tokens
PAD = 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random GQA model (weights large enough that greedy output varies) + a left-padded batch."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, pad_token_id=PAD)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    folder = tmp_path_factory.mktemp("llama_gen")
    hf.save_pretrained(folder)
    cfg, params = load_llama(str(folder))
    rs = np.random.RandomState(0)
    ids = rs.randint(3, 128, (3, 7)).astype(np.int32)
    mask = np.ones((3, 7), bool)
    mask[1, :3] = False
    mask[2, :1] = False
    ids[~mask] = PAD
    return hf, Llama(cfg), {"params": params}, ids, mask     # generate takes the variables, as apply


def hf_greedy(hf, ids, mask, eos):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask.astype(np.int64)), max_new_tokens=N,
                          do_sample=False, eos_token_id=eos, pad_token_id=PAD).numpy()[:, ids.shape[1]:]
    return np.pad(out, ((0, 0), (0, N - out.shape[1])), constant_values=PAD)   # HF stops early


def test_greedy_matches_transformers_with_eos(setup):
    hf, model, params, ids, mask = setup
    free = hf_greedy(hf, ids, mask, eos=None)
    # an EOS id that really occurs: row 1's 5th token, absent from row 1's earlier tokens
    eos = next(int(t) for t in free[1, 4:] if t not in free[1, :4])
    ref = hf_greedy(hf, ids, mask, eos=eos)
    assert (ref == eos).any() and (ref[:, -1] == PAD).any(), "the EOS/pad path must be exercised"
    out = G.generate(model, params, input_ids=ids, attention_mask=mask, max_new_tokens=N,
                     eos_token_id=eos, pad_token_id=PAD)
    assert out.shape == (3, N) and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), ref)
    # without EOS the full length is produced and equals HF too
    out = G.generate(model, params, input_ids=ids, attention_mask=mask, max_new_tokens=N,
                     eos_token_id=[], pad_token_id=PAD)
    np.testing.assert_array_equal(np.asarray(out), free)


def test_all_rows_stop_at_once(setup):
    """EOS = each row's first greedy token (a list of ids): every row ends at step 0."""
    _, model, params, ids, mask = setup
    first = G.generate(model, params, input_ids=ids, attention_mask=mask, max_new_tokens=1, eos_token_id=[])
    eos = sorted(set(int(t) for t in np.asarray(first)[:, 0]))
    out = np.asarray(G.generate(model, params, input_ids=ids, attention_mask=mask, max_new_tokens=N,
                                eos_token_id=eos, pad_token_id=PAD))
    np.testing.assert_array_equal(out[:, 0], np.asarray(first)[:, 0])
    assert (out[:, 1:] == PAD).all()


def test_soft_prompt_and_right_padding(setup):
    _, model, params, ids, mask = setup
    ref = np.asarray(G.generate(model, params, input_ids=ids, attention_mask=mask, max_new_tokens=N,
                                eos_token_id=[]))
    embeds = model.apply(params, jnp.asarray(ids), method=Llama.embed)
    out = G.generate(model, params, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=N,
                     eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(out), ref)
    # the same prompts right-padded continue from each row's last real token
    order = np.argsort(~mask, axis=1, kind="stable")
    right_ids, right_mask = np.take_along_axis(ids, order, 1), np.take_along_axis(mask, order, 1)
    assert not right_mask[:, -1].all()
    out = G.generate(model, params, input_ids=right_ids, attention_mask=right_mask, max_new_tokens=N,
                     eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(out), ref)


def test_top_p_mask_hand_checked():
    probs = np.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    logits = jnp.log(jnp.asarray(probs))
    cases = {0.3: [1, 0, 0, 0], 0.5: [1, 0, 0, 0], 0.7: [1, 1, 0, 0], 0.8: [1, 1, 0, 0],
             0.81: [1, 1, 1, 0], 0.96: [1, 1, 1, 1], 1.0: [1, 1, 1, 1]}
    for top_p, want in cases.items():
        got = np.asarray(G.top_p_mask(logits, top_p))
        np.testing.assert_array_equal(got[0], np.array(want, bool), err_msg=f"top_p={top_p}")
        np.testing.assert_array_equal(got[1], np.array(want[::-1], bool), err_msg=f"top_p={top_p}")


def test_sampling_stays_in_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.tile(jnp.log(jnp.asarray(probs))[None], (4000, 1))
    draw = jax.jit(lambda k, t, p: G.sample_token(logits, k, temperature=t, top_p=p))
    s = np.asarray(draw(jax.random.PRNGKey(0), 1.0, 0.7))
    assert set(np.unique(s)) == {0, 1}                         # nucleus {0, 1}, renormalised 5/8, 3/8
    assert abs((s == 0).mean() - 0.625) < 0.03
    # temperature 2 flattens to p ** 0.5 (renormalised) before the nucleus: {0, 1, 2} for top_p 0.7
    s = np.asarray(draw(jax.random.PRNGKey(1), 2.0, 0.7))
    flat = probs ** 0.5 / (probs ** 0.5).sum()
    assert set(np.unique(s)) == {0, 1, 2}
    assert abs((s == 0).mean() - flat[0] / flat[:3].sum()) < 0.03
    s = np.asarray(draw(jax.random.PRNGKey(2), 1.0, 1.0))
    assert set(np.unique(s)) == {0, 1, 2, 3}
    assert abs((s == 3).mean() - 0.05) < 0.015


def test_generate_sampling_seeded(setup):
    _, model, params, ids, mask = setup
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=N, eos_token_id=[], temperature=1.0)
    a = np.asarray(G.generate(model, params, rng=jax.random.PRNGKey(0), top_p=0.9, **kw))
    b = np.asarray(G.generate(model, params, rng=jax.random.PRNGKey(0), top_p=0.9, **kw))
    c = np.asarray(G.generate(model, params, rng=jax.random.PRNGKey(1), top_p=0.9, **kw))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert ((a >= 0) & (a < model.config.vocab_size)).all()
    # a vanishing nucleus keeps only the top token: sampling reduces to greedy
    greedy = np.asarray(G.generate(model, params, input_ids=ids, attention_mask=mask, max_new_tokens=N,
                                   eos_token_id=[]))
    tiny_p = np.asarray(G.generate(model, params, rng=jax.random.PRNGKey(3), top_p=1e-6, **kw))
    np.testing.assert_array_equal(tiny_p, greedy)


def test_compiled_once_per_shape(setup):
    _, model, params, ids, mask = setup
    G._compiled.cache_clear()
    for _ in range(3):
        G.generate(model, params, input_ids=ids, attention_mask=mask, max_new_tokens=4, eos_token_id=7)
    fn = G._compiled(model.config, 4, True, False)
    assert G._compiled.cache_info().misses == 1
    assert fn._cache_size() == 1
    # other EOS/pad ids, temperature and top_p reuse the executables
    G.generate(model, params, input_ids=ids, attention_mask=mask, max_new_tokens=4, eos_token_id=9,
               pad_token_id=3)
    assert fn._cache_size() == 1
    for t, p in [(0.7, 0.9), (1.3, 0.5)]:
        G.generate(model, params, input_ids=ids, attention_mask=mask, max_new_tokens=4, eos_token_id=7,
                   rng=jax.random.PRNGKey(0), temperature=t, top_p=p)
    assert G._compiled(model.config, 4, False, False)._cache_size() == 1


def test_generate_errors(setup):
    _, model, params, ids, mask = setup
    with pytest.raises(InputError, match="rng"):
        G.generate(model, params, input_ids=ids, attention_mask=mask, max_new_tokens=2, temperature=1.0)
    with pytest.raises(InputError, match="exactly one"):
        G.generate(model, params, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(InputError, match="top_p"):
        G.generate(model, params, input_ids=ids, max_new_tokens=2, top_p=0.0)
    with pytest.raises(InputError, match="attention_mask"):
        G.generate(model, params, input_ids=ids, attention_mask=mask[:, 1:], max_new_tokens=2)
