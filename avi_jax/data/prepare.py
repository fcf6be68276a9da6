"""CLI: prepare a clip dataset (ArrayRecord, tfds ClipDataset), print a summary and its directory.

    python -m avi_jax.data.prepare meadtext --source MEAD --labels meadtext.jsonl --emoca EMOCA_OUT --out DATA
    python -m avi_jax.data.prepare ravdess  --source RAVDESS [--emoca EMOCA_OUT] --out DATA
    python -m avi_jax.data.prepare manifest --source clips.jsonl --out DATA
    python -m avi_jax.data.prepare demo     --out DATA [--seed 0 --num_speakers 12 --clip_seconds 2.0]

Common flags: ``--strict`` (any refused clip fails the build, exit status 2), ``--force`` (prepare again
even if a dataset with the same inputs exists), ``--workers N`` (decoding threads), ``--no-progress``.
EMOCA flags: ``--emoca_model NAME`` (the model subfolder, default: the only one), ``--emoca_fps`` (frame
rate of the videos EMOCA ran on; default 25), ``--max_missing`` (fraction of frames that may be
interpolated, default 0.1), ``--frame_tolerance`` (EMOCA frames past the audio's end that are trimmed,
default 2), ``--no-smooth_pose`` (skip the 2.5 Hz low-pass of the head rotation).
Splits: ``meadtext --val_speakers M007,W011 --test_speakers M003,M030,W009,W015``; ``ravdess --test_actors
1-6 --val_actors ''``.

The summary lists clips and hours of audio per split and every refused clip with its reason; the last
line printed is the dataset directory, which ``config.data.dir`` (with ``config.data.source='prepared'``)
expects. The legacy form ``--data_dir DIR --demo`` / ``--data_dir DIR --manifest FILE`` still works.
Bad inputs exit with status 2 and a message naming the file at fault.
"""
from __future__ import annotations

import argparse
import os
import sys

from avi_jax.errors import AviJaxError

COMMANDS = ("meadtext", "ravdess", "manifest", "demo")


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _actors(value: str) -> list[int]:
    """'1-6' / '1,2,3' / '1-3,7' / '' -> actor numbers."""
    out: list[int] = []
    for part in _list(value):
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m avi_jax.data.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")

    def common(sp: argparse.ArgumentParser, source_help: str | None) -> None:
        sp.add_argument("--out", "--data_dir", dest="out", required=True, help="root folder of prepared datasets")
        if source_help:
            sp.add_argument("--source", required=True, help=source_help)
        sp.add_argument("--strict", action="store_true", help="fail (exit 2) if any clip is refused")
        sp.add_argument("--force", action="store_true", help="prepare again even if already prepared")
        sp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show progress bars")

    def real(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--emoca", default=None, help="folder of EMOCA outputs (one subfolder per clip); "
                                                      "without it the records carry no coefficients")
        sp.add_argument("--emoca_model", default=None, help="EMOCA model subfolder name (default: the only one)")
        sp.add_argument("--emoca_fps", type=float, default=25.0,
                        help="frame rate of the videos EMOCA ran on (re-timed to 25 fps)")
        sp.add_argument("--max_missing", type=float, default=0.1,
                        help="fraction of EMOCA frames that may be missing and interpolated")
        sp.add_argument("--frame_tolerance", type=int, default=2,
                        help="EMOCA frames past the end of the audio that are trimmed (more: refused)")
        sp.add_argument("--smooth_pose", action=argparse.BooleanOptionalAction, default=True,
                        help="low-pass the head rotation (Butterworth 2.5 Hz at 25 fps, filtfilt)")
        sp.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="threads decoding audio and reading EMOCA output")

    m = sub.add_parser("meadtext", help="MEAD audio + MeadText labels (+ EMOCA)")
    common(m, "MEAD root: <speaker>/audio/<emotion>/level_<k>/<nnn>.m4a")
    m.add_argument("--labels", default=None,
                   help="MeadText-style JSON/JSONL instruction labels (default: <source>/meadtext.jsonl or .json)")
    m.add_argument("--val_speakers", default="M007,W011", help="comma-separated validation speakers")
    m.add_argument("--test_speakers", default="M003,M030,W009,W015", help="comma-separated test speakers")
    real(m)

    r = sub.add_parser("ravdess", help="RAVDESS speech (+ EMOCA)")
    common(r, "RAVDESS root (files named MM-VV-EE-II-SS-RR-AA.wav/.mp4, found recursively)")
    r.add_argument("--labels", default=None,
                   help="optional JSON/JSONL instruction labels by clip id (default: prototype instructions)")
    r.add_argument("--test_actors", default="1-6", help="test actors (the paper's evaluation subset: 1-6)")
    r.add_argument("--val_actors", default="", help="validation actors (default none)")
    real(r)

    mf = sub.add_parser("manifest", help="a bring-your-own JSONL manifest")
    common(mf, "the JSONL manifest (see avi_jax.data.manifest.read_manifest)")

    d = sub.add_parser("demo", help="the synthetic demo corpus")
    common(d, None)
    d.add_argument("--seed", type=int, default=0, help="corpus seed")
    d.add_argument("--num_speakers", type=int, default=12,
                   help="speakers (the last one in eight, at least 2, -> test)")
    d.add_argument("--clip_seconds", type=float, default=2.0, help="clip length in seconds")
    return p


