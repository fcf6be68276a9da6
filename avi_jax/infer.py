"""Speech to a 3D talking face: ``python -m avi_jax.infer --workdir runs/demo --audio a.wav --out out``.

For each recording (wav, flac, ogg, mp3, m4a or the audio track of an mp4; any sample rate and channel
count, resampled to 16 kHz mono; 0.5 s to hours) it runs paper Fig. 2 (speech -> visual instruction ->
style embedding -> FLAME motion -> vertices -> video) and writes ``OUT/<name>/`` (``OUT/<name>/sample_K/``
with ``--num-samples`` > 1): ``instruction.txt``, ``coefficients.npz`` and ``render.mp4`` (see
``avi_jax/inference/outputs.py``). A bad file gets one line naming it and the problem and the others still
run; the exit status is 0 when every file succeeded, 1 when some failed, 2 for a bad command or workdir.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from avi_jax.errors import AviJaxError, ConfigError, InputError, run_command

EXIT_SOME_FAILED = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m avi_jax.infer", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="workdir of a finished configs/avi_talking.py run")
    p.add_argument("--instruct-workdir", help="instead of --workdir: a finished stage-1 run (configs/instruct.py)")
    p.add_argument("--style-workdir", help="instead of --workdir: a finished style run (configs/style_prior.py; "
                                           "its motion_workdir gives the motion prior)")
    p.add_argument("--audio", nargs="+", required=True, help="speech recordings")
    p.add_argument("--out", default="infer_out", help="output folder (created; default: infer_out)")
    p.add_argument("--instruction", help="use this visual instruction for every file (skips the LLM)")
    p.add_argument("--style-reference", help="an .npz with expression (T, 50) and jaw_pose (T, 3) whose style "
                                             "(the motion prior's style encoder) drives the face")
    p.add_argument("--num-samples", type=int, default=1, help="styles sampled per file (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the style sampling (default 0)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), help="diffusion sampler (default: the run's config)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the run's, 3.5)")
    p.add_argument("--flame-model", help="FLAME generic_model.pkl (default: the run's; the demo's stand-in head "
                                         "for demo runs)")
    p.add_argument("--meshes", nargs="?", const="obj", choices=("obj", "ply"),
                   help="also write one mesh per frame (obj by default)")
    p.add_argument("--no-render", action="store_true", help="write instruction and coefficients only")
    return p


def _check_paths(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """(existing files, error lines) before any model loads."""
    ok, errors = [], []
    for p in paths:
        if os.path.isdir(p):
            errors.append(f"{p}: is a directory, not an audio file")
        elif not os.path.isfile(p):
            errors.append(f"{p}: no such file")
        else:
            ok.append(p)
    return ok, errors


def _names(paths: Sequence[str]) -> list[str]:
    """Output folder names: the file stems, made unique with a suffix."""
    out, used = [], set()
    for p in paths:
        stem = name = os.path.splitext(os.path.basename(p))[0] or "audio"
        k = 1
        while name in used:
            k += 1
            name = f"{stem}_{k}"
        used.add(name)
        out.append(name)
    return out


def run(args: argparse.Namespace) -> int:
    """The command behind :func:`main` (raises the project's errors for a bad command or workdir)."""
    from avi_jax.data.audio import load_audio
    from avi_jax.inference import pipeline, system
    from avi_jax.inference.outputs import write_render, write_result

    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.instruction is not None and not args.instruction.strip():
        raise ConfigError("--instruction is empty")
    paths, errors = _check_paths(args.audio)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    reference = _reference_motion(args.style_reference) if args.style_reference else None
    instruct_cfg, instruct_wd, style_cfg, style_wd = system.resolve_workdirs(
        args.workdir, args.instruct_workdir, args.style_workdir)
    top = _top_config(args)
    flame = None
    if not args.no_render or args.meshes:
        from avi_jax.checkpoints.flame import load_flame_model
        path = system.flame_path(args.flame_model, args.workdir or style_wd, style_cfg.variant,
                                 top.flame.model_path if top is not None else "",
                                 demo_seed=int(instruct_cfg.data.demo.seed))
        if path is None:
            raise ConfigError(f"no FLAME model to render with; {system._FLAME_HINT}")
        flame = load_flame_model(path)
    if not paths:
        return EXIT_SOME_FAILED
    if args.sampler:
        style_cfg.sampler.method = args.sampler
    if args.guidance is not None:
        style_cfg.sampler.guidance_scale = args.guidance
    inf = top.inference if top is not None else None
    options = pipeline.Options(
        num_samples=args.num_samples, seed=args.seed, instruction=args.instruction, reference_motion=reference,
        **({} if inf is None else {"window_seconds": float(inf.window_seconds),
                                   "overlap_seconds": float(inf.overlap_seconds),
                                   "bucket_seconds": tuple(float(b) for b in inf.bucket_seconds),
                                   "batch_size": int(inf.batch_size)}))
    clips, names, failed = [], [], len(errors)
    for path, name in zip(paths, _names(paths)):
        try:
            clips.append(pipeline.check_waveform(load_audio(path), path))
            names.append((path, name))
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
        except OSError as e:          # e.g. no permission to read it
            print(f"error: {path}: unreadable ({e.strerror or e})", file=sys.stderr)
            failed += 1
    if not clips:
        return EXIT_SOME_FAILED
    face = system.TalkingFace(instruct_cfg, instruct_wd, style_cfg, style_wd)
    results = pipeline.synthesize(face, clips, options)
    size = int(inf.render_size) if inf is not None else 512
    for (path, name), audio, per_sample in zip(names, clips, results):
        for r in per_sample:
            folder = os.path.join(args.out, name, f"sample_{r.sample}") if args.num_samples > 1 \
                else os.path.join(args.out, name)
            line = f"{path}: {r.instruction}"
            try:
                write_result(folder, r)
                if flame is not None:
                    write_render(folder, flame, r, audio, size=size, render=not args.no_render,
                                 meshes=args.meshes)
            except AviJaxError as e:
                print(f"error: {e}", file=sys.stderr)
                failed += 1
                continue
            except OSError as e:      # a full disk, an unwritable --out: this file fails, the others go on
                print(f"error: {folder}: cannot write ({e})", file=sys.stderr)
                failed += 1
                continue
            if not args.no_render:
                line += f"\n  -> {os.path.join(folder, 'render.mp4')}"
            print(line)
    return EXIT_SOME_FAILED if failed else 0


def _top_config(args: argparse.Namespace):
    if not args.workdir:
        return None
    from avi_jax.assembly.common import load_workdir_config
    return load_workdir_config(args.workdir)


def _reference_motion(path: str):
    """(S, 53) float32 = expression ++ jaw_pose of a coefficients .npz (no pickles)."""
    import numpy as np
    if not os.path.isfile(path):
        raise InputError(f"{path}: --style-reference file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            exp, jaw = np.asarray(z["expression"], np.float32), np.asarray(z["jaw_pose"], np.float32)
    except KeyError as e:
        raise InputError(f"{path}: --style-reference needs 'expression' (T, 50) and 'jaw_pose' (T, 3); "
                         f"missing {e}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npz ({e})") from None
    if exp.ndim != 2 or exp.shape[1] != 50 or jaw.shape != (exp.shape[0], 3) or not exp.shape[0]:
        raise InputError(f"{path}: expression {exp.shape} and jaw_pose {jaw.shape} must be (T, 50) and (T, 3)")
    if not (np.isfinite(exp).all() and np.isfinite(jaw).all()):
        raise InputError(f"{path}: NaN or infinite coefficients")
    return np.concatenate([exp, jaw], axis=-1)


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache (``$AVI_JAX_CACHE`` or ``~/.cache/avi_jax/jax``), so a second run
    of a command reuses the compiled programs of the first."""
    import jax
    folder = os.environ.get("AVI_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "avi_jax", "jax"))
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    enable_compilation_cache()
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
