"""Memory plan of a training stage, from the compiler: ``python -m avi_jax.plan --config configs/instruct.py
--stage tune --mesh data=1,fsdp=8 [--device-memory 16GB]``.

Builds the stage's real train state *abstractly* (``jax.eval_shape``: nothing is allocated, no weight file
is read), on a mesh of fake CPU devices (``--xla_force_host_platform_device_count``, set before JAX is
imported), with the shardings the training loop uses (``avi_jax.training.loop``/``state``: logical axes of
the parameters and of the abstract optimizer state), lowers and compiles the real jitted train step
(``loop.make_train_step``) and prints, per device: the bytes of the trained parameters, the optimizer state,
the frozen parameters and the batch, XLA's memory analysis of the step (``compiled.memory_analysis()``:
arguments, outputs, aliased (donated) bytes, temporaries, generated code) and whether the peak
(arguments + outputs - aliased + temporaries + code) fits ``--device-memory``.

Pretrained components (``source: hf``) whose folder is not on this machine are planned from their
architecture presets (the config's ``preset``: ``hubert_large``, ``bert_base``, ``llama_7b``,
``wav2vec2_base``, ``clip_vit_l14``), so the paper settings can be planned without the weights; dtypes, remat and
scan come from the config (``model.llm.{dtype,param_dtype,remat,scan}``). Tokenizer-dependent shapes use
the paper models' vocabularies (``PAPER_VOCAB``) and a template length of ``TEMPLATE_TOKENS``.

Caveat: XLA:CPU compiles the step, so temporaries are those of the CPU compiler's buffer assignment (it may
keep some bf16 arithmetic in float32); a GPU/TPU compile of the same program is usually within a few tens of
percent. Parameter and optimizer bytes are exact.

Exit status 0 when every planned stage fits (or no ``--device-memory`` was given), 3 when one does not,
2 for a bad command line or config (one line ``error: ...``).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import re
import sys
import time
from typing import Any, Sequence

PAPER_VOCAB = {"llm": 32000, "text": 30522, "clip": 49408}   # Vicuna/LLaMA, BERT-base uncased, CLIP BPE
LLM_SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}   # Vicuna (pad = <unk>)
TEMPLATE_TOKENS = 24   # instruction templates (<= 11 words, 69 characters) in LLaMA tokens, rounded up
EXIT_DOES_NOT_FIT = 3
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=1,fsdp=8"`` -> ``{'data': 1, 'fsdp': 8, 'tensor': 1}`` (axes not named are 1).

    Raises ``ValueError`` for an unknown axis or a size < 1."""
    out = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        axis, _, size = part.partition("=")
        if axis not in out or not size.isdigit() or int(size) < 1:
            raise ValueError(f"--mesh {text!r}: expected AXIS=N with AXIS in data, fsdp, tensor and N >= 1")
        out[axis] = int(size)
    return out


def parse_bytes(text: str) -> int:
    """``"16GB"`` -> 16e9 bytes (decimal units; ``GiB`` etc. binary). Raises ``ValueError``."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"--device-memory {text!r}: expected a size like 16GB, 80GiB or 17179869184")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:8.3f} GB"


def set_fake_devices(count: int) -> None:
    """Ask XLA:CPU for ``count`` devices; must run before JAX is imported (a no-op afterwards)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def load_config(spec: str, overrides: Sequence[str] = ()) -> Any:
    """``configs/instruct.py[:ARG]`` -> ``get_config(ARG)``, then ``FIELD=VALUE`` overrides (values parsed
    as Python literals when they are, else strings). Raises ``ValueError``/``KeyError`` naming the problem."""
    import ast
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: config file not found")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location(f"_plan_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for item in overrides:
        field, _, value = item.partition("=")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        node, keys = config, field.split(".")
        for key in keys[:-1]:
            node = node[key]
        if keys[-1] not in node:
            raise KeyError(f"--set {item}: config has no field {field!r}")
        node[keys[-1]] = value
    return config


# ---------------------------------------------------------------------------------------------------
# Shape-only stages: the real stage classes over setups that need no weights, tokenizers or data
# ---------------------------------------------------------------------------------------------------

class _Vocabulary:
    """Stands in for a tokenizer where the setups only size a model from it: ``len``, the special token
    ids, and any text encoded as ``TEMPLATE_TOKENS`` tokens."""

    def __init__(self, size: int, **special: int):
        self.size = size
        self.bos_token_id = special.get("bos_token_id")
        self.eos_token_id = special.get("eos_token_id")
        self.pad_token_id = special.get("pad_token_id", 0)
        self.cls_token_id = special.get("cls_token_id")
        self.sep_token_id = special.get("sep_token_id")

    def __len__(self) -> int:
        return self.size

    def __call__(self, text: str, **kwargs) -> dict[str, list[int]]:
        return {"input_ids": [3] * TEMPLATE_TOKENS}


