"""RAVDESS (+ EMOCA coefficients) -> clip records; the paper's evaluation subset is actors 1-6 (Sec. IV-A).

RAVDESS (Livingstone & Russo 2018, https://zenodo.org/record/1188976): ``Audio_Speech_Actors_01-24.zip``
(wav, 48 kHz) and ``Video_Speech_Actor_XX.zip`` (mp4, 29.97 fps). Files are named
``MM-VV-EE-II-SS-RR-AA.<ext>`` (:func:`parse_name`):

  MM modality   01 audio-video (mp4), 02 video-only, 03 audio-only (wav)
  VV vocal      01 speech, 02 song
  EE emotion    01 neutral, 02 calm, 03 happy, 04 sad, 05 angry, 06 fearful, 07 disgust, 08 surprised
  II intensity  01 normal, 02 strong (neutral: normal only)  -> stored intensity 1 / 2
  SS statement  01 "Kids are talking by the door", 02 "Dogs are sitting by the door"
  RR repetition 01 / 02
  AA actor      01..24 (odd: male, even: female)

Any folder layout under ``source`` works (files are found recursively, e.g. ``Actor_12/03-01-05-01-02-01-12.wav``).
Only speech (VV = 01) is used; song files are counted and ignored. The audio of a clip comes from its
audio-only wav (03) or, when absent, from the audio track of its audio-video mp4 (01).

**Clip id**: the audio-only file name without extension, e.g. ``03-01-05-01-02-01-12`` (whatever file the
audio came from). **EMOCA** output is looked up at ``<emoca>/<stem>/`` or ``<emoca>/Actor_AA/<stem>/`` for
the stems with modality 01, 02 or 03 (EMOCA runs on the 01/02 videos).

**Split** (:data:`DEFAULT_SPLIT`): test = actors 1-6 (the paper's evaluation subset), train = the others.

**Instructions**: RAVDESS has no instruction labels. With ``labels`` (a MeadText-style JSON/JSONL file keyed
by clip id, :func:`avi_jax.data.mead.load_labels`) clips without a label are refused; without it every clip
gets 3 *prototype* instructions written from its emotion/intensity/gender by
:func:`avi_jax.data.instructions.describe` (normal -> "fairly", strong -> "very"; seeded per clip) — reference
texts for evaluation, not human labels.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from avi_jax.data import builder, corpus, instructions, schema
from avi_jax.data.emoca import CoefficientOptions
from avi_jax.data.records import Refusal
from avi_jax.data.mead import load_labels
from avi_jax.errors import ConfigError, InputError

log = logging.getLogger(__name__)

EMOTION_CODES: dict[int, str] = {1: "neutral", 2: "calm", 3: "happy", 4: "sad", 5: "angry", 6: "fear",
                                 7: "disgusted", 8: "surprised"}
INTENSITY_WORD_LEVEL = {1: 2, 2: 3}   # RAVDESS intensity -> MEAD-style level used to write instructions
DEFAULT_SPLIT: dict[str, tuple[int, ...]] = {"test": (1, 2, 3, 4, 5, 6)}
INSTRUCTIONS_PER_CLIP = 3
_NAME_RE = re.compile(r"^(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})$")


@dataclasses.dataclass(frozen=True)
class RavdessName:
    """The seven fields of a RAVDESS file name (integers as written)."""
    modality: int
    vocal: int
    emotion_code: int
    intensity: int
    statement: int
    repetition: int
    actor: int

    @property
    def emotion(self) -> str:
        """The ``schema.EMOTIONS`` name ('fear' for fearful, 'disgusted' for disgust)."""
        return EMOTION_CODES[self.emotion_code]

    @property
    def gender(self) -> str:
        return "male" if self.actor % 2 == 1 else "female"

    def stem(self, modality: int | None = None) -> str:
        m = self.modality if modality is None else modality
        return "-".join(f"{v:02d}" for v in (m, self.vocal, self.emotion_code, self.intensity, self.statement,
                                              self.repetition, self.actor))

    @property
    def clip_id(self) -> str:
        """The audio-only (modality 03) stem, e.g. ``03-01-05-01-02-01-12``."""
        return self.stem(3)


def parse_name(name: str) -> RavdessName:
    """``03-01-05-01-02-01-12.wav`` (or the stem) -> :class:`RavdessName`.

    Raises:
      InputError: the name does not follow the convention or a field is out of range (modality 1-3, vocal
        1-2, emotion 1-8, intensity 1-2 (neutral: 1), statement 1-2, repetition 1-2, actor 1-24).
    """
    stem = os.path.splitext(os.path.basename(name))[0]
    m = _NAME_RE.match(stem)
    if not m:
        raise InputError(f"{name}: not a RAVDESS file name (MM-VV-EE-II-SS-RR-AA, e.g. 03-01-05-01-02-01-12.wav)")
    r = RavdessName(*(int(g) for g in m.groups()))
    checks = {"modality": r.modality in (1, 2, 3), "vocal channel": r.vocal in (1, 2),
              "emotion": r.emotion_code in EMOTION_CODES, "intensity": r.intensity in (1, 2),
              "statement": r.statement in (1, 2), "repetition": r.repetition in (1, 2),
              "actor": 1 <= r.actor <= 24}
    bad = [k for k, ok in checks.items() if not ok]
    if r.emotion_code == 1 and r.intensity != 1:
        bad.append("intensity (neutral has normal intensity only)")
    if bad:
        raise InputError(f"{name}: RAVDESS file name with out-of-range field(s): {', '.join(bad)}")
    return r


@dataclasses.dataclass(frozen=True)
class RavdessClip:
    """One RAVDESS speech clip: its parsed name (modality 03) and the file its audio is read from."""
    name: RavdessName
    audio_path: str

    @property
    def clip_id(self) -> str:
        return self.name.clip_id


def scan(source: str | os.PathLike) -> tuple[list[RavdessClip], list[Refusal], int]:
    """Find RAVDESS speech clips under ``source`` (recursively).

    Returns (clips sorted by actor, emotion, intensity, statement, repetition; refusals for wav/mp4 files
    with a malformed RAVDESS name; the number of song files ignored). Per clip the audio-only wav (03) is
    preferred over the audio-video mp4 (01); video-only files (02) carry no audio.

    Raises:
      InputError: ``source`` is not a folder or holds no RAVDESS speech audio; the same file name (clip
        and modality) found twice (both paths named), before anything is built.
    """
    source = os.fspath(source)
    if not os.path.isdir(source):
        raise InputError(f"{source}: RAVDESS folder does not exist")
    found: dict[str, dict[int, str]] = {}
    names: dict[str, RavdessName] = {}
    refusals: list[Refusal] = []
    songs = 0
    for dirpath, _, files in os.walk(source):
        for fname in files:
            stem, ext = os.path.splitext(fname)
            if ext.lower() not in (".wav", ".mp4"):
                continue
            path = os.path.join(dirpath, fname)
            try:
                r = parse_name(fname)
            except InputError as e:
                refusals.append(Refusal(stem, str(e).replace(fname, path, 1)))
                continue
            if r.vocal != 1:
                songs += 1
                continue
            if r.modality == 2:
                continue                      # video-only: no audio track
            paths = found.setdefault(r.clip_id, {})
            if r.modality in paths:
                raise InputError(f"{path}: duplicate RAVDESS clip {r.clip_id} (also {paths[r.modality]}); "
                                 "keep one copy of each file under the source folder")
            paths[r.modality] = path
            names[r.clip_id] = dataclasses.replace(r, modality=3)
    clips = [RavdessClip(names[c], paths.get(3) or paths[1]) for c, paths in found.items()]
    if not clips and not refusals:
        raise InputError(f"{source}: no RAVDESS speech audio found (files like Actor_01/03-01-01-01-01-01-01.wav)")
    clips.sort(key=lambda c: (c.name.actor, c.name.emotion_code, c.name.intensity, c.name.statement,
                              c.name.repetition))
    return clips, refusals, songs


def split_of(actor: int, split: Mapping[str, Sequence[int]] = DEFAULT_SPLIT) -> str:
    """'test' / 'validation' when ``actor`` is listed there in ``split``, else 'train'."""
    for name in ("test", "validation"):
        if int(actor) in {int(a) for a in split.get(name, ())}:
            return name
    return "train"


def emoca_folder(emoca_root: str, name: RavdessName) -> str | None:
    """The EMOCA output folder of a clip (module docstring), or None."""
    for modality in (1, 2, 3):
        stem = name.stem(modality)
        for cand in (os.path.join(emoca_root, stem), os.path.join(emoca_root, f"Actor_{name.actor:02d}", stem)):
            if os.path.isdir(cand):
                return cand
    return None


def prototype_instructions(name: RavdessName, n: int = INSTRUCTIONS_PER_CLIP) -> list[str]:
    """``n`` MeadText-style reference instructions from the clip's emotion, intensity and gender (seeded
    by the clip id, so preparation is deterministic)."""
    level = INTENSITY_WORD_LEVEL[name.intensity]
    seed = [name.vocal, name.emotion_code, name.intensity, name.statement, name.repetition, name.actor]
    rng = np.random.default_rng(seed)
    strengths = instructions.action_strengths(name.emotion, level)
    out: list[str] = []
    for _ in range(n * 4):
        t = instructions.describe(name.emotion, level, name.gender, strengths, rng)
        if t not in out:
            out.append(t)
        if len(out) == n:
            break
    return out


def make_record(clip: RavdessClip, labels: Mapping[str, list[str]] | None, labels_path: str | None,
                emoca_root: str | None, options: CoefficientOptions = CoefficientOptions()
                ) -> dict | Refusal:
    """One clip -> a validated record or a Refusal naming the file."""
    cid = clip.clip_id
    if labels is not None:
        texts = labels.get(cid)
        if not texts:
            return Refusal(cid, f"{clip.audio_path}: no instruction for clip id {cid} in {labels_path}")
    else:
        texts = prototype_instructions(clip.name)
    folder = emoca_folder(emoca_root, clip.name) if emoca_root else None
    if emoca_root and folder is None:
        return Refusal(cid, f"no EMOCA output for {clip.audio_path} under {emoca_root} "
                                    f"(looked for {clip.name.stem(1)}/, {clip.name.stem(2)}/, {cid}/)")
    return corpus.clip_record(cid, clip.audio_path, {
        "speaker": f"Actor_{clip.name.actor:02d}", "emotion": clip.name.emotion,
        "intensity": clip.name.intensity, "instructions": texts}, folder, options)


def ravdess_source(source: str | os.PathLike, emoca_root: str | os.PathLike | None = None, *,
                   labels: str | os.PathLike | None = None, split: Mapping[str, Sequence[int]] = DEFAULT_SPLIT,
                   options: CoefficientOptions = CoefficientOptions(), workers: int = 1
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ClipDataset source of a RAVDESS tree: ``({split: lazy records/refusals}, info)``.

    Raises:
      InputError: missing folders, a bad label file, no RAVDESS speech audio.
      ConfigError: a split with unknown names or an actor in two splits.
    """
    source = os.fspath(source)
    bad = [k for k in split if k not in builder.SPLITS]
    if bad:
        raise ConfigError(f"unknown split(s) {bad}; expected keys among {builder.SPLITS}")
    seen: dict[int, str] = {}
    for k, actors in split.items():
        for a in actors:
            if int(a) in seen and seen[int(a)] != k:
                raise ConfigError(f"actor {a} is in both '{seen[int(a)]}' and '{k}'")
            seen[int(a)] = k
    labels_path = os.fspath(labels) if labels else None
    label_map = load_labels(labels_path) if labels_path else None
    emoca_root = os.fspath(emoca_root) if emoca_root else None
    if emoca_root and not os.path.isdir(emoca_root):
        raise InputError(f"{emoca_root}: EMOCA output folder does not exist")
    clips, name_refusals, songs = scan(source)
    by_split: dict[str, list[RavdessClip]] = {}
    for c in clips:
        by_split.setdefault(split_of(c.name.actor, split), []).append(c)

    def fn(c: RavdessClip):
        return make_record(c, label_map, labels_path, emoca_root, options)

    out: dict[str, Any] = {}
    for s in builder.SPLITS:
        items = by_split.get(s, [])
        stream = corpus.SizedStream(items, fn, workers)
        if s == "train" and name_refusals:
            out[s] = corpus.SizedChain(name_refusals, stream)
        elif items:
            out[s] = stream
    info = {
        "kind": "ravdess", "source": os.path.abspath(source),
        "labels": os.path.abspath(labels_path) if labels_path else None,
        "instructions": "labels" if labels_path else "prototype",
        "emoca": os.path.abspath(emoca_root) if emoca_root else None,
        "split": {k: [int(a) for a in v] for k, v in split.items()},
        "actors": {s: sorted({c.name.actor for c in v}) for s, v in by_split.items()},
        "song_files_ignored": songs, "options": dataclasses.asdict(options),
    }
    info["fingerprint"] = corpus.fingerprint(
        {k: v for k, v in info.items() if k != "actors"}, [c.clip_id for c in clips],
        files=[c.audio_path for c in clips] + ([labels_path] if labels_path else []), root=source)
    return out, info


