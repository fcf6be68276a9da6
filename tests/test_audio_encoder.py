"""HuBERT / Wav2Vec2 encoder: parity with transformers HubertModel / Wav2Vec2Model (tiny random configs)."""
from __future__ import annotations

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from avi_jax.checkpoints.audio_encoder import (  # noqa: E402
    PREPROCESSOR_CONFIG, abstract_params, audio_config, audio_encoder_table, detect_layout, load_audio_encoder)
from avi_jax.errors import CheckpointError, ConfigError, InputError  # noqa: E402
from avi_jax.models.audio_encoder import (  # noqa: E402
    AudioEncoder, AudioEncoderConfig, feature_lengths, normalize_waveform, receptive_field)

# Short conv stack (20x downsampling) keeps the parity tests fast; the real-audio test uses real strides.
SHORT = dict(conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2))


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "remat", "deterministic"))
def encode(cfg, params, x, mask=None, *, dtype=jnp.float32, remat=False, deterministic=True, rng=None):
    """Jitted ``AudioEncoder.apply`` with all hidden states (compiled once per config)."""
    rngs = {"dropout": rng} if rng is not None else {}
    return AudioEncoder(cfg, dtype=dtype, remat=remat).apply(
        {"params": params}, x, mask, deterministic=deterministic, output_hidden_states=True, rngs=rngs)


def _torch_classes(model_type: str):
    if model_type == "hubert":
        return transformers.HubertConfig, transformers.HubertModel
    return transformers.Wav2Vec2Config, transformers.Wav2Vec2Model


def _perturb(model, seed: int = 0) -> None:
    """Make norm scales/biases non-trivial so every parameter matters in the comparison."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "original0" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def _torch_model(cfg: AudioEncoderConfig, seed: int = 0, cls=None):
    torch.manual_seed(seed)
    config_cls, model_cls = _torch_classes(cfg.model_type)
    model = (cls or model_cls)(config_cls(**cfg.to_hf())).eval()
    _perturb(model, seed)
    return model


def _save_feature_extractor(folder, do_normalize: bool) -> None:
    """The checkpoint's preprocessor_config.json, as a hub folder carries it."""
    transformers.Wav2Vec2FeatureExtractor(do_normalize=do_normalize, return_attention_mask=True
                                          ).save_pretrained(folder)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _batch(n: int = 3000, valid: int = 2100, seed: int = 0):
    rng = np.random.RandomState(seed)
    x = rng.randn(2, n).astype(np.float32)
    mask = np.ones((2, n), np.int32)
    mask[1, valid:] = 0
    x[1, valid:] = 0.0       # what a feature extractor's padding produces
    return x, mask


def _compare_all(ours, theirs, frame_mask=None) -> list[float]:
    errs = []
    pairs = list(zip(ours.hidden_states, theirs.hidden_states))
    pairs.append((ours.last_hidden_state, theirs.last_hidden_state))
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    for a, b in pairs:
        a, b = np.asarray(a), b.detach().numpy()
        assert a.shape == b.shape
        if frame_mask is not None:
            a, b = a[frame_mask], b[frame_mask]
        errs.append(rel_err(a, b))
    return errs


