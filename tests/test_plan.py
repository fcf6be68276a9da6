"""python -m avi_jax.plan: the compiled step's memory, from abstract shapes, on 8 fake devices."""
from __future__ import annotations

import numpy as np
import pytest

from avi_jax import plan as P


def test_parse_mesh_and_bytes():
    assert P.parse_mesh("data=1,fsdp=8") == {"data": 1, "fsdp": 8, "tensor": 1}
    assert P.parse_mesh("tensor=2") == {"data": 1, "fsdp": 1, "tensor": 2}
    for bad in ("fsdp=0", "pipe=2", "fsdp"):
        with pytest.raises(ValueError, match="--mesh"):
            P.parse_mesh(bad)
    assert P.parse_bytes("16GB") == 16 * 10**9 and P.parse_bytes("1.5 GiB") == 3 * 2**29
    assert P.parse_bytes("512") == 512
    with pytest.raises(ValueError, match="--device-memory"):
        P.parse_bytes("16 elephants")


def test_shape_only_config_reads_no_folder():
    config = P.load_config("configs/instruct.py", ["model.llm.scan=False"])
    shaped = P.shape_only_config(config)
    assert config.model.llm.source == "hf" and shaped.model.llm.source == "init"
    assert shaped.model.audio_encoder.hf_path == "" and shaped.model.llm.scan is False
    with pytest.raises(KeyError, match="no field"):
        P.load_config("configs/instruct.py", ["model.llm.nope=1"])


def test_paper_models_from_presets():
    """The paper's towers at their published sizes, without weights (abstract init only)."""
    import flax.linen as nn
    import jax
    config = P.load_config("configs/instruct.py")
    (tune,) = P.shape_stages(config, "tune")
    llm = tune.setup.model_config.llm
    assert (llm.num_params, llm.param_dtype, llm.remat, llm.scan) == (6_738_415_616, "bfloat16", True, True)
    assert tune.trainable == ("llm_proj",)


def _hand_bytes(tree, shardings) -> int:
    """Per-device bytes by hand: each dimension split by the product of the mesh axes named for it."""
    import jax
    total = 0
    for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shape = list(leaf.shape)
        for i, axes in enumerate(tuple(s.spec)):
            for a in (axes,) if isinstance(axes, str) else (axes or ()):
                shape[i] = -(-shape[i] // s.mesh.shape[a])
        total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
    return total


@pytest.mark.slow
def test_plan_motion_tiny_matches_hand_count():
    config = P.load_config("configs/motion_prior.py:tiny")
    (stage,) = P.shape_stages(config, "motion")
    mesh = {"data": 2, "fsdp": 4, "tensor": 1}
    run, st, example = P.abstract_stage(stage, stage.config, mesh)
    plan = P.plan_stage(stage, stage.config, mesh)
    assert plan.trained_bytes == _hand_bytes(st.state.params, st.state_shardings.params)
    assert plan.optimizer_bytes == _hand_bytes(st.state.opt_state, st.state_shardings.opt_state)
    # Adam's two moments mirror the parameters (+ a few scalar counts)
    assert 2 * plan.trained_bytes <= plan.optimizer_bytes <= 2 * plan.trained_bytes + 64
    # XLA's arguments are what the shardings say one device holds (+ the step and the key; jit drops
    # batch arrays the loss does not read)
    held = plan.trained_bytes + plan.optimizer_bytes + plan.frozen_bytes + plan.batch_bytes
    assert held - plan.batch_bytes <= plan.argument_bytes <= held + 64
    assert plan.alias_bytes >= plan.trained_bytes + plan.optimizer_bytes   # the state is donated
    assert plan.peak_bytes == (plan.argument_bytes + plan.output_bytes - plan.alias_bytes + plan.temp_bytes
                               + plan.code_bytes)
    assert plan.frozen_bytes == _hand_bytes(st.frozen, st.frozen_shardings) and plan.num_frozen > 0
    assert plan.flops > 0
    text = P.format_plan(plan, device_memory=1)
    assert "DOES NOT FIT" in text and "temporaries" in text


@pytest.mark.slow
def test_cli_tune_exit_status(capsys):
    args = ["--config", "configs/instruct.py:tiny", "--stage", "tune", "--mesh", "fsdp=4,tensor=2",
            "--set", "model.llm.scan=True", "--set", "model.llm.remat=True"]
    assert P.main(args + ["--device-memory", "1KB"]) == P.EXIT_DOES_NOT_FIT
    out = capsys.readouterr().out
    assert "stage tune  mesh data=1,fsdp=4,tensor=2" in out and "DOES NOT FIT" in out
    assert P.main(args[:2] + ["--stage", "nope"]) == 2
    assert "not a stage" in capsys.readouterr().err
