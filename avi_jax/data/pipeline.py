"""grain input pipeline: clip records -> fixed-shape numpy batches for every training stage.

``make_dataset`` turns a random-access source of clip records (:func:`builder.open_split`, or any sequence
of record dicts) into a ``grain.IterDataset`` of per-host batches. Order: each epoch the record indices are
permuted with ``(seed, epoch)`` (when shuffling) and the epochs, one after the other, form one global stream
that does not depend on the number of hosts; global batch k (B = per-host batch x ``shard_count``) is
positions ``[k B, (k + 1) B)`` of it, and host ``shard_index`` reads its ``shard_index``-th block of
per-host-batch rows, so the hosts' batches concatenated in process order (``sharding.shard_batch``) are the
batches of a 1-process run row for row. Every record becomes a fixed-shape example (random frame-aligned audio
crop, random instruction, optionally augmented (``augment``, see ``data/augment.py``), tokenized), and
examples are batched. All per-example randomness comes from ``np.random.default_rng((seed, epoch,
record_index))`` (the text augmentation's from ``(seed, epoch, record_index, augment.AUGMENT_STREAM)``, so
turning it on or off changes no other draw), and the iterator state is one integer, so a run that restores
the iterator state continues with exactly the batches it would have produced.

Checkpointing the iterator with Orbax (grain 0.2.18, ``grain.checkpoint``)::

    it = iter(ds)                          # grain.DatasetIterator: it.get_state() / it.set_state(state)
    mngr = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "data"), options=...)
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=grain.checkpoint.CheckpointSave(it)))
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                           data=grain.checkpoint.CheckpointRestore(it)))
    # `it` is restored in place (restored.data is it); each host writes/reads process_<i>-of-<n>.json.

Padding (``drop_remainder=False``): each epoch is padded to whole global batches (the same number of
batches on every host, so multi-host eval loops stay in step); padded rows repeat the epoch's first example
with ``valid = False`` (so no row is degenerate), and must be ignored via ``valid``.
"""
from __future__ import annotations

import functools
import math
import sys
import threading
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from avi_jax.data import schema
from avi_jax.data.augment import AUGMENT_STREAM
from avi_jax.errors import ConfigError

LLM_KEYS = ("llm",)   # tokenizer names tokenized decoder-style: instruction tokens + EOS, no BOS


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v)


