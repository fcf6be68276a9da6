"""Does an edited instruction move the face the way it says? (paper Sec. III-A: user-editable instructions)

``python benchmarks/instruction_edit.py --workdir runs/demo --audio ../shared/fixtures/speech/feifeili_clip3.wav``

Runs the inference pipeline on one recording with a happy and then a sad instruction (the same seed),
renders nothing, and prints, per instruction, the mean lip-corner height of the demo head over the clip
(``avi_jax.data.demo_head.lip_corner_height``: corners minus lip centres, mm; up = a smile) and the mean
coefficient along the demo corpus's ``lip_corner_puller`` and ``lip_corner_depressor`` directions
(``avi_jax.data.demo.action_basis``). The demo corpus defines happy as lip corners pulled (AU12) and sad as
lip corners depressed (AU15), so happy minus sad should be positive in height and in AU12 - AU15.
"""
from __future__ import annotations

import argparse
import os

import jax
import numpy as np

HAPPY = "A very happy woman speaks with lip corner strongly pulled and cheek strongly raised."
SAD = "A very sad woman speaks with lip corner strongly depressed and inner brow strongly raised."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--audio", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures",
                                                   "speech", "feifeili_clip3.wav"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from avi_jax.checkpoints.flame import load_flame_model
    from avi_jax.data import demo, instructions
    from avi_jax.data.audio import load_audio
    from avi_jax.data.demo_head import demo_head_paths, lip_corner_height
    from avi_jax.inference import pipeline, system
    from avi_jax.models.flame import motion_to_vertices

    face = system.TalkingFace.load(args.workdir)
    paths = demo_head_paths(os.path.join(args.workdir, "demo_head"))
    head = load_flame_model(paths.model, paths.masks)
    masks = {k: np.asarray(v) for k, v in head.masks.items()}
    basis = demo.action_basis(0)
    au12 = basis[instructions.ACTION_NAMES.index("lip_corner_puller")]
    au15 = basis[instructions.ACTION_NAMES.index("lip_corner_depressor")]
    audio = pipeline.check_waveform(load_audio(args.audio), args.audio)
    rows = []
    for name, text in (("happy", HAPPY), ("sad", SAD)):
        result = pipeline.synthesize(face, [audio], pipeline.Options(instruction=text, seed=args.seed))[0][0]
        verts = np.asarray(jax.jit(motion_to_vertices)(head, result.motion))
        height = float(np.mean(lip_corner_height(verts, masks))) * 1000.0
        exp = result.motion[:, :50]
        proj = lambda d: float(np.mean(exp @ d) / np.dot(d, d))    # noqa: E731
        rows.append((name, height, proj(au12), proj(au15)))
    print("| instruction | lip-corner height (mm) | AU12 lip_corner_puller | AU15 lip_corner_depressor |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:+.2f} | {r[2]:+.3f} | {r[3]:+.3f} |")
    d = [a - b for a, b in zip(rows[0][1:], rows[1][1:])]
    print(f"| happy - sad | {d[0]:+.2f} | {d[1]:+.3f} | {d[2]:+.3f} |")


if __name__ == "__main__":
    main()
