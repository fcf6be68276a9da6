"""The stage-1 ablations (paper Table 3) at tiny size: "w/o LLaMA" (the Q-Former generates the instruction,
models/qformer_lm.py) and "w/o Q-Former alignment"; and the ``ablation=NAME`` table of configs/avi_talking.py."""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from avi_jax.errors import ConfigError, InputError
from avi_jax.models.audio_encoder import AudioEncoderConfig
from avi_jax.models.instructor import Instructor, InstructorConfig
from avi_jax.models.qformer import QFormer, QFormerConfig
from avi_jax.models import qformer_lm as ql
from configs import avi_talking, instruct
from helpers import tiny_config


# ---- the ablation table ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(avi_talking.ABLATIONS))
def test_every_ablation_sets_existing_fields(name):
    config = avi_talking.get_config(f"tiny,ablation={name}")
    assert config.ablation == name
    for path, value in avi_talking.ABLATIONS[name].items():
        node = config
        for key in path.split("."):
            node = node[key]
        assert node == value, path


def test_stage_plans_of_the_stage1_ablations():
    assert avi_talking.get_config("tiny").stages == ("lm", "align", "tune", "motion", "style")
    assert avi_talking.get_config("tiny,ablation=no_llama").stages == ("align", "tune", "motion", "style")
    assert avi_talking.get_config("tiny,ablation=no_qformer_align").stages == ("lm", "tune", "motion", "style")
    assert avi_talking.get_config("demo,ablation=no_diffusion").stages == ("lm", "align", "tune", "motion", "style")


def test_unknown_ablation_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown ablation 'no_such'.*no_llama"):
        avi_talking.get_config("tiny,ablation=no_such")


def test_contradicting_stages_are_refused(tmp_path):
    from avi_jax.assembly.instruct import decoder_kind
    config = tiny_config(instruct, **{"model.decoder": "qformer"})        # stages still has 'lm'
    with pytest.raises(ConfigError, match="remove stage 'lm'"):
        decoder_kind(config)
    config = tiny_config(instruct, **{"model.contrastive_align": False})  # stages still has 'align'
    with pytest.raises(ConfigError, match="remove stage 'align'"):
        decoder_kind(config)
    config = tiny_config(instruct, **{"model.decoder": "gpt"})
    with pytest.raises(ConfigError, match="'llm' or 'qformer'"):
        decoder_kind(config)


# ---- the Q-Former's text decoder -------------------------------------------------------------------

@pytest.fixture(scope="module")
def captioner():
    cfg = InstructorConfig(audio=AudioEncoderConfig.tiny(), qformer=QFormerConfig.tiny())
    model = ql.QFormerInstructor(cfg, decoder=ql.QFormerLMConfig(vocab_size=40, start_token_id=1,
                                                                 end_token_id=2, max_positions=12))
    rs = np.random.RandomState(0)
    audio, audio_mask = jnp.asarray(rs.randn(2, 8000), jnp.float32), jnp.ones((2, 8000), bool)
    ids = jnp.asarray(rs.randint(3, 40, (2, 7)), jnp.int32).at[:, 0].set(1)
    mask = jnp.ones((2, 7), bool).at[1, 5:].set(False)
    params = nn.meta.unbox(model.init(jax.random.key(0), audio, audio_mask, ids, mask,
                                      method=ql.QFormerInstructor.caption_logits))["params"]
    return model, params, audio, audio_mask, ids, mask


def test_decoder_shares_the_qformer_and_adds_only_its_text_path(captioner):
    model, params, *_ = captioner
    assert set(params) == {"audio_encoder", "qformer", "qformer_lm"}           # no llm, no llm_proj
    # the shared self-attention lives in the Q-Former's own tree, under the names models/qformer.py uses
    ref = nn.meta.unbox(QFormer(model.config.qformer).init(
        jax.random.key(1), jnp.zeros((1, 5, 32)), None, jnp.zeros((1, 8)), method=QFormer.init_all))["params"]
    shared = {k for k in ref if k not in ("audio_proj", "text_proj")}
    assert set(params["qformer"]) == shared
    for k in shared:
        assert jax.tree.map(jnp.shape, params["qformer"][k]) == jax.tree.map(jnp.shape, ref[k]), k
    assert set(params["qformer_lm"]) == {"word_embeddings", "position_embeddings", "head_dense", "head_norm",
                                         "head_bias", "text_layers_0", "text_layers_1", "text_layers_2"}


