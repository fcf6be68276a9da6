"""Text augmentation (paper Sec. IV-A-2): WordNet synonyms, the EDA operations, the protected words (the
emotion a text names never changes, over the whole demo corpus), determinism and the pipeline wiring
(seeded, different across epochs, reproduced after an iterator restore, off with enabled=False)."""
from __future__ import annotations

import re

import ml_collections
import numpy as np
import pytest

from avi_jax.data import augment, demo, pipeline, schema
from avi_jax.data import instructions as I
from avi_jax.data import tokenizer as tok_lib
from avi_jax.errors import ConfigError

TEXT = "A fairly happy man speaks with lip corner strongly pulled and cheek mildly raised."


class _Table:
    """A hand-written synonym table (exercises the operations without WordNet)."""
    table = {"man": ("guy",), "lip": ("mouth",), "corner": ("nook",), "cheek": ("jowl",),
             "speaks": ("talks",), "pulled": ("drawn",), "raised": ("lifted",)}

    def __call__(self, word):
        return self.table.get(word.lower(), ())


def _protected(text):
    return [w.lower() for w in re.findall(r"[A-Za-z]+", text) if w.lower() in augment.PROTECTED]


@pytest.fixture(scope="module")
def wordnet():
    return augment.WordNetSynonyms(senses=3)


def test_wordnet_synonyms(wordnet):
    # WordNet 3.0: "corner" (first sense: "a place off to the side of an area") has "nook"; "brow" has
    # "forehead"; a word WordNet does not know has none; protected words are never synonyms
    assert "nook" in wordnet("corner")
    assert "forehead" in wordnet("brow") and "forehead" in augment.WordNetSynonyms(senses=1)("brow")
    assert wordnet("xyzzy") == ()
    assert "happy" not in wordnet("glad") and "sad" not in wordnet("deplorable")
    assert all(s.isalpha() and s.islower() and s not in augment.PROTECTED
               for w in ("man", "lip", "raised", "face", "speaker") for s in wordnet(w))


def test_each_operation_by_hand():
    rng = np.random.default_rng(0)
    words = lambda t: re.findall(r"[A-Za-z]+", t)  # noqa: E731
    base = words(TEXT)
    for op in augment.OPS:
        a = augment.Augmenter(_Table(), prob=1.0, alpha=0.1, ops=(op,))
        out = [a(TEXT, np.random.default_rng(s)) for s in range(20)]
        assert any(o != TEXT for o in out), op
        for o in out:
            w = words(o)
            assert _protected(o) == _protected(TEXT), (op, o)
            if op == "synonym":          # same length, changed words are table synonyms
                assert len(w) == len(base)
                assert all(x == y or x.lower() in _Table.table.get(y.lower(), ()) for x, y in zip(w, base))
            elif op == "insert":         # one word (alpha 0.1 x 14 words, rounded) inserted
                assert len(w) == len(base) + 1
            elif op == "swap":           # a permutation of the words
                assert sorted(x.lower() for x in w) == sorted(x.lower() for x in base)
            else:                        # a sub-sequence
                it = iter(base)
                assert all(x in it for x in w) and len(w) <= len(base)
    assert augment.Augmenter(_Table(), prob=0.0)(TEXT, rng) == TEXT
    assert augment.Augmenter(_Table(), prob=1.0, ops=("delete",), alpha=1.0)("Happy.", rng) == "Happy."


def test_bad_settings():
    for kw in ({"prob": 1.5}, {"alpha": 0.0}, {"ops": ("shuffle",)}, {"ops": ()}):
        with pytest.raises(ConfigError):
            augment.Augmenter(_Table(), **kw)
    with pytest.raises(ConfigError):
        augment.WordNetSynonyms(senses=0)
    assert augment.from_config(ml_collections.ConfigDict({"enabled": False})) is None
    assert augment.from_config(None) is None


