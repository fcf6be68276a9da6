"""CLI: prepare a clip dataset (ArrayRecord, tfds ClipDataset) and print its directory.

    python -m avi_jax.data.prepare --data_dir=/data --demo [--seed=0 --num_speakers=12 --clip_seconds=2.0]
    python -m avi_jax.data.prepare --data_dir=/data --manifest=clips.jsonl

The printed directory is what ``config.data.dir`` (with ``config.data.source='prepared'``) expects.
Preparing again with the same inputs reuses the existing dataset. Bad inputs exit with status 2 and a
message naming the file (manifest line) at fault.
"""
from __future__ import annotations

import argparse
import sys

from avi_jax.errors import AviJaxError


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, prepare the dataset, print its directory; returns the process exit status."""
    p = argparse.ArgumentParser(prog="python -m avi_jax.data.prepare", description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", required=True, help="root folder of prepared datasets")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--demo", action="store_true", help="the synthetic demo corpus")
    src.add_argument("--manifest", help="a JSONL manifest (see avi_jax.data.builder.read_manifest)")
    p.add_argument("--seed", type=int, default=0, help="demo: corpus seed")
    p.add_argument("--num_speakers", type=int, default=12, help="demo: speakers (last 2 -> test)")
    p.add_argument("--clip_seconds", type=float, default=2.0, help="demo: clip length in seconds")
    args = p.parse_args(argv)
    from avi_jax.data import builder
    try:
        if args.demo:
            path = builder.prepare_demo(args.data_dir, seed=args.seed, num_speakers=args.num_speakers,
                                        clip_seconds=args.clip_seconds)
        else:
            path = builder.prepare_manifest(args.manifest, args.data_dir)
    except AviJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