def test_decoder_is_causal_and_masks_padding(captioner):
    model, params, audio, audio_mask, ids, mask = captioner
    fn = lambda i, m: model.apply({"params": params}, audio, audio_mask, i, m,
                                  method=ql.QFormerInstructor.caption_logits)
    logits = fn(ids, mask)
    assert logits.shape == (2, 7, 40) and logits.dtype == jnp.float32
    changed = fn(ids.at[:, 4].set(9), mask)
    np.testing.assert_array_equal(changed[:, :4], logits[:, :4])           # the past does not see token 4
    assert np.abs(changed[0, 4:] - logits[0, 4:]).max() > 1e-4                 # the future does
    # row 1's padded positions (5, 6) change nothing at valid positions
    np.testing.assert_allclose(fn(ids.at[1, 5:].set(11), mask)[1, :5], logits[1, :5], atol=1e-6)


def test_text_reads_the_audio_through_the_queries_only(captioner):
    model, params, audio, audio_mask, ids, mask = captioner
    fn = lambda a, p: model.apply({"params": p}, a, audio_mask, ids, mask,
                                  method=ql.QFormerInstructor.caption_logits)
    other = jnp.asarray(np.random.RandomState(5).randn(*audio.shape), jnp.float32)
    assert np.abs(fn(other, params) - fn(audio, params)).max() > 1e-6      # the audio matters (weakly at init)...
    # ...but with the queries' cross-attention zeroed the audio cannot reach the text
    cut = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "cross_attn" in jax.tree_util.keystr(path) else x, params)
    np.testing.assert_array_equal(fn(other, cut), fn(audio, cut))


def test_multimodal_causal_mask_by_hand():
    m = np.asarray(ql.multimodal_causal_mask(2, jnp.array([[True, True, False]])))[0, 0]
    np.testing.assert_array_equal(m, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])


def test_generation_greedy_matches_teacher_forcing(captioner):
    model, params, audio, audio_mask, *_ = captioner
    out = np.asarray(ql.generate_instructions(model, params, audio, audio_mask, max_new_tokens=5))
    assert out.shape == (2, 5)
    # each greedy token is the argmax of the teacher-forced logits on the generated prefix
    ids = jnp.concatenate([jnp.ones((2, 1), jnp.int32), jnp.asarray(out)], 1)
    logits = model.apply({"params": params}, audio, audio_mask, ids, jnp.ones(ids.shape, bool),
                         method=ql.QFormerInstructor.caption_logits)
    for r in range(2):
        for i in range(5):
            if i and out[r, i - 1] == 2:                 # after the end token: padding
                assert (out[r, i:] == 0).all()
                break
            assert out[r, i] == int(jnp.argmax(logits[r, i]))
    sampled = ql.generate_instructions(model, params, audio, audio_mask, max_new_tokens=5, temperature=1.0,
                                       rng=jax.random.key(0))
    assert sampled.shape == (2, 5)
    with pytest.raises(InputError, match="rng"):
        ql.generate_instructions(model, params, audio, audio_mask, max_new_tokens=5, temperature=1.0)
    with pytest.raises(InputError, match="max_new_tokens"):
        ql.generate_instructions(model, params, audio, audio_mask, max_new_tokens=12)


# ---- tiny training runs ----------------------------------------------------------------------------

def _ablated(name: str, data_dir) -> object:
    config = avi_talking.get_config(f"tiny,ablation={name}").instruct
    config.data.dir = str(data_dir)
    return config


def _keys(path: str) -> list[str]:
    with safe_open(path, framework="numpy") as f:
        return list(f.keys())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_data")


