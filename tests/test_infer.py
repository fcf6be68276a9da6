"""Inference end to end on a tiny trained system: ``python -m avi_jax.infer`` outputs, options, bad files,
batch independence, long-audio windows, and ``python -m avi_jax.export``."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
import soxr

from avi_jax import export, infer
from avi_jax.data import demo, schema
from avi_jax.inference import pipeline
from avi_jax.inference.system import TalkingFace
from avi_jax.inference.windows import Window, blend, crossfade_weights, plan_windows

pytestmark = pytest.mark.slow

HAPPY = "A very happy man speaks with lip corner strongly pulled and cheek strongly raised."
SAD = "A very sad man speaks with lip corner strongly depressed and inner brow strongly raised."


def _speech(seconds: float, emotion: str = "happy", speaker: int = 1) -> np.ndarray:
    return demo.generate_clip(0, speaker, emotion, 3, clip_seconds=seconds, num_speakers=4)["audio"]


@pytest.fixture(scope="module")
def face(system_workdir):
    return TalkingFace.load(system_workdir)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """A 1.3 s 16 kHz mono wav and a 2.7 s 44.1 kHz stereo flac."""
    d = tmp_path_factory.mktemp("audio")
    mono = _speech(1.3)
    sf.write(d / "mono.wav", mono, 16000)
    hi = soxr.resample(_speech(2.7, "sad", 2), 16000, 44100)
    sf.write(d / "stereo.flac", np.stack([hi, 0.5 * hi], -1), 44100)
    return {"mono": str(d / "mono.wav"), "stereo": str(d / "stereo.flac"), "dir": d}


def test_windows_cover_and_crossfade():
    assert plan_windows(40, 50, 10) == [Window(0, 40)]
    w = plan_windows(130, 50, 10)
    assert w[0].start == 0 and w[-1].stop == 130 and all(b.start < a.stop for a, b in zip(w, w[1:]))
    weights = crossfade_weights(w)
    assert weights[0][0] == 1 and weights[-1][-1] == 1 and all(x.min() > 0 for x in weights)
    outs = [np.full((x.stop - x.start, 2), float(i)) for i, x in enumerate(w)]
    blended = blend(w, outs, 130)
    assert blended[0, 0] == 0 and blended[-1, 0] == len(w) - 1
    assert np.all(np.diff(blended[:, 0]) >= 0)          # a monotone cross-fade, no jump


def test_infer_writes_every_output(system_workdir, recordings, shared_fixtures, tmp_path):
    import av
    real = str(shared_fixtures / "speech" / "feifeili_clip3.wav")
    out = tmp_path / "out"
    assert infer.main(["--workdir", system_workdir, "--audio", real, recordings["stereo"],
                       "--out", str(out), "--meshes", "ply"]) == 0
    for path, name in ((real, "feifeili_clip3"), (recordings["stereo"], "stereo")):
        folder = out / name
        t = int(round(sf.info(path).duration * 25))
        with np.load(folder / "coefficients.npz", allow_pickle=False) as z:
            assert z["expression"].shape == (t, 50) and z["expression"].dtype == np.float32
            assert z["jaw_pose"].shape == (t, 3) and z["global_pose"].shape == (t, 3)
            assert z["shape"].shape == (100,) and int(z["fps"]) == 25 and int(z["sample_rate"]) == 16000
            assert str(z["instruction"]) == (folder / "instruction.txt").read_text().strip()
            assert int(z["seed"]) == 0 and np.isfinite(z["expression"]).all()
        with av.open(str(folder / "render.mp4")) as c:
            v, a = c.streams.video[0], c.streams.audio[0]
            assert v.codec_context.name == "h264" and v.codec_context.pix_fmt == "yuv420p"
            assert sum(1 for _ in c.decode(video=0)) == t
            assert a.codec_context.name == "aac"
            assert abs(float(a.duration * a.time_base) - sf.info(path).duration) <= 1 / 25 + 1e-6
        assert len(os.listdir(folder / "meshes")) == t
    assert not [f for f in os.listdir(out / "stereo") if f.endswith(".tmp")]


def test_bad_files_fail_alone_and_are_named(system_workdir, recordings, tmp_path, capsys):
    d = recordings["dir"]
    sf.write(d / "silent.wav", np.zeros(16000, np.float32), 16000)
    sf.write(d / "short.wav", _speech(0.3), 16000)
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    bad = [str(d / "silent.wav"), str(d / "short.wav"), str(d / "corrupt.wav"), str(d / "missing.wav"), str(d)]
    out = tmp_path / "out"
    assert infer.main(["--workdir", system_workdir, "--audio", *bad, recordings["mono"], "--out", str(out),
                       "--no-render"]) == 1
    err = capsys.readouterr().err
    for path in bad:
        assert path in err
    assert "silent" in err and "too short" in err and "is a directory" in err
    assert sorted(os.listdir(out)) == ["mono"] and (out / "mono" / "coefficients.npz").is_file()


def test_missing_workdir_is_checked_before_models_load(tmp_path, recordings, capsys):
    assert infer.main(["--workdir", str(tmp_path), "--audio", recordings["mono"]]) == 2
    assert "config.json" in capsys.readouterr().err


def test_instruction_and_style_reference_equal_the_direct_model_call(system_workdir, face, recordings, tmp_path):
    audio = _speech(1.3)
    t = pipeline.num_frames(audio.shape[0])
    padded = np.zeros(t * schema.SAMPLES_PER_FRAME, np.float32)        # T = round(32.5) = 32 frames
    padded[:min(audio.shape[0], padded.shape[0])] = audio[:padded.shape[0]]
    mask = np.ones_like(padded, bool)

    def run(*flags):
        out = tmp_path / str(len(os.listdir(tmp_path)))
        assert infer.main(["--workdir", system_workdir, "--audio", recordings["mono"], "--out", str(out),
                           "--no-render", *flags]) == 0
        with np.load(out / "mono" / "coefficients.npz") as z:
            return np.concatenate([z["expression"], z["jaw_pose"]], -1), str(z["instruction"])

    happy, text = run("--instruction", HAPPY)
    sad, _ = run("--instruction", SAD)
    # the 6-step tiny generator barely reads its style input: the coefficients change, but only a little
    assert text == HAPPY and np.abs(happy - sad).max() > 0
    style, sad_style = face.styles([HAPPY, SAD], jnp.stack([jax.random.key(0)] * 2), 1)[:, 0]
    assert np.abs(style - sad_style).max() > 1e-7          # (an untrained tiny prior: small changes)
    direct = face.motion(padded[None], mask[None], style[None])[0]
    np.testing.assert_allclose(happy, direct, atol=1e-5)

    ref = {"expression": 0.5 * np.ones((60, 50), np.float32), "jaw_pose": np.zeros((60, 3), np.float32)}
    np.savez(tmp_path / "ref.npz", **ref)
    from_ref, _ = run("--style-reference", str(tmp_path / "ref.npz"))
    ref_style = face.reference_style(np.concatenate([ref["expression"], ref["jaw_pose"]], -1))
    np.testing.assert_allclose(from_ref, face.motion(padded[None], mask[None], ref_style[None])[0], atol=1e-5)
    assert np.abs(from_ref - happy).max() > 0 and np.abs(ref_style - style).max() > 1e-7


def test_outputs_do_not_depend_on_the_batch(face):
    clips = [_speech(1.3), _speech(3.1, "angry", 2), _speech(0.7, "sad", 3)]
    options = pipeline.Options(num_samples=2, window_seconds=2.0, overlap_seconds=0.4, bucket_seconds=(1.0, 2.0),
                               batch_size=4)
    together = pipeline.synthesize(face, clips, options)
    for i, clip in enumerate(clips):
        alone = pipeline.synthesize(face, [clip], options)[0]
        for a, b in zip(alone, together[i]):
            assert a.instructions == b.instructions
            np.testing.assert_allclose(a.motion, b.motion, atol=1e-5)
    assert np.abs(together[1][0].motion - together[1][1].motion).max() > 0        # samples differ
    styles = face.styles(["a sad man"], jnp.stack([jax.random.key(0)]), 2)[0]
    assert np.abs(styles[0] - styles[1]).max() > 1e-7


def test_windowed_output_matches_one_pass_away_from_the_seams(face):
    audio = np.concatenate([_speech(2.0, e, 1) for e in ("happy", "angry", "sad")])
    one = pipeline.synthesize(face, [audio], pipeline.Options(instruction=HAPPY, window_seconds=8.0,
                                                              bucket_seconds=(8.0,)))[0][0].motion
    opts = pipeline.Options(instruction=HAPPY, window_seconds=2.0, overlap_seconds=0.4, bucket_seconds=(2.0,))
    windowed = pipeline.synthesize(face, [audio], opts)[0][0].motion
    plan = plan_windows(one.shape[0], 50, 10)
    assert len(plan) > 2
    interior = np.ones(one.shape[0], bool)
    for a, b in zip(plan, plan[1:]):
        interior[b.start:a.stop] = False
    # The encoders and the generator attend over their whole input, so a window is not exactly the
    # one-pass result; away from the seams it stays within a small part of the output's range.
    scale = (one.max(0) - one.min(0)).mean()
    assert np.abs(windowed - one)[interior].mean() < 0.25 * scale
    jumps = np.abs(np.diff(windowed, axis=0)).max(-1)
    assert jumps.max() <= np.abs(np.diff(one, axis=0)).max(-1).max() + 1e-6


def test_export_writes_a_resumable_split(system_workdir, tmp_path, capsys):
    out = tmp_path / "export"
    args = ["--workdir", system_workdir, "--split", "test", "--out", str(out), "--max-clips", "3",
            "--num-samples", "2"]
    assert export.main(args) == 0
    lines = [json.loads(x) for x in (out / "instructions.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(x["references"] for x in lines)
    for x in lines:
        for s in range(2):
            with np.load(out / x["clip_id"] / f"sample_{s}" / "coefficients.npz") as z:
                assert z["expression"].shape[1] == 50 and int(z["sample"]) == s
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["split"] == "test" and manifest["num_samples"] == 2
    capsys.readouterr()
    assert export.main(args) == 0
    assert "3 already exported" in capsys.readouterr().out
