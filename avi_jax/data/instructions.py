"""The MeadText-style instruction language (paper Sec. III-A, IV-A).

A visual instruction names an emotion scaled by its intensity and a few facial actions with degree adverbs,
e.g. "A fairly happy man speaks with lip corner strongly pulled and cheek mildly raised." Facial actions are
FACS action units (Ekman & Friesen) written as "<face part> <adverb> <verb>"; each emotion has a prototypical
set of action units with strengths in [0, 1] (after EMFACS-style emotion prototypes), scaled by intensity.

Also holds the ~10 paraphrased task prompts ("instruction templates") used in stage 1b, where the LLM sees
BOS + soft prompt + template and is trained to produce the instruction (paper Sec. III-B).
"""
from __future__ import annotations

import re
from typing import Mapping, NamedTuple

import numpy as np

from avi_jax.data.schema import EMOTIONS


class Action(NamedTuple):
    """One facial action: FACS unit, the face part and the past participle ("lip corner" / "pulled")."""
    au: str
    part: str
    verb: str


# FACS action units used by the instructions (order fixes the demo corpus' expression basis).
ACTIONS: dict[str, Action] = {
    "inner_brow_raiser": Action("AU1", "inner brow", "raised"),
    "outer_brow_raiser": Action("AU2", "outer brow", "raised"),
    "brow_lowerer": Action("AU4", "brow", "lowered"),
    "upper_lid_raiser": Action("AU5", "upper lid", "raised"),
    "cheek_raiser": Action("AU6", "cheek", "raised"),
    "lid_tightener": Action("AU7", "lids", "tightened"),
    "nose_wrinkler": Action("AU9", "nose", "wrinkled"),
    "upper_lip_raiser": Action("AU10", "upper lip", "raised"),
    "lip_corner_puller": Action("AU12", "lip corner", "pulled"),
    "dimpler": Action("AU14", "one lip corner", "tightened"),
    "lip_corner_depressor": Action("AU15", "lip corner", "depressed"),
    "chin_raiser": Action("AU17", "chin", "raised"),
    "lip_stretcher": Action("AU20", "lips", "stretched"),
    "lip_tightener": Action("AU23", "lips", "tightened"),
    "lip_pressor": Action("AU24", "lips", "pressed"),
    "jaw_drop": Action("AU26", "jaw", "dropped"),
    "lid_droop": Action("AU41", "upper lids", "drooped"),
}
ACTION_NAMES: tuple[str, ...] = tuple(ACTIONS)

# Prototypical action strengths at the strongest intensity (level 3), in [0, 1].
EMOTION_ACTIONS: dict[str, dict[str, float]] = {
    "neutral": {},
    "angry": {"brow_lowerer": 1.0, "lid_tightener": 0.8, "lip_tightener": 0.7, "upper_lid_raiser": 0.5,
              "lip_pressor": 0.5, "chin_raiser": 0.3},
    "contempt": {"dimpler": 1.0, "upper_lip_raiser": 0.35, "lip_corner_puller": 0.3},
    "disgusted": {"nose_wrinkler": 1.0, "upper_lip_raiser": 0.9, "brow_lowerer": 0.45,
                  "lip_corner_depressor": 0.4, "chin_raiser": 0.4},
    "fear": {"upper_lid_raiser": 0.9, "lip_stretcher": 0.9, "inner_brow_raiser": 0.8, "outer_brow_raiser": 0.6,
             "brow_lowerer": 0.5, "jaw_drop": 0.4},
    "happy": {"lip_corner_puller": 1.0, "cheek_raiser": 0.8},
    "sad": {"inner_brow_raiser": 0.9, "lip_corner_depressor": 0.9, "brow_lowerer": 0.5, "chin_raiser": 0.4,
            "lid_droop": 0.4},
    "surprised": {"jaw_drop": 1.0, "inner_brow_raiser": 0.9, "outer_brow_raiser": 0.9, "upper_lid_raiser": 0.8},
    "calm": {"lid_droop": 0.5, "lip_corner_puller": 0.2},
}

# Intensity level -> multiplier of the prototype strengths (MEAD level_1..3; 0 = unknown -> as level 2).
INTENSITY_SCALE: dict[int, float] = {0: 0.7, 1: 0.4, 2: 0.7, 3: 1.0}

# Words that say how strong the emotion is, by intensity level.
INTENSITY_WORDS: dict[int, tuple[str, ...]] = {
    1: ("slightly", "mildly", "somewhat"),
    2: ("fairly", "moderately", "quite"),
    3: ("very", "extremely", "intensely"),
}

# Degree adverbs of an action, by strength: (upper bound, adverbs).
DEGREE_ADVERBS: tuple[tuple[float, tuple[str, ...]], ...] = (
    (0.3, ("slightly", "faintly")),
    (0.55, ("mildly", "moderately")),
    (0.8, ("clearly", "noticeably")),
    (float("inf"), ("strongly", "greatly")),
)
MIN_ACTION_STRENGTH = 0.1  # weaker actions are not mentioned