@pytest.mark.slow
def test_no_llama_trains_without_any_llm(tmp_path, data_dir):
    from avi_jax.assembly.instruct import InstructSetup
    from avi_jax.training.experiment import train_and_evaluate
    config = _ablated("no_llama", data_dir)
    assert tuple(config.stages) == ("align", "tune")
    workdir = str(tmp_path / "run")
    metrics = train_and_evaluate(config, workdir)
    assert set(metrics["stages"]) == {"align", "tune"}
    with open(os.path.join(workdir, "tune", "train_metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]       # the generation loss trains
    assert np.isfinite(metrics["tune_loss"]) and 0 <= metrics["emotion_accuracy"] <= 1
    # no LLM parameters anywhere in the workdir
    assert not os.path.exists(os.path.join(workdir, "lm"))
    for stage in ("align", "tune"):
        keys = _keys(os.path.join(workdir, stage, "params.safetensors"))
        assert not [k for k in keys if k.startswith(("llm/", "llm_proj/"))], stage
    tune_keys = _keys(os.path.join(workdir, "tune", "params.safetensors"))
    assert any(k.startswith("qformer_lm/") for k in tune_keys) and any(k.startswith("qformer/") for k in tune_keys)
    # inference generates with the Q-Former (text tokenizer ids decoded to words)
    setup = InstructSetup(config, workdir, data=False)
    params = setup.load_trained()
    assert set(params) == {"audio_encoder", "qformer", "qformer_lm"}
    texts = setup.describe(params, np.zeros((2, 16000), np.float32), np.ones((2, 16000), bool))
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


@pytest.mark.slow
def test_no_qformer_align_has_no_align_stage_and_no_infonce(tmp_path, data_dir, monkeypatch):
    from avi_jax.training import losses
    from avi_jax.training.experiment import train_and_evaluate
    calls = []
    monkeypatch.setattr(losses, "info_nce", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(
        AssertionError("InfoNCE used without contrastive alignment")))
    config = _ablated("no_qformer_align", data_dir)
    assert tuple(config.stages) == ("lm", "tune")
    workdir = str(tmp_path / "run")
    metrics = train_and_evaluate(config, workdir)
    assert set(metrics["stages"]) == {"lm", "tune"} and not calls
    assert not os.path.exists(os.path.join(workdir, "align"))
    assert "retrieval_top1" not in metrics
    # tune trained the Q-Former (and the tiny audio encoder) from their initialisation
    assert set(json.load(open(os.path.join(workdir, "tune", "config.json")))["model"]) >= {"contrastive_align"}
    keys = _keys(os.path.join(workdir, "tune", "params.safetensors"))
    assert {k.split("/")[0] for k in keys} >= {"qformer", "audio_encoder", "llm_proj", "llm"}
    assert not any("audio_proj" in k or "text_proj" in k for k in keys)      # align's heads: never built


def test_decoder_matches_transformers_blip2_qformer_with_text_and_bert_lm_head():
    """Parity with the reference: transformers ``Blip2QFormerModel`` (``use_qformer_text_input``) run on
    [queries; text embeddings] with BLIP-2's multimodal causal mask, then BERT's ``BertLMPredictionHead``
    with the decoder tied to the word embeddings (LAVIS ``BertLMHeadModel``), same random weights."""
    torch = pytest.importorskip("torch")
    from transformers import BertConfig, Blip2QFormerConfig, Blip2QFormerModel
    from transformers.models.bert.modeling_bert import BertLMPredictionHead
    from avi_jax.checkpoints.convert import build_params
    from avi_jax.checkpoints.qformer import blip2_qformer_table

    qcfg = QFormerConfig.tiny(num_layers=3, cross_attention_freq=2, audio_layer_norm=False)
    hf_cfg = Blip2QFormerConfig(hidden_size=qcfg.hidden_size, num_hidden_layers=qcfg.num_layers,
                                num_attention_heads=qcfg.num_heads, intermediate_size=qcfg.intermediate_size,
                                hidden_act="gelu", layer_norm_eps=qcfg.layer_norm_eps,
                                cross_attention_frequency=qcfg.cross_attention_freq, encoder_hidden_size=24,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                use_qformer_text_input=True)
    torch.manual_seed(0)
    hf = Blip2QFormerModel(hf_cfg).eval()
    head = BertLMPredictionHead(BertConfig(hidden_size=qcfg.hidden_size, vocab_size=40, hidden_act="gelu",
                                           layer_norm_eps=qcfg.layer_norm_eps)).eval()
    with torch.no_grad():
        for p in list(hf.parameters()) + list(head.parameters()):
            p.add_(0.1 * torch.randn_like(p))          # LayerNorms and biases away from (1, 0)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}

    dec_cfg = ql.QFormerLMConfig(vocab_size=40, start_token_id=1, end_token_id=2, max_positions=12)
    decoder = ql.QFormerTextDecoder(dec_cfg, QFormer(qcfg))
    rs = np.random.RandomState(0)
    feats = jnp.asarray(rs.randn(2, 9, 24), jnp.float32)
    # all audio frames valid: transformers builds the cross-attention mask for [queries; text] rows but applies
    # it to the query rows only (a shape error); audio padding is tested in tests/test_qformer.py
    feat_mask = jnp.ones((2, 9), bool)
    ids = jnp.asarray(rs.randint(3, 40, (2, 7)), jnp.int32)
    mask = jnp.ones((2, 7), bool).at[1, 5:].set(False)
    params = jax.tree.map(np.asarray, nn.meta.unbox(decoder.init(jax.random.key(0), feats, feat_mask, ids, mask)))
    params = params["params"]
    params["qformer"].update(build_params(sd, blip2_qformer_table(qcfg)))

    def dense(key):
        return {"kernel": sd[key + ".weight"].T, "bias": sd[key + ".bias"]}

    for i in range(qcfg.num_layers):
        params[f"text_layers_{i}"] = {
            "mlp_in": dense(f"encoder.layer.{i}.intermediate.dense"),
            "mlp_out": dense(f"encoder.layer.{i}.output.dense"),
            "mlp_norm": {"scale": sd[f"encoder.layer.{i}.output.LayerNorm.weight"],
                         "bias": sd[f"encoder.layer.{i}.output.LayerNorm.bias"]}}
    hd = {k: v.detach().numpy() for k, v in head.state_dict().items()}
    params["head_dense"] = {"kernel": hd["transform.dense.weight"].T, "bias": hd["transform.dense.bias"]}
    params["head_norm"] = {"scale": hd["transform.LayerNorm.weight"], "bias": hd["transform.LayerNorm.bias"]}
    params["head_bias"] = hd["decoder.bias"]          # the bias forward adds (tied to "bias" in BERT models)
    ours = np.asarray(decoder.apply({"params": params}, feats, feat_mask, ids, mask))

    q, l = qcfg.num_queries, ids.shape[1]
    text = params["word_embeddings"][np.asarray(ids)] + params["position_embeddings"][None, :l]
    query = np.broadcast_to(params["qformer"]["query_tokens"][None], (2, q, qcfg.hidden_size))
    full = np.zeros((2, 1, q + l, q + l), bool)                      # BLIP-2's multimodal causal mask
    full[:, :, :q, :q] = True
    full[:, :, q:, :] = np.asarray(ql.multimodal_causal_mask(q, mask))
    with torch.no_grad():
        head.decoder.weight.copy_(torch.from_numpy(np.array(params["word_embeddings"])))
        hidden = hf(query_embeds=torch.from_numpy(np.concatenate([query, text], 1).astype(np.float32)),
                    query_length=q, attention_mask=torch.from_numpy(full),
                    encoder_hidden_states=torch.from_numpy(np.array(feats))).last_hidden_state
        ref = head(hidden[:, q:]).numpy()
    valid = np.asarray(mask)
    rel = np.max(np.abs(ours - ref)[valid]) / np.max(np.abs(ref[valid]))
    assert rel <= 1e-4, rel
