"""MEAD with MeadText instruction labels and EMOCA coefficients -> clip records (paper Sec. III-A, IV-A).

MEAD (Wang et al., ECCV 2020; https://wywu.github.io/projects/MEAD/MEAD.html) after extracting each
speaker's ``audio.tar`` (and ``video.tar``)::

    <source>/<speaker>/audio/<emotion>/level_<k>/<nnn>.m4a          e.g. M003/audio/angry/level_1/001.m4a
    <source>/<speaker>/video/front/<emotion>/level_<k>/<nnn>.mp4    (EMOCA's input; not read here)

8 emotions (``schema.MEAD_EMOTIONS``: neutral, angry, contempt, disgusted, fear, happy, sad, surprised)
x 3 levels (neutral has level_1 only). Audio is AAC in m4a, decoded with PyAV, downmixed to mono and
resampled to 16 kHz (:func:`avi_jax.data.audio.load_audio`).

**Clip id** (:func:`clip_id`): ``<speaker>_<emotion>_level_<k>_<nnn>``, e.g. ``M003_angry_level_1_001``.
Instruction labels are joined on it; the label file may also write ids as the relative path
``M003/angry/level_1/001`` (with or without ``.m4a``/``.mp4``), see :func:`normalize_clip_id`.

**Labels** (:func:`load_labels`): MeadText-style JSON or JSONL. JSONL: one object per line with
``clip_id`` (or ``id``) and ``instruction`` (str) or ``instructions`` (list of str). JSON: such a list, or
an object ``{clip_id: str | [str, ...] | {"instructions": [...]}}``. Several entries of one clip are merged.

**EMOCA** (:mod:`avi_jax.data.emoca`): the output of one clip is looked up at
``<emoca>/<clip id>/`` or ``<emoca>/<speaker>/<emotion>/level_<k>/<nnn>/`` or
``<emoca>/<speaker>/video/front/<emotion>/level_<k>/<nnn>/`` (each holding ``<model>/<frame>_000/`` or
``results/<model>/<frame>_000/``). Without ``emoca`` the records carry no coefficients (stage 1 needs only
audio and instructions); with it, a clip without EMOCA output is refused.

**Split** (speaker-disjoint, :data:`DEFAULT_SPLIT`): validation = M007, W011; test = M003, M030, W009, W015;
train = every other speaker found. Pass ``split={"validation": [...], "test": [...]}`` to change it.

Refused clips (a :class:`avi_jax.data.records.Refusal` naming the file): unreadable/truncated/empty audio,
no instruction label, missing/NaN/too-incomplete EMOCA output (see :mod:`avi_jax.data.emoca`), unknown
emotion folders.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Mapping, Sequence

from avi_jax.data import builder, corpus, schema
from avi_jax.data.emoca import CoefficientOptions
from avi_jax.data.records import Refusal
from avi_jax.errors import ConfigError, InputError

log = logging.getLogger(__name__)

DEFAULT_SPLIT: dict[str, tuple[str, ...]] = {
    "validation": ("M007", "W011"),
    "test": ("M003", "M030", "W009", "W015"),
}
LEVELS = (1, 2, 3)
AUDIO_EXTENSIONS = (".m4a", ".mp4", ".aac", ".wav", ".flac")
_SPEAKER_RE = re.compile(r"^[MW]\d{3}$")
_LEVEL_RE = re.compile(r"^level_(\d+)$")
_INDEX_RE = re.compile(r"^(\d+)$")


@dataclasses.dataclass(frozen=True)
class MeadClip:
    """One MEAD clip found on disk: speaker ('M003'), emotion (MEAD name), level (1..3), index (1-based
    sentence number), audio path."""
    speaker: str
    emotion: str
    level: int
    index: int
    audio_path: str

    @property
    def clip_id(self) -> str:
        return clip_id(self.speaker, self.emotion, self.level, self.index)

    @property
    def gender(self) -> str:
        return "male" if self.speaker.startswith("M") else "female"


def clip_id(speaker: str, emotion: str, level: int, index: int) -> str:
    """``M003_angry_level_1_001``: the id MEAD clips (and their labels) are known by."""
    return f"{speaker}_{emotion}_level_{int(level)}_{int(index):03d}"


def normalize_clip_id(key: str) -> str:
    """A label file's clip key -> :func:`clip_id` form.

    Accepts ``M003_angry_level_1_001``, ``M003/angry/level_1/001``, ``M003/audio/angry/level_1/001.m4a``,
    ``M003/video/front/angry/level_1/001.mp4`` (extensions and the ``audio``/``video/front`` parts dropped).
    Other keys are returned stripped.
    """
    k = str(key).strip().replace("\\", "/")
    root, ext = os.path.splitext(k)
    if ext.lower() in (".m4a", ".mp4", ".wav", ".flac", ".aac"):
        k = root
    parts = [p for p in k.split("/") if p]
    if len(parts) >= 4:
        parts = [p for p in parts if p not in ("audio", "video", "front")]
        if len(parts) == 4 and _LEVEL_RE.match(parts[2]) and parts[3].isdigit():
            return clip_id(parts[0], parts[1], int(_LEVEL_RE.match(parts[2]).group(1)), int(parts[3]))
    return "_".join(parts)


def load_labels(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a MeadText-style label file (JSON or JSONL, see the module docstring) -> {clip id: [texts]}.

    Raises:
      InputError: naming the file (and line) for a missing file, invalid JSON, an entry without a clip id
        or with instructions that are not strings.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: instruction label file does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    out: dict[str, list[str]] = {}

    def add(key: Any, value: Any, where: str) -> None:
        if not isinstance(key, str) or not key.strip():
            raise InputError(f"{where}: entry without a clip id")
        if isinstance(value, Mapping):
            value = value.get("instructions", value.get("instruction", value.get("text")))
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InputError(f"{where}: instructions of {key!r} must be a string or a list of strings")
        texts = [v.strip() for v in value if v.strip()]
        out.setdefault(normalize_clip_id(key), []).extend(texts)

    def add_entry(entry: Any, where: str) -> None:
        if not isinstance(entry, Mapping):
            raise InputError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        key = entry.get("clip_id", entry.get("id"))
        value = entry.get("instructions", entry.get("instruction", entry.get("text")))
        if value is None:
            raise InputError(f"{where}: needs 'instruction' (str) or 'instructions' (list of str)")
        add(key, value, where)

    stripped = text.lstrip()
    if path.lower().endswith(".jsonl") or not stripped.startswith(("[", "{")) or _looks_like_jsonl(stripped):
        for lineno, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e})") from e
            add_entry(entry, f"{path}:{lineno}")
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from e
        if isinstance(data, list):
            for i, entry in enumerate(data):
                add_entry(entry, f"{path}[{i}]")
        elif isinstance(data, Mapping):
            for key, value in data.items():
                add(key, value, f"{path}[{key!r}]")
        else:
            raise InputError(f"{path}: expected a JSON list or object, got {type(data).__name__}")
    return out


def _looks_like_jsonl(text: str) -> bool:
    """True when the first line is a complete JSON object and more non-empty lines follow."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        return False
    try:
        return isinstance(json.loads(lines[0]), dict)
    except json.JSONDecodeError:
        return False