def shape_only_config(config: Any) -> Any:
    """A copy of a family config whose Hugging Face components (``source: hf``) without a folder on this
    machine are seeded-init presets of the same architecture. Where the folder exists (e.g. the demo's
    MiniLM) its ``config.json`` gives the architecture; weights are never read either way."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for spec in config.model.values():
            if hasattr(spec, "get") and spec.get("source") == "hf" and not os.path.isdir(spec.get("hf_path") or ""):
                spec.source, spec.hf_path = "init", ""
    return config


def shape_setup(family: str, config: Any) -> Any:
    """The family's setup object (``avi_jax.assembly``) built from shapes alone by its own constructor
    (``data=False``), with what would read files replaced: tokenizers by the paper vocabularies
    (:class:`_Vocabulary`), the motion run of the style family by a shape-only motion setup
    (``config.motion_config``), training statistics by zeros/ones (only their shapes matter here)."""
    from unittest import mock

    import numpy as np
    from avi_jax.data import schema
    if family == "instruct":
        from avi_jax.assembly import instruct
        vocab = {"llm": _Vocabulary(PAPER_VOCAB["llm"], **LLM_SPECIAL),
                 "text": _Vocabulary(PAPER_VOCAB["text"], cls_token_id=101, sep_token_id=102)}
        with mock.patch.object(instruct, "load_tokenizers", lambda *args: vocab):
            return instruct.InstructSetup(config, "", data=False)
    if family == "motion":
        from avi_jax.assembly.motion import MotionSetup
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.flame.model_path = ""
        setup = MotionSetup(config, "", data=False)
        dim = schema.N_EXPRESSION + schema.N_JAW
        setup._stats = (np.zeros((dim,), np.float32), np.ones((dim,), np.float32))
        return setup
    if family == "style":
        from avi_jax.assembly import style
        motion = shape_setup("motion", shape_only_config(config.motion_config))
        clip = config.model.text_encoder.preset.startswith("clip")
        vocab = _Vocabulary(PAPER_VOCAB["clip" if clip else "text"], eos_token_id=PAPER_VOCAB["clip"] - 1)
        with mock.patch.object(style, "check_motion_workdir", lambda c: ""), \
                mock.patch.object(style, "load_motion_workdir", lambda *args: (motion, None)), \
                mock.patch.object(style.StyleSetup, "_tokenizer", lambda self: vocab):
            setup = style.StyleSetup(config, "", data=False)
        setup._stats = (np.zeros((setup.prior_config.style_dim,), np.float32), np.float32(1.0))
        return setup
    raise ValueError(f"unknown family {family!r}")


def example_batch(config: Any, stage_name: str, tokenizers: Sequence[str]) -> dict:
    """ShapeDtypeStructs of one global training batch as ``pipeline.make_dataset`` yields it for the
    stage: B = ``config[stage].batch_size``, N = ``data.max_audio_seconds`` x 16 kHz, F = N / 640 frames,
    L = ``data.max_text_tokens`` per tokenizer."""
    import jax
    import jax.numpy as jnp
    from avi_jax.assembly import common
    from avi_jax.data import schema
    b, n = int(config[stage_name].batch_size), common.max_audio_samples(config)
    f, length = n // schema.SAMPLES_PER_FRAME, int(config.data.get("max_text_tokens", 2))
    spec = jax.ShapeDtypeStruct
    batch = {"audio": spec((b, n), jnp.float32), "audio_mask": spec((b, n), jnp.bool_),
             "expression": spec((b, f, schema.N_EXPRESSION), jnp.float32),
             "jaw_pose": spec((b, f, schema.N_JAW), jnp.float32), "coeff_mask": spec((b, f), jnp.bool_),
             "valid": spec((b,), jnp.bool_)}
    batch.update({k: spec((b,), jnp.int32) for k in ("emotion", "intensity", "index", "instruction_index")})
    for name in tokenizers:
        batch.update({f"{name}_ids": spec((b, length), jnp.int32), f"{name}_mask": spec((b, length), jnp.bool_)})
    return batch


def stage_plans(config: Any) -> list[tuple[str, Any, str, Any]]:
    """``(stage name, stage class, family, family config)`` for each of ``config.stages``
    (``training.experiment.stage_plan``)."""
    from avi_jax.training.experiment import stage_plan
    out = []
    for name, stage_cls, setup_cls, family_config in stage_plan(config, ""):
        family = {"InstructSetup": "instruct", "MotionSetup": "motion", "StyleSetup": "style"}[setup_cls.__name__]
        out.append((name, stage_cls, family, family_config))
    return out


def _with_motion_config(family_config: Any, config: Any, family: str) -> Any:
    """The style family needs the motion model's config (in training it is read from the motion run's
    workdir): the system config's ``motion``, else ``configs/motion_prior.py`` of the same variant."""
    if family != "style":
        return family_config
    if config.get("family") == "system":
        motion = config.motion
    else:
        from configs import motion_prior
        motion = motion_prior.get_config(config.variant)
    family_config = family_config.copy_and_resolve_references()
    with family_config.unlocked():
        family_config.motion_config = motion.copy_and_resolve_references()
    return family_config