def prepare_ravdess(source: str | os.PathLike, data_dir: str | os.PathLike,
                    emoca_root: str | os.PathLike | None = None, *, labels: str | os.PathLike | None = None,
                    split: Mapping[str, Sequence[int]] = DEFAULT_SPLIT,
                    options: CoefficientOptions = CoefficientOptions(fps=schema.FPS), strict: bool = False,
                    workers: int = 1, progress: bool = False, force: bool = False) -> builder.PrepareResult:
    """Prepare RAVDESS speech (+ EMOCA) as ArrayRecord (ClipDataset config ``ravdess-<fingerprint>``).

    Idempotent like :func:`avi_jax.data.mead.prepare_mead`. Returns a :class:`builder.PrepareResult`.

    Raises:
      InputError: bad folders/label file; with ``strict``, any refused clip.
      ConfigError: a bad split.
    """
    src, info = ravdess_source(source, emoca_root, labels=labels, split=split, options=options, workers=workers)
    if info["song_files_ignored"]:
        log.info("ignored %d RAVDESS song files (vocal channel 02)", info["song_files_ignored"])
    name = f"ravdess-{info['fingerprint']}"
    return builder.prepare_dataset(src, data_dir, name, description=f"RAVDESS speech from {info['source']}",
                                   metadata=info, strict=strict, progress=progress, force=force)
