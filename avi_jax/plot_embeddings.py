"""The aligned speech features of paper Fig. 8 as a t-SNE plot: ``python -m avi_jax.plot_embeddings --workdir
runs/demo --split test --out tsne.png``.

For every clip of a split of the run's dataset (``--dataset`` to use another prepared one), the stage-1
audio encoder and the Q-Former *as aligned by stage align* (``<workdir>/align/params.safetensors``) give the
clip's audio embeddings (``QFormer.embed_audio``: Q queries x D, unit norm per query, the space of the
InfoNCE of Eq. 6); their concatenation (Q * D) is embedded in 2-D by scikit-learn's t-SNE (seeded, PCA
initialisation) and drawn as a scatter plot coloured by the clip's emotion label (matplotlib, PNG). Beside
the image, ``<out>.json`` holds the 2-D points, clip indices and emotions. Errors: one line ``error: ...``,
exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from avi_jax.errors import ConfigError, InputError, run_command


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m avi_jax.plot_embeddings", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a run with a finished stage align (configs/avi_talking.py or "
                                                    "configs/instruct.py)")
    p.add_argument("--split", default="test", help="split of held-out clips (default: test)")
    p.add_argument("--dataset", help="prepared dataset folder (default: the run's own)")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--perplexity", type=float, default=15.0, help="t-SNE perplexity (default 15; < clips)")
    p.add_argument("--seed", type=int, default=0, help="t-SNE seed (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per model call (default 8)")
    return p


def audio_embeddings(workdir: str, split: str, dataset: str | None = None, batch_size: int = 8
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The aligned Q-Former audio embeddings of every clip of ``split``: (N, Q * D) float32 and the emotion
    index (N,) int32 (``data.schema.EMOTIONS``; -1 = unknown). Raises ``ConfigError`` when the workdir has
    no finished align stage."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from avi_jax import sharding
    from avi_jax.assembly.common import clip_dataset, dataset_path, family_config, load_workdir_config
    from avi_jax.assembly.instruct import InstructSetup

    config = family_config(load_workdir_config(workdir), "instruct", workdir)
    path = os.path.join(workdir, "align", "params.safetensors")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: not found; the plot needs the Q-Former as aligned by stage align "
                          f"(a run without it, e.g. ablation=no_qformer_align, has no aligned features)")
    setup = InstructSetup(config, workdir, data=False)
    data = dataset or dataset_path(config, workdir)

    def embed_audio(model, audio, mask):                 # (B, N), (B, N) -> (B, Q, D)
        return model.qformer.embed_audio(*model.audio_features(audio, mask))

    probe = (jnp.zeros((1, 16000)), jnp.ones((1, 16000), bool))
    abstract = nn.meta.unbox(jax.eval_shape(lambda: setup.model.init(
        jax.random.key(0), *probe, method=embed_audio)))["params"]
    params = {c: setup.load(c, "stage:align", abstract[c], None) for c in abstract}
    embed = jax.jit(lambda p, a, k: setup.model.apply({"params": p}, a, k, method=embed_audio))
    ds = clip_dataset(config, data, split, batch_size=batch_size, train=False, tokenizers={})
    feats, emotions = [], []
    for batch in ds:
        out = sharding.to_host(embed(params, batch["audio"], batch["audio_mask"]))
        keep = np.asarray(batch["valid"])
        feats.append(out[keep].reshape(int(keep.sum()), -1))
        emotions.append(np.asarray(batch["emotion"])[keep])
    if not feats or not sum(len(f) for f in feats):
        raise InputError(f"{data}: split {split!r} has no clips")
    return np.concatenate(feats).astype(np.float32), np.concatenate(emotions).astype(np.int32)


def tsne(points: np.ndarray, perplexity: float = 15.0, seed: int = 0) -> np.ndarray:
    """(N, F) -> (N, 2) float32 t-SNE (scikit-learn, PCA init, seeded). ``perplexity`` is lowered to
    (N - 1) / 3 for small N (scikit-learn requires perplexity < N). Raises ``InputError`` for N < 3."""
    from sklearn.manifold import TSNE
    n = len(points)
    if n < 3:
        raise InputError(f"t-SNE needs at least 3 clips, got {n}")
    perplexity = min(float(perplexity), max((n - 1) / 3.0, 1.0))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        np.asarray(points, np.float64)).astype(np.float32)


def plot(xy: np.ndarray, emotions: np.ndarray, out: str, title: str = "") -> None:
    """Scatter plot of (N, 2) points coloured by emotion index (N,), written atomically as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from avi_jax.data import schema
    from avi_jax.inference.outputs import atomic_write

    fig, ax = plt.subplots(figsize=(6, 5), dpi=120)
    cmap = plt.get_cmap("tab10")
    for e in sorted(set(int(v) for v in emotions)):
        sel = emotions == e
        name = schema.EMOTIONS[e] if 0 <= e < len(schema.EMOTIONS) else "unknown"
        ax.scatter(xy[sel, 0], xy[sel, 1], s=18, color=cmap(e % 10), label=f"{name} ({int(sel.sum())})")
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title or "t-SNE of the aligned Q-Former audio embeddings")
    ax.legend(fontsize=8, loc="best", frameon=False)
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if not args.out.lower().endswith(".png"):
        raise ConfigError(f"--out {args.out}: must be a .png file")
    feats, emotions = audio_embeddings(args.workdir, args.split, args.dataset, args.batch_size)
    xy = tsne(feats, args.perplexity, args.seed)
    plot(xy, emotions, args.out, f"Q-Former audio embeddings, {args.split} split ({len(xy)} clips)")
    from avi_jax.inference.outputs import atomic_write
    atomic_write(os.path.splitext(args.out)[0] + ".json", lambda f: json.dump(
        {"workdir": os.path.abspath(args.workdir), "split": args.split, "perplexity": args.perplexity,
         "seed": args.seed, "points": xy.tolist(), "emotions": emotions.tolist()}, f), mode="w")
    print(f"wrote {args.out} ({len(xy)} clips)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, _parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
