"""Evaluate an export's motion: ``python -m avi_jax.evaluate --export exports/demo --dataset DATA --split test
[--flame-model generic_model.pkl] [--out metrics.json]``.

Reads ``DIR/<clip_id>/coefficients.npz`` (or ``DIR/<clip_id>/sample_0/coefficients.npz``) written by
``python -m avi_jax.export`` and the prepared reference split, and reports the coefficient-space errors
(expression and jaw MSE, jaw-opening Pearson r) and, with ``--flame-model`` (``FLAME_masks.pkl`` beside it),
LVE in both of the field's variants, CodeTalker's FDD and the mean vertex error (see
``avi_jax.metrics.motion`` for the exact definitions). Prints a table; ``--out`` writes the figures as JSON
with the variants, the counts and the versions. Reference clips without a prediction are listed, not
fatal unless none match. Errors: one line ``error: ...``, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from avi_jax.errors import ConfigError, run_command


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m avi_jax.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--export", required=True, help="export folder (python -m avi_jax.export --out)")
    p.add_argument("--dataset", required=True, help="prepared dataset folder (python -m avi_jax.data.prepare)")
    p.add_argument("--split", default="test", help="reference split (default: test)")
    p.add_argument("--flame-model", help="FLAME generic_model.pkl (FLAME_masks.pkl beside it) for the vertex "
                                         "metrics; without it only the coefficient-space metrics")
    p.add_argument("--out", help="write the figures as JSON to this file")
    return p


def _load_flame(path: str) -> Any:
    from avi_jax.checkpoints.flame import load_flame_model
    masks = os.path.join(os.path.dirname(os.path.abspath(path)) if not os.path.isdir(path) else path,
                         "FLAME_masks.pkl")
    if not os.path.isfile(masks):
        raise ConfigError(f"{masks}: FLAME_masks.pkl not found beside the model (it comes with FLAME from "
                          "https://flame.is.tue.mpg.de); the vertex metrics need its 'lips', 'forehead' and "
                          "'eye_region' regions")
    return load_flame_model(path, masks)


def format_table(result: dict[str, Any]) -> str:
    """The figures of :func:`avi_jax.metrics.evaluate_motion.evaluate_motion` as a plain-text table."""
    c = result["counts"]
    lines = [f"{c['clips']} clips, {c['frames']} frames ({c['frames_trimmed']} trimmed to match lengths; "
             f"{c['missing']} reference clips without a prediction, {c['no_reference']} without coefficients)",
             f"{'metric':<20} {'value':>12}  variant", "-" * 72]
    lines += [f"{k:<20} {v:>12.6g}  {result['variants'][k]}" for k, v in result["metrics"].items()]
    if result.get("vertex_metrics_skipped"):
        lines.append(f"vertex metrics (LVE, FDD, MVE) not computed: {result['vertex_metrics_skipped']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import avi_jax
    from avi_jax.metrics.evaluate_motion import evaluate_motion

    flame = _load_flame(args.flame_model) if args.flame_model else None
    result = evaluate_motion(args.export, args.dataset, args.split, flame)
    if result["missing"]:
        print(f"{len(result['missing'])} reference clips have no prediction: "
              + ", ".join(result["missing"][:20]) + (" ..." if len(result["missing"]) > 20 else ""),
              file=sys.stderr)
    print(format_table(result))
    result.update({"export": os.path.abspath(args.export), "dataset": os.path.abspath(args.dataset),
                   "split": args.split, "flame_model": args.flame_model and os.path.abspath(args.flame_model),
                   "versions": {"avi_jax": avi_jax.__version__, "numpy": np.__version__}})
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(folder, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