def test_never_changes_the_emotion_over_the_demo_corpus(wordnet):
    """Every instruction of the demo corpus (the instruct demo's 32 speakers), augmented under 4 seeds by
    each operation with alpha 0.3: the parser reads the same emotion, and the protected words (emotion,
    intensity, degree, negation) stay, in order."""
    texts = sorted({t for c in demo.demo_clips(None, seed=0, num_speakers=32) for t in c["instructions"]})
    assert len(texts) > 300
    changed = 0
    for op in augment.OPS:
        a = augment.Augmenter(wordnet, prob=1.0, alpha=0.3, ops=(op,))
        for i, t in enumerate(texts):
            for s in range(4):
                out = a(t, np.random.default_rng((s, i)))
                assert I.emotion_from_text(out) == I.emotion_from_text(t), (op, t, out)
                assert _protected(out) == _protected(t), (op, t, out)
                changed += out != t
    assert changed > 0.8 * 4 * len(texts) * len(augment.OPS)


def test_deterministic_for_the_generator(wordnet):
    a = augment.Augmenter(wordnet, prob=1.0)
    outs = [a(TEXT, np.random.default_rng((0, e, 5))) for e in range(8)]
    assert outs == [a(TEXT, np.random.default_rng((0, e, 5))) for e in range(8)]
    assert len(set(outs)) > 4


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tok_lib.train_word_tokenizer([TEXT, "a sad woman speaks."], tmp_path_factory.mktemp("tok"),
                                        vocab_size=200)


def _records(n=6):
    spf = schema.SAMPLES_PER_FRAME
    return [{"clip_id": f"c{i}", "audio": np.zeros(20 * spf, np.float32),
             "expression": np.zeros((20, 50), np.float32), "jaw_pose": np.zeros((20, 3), np.float32),
             "has_coefficients": True, "emotion": 5, "intensity": 2, "instructions": [TEXT]}
            for i in range(n)]


def _texts(ds, tok, steps):
    it = iter(ds)
    out = []
    for _ in range(steps):
        b = next(it)
        out.append([tok.decode(r[m]) for r, m in zip(b["text_ids"], b["text_mask"])])
    return out, it


def test_pipeline_augments_per_epoch_and_resumes(tok, wordnet):
    kw = dict(batch_size=3, seed=1, shuffle=True, num_epochs=None, max_audio_samples=10 * schema.SAMPLES_PER_FRAME,
              max_text_tokens=48, tokenizers={"text": tok}, shard_index=0, shard_count=1, read_threads=2,
              prefetch_buffer_size=4)
    aug = augment.Augmenter(wordnet, prob=1.0)
    recs = _records()
    plain, _ = _texts(pipeline.make_dataset(recs, **kw), tok, 4)
    assert len({t for b in plain for t in b}) == 1                # without augmentation: the text itself
    first, _ = _texts(pipeline.make_dataset(recs, augment=aug, **kw), tok, 8)
    again, _ = _texts(pipeline.make_dataset(recs, augment=aug, **kw), tok, 8)
    assert first == again                                         # seeded
    epoch0 = sorted(t for b in first[:2] for t in b)              # 2 batches of 3 = one epoch of 6 records
    epoch1 = sorted(t for b in first[2:4] for t in b)
    assert epoch0 != epoch1 and len(set(epoch0)) > 1              # different across epochs and examples
    # resume from the iterator state after 3 batches: the same augmented texts follow
    _, it = _texts(pipeline.make_dataset(recs, augment=aug, **kw), tok, 3)
    state = it.get_state()
    it2 = iter(pipeline.make_dataset(recs, augment=aug, **kw))
    it2.set_state(state)
    rest = [[tok.decode(r[m]) for r, m in zip(b["text_ids"], b["text_mask"])] for b in (next(it2) for _ in range(5))]
    assert rest == first[3:]
    # the other per-example draws (crop, instruction choice) are those of the run without augmentation
    b_plain = next(iter(pipeline.make_dataset(recs, **kw)))
    b_aug = next(iter(pipeline.make_dataset(recs, augment=aug, **kw)))
    assert np.array_equal(b_plain["index"], b_aug["index"]) and np.array_equal(b_plain["audio"], b_aug["audio"])


def test_configs_turn_it_on_by_default():
    from configs import avi_talking, instruct, style_prior
    for c in (instruct.get_config("tiny"), style_prior.get_config("tiny")):
        assert c.data.augment.enabled
        assert isinstance(augment.from_config(c.data.augment), augment.Augmenter)
    system = avi_talking.get_config("tiny")
    assert system.instruct.data.augment.enabled and system.style.data.augment.enabled