def scan(source: str | os.PathLike) -> tuple[list[MeadClip], list[Refusal]]:
    """Find MEAD clips under ``source`` (``<speaker>/audio/<emotion>/level_<k>/<nnn>.<ext>``).

    Returns clips sorted by (speaker, emotion order of ``schema.MEAD_EMOTIONS``, level, index) and
    refusals for audio files in unknown emotion/level folders. Non-audio files are ignored.

    Raises:
      InputError: ``source`` is not a folder or holds no MEAD speaker folder with audio; two audio files of
        one clip (e.g. ``001.m4a`` and ``001.wav``; both paths named), before anything is built.
    """
    source = os.fspath(source)
    if not os.path.isdir(source):
        raise InputError(f"{source}: MEAD folder does not exist")
    clips: list[MeadClip] = []
    refusals: list[Refusal] = []
    speakers = sorted(d for d in os.listdir(source)
                      if _SPEAKER_RE.match(d) and os.path.isdir(os.path.join(source, d, "audio")))
    for spk in speakers:
        audio_root = os.path.join(source, spk, "audio")
        for dirpath, _, files in os.walk(audio_root):
            rel = os.path.relpath(dirpath, audio_root).replace(os.sep, "/").split("/")
            for name in files:
                stem, ext = os.path.splitext(name)
                if ext.lower() not in AUDIO_EXTENSIONS:
                    continue
                path = os.path.join(dirpath, name)
                m_level = _LEVEL_RE.match(rel[1]) if len(rel) == 2 else None
                if (len(rel) != 2 or rel[0] not in schema.MEAD_EMOTIONS or not m_level
                        or int(m_level.group(1)) not in LEVELS or not _INDEX_RE.match(stem)):
                    refusals.append(Refusal(
                        f"{spk}/{'/'.join(rel)}/{stem}",
                        f"{path}: not in MEAD's layout <speaker>/audio/<emotion>/level_<1..3>/<nnn>{ext} "
                        f"with emotion in {schema.MEAD_EMOTIONS}"))
                    continue
                clips.append(MeadClip(spk, rel[0], int(m_level.group(1)), int(stem), path))
    if not clips and not refusals:
        raise InputError(f"{source}: no MEAD audio found (expected <speaker>/audio/<emotion>/level_<k>/<nnn>.m4a "
                         "with speaker ids like M003, W009)")
    clips.sort(key=lambda c: (c.speaker, schema.MEAD_EMOTIONS.index(c.emotion), c.level, c.index))
    seen: dict[str, str] = {}
    for c in clips:
        if c.clip_id in seen:
            raise InputError(f"{c.audio_path}: duplicate MEAD clip {c.clip_id} (also {seen[c.clip_id]}); keep one "
                             "audio file per clip")
        seen[c.clip_id] = c.audio_path
    return clips, refusals


