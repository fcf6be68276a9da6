"""Inference from a trained workdir: ``python -m avi_jax.infer --instruct-workdir runs/demo --audio a.wav b.flac``.

Prints one generated visual instruction per audio file (and writes them as JSON lines with ``--out``).
Any sample rate and channel count is accepted: audio is resampled to 16 kHz mono. The model is rebuilt
from ``<workdir>/config.json`` and the stages' exported parameters alone.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from avi_jax.errors import AviJaxError, ConfigError


def load_workdir_config(workdir: str) -> Any:
    """The resolved config a training run wrote to ``<workdir>/config.json``."""
    import ml_collections
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: not found; --instruct-workdir must be the --workdir of a finished "
                          f"`python -m avi_jax.train --config configs/instruct.py...` run")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


class InstructionModel:
    """A trained stage-1 instructor loaded from a workdir; ``describe(paths)`` -> instructions."""

    def __init__(self, workdir: str):
        import jax
        import jax.numpy as jnp
        import flax.linen as nn
        from avi_jax.models.instructor import Instructor
        from avi_jax.assembly.instruct import InstructSetup, tune_trainable

        config = load_workdir_config(workdir)
        if not os.path.isfile(os.path.join(workdir, "tune", "params.safetensors")):
            raise ConfigError(f"{workdir}: the tune stage has not finished (no tune/params.safetensors)")
        self.setup = InstructSetup(config, workdir, data=False)
        t_ids, t_mask = self.setup.fixed_templates(1)
        dummy = (jnp.zeros((1, 16000)), jnp.ones((1, 16000), bool), t_ids, t_mask,
                 jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool))
        abstract = nn.meta.unbox(jax.eval_shape(
            lambda: self.setup.model.init(jax.random.key(0), *dummy, method=Instructor.init_tune)))["params"]
        # What 'tune' trained comes from its export; everything else from where 'tune' took it.
        trained = tune_trainable(config)
        sources = {c: "stage:tune" if c in trained else self.setup.source_of("tune", c) for c in abstract}
        self.params = {c: self.setup.load(c, sources[c], abstract[c], None) for c in abstract}

    def describe(self, paths: Sequence[str]) -> list[str]:
        """One instruction per audio file (batched, padded to the longest file)."""
        from avi_jax.data.audio import load_audio
        waves = [load_audio(p) for p in paths]
        n = max(len(w) for w in waves)
        audio = np.zeros((len(waves), n), np.float32)
        mask = np.zeros((len(waves), n), bool)
        for i, w in enumerate(waves):
            audio[i, :len(w)], mask[i, :len(w)] = w, True
        return self.setup.describe(self.params, audio, mask)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m avi_jax.infer", description=__doc__.splitlines()[0])
    parser.add_argument("--instruct-workdir", required=True, help="workdir of a finished stage-1 run")
    parser.add_argument("--audio", nargs="+", required=True, help="speech files (wav/flac/ogg, any rate)")
    parser.add_argument("--out", help="write {'audio', 'instruction'} JSON lines here")
    args = parser.parse_args(argv)
    try:
        texts = InstructionModel(args.instruct_workdir).describe(args.audio)
    except AviJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [{"audio": p, "instruction": t} for p, t in zip(args.audio, texts)]
    for r in rows:
        print(f"{r['audio']}: {r['instruction']}")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
