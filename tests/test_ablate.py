"""``python -m avi_jax.ablate``: which stages an ablation shares with the full system, the tables, and a tiny
end-to-end run (slow)."""
from __future__ import annotations

import json
import os

import pytest

from avi_jax import ablate
from avi_jax.errors import ConfigError

CONFIG = "configs/avi_talking.py:tiny"


@pytest.mark.parametrize("name, shared", [
    ("no_diffusion", ["lm", "align", "tune", "motion"]),       # stage 2 only: stage 1 and motion reused
    ("no_cont_align", ["lm", "align", "tune", "motion"]),
    ("no_llm", ["lm", "align", "tune", "motion"]),
    ("no_llama", ["motion", "style"]),                          # stage 1 only: stage 2 reused
    ("no_qformer_align", ["motion", "style"]),
    ("no_aug", ["motion"]),                                     # both stages' data change
])
def test_shareable_stages(name, shared):
    full = ablate.load_config(CONFIG)
    config = ablate.load_config(CONFIG, name)
    assert ablate.shareable_stages(config, full) == shared
    assert ablate.shareable_stages(full, full) == list(full.stages)


def test_system_names():
    assert ablate.system_names(CONFIG, "no_llama, no_diffusion") == ["full", "no_llama", "no_diffusion"]
    assert ablate.system_names(CONFIG, None)[0] == "full" and len(ablate.system_names(CONFIG, None)) == 7
    with pytest.raises(ConfigError, match="unknown no_such"):
        ablate.system_names(CONFIG, "no_such")
    with pytest.raises(ConfigError, match="not the whole system"):
        ablate.system_names("configs/instruct.py:tiny", None)


def _result(bleu, diversity=None):
    return {"instructions": {"metrics": {"BLEU_1": bleu}, "unavailable": {"SPICE": "needs --spice-jars"}},
            "diversity": {"metrics": {} if diversity is None else {"diversity_style": diversity},
                          "unavailable": {"diversity_style": "one sample"}},
            "video": {"metrics": {}, "unavailable": {"fid": "needs --inception-weights"}},
            "training": {"emotion_accuracy": 0.5}}


def test_tables_put_the_full_system_last_and_mark_missing_cells():
    results = {"full": _result(0.474, 0.4), "no_llama": _result(0.324), "no_diffusion": _result(0.474, 0.0)}
    tables = ablate.build_tables(results)
    t3, t4 = tables["table3"], tables["table4"]
    assert t3["columns"] == ["w/o LLaMA", "Full"]                      # metrics x systems, Full last
    assert t3["values"]["BLEU_1 ↑"] == {"w/o LLaMA": pytest.approx(32.4), "Full": pytest.approx(47.4)}
    assert t3["values"]["SPICE ↑"]["Full"] is None and "needs --spice-jars" in t3["unavailable"]
    assert t3["values"]["Emotion acc. ↑"]["Full"] == 0.5
    assert t4["rows"] == ["w/o Diffusion", "Full"]                    # systems x metrics, Full last
    assert t4["values"]["w/o Diffusion"]["Diversity ↑"] == 0.0        # a real 0, not a missing value
    assert t4["values"]["Full"]["FID ↓"] is None
    text = ablate.markdown(tables)
    assert "| Metric | w/o LLaMA | Full |" in text and "| BLEU_1 ↑ | 32.4 | 47.4 |" in text
    assert "| w/o Diffusion | n/a | 0 |" in text and "needs --inception-weights" in text


@pytest.mark.slow
def test_tiny_ablate_run_shares_stages_and_resumes(tmp_path, capsys):
    root = str(tmp_path / "ablate")
    args = ["--config", CONFIG, "--workdir", root, "--ablations", "no_diffusion", "--num-samples", "2"]
    assert ablate.main(args) == 0
    with open(os.path.join(root, "tables.json")) as f:
        out = json.load(f)
    assert out["systems"] == ["full", "no_diffusion"]
    assert out["shared_with_full"]["no_diffusion"] == ["lm", "align", "tune", "motion"]
    t4 = out["tables"]["table4"]
    assert t4["rows"] == ["w/o Diffusion", "Full"]
    # without the prior every sample of a clip is the same style: diversity exactly 0; with it, > 0
    assert t4["values"]["w/o Diffusion"]["Diversity ↑"] == 0.0 and t4["values"]["Full"]["Diversity ↑"] > 0
    # the copied stages were not retrained: no checkpoints, identical exported parameters
    for stage in ("lm", "align", "tune", "motion"):
        assert not os.path.exists(os.path.join(root, "no_diffusion", stage, "checkpoints"))
        with open(os.path.join(root, "full", stage, "params.safetensors"), "rb") as a, \
                open(os.path.join(root, "no_diffusion", stage, "params.safetensors"), "rb") as b:
            assert a.read() == b.read()
    assert os.path.isdir(os.path.join(root, "no_diffusion", "style", "checkpoints"))
    with open(os.path.join(root, "tables.md")) as f:
        assert "| w/o Diffusion |" in f.read()
    # a rerun only reads the evaluations back
    before = os.path.getmtime(os.path.join(root, "no_diffusion", "eval.json"))
    assert ablate.main(args) == 0
    assert os.path.getmtime(os.path.join(root, "no_diffusion", "eval.json")) == before
