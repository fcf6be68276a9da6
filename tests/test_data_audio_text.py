"""Audio loading, the instruction language and the demo tokenizer."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import soundfile as sf

from avi_jax.data import audio as audio_lib
from avi_jax.data import instructions as I
from avi_jax.data import tokenizer as tok_lib
from avi_jax.data.schema import EMOTIONS
from avi_jax.errors import ConfigError, InputError


# ---------------------------------------------------------------- audio

def test_load_audio_stereo_44k_is_downmixed_and_resampled(tmp_path):
    sr = 44_100
    t = np.arange(int(0.5 * sr)) / sr
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    right = 0.1 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], 1), sr, subtype="PCM_16")
    out = audio_lib.load_audio(path)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(out.size - 8000) <= 1
    # Mean of the channels: amplitude 0.3, still a 440 Hz tone after resampling.
    mid = out[1000:7000]
    assert abs(np.abs(mid).max() - 0.3) < 0.01
    spec = np.abs(np.fft.rfft(mid))
    assert abs(np.fft.rfftfreq(mid.size, 1 / 16000)[spec.argmax()] - 440) < 5


def test_load_audio_flac_16k_passthrough(tmp_path):
    x = (0.2 * np.random.default_rng(0).standard_normal(1600)).clip(-1, 1)
    path = tmp_path / "a.flac"
    sf.write(path, x, 16000, subtype="PCM_16")
    out = audio_lib.load_audio(path)
    np.testing.assert_allclose(out, x, atol=1 / 32767 + 1e-6)


@pytest.mark.parametrize("case", ["missing", "empty", "nan", "garbage", "m4a"])
def test_load_audio_errors_name_the_file(tmp_path, case):
    path = tmp_path / f"bad_{case}.wav"
    if case == "empty":
        sf.write(path, np.zeros((0,), np.float32), 16000)
    elif case == "nan":
        x = np.zeros(100, np.float32)
        x[10] = np.nan
        sf.write(path, x, 16000, subtype="FLOAT")
    elif case == "garbage":
        path.write_bytes(b"this is not a wave file at all" * 10)
    elif case == "m4a":
        path = tmp_path / "clip.m4a"
        path.write_bytes(b"\x00" * 100)
    with pytest.raises(InputError, match=re.escape(str(path))):
        audio_lib.load_audio(path)


# ---------------------------------------------------------------- instructions

@pytest.mark.parametrize("word,emotion", sorted(I.EMOTION_SYNONYMS.items()))
def test_emotion_from_text_every_word(word, emotion):
    assert I.emotion_from_text(f"The man looks {word} while talking.") == emotion
    assert I.emotion_from_text(word.upper()) == emotion


def test_emotion_from_text_none_and_whole_words():
    assert I.emotion_from_text("A man speaks with lip corner strongly pulled.") is None
    assert I.emotion_from_text("") is None
    assert I.emotion_from_text("An unhappy woman") == "sad"          # not "happy"
    assert I.emotion_from_text("madness of the sadistic") is None    # whole words only


def test_describe_names_its_emotion_and_consistent_adverbs():
    rng = np.random.default_rng(0)
    for emotion in EMOTIONS:
        for intensity in (0, 1, 2, 3):
            for gender in ("male", "female", None):
                strengths = I.action_strengths(emotion, intensity)
                for _ in range(3):
                    text = I.describe(emotion, intensity, gender, strengths, rng)
                    assert I.emotion_from_text(text) == emotion, text
                    assert text[0].isupper() and text.endswith("."), text
                    assert not re.search(r"\ba [aeiou]", text), text
                    for name, s in strengths.items():
                        act = I.ACTIONS[name]
                        m = re.search(rf"\b{act.part} (\w+) {act.verb}\b", text)
                        if m and s >= I.MIN_ACTION_STRENGTH:
                            bound = next(u for u, words in I.DEGREE_ADVERBS if m.group(1) in words)
                            assert s <= bound, (text, name, s)
                    if strengths and max(strengths.values()) >= I.MIN_ACTION_STRENGTH:
                        best = max(strengths.values())
                        assert any(f"{I.ACTIONS[k].part} " in text for k, v in strengths.items() if v == best), text
    text = I.describe("happy", 2, "male", {"lip_corner_puller": 0.9, "cheek_raiser": 0.5}, rng)
    assert "lip corner strongly pulled" in text or "lip corner greatly pulled" in text


def test_describe_rejects_unknowns():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        I.describe("bored", 1, "male", {}, rng)
    with pytest.raises(ValueError):
        I.describe("happy", 1, "robot", {}, rng)
    with pytest.raises(ValueError):
        I.describe("happy", 1, "male", {"ear_wiggle": 1.0}, rng)


def test_templates():
    assert len(I.INSTRUCTION_TEMPLATES) >= 10
    assert len(set(I.INSTRUCTION_TEMPLATES)) == len(I.INSTRUCTION_TEMPLATES)
    assert I.template(0) == I.INSTRUCTION_TEMPLATES[0]
    assert I.template(len(I.INSTRUCTION_TEMPLATES) + 1) == I.INSTRUCTION_TEMPLATES[1]
    i, t = I.sample_template(np.random.default_rng(3))
    assert t == I.template(i)


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    texts = [I.describe(e, k, g, I.action_strengths(e, k), rng)
             for e in EMOTIONS for k in (1, 2, 3) for g in ("male", "female")]
    tok = tok_lib.train_word_tokenizer(texts, tmp_path / "tok", vocab_size=400)
    assert [tok.convert_tokens_to_ids(s) for s in tok_lib.SPECIAL_TOKENS] == list(range(7))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    again = tok_lib.load_tokenizer(tmp_path / "tok")
    for text in texts[:10] + ["Completely Unseen words: xylophone-42!"]:
        ids = again(text, add_special_tokens=False)["input_ids"]
        assert again.decode(ids) == text.lower()
        assert tok_lib.UNK_ID not in ids
        full = again(text)["input_ids"]
        assert full[0] == tok_lib.CLS_ID and full[-1] == tok_lib.SEP_ID and full[1:-1] == ids
    # Words of the training texts are single tokens.
    assert len(again("fairly happy man", add_special_tokens=False)["input_ids"]) == 3


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        tok_lib.load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no tokenizer file"):
        tok_lib.load_tokenizer(tmp_path / "empty")


def test_tokenizer_folder_appears_complete_and_a_second_writer_keeps_it(tmp_path):
    """As the processes of a multi-host run do: a second training into the same folder keeps the complete
    one there, and no temporary folder is left behind."""
    texts = ["a happy man speaks.", "a sad woman speaks."]
    first = tok_lib.train_word_tokenizer(texts, tmp_path / "tok", vocab_size=100)
    stamp = os.path.getmtime(tmp_path / "tok" / "tokenizer.json")
    second = tok_lib.train_word_tokenizer(texts, tmp_path / "tok", vocab_size=100)
    assert os.path.getmtime(tmp_path / "tok" / "tokenizer.json") == stamp
    assert second.get_vocab() == first.get_vocab()
    assert sorted(os.listdir(tmp_path)) == ["tok"]
