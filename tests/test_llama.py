"""LLaMA decoder: parity with transformers ``LlamaForCausalLM`` on tiny random configs, KV cache,
config parsing, the 7B parameter count, and loading from safetensors / sharded / .bin folders."""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from avi_jax.checkpoints.llama import (count_params, llama_table, load_llama,  # noqa: E402
                                       param_shardings, stack_layers)
from avi_jax.errors import CheckpointError, ConfigError, InputError  # noqa: E402
from avi_jax.models import llama as L  # noqa: E402

CONFIGS = {
    # grouped-query attention, untied head, head_dim != hidden / heads
    "gqa_untied": dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       tie_word_embeddings=False),
    # multi-head attention, tied embeddings, rope_theta != 10000, biases everywhere
    "mha_tied_bias": dict(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                          rope_theta=500.0, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5),
}


def make_hf(seed: int = 0, **kw):
    """A random ``LlamaForCausalLM`` with non-trivial norm weights and biases."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(pad_token_id=0, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_folder(request, tmp_path_factory):
    model = make_hf(**CONFIGS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, model, str(folder)


def rel_err(a, b, where=None) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if where is not None:
        a, b = a[where], b[where]
    return float(np.abs(a - b).max() / np.abs(b).max())


def padded_batch(vocab: int, seed: int = 0):
    """(4, 9) ids and a mask: full row, two left-padded rows, one right-padded row."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, vocab, (4, 9)).astype(np.int32)
    mask = np.ones((4, 9), bool)
    mask[1, :3] = False
    mask[2, :1] = False
    mask[3, 6:] = False
    ids[~mask] = 0
    return ids, mask


def torch_logits(model, ids, mask):
    """HF logits with generate-style position ids (cumsum(mask) - 1)."""
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask.astype(np.int64)),
                    position_ids=torch.tensor(pos, dtype=torch.long))
    return out.logits.numpy()


# ----------------------------------------------------------------------------------------------- config

def test_config_from_hf_variants():
    base = transformers.LlamaConfig(**CONFIGS["gqa_untied"], rope_theta=1234.0).to_dict()
    cfg = L.LlamaConfig.from_hf(base)
    assert (cfg.rope_theta, cfg.head_dim, cfg.num_key_value_heads) == (1234.0, 8, 2)
    legacy = {k: v for k, v in base.items() if k != "rope_parameters"}
    legacy.update(rope_theta=777.0, rope_scaling=None, eos_token_id=[5, 6])
    del legacy["head_dim"]
    cfg = L.LlamaConfig.from_hf(legacy)
    assert (cfg.rope_theta, cfg.head_dim, cfg.eos_token_id) == (777.0, 16, 5)
    with pytest.raises(ConfigError, match="rope_scaling"):
        L.LlamaConfig.from_hf({**legacy, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ConfigError, match="rope_type"):
        L.LlamaConfig.from_hf({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}})
    with pytest.raises(ConfigError, match="model_type"):
        L.LlamaConfig.from_hf({**base, "model_type": "mistral"})
    with pytest.raises(ConfigError):
        L.tiny(num_attention_heads=4, num_key_value_heads=3)
    assert hash(L.tiny()) == hash(L.tiny()) and L.tiny(dtype=jnp.bfloat16).dtype == "bfloat16"


def test_llama_7b_param_count_abstract():
    cfg = L.llama_7b()
    abstract = nn.meta.unbox(L.abstract_params(cfg))     # eval_shape: nothing allocated
    n = count_params(abstract)
    assert n == cfg.num_params == 6_738_415_616
    with torch.device("meta"):
        ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32))
    assert n == sum(p.numel() for p in ref.parameters())
    assert len(llama_table(cfg)) == len(jax.tree.leaves(abstract))


def test_logical_axes():
    specs = nn.get_partition_spec(L.abstract_params(L.tiny(attention_bias=True)))
    attn = specs["layers_0"]["self_attn"]
    assert tuple(specs["embed_tokens"]["embedding"]) == ("vocab", "embed")
    assert tuple(attn["q_proj"]["kernel"]) == ("embed", "heads")
    assert tuple(attn["k_proj"]["kernel"]) == tuple(attn["v_proj"]["kernel"]) == ("embed", "kv")
    assert tuple(attn["o_proj"]["kernel"]) == ("heads", "embed")
    assert tuple(specs["layers_0"]["mlp"]["gate_proj"]["kernel"]) == ("embed", "mlp")
    assert tuple(specs["layers_0"]["mlp"]["down_proj"]["kernel"]) == ("mlp", "embed")
    assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")
    assert "lm_head" not in nn.get_partition_spec(L.abstract_params(L.tiny(tie_word_embeddings=True)))


