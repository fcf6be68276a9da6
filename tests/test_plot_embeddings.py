"""The Fig. 8 t-SNE plot of the aligned Q-Former audio embeddings (avi_jax/plot_embeddings.py)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from avi_jax import plot_embeddings as pe
from avi_jax.errors import InputError


def _nearest_neighbour_agreement(xy: np.ndarray, labels: np.ndarray) -> float:
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(len(xy)) * 1e9
    return float(np.mean(labels[np.argmin(d, 1)] == labels))


def test_tsne_keeps_separated_clusters_apart_and_rows_in_order():
    rs = np.random.RandomState(0)
    labels = np.repeat([0, 5, 6], 12)
    centres = rs.randn(3, 16) * 8
    points = centres[np.searchsorted([0, 5, 6], labels)] + rs.randn(len(labels), 16)
    xy = pe.tsne(points, perplexity=8, seed=0)
    assert xy.shape == (36, 2) and xy.dtype == np.float32
    assert _nearest_neighbour_agreement(xy, labels) == 1.0
    # a row permutation of the input permutes the labels' agreement away: rows are not reordered
    assert _nearest_neighbour_agreement(xy, np.roll(labels, 6)) < 0.5
    np.testing.assert_array_equal(xy, pe.tsne(points, perplexity=8, seed=0))     # seeded


def test_tsne_small_inputs():
    xy = pe.tsne(np.random.RandomState(1).randn(5, 4), perplexity=30)   # perplexity lowered below N
    assert xy.shape == (5, 2)
    with pytest.raises(InputError, match="at least 3"):
        pe.tsne(np.zeros((2, 4)))


def test_plot_writes_a_png(tmp_path):
    out = str(tmp_path / "fig" / "tsne.png")
    pe.plot(np.random.RandomState(0).randn(10, 2).astype(np.float32), np.array([0, 1, 5, 5, 6, 6, 0, 1, -1, 8]),
            out)
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [p for p in os.listdir(tmp_path / "fig")] == ["tsne.png"]          # no temporary left behind


def test_cli_errors(tmp_path, capsys):
    assert pe.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "must be a .png" in capsys.readouterr().err
    assert pe.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_plot_of_a_tiny_aligned_run(tmp_path):
    from avi_jax.training.experiment import train_and_evaluate
    from configs import instruct
    from helpers import tiny_config
    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny_config(instruct, **{"stages": ("align",), "data.dir": str(tmp_path / "data")}),
                       workdir)
    out = str(tmp_path / "tsne.png")
    assert pe.main(["--workdir", workdir, "--split", "test", "--out", out]) == 0
    with open(os.path.splitext(out)[0] + ".json") as f:
        meta = json.load(f)
    feats, emotions = pe.audio_embeddings(workdir, "test")
    assert len(meta["points"]) == len(feats) == len(emotions) == 8      # the tiny test split: 8 clips
    assert feats.shape[1] == 4 * 32                                         # Q x embed_dim of the tiny Q-Former
    # each query's embedding is unit-norm (the InfoNCE space of Eq. 6)
    np.testing.assert_allclose(np.linalg.norm(feats.reshape(8, 4, 32), axis=-1), 1.0, rtol=1e-5)
    assert meta["emotions"] == emotions.tolist() and min(emotions) >= 0
