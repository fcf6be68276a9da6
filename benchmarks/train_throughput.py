"""Training throughput of every stage's real train step: examples/s, audio seconds/s, tokens/s and MFU.

For each stage (``align``, ``tune``, ``motion``, ``style``) the stage's own model, loss and jitted train step
(``avi_jax.training.loop.make_train_step``) run on random parameters and a synthetic batch of the shapes the
data pipeline yields. The models come from the config's architecture presets (``avi_jax.plan``: no weight
file, tokenizer or dataset is read), so ``:paper`` configs run at paper size where the device holds them and
``:demo`` configs anywhere; ``--batch-size`` and ``--set FIELD=VALUE`` scale a run to the device.

Method: parameters are initialised directly on their shardings (``jax.jit(init, out_shardings=...)``); the
step is compiled once (timed separately), run ``--warmup`` times untimed, then ``--steps`` times, each ending
in ``block_until_ready``; the median step time is reported. Per step:

* examples/s = B / t; audio s/s = B x ``data.max_audio_seconds`` / t;
* tokens/s = B x (text tokens of the stage's tokenizers) / t for the instruct stages, B x coefficient frames
  (25 fps) / t for ``motion`` and ``style`` (their "tokens" are motion frames);
* MFU = (FLOPs of the compiled step from XLA's ``cost_analysis()``, per device) / t / (peak FLOP/s of one
  device). The FLOPs are those of the program XLA runs (forward, backward and optimizer; remat's recomputed
  forward counts too, so with remat it is a hardware-FLOPs utilisation). Peak: ``--peak-tflops`` if given,
  else the datasheet dense bf16 peak for known accelerators (``DATASHEET_TFLOPS``), else (CPU) a measured
  peak: the best of 5 jitted float32 2048 x 2048 matmuls on one device. XLA's cost analysis counts the body
  of a loop once, so a scanned LLaMA (``model.llm.scan``, on in the paper config) under-reports its FLOPs by
  ~``num_hidden_layers``x: measure MFU with ``--set model.llm.scan=False``.

Usage (results and the machine in ``benchmarks/RESULTS.md``)::

  python benchmarks/train_throughput.py                       # demo variants, 1 device (CPU: ~3-5 minutes)
  python benchmarks/train_throughput.py --variant paper --mesh data=1,fsdp=8 --stages tune \\
      --batch-size 8                                          # paper shapes on 8 accelerators
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FAMILY_CONFIG = {"align": "configs/instruct.py", "tune": "configs/instruct.py",
                 "motion": "configs/motion_prior.py", "style": "configs/style_prior.py"}
DATASHEET_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "A10": 125.0,
                    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0}   # dense bf16


def device_peak_flops(override_tflops: float = 0.0) -> tuple[float, str]:
    """Peak FLOP/s of one device and where the figure comes from."""
    import jax
    import jax.numpy as jnp
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    kind = jax.devices()[0].device_kind
    for name, tflops in DATASHEET_TFLOPS.items():
        if name.lower() in kind.lower():
            return tflops * 1e12, f"datasheet bf16 ({kind})"
    n = 2048
    a = jax.device_put(jnp.ones((n, n), jnp.float32), jax.devices()[0])
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best, f"measured f32 matmul ({kind})"


def random_state(stage: Any, config: Any, mesh: dict[str, int]):
    """``(run, StageState, batch)``: the state ``avi_jax.plan.abstract_stage`` describes, initialised on its
    shardings (seeded init for every component), and a batch of zeros/ones of the example's shapes."""
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    from avi_jax import plan
    from avi_jax import sharding as mesh_lib
    from avi_jax.training.loop import StageState
    from avi_jax.training.state import TrainState
    run, abstract, example = plan.abstract_stage(stage, config, mesh)
    batch = {k: jax.device_put(jnp.ones(v.shape, v.dtype), mesh_lib.batch_sharding(run.mesh))
             for k, v in example.items()}
    init_batch = {k: v for k, v in example.items() if k != "text_feature"}
    shardings = {**abstract.state_shardings.params, **abstract.frozen_shardings}
    with run.scope():
        params = jax.jit(lambda: nn.meta.unbox(stage.model_init(jax.random.key(0), jax.tree.map(
            lambda x: jnp.ones(x.shape, x.dtype), init_batch))), out_shardings=shardings)()
        trained = {c: params.pop(c) for c in stage.trainable}
        state = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                             opt_state=abstract.tx.init(p)),
                        out_shardings=abstract.state_shardings)(trained)
    st = StageState(state=state, frozen=params, state_shardings=abstract.state_shardings,
                    frozen_shardings=abstract.frozen_shardings, tx=abstract.tx)
    return run, st, batch


