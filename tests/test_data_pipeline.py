"""grain pipeline: shapes/dtypes/masks, crop alignment, exact resume, per-host sharding, eval padding."""
from __future__ import annotations

import numpy as np
import pytest

from avi_jax.data import builder, demo, pipeline, schema
from avi_jax.data import tokenizer as tok_lib
from avi_jax.errors import ConfigError

SPF = schema.SAMPLES_PER_FRAME


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"a {w} man speaks with lip corner {a} pulled." for w in ("happy", "sad", "calm", "angry")
             for a in ("slightly", "strongly")]
    return tok_lib.train_word_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=200)


def _records(n=13, seed=0):
    """Clips of varying length whose audio and coefficients both encode the frame number."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        t = int(rng.integers(20, 60))
        frame_code = (1000 * i + np.arange(t)).astype(np.float32) / 1e5
        audio = np.repeat(frame_code, SPF)
        expression = np.tile(frame_code[:, None], (1, 50))
        jaw = np.tile(frame_code[:, None], (1, 3))
        recs.append({"clip_id": f"c{i}", "audio": audio, "expression": expression, "jaw_pose": jaw,
                     "has_coefficients": i != 5, "emotion": i % 9, "intensity": i % 4,
                     "instructions": [f"a happy man speaks {i}.", f"a sad man speaks {i}.", "a calm man."]})
    return recs


def _ds(source, tok, **kw):
    args = dict(batch_size=4, seed=0, shuffle=True, num_epochs=None, max_audio_samples=30 * SPF,
                max_text_tokens={"text": 12, "llm": 10}, tokenizers={"text": tok, "llm": tok},
                shard_index=0, shard_count=1, read_threads=2, prefetch_buffer_size=8)
    args.update(kw)
    return pipeline.make_dataset(source, **args)


def test_shapes_dtypes_masks(tok):
    recs = _records()
    b = next(iter(_ds(recs, tok)))
    n, f = 30 * SPF, 30
    expect = {"audio": ((4, n), np.float32), "audio_mask": ((4, n), np.bool_),
              "text_ids": ((4, 12), np.int32), "text_mask": ((4, 12), np.bool_),
              "llm_ids": ((4, 10), np.int32), "llm_mask": ((4, 10), np.bool_),
              "emotion": ((4,), np.int32), "intensity": ((4,), np.int32), "index": ((4,), np.int32),
              "instruction_index": ((4,), np.int32), "valid": ((4,), np.bool_),
              "expression": ((4, f, 50), np.float32), "jaw_pose": ((4, f, 3), np.float32),
              "coeff_mask": ((4, f), np.bool_)}
    assert set(b) == set(expect)
    for k, (shape, dtype) in expect.items():
        assert b[k].shape == shape and b[k].dtype == dtype, k
    assert b["valid"].all()
    for r in range(4):
        rec = recs[b["index"][r]]
        n_rec = rec["audio"].size
        assert b["audio_mask"][r].sum() == min(n, n_rec)
        assert not b["audio"][r][~b["audio_mask"][r]].any()
        t_rec = rec["expression"].shape[0] if rec["has_coefficients"] else 0
        assert b["coeff_mask"][r].sum() == min(f, t_rec)
        assert b["emotion"][r] == rec["emotion"] and b["intensity"][r] == rec["intensity"]
        text = rec["instructions"][b["instruction_index"][r]]
        llm = b["llm_ids"][r][b["llm_mask"][r]]
        assert llm[-1] == tok.eos_token_id and tok.bos_token_id not in llm
        assert tok.decode(llm[:-1]) == text.lower()[:len(tok.decode(llm[:-1]))]
        txt = b["text_ids"][r][b["text_mask"][r]]
        assert txt[0] == tok_lib.CLS_ID and txt[-1] == tok_lib.SEP_ID
        assert (b["text_ids"][r][~b["text_mask"][r]] == tok.pad_token_id).all()
        # mask is a prefix
        for m in (b["audio_mask"][r], b["text_mask"][r], b["llm_mask"][r], b["coeff_mask"][r]):
            k = m.sum()
            assert m[:k].all() and not m[k:].any()


def test_crop_alignment_audio_vs_coefficients(tok):
    recs = _records()
    it = iter(_ds(recs, tok, batch_size=13))
    offsets = set()
    for _ in range(3):
        b = next(it)
        for r in range(13):
            fm = b["coeff_mask"][r]
            if not fm.any():
                continue
            frames = np.flatnonzero(fm)
            audio_at = b["audio"][r][frames * SPF]                       # first sample of each frame
            np.testing.assert_array_equal(audio_at, b["expression"][r][frames, 0])
            np.testing.assert_array_equal(audio_at, b["jaw_pose"][r][frames, 2])
            code = b["expression"][r][0, 0] * 1e5
            offsets.add(int(round(code)) % 1000)
    assert len(offsets) > 3            # random crops happen (frame-aligned, checked above)


def test_no_random_crop_without_shuffle(tok):
    recs = _records()
    b = next(iter(_ds(recs, tok, shuffle=False, batch_size=13, drop_remainder=False, num_epochs=1)))
    np.testing.assert_array_equal(b["index"], np.arange(13))
    for r in range(13):
        n = min(30 * SPF, recs[r]["audio"].size)
        np.testing.assert_array_equal(b["audio"][r][:n], recs[r]["audio"][:n])
    assert (b["instruction_index"] >= 0).all()
    b2 = next(iter(_ds(recs, tok, shuffle=False, batch_size=13, drop_remainder=False, num_epochs=1,
                       instruction_choice="first")))
    assert (b2["instruction_index"] == 0).all()


def test_state_restore_gives_identical_batches(tok):
    recs = _records()
    ds = _ds(recs, tok)
    it = iter(ds)
    for _ in range(5):                 # crosses an epoch boundary (13 records, batch 4)
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(6)]
    it2 = iter(_ds(recs, tok))         # a fresh pipeline, as after a restart
    it2.set_state(state)
    got = [next(it2) for _ in range(6)]
    for a, b in zip(want, got):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # Epochs are reshuffled; the same seed gives the same order, another seed a different one.
    first = [next(iter(_ds(recs, tok)))["index"] for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    assert not np.array_equal(first[0], next(iter(_ds(recs, tok, seed=1)))["index"])


def test_orbax_grain_checkpoint_recipe(tok, tmp_path):
    import grain
    import orbax.checkpoint as ocp
    recs = _records()
    it = iter(_ds(recs, tok))
    next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
    mngr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = next(it)
    it2 = iter(_ds(recs, tok))
    restored = mngr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    assert restored.data is it2
    got = next(it2)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k], err_msg=k)
    mngr.close()


def test_sharding_disjoint_and_covering(tok):
    recs = _records(n=13)
    seen = []
    counts = []
    for shard in (0, 1):
        batches = list(_ds(recs, tok, shuffle=False, num_epochs=1, drop_remainder=False, batch_size=3,
                           shard_index=shard, shard_count=2))
        counts.append(len(batches))
        idx = np.concatenate([b["index"][b["valid"]] for b in batches])
        seen.append(set(idx.tolist()))
        assert len(idx) == len(set(idx.tolist()))
        # padded rows are copies of real rows, marked invalid
        assert sum((~b["valid"]).sum() for b in batches) == len(batches) * 3 - len(idx)
    assert not (seen[0] & seen[1]) and seen[0] | seen[1] == set(range(13))
    assert counts[0] == counts[1] == pipeline.num_batches(13, batch_size=3, shard_count=2, drop_remainder=False)
    # Training shards (shuffled, drop_remainder): disjoint within an epoch, equal sizes.
    per_host = 13 // 2
    epoch = []
    for shard in (0, 1):
        b = next(iter(_ds(recs, tok, batch_size=per_host, shard_index=shard, shard_count=2)))
        epoch.append(set(b["index"].tolist()))
        assert b["valid"].all()
    assert not (epoch[0] & epoch[1]) and len(epoch[0]) == len(epoch[1]) == per_host


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_hosts_together_read_the_batches_of_one_host(tok, train):
    """The 3 hosts' batches, concatenated in process order (as ``sharding.shard_batch`` builds the global
    batch), are the batches of 1 host with the global batch size, row for row: a multi-host run trains on
    the same batches (and per-row randomness meets the same rows) as a 1-process run. 13 records, global
    batch 6: training batches straddle epochs; evaluation pads the last batch."""
    recs = _records(n=13)
    kw = dict(shuffle=train, num_epochs=3 if train else 1, drop_remainder=train)
    one = list(_ds(recs, tok, batch_size=6, **kw))
    hosts = [list(_ds(recs, tok, batch_size=2, shard_index=h, shard_count=3, **kw)) for h in range(3)]
    assert len(one) == pipeline.num_batches(13, batch_size=2, shard_count=3, drop_remainder=train,
                                            num_epochs=kw["num_epochs"]) == (6 if train else 3)
    assert [len(h) for h in hosts] == [len(one)] * 3
    for k, want in enumerate(one):
        for key in want:
            got = np.concatenate([h[k][key] for h in hosts])
            np.testing.assert_array_equal(got, want[key], err_msg=f"batch {k} {key}")


def test_finite_epochs_and_drop_remainder(tok):
    recs = _records(n=13)
    assert len(list(_ds(recs, tok, num_epochs=2, batch_size=4))) == (2 * 13) // 4
    assert pipeline.num_batches(13, batch_size=4, shard_count=1, drop_remainder=True, num_epochs=2) == 6
    eval_batches = list(_ds(recs, tok, shuffle=False, num_epochs=1, drop_remainder=False, batch_size=4))
    assert len(eval_batches) == 4 and eval_batches[-1]["valid"].tolist() == [True, False, False, False]


def test_bad_arguments(tok):
    with pytest.raises(ConfigError):
        _ds([], tok)
    with pytest.raises(ConfigError):
        _ds(_records(), tok, shard_index=2, shard_count=2)
    with pytest.raises(ConfigError):
        _ds(_records(), tok, instruction_choice="longest")


def test_from_prepared_demo(tok, tmp_path):
    path = demo.prepare_demo(tmp_path, seed=0, num_speakers=4, clip_seconds=1.0)
    src = builder.open_split(path, "test")
    b = next(iter(_ds(src, tok, batch_size=6, max_audio_samples=24000)))
    assert b["audio"].shape == (6, 24000) and b["coeff_mask"].shape == (6, 37)
    assert (b["audio_mask"].sum(1) == 16000).all() and (b["coeff_mask"].sum(1) == 25).all()
    assert set(b["emotion"].tolist()) <= set(range(8))
    for r in range(6):
        rec = src[int(b["index"][r])]
        np.testing.assert_array_equal(b["expression"][r][:25], rec["expression"])
        np.testing.assert_allclose(b["audio"][r][:16000], schema.from_pcm16(rec["audio"]))