def _legacy(argv: list[str]) -> list[str]:
    """``--data_dir D --demo [...]`` / ``--data_dir D --manifest F`` -> the subcommand form."""
    p = argparse.ArgumentParser(prog="python -m avi_jax.data.prepare")
    p.add_argument("--data_dir", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--demo", action="store_true")
    src.add_argument("--manifest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_speakers", type=int, default=12)
    p.add_argument("--clip_seconds", type=float, default=2.0)
    a = p.parse_args(argv)
    if a.demo:
        return ["demo", "--out", a.data_dir, "--seed", str(a.seed), "--num_speakers", str(a.num_speakers),
                "--clip_seconds", str(a.clip_seconds)]
    return ["manifest", "--out", a.data_dir, "--source", a.manifest]


def _options(args):
    from avi_jax.data.emoca import CoefficientOptions
    return CoefficientOptions(model_name=args.emoca_model, fps=args.emoca_fps, smooth_pose=args.smooth_pose,
                              max_missing=args.max_missing, frame_tolerance=args.frame_tolerance)


def _prepared(out: str) -> set[str]:
    """Real paths of the complete datasets under ``out`` (before a build: was it there already?)."""
    from avi_jax.data import builder
    root = os.path.join(out, "clip_dataset")
    if not os.path.isdir(root):
        return set()
    return {os.path.realpath(os.path.join(root, name, builder.VERSION)) for name in os.listdir(root)
            if builder.is_complete(os.path.join(root, name, builder.VERSION))}


def _same(path: str, before: set[str]) -> bool:
    return os.path.realpath(path) in before


def run(args: argparse.Namespace):
    """Prepare what ``args`` asks for; returns a :class:`avi_jax.data.builder.PrepareResult`."""
    from avi_jax.data import builder
    if args.command == "demo":
        from avi_jax.data.demo import prepare_demo
        before = _prepared(args.out)
        path = prepare_demo(args.out, seed=args.seed, num_speakers=args.num_speakers,
                            clip_seconds=args.clip_seconds)
        return builder.read_result(path, False, reused=_same(path, before))
    if args.command == "manifest":
        from avi_jax.data.manifest import prepare_manifest
        before = _prepared(args.out)
        path = prepare_manifest(args.source, args.out)
        return builder.read_result(path, args.strict, reused=_same(path, before))
    if args.command == "meadtext":
        from avi_jax.data import mead
        labels = args.labels
        if labels is None:
            for cand in ("meadtext.jsonl", "meadtext.json"):
                if os.path.isfile(os.path.join(args.source, cand)):
                    labels = os.path.join(args.source, cand)
                    break
            else:
                from avi_jax.errors import InputError
                raise InputError(f"{args.source}: no --labels given and no meadtext.jsonl/meadtext.json there; "
                                 "pass the MeadText instruction labels with --labels FILE")
        split = {"validation": _list(args.val_speakers), "test": _list(args.test_speakers)}
        return mead.prepare_mead(args.source, labels, args.out, args.emoca, split=split, options=_options(args),
                                 strict=args.strict, workers=args.workers, progress=args.progress,
                                 force=args.force)
    from avi_jax.data import ravdess
    split = {"validation": _actors(args.val_actors), "test": _actors(args.test_actors)}
    return ravdess.prepare_ravdess(args.source, args.out, args.emoca, labels=args.labels, split=split,
                                   options=_options(args), strict=args.strict, workers=args.workers,
                                   progress=args.progress, force=args.force)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, prepare the dataset, print the summary and (last) its directory; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help") and "--data_dir" in " ".join(argv):
        argv = _legacy(argv)
    args = _parser().parse_args(argv)
    if not args.progress or args.command in ("meadtext", "ravdess"):
        import tensorflow_datasets as tfds
        tfds.disable_progress_bar()        # our own per-split bar (or none) instead of tfds' nested bars
    try:
        result = run(args)
    except AviJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    print(result.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