# ---------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """Per-device bytes of one stage's train step on the mesh (see the module docstring)."""
    stage: str
    mesh: dict[str, int]
    num_trained: int            # parameters (whole model, not per device)
    num_frozen: int
    trained_bytes: int          # per device, from the shardings
    optimizer_bytes: int
    frozen_bytes: int
    batch_bytes: int
    argument_bytes: int         # XLA memory analysis of the compiled step (per device)
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float                # cost analysis of the compiled step (per device), -1 if unknown
    lower_seconds: float
    compile_seconds: float

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs - donated (aliased) + temporaries + generated code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def per_device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of ``tree`` (ShapeDtypeStructs/arrays) laid out on ``shardings`` (the
    largest shard of each leaf)."""
    import jax
    import numpy as np
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shape = sharding.shard_shape(tuple(leaf.shape))
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def abstract_stage(stage: Any, config: Any, mesh_shape: dict[str, int]) -> tuple[Any, Any, dict]:
    """``(run, StageState of ShapeDtypeStructs, example batch)`` for ``stage`` on a mesh of the first
    ``data * fsdp * tensor`` devices: the state ``loop.create_train_state`` builds, without building it."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from avi_jax import sharding as mesh_lib
    from avi_jax.training.loop import StageRun, StageState
    from avi_jax.training.state import TrainState, make_optimizer, optimizer_shardings
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.mesh.update(mesh_shape)
    run = StageRun(stage, config, mesh_lib.make_mesh(config.mesh),
                   tuple(tuple(r) for r in config.logical_axis_rules))
    example = example_batch(config, stage.name, getattr(stage, "tokenizers", ("text",) if
                                                        config.family == "style" else ()))
    sc = run.stage_config
    with run.scope():
        boxed = jax.eval_shape(lambda b: stage.model_init(jax.random.key(0), b), example)
        shardings = mesh_lib.logical_shardings(boxed, run.mesh, run.rules)
        abstract = nn.meta.unbox(boxed)
        if stage.name == "align" and "text_encoder" not in stage.trainable:
            from avi_jax.models.instructor import Instructor   # align's host_batch adds the frozen features
            example["text_feature"] = jax.eval_shape(lambda p, i, m: stage.apply(
                p, i, m, method=Instructor.text_feature), {"text_encoder": abstract["text_encoder"]},
                example["text_ids"], example["text_mask"])
        tx = make_optimizer(sc.optimizer, int(sc.total_steps))
        trained = {c: abstract[c] for c in stage.trainable}
        frozen = {c: v for c, v in abstract.items() if c not in stage.trainable}
        opt_shardings = optimizer_shardings(tx, {c: boxed[c] for c in stage.trainable}, run.mesh, run.rules)
        state_shardings = TrainState(step=mesh_lib.replicated(run.mesh),
                                     params={c: shardings[c] for c in stage.trainable}, opt_state=opt_shardings)
        state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trained,
                           opt_state=jax.eval_shape(tx.init, trained))
    st = StageState(state=state, frozen=frozen, state_shardings=state_shardings,
                    frozen_shardings={c: shardings[c] for c in frozen}, tx=tx)
    return run, st, example