class TextEncoder:
    """Tokenize one instruction to fixed length ``max_len`` with a transformers tokenizer (thread-safe).

    style 'decoder' (the LLM): ``tokens(text) + [EOS]``, no BOS, truncated to keep the EOS.
    style 'encoder' (BERT-style text encoder): ``tokenizer(text, add_special_tokens=True)``, e.g.
    ``[CLS] ... [SEP]``; over-long texts keep the tokenizer's prefix/suffix special tokens.
    Returns ``ids`` int32 (max_len,) right-padded with the pad id (0 if the tokenizer has none) and ``mask``
    bool (max_len,).
    """

    def __init__(self, tokenizer, max_len: int, style: str):
        if style not in ("decoder", "encoder"):
            raise ValueError(f"style must be 'decoder' or 'encoder', got {style!r}")
        if max_len < 2:
            raise ConfigError(f"max_text_tokens must be >= 2, got {max_len}")
        self.tokenizer = tokenizer
        self.max_len = int(max_len)
        self.style = style
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._lock = threading.Lock()
        if style == "decoder":
            if tokenizer.eos_token_id is None:
                raise ConfigError(f"the LLM tokenizer {type(tokenizer).__name__} has no EOS token")
            self.prefix, self.suffix = [], [int(tokenizer.eos_token_id)]
        else:
            core = self._ids("a", False)
            full = self._ids("a", True)
            i = next((k for k in range(len(full) - len(core) + 1) if full[k:k + len(core)] == core), None)
            if i is None:
                self.prefix, self.suffix = [], []
            else:
                self.prefix, self.suffix = full[:i], full[i + len(core):]
        self._encode = functools.lru_cache(maxsize=65536)(self._encode_uncached)

    def _ids(self, text: str, special: bool) -> list[int]:
        with self._lock:   # HF fast tokenizers are not safe to call from several threads at once
            return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        core = self._ids(text, False)
        room = self.max_len - len(self.prefix) - len(self.suffix)
        return tuple(self.prefix + core[:max(room, 0)] + self.suffix)[:self.max_len]

    def __call__(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        seq = self._encode(text)
        ids = np.full(self.max_len, self.pad_id, np.int32)
        ids[:len(seq)] = seq
        mask = np.zeros(self.max_len, bool)
        mask[:len(seq)] = True
        return ids, mask

    def __getstate__(self):  # picklable for multiprocessing prefetch
        d = dict(self.__dict__)
        d.pop("_lock")
        d.pop("_encode")
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()
        self._encode = functools.lru_cache(maxsize=65536)(self._encode_uncached)


class ClipTransform:
    """Record -> fixed-shape example (see :func:`make_dataset` for the keys, without the batch axis).

    The crop offset is a multiple of 640 samples (one 25 fps frame) drawn uniformly when ``random_crop``
    and the clip is longer than ``max_audio_samples``, else 0; coefficient frame ``f`` of the example covers
    audio samples ``[640 f, 640 (f + 1))`` of the example's audio.
    """

    def __init__(self, *, max_audio_samples: int, encoders: Mapping[str, TextEncoder], random_crop: bool,
                 instruction_choice: str, augment: Callable[[str, np.random.Generator], str] | None = None):
        if instruction_choice not in ("random", "first"):
            raise ConfigError(f"instruction_choice must be 'random' or 'first', got {instruction_choice!r}")
        if max_audio_samples < schema.SAMPLES_PER_FRAME:
            raise ConfigError(f"max_audio_samples must be >= {schema.SAMPLES_PER_FRAME}, got {max_audio_samples}")
        self.max_audio = int(max_audio_samples)
        self.frames = self.max_audio // schema.SAMPLES_PER_FRAME
        self.encoders = dict(encoders)
        self.random_crop = random_crop
        self.instruction_choice = instruction_choice
        self.augment = augment

    def __call__(self, rec: Mapping[str, Any], rng: np.random.Generator, index: int, valid: bool,
                 augment_rng: np.random.Generator | None = None) -> dict:
        """``augment_rng``: the text augmentation's generator (required when the transform augments)."""
        spf = schema.SAMPLES_PER_FRAME
        pcm = np.asarray(rec["audio"])
        audio_in = schema.from_pcm16(pcm) if pcm.dtype == np.int16 else pcm.astype(np.float32)
        n = audio_in.shape[0]
        off_f = 0
        if self.random_crop and n > self.max_audio:
            off_f = int(rng.integers(0, (n - self.max_audio) // spf + 1))
        off = off_f * spf
        seg = audio_in[off:off + self.max_audio]
        audio = np.zeros(self.max_audio, np.float32)
        audio[:seg.size] = seg
        audio_mask = np.zeros(self.max_audio, bool)
        audio_mask[:seg.size] = True

        f = self.frames
        expression = np.zeros((f, schema.N_EXPRESSION), np.float32)
        jaw = np.zeros((f, schema.N_JAW), np.float32)
        coeff_mask = np.zeros(f, bool)
        if bool(rec.get("has_coefficients", True)):
            exp_in = np.asarray(rec["expression"], np.float32)[off_f:off_f + f]
            jaw_in = np.asarray(rec["jaw_pose"], np.float32)[off_f:off_f + f]
            k = exp_in.shape[0]
            expression[:k] = exp_in
            jaw[:k] = jaw_in
            coeff_mask[:k] = True

        texts = list(rec["instructions"])
        if not texts:
            texts = [""]
        choice = int(rng.integers(len(texts))) if self.instruction_choice == "random" else 0
        text = _text(texts[choice])
        if self.augment is not None:
            text = self.augment(text, augment_rng)
        out = {
            "audio": audio, "audio_mask": audio_mask,
            "expression": expression, "jaw_pose": jaw, "coeff_mask": coeff_mask,
            "emotion": np.int32(rec.get("emotion", -1)), "intensity": np.int32(rec.get("intensity", 0)),
            "index": np.int32(index), "instruction_index": np.int32(choice), "valid": np.bool_(valid),
        }
        for name, enc in self.encoders.items():
            out[f"{name}_ids"], out[f"{name}_mask"] = enc(text)
        return out


class _Stream:
    """Position ``p`` in one host's example stream -> ``(epoch, record index, valid)``.

    Host ``shard_index``'s batch k holds the global positions ``[k B + shard_index b, k B + (shard_index + 1) b)``
    (b = ``batch_size`` per host, B = b x ``shard_count``); global position q is row ``q % L`` of epoch
    ``q // L``, with L = n (``drop_remainder``) or n padded to whole global batches (rows >= n invalid).
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool, shard_index: int, shard_count: int,
                 batch_size: int, drop_remainder: bool):
        self.n, self.seed, self.shuffle = n, int(seed), shuffle
        self.shard_index, self.batch_size = shard_index, batch_size
        self.global_batch = batch_size * shard_count
        self.epoch_length = n if drop_remainder else math.ceil(n / self.global_batch) * self.global_batch
        self._cache: dict[int, np.ndarray] = {}     # the last two epochs' permutations
        self._lock = threading.Lock()

    def per_host(self, num_epochs: int) -> int:
        """Examples each host reads in ``num_epochs`` epochs (whole global batches)."""
        return num_epochs * self.epoch_length // self.global_batch * self.batch_size

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                perm = np.random.default_rng((self.seed, epoch)).permutation(self.n)
                self._cache = {e: p for e, p in self._cache.items() if e >= epoch - 1}
                self._cache[epoch] = perm
            return perm

    def __call__(self, p: int) -> tuple[int, int, bool]:
        k, row = divmod(int(p), self.batch_size)
        epoch, j = divmod(k * self.global_batch + self.shard_index * self.batch_size + row, self.epoch_length)
        valid = j < self.n
        if not valid:
            j = 0
        rec = int(self._perm(epoch)[j]) if self.shuffle else j
        return epoch, rec, valid

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_lock"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()


def make_dataset(source: Sequence[Mapping[str, Any]], *, batch_size: int, seed: int, shuffle: bool,
                 num_epochs: int | None, max_audio_samples: int, max_text_tokens: int | Mapping[str, int],
                 tokenizers: Mapping[str, Any], instruction_choice: str = "random",
                 shard_index: int | None = None, shard_count: int | None = None, drop_remainder: bool = True,
                 read_threads: int = 4, prefetch_buffer_size: int = 64,
                 augment: Callable[[str, np.random.Generator], str] | None = None):
    """Build the per-host batch stream of a clip split.

    Args:
      source: random access records (``builder.open_split(path, split)`` or a list of record dicts with the
        keys of ``schema.features()``; audio int16 PCM or float).
      batch_size: per-host batch size B.
      seed: shuffling and per-example randomness seed.
      shuffle: permute records each epoch (``(seed, epoch)``) and crop audio at a random frame-aligned
        offset; False: record order, crops from the start.
      num_epochs: passes over the data; None = repeat forever.
      max_audio_samples: N, samples per example at 16 kHz (zero padded / cropped).
      max_text_tokens: token length L_k, one int for all tokenizers or ``{name: L_k}``.
      tokenizers: ``{name: transformers tokenizer}``; names in ``LLM_KEYS`` ('llm') are tokenized as
        instruction tokens + EOS (no BOS: the model adds BOS + soft prompt + template); any other name
        (e.g. 'text') as the tokenizer does with ``add_special_tokens=True`` (BERT: ``[CLS] ... [SEP]``).
      instruction_choice: 'random' (one of the clip's instructions, from the per-example rng) or 'first'.
      shard_index, shard_count: this host's shard (default ``jax.process_index()`` / ``process_count()``);
        the shards read disjoint blocks of each global batch (see the module docstring): together, every
        record of every epoch once, and the same global batches as one shard of ``batch_size x
        shard_count``.
      drop_remainder: True: the stream is cut into full batches (a partial last batch is dropped);
        False: each epoch is padded to whole batches (the same count on every host) with rows marked
        ``valid = False``.
      read_threads, prefetch_buffer_size: grain ``ReadOptions`` (threads reading/transforming examples and
        examples prefetched).
      augment: ``(text, rng) -> text`` applied to each example's chosen instruction before tokenizing (e.g.
        ``augment.Augmenter``; training only), with ``rng = default_rng((seed, epoch, record_index,
        augment.AUGMENT_STREAM))``: a function of the example and the epoch, reproduced on resume.

    Returns:
      ``grain.IterDataset``; ``iter(ds)`` is a ``grain.DatasetIterator`` (``get_state()`` /
      ``set_state()``; see the module docstring for Orbax) yielding dicts of numpy arrays:
      audio float32 (B, N) in [-1, 1]; audio_mask bool (B, N); ``<k>_ids`` int32 (B, L_k) and
      ``<k>_mask`` bool (B, L_k) per tokenizer k; emotion int32 (B,) (index into ``schema.EMOTIONS``,
      -1 unknown); intensity int32 (B,) (0 unknown); index int32 (B,) (record index in ``source``);
      instruction_index int32 (B,) (which of the record's instructions was tokenized); expression float32
      (B, F, 50); jaw_pose float32 (B, F, 3) (radians); coeff_mask bool (B, F) with F = N // 640 (False for
      frames past the clip and for clips without coefficients); valid bool (B,).

    Raises:
      ConfigError: bad arguments (empty source, bad shard, unknown instruction_choice, missing EOS...).
    """
    import grain

    if shard_index is None or shard_count is None:
        import jax
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    n = len(source)
    if n == 0:
        raise ConfigError("the data source is empty")
    if not 0 <= shard_index < shard_count:
        raise ConfigError(f"shard_index {shard_index} out of range for shard_count {shard_count}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if num_epochs is not None and num_epochs < 1:
        raise ConfigError(f"num_epochs must be None or >= 1, got {num_epochs}")
    if drop_remainder and n // shard_count == 0:
        raise ConfigError(f"{n} records cannot feed {shard_count} shards")

    encoders = {}
    for name, tok in tokenizers.items():
        length = max_text_tokens[name] if isinstance(max_text_tokens, Mapping) else max_text_tokens
        encoders[name] = TextEncoder(tok, int(length), "decoder" if name in LLM_KEYS else "encoder")
    transform = ClipTransform(max_audio_samples=max_audio_samples, encoders=encoders, random_crop=shuffle,
                              instruction_choice=instruction_choice, augment=augment)
    stream = _Stream(n, seed=seed, shuffle=shuffle, shard_index=shard_index, shard_count=shard_count,
                     batch_size=batch_size, drop_remainder=drop_remainder)
    total = sys.maxsize if num_epochs is None else stream.per_host(num_epochs)
    seed_ = int(seed)

    def load(p: int) -> dict:
        epoch, rec_index, valid = stream(p)
        rng = np.random.default_rng((seed_, epoch, rec_index))
        aug_rng = np.random.default_rng((seed_, epoch, rec_index, AUGMENT_STREAM)) if augment else None
        return transform(source[rec_index], rng, rec_index, valid, aug_rng)

    ds = grain.MapDataset.range(total).map(load)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size))
    return it.batch(batch_size, drop_remainder=drop_remainder)


def num_batches(source_len: int, *, batch_size: int, shard_count: int, drop_remainder: bool,
                num_epochs: int = 1) -> int:
    """Batches per host that :func:`make_dataset` yields for ``num_epochs`` epochs of ``source_len`` records."""
    global_batch = batch_size * shard_count
    if drop_remainder:
        return num_epochs * source_len // global_batch
    return num_epochs * math.ceil(source_len / global_batch)
