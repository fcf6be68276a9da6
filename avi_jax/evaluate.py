"""Evaluate a method's outputs: ``python -m avi_jax.evaluate --export exports/demo --dataset DATA --split test
[--flame-model generic_model.pkl] [--spice-jars DIR] [--inception-weights PTH] [--syncnet-weights MODEL]
[--out metrics.json]``.

``--export`` is our export (``python -m avi_jax.export``; ``instructions.jsonl`` for Table 3, several
samples per clip for Diversity) or another method's folder of ``<clip_id>.npz`` / ``<clip_id>.npy`` with
FLAME coefficients or vertices (the accepted layouts and keys: ``avi_jax.metrics.predictions``). Prints the
motion metrics (LVE in both of the field's variants, CodeTalker's FDD, MVE, coefficient errors; see
``avi_jax.metrics.motion``) and tables laid out like the paper's Tables 1, 3 and 4; a metric that cannot be
computed is shown as ``n/a`` with the reason (the missing file and where to get it), never as 0. ``--out``
writes every figure as JSON with the variants, the counts and the versions. Reference clips without a
prediction are listed, not fatal unless none match. Errors: one line ``error: ...``, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from avi_jax.errors import ConfigError, run_command

SYNCNET_FILE = ("syncnet_v2.model (syncnet_python's SyncNet weights, fetched by its download_model.sh from "
                "https://github.com/joonson/syncnet_python)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m avi_jax.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--export", required=True, help="export folder (python -m avi_jax.export --out), or another "
                                                   "method's folder of <clip_id>.npz / .npy")
    p.add_argument("--dataset", required=True, help="prepared dataset folder (python -m avi_jax.data.prepare)")
    p.add_argument("--split", default="test", help="reference split (default: test)")
    p.add_argument("--flame-model", help="FLAME generic_model.pkl (FLAME_masks.pkl beside it) for the vertex "
                                         "metrics; without it only the coefficient-space metrics")
    p.add_argument("--spice-jars", help="folder with Stanford CoreNLP 3.6.0's stanford-corenlp-3.6.0.jar and "
                                        "stanford-corenlp-3.6.0-models.jar for SPICE (never downloaded)")
    p.add_argument("--inception-weights", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth for FID/KID")
    p.add_argument("--syncnet-weights", help="syncnet_python's syncnet_v2.model for LSE-D/LSE-C")
    p.add_argument("--fid-stride", type=int, default=1, help="FID/KID on every N-th frame of each clip "
                                                             "(default 1: all frames; reported in the JSON)")
    p.add_argument("--render", action=argparse.BooleanOptionalAction, default=True,
                   help="render prediction and ground truth for FID/KID and LSE (default: on; --no-render skips "
                        "the video metrics)")
    p.add_argument("--method", help="row label in the tables (default: the export folder's name)")
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


def _check_inputs(args: argparse.Namespace) -> None:
    """Files the user named must exist: checked before the slow work starts."""
    for flag in ("inception_weights", "syncnet_weights"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise ConfigError(f"--{flag.replace('_', '-')} {path}: no such file")
    if args.fid_stride < 1:
        raise ConfigError(f"--fid-stride {args.fid_stride}: must be >= 1")
    if args.spice_jars:
        from avi_jax.metrics.captions import check_spice_jars
        check_spice_jars(args.spice_jars)


def video_section(args: argparse.Namespace, matched: dict[str, Any], flame: Any) -> dict[str, Any]:
    """FID/KID (Tables 1, 4; ``avi_jax.metrics.evaluate_video``) and SyncNet LSE-D/LSE-C with the ground
    truth's (Table 1; ``avi_jax.metrics.lip_sync``) from one rendering of each clip's prediction and
    reference, as a report section ``{"metrics", "variants", "unavailable", "counts"}``. Metrics whose
    renders or weights are missing are listed as unavailable with the reason."""
    reason = None
    if not args.render:
        reason = "--no-render given (the video metrics need renders)"
    elif flame is None:
        reason = "needs --flame-model to render prediction and ground truth"
    lse = ("lse_d", "lse_c", "gt_lse_d", "gt_lse_c")
    if reason:
        return {"metrics": {}, "variants": {}, "counts": {},
                "unavailable": {k: reason for k in ("fid", "kid") + lse}}
    from avi_jax.metrics.evaluate_video import evaluate_video
    consumers, unavailable = [], {}
    if args.syncnet_weights:
        from avi_jax.checkpoints.syncnet import load_syncnet
        from avi_jax.metrics.lip_sync import LipSyncFrames
        audio = {c.clip_id: c.audio for c in matched["clips"]}
        consumers.append(LipSyncFrames(load_syncnet(args.syncnet_weights), audio, flame.masks["lips"]))
    else:
        unavailable = {k: f"needs --syncnet-weights: {SYNCNET_FILE}" for k in lse}
    section = evaluate_video(matched["clips"], flame, inception_weights=args.inception_weights,
                             consumers=consumers, fid_stride=args.fid_stride)
    section["unavailable"].update(unavailable)
    return section


def instruction_section(args: argparse.Namespace) -> dict[str, Any]:
    """Table 3 from the export's ``instructions.jsonl``, or every metric unavailable with the reason."""
    from avi_jax.metrics import captions
    path = os.path.join(args.export, "instructions.jsonl")
    reason = None
    if not os.path.isfile(path):
        reason = f"{path} not found (instructions are written by python -m avi_jax.export)"
    elif captions.pycocoevalcap_version() is None:
        reason = "needs pycocoevalcap: pip install 'pycocoevalcap>=1.2,<2'"
    if reason:
        return {"metrics": {}, "variants": {}, "unavailable": {k: reason for k in captions.METRICS}, "counts": {}}
    return captions.instruction_metrics(captions.read_instructions(path), spice_jars=args.spice_jars)


def run(args: argparse.Namespace) -> int:
    import jax
    import numpy as np
    import avi_jax
    from avi_jax.metrics import captions
    from avi_jax.metrics.evaluate_motion import evaluate_diversity, evaluate_motion, match_clips
    from avi_jax.metrics.report import format_report

    _check_inputs(args)
    flame = _load_flame(args.flame_model) if args.flame_model else None
    num_vertices = int(flame.v_template.shape[0]) if flame is not None else None
    matched = match_clips(args.export, args.dataset, args.split, num_vertices)
    if matched["missing"]:
        print(f"{len(matched['missing'])} reference clips have no prediction: "
              + ", ".join(matched["missing"][:20]) + (" ..." if len(matched["missing"]) > 20 else ""),
              file=sys.stderr)
    result = {"motion": evaluate_motion(matched, flame), "diversity": evaluate_diversity(matched, flame),
              "instructions": instruction_section(args), "video": video_section(args, matched, flame)}
    method = args.method or os.path.basename(os.path.normpath(args.export))
    print(format_report(result, method))
    result.update({"method": method, "export": os.path.abspath(args.export),
                   "dataset": os.path.abspath(args.dataset), "split": args.split,
                   "flame_model": args.flame_model and os.path.abspath(args.flame_model),
                   "versions": {"avi_jax": avi_jax.__version__, "numpy": np.__version__, "jax": jax.__version__,
                                "pycocoevalcap": captions.pycocoevalcap_version(),
                                "java": result["instructions"].get("versions", {}).get("java")}})
    if args.out:
        from avi_jax.inference.outputs import atomic_write
        atomic_write(args.out, lambda f: json.dump(result, f, indent=2), mode="w")
        print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
