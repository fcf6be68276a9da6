"""Tests of avi_jax.models.qformer (BLIP-2 Q-Former with the stage-1a contrastive heads)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avi_jax.errors import ConfigError, InputError
from avi_jax.models.qformer import QFormer, QFormerConfig

B, T, E, W = 2, 7, 24, 20  # batch, audio frames, audio width (!= hidden), text width


def _inputs(seed=0, b=B, t=T, e=E, w=W):
    rng = np.random.default_rng(seed)
    audio = jnp.asarray(rng.normal(size=(b, t, e)), jnp.float32)
    mask = jnp.asarray(np.arange(t)[None, :] < np.array([t, t - 3])[:b, None])
    text = jnp.asarray(rng.normal(size=(b, w)), jnp.float32)
    return audio, mask, text


def _init(cfg, seed=0, **kw):
    model = QFormer(cfg, **kw)
    audio, mask, text = _inputs(seed)
    variables = model.init(jax.random.PRNGKey(seed), audio, mask, text, method=QFormer.init_all)
    return model, variables


def test_shapes_norms_and_temperature():
    cfg = QFormerConfig.tiny()
    model, variables = _init(cfg)
    audio, mask, text = _inputs(1)
    out = jax.jit(model.apply)(variables, audio, mask)
    assert out.shape == (B, cfg.num_queries, cfg.hidden_size) and out.dtype == jnp.float32
    a = model.apply(variables, audio, mask, method=QFormer.embed_audio)
    t = model.apply(variables, text, method=QFormer.embed_text)
    assert a.shape == (B, cfg.num_queries, cfg.embed_dim) and t.shape == (B, cfg.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(a), axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(t), axis=-1), 1.0, rtol=1e-5)
    temp = model.apply(variables, method=QFormer.temperature)
    assert temp.shape == () and float(temp) == pytest.approx(0.07)
    # every parameter exists after the single init and is logically partitioned
    params = variables["params"]
    assert {"query_tokens", "temp", "audio_proj", "text_proj", "embed_norm", "audio_norm"} <= set(params)
    assert params["query_tokens"].names == ("queries", "embed")
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    assert float(jnp.std(params["query_tokens"].value)) == pytest.approx(0.02, rel=0.5)
    # the batch dimension is independent: one example alone gives the same output
    single = model.apply(variables, audio[1:], mask[1:])
    np.testing.assert_allclose(np.asarray(single[0]), np.asarray(out[1]), rtol=1e-5, atol=1e-6)


def test_padded_audio_frames_do_not_change_queries():
    cfg = QFormerConfig.tiny()
    model, variables = _init(cfg)
    audio, mask, _ = _inputs(2)
    out = model.apply(variables, audio, mask)
    noisy = audio.at[1, T - 3:].set(1e3 * jax.random.normal(jax.random.PRNGKey(5), (3, E)))
    np.testing.assert_array_equal(np.asarray(model.apply(variables, noisy, mask)), np.asarray(out))
    # the same change on frames that are real does change the output (the test can fail)
    changed = model.apply(variables, noisy, jnp.ones_like(mask))
    assert float(jnp.max(jnp.abs(changed[1] - out[1]))) > 1e-3
    # mask=None means all frames are real
    np.testing.assert_allclose(np.asarray(model.apply(variables, noisy, None)), np.asarray(changed),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_layers,freq,expected", [(5, 2, [0, 2, 4]), (4, 1, [0, 1, 2, 3]),
                                                      (7, 3, [0, 3, 6]), (3, 5, [0])])
def test_cross_attention_frequency(num_layers, freq, expected):
    cfg = QFormerConfig.tiny(num_layers=num_layers, cross_attention_freq=freq)
    audio, mask, text = _inputs()
    shapes = jax.eval_shape(lambda: QFormer(cfg).init(jax.random.PRNGKey(0), audio, mask, text,
                                                      method=QFormer.init_all))
    params = shapes["params"]
    with_cross = [i for i in range(num_layers) if "cross_attn" in params[f"layers_{i}"]]
    assert with_cross == expected
    assert cfg.num_cross_attention_layers == len(expected)
    assert all("self_attn" in params[f"layers_{i}"] for i in range(num_layers))
    # cross-attention keys/values read the audio width E
    assert params["layers_0"]["cross_attn"]["key"]["kernel"].value.shape == (E, cfg.hidden_size)


def test_paper_parameter_count_matches_hand_formula():
    cfg = QFormerConfig.paper()
    e_audio, w_text = 1024, 768  # HuBERT-large features, BERT-base [CLS]
    audio = jax.ShapeDtypeStruct((2, 50, e_audio), jnp.float32)
    mask = jax.ShapeDtypeStruct((2, 50), jnp.bool_)
    text = jax.ShapeDtypeStruct((2, w_text), jnp.float32)
    shapes = jax.eval_shape(lambda a, m, t: QFormer(cfg).init(jax.random.PRNGKey(0), a, m, t,
                                                              method=QFormer.init_all), audio, mask, text)
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))

    h, inter, q, d = 768, 3072, 32, 256
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731
    layer_norm = 2 * h
    self_attention = 4 * linear(h, h) + layer_norm                              # q, k, v, out + LN
    cross_attention = 2 * linear(h, h) + 2 * linear(e_audio, h) + layer_norm    # q, out; k, v from E
    feed_forward = linear(h, inter) + linear(inter, h) + layer_norm
    n_cross = 6  # layers 0, 2, 4, 6, 8, 10
    expected = (q * h                      # query tokens
                + layer_norm               # query embedding LayerNorm
                + 2 * e_audio              # audio LayerNorm (LAVIS ln_vision)
                + 12 * (self_attention + feed_forward) + n_cross * cross_attention
                + linear(h, d) + linear(w_text, d)  # audio / text projection heads
                + 1)                       # temperature
    assert count == expected
    # sanity: ~101M (BLIP-2's Q-Former is 107M + BERT word/position embeddings with ln_vision at 1408)
    assert 100e6 < count < 103e6


def test_matches_transformers_blip2_qformer():
    torch = pytest.importorskip("torch")
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    cfg = QFormerConfig.tiny(num_layers=3, cross_attention_freq=2, audio_layer_norm=False)
    hf_cfg = Blip2QFormerConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                                num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                                hidden_act="gelu", layer_norm_eps=cfg.layer_norm_eps,
                                cross_attention_frequency=cfg.cross_attention_freq, encoder_hidden_size=E,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    hf = Blip2QFormerModel(hf_cfg).eval()
    with torch.no_grad():  # LayerNorms are initialised to (1, 0); randomise them so the map is tested
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}

    model, variables = _init(cfg)
    params = nn.unbox(variables["params"])
    params = jax.tree_util.tree_map(np.asarray, params)

    def dense(prefix):
        return {"kernel": sd[prefix + ".weight"].T, "bias": sd[prefix + ".bias"]}

    def norm(prefix):
        return {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}

    def attention(prefix):
        return ({"query": dense(prefix + ".attention.query"), "key": dense(prefix + ".attention.key"),
                 "value": dense(prefix + ".attention.value"), "out": dense(prefix + ".output.dense")},
                norm(prefix + ".output.LayerNorm"))

    params["embed_norm"] = norm("layernorm")
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}"
        layer = {}
        layer["self_attn"], layer["self_attn_norm"] = attention(p + ".attention")
        if cfg.has_cross_attention(i):
            layer["cross_attn"], layer["cross_attn_norm"] = attention(p + ".crossattention")
        layer["mlp_in"] = dense(p + ".intermediate_query.dense")
        layer["mlp_out"] = dense(p + ".output_query.dense")
        layer["mlp_norm"] = norm(p + ".output_query.LayerNorm")
        assert jax.tree_util.tree_structure(layer) == jax.tree_util.tree_structure(params[f"layers_{i}"])
        params[f"layers_{i}"] = layer

    audio, mask, _ = _inputs(3)
    ours = np.asarray(model.apply({"params": params}, audio, mask))
    query = np.broadcast_to(params["query_tokens"][None], (B,) + params["query_tokens"].shape)
    with torch.no_grad():
        ref = hf(query_embeds=torch.from_numpy(np.ascontiguousarray(query)),
                 encoder_hidden_states=torch.from_numpy(np.array(audio)),
                 encoder_attention_mask=torch.from_numpy(np.asarray(mask).astype(np.int64))
                 ).last_hidden_state.numpy()
    rel = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    assert rel <= 1e-4, rel


def test_dropout_remat_and_gradients():
    cfg = QFormerConfig.tiny(dropout=0.3)
    model, variables = _init(cfg)
    audio, mask, text = _inputs(4)
    det = model.apply(variables, audio, mask)
    d1 = model.apply(variables, audio, mask, False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert float(jnp.max(jnp.abs(d1 - det))) > 1e-3
    remat = QFormer(QFormerConfig.tiny(dropout=0.3, remat=True))
    np.testing.assert_allclose(np.asarray(remat.apply(variables, audio, mask)), np.asarray(det),
                               rtol=1e-6, atol=1e-6)

    def loss(params, model):
        a, t, temp = model.apply({"params": params}, audio, mask, text, False, method=QFormer.init_all,
                                 rngs={"dropout": jax.random.PRNGKey(2)})
        return jnp.sum(jnp.max(jnp.einsum("bqd,cd->bcq", a, t), -1)) / temp

    params = nn.unbox(variables["params"])
    g = jax.jit(jax.grad(loss), static_argnums=1)(params, model)
    g_remat = jax.jit(jax.grad(loss), static_argnums=1)(params, remat)
    for x, y in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_remat)):
        assert np.all(np.isfinite(np.asarray(x)))
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(g["query_tokens"]).sum()) > 0 and float(jnp.abs(g["temp"])) > 0


def test_errors():
    with pytest.raises(ConfigError):
        QFormerConfig.tiny(hidden_size=30, num_heads=4)
    with pytest.raises(ConfigError):
        QFormerConfig.tiny(cross_attention_freq=0)
    model, variables = _init(QFormerConfig.tiny())
    audio, mask, text = _inputs()
    with pytest.raises(InputError):
        model.apply(variables, audio[0], mask)
    with pytest.raises(InputError):
        model.apply(variables, audio, mask[:, :3])
    with pytest.raises(InputError):
        model.apply(variables, text[:, None], method=QFormer.embed_text)
