"""Export a prepared split for evaluation: ``python -m avi_jax.export --workdir runs/demo --split test
--out exports/demo``.

For every clip of the split (``--dataset``: a folder from ``python -m avi_jax.data.prepare``; default the
dataset the run trained on) it runs the same pipeline as ``python -m avi_jax.infer`` and writes
``OUT/<clip_id>/coefficients.npz`` and ``instruction.txt`` (``OUT/<clip_id>/sample_K/`` with
``--num-samples`` > 1, the paper's Diversity uses K = 10; each ``coefficients.npz`` also holds ``style``, the
style embedding of each window, which ``python -m avi_jax.evaluate`` scores; ``--render`` adds
``render.mp4``), then ``OUT/instructions.jsonl`` (one line per
clip: ``clip_id``, the generated ``instruction`` (sample 0), the ``references``) and ``OUT/manifest.json``
(workdir, dataset, split, seeds, sampler, counts, and the clips that failed with the reason). A rerun with
the same settings skips the clips already complete, so an interrupted export resumes; a rerun with other
settings (seed, samples, sampler, guidance) into the same folder is refused. A clip that fails (silent,
shorter than 0.5 s) is reported on one line and skipped; the exit status is then 1. This is the input of
``python -m avi_jax.evaluate``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from avi_jax.errors import AviJaxError, ConfigError, InputError, run_command


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m avi_jax.export", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="workdir of a finished configs/avi_talking.py run")
    p.add_argument("--dataset", help="prepared dataset folder (default: the run's own)")
    p.add_argument("--split", default="test", help="split to export (default: test)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--num-samples", type=int, default=1, help="styles sampled per clip (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the style sampling (default 0)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), help="diffusion sampler (default: the run's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the run's)")
    p.add_argument("--render", action="store_true", help="also render render.mp4 per clip and sample")
    p.add_argument("--max-clips", type=int, default=0, help="export only the first N clips (0 = all)")
    return p


def _folder(out: str, clip_id: str, sample: int, num_samples: int) -> str:
    return os.path.join(out, clip_id, f"sample_{sample}") if num_samples > 1 else os.path.join(out, clip_id)


def _complete(out: str, clip_id: str, num_samples: int, render: bool) -> bool:
    files = ("coefficients.npz", "instruction.txt") + (("render.mp4",) if render else ())
    return all(os.path.isfile(os.path.join(_folder(out, clip_id, s, num_samples), f))
               for s in range(num_samples) for f in files)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm
    from avi_jax.assembly.common import dataset_path, load_workdir_config
    from avi_jax.data import builder, schema
    from avi_jax.infer import enable_compilation_cache
    from avi_jax.inference import pipeline, system
    from avi_jax.inference.outputs import atomic_write, write_render, write_result

    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    enable_compilation_cache()
    top = load_workdir_config(args.workdir)
    instruct_cfg, instruct_wd, style_cfg, style_wd = system.resolve_workdirs(args.workdir)
    data = args.dataset or dataset_path(instruct_cfg, args.workdir)
    source = builder.open_split(data, args.split)
    n = len(source) if not args.max_clips else min(len(source), args.max_clips)
    flame = None
    if args.render:
        from avi_jax.checkpoints.flame import load_flame_model
        path = system.flame_path(None, args.workdir, top.variant, top.flame.model_path,
                                 demo_seed=int(instruct_cfg.data.demo.seed))
        if path is None:
            raise ConfigError("--render: no FLAME model; set flame.model_path in the run's config")
        flame = load_flame_model(path)
    if args.sampler:
        style_cfg.sampler.method = args.sampler
    if args.guidance is not None:
        style_cfg.sampler.guidance_scale = args.guidance
    inf = top.inference
    options = pipeline.Options(num_samples=args.num_samples, seed=args.seed,
                               window_seconds=float(inf.window_seconds), overlap_seconds=float(inf.overlap_seconds),
                               bucket_seconds=tuple(float(b) for b in inf.bucket_seconds),
                               batch_size=int(inf.batch_size))
    settings = {"num_samples": args.num_samples, "seed": args.seed, "sampler": dict(style_cfg.sampler),
                "render": bool(args.render)}
    _check_settings(os.path.join(args.out, "manifest.json"), settings)
    ids = [builder.text(source[i]["clip_id"]) for i in range(n)]
    todo = [i for i, c in enumerate(ids) if not _complete(args.out, c, args.num_samples, args.render)]
    print(f"{args.split}: {n} clips, {n - len(todo)} already exported")
    face = system.TalkingFace(instruct_cfg, instruct_wd, style_cfg, style_wd) if todo else None
    failed: dict[str, str] = {}
    for start in tqdm(range(0, len(todo), options.batch_size), desc="export", unit="batch"):
        part, clips = [], []
        for i in todo[start:start + options.batch_size]:
            try:    # records hold 16-bit PCM
                clips.append(pipeline.check_waveform(schema.from_pcm16(np.asarray(source[i]["audio"])), ids[i]))
                part.append(i)
            except InputError as e:
                failed[ids[i]] = str(e)
                tqdm.write(f"error: {e}", file=sys.stderr)
        for i, audio, per_sample in zip(part, clips, pipeline.synthesize(face, clips, options) if clips else []):
            try:
                for r in per_sample:
                    folder = _folder(args.out, ids[i], r.sample, args.num_samples)
                    if flame is not None:
                        write_render(folder, flame, r, audio, size=int(inf.render_size))
                    write_result(folder, r)      # last: its presence marks the clip complete
            except AviJaxError as e:
                failed[ids[i]] = str(e)
                tqdm.write(f"error: {ids[i]}: {e}", file=sys.stderr)
    lines = []
    for i, c in enumerate(ids):
        if c in failed:
            continue
        with open(os.path.join(_folder(args.out, c, 0, args.num_samples), "instruction.txt")) as f:
            lines.append({"clip_id": c, "instruction": f.read().strip(),
                          "references": [builder.text(t) for t in source[i]["instructions"]]})
    atomic_write(os.path.join(args.out, "instructions.jsonl"),
                 lambda f: f.write("".join(json.dumps(x) + "\n" for x in lines)), mode="w")
    manifest = {"workdir": os.path.abspath(args.workdir), "dataset": os.path.abspath(data), "split": args.split,
                "num_clips": n - len(failed), "failed": failed, **settings, "fps": 25, "sample_rate": 16000,
                "variant": top.variant, "config": json.loads(top.to_json_best_effort())}
    atomic_write(os.path.join(args.out, "manifest.json"), lambda f: json.dump(manifest, f, indent=2), mode="w")
    print(f"wrote {n - len(failed)} clips to {args.out}" + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0


def _check_settings(path: str, settings: dict) -> None:
    """Refuse to resume an export folder written with other settings (its clips would mix them)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        old = json.load(f)
    differ = sorted(k for k in settings if k in old and old[k] != settings[k])
    if differ:
        raise ConfigError(f"{path}: this folder was exported with other settings ({', '.join(differ)}); "
                          f"use another --out, or the same settings to resume")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