# Canonical adjective(s) per emotion used when writing instructions (first one is the default).
EMOTION_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "neutral": ("neutral",),
    "angry": ("angry", "furious"),
    "contempt": ("contemptuous", "scornful"),
    "disgusted": ("disgusted",),
    "fear": ("fearful", "scared", "frightened"),
    "happy": ("happy", "joyful", "cheerful"),
    "sad": ("sad", "sorrowful", "unhappy"),
    "surprised": ("surprised", "astonished"),
    "calm": ("calm", "serene"),
}

# Every word (or phrase) that names an emotion, mapped to its category; used by emotion_from_text.
EMOTION_SYNONYMS: dict[str, str] = {}
for _emo, _words in {
    "neutral": ("neutral", "neutrally", "expressionless", "emotionless", "impassive", "blank expression"),
    "angry": ("angry", "angrily", "anger", "furious", "furiously", "fury", "mad", "annoyed", "irritated",
              "enraged", "irate", "rage"),
    "contempt": ("contempt", "contemptuous", "contemptuously", "scornful", "scornfully", "scorn",
                 "disdainful", "disdainfully", "disdain", "sneering"),
    "disgusted": ("disgusted", "disgust", "disgusting", "revolted", "repulsed", "grossed out"),
    "fear": ("fear", "fearful", "fearfully", "scared", "afraid", "frightened", "terrified", "anxious",
             "nervous", "panicked"),
    "happy": ("happy", "happily", "happiness", "joyful", "joyfully", "joy", "cheerful", "cheerfully", "glad",
              "delighted", "pleased", "smiling"),
    "sad": ("sad", "sadly", "sadness", "sorrowful", "sorrow", "unhappy", "gloomy", "depressed", "upset",
            "miserable", "melancholy"),
    "surprised": ("surprised", "surprise", "surprising", "astonished", "amazed", "startled", "shocked",
                  "stunned"),
    "calm": ("calm", "calmly", "serene", "serenely", "peaceful", "peacefully", "tranquil", "composed"),
}.items():
    for _w in _words:
        EMOTION_SYNONYMS[_w] = _emo
del _emo, _words, _w

_SYNONYM_RE = re.compile(
    r"\b(" + "|".join(re.escape(w) for w in sorted(EMOTION_SYNONYMS, key=len, reverse=True)) + r")\b",
    re.IGNORECASE)

_PERSON = {
    "male": ("man", "male speaker", "gentleman"),
    "female": ("woman", "female speaker", "lady"),
    None: ("person", "speaker"),
}

# Sentence patterns: {a} article, {emo} "fairly happy", {person} "man", {actions} "lip corner ... and ...".
_PATTERNS_WITH_ACTIONS = (
    "{A} {emo} {person} speaks with {actions}.",
    "{The} {person} talks with a {emo} expression, with {actions}.",
    "{A} {person} speaking in a {emo} way, {actions}.",
    "{The} {person} looks {emo} while talking: {actions}.",
    "Speaking, the {emo} {person} has {actions}.",
)
_PATTERNS_NO_ACTIONS = (
    "{A} {emo} {person} speaks.",
    "{The} {person} talks with a {emo} expression.",
    "{A} {person} speaking in a {emo} way, with a still face.",
    "{The} {person} looks {emo} while talking.",
    "{A} {emo} {person} talks without any noticeable facial action.",
    "{The} {person} speaks with a {emo} face, brows and lips at rest.",
)


_ARTICLE_RE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def action_phrase(name: str, strength: float, rng: np.random.Generator | None = None) -> str:
    """"lip corner strongly pulled" for action ``name`` (a key of :data:`ACTIONS`) at ``strength`` in [0, 1]."""
    act = ACTIONS[name]
    return f"{act.part} {degree_adverb(strength, rng)} {act.verb}"


def degree_adverb(strength: float, rng: np.random.Generator | None = None) -> str:
    """Degree adverb for an action strength in [0, 1] (first synonym when ``rng`` is None)."""
    for upper, words in DEGREE_ADVERBS:
        if strength <= upper:
            return words[0] if rng is None else str(words[rng.integers(len(words))])
    raise AssertionError("unreachable")


def action_strengths(emotion: str, intensity: int) -> dict[str, float]:
    """Prototype action strengths (in [0, 1]) of ``emotion`` at MEAD ``intensity`` level (1..3, 0 = unknown)."""
    if emotion not in EMOTION_ACTIONS:
        raise ValueError(f"unknown emotion {emotion!r}; expected one of {EMOTIONS}")
    scale = INTENSITY_SCALE.get(int(intensity), INTENSITY_SCALE[0])
    return {k: v * scale for k, v in EMOTION_ACTIONS[emotion].items()}