def measure(stage: Any, config: Any, mesh: dict[str, int], steps: int, warmup: int) -> dict[str, float]:
    """Compile time, median step time, per-device FLOPs and parameter counts of ``stage``'s train step."""
    import jax
    from avi_jax.training.loop import make_train_step
    run, st, batch = random_state(stage, config, mesh)
    step = make_train_step(run, st)
    rng = jax.random.key(1)
    t0 = time.perf_counter()
    with run.scope():
        compiled = step.lower(st.state, st.frozen, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state, times = st.state, []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with run.scope():
            state, metrics = compiled(state, st.frozen, batch, rng)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    count = lambda t: sum(math.prod(x.shape) for x in jax.tree.leaves(t))   # noqa: E731
    return {"compile_s": compile_s, "step_s": statistics.median(times), "flops": float(cost.get("flops", 0.0)),
            "trained": count(st.state.params), "total": count(st.state.params) + count(st.frozen)}


def tokens_per_example(stage: Any, config: Any) -> tuple[int, str]:
    from avi_jax.assembly import common
    from avi_jax.data import schema
    tokenizers = getattr(stage, "tokenizers", ())
    if tokenizers and stage.name in ("align", "tune", "lm"):
        return len(tokenizers) * int(config.data.max_text_tokens), "text tokens"
    return common.max_audio_samples(config) // schema.SAMPLES_PER_FRAME, "motion frames"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="demo", help="config variant: paper | demo | tiny")
    parser.add_argument("--stages", default="align,tune,motion,style")
    parser.add_argument("--mesh", default="data=1", help="e.g. data=1,fsdp=8 (fake CPU devices if needed)")
    parser.add_argument("--batch-size", type=int, default=0, help="global batch (default: the config's)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=0.0)
    args = parser.parse_args(argv)
    from avi_jax import plan
    mesh = plan.parse_mesh(args.mesh)
    devices = math.prod(mesh.values())
    if devices > 1 and _cpu_only():
        plan.set_fake_devices(devices)     # before JAX is imported
    import jax
    peak, peak_source = device_peak_flops(args.peak_tflops)
    print(f"# device: {jax.devices()[0].platform}:{jax.devices()[0].device_kind} x {devices} "
          f"(of {jax.device_count()}); jax {jax.__version__}; peak {peak / 1e12:.3f} TFLOP/s per device "
          f"({peak_source}); load average {os.getloadavg()[0]:.2f}")
    print("| stage | config | batch | params (trained / all) | compile s | step s | examples/s | audio s/s "
          "| tokens/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in filter(None, args.stages.split(",")):
        overrides = list(args.set) + ([f"{name}.batch_size={args.batch_size}"] if args.batch_size else [])
        config = plan.load_config(f"{FAMILY_CONFIG[name]}:variant={args.variant},stage={name}"
                                  if name in ("align", "tune") else f"{FAMILY_CONFIG[name]}:{args.variant}",
                                  overrides)
        (stage,) = plan.shape_stages(config, name)
        cfg = stage.config
        m = measure(stage, cfg, mesh, args.steps, args.warmup)
        b = int(cfg[name].batch_size)
        seconds = float(cfg.data.max_audio_seconds)
        per_example, unit = tokens_per_example(stage, cfg)
        trained, total, t = m["trained"], m["total"], m["step_s"]
        print(f"| {name} | {args.variant}, {seconds:g} s clips | {b} | {trained / 1e6:.2f}M / {total / 1e6:.2f}M "
              f"| {m['compile_s']:.1f} | {t:.3f} | {b / t:.1f} | {b * seconds / t:.1f} "
              f"| {b * per_example / t:.0f} ({unit}) | {100 * m['flops'] / t / peak:.1f}% |", flush=True)
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")
    return 0


def _cpu_only() -> bool:
    """True when no accelerator plugin is installed (then a multi-device mesh uses fake CPU devices)."""
    import importlib.util
    return not any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))


if __name__ == "__main__":
    sys.exit(main())