# ----------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("scan", [False, True])
def test_logits_parity_padded(hf_folder, scan):
    name, model, folder = hf_folder
    cfg, params = load_llama(folder, scan=scan)
    assert cfg.scan == scan and (("layers" in params) == scan) and (("layers_0" in params) != scan)
    assert cfg.tie_word_embeddings == CONFIGS[name]["tie_word_embeddings"]
    ids, mask = padded_batch(cfg.vocab_size)
    ref = torch_logits(model, ids, mask)
    out = L.Llama(cfg).apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert out.dtype == jnp.float32 and out.shape == (4, 9, cfg.vocab_size)
    assert rel_err(out, ref, mask) <= 1e-4
    # unpadded batch without a mask equals HF's default call
    with torch.no_grad():
        ref_full = model(input_ids=torch.tensor(ids[:1], dtype=torch.long)).logits.numpy()
    assert rel_err(L.Llama(cfg).apply({"params": params}, jnp.asarray(ids[:1])), ref_full) <= 1e-4


def test_inputs_embeds_equals_input_ids(hf_folder):
    _, _, folder = hf_folder
    cfg, params = load_llama(folder)
    model = L.Llama(cfg)
    ids, mask = padded_batch(cfg.vocab_size, seed=1)
    embeds = model.apply({"params": params}, jnp.asarray(ids), method=L.Llama.embed)
    assert embeds.shape == (4, 9, cfg.hidden_size)
    a = model.apply({"params": params}, input_ids=jnp.asarray(ids), attention_mask=mask)
    b = model.apply({"params": params}, inputs_embeds=embeds, attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(InputError):
        model.apply({"params": params}, input_ids=jnp.asarray(ids), inputs_embeds=embeds)
    with pytest.raises(InputError):
        model.apply({"params": params}, input_ids=jnp.asarray(ids), attention_mask=mask[:, :4])


@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_matches_full_forward(hf_folder, scan):
    _, _, folder = hf_folder
    cfg, params = load_llama(folder, scan=scan)
    model = L.Llama(cfg)
    ids, mask = padded_batch(cfg.vocab_size, seed=2)
    mask[3] = True                           # decoding continues real tokens after the prompt
    full = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=mask))
    step = jax.jit(lambda p, x, m, c: model.apply({"params": p}, input_ids=x, attention_mask=m, cache=c))
    cache = L.KVCache.init(cfg, 4, 12)
    pieces = []
    for start, stop in [(0, 4), (4, 6), (6, 7), (7, 8), (8, 9)]:   # prefill, a chunk, single steps
        logits, cache = step(params, jnp.asarray(ids[:, start:stop]), jnp.asarray(mask[:, start:stop]), cache)
        pieces.append(np.asarray(logits))
    assert int(cache.index) == 9
    np.testing.assert_array_equal(np.asarray(cache.position), mask.sum(1))
    assert rel_err(np.concatenate(pieces, axis=1), full, mask) <= 1e-5
    assert step._cache_size() == 3              # one compilation per new-token length (4, 2, 1)
    # the cache grows only where written; unwritten slots stay masked
    assert not np.asarray(cache.mask)[:, 9:].any()


def test_remat_and_bf16():
    cfg = L.tiny()
    params = L.init_params(cfg, jax.random.PRNGKey(0))
    ids, mask = padded_batch(cfg.vocab_size)
    embeds = L.Llama(cfg).apply({"params": params}, jnp.asarray(ids), method=L.Llama.embed)

    def loss(e, c):
        return jnp.sum(jnp.where(mask[..., None], L.Llama(c).apply({"params": params}, inputs_embeds=e,
                                                                    attention_mask=mask), 0.0) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g = grad(embeds, cfg)
    g_remat = grad(embeds, cfg.replace(remat=True))
    assert rel_err(g_remat, g) <= 1e-5
    stacked = stack_layers(params, cfg.num_hidden_layers)
    g_scan = jax.jit(jax.grad(lambda e, c: jnp.sum(jnp.where(mask[..., None], L.Llama(c).apply(
        {"params": stacked}, inputs_embeds=e, attention_mask=mask), 0.0) ** 2)), static_argnums=1)
    assert rel_err(g_scan(embeds, cfg.replace(scan=True, remat=True)), g) <= 1e-5
    fwd = jax.jit(lambda c: L.Llama(c).apply({"params": params}, jnp.asarray(ids), attention_mask=mask), static_argnums=0)
    f32, bf = fwd(cfg), fwd(cfg.replace(dtype="bfloat16"))
    assert bf.dtype == jnp.float32 and rel_err(bf, f32, mask) < 0.05


# ---------------------------------------------------------------------------------------- checkpoints

def test_scan_layout_and_axes():
    cfg = L.tiny(scan=True, num_hidden_layers=3)
    specs = nn.get_partition_spec(L.abstract_params(cfg))
    assert "layers_0" not in specs and tuple(specs["layers"]["self_attn"]["q_proj"]["kernel"]) == (
        "layers", "embed", "heads")
    abstract = nn.meta.unbox(L.abstract_params(cfg))
    assert abstract["layers"]["mlp"]["down_proj"]["kernel"].shape == (3, 128, 64)
    assert count_params(abstract) == cfg.num_params
    cache = L.KVCache.init(cfg, 2, 5)
    assert cache.key.shape == (3, 2, cfg.num_key_value_heads, 5, cfg.head_dim)


def test_load_sharded_safetensors_scan_shardings(tmp_path):
    model = make_hf(seed=3, **CONFIGS["gqa_untied"])
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(1, 4, 2), ("data", "fsdp", "tensor"))
    from configs.common import logical_axis_rules
    cfg0 = L.LlamaConfig.from_hf(json.loads((tmp_path / "config.json").read_text()), scan=True)
    shardings = param_shardings(cfg0, mesh, logical_axis_rules())
    cfg, params = load_llama(str(tmp_path), shardings=shardings, scan=True)
    q = params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape == (2, 64, 32) and tuple(q.sharding.spec) == (None, "fsdp", "tensor")
    ids, mask = padded_batch(cfg.vocab_size)
    out = jax.jit(lambda p: L.Llama(cfg).apply({"params": p}, jnp.asarray(ids), attention_mask=mask))(params)
    assert rel_err(out, torch_logits(model, ids, mask), mask) <= 1e-4