def plan_stage(stage: Any, config: Any, mesh_shape: dict[str, int]) -> Plan:
    """Lower and compile ``stage``'s real train step (``loop.make_train_step``) on abstract inputs and
    measure it (:class:`Plan`). Raises ``ConfigError`` for a mesh that does not match the devices."""
    import jax
    import numpy as np
    from avi_jax import sharding as mesh_lib
    from avi_jax.training.loop import make_train_step
    run, st, example = abstract_stage(stage, config, mesh_shape)
    step = make_train_step(run, st)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    t0 = time.perf_counter()
    with run.scope():
        lowered = step.lower(st.state, st.frozen, example, rng)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    count = lambda tree: int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))  # noqa: E731
    batch_sharding = jax.tree.map(lambda _: mesh_lib.batch_sharding(run.mesh), example)
    return Plan(
        stage=stage.name, mesh=dict(mesh_shape), num_trained=count(st.state.params), num_frozen=count(st.frozen),
        trained_bytes=per_device_bytes(st.state.params, st.state_shardings.params),
        optimizer_bytes=per_device_bytes(st.state.opt_state, st.state_shardings.opt_state),
        frozen_bytes=per_device_bytes(st.frozen, st.frozen_shardings),
        batch_bytes=per_device_bytes(example, batch_sharding),
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        flops=float((cost or {}).get("flops", -1.0)), lower_seconds=t1 - t0, compile_seconds=t2 - t1)


def shape_stages(config: Any, only: str = "") -> list[Any]:
    """The shape-only stage objects of ``config.stages`` (or just ``only``), in order. Raises
    ``ConfigError`` for an unknown stage."""
    from avi_jax.errors import ConfigError
    plans = stage_plans(config)
    if only:
        plans = [p for p in plans if p[0] == only]
        if not plans:
            raise ConfigError(f"--stage {only!r}: not a stage of this config ({', '.join(config.stages)})")
    setups: dict[str, Any] = {}
    out = []
    for name, stage_cls, family, family_config in plans:
        if family not in setups:
            setups[family] = shape_setup(family, shape_only_config(
                _with_motion_config(family_config, config, family)))
        out.append(stage_cls(setups[family]))
    return out


def format_plan(plan: Plan, device_memory: int | None) -> str:
    """The report printed for one stage."""
    mesh = ",".join(f"{k}={v}" for k, v in plan.mesh.items())
    rows = [
        f"stage {plan.stage}  mesh {mesh}  ({math.prod(plan.mesh.values())} devices; per device below)",
        f"  parameters trained   {fmt_bytes(plan.trained_bytes)}   ({plan.num_trained:,} in all)",
        f"  optimizer state      {fmt_bytes(plan.optimizer_bytes)}",
        f"  parameters frozen    {fmt_bytes(plan.frozen_bytes)}   ({plan.num_frozen:,} in all)",
        f"  batch                {fmt_bytes(plan.batch_bytes)}",
        "  XLA memory analysis of the compiled train step:",
        f"    arguments          {fmt_bytes(plan.argument_bytes)}",
        f"    outputs            {fmt_bytes(plan.output_bytes)}",
        f"    aliased (donated)  {fmt_bytes(plan.alias_bytes)}",
        f"    temporaries        {fmt_bytes(plan.temp_bytes)}",
        f"    generated code     {fmt_bytes(plan.code_bytes)}",
        f"  peak                 {fmt_bytes(plan.peak_bytes)}",
        f"  step FLOPs per device {plan.flops:.3e} (XLA cost analysis: a scanned loop body counts once)",
        f"  lowered in {plan.lower_seconds:.1f} s, compiled in {plan.compile_seconds:.1f} s",
    ]
    if device_memory:
        verdict = "fits" if plan.peak_bytes <= device_memory else "DOES NOT FIT"
        rows.append(f"  {verdict} in {fmt_bytes(device_memory).strip()} per device "
                    f"({100 * plan.peak_bytes / device_memory:.0f}% used)")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avi_jax.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/instruct.py[:ARG], e.g. configs/instruct.py")
    parser.add_argument("--stage", default="", help="one stage (default: every stage of the config)")
    parser.add_argument("--mesh", default="data=1,fsdp=8", help="mesh shape, e.g. data=1,fsdp=8,tensor=1")
    parser.add_argument("--device-memory", default="", help="memory of one device, e.g. 16GB or 80GiB")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set model.llm.scan=False (repeatable)")
    args = parser.parse_args(argv)
    try:
        mesh = parse_mesh(args.mesh)
        device_memory = parse_bytes(args.device_memory) if args.device_memory else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    set_fake_devices(math.prod(mesh.values()))
    from avi_jax.errors import AviJaxError
    try:
        config = load_config(args.config, args.set)
        fits = True
        for stage in shape_stages(config, args.stage):
            plan = plan_stage(stage, stage.config, mesh)
            print(format_plan(plan, device_memory), flush=True)
            fits &= device_memory is None or plan.peak_bytes <= device_memory
    except (AviJaxError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if fits else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
