"""tfds ClipDataset builder: demo round trip, idempotency, manifests, validation, no half-written output."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import soundfile as sf

from avi_jax.data import builder, demo, records, schema
from avi_jax.data import manifest as manifest_lib
from avi_jax.errors import InputError


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    return data_dir, demo.prepare_demo(data_dir, seed=3, num_speakers=4, clip_seconds=1.0)


def test_demo_round_trip(small_demo):
    data_dir, path = small_demo
    assert os.path.isfile(os.path.join(path, "dataset_info.json"))
    sizes = {s: len(builder.open_split(path, s)) for s in ("train", "validation", "test")}
    assert sizes == {"train": 24, "validation": 24, "test": 48}
    for split in ("train", "test"):
        src = builder.open_split(path, split)
        expected = list(demo.demo_clips(split, seed=3, num_speakers=4, clip_seconds=1.0))
        for i in (0, 7, len(src) - 1):
            got, want = src[i], expected[i]            # source order is kept
            assert builder.text(got["clip_id"]) == want["clip_id"]
            assert builder.text(got["speaker"]) == want["speaker"]
            np.testing.assert_array_equal(got["audio"], schema.pcm16(want["audio"]))
            assert got["emotion"] == schema.EMOTIONS.index(want["emotion"])
            assert got["intensity"] == want["intensity"]
            assert [builder.text(t) for t in got["instructions"]] == want["instructions"]
            assert bool(got["has_coefficients"])
            for k in ("expression", "jaw_pose", "global_pose", "shape"):
                np.testing.assert_array_equal(got[k], want[k])


def test_prepare_is_idempotent(small_demo):
    data_dir, path = small_demo
    info = os.path.join(path, "dataset_info.json")
    before = os.stat(info).st_mtime_ns
    again = demo.prepare_demo(data_dir, seed=3, num_speakers=4, clip_seconds=1.0)
    assert again == path and os.stat(info).st_mtime_ns == before
    assert json.load(open(os.path.join(path, "avi_meta.json")))["seed"] == 3


def test_open_split_errors(small_demo, tmp_path):
    _, path = small_demo
    with pytest.raises(InputError, match="no split"):
        builder.open_split(path, "dev")
    with pytest.raises(InputError, match="not a prepared dataset"):
        builder.open_split(tmp_path, "train")


def _record(clip_id="c0", n=16000, t=None, **kw):
    t = round(n / 640) if t is None else t
    rec = {"clip_id": clip_id, "audio": np.zeros(n, np.float32) + 0.1, "instructions": ["A calm man speaks."],
           "emotion": "calm", "intensity": 1, "expression": np.zeros((t, 50), np.float32),
           "jaw_pose": np.zeros((t, 3), np.float32)}
    rec.update(kw)
    return rec


def test_validate_record_frames_and_errors():
    ok = records.validate_record(_record(t=24))          # 25 expected: padded by one frame
    assert ok["expression"].shape == (25, 50) and ok["global_pose"].shape == (25, 3)
    assert records.validate_record(_record(t=27))["jaw_pose"].shape == (25, 3)
    with pytest.raises(InputError, match=r"c0: 'expression' has 30 frames"):
        records.validate_record(_record(t=30))
    nan = np.zeros((25, 50), np.float32)
    nan[3, 4] = np.nan
    with pytest.raises(InputError, match="c0: 'expression' holds NaN"):
        records.validate_record(_record(expression=nan))
    with pytest.raises(InputError, match=r"c0: 'jaw_pose' has shape \(25, 4\)"):
        records.validate_record(_record(jaw_pose=np.zeros((25, 4))))
    with pytest.raises(InputError, match="c0: audio is empty"):
        records.validate_record(_record(audio=np.zeros(0, np.float32)))
    with pytest.raises(InputError, match="c0: unknown emotion"):
        records.validate_record(_record(emotion="bored"))
    with pytest.raises(InputError, match="c0: needs at least one non-empty instruction"):
        records.validate_record(_record(instructions=[]))
    no_coeff = records.validate_record(_record(expression=None, jaw_pose=None, emotion=None))
    assert not no_coeff["has_coefficients"] and no_coeff["expression"].shape == (0, 50)
    assert no_coeff["emotion"] == -1


def test_failed_prepare_leaves_nothing_complete(tmp_path):
    def bad_records():
        yield _record("good")
        yield _record("bad", expression=np.full((25, 50), np.inf, np.float32))

    source = {"train": [_record("a"), _record("b")], "test": bad_records}
    data_dir = tmp_path / "data"
    with pytest.raises(InputError, match="bad: 'expression' holds NaN or infinite"):
        builder.prepare(source, data_dir, "broken")
    root = data_dir / "clip_dataset" / "broken"
    assert not data_dir.exists(), sorted(str(p) for p in data_dir.rglob("*"))   # not even empty folders
    with pytest.raises(InputError):
        builder.open_split(root / builder.VERSION, "train")
    # Folders that were there before are kept; only what the failed build created goes.
    (data_dir / "clip_dataset").mkdir(parents=True)
    with pytest.raises(InputError):
        builder.prepare(source, data_dir, "broken")
    assert sorted(p.name for p in data_dir.rglob("*")) == ["clip_dataset"]
    # A fixed source then prepares under the same name.
    source["test"] = [_record("c")]
    path = builder.prepare(source, data_dir, "broken")
    assert len(builder.open_split(path, "test")) == 1
    assert sorted(p.name for p in data_dir.iterdir()) == ["clip_dataset"]     # no empty downloads/


@pytest.mark.parametrize("lazy", [False, True])
def test_duplicate_and_leaking_clip_ids_are_refused(tmp_path, lazy):
    def split(*recs):
        return (lambda: iter(recs)) if lazy else list(recs)

    cases = [({"train": split(_record("a"), _record("b"), _record("a"))}, r"a: duplicate clip_id in split 'train'"),
             ({"train": split(_record("a"), _record("b")), "test": split(_record("c"), _record("b"))},
              r"b: clip id is in split '(train|test)' and in split '(train|test)'.*leaks")]
    for i, (source, pattern) in enumerate(cases):
        with pytest.raises(InputError, match=pattern):
            builder.prepare(source, tmp_path / "data", f"dup{i}")
        assert not (tmp_path / "data").exists()


def _write_manifest(tmp_path, lines):
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return path


def test_manifest_resamples_downmixes_and_round_trips(tmp_path):
    sr = 44_100
    t = np.arange(int(1.0 * sr)) / sr
    stereo = np.stack([0.4 * np.sin(2 * np.pi * 300 * t), 0.2 * np.sin(2 * np.pi * 300 * t)], 1)
    (tmp_path / "wav").mkdir()
    sf.write(tmp_path / "wav" / "a.wav", stereo, sr)
    sf.write(tmp_path / "wav" / "b.flac", 0.1 * np.ones(16000 * 2), 16000)
    coeff = tmp_path / "a.npz"
    np.savez(coeff, expression=np.ones((25, 50), np.float32), jaw_pose=np.full((26, 3), 0.1, np.float32))
    manifest = _write_manifest(tmp_path, [
        {"audio": "wav/a.wav", "instruction": "A happy man speaks.", "speaker": "s1", "emotion": "happy",
         "intensity": 2, "coefficients": "a.npz"},
        "",
        {"audio": str(tmp_path / "wav" / "b.flac"), "instructions": ["x", "y"], "split": "test"},
    ])
    path = manifest_lib.prepare_manifest(manifest, tmp_path / "data")
    train, test = builder.open_split(path, "train"), builder.open_split(path, "test")
    assert len(train) == 1 and len(test) == 1
    a = train[0]
    assert a["audio"].shape == (16000,)
    mid = schema.from_pcm16(a["audio"][2000:14000])
    assert abs(np.abs(mid).max() - 0.3) < 0.01              # mean of 0.4 and 0.2
    assert a["expression"].shape == (25, 50) and a["jaw_pose"].shape == (25, 3)   # 26 frames trimmed
    assert a["emotion"] == schema.EMOTIONS.index("happy") and a["intensity"] == 2
    assert builder.text(a["speaker"]) == "s1"
    b = test[0]
    assert not b["has_coefficients"] and b["emotion"] == -1 and b["intensity"] == 0
    assert [builder.text(x) for x in b["instructions"]] == ["x", "y"]
    assert manifest_lib.prepare_manifest(manifest, tmp_path / "data") == path


@pytest.mark.parametrize("case", ["json", "missing_audio", "nan_coeff", "no_instruction", "frames", "split"])
def test_bad_manifest_lines_name_line_and_file(tmp_path, case):
    sf.write(tmp_path / "ok.wav", 0.1 * np.ones(16000), 16000)
    good = {"audio": "ok.wav", "instruction": "A man speaks."}
    bad = dict(good)
    file_pat = "ok.wav"
    if case == "json":
        bad = '{"audio": "ok.wav", "instruction": '
        file_pat = "manifest.jsonl"
    elif case == "missing_audio":
        bad["audio"] = "nowhere/missing.wav"
        file_pat = "missing.wav"
    elif case == "nan_coeff":
        e = np.zeros((25, 50), np.float32)
        e[0, 0] = np.nan
        np.savez(tmp_path / "c.npz", expression=e, jaw_pose=np.zeros((25, 3), np.float32))
        bad["coefficients"] = "c.npz"
        file_pat = "c.npz"
    elif case == "no_instruction":
        del bad["instruction"]
        file_pat = "manifest.jsonl"
    elif case == "frames":
        np.savez(tmp_path / "c.npz", expression=np.zeros((40, 50)), jaw_pose=np.zeros((40, 3)))
        bad["coefficients"] = "c.npz"
        file_pat = "c.npz"
    elif case == "split":
        bad["split"] = "dev"
        file_pat = "manifest.jsonl"
    manifest = _write_manifest(tmp_path, [good, bad])
    with pytest.raises(InputError) as err:
        manifest_lib.prepare_manifest(manifest, tmp_path / "data")
    msg = str(err.value)
    assert f"{manifest}:2" in msg and re.search(re.escape(file_pat), msg), msg
    assert not (tmp_path / "data" / "clip_dataset").exists() or not list(
        (tmp_path / "data" / "clip_dataset").rglob("dataset_info.json"))


def test_manifest_duplicate_clip_id_is_found_before_anything_is_read(tmp_path):
    sf.write(tmp_path / "ok.wav", 0.1 * np.ones(16000), 16000)
    manifest = _write_manifest(tmp_path, [
        {"audio": "ok.wav", "instruction": "x", "clip_id": "clip7"},
        {"audio": "not_decoded_yet.wav", "instruction": "x"},            # would fail if read first
        "# a comment",
        {"audio": "ok.wav", "instruction": "y", "clip_id": "clip7"},
    ])
    with pytest.raises(InputError) as err:
        manifest_lib.prepare_manifest(manifest, tmp_path / "data")
    msg = str(err.value)
    assert msg.startswith(f"{manifest}:4: duplicate clip_id 'clip7' (already at {manifest}:1)"), msg
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("same", ["clip_id", "audio"])
def test_manifest_clip_in_two_splits_is_refused(tmp_path, same):
    sf.write(tmp_path / "a.wav", 0.1 * np.ones(16000), 16000)
    sf.write(tmp_path / "b.wav", 0.1 * np.ones(16000), 16000)
    first = {"audio": "a.wav", "instruction": "x", "clip_id": "s1_001"}
    second = {"audio": "b.wav", "instruction": "x", "clip_id": "s1_001", "split": "test"}
    if same == "audio":      # the same recording under another id (default ids differ by line)
        del first["clip_id"], second["clip_id"]
        second["audio"] = str(tmp_path / "a.wav")
    manifest = _write_manifest(tmp_path, [first, {"audio": "b.wav", "instruction": "z", "split": "validation"},
                                          second])
    with pytest.raises(InputError, match="leaks training data") as err:
        manifest_lib.prepare_manifest(manifest, tmp_path / "data")
    msg = str(err.value)
    assert f"{manifest}:3" in msg and f"{manifest}:1" in msg and "'test'" in msg and "'train'" in msg, msg
    assert not (tmp_path / "data").exists()


def test_prepare_cli(tmp_path, capsys):
    from avi_jax.data import prepare
    assert prepare.main(["--data_dir", str(tmp_path), "--demo", "--num_speakers", "4", "--clip_seconds", "0.5"]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    assert len(builder.open_split(path, "test")) == 48
    (tmp_path / "m.jsonl").write_text('{"audio": "missing.wav", "instruction": "x"}\n')
    assert prepare.main(["--data_dir", str(tmp_path), "--manifest", str(tmp_path / "m.jsonl")]) == 2
    assert "m.jsonl:1" in capsys.readouterr().err


def test_refusals_are_collected_reported_and_strict(tmp_path):
    def train():
        yield _record("a")
        yield records.Refusal("b", "/data/b.m4a: truncated audio")
        yield _record("c")

    source = {"train": train, "test": [records.Refusal("d", "/emoca/d: NaN"), _record("e", n=32000)]}
    result = builder.prepare_dataset(source, tmp_path, "refusing")
    assert result.clips == {"train": 2, "test": 1} and not result.reused
    assert abs(result.audio_seconds["test"] - 2.0) < 1e-6 and abs(result.hours - 4.0 / 3600) < 1e-9
    assert [(r.split, r.clip_id, r.reason) for r in result.refusals] == [
        ("train", "b", "/data/b.m4a: truncated audio"), ("test", "d", "/emoca/d: NaN")]
    assert "refused clips: 2" in result.summary() and "/data/b.m4a: truncated audio" in result.summary()
    assert len(builder.open_split(result.path, "train")) == 2
    again = builder.prepare_dataset(source, tmp_path, "refusing")        # reused: the report is read back
    assert again.reused and again.refusals == result.refusals and again.clips == result.clips
    with pytest.raises(InputError, match="--strict"):
        builder.prepare_dataset(source, tmp_path, "refusing", strict=True)
    with pytest.raises(InputError, match=r"--strict: 1 clip\(s\) of split 'train' refused:\n  b: /data/b.m4a"):
        builder.prepare_dataset(source, tmp_path, "refusing-strict", strict=True)
    assert not (tmp_path / "clip_dataset" / "refusing-strict" / builder.VERSION).exists()
    with pytest.raises(InputError, match="split 'test' has no usable clip; all 1 were refused"):
        builder.prepare_dataset({"train": [_record("a")], "test": [records.Refusal("d", "bad")]}, tmp_path, "empty")


def test_prepare_cli_subcommands(tmp_path, capsys):
    from avi_jax.data import prepare
    assert prepare.main(["demo", "--out", str(tmp_path), "--num_speakers", "4", "--clip_seconds", "0.5",
                         "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "refused clips: 0" in out and "test" in out
    assert "reused" not in out, out                     # a first build is not "already prepared"
    assert len(builder.open_split(out.strip().splitlines()[-1], "test")) == 48
    assert prepare.main(["demo", "--out", str(tmp_path), "--num_speakers", "4", "--clip_seconds", "0.5",
                         "--no-progress"]) == 0
    assert "(already prepared; reused)" in capsys.readouterr().out
    sf.write(tmp_path / "a.wav", 0.1 * np.ones(16000), 16000)
    (tmp_path / "m.jsonl").write_text('{"audio": "a.wav", "instruction": "x"}\n')
    assert prepare.main(["manifest", "--source", str(tmp_path / "m.jsonl"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reused" not in out, out
    assert len(builder.open_split(out.strip().splitlines()[-1], "train")) == 1
    assert prepare.main(["manifest", "--source", str(tmp_path / "m.jsonl"), "--out", str(tmp_path)]) == 0
    assert "(already prepared; reused)" in capsys.readouterr().out


def test_prepare_cli_refuses_duplicates_and_leaves_no_folders(tmp_path, capsys):
    from avi_jax.data import prepare
    sf.write(tmp_path / "a.wav", 0.1 * np.ones(16000), 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "a.wav", "instruction": "x", "clip_id": "c"}\n'
                        '{"audio": "a.wav", "instruction": "x", "clip_id": "c", "split": "test"}\n')
    assert prepare.main(["manifest", "--source", str(manifest), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{manifest}:2" in err and f"{manifest}:1" in err and "two splits" in err, err
    assert not (tmp_path / "out").exists()