def test_load_sharded_safetensors_and_shardings(tmp_path):
    model = make_hf(seed=3, **CONFIGS["gqa_untied"])
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(1, 4, 2), ("data", "fsdp", "tensor"))
    from configs.common import logical_axis_rules
    cfg0 = L.LlamaConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    shardings = param_shardings(cfg0, mesh, logical_axis_rules())
    cfg, params = load_llama(str(tmp_path), shardings=shardings)
    q = params["layers_1"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q, jax.Array) and q.sharding == shardings["layers_1"]["self_attn"]["q_proj"]["kernel"]
    assert tuple(q.sharding.spec) == ("fsdp", "tensor")
    ids, mask = padded_batch(cfg.vocab_size)
    out = jax.jit(lambda p: L.Llama(cfg).apply({"params": p}, jnp.asarray(ids), attention_mask=mask))(params)
    assert rel_err(out, torch_logits(model, ids, mask), mask) <= 1e-4


def test_tied_checkpoint_has_no_lm_head(tmp_path):
    model = make_hf(seed=4, **CONFIGS["mha_tied_bias"])
    model.save_pretrained(tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        assert "lm_head.weight" not in set(f.keys())
    cfg, params = load_llama(str(tmp_path))
    assert set(params) == {"embed_tokens", "layers_0", "layers_1", "norm"}    # the bare tree, no lm_head
    assert all(key != "lm_head.weight" for _, key, _ in llama_table(cfg))


def test_load_bf16_safetensors(tmp_path):
    model = make_hf(seed=5, **CONFIGS["gqa_untied"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    cfg, params = load_llama(str(tmp_path), dtype=jnp.bfloat16)
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "bfloat16")
    emb = params["embed_tokens"]["embedding"]
    assert emb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(emb, np.float32),
                                  model.model.embed_tokens.weight.float().detach().numpy())


def test_load_pytorch_bin(tmp_path):
    pytest.importorskip("avi_jax.checkpoints.torch_bin",
                        reason="the .bin reader (avi_jax/checkpoints/torch_bin.py) is not there yet")
    model = make_hf(seed=6, **CONFIGS["gqa_untied"])
    model.save_pretrained(tmp_path, safe_serialization=False)
    if not (tmp_path / "pytorch_model.bin").exists():
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
        for p in tmp_path.glob("*.safetensors"):
            p.unlink()
    cfg, params = load_llama(str(tmp_path))
    ids, mask = padded_batch(cfg.vocab_size)
    out = L.Llama(cfg).apply({"params": params}, jnp.asarray(ids), attention_mask=mask)
    assert rel_err(out, torch_logits(model, ids, mask), mask) <= 1e-4


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_llama(str(tmp_path / "nope"))
    model = make_hf(seed=7, **CONFIGS["gqa_untied"])
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    cfg = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**cfg, "intermediate_size": 64}))
    with pytest.raises(CheckpointError, match="shape"):
        load_llama(str(tmp_path))
    config_path.write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="model.layers.2"):
        load_llama(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no weights"):
        load_llama(str(tmp_path))


def test_generate_with_scan_matches_per_layer():
    """Greedy decoding through the stacked KV cache of a scanned model gives the per-layer model's tokens."""
    from avi_jax.models.generate import generate
    cfg = L.tiny()
    params = L.init_params(cfg, jax.random.PRNGKey(0))
    ids, mask = padded_batch(cfg.vocab_size, seed=4)
    kw = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), max_new_tokens=5,
              eos_token_id=None, pad_token_id=0, rng=jax.random.key(0))
    per_layer = generate(L.Llama(cfg), {"params": params}, **kw)
    scanned = generate(L.Llama(cfg.replace(scan=True)), {"params": stack_layers(params, 2)}, **kw)
    np.testing.assert_array_equal(np.asarray(scanned), np.asarray(per_layer))
