"""Compile time and memory of a frozen LLaMA's forward + backward, with and without ``nn.scan`` over layers.

The computation of stage 1b (``tune``) inside the LLM: logits of a soft prompt (``inputs_embeds``) through
frozen LLaMA-7B weights (bf16, sharded FSDP-style over ``--fsdp`` fake CPU devices) and the gradient with
respect to the prompt, with ``nn.remat`` per block. Built abstractly (nothing is allocated); for each of
``scan=False`` / ``scan=True`` it reports the tracing + lowering time, the XLA compile time and XLA's memory
analysis per device. ``--layers`` shortens the model to show how each grows with depth.

Usage (results in README "Memory plan")::

  nice python benchmarks/llama_compile.py                  # LLaMA-7B, 8 devices, batch 8 x 128 tokens
  nice python benchmarks/llama_compile.py --layers 8
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fsdp", type=int, default=8)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args(argv)
    from avi_jax import plan
    plan.set_fake_devices(args.fsdp)
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from avi_jax.models import llama as L
    from configs.common import logical_axis_rules
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:args.fsdp]).reshape(1, args.fsdp, 1),
                             ("data", "fsdp", "tensor"))
    rules = logical_axis_rules()
    print(f"| LLaMA-7B width, layers | scan | trace + lower s | compile s | temporaries GB/device "
          f"| arguments GB/device |")
    print("|---|---|---|---|---|---|")
    for scan in (False, True):
        cfg = L.llama_7b(num_hidden_layers=args.layers, dtype="bfloat16", param_dtype="bfloat16", remat=True,
                         scan=scan)
        boxed = L.abstract_params(cfg)
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
        params = nn.meta.unbox(boxed)
        embeds = jax.ShapeDtypeStruct((args.batch, args.tokens, cfg.hidden_size), jnp.float32)
        batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

        def prompt_grad(p, e):
            return jax.grad(lambda x: jnp.mean(L.Llama(cfg).apply({"params": p}, inputs_embeds=x)[..., :8]))(e)

        fn = jax.jit(prompt_grad, in_shardings=(shardings, batch_sharding), out_shardings=batch_sharding)
        t0 = time.perf_counter()
        with mesh, nn.logical_axis_rules(rules):
            lowered = fn.lower(params, embeds)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        mem = compiled.memory_analysis()
        print(f"| {args.layers} | {scan} | {t1 - t0:.1f} | {t2 - t1:.1f} | {mem.temp_size_in_bytes / 1e9:.2f} "
              f"| {mem.argument_size_in_bytes / 1e9:.2f} |", flush=True)
    print(f"# load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
