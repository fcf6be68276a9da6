"""Tokenizers: load a local Hugging Face tokenizer folder (offline), or train the demo's small tokenizer.

The demo tokenizer is a lower-cased BPE (``tokenizers`` library) with a Metaspace pre-tokenizer/decoder, so
``decode(encode(text)) == text.lower()`` for ASCII text, and one tokenizer serves both the small LLaMA
(``<s>`` BOS / ``</s>`` EOS, no BOS added by the pipeline) and the BERT-style text encoder (its post-processor
wraps a single text as ``[CLS] ... [SEP]``). Special-token ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2,
``<unk>`` 3, ``[CLS]`` 4, ``[SEP]`` 5, ``[MASK]`` 6.
"""
from __future__ import annotations

import os
import shutil
import string
from typing import Iterable

from avi_jax.errors import ConfigError

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, BOS_ID, EOS_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model")


def load_tokenizer(folder: str | os.PathLike):
    """Load a tokenizer from a local Hugging Face folder with ``transformers.AutoTokenizer`` (offline).

    Works for the folder written by :func:`train_word_tokenizer`, LLaMA/Vicuna folders (``tokenizer.json``
    or ``tokenizer.model``) and BERT folders (``vocab.txt``). Returns the transformers tokenizer.

    Raises:
      ConfigError: the folder is missing, holds no tokenizer file, or cannot be loaded (message says what to
        put where).
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder}: tokenizer folder does not exist; put a Hugging Face tokenizer there "
                          f"(one of {', '.join(_TOKENIZER_FILES)} + tokenizer_config.json)")
    if not any(os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
        raise ConfigError(f"{folder}: no tokenizer file found (expected one of {', '.join(_TOKENIZER_FILES)})")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/... for broken folders
        raise ConfigError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {e})") from e


def train_word_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1000,
                         min_frequency: int = 1):
    """Train the demo's small lower-cased BPE tokenizer on ``texts`` and save it to ``out_dir``.

    Words of the training texts end up as single tokens (up to ``vocab_size``); any other ASCII text is
    still encoded (character fallback, no ``<unk>``). Special tokens: ``<pad>`` 0, ``<s>`` 1 (BOS),
    ``</s>`` 2 (EOS), ``<unk>`` 3, ``[CLS]`` 4, ``[SEP]`` 5, ``[MASK]`` 6; encoding with
    ``add_special_tokens=True`` gives ``[CLS] ... [SEP]`` (BERT style). The folder (``tokenizer.json`` +
    ``tokenizer_config.json``...) appears complete or not at all (a folder already complete there is kept)
    and loads with :func:`load_tokenizer`. Returns the loaded transformers tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    alphabet = sorted(set(string.ascii_lowercase + string.digits + string.punctuation) | {"\u2581"})
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                                  special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator((str(t) for t in texts), trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", padding_side="right",
        model_max_length=512)
    # Written to a temporary folder and renamed, so that a folder that exists is complete: the processes of
    # a multi-host run may all train it (deterministically, the same tokenizer); the first rename wins.
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(tmp)
    try:
        os.rename(tmp, out_dir)        # replaces an empty folder; fails on a complete one
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(out_dir, "tokenizer.json")):
            raise
    return load_tokenizer(out_dir)