PARITY_CASES = {
    "hubert_group_postln_even": dict(model_type="hubert"),
    "hubert_layer_bias_stable_odd": dict(
        model_type="hubert", feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True,
        num_conv_pos_embeddings=15, num_conv_pos_embedding_groups=2),
    "hubert_no_featproj_ln": dict(model_type="hubert", feat_proj_layer_norm=False, hidden_act="relu"),
    "wav2vec2_group_bias_postln_odd": dict(
        model_type="wav2vec2", conv_bias=True, num_conv_pos_embeddings=15),
    "wav2vec2_layer_stable_even_g1": dict(
        model_type="wav2vec2", feat_extract_norm="layer", do_stable_layer_norm=True,
        num_conv_pos_embedding_groups=1),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_parity_safetensors(case, tmp_path):
    cfg = AudioEncoderConfig.tiny(**SHORT, **PARITY_CASES[case])
    model = _torch_model(cfg)
    model.save_pretrained(tmp_path)
    _save_feature_extractor(tmp_path, do_normalize=False)
    assert (tmp_path / "model.safetensors").exists()
    loaded_cfg, params = load_audio_encoder(str(tmp_path))
    assert loaded_cfg == cfg
    x, mask = _batch()

    # Unpadded batch, no attention mask: every frame must match.
    with torch.no_grad():
        theirs = model(torch.from_numpy(x), output_hidden_states=True)
    ours = encode(loaded_cfg, params, jnp.asarray(x))
    assert len(ours.hidden_states) == cfg.num_hidden_layers + 1
    assert bool(ours.feature_mask.all())
    errs = _compare_all(ours, theirs)
    assert max(errs) <= 1e-4, errs

    # Padded batch with attention mask: every row's valid frames equal HF run on that clip alone,
    # unpadded (a file's outputs do not depend on its batch; DESIGN.md Sec. 4).
    with torch.no_grad():
        theirs = model(torch.from_numpy(x), attention_mask=torch.from_numpy(mask),
                       output_hidden_states=True)
    ours = encode(loaded_cfg, params, jnp.asarray(x), jnp.asarray(mask))
    frame_mask = np.asarray(ours.feature_mask)
    want = model._get_feature_vector_attention_mask(theirs.last_hidden_state.shape[1],
                                                    torch.from_numpy(mask)).numpy()
    np.testing.assert_array_equal(frame_mask, want)
    assert frame_mask[1].sum() < frame_mask[0].sum()
    for row in range(x.shape[0]):
        n = int(mask[row].sum())
        with torch.no_grad():
            alone = model(torch.from_numpy(x[row:row + 1, :n]), output_hidden_states=True)
        t = alone.last_hidden_state.shape[1]
        assert frame_mask[row].sum() == t
        row_mask = np.zeros_like(frame_mask)
        row_mask[row, :t] = True
        errs = [rel_err(a[row_mask], b[0].detach().numpy()) for a, b in zip(
            [np.asarray(h) for h in ours.hidden_states + (ours.last_hidden_state,)],
            alone.hidden_states + (alone.last_hidden_state,))]
        assert max(errs) <= 1e-4, (row, errs)
    # HF's padded batch agrees on the valid frames wherever its statistics ignore the padding: the
    # layer-norm conv encoder, or the unpadded row. HF's group-norm layer normalises a padded row over
    # its padding too, which we deliberately do not (see AudioEncoder.__call__).
    compared = frame_mask.copy()
    if cfg.feat_extract_norm == "group":
        compared[1] = False
        padded_row = np.zeros_like(frame_mask)
        padded_row[1] = frame_mask[1]
        assert max(_compare_all(ours, theirs, padded_row)) > 1e-3    # HF's padding dependence
    errs = _compare_all(ours, theirs, compared)
    assert max(errs) <= 1e-4, errs


def _save_bin(state_dict: dict, config: dict, folder) -> None:
    os.makedirs(folder, exist_ok=True)
    torch.save(state_dict, os.path.join(folder, "pytorch_model.bin"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    _save_feature_extractor(folder, do_normalize=False)


def test_parity_pytorch_bin_head_prefix(tmp_path):
    """HubertForCTC saved as pytorch_model.bin: keys carry 'hubert.' and there is an lm_head."""
    cfg = AudioEncoderConfig.tiny(**SHORT, feat_extract_norm="layer", conv_bias=True,
                                  do_stable_layer_norm=True)
    model = _torch_model(cfg, seed=1, cls=transformers.HubertForCTC)
    state = model.state_dict()
    assert "hubert.encoder.layer_norm.weight" in state and "lm_head.weight" in state
    _save_bin(state, {**model.config.to_dict(), "model_type": "hubert"}, tmp_path)
    _, params = load_audio_encoder(str(tmp_path))
    x, mask = _batch(seed=1)
    with torch.no_grad():
        theirs = model.hubert(torch.from_numpy(x), attention_mask=torch.from_numpy(mask),
                              output_hidden_states=True)
    ours = encode(cfg, params, jnp.asarray(x), jnp.asarray(mask))
    errs = _compare_all(ours, theirs, np.asarray(ours.feature_mask))
    assert max(errs) <= 1e-4, errs


def test_parity_pytorch_bin_legacy_weight_norm(tmp_path):
    """Old-style checkpoints: 'wav2vec2.' prefix and weight_g / weight_v for the positional conv."""
    cfg = AudioEncoderConfig.tiny(**SHORT, model_type="wav2vec2")
    model = _torch_model(cfg, seed=2)
    rename = {"parametrizations.weight.original0": "weight_g",
              "parametrizations.weight.original1": "weight_v"}
    state = {}
    for key, value in model.state_dict().items():
        for new, old in rename.items():
            key = key.replace(new, old)
        state["wav2vec2." + key] = value
    _save_bin(state, model.config.to_dict(), tmp_path)
    assert detect_layout(state) == ("wav2vec2.", "legacy")
    _, params = load_audio_encoder(str(tmp_path))
    x, _ = _batch(seed=2)
    with torch.no_grad():
        theirs = model(torch.from_numpy(x), output_hidden_states=True)
    ours = encode(cfg, params, jnp.asarray(x))
    assert max(_compare_all(ours, theirs)) <= 1e-4


def test_do_normalize_matches_the_feature_extractor(tmp_path):
    """do_normalize (preprocessor_config.json): raw padded waveforms in, the same frames out as
    transformers' Wav2Vec2FeatureExtractor followed by the PyTorch model."""
    cfg = AudioEncoderConfig.tiny(**SHORT, feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True)
    model = _torch_model(cfg, seed=5)
    model.save_pretrained(tmp_path)
    _save_feature_extractor(tmp_path, do_normalize=True)
    loaded, params = load_audio_encoder(str(tmp_path))
    assert loaded == AudioEncoderConfig.tiny(**SHORT, feat_extract_norm="layer", conv_bias=True,
                                             do_stable_layer_norm=True, do_normalize=True)
    rng = np.random.RandomState(5)
    waves = [0.3 * rng.randn(3000).astype(np.float32) + 0.05, 0.02 * rng.randn(2100).astype(np.float32)]
    fe = transformers.Wav2Vec2FeatureExtractor.from_pretrained(str(tmp_path))
    inputs = fe(waves, sampling_rate=16000, padding=True, return_attention_mask=True, return_tensors="np")
    raw = np.zeros((2, 3000), np.float32)
    raw[0], raw[1, :2100] = waves
    mask = inputs.attention_mask
    assert rel_err(normalize_waveform(jnp.asarray(raw), jnp.asarray(mask)), inputs.input_values) <= 1e-5
    with torch.no_grad():
        theirs = model(torch.from_numpy(inputs.input_values), attention_mask=torch.from_numpy(mask),
                       output_hidden_states=True)
    ours = encode(loaded, params, jnp.asarray(raw), jnp.asarray(mask))
    assert max(_compare_all(ours, theirs, np.asarray(ours.feature_mask))) <= 1e-4
    # Without preprocessor_config.json: Wav2Vec2FeatureExtractor's default (do_normalize=True).
    os.remove(tmp_path / PREPROCESSOR_CONFIG)
    assert audio_config(str(tmp_path)).do_normalize
    assert not AudioEncoderConfig.from_hf(model.config.to_dict()).do_normalize


def test_group_norm_padded_batch_matches_hf_on_each_clip_alone(tmp_path):
    """Wav2Vec2-base layout (group-norm conv, real 320x strides, do_normalize): raw clips of 0.27 s to
    0.75 s right-padded into one batch give, at each clip's valid frames, what transformers' feature
    extractor + model give for that clip alone (HF's own padded batch would not: its GroupNorm
    normalises over the padding)."""
    cfg = AudioEncoderConfig.tiny(model_type="wav2vec2", conv_bias=True)
    model = _torch_model(cfg, seed=6)
    model.save_pretrained(tmp_path)
    _save_feature_extractor(tmp_path, do_normalize=True)
    loaded, params = load_audio_encoder(str(tmp_path))
    assert loaded.feat_extract_norm == "group" and loaded.do_normalize
    rng = np.random.RandomState(6)
    waves = [0.3 * rng.randn(4321).astype(np.float32) + 0.05, 0.1 * rng.randn(12000).astype(np.float32),
             0.02 * rng.randn(7000).astype(np.float32) - 0.01]
    raw = np.zeros((3, 12000), np.float32)
    mask = np.zeros((3, 12000), np.int32)
    for i, w in enumerate(waves):
        raw[i, :len(w)], mask[i, :len(w)] = w, 1
    ours = encode(loaded, params, jnp.asarray(raw), jnp.asarray(mask))
    fe = transformers.Wav2Vec2FeatureExtractor.from_pretrained(str(tmp_path))
    for i, w in enumerate(waves):
        with torch.no_grad():
            theirs = model(fe(w, sampling_rate=16000, return_tensors="pt").input_values,
                           output_hidden_states=True)
        t = feature_lengths(cfg, len(w))
        assert theirs.last_hidden_state.shape[1] == t == int(np.asarray(ours.feature_mask[i]).sum())
        errs = [rel_err(np.asarray(a)[i, :t], b[0].numpy()) for a, b in zip(
            ours.hidden_states + (ours.last_hidden_state,), theirs.hidden_states + (theirs.last_hidden_state,))]
        assert max(errs) <= 1e-4, (i, errs)


def test_hubert_large_param_count():
    """eval_shape of hubert_large() == transformers HubertModel (meta device) minus masked_spec_embed."""
    cfg = AudioEncoderConfig.hubert_large()
    ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_params(cfg)))
    with torch.device("meta"):
        model = transformers.HubertModel(transformers.HubertConfig(**cfg.to_hf()))
    sizes = {k: v.numel() for k, v in model.state_dict().items()}
    theirs = sum(sizes.values()) - sizes.get("masked_spec_embed", 0)   # SpecAugment vector, unused
    assert ours == theirs, (ours, theirs)
    assert 314e6 < ours < 317e6
    # Every converted row lands on a distinct parameter and covers the tree.
    table = audio_encoder_table(cfg)
    num_leaves = len(jax.tree_util.tree_leaves(abstract_params(cfg)))
    assert len({row[0] for row in table}) == len(table) == num_leaves


def test_real_audio_smoke(shared_fixtures, tmp_path):
    sf = pytest.importorskip("soundfile")
    wav, sr = sf.read(str(shared_fixtures / "speech" / "feifeili_clip3.wav"), dtype="float32")
    assert sr == 16000 and wav.ndim == 1
    cfg = AudioEncoderConfig.tiny()                    # real strides: 320 samples per frame
    model = _torch_model(cfg, seed=3)
    model.save_pretrained(tmp_path)
    _save_feature_extractor(tmp_path, do_normalize=True)
    cfg, params = load_audio_encoder(str(tmp_path))
    assert cfg.do_normalize
    x = wav[None]
    fe = transformers.Wav2Vec2FeatureExtractor.from_pretrained(str(tmp_path))
    with torch.no_grad():
        theirs = model(fe(wav, sampling_rate=16000, return_tensors="pt").input_values).last_hidden_state.numpy()
    ours = jax.jit(AudioEncoder(cfg).apply)({"params": params}, jnp.asarray(x))   # raw waveform in
    t = feature_lengths(cfg, wav.shape[0])
    assert ours.last_hidden_state.shape == theirs.shape == (1, t, cfg.hidden_size)
    assert abs(t - wav.shape[0] / 16000 * 50) <= 1          # 50 Hz: 2 frames per 25 fps video frame
    assert rel_err(ours.last_hidden_state, theirs) <= 1e-4


def test_feature_lengths_match_transformers():
    cfg = AudioEncoderConfig.tiny()
    model = _torch_model(AudioEncoderConfig.tiny(num_hidden_layers=1))
    lengths = np.array([400, 401, 640, 719, 720, 16000, 112160])
    want = model._get_feat_extract_output_lengths(torch.from_numpy(lengths)).numpy()
    np.testing.assert_array_equal(feature_lengths(cfg, lengths), want)
    np.testing.assert_array_equal(np.asarray(feature_lengths(cfg, jnp.asarray(lengths))), want)
    assert feature_lengths(cfg, 16000) == 49 and isinstance(feature_lengths(cfg, 16000), int)
    assert feature_lengths(cfg, 10) == 0
    assert receptive_field(cfg) == 400                       # 25 ms at 16 kHz
    assert feature_lengths(cfg, 400) == 1 and feature_lengths(cfg, 399) == 0
    init = AudioEncoder(cfg).init
    with pytest.raises(InputError, match="receptive field"):
        jax.eval_shape(lambda: init(jax.random.PRNGKey(0), jnp.zeros((1, 399))))
    with pytest.raises(InputError, match="attention_mask"):
        jax.eval_shape(lambda: init(jax.random.PRNGKey(0), jnp.zeros((1, 800)), jnp.ones((1, 799))))
    out = jax.eval_shape(lambda: AudioEncoder(cfg).init_with_output(
        jax.random.PRNGKey(0), jnp.zeros((1, 16000)), output_hidden_states=True)[0])
    assert out.last_hidden_state.shape == (1, 49, cfg.hidden_size)
    assert len(out.hidden_states) == cfg.num_hidden_layers + 1
    assert out.feature_mask.shape == (1, 49) and out.feature_mask.dtype == jnp.bool_


def test_logical_axes_and_sharded_load(tmp_path):
    """Every weight is logically partitioned; loading onto an 8-device FSDP x tensor mesh works."""
    from configs.common import logical_axis_rules

    cfg = AudioEncoderConfig.tiny(**SHORT, feat_extract_norm="layer", conv_bias=True)
    boxed = jax.eval_shape(lambda: AudioEncoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 2000))))
    leaves = jax.tree_util.tree_leaves(boxed["params"], is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert leaves and all(isinstance(v, nn.Partitioned) for v in leaves)
    known = {"embed", "mlp", "heads", "kv", "conv", None}
    assert all(set(v.names) <= known for v in leaves)

    model = _torch_model(cfg, seed=4)
    model.save_pretrained(tmp_path)
    _save_feature_extractor(tmp_path, do_normalize=False)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(1, 4, 2), ("data", "fsdp", "tensor"))
    specs = nn.get_partition_spec(boxed)["params"]
    shardings = nn.logical_to_mesh_sharding(specs, mesh, logical_axis_rules())
    _, params = load_audio_encoder(str(tmp_path), shardings=shardings)
    kernel = params["encoder"]["layers_0"]["feed_forward"]["intermediate_dense"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    x, mask = _batch(seed=4)
    ours = jax.jit(AudioEncoder(cfg).apply)({"params": params}, jnp.asarray(x), jnp.asarray(mask))
    with torch.no_grad():
        theirs = model(torch.from_numpy(x), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    fm = np.asarray(ours.feature_mask)
    assert rel_err(np.asarray(ours.last_hidden_state)[fm], theirs[fm]) <= 1e-4


def test_init_remat_dropout_bf16_and_grad():
    cfg = AudioEncoderConfig.tiny(**SHORT, do_stable_layer_norm=True, feat_extract_norm="layer")
    x = jnp.asarray(_batch()[0])
    params = jax.jit(AudioEncoder(cfg).init)(jax.random.PRNGKey(0), x)["params"]
    params = nn.meta.unbox(params)
    pos = params["encoder"]["pos_conv_embed"]
    # weight_g starts at ||weight_v|| (per kernel tap), so the initial kernel equals weight_v.
    np.testing.assert_allclose(pos["weight_g"][:, 0, 0],
                               np.linalg.norm(np.asarray(pos["weight_v"]), axis=(1, 2)), rtol=1e-5)
    base = encode(cfg, params, x).last_hidden_state

    remat = AudioEncoder(cfg, remat=True)

    def loss(p):
        return jnp.mean(remat.apply({"params": p}, x).last_hidden_state ** 2)
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(value, jnp.mean(base ** 2), rtol=1e-5)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))
    assert float(jnp.abs(grads["encoder"]["pos_conv_embed"]["weight_g"]).max()) > 0

    dropped = encode(cfg, params, x, deterministic=False, rng=jax.random.PRNGKey(2)).last_hidden_state
    assert not np.allclose(dropped, base)

    half = encode(cfg, params, x, dtype=jnp.bfloat16).last_hidden_state
    assert half.dtype == jnp.bfloat16
    assert rel_err(half.astype(jnp.float32), base) < 0.1


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="model_type"):
        AudioEncoderConfig.from_hf({"model_type": "bert"})
    with pytest.raises(ConfigError, match="add_adapter"):
        AudioEncoderConfig.from_hf({"model_type": "wav2vec2", "add_adapter": True})
    with pytest.raises(ConfigError, match="feat_extract_norm"):
        AudioEncoderConfig.tiny(feat_extract_norm="batch")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_audio_encoder(str(tmp_path / "absent"))
    # Weights that disagree with config.json are refused with the key named.
    cfg = AudioEncoderConfig.tiny(**SHORT)
    model = _torch_model(cfg)
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        d = json.load(f)
    d["intermediate_size"] = 48
    with open(tmp_path / "config.json", "w") as f:
        json.dump(d, f)
    with pytest.raises(CheckpointError, match="intermediate_dense"):
        load_audio_encoder(str(tmp_path))


def test_presets_round_trip_through_hf_config():
    for cfg in (AudioEncoderConfig.hubert_large(), AudioEncoderConfig.hubert_base(),
                AudioEncoderConfig.wav2vec2_base(), AudioEncoderConfig.tiny(model_type="wav2vec2")):
        config_cls, _ = _torch_classes(cfg.model_type)
        hf = config_cls(**cfg.to_hf()).to_dict()
        assert AudioEncoderConfig.from_hf(hf) == cfg
