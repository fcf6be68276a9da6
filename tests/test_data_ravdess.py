"""RAVDESS (+ EMOCA) preparation on a fixture tree laid out like the RAVDESS downloads.

Real formats: 16-bit PCM wav at 48 kHz (one 44.1 kHz stereo file), one clip available only as an
audio-video mp4 (AAC audio written with PyAV), per-frame EMOCA .npy folders named after the videos.
Broken clips: a truncated wav, NaN coefficients, 30 % of EMOCA frames missing, a clip without a label
(when a label file is given), a malformed file name; a song file is ignored.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf

from avi_jax.data import audio as audio_lib
from avi_jax.data import builder, demo, emoca, instructions, ravdess, schema
from avi_jax.errors import InputError

# (emotion code, intensity, statement, repetition, actor)
CLIPS = [(5, 1, 1, 1, 1), (3, 2, 2, 1, 1), (2, 1, 1, 2, 2), (1, 1, 2, 2, 2),           # test (actors 1-6)
         (4, 2, 1, 1, 7), (6, 1, 1, 1, 7), (7, 2, 2, 2, 7), (8, 1, 1, 2, 7),
         (5, 2, 2, 1, 8), (3, 1, 1, 1, 8), (2, 2, 1, 1, 8), (6, 2, 2, 2, 8)]
STEREO = "03-01-04-02-01-01-07"
MP4_ONLY = "03-01-08-01-01-02-07"
TRUNCATED = "03-01-03-01-01-01-08"
NAN = "03-01-06-01-01-01-07"
HOLES = "03-01-02-02-01-01-08"
NO_LABEL = "03-01-07-02-02-02-07"
REFUSED = {TRUNCATED, NAN, HOLES}


def _stem(modality, e, i, s, r, a):
    return f"{modality:02d}-01-{e:02d}-{i:02d}-{s:02d}-{r:02d}-{a:02d}"


def make_ravdess_tree(root) -> dict:
    src, out_emoca = root / "RAVDESS", root / "EMOCA"
    clips = {}
    for k, (e, i, s, r, a) in enumerate(CLIPS):
        name = ravdess.parse_name(_stem(3, e, i, s, r, a))
        c = demo.generate_clip(11, k % 4, name.emotion, i, 1.0, num_speakers=4)
        cid = name.clip_id
        clips[cid] = c
        actor_dir = src / f"Actor_{a:02d}"
        actor_dir.mkdir(parents=True, exist_ok=True)
        x48 = audio_lib.resample(c["audio"], 16000, 48000)
        if cid == STEREO:
            sf.write(actor_dir / f"{cid}.wav", np.stack([1.5 * audio_lib.resample(c["audio"], 16000, 44100),
                                                         0.5 * audio_lib.resample(c["audio"], 16000, 44100)], 1),
                     44100, subtype="PCM_16")
        elif cid == MP4_ONLY:
            audio_lib.write_m4a(actor_dir / f"{_stem(1, e, i, s, r, a)}.mp4", x48, 48000)
        else:
            sf.write(actor_dir / f"{cid}.wav", x48, 48000, subtype="PCM_16")
        if cid == TRUNCATED:
            data = (actor_dir / f"{cid}.wav").read_bytes()
            (actor_dir / f"{cid}.wav").write_bytes(data[:len(data) * 2 // 3])
        pose = np.concatenate([np.zeros_like(c["jaw_pose"]), c["jaw_pose"]], 1)
        expression = c["expression"].copy()
        if cid == NAN:
            expression[2, 7] = np.inf
        skip = range(0, 8) if cid == HOLES else ()
        # EMOCA ran on the audio-video files (01), one clip under Actor_XX/ and from the video-only file (02)
        if k == 4:
            target = out_emoca / f"Actor_{a:02d}" / _stem(2, e, i, s, r, a)
        else:
            target = out_emoca / _stem(1, e, i, s, r, a)
        emoca.write_emoca_clip(target, expression, pose, c["shape"], model_name="EMOCA", skip=skip)
    (src / "Actor_01" / "03-02-05-01-01-01-01.wav").write_bytes(b"song: ignored")
    (src / "Actor_01" / "02-01-05-01-01-01-01.mp4").write_bytes(b"video only: no audio")
    sf.write(src / "Actor_07" / "03-01-09-01-01-01-07.wav", np.zeros(4800), 48000)   # emotion 09: malformed
    return clips


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("ravdess")
    return root, make_ravdess_tree(root)


def test_parse_name():
    n = ravdess.parse_name("03-01-05-01-02-01-12.wav")
    assert (n.modality, n.vocal, n.emotion, n.intensity, n.statement, n.repetition, n.actor) == \
        (3, 1, "angry", 1, 2, 1, 12)
    assert n.gender == "female" and ravdess.parse_name("01-01-06-02-01-01-07.mp4").gender == "male"
    assert ravdess.parse_name("01-01-06-02-01-01-07").clip_id == "03-01-06-02-01-01-07"
    assert [ravdess.EMOTION_CODES[k] for k in range(1, 9)] == [
        "neutral", "calm", "happy", "sad", "angry", "fear", "disgusted", "surprised"]
    assert set(ravdess.EMOTION_CODES.values()) <= set(schema.EMOTIONS)
    for bad, msg in (("03-01-05-01-02-01.wav", "not a RAVDESS file name"),
                     ("03-01-09-01-02-01-12.wav", "emotion"), ("03-01-01-02-02-01-12.wav", "neutral"),
                     ("03-01-05-01-02-01-25.wav", "actor")):
        with pytest.raises(InputError, match=msg):
            ravdess.parse_name(bad)


def test_scan_prefers_wav_and_ignores_song(tree):
    root, clips = tree
    found, refusals, songs = ravdess.scan(root / "RAVDESS")
    assert sorted(c.clip_id for c in found) == sorted(clips)
    assert songs == 1
    assert [r.clip_id for r in refusals] == ["03-01-09-01-01-01-07"]
    assert os.path.join("Actor_07", "03-01-09-01-01-01-07.wav") in refusals[0].reason
    mp4 = next(c for c in found if c.clip_id == MP4_ONLY)
    assert mp4.audio_path.endswith("01-01-08-01-01-02-07.mp4")
    assert [c.name.actor for c in found] == sorted(c.name.actor for c in found)


def test_prepare_with_emoca_and_prototype_instructions(tree):
    root, clips = tree
    result = ravdess.prepare_ravdess(root / "RAVDESS", root / "data", root / "EMOCA", workers=2)
    refused = {r.clip_id: r.reason for r in result.refusals}
    assert set(refused) == REFUSED | {"03-01-09-01-01-01-07"}, result.summary()
    assert "truncated wav" in refused[TRUNCATED] and f"{TRUNCATED}.wav" in refused[TRUNCATED]
    assert "NaN or infinite" in refused[NAN] and "000003_000" in refused[NAN] and "exp.npy" in refused[NAN]
    assert "8 of 25 EMOCA frames are missing" in refused[HOLES] and "01-01-02-02-01-01-08" in refused[HOLES]
    assert result.clips == {"test": 4, "train": 5}
    test_ids = [c for c in clips if int(c[-2:]) <= 6]
    src = builder.open_split(result.path, "test")
    assert [builder.text(src[i]["clip_id"]) for i in range(len(src))] == [      # actor, then emotion code
        "03-01-03-02-02-01-01", "03-01-05-01-01-01-01", "03-01-01-01-02-02-02", "03-01-02-01-01-02-02"]
    assert sorted(builder.text(src[i]["clip_id"]) for i in range(len(src))) == sorted(test_ids)
    train = builder.open_split(result.path, "train")
    for split_src in (src, train):
        for i in range(len(split_src)):
            rec = split_src[i]
            cid = builder.text(rec["clip_id"])
            name, c = ravdess.parse_name(cid), clips[cid]
            assert rec["emotion"] == schema.EMOTIONS.index(name.emotion) and rec["intensity"] == name.intensity
            assert builder.text(rec["speaker"]) == f"Actor_{name.actor:02d}"
            texts = [builder.text(t) for t in rec["instructions"]]
            assert len(texts) == 3 and all(instructions.emotion_from_text(t) == name.emotion for t in texts)
            person = "man" if name.gender == "male" else "woman"
            assert any(p in texts[0] for p in (person, "male", "female", "gentleman", "lady"))
            assert rec["audio"].shape == (16000,)
            np.testing.assert_array_equal(rec["expression"], c["expression"])
            np.testing.assert_array_equal(rec["jaw_pose"], c["jaw_pose"])
            got = schema.from_pcm16(rec["audio"])
            corr = np.dot(got, c["audio"]) / (np.linalg.norm(got) * np.linalg.norm(c["audio"]))
            assert corr > (0.98 if cid != MP4_ONLY else 0.95), (cid, corr)   # resampling, AAC
            if cid == STEREO:
                ratio = np.sqrt(np.mean(got ** 2)) / np.sqrt(np.mean(c["audio"] ** 2))
                assert abs(ratio - 1.0) < 0.02                                     # mean of 1.5x and 0.5x
    # prototype instructions are deterministic
    assert ravdess.prototype_instructions(ravdess.parse_name(STEREO)) == \
        ravdess.prototype_instructions(ravdess.parse_name(STEREO))


def test_labels_and_strict_cli(tree, tmp_path, capsys):
    from avi_jax.data import prepare
    root, clips = tree
    labels = tmp_path / "labels.jsonl"
    with open(labels, "w") as f:
        for cid, c in clips.items():
            if cid != NO_LABEL:
                f.write(json.dumps({"clip_id": cid, "instruction": c["instructions"][0]}) + "\n")
    args = ["ravdess", "--source", str(root / "RAVDESS"), "--out", str(tmp_path / "data"), "--labels",
            str(labels), "--test_actors", "1-2", "--val_actors", "8", "--no-progress", "--workers", "1"]
    assert prepare.main(args) == 0
    out = capsys.readouterr().out
    path = out.strip().splitlines()[-1]
    assert "refused clips: 3" in out and NO_LABEL in out and "no instruction" in out
    assert "labels.jsonl" in out
    assert len(builder.open_split(path, "validation")) == 3        # actor 8: 4 clips, the truncated wav refused
    rec = builder.open_split(path, "train")[0]
    assert not rec["has_coefficients"]
    assert [builder.text(t) for t in rec["instructions"]] == [clips[builder.text(rec["clip_id"])]["instructions"][0]]
    assert prepare.main(args + ["--strict"]) == 2                   # already prepared, but with refusals
    assert NO_LABEL in capsys.readouterr().err
    assert prepare.main(args + ["--strict", "--force"]) == 2
    err = capsys.readouterr().err
    assert "--strict" in err and "03-01-09-01-01-01-07.wav" in err
    assert not list((tmp_path / "data").rglob("dataset_info.json"))


def test_one_clip_found_twice_is_refused_before_building(tmp_path):
    name = "03-01-05-01-01-01-01.wav"
    for folder in ("Actor_01", "copy/Actor_01"):
        (tmp_path / "RAVDESS" / folder).mkdir(parents=True)
        (tmp_path / "RAVDESS" / folder / name).write_bytes(b"")   # scan never decodes
    with pytest.raises(InputError, match="duplicate RAVDESS clip 03-01-05-01-01-01-01") as err:
        ravdess.scan(tmp_path / "RAVDESS")
    msg = str(err.value)
    assert os.path.join("Actor_01", name) in msg and os.path.join("copy", "Actor_01", name) in msg, msg
    with pytest.raises(InputError, match="duplicate RAVDESS clip"):
        ravdess.prepare_ravdess(tmp_path / "RAVDESS", tmp_path / "data")
    assert not (tmp_path / "data").exists()
