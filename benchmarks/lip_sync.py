"""LSE-D / LSE-C smoke figure and time per clip on a rendered demo clip.

Generates one demo clip (``avi_jax.data.demo.generate_clip``: its ground-truth FLAME coefficients and its
16 kHz speech), turns them into vertices with the demo head (``avi_jax.data.demo_head``, the FLAME stand-in
with FLAME's region masks), renders them with the project's renderer and camera, projects the ``lips``
vertices with that camera and scores the clip with :func:`avi_jax.metrics.lip_sync.lip_sync_score`.

Weights: ``--weights syncnet_v2.model`` when given; otherwise **random** SyncNet weights, and the LSE
figures are then only a smoke test of the pipeline (labelled so in the output), not lip-sync measures.
Time: the jit compile is excluded (one untimed call first); the median of ``--repeats`` timed calls is
reported, split into cropping+MFCC (host) and the whole call.

Usage::

  python benchmarks/lip_sync.py [--seconds 6] [--size 512] [--weights PATH] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=20)
    args = parser.parse_args()

    from avi_jax.checkpoints.flame import load_flame_model
    from avi_jax.checkpoints.syncnet import abstract_variables, load_syncnet
    from avi_jax.data import demo, demo_head
    from avi_jax.metrics import lip_sync
    from avi_jax.models.flame import motion_to_vertices
    from avi_jax.models.syncnet import SyncNet
    from avi_jax.render import Camera, MeshRenderer

    clip = demo.generate_clip(0, 0, "happy", 2, clip_seconds=args.seconds)
    with tempfile.TemporaryDirectory() as tmp:
        paths = demo_head.demo_head_paths(tmp)
        flame = load_flame_model(paths.model, paths.masks)
    motion = np.concatenate([clip["expression"], clip["jaw_pose"]], axis=-1)
    vertices = np.asarray(motion_to_vertices(flame, motion, clip["shape"]))
    camera = Camera.framing(vertices[0])
    with MeshRenderer(np.asarray(flame.faces), size=args.size, camera=camera) as renderer:
        frames = renderer.render(vertices)
    lips = lip_sync.project_to_pixels(vertices[:, np.asarray(flame.masks["lips"])], camera, args.size, args.size)

    if args.weights:
        variables, label = load_syncnet(args.weights), f"weights {os.path.basename(args.weights)}"
    else:
        rng = np.random.default_rng(0)

        def draw(path, leaf):
            name = path[-1].key
            if name in ("var", "scale"):
                return np.ones(leaf.shape, np.float32)
            fan_in = int(np.prod(leaf.shape[:-1])) if name == "kernel" else 1
            return rng.normal(0.0, (2.0 / fan_in) ** 0.5 if name == "kernel" else 0.0, leaf.shape
                              ).astype(np.float32)

        variables = jax.tree_util.tree_map_with_path(draw, abstract_variables(SyncNet()))
        label = "RANDOM weights (smoke test only, not a lip-sync figure)"

    score = lip_sync.lip_sync_score(frames, clip["audio"], variables, lip_points=lips,
                                    batch_size=args.batch_size)                      # compile, untimed
    host, total = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        boxes = lip_sync.face_boxes_from_lips(lips)
        lip_sync.crop_faces(frames, boxes)
        lip_sync.mfcc(lip_sync.pcm16(clip["audio"]))
        t1 = time.perf_counter()
        score = lip_sync.lip_sync_score(frames, clip["audio"], variables, lip_points=lips,
                                        batch_size=args.batch_size)
        t2 = time.perf_counter()
        host.append(t1 - t0)
        total.append(t2 - t1)
    print(f"device: {jax.devices()[0].device_kind}; clip {clip['clip_id']}: {len(frames)} frames "
          f"({args.seconds:g} s) rendered at {args.size}x{args.size}; {label}")
    print(f"LSE-D {score.lse_d:.4f}  LSE-C {score.lse_c:.4f}  offset {score.offset}  frames {score.num_frames}"
          f"  short_clip {score.short_clip}")
    print(f"time per clip (median of {args.repeats}, compile excluded): {statistics.median(total):.2f} s "
          f"(crop + MFCC on the host: {statistics.median(host):.2f} s)")


if __name__ == "__main__":
    main()