def split_of(speaker: str, split: Mapping[str, Sequence[str]] = DEFAULT_SPLIT) -> str:
    """'validation' / 'test' when ``speaker`` is listed there in ``split``, else 'train' (a 'train' list,
    if given, is informational: every speaker not held out trains)."""
    for name in ("validation", "test"):
        if speaker in tuple(split.get(name, ())):
            return name
    return "train"


def _check_split(split: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    bad = [k for k in split if k not in builder.SPLITS]
    if bad:
        raise ConfigError(f"unknown split(s) {bad}; expected keys among {builder.SPLITS}")
    out = {k: tuple(str(s) for s in v) for k, v in split.items()}
    seen: dict[str, str] = {}
    for k, v in out.items():
        for s in v:
            if s in seen and seen[s] != k:
                raise ConfigError(f"speaker {s} is in both '{seen[s]}' and '{k}': splits must be speaker-disjoint")
            seen[s] = k
    return out


def emoca_folder(emoca_root: str, clip: MeadClip) -> str | None:
    """The EMOCA output folder of ``clip`` under ``emoca_root`` (see the module docstring), or None."""
    lvl = f"level_{clip.level}"
    idx = f"{clip.index:03d}"
    for cand in (os.path.join(emoca_root, clip.clip_id),
                 os.path.join(emoca_root, clip.speaker, clip.emotion, lvl, idx),
                 os.path.join(emoca_root, clip.speaker, "video", "front", clip.emotion, lvl, idx)):
        if os.path.isdir(cand):
            return cand
    return None


def make_record(clip: MeadClip, labels: Mapping[str, list[str]], labels_path: str, emoca_root: str | None,
                options: CoefficientOptions = CoefficientOptions()) -> dict | Refusal:
    """One clip -> a validated record (:func:`avi_jax.data.records.validate_record`) or a Refusal naming
    the file."""
    cid = clip.clip_id
    texts = labels.get(cid)
    if not texts:
        return Refusal(cid, f"{clip.audio_path}: no instruction for clip id {cid} in {labels_path}")
    folder = emoca_folder(emoca_root, clip) if emoca_root else None
    if emoca_root and folder is None:
        return Refusal(cid, f"no EMOCA output for {clip.audio_path} under {emoca_root} "
                                    f"(looked for {cid}/ and {clip.speaker}/{clip.emotion}/"
                                    f"level_{clip.level}/{clip.index:03d}/)")
    return corpus.clip_record(cid, clip.audio_path, {"speaker": clip.speaker, "emotion": clip.emotion,
                                                      "intensity": clip.level, "instructions": texts},
                               folder, options)


def mead_source(source: str | os.PathLike, labels: str | os.PathLike, emoca_root: str | os.PathLike | None = None,
                *, split: Mapping[str, Sequence[str]] = DEFAULT_SPLIT,
                options: CoefficientOptions = CoefficientOptions(), workers: int = 1
                ) -> tuple[dict[str, corpus.SizedStream | list], dict[str, Any]]:
    """The ClipDataset source of a MEAD tree: ``({split: lazy records/refusals}, info)``.

    ``info`` holds the fingerprint inputs (clips per split, speakers per split, the label file, options).
    Records are decoded lazily by ``workers`` threads while the dataset is written. Layout refusals
    (unknown emotion/level folders) come first in the train split.

    Raises:
      InputError: missing folders or label file, an unreadable label file, no MEAD audio.
      ConfigError: a split that is not speaker-disjoint.
    """
    source, labels = os.fspath(source), os.fspath(labels)
    split = _check_split(split)
    label_map = load_labels(labels)
    emoca_root = os.fspath(emoca_root) if emoca_root else None
    if emoca_root and not os.path.isdir(emoca_root):
        raise InputError(f"{emoca_root}: EMOCA output folder does not exist")
    clips, layout_refusals = scan(source)
    by_split: dict[str, list[MeadClip]] = {}
    for c in clips:
        by_split.setdefault(split_of(c.speaker, split), []).append(c)

    def fn(c: MeadClip):
        return make_record(c, label_map, labels, emoca_root, options)

    out: dict[str, Any] = {}
    for s in builder.SPLITS:
        items = by_split.get(s, [])
        if s == "train" and layout_refusals:
            out[s] = corpus.SizedChain(layout_refusals, corpus.SizedStream(items, fn, workers))
        elif items:
            out[s] = corpus.SizedStream(items, fn, workers)
    info = {
        "kind": "meadtext", "source": os.path.abspath(source), "labels": os.path.abspath(labels),
        "emoca": os.path.abspath(emoca_root) if emoca_root else None,
        "split": {k: list(v) for k, v in split.items()},
        "speakers": {s: sorted({c.speaker for c in v}) for s, v in by_split.items()},
        "options": dataclasses.asdict(options),
    }
    info["fingerprint"] = corpus.fingerprint(
        {k: v for k, v in info.items() if k != "speakers"}, [c.clip_id for c in clips],
        files=[c.audio_path for c in clips] + [labels], root=source)
    return out, info


def prepare_mead(source: str | os.PathLike, labels: str | os.PathLike, data_dir: str | os.PathLike,
                 emoca_root: str | os.PathLike | None = None, *,
                 split: Mapping[str, Sequence[str]] = DEFAULT_SPLIT,
                 options: CoefficientOptions = CoefficientOptions(), strict: bool = False, workers: int = 1,
                 progress: bool = False, force: bool = False) -> builder.PrepareResult:
    """Prepare MEAD/MeadText (+ EMOCA) as ArrayRecord (ClipDataset config ``meadtext-<fingerprint>``).

    Idempotent: the same audio files (paths, sizes, modification times), label file, split and options
    reuse the prepared dataset (changes inside the EMOCA folder are not detected: pass ``force``).
    Returns a :class:`builder.PrepareResult` (path, clips and audio seconds per split, refusals).

    Raises:
      InputError: bad folders/label file; with ``strict``, any refused clip.
      ConfigError: a split that is not speaker-disjoint.
    """
    src, info = mead_source(source, labels, emoca_root, split=split, options=options, workers=workers)
    name = f"meadtext-{info['fingerprint']}"
    return builder.prepare_dataset(src, data_dir, name, description=f"MEAD/MeadText from {info['source']}",
                                   metadata=info, strict=strict, progress=progress, force=force)
