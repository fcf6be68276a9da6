"""HFCheckpoint: a sharded checkpoint is read shard by shard, each shard once (issue 12)."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from avi_jax.checkpoints import hf_folder, torch_bin  # noqa: E402
from avi_jax.checkpoints.llama import llama_table, load_llama  # noqa: E402
from avi_jax.models import llama as L  # noqa: E402

CONFIG = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def save_sharded(folder, num_shards: int, fmt: str):
    """A random LlamaForCausalLM as ``num_shards`` shards in HF's layout (the state dict in order, cut
    into consecutive pieces, as ``save_pretrained(max_shard_size=...)`` does) plus the index file."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(pad_token_id=0, **CONFIG)).eval()
    model.config.to_json_file(str(folder / "config.json"))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    keys = list(state)
    cuts = np.array_split(np.arange(len(keys)), num_shards)
    weight_map = {}
    for i, idx in enumerate(cuts):
        ext = "safetensors" if fmt == "safetensors" else "bin"
        prefix = "model" if fmt == "safetensors" else "pytorch_model"
        name = f"{prefix}-{i + 1:05d}-of-{num_shards:05d}.{ext}"
        part = {keys[j]: state[keys[j]] for j in idx}
        if fmt == "safetensors":
            from safetensors.torch import save_file
            save_file(part, str(folder / name))
        else:
            torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model


def count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(path, *args, **kwargs):
        calls.append(str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_bin_shards_read_once(tmp_path, monkeypatch):
    model = save_sharded(tmp_path, 4, "bin")
    calls = count_calls(monkeypatch, torch_bin, "load_torch_bin")
    # reading in the table's own order loads shards again (the bug this guards against) ...
    ckpt = hf_folder.HFCheckpoint(str(tmp_path))
    table = llama_table(L.LlamaConfig.from_hf(ckpt.config))
    for _, key, _ in table:
        ckpt[key]
    assert len(calls) > 4
    # ... the converter's file order reads each of the 4 shards exactly once
    calls.clear()
    cfg, params = load_llama(str(tmp_path))
    assert len(calls) == 4 and len(set(calls)) == 4
    np.testing.assert_array_equal(params["lm_head"]["kernel"], model.lm_head.weight.detach().numpy().T)


def test_safetensors_shards_opened_once(tmp_path, monkeypatch):
    save_sharded(tmp_path, 4, "safetensors")
    import safetensors
    calls = count_calls(monkeypatch, safetensors, "safe_open")
    load_llama(str(tmp_path))
    assert len(calls) == 4 and len(set(calls)) == 4


def test_in_file_order_puts_missing_keys_first(tmp_path):
    save_sharded(tmp_path, 2, "safetensors")
    ckpt = hf_folder.HFCheckpoint(str(tmp_path))
    rows = [("a", "lm_head.weight"), ("b", "model.embed_tokens.weight"), ("c", "nope")]
    assert [r[0] for r in ckpt.in_file_order(rows)] == ["c", "b", "a"]
