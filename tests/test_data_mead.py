"""MEAD/MeadText (+ EMOCA) preparation on a fixture tree laid out exactly like MEAD and EMOCA's output.

The fixture (built by the test code, real formats): AAC/m4a audio written with PyAV (16 kHz mono, one
44.1 kHz stereo file), per-frame EMOCA .npy folders in both supported layouts, a MeadText-style JSONL
label file. Its content comes from the demo corpus generator so the expected coefficients are known.
Broken clips: a truncated m4a, NaN coefficients, 30 % of EMOCA frames missing, no instruction label.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from avi_jax.data import audio as audio_lib
from avi_jax.data import builder, demo, emoca, mead, schema
from avi_jax.errors import ConfigError, InputError

SPLIT = {"validation": ("W011",), "test": ("M003",)}
# (speaker, demo speaker index, [(emotion, level, index)])
LAYOUT = [
    ("M003", 0, [("angry", 1, 1), ("happy", 3, 2), ("neutral", 1, 3), ("sad", 2, 4)]),
    ("M005", 1, [("angry", 2, 1), ("contempt", 1, 2), ("disgusted", 3, 3), ("fear", 1, 4), ("happy", 2, 5),
                 ("neutral", 1, 6), ("sad", 3, 7), ("surprised", 1, 8)]),
    ("W014", 2, [("angry", 3, 1), ("contempt", 2, 2), ("fear", 3, 3), ("happy", 1, 4), ("surprised", 2, 5),
                 ("sad", 1, 6)]),
    ("W011", 3, [("happy", 2, 1), ("angry", 1, 2)]),
]
STEREO = "W014_fear_level_3_003"
TRUNCATED = "M005_fear_level_1_004"
NAN = "W014_happy_level_1_004"
HOLES = "M005_sad_level_3_007"            # 30 % of frames missing
NO_LABEL = "W014_surprised_level_2_005"
GAPPY = "M005_angry_level_2_001"          # 2 frames missing: interpolated, kept
RESULTS_LAYOUT = "W014_angry_level_3_001"  # EMOCA output in the nested results/ layout
REFUSED = {TRUNCATED, NAN, HOLES, NO_LABEL}


def make_mead_tree(root, clip_seconds: float = 1.0) -> dict:
    """Write MEAD + EMOCA + labels fixtures under ``root``; returns {clip_id: demo clip dict}."""
    src, out_emoca = root / "MEAD", root / "EMOCA"
    clips, labels = {}, []
    for spk, demo_idx, items in LAYOUT:
        for emotion, level, index in items:
            c = demo.generate_clip(7, demo_idx, emotion, level, clip_seconds, num_speakers=4)
            cid = mead.clip_id(spk, emotion, level, index)
            clips[cid] = c
            adir = src / spk / "audio" / emotion / f"level_{level}"
            adir.mkdir(parents=True, exist_ok=True)
            (src / spk / "video" / "front" / emotion / f"level_{level}").mkdir(parents=True, exist_ok=True)
            path = adir / f"{index:03d}.m4a"
            if cid == STEREO:
                x = audio_lib.resample(c["audio"], 16000, 44100)
                audio_lib.write_m4a(path, np.stack([1.6 * x, 0.4 * x], 1), 44100)   # mean = x
            else:
                audio_lib.write_m4a(path, c["audio"], 16000)
            if cid == TRUNCATED:
                data = path.read_bytes()
                path.write_bytes(data[:len(data) // 2])
            pose = np.concatenate([0.02 * np.ones_like(c["jaw_pose"]), c["jaw_pose"]], 1)
            expression = c["expression"].copy()
            if cid == NAN:
                expression[5, 3] = np.nan
            skip = {HOLES: range(3, 11), GAPPY: (4, 5)}.get(cid, ())
            if cid == RESULTS_LAYOUT:
                target = out_emoca / spk / emotion / f"level_{level}" / f"{index:03d}" / "results"
            else:
                target = out_emoca / cid
            emoca.write_emoca_clip(target, expression, pose, c["shape"], model_name="EMOCA", skip=skip)
            if cid != NO_LABEL:
                key = f"{spk}/{emotion}/level_{level}/{index:03d}" if index == 2 else cid   # both id forms
                labels.append({"clip_id": key, "instructions": c["instructions"]})
    with open(src / "meadtext.jsonl", "w") as f:
        for entry in labels:
            f.write(json.dumps(entry) + "\n")
    (src / "M003" / "audio" / "angry" / "level_1" / "notes.txt").write_text("not audio")
    return clips


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("mead")
    return root, make_mead_tree(root)


@pytest.fixture(scope="module")
def prepared(tree):
    root, clips = tree
    result = mead.prepare_mead(root / "MEAD", root / "MEAD" / "meadtext.jsonl", root / "data", root / "EMOCA",
                               split=SPLIT, workers=2)
    return root, clips, result


def test_clip_ids_and_labels(tmp_path):
    assert mead.clip_id("M003", "angry", 1, 1) == "M003_angry_level_1_001"
    for key in ("M003_angry_level_1_001", "M003/angry/level_1/001", "M003/audio/angry/level_1/001.m4a",
                "M003/video/front/angry/level_1/001.mp4"):
        assert mead.normalize_clip_id(key) == "M003_angry_level_1_001"
    (tmp_path / "a.json").write_text(json.dumps({"M003/angry/level_1/001": "A man.",
                                                 "W009_sad_level_2_003": {"instructions": ["x", "y"]}}))
    assert mead.load_labels(tmp_path / "a.json") == {"M003_angry_level_1_001": ["A man."],
                                                     "W009_sad_level_2_003": ["x", "y"]}
    (tmp_path / "b.json").write_text(json.dumps([{"id": "M003_angry_level_1_001", "instruction": "p"},
                                                 {"clip_id": "M003_angry_level_1_001", "instruction": "q"}]))
    assert mead.load_labels(tmp_path / "b.json") == {"M003_angry_level_1_001": ["p", "q"]}
    (tmp_path / "c.jsonl").write_text('{"clip_id": "a", "instruction": "p"}\n{"clip_id": "b", "instr')
    with pytest.raises(InputError, match=r"c\.jsonl:2: not valid JSON"):
        mead.load_labels(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text('{"clip_id": "a", "instructions": [1]}\n')
    with pytest.raises(InputError, match=r"d\.jsonl:1: instructions of 'a'"):
        mead.load_labels(tmp_path / "d.jsonl")


def test_scan_and_split(tree):
    root, clips = tree
    found, refusals = mead.scan(root / "MEAD")
    assert sorted(c.clip_id for c in found) == sorted(clips) and not refusals
    assert found[0].clip_id == "M003_neutral_level_1_003"            # MEAD emotion order, then level
    assert mead.split_of("M003", SPLIT) == "test" and mead.split_of("W011", SPLIT) == "validation"
    assert mead.split_of("M005", SPLIT) == "train"
    assert mead.split_of("M030") == "test" and mead.split_of("M007") == "validation"   # the default split
    with pytest.raises(ConfigError, match="speaker-disjoint"):
        mead.mead_source(root / "MEAD", root / "MEAD" / "meadtext.jsonl",
                         split={"validation": ("M003",), "test": ("M003",)})


def test_records_refusals_and_report(prepared):
    root, clips, result = prepared
    assert not result.reused
    refused = {r.clip_id: r for r in result.refusals}
    assert set(refused) == REFUSED, result.summary()
    assert "005" not in refused                                              # (ids, not file names)
    assert os.path.join("fear", "level_1", "004.m4a") in refused[TRUNCATED].reason
    assert "truncated" in refused[TRUNCATED].reason or "unreadable" in refused[TRUNCATED].reason
    assert "000006_000" in refused[NAN].reason and "exp.npy" in refused[NAN].reason
    assert "NaN" in refused[NAN].reason
    assert NAN in refused[NAN].reason or os.path.join("EMOCA", NAN) in refused[NAN].reason
    assert "8 of 25 EMOCA frames are missing" in refused[HOLES].reason and HOLES in refused[HOLES].reason
    assert "no instruction" in refused[NO_LABEL].reason and "005.m4a" in refused[NO_LABEL].reason
    assert refused[TRUNCATED].split == "train" and refused[NO_LABEL].split == "train"

    want = {"train": [], "validation": [], "test": []}
    for cid in sorted(clips, key=lambda k: [(c.speaker, schema.MEAD_EMOTIONS.index(c.emotion), c.level, c.index)
                                           for c in mead.scan(root / "MEAD")[0] if c.clip_id == k][0]):
        if cid not in REFUSED:
            want[mead.split_of(cid[:4], SPLIT)].append(cid)
    assert result.clips == {s: len(v) for s, v in want.items()}
    assert abs(result.hours * 3600 - sum(map(len, want.values())) * 1.0) < 0.01
    for split, ids in want.items():
        src = builder.open_split(result.path, split)
        assert [builder.text(src[i]["clip_id"]) for i in range(len(src))] == ids
        for i, cid in enumerate(ids):
            rec, c = src[i], clips[cid]
            spk, emotion, _, level, _ = cid.split("_")
            assert builder.text(rec["speaker"]) == spk
            assert rec["emotion"] == schema.EMOTIONS.index(emotion) and rec["intensity"] == int(level)
            assert [builder.text(t) for t in rec["instructions"]] == c["instructions"]
            assert rec["audio"].dtype == np.int16 and rec["audio"].shape == (16000,)
            assert bool(rec["has_coefficients"])
            assert rec["expression"].shape == (25, 50) and rec["jaw_pose"].shape == (25, 3)
            np.testing.assert_array_equal(rec["shape"], c["shape"])
            if cid == GAPPY:
                np.testing.assert_allclose(rec["expression"][4], c["expression"][3] + (c["expression"][6] -
                                           c["expression"][3]) / 3, rtol=1e-5, atol=1e-5)
            else:
                np.testing.assert_array_equal(rec["expression"], c["expression"])
                np.testing.assert_array_equal(rec["jaw_pose"], c["jaw_pose"])
            np.testing.assert_allclose(rec["global_pose"], 0.02, atol=1e-5)   # constant: smoothing keeps it
            # AAC is lossy: check that the decoded waveform is the clip's, aligned (correlation ~ 1).
            got = schema.from_pcm16(rec["audio"])
            corr = np.dot(got, c["audio"]) / (np.linalg.norm(got) * np.linalg.norm(c["audio"]))
            assert corr > (0.97 if cid != STEREO else 0.9), (cid, corr)


def test_stereo_44k_is_downmixed_and_resampled(prepared):
    root, clips, result = prepared
    src = builder.open_split(result.path, "train")
    rec = next(src[i] for i in range(len(src)) if builder.text(src[i]["clip_id"]) == STEREO)
    x = clips[STEREO]["audio"]
    got = schema.from_pcm16(rec["audio"])
    assert got.shape == x.shape
    assert abs(np.sqrt(np.mean(got ** 2)) / np.sqrt(np.mean(x ** 2)) - 1.0) < 0.1   # mean of 1.6x and 0.4x (not 1.6, 2.0 or 1.41)


def test_idempotent_strict_and_force(prepared, tmp_path):
    root, clips, result = prepared
    data = tmp_path / "data"            # a copy: --force below deletes the dataset, others still use it
    shutil.copytree(root / "data", data)
    args = (root / "MEAD", root / "MEAD" / "meadtext.jsonl", data, root / "EMOCA")
    again = mead.prepare_mead(*args, split=SPLIT)
    assert again.reused and os.path.relpath(again.path, data) == os.path.relpath(result.path, root / "data")
    assert sorted(r.clip_id for r in again.refusals) == sorted(REFUSED) and again.clips == result.clips
    with pytest.raises(InputError, match="--strict"):
        mead.prepare_mead(*args, split=SPLIT, strict=True)                      # reused, but refusals
    with pytest.raises(InputError, match=rf"--strict: 4 clip\(s\) of split 'train' refused:(.|\n)*{TRUNCATED}"):
        mead.prepare_mead(*args, split=SPLIT, strict=True, force=True)
    assert not os.path.exists(again.path)                                      # force removed it; strict wrote nothing
    assert not list(data.rglob("dataset_info.json"))
    assert os.path.exists(result.path)                                         # the shared dataset is untouched


def test_without_emoca_and_cli(tree, tmp_path, capsys):
    from avi_jax.data import prepare
    root, clips = tree
    rc = prepare.main(["meadtext", "--source", str(root / "MEAD"), "--out", str(tmp_path), "--no-progress",
                       "--val_speakers", "W011", "--test_speakers", "M003", "--workers", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    path = out.strip().splitlines()[-1]
    assert "refused clips: 2" in out and TRUNCATED in out and NO_LABEL in out      # no EMOCA: no NaN/holes
    assert "hours" not in out and " h" in out
    rec = builder.open_split(path, "test")[0]
    assert not rec["has_coefficients"] and rec["expression"].shape == (0, 50)
    rc = prepare.main(["meadtext", "--source", str(root / "MEAD"), "--out", str(tmp_path / "s"), "--strict",
                       "--no-progress", "--emoca", str(root / "EMOCA"), "--test_speakers", "M003"])
    err = capsys.readouterr().err
    assert rc == 2 and TRUNCATED in err and "--strict" in err
    assert prepare.main(["meadtext", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.slow
def test_prepared_mead_trains_the_instruction_stage(prepared, tmp_path):
    """The prepared fixture feeds the grain pipeline and trains lm -> align -> tune (tiny config)."""
    from configs import instruct
    from avi_jax.data import pipeline
    from avi_jax.data.tokenizer import train_word_tokenizer
    from avi_jax.training import experiment

    root, clips, result = prepared
    src = builder.open_split(result.path, "train")
    tok = train_word_tokenizer([t for c in clips.values() for t in c["instructions"]], str(tmp_path / "tok"))
    ds = pipeline.make_dataset(src, batch_size=4, seed=0, shuffle=True, num_epochs=1, max_audio_samples=16000,
                               max_text_tokens=24, tokenizers={"text": tok}, shard_index=0, shard_count=1)
    batch = next(iter(ds))
    assert batch["audio"].shape == (4, 16000) and batch["expression"].shape == (4, 25, 50)
    assert batch["coeff_mask"].all() and batch["text_ids"].shape == (4, 24)

    config = instruct.get_config("tiny")
    config.data.source = "prepared"
    config.data.dir = result.path
    config.stages = ("lm", "align", "tune")
    for s in (config.lm, config.align, config.tune):     # compile-bound: as few steps as possible
        s.total_steps, s.log_every = 2, 1
    config.checkpoint.every = 100
    config.checkpoint.async_save = False
    config.mesh.data = 1            # one device: the sharded paths are tested elsewhere; this is about data
    config.generation.max_new_tokens = 4
    config.data.max_eval_clips = 4
    metrics = experiment.train_and_evaluate(config, str(tmp_path / "work"))
    assert set(metrics["stages"]) == {"lm", "align", "tune"}
    losses = [v for k, v in metrics.items() if "loss" in k and isinstance(v, float)]
    assert losses and all(np.isfinite(losses)), metrics
    assert os.path.isdir(tmp_path / "work" / "tokenizer")      # trained from the prepared training split


def test_two_files_of_one_clip_are_refused_before_building(tmp_path):
    adir = tmp_path / "MEAD" / "M003" / "audio" / "angry" / "level_1"
    adir.mkdir(parents=True)
    for name in ("001.m4a", "001.wav"):          # scan never decodes: empty files are enough
        (adir / name).write_bytes(b"")
    with pytest.raises(InputError, match="duplicate MEAD clip M003_angry_level_1_001") as err:
        mead.scan(tmp_path / "MEAD")
    assert str(adir / "001.m4a") in str(err.value) and str(adir / "001.wav") in str(err.value)
    (tmp_path / "labels.jsonl").write_text('{"clip_id": "M003_angry_level_1_001", "instruction": "x"}\n')
    with pytest.raises(InputError, match="duplicate MEAD clip"):
        mead.prepare_mead(tmp_path / "MEAD", tmp_path / "labels.jsonl", tmp_path / "data")
    assert not (tmp_path / "data").exists()