def _emotion_phrase(emotion: str, intensity: int, rng: np.random.Generator) -> str:
    adjs = EMOTION_ADJECTIVES[emotion]
    adj = str(adjs[rng.integers(len(adjs))])
    if emotion == "neutral" or int(intensity) not in INTENSITY_WORDS:
        return adj
    words = INTENSITY_WORDS[int(intensity)]
    return f"{words[rng.integers(len(words))]} {adj}"


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def describe(emotion: str, intensity: int, gender: str | None, action_strengths: Mapping[str, float],
             rng: np.random.Generator, max_actions: int = 3) -> str:
    """Write one MeadText-style instruction.

    Args:
      emotion: one of ``schema.EMOTIONS``.
      intensity: MEAD level 1..3 ("slightly"/"fairly"/"very"); 0 = unknown (no intensity word).
      gender: 'male', 'female' or None (-> "person"/"speaker").
      action_strengths: action name (key of :data:`ACTIONS`) -> strength in [0, 1]; actions weaker than
        ``MIN_ACTION_STRENGTH`` are not mentioned. The strongest is always mentioned, up to ``max_actions``
        in all (a random subset of the rest), in decreasing strength; the degree adverb follows the strength.
      rng: numpy Generator choosing the sentence pattern and the synonyms.

    Returns:
      e.g. "A fairly happy man speaks with lip corner strongly pulled and cheek mildly raised."

    Raises:
      ValueError: unknown emotion, gender or action name.
    """
    if emotion not in EMOTION_ADJECTIVES:
        raise ValueError(f"unknown emotion {emotion!r}; expected one of {EMOTIONS}")
    if gender not in _PERSON:
        raise ValueError(f"gender must be 'male', 'female' or None, got {gender!r}")
    for k in action_strengths:
        if k not in ACTIONS:
            raise ValueError(f"unknown action {k!r}; expected one of {ACTION_NAMES}")
    active = sorted(((float(v), k) for k, v in action_strengths.items() if float(v) >= MIN_ACTION_STRENGTH),
                    reverse=True)
    chosen: list[tuple[float, str]] = []
    if active:
        chosen = [active[0]]
        rest = active[1:]
        n_more = min(len(rest), max_actions - 1)
        if n_more > 0:
            n_more = int(rng.integers(1, n_more + 1)) if len(rest) > 1 else 1
            pick = sorted(rng.choice(len(rest), size=n_more, replace=False).tolist())
            chosen += [rest[i] for i in pick]
    person = _PERSON[gender][rng.integers(len(_PERSON[gender]))]
    emo = _emotion_phrase(emotion, intensity, rng)
    if chosen:
        pattern = _PATTERNS_WITH_ACTIONS[rng.integers(len(_PATTERNS_WITH_ACTIONS))]
        actions = _join([action_phrase(k, v, rng) for v, k in chosen])
    else:
        pattern = _PATTERNS_NO_ACTIONS[rng.integers(len(_PATTERNS_NO_ACTIONS))]
        actions = ""
    text = pattern.format(A="A", The="The", emo=emo, person=person, actions=actions)
    # The article agrees with the word that follows it ("an extremely", "a fairly").
    return _ARTICLE_RE.sub(lambda m: m.group(1) + "n ", text)


def emotion_from_text(text: str) -> str | None:
    """The emotion category an instruction names (for the ``emotion_accuracy`` metric).

    Finds the first emotion word in ``text`` (whole words, case-insensitive; synonyms such as "scared",
    "joyful", "scornful" map to their category in ``schema.EMOTIONS``). Returns None if none is named.
    """
    m = _SYNONYM_RE.search(text or "")
    return None if m is None else EMOTION_SYNONYMS[m.group(1).lower()]


# Paraphrased task prompts for stage 1b (the LLM sees BOS + audio soft prompt + one of these).
INSTRUCTION_TEMPLATES: tuple[str, ...] = (
    "Describe the speaker's facial expression:",
    "What does the face of this speaker look like?",
    "Describe how the speaker's face moves while talking:",
    "Give a visual instruction for the talking face of this speech:",
    "What emotion and facial actions does the speaker show?",
    "Describe the talking style of the face behind this voice:",
    "How would this speaker's face look? Describe it:",
    "Write a description of the speaker's expression and facial movements:",
    "Based on the speech, describe the speaker's facial expression:",
    "Explain what the speaker's face is doing:",
)


def template(index: int) -> str:
    """The ``index``-th (mod ``len(INSTRUCTION_TEMPLATES)``) stage-1b task prompt."""
    return INSTRUCTION_TEMPLATES[int(index) % len(INSTRUCTION_TEMPLATES)]


def sample_template(rng: np.random.Generator) -> tuple[int, str]:
    """A uniformly random stage-1b task prompt: ``(index, text)``."""
    i = int(rng.integers(len(INSTRUCTION_TEMPLATES)))
    return i, INSTRUCTION_TEMPLATES[i]
