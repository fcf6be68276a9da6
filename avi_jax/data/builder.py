"""One tfds builder for every clip dataset (demo corpus, JSONL manifests, MEAD/MeadText, RAVDESS).

:class:`ClipDataset` writes ArrayRecord files whose examples follow :func:`schema.features`; the examples
come from a *source*: a mapping ``split -> records`` where each value is an iterable of record dicts or a
zero-argument callable returning one (lazy). Every record is validated by :func:`validate_record` (shapes,
finite values, coefficient frame count vs audio length) before it is written; a bad record raises
:class:`InputError` naming the clip, and tfds' write-to-``*.incomplete*``-then-rename leaves nothing
complete-looking behind.

Refusals: a source for real data (MEAD, RAVDESS) may yield a :class:`Refusal` (clip id + reason naming the
file at fault) in place of a record it cannot use. Refusals are collected and reported
(:class:`PrepareResult`, ``avi_meta.json``) while the rest of the dataset is written; with ``strict=True``
any refusal fails the build instead (after the split it occurs in, listing all of that split's refusals).

Datasets live at ``data_dir/clip_dataset/<config name>/<version>``; the config name encodes what was
prepared (``demo-seed0-spk12-2.0s``, ``manifest-<stem>-<hash>``) so preparing again with the same
parameters reuses the existing files. Read them back with :func:`open_split` (random access, for grain).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import operator
import os
import shutil
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from avi_jax.data import emoca, schema
from avi_jax.data.audio import load_audio
from avi_jax.errors import InputError

log = logging.getLogger(__name__)

VERSION = "1.0.0"
SPLITS = ("train", "validation", "test")
FRAME_TOLERANCE = 2        # coefficient frames that may be trimmed/padded to match the audio length

Source = Mapping[str, "Iterable[dict | Refusal] | Callable[[], Iterable[dict | Refusal]]"]


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A clip a source cannot use: its id and why (the reason names the file at fault).

    Yielded by a source in place of a record; :class:`ClipDataset` collects it (``split`` is filled in by
    the builder) instead of aborting the build, unless ``strict``.
    """
    clip_id: str
    reason: str
    split: str = ""

    def __str__(self) -> str:
        return f"{self.clip_id}: {self.reason}"


@dataclasses.dataclass
class PrepareResult:
    """What :func:`prepare_dataset` produced.

    path: the dataset directory (for :func:`open_split`); clips: split -> records written; audio_seconds:
    split -> seconds of 16 kHz audio written; refusals: every refused clip with its reason; reused: True
    when an already prepared dataset was returned (its report is read back from ``avi_meta.json``).
    """
    path: str
    clips: dict[str, int]
    audio_seconds: dict[str, float]
    refusals: list[Refusal]
    reused: bool = False

    @property
    def total_clips(self) -> int:
        return int(sum(self.clips.values()))

    @property
    def hours(self) -> float:
        """Hours of audio written over all splits."""
        return float(sum(self.audio_seconds.values())) / 3600.0

    def summary(self) -> str:
        """A human-readable summary: clips and hours per split, then every refusal with its reason."""
        lines = [f"dataset: {self.path}" + (" (already prepared; reused)" if self.reused else "")]
        for split in sorted(self.clips, key=lambda x: SPLITS.index(x) if x in SPLITS else len(SPLITS)):
            lines.append(f"  {split:<10} {self.clips[split]:>7} clips  {self.audio_seconds.get(split, 0.0) / 3600:8.3f} h")
        lines.append(f"  {'total':<10} {self.total_clips:>7} clips  {self.hours:8.3f} h")
        lines.append(f"refused clips: {len(self.refusals)}")
        for r in self.refusals:
            lines.append(f"  [{r.split}] {r.clip_id}: {r.reason}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"clips": dict(self.clips), "audio_seconds": dict(self.audio_seconds),
                "refused": [dataclasses.asdict(r) for r in self.refusals]}


def _as_array(rec: dict, key: str, clip: str, shape_tail: tuple[int, ...] | None) -> np.ndarray | None:
    v = rec.get(key)
    if v is None:
        return None
    try:
        a = np.asarray(v, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InputError(f"{clip}: '{key}' is not a numeric array ({e})") from e
    if shape_tail is not None and (a.ndim != 1 + len(shape_tail) or a.shape[1:] != shape_tail):
        want = "(T, " + ", ".join(map(str, shape_tail)) + ")" if shape_tail else "(N,)"
        raise InputError(f"{clip}: '{key}' has shape {a.shape}, expected {want}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{clip}: '{key}' holds NaN or infinite values")
    return a


def _fit_frames(a: np.ndarray, t: int, key: str, clip: str) -> np.ndarray:
    """Trim or edge-pad ``a`` (T', D) to ``t`` frames when |T' - t| <= FRAME_TOLERANCE, else InputError."""
    if a.shape[0] == t:
        return a
    if abs(a.shape[0] - t) > FRAME_TOLERANCE:
        raise InputError(
            f"{clip}: '{key}' has {a.shape[0]} frames but the audio has {t} frames at {schema.FPS} fps "
            f"(round(samples / {schema.SAMPLES_PER_FRAME})); at most {FRAME_TOLERANCE} frames of mismatch "
            "are trimmed/padded")
    if a.shape[0] > t:
        return a[:t]
    if a.shape[0] == 0:
        return np.zeros((t, a.shape[1]), np.float32)
    return np.concatenate([a, np.repeat(a[-1:], t - a.shape[0], axis=0)], axis=0)


def validate_record(rec: Mapping[str, Any]) -> dict:
    """Validate one clip record and return it encoded for :func:`schema.features`.

    Input keys: ``clip_id`` (str, required), ``audio`` (float (N,) in [-1, 1] at 16 kHz, or int16 PCM;
    required, N > 0), ``instructions`` (list[str]) or ``instruction`` (str), optional ``speaker`` (str),
    ``emotion`` (name in ``schema.EMOTIONS``, id, or None/'' -> -1 unknown), ``intensity`` (0..3; 0 =
    unknown), ``expression`` (T, 50) and ``jaw_pose`` (T, 3) float (both or neither), ``global_pose`` (T, 3),
    ``shape`` (100,), ``has_coefficients`` (False: coefficient arrays are ignored). Extra keys (``split``,
    ``gender``...) are ignored. Validating an already-validated record returns it unchanged.

    Coefficients must have T == round(N / 640) frames; up to ``FRAME_TOLERANCE`` frames of mismatch are
    trimmed/padded (edge values), more raises.

    Raises:
      InputError: naming the clip, for missing/empty/non-finite audio, wrong shapes, NaN/inf coefficients,
        a frame-count mismatch, unknown emotion, bad intensity or empty instructions.
    """
    clip = str(rec.get("clip_id") or "")
    if not clip:
        raise InputError(f"record without a clip_id (keys: {sorted(rec)})")
    audio = rec.get("audio")
    if audio is None:
        raise InputError(f"{clip}: record has no audio")
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise InputError(f"{clip}: audio must be mono (N,), got shape {audio.shape}")
    if audio.size == 0:
        raise InputError(f"{clip}: audio is empty")
    if audio.dtype == np.int16:
        pcm = audio
    else:
        if not np.issubdtype(audio.dtype, np.floating):
            raise InputError(f"{clip}: audio must be float in [-1, 1] or int16 PCM, got dtype {audio.dtype}")
        if not np.all(np.isfinite(audio)):
            raise InputError(f"{clip}: audio holds NaN or infinite samples")
        pcm = schema.pcm16(audio)
    n = pcm.size
    t = int(round(n / schema.SAMPLES_PER_FRAME))

    texts = rec.get("instructions")
    if texts is None:
        texts = [rec["instruction"]] if rec.get("instruction") is not None else []
    if isinstance(texts, str):
        texts = [texts]
    texts = [str(x) for x in texts]
    if not texts or any(not x.strip() for x in texts):
        raise InputError(f"{clip}: needs at least one non-empty instruction")

    emotion = rec.get("emotion")
    if emotion is None or emotion == "":
        emo_id = -1
    elif isinstance(emotion, str):
        if emotion.lower() not in schema.EMOTIONS:
            raise InputError(f"{clip}: unknown emotion {emotion!r}; expected one of {schema.EMOTIONS}")
        emo_id = schema.EMOTIONS.index(emotion.lower())
    else:
        emo_id = int(emotion)
        if not -1 <= emo_id < len(schema.EMOTIONS):
            raise InputError(f"{clip}: emotion id {emo_id} out of range")
    try:
        intensity = int(rec.get("intensity") or 0)
    except (TypeError, ValueError) as e:
        raise InputError(f"{clip}: intensity must be an integer 0..3, got {rec.get('intensity')!r}") from e
    if not 0 <= intensity <= 3:
        raise InputError(f"{clip}: intensity must be 0 (unknown) or 1..3, got {intensity}")

    if rec.get("has_coefficients") is not None and not bool(rec["has_coefficients"]):
        expression = jaw = gpose = None       # an already-encoded record without coefficients
    else:
        expression = _as_array(rec, "expression", clip, (schema.N_EXPRESSION,))
        jaw = _as_array(rec, "jaw_pose", clip, (schema.N_JAW,))
        gpose = _as_array(rec, "global_pose", clip, (3,))
    shape = _as_array(rec, "shape", clip, None)
    if shape is not None and shape.shape != (schema.N_SHAPE,):
        raise InputError(f"{clip}: 'shape' has shape {shape.shape}, expected ({schema.N_SHAPE},)")
    if (expression is None) != (jaw is None):
        raise InputError(f"{clip}: give both 'expression' and 'jaw_pose' coefficients, or neither")
    has_coeff = expression is not None
    if has_coeff:
        expression = _fit_frames(expression, t, "expression", clip)
        jaw = _fit_frames(jaw, t, "jaw_pose", clip)
        gpose = np.zeros((t, 3), np.float32) if gpose is None else _fit_frames(gpose, t, "global_pose", clip)
    else:
        expression = np.zeros((0, schema.N_EXPRESSION), np.float32)
        jaw = np.zeros((0, schema.N_JAW), np.float32)
        gpose = np.zeros((0, 3), np.float32)
    return {
        "clip_id": clip,
        "speaker": str(rec.get("speaker") or ""),
        "audio": pcm,
        "emotion": emo_id,
        "intensity": np.int32(intensity),
        "instructions": texts,
        "has_coefficients": bool(has_coeff),
        "expression": expression.astype(np.float32),
        "jaw_pose": jaw.astype(np.float32),
        "global_pose": gpose.astype(np.float32),
        "shape": (np.zeros(schema.N_SHAPE, np.float32) if shape is None else shape).astype(np.float32),
    }


def clip_record(clip_id: str, audio_path: str, fields: Mapping[str, Any], emoca_folder: str | None = None,
                options: emoca.CoefficientOptions = emoca.CoefficientOptions()) -> dict | Refusal:
    """One clip of a corpus (MEAD, RAVDESS) -> a validated record, or a Refusal naming the bad file.

    Reads ``audio_path`` (any format/rate, -> 16 kHz mono), adds ``fields`` (speaker, emotion, intensity,
    instructions) and, from ``emoca_folder`` when given, the clip's FLAME coefficients aligned to the audio
    (:func:`emoca.load_emoca_clip` with ``options``).
    """
    try:
        audio = load_audio(audio_path)
        rec: dict[str, Any] = {"clip_id": clip_id, "audio": audio, **fields}
        if emoca_folder is not None:
            coeff = emoca.load_emoca_clip(emoca_folder, audio.shape[0], model_name=options.model_name,
                                          fps=options.fps, max_missing=options.max_missing,
                                          frame_tolerance=options.frame_tolerance, smooth=options.smooth_pose)
            rec.update(coeff.as_record_fields())
        return validate_record(rec)
    except InputError as e:
        return Refusal(clip_id, str(e))


class ClipDataset(tfds.core.GeneratorBasedBuilder):
    """tfds builder of clip records (:func:`schema.features`) from a ``split -> records`` source.

    Args (besides tfds' ``data_dir``, ``config``, ``file_format``):
      source: mapping split -> iterable of record dicts (or a zero-arg callable returning one); only needed
        to prepare. Every record goes through :func:`validate_record`; examples keep the source order
        (``disable_shuffling=True``), so record index i of a split is the i-th record of the source.
      description: free text stored in the dataset info.
      strict: a :class:`Refusal` from the source fails the build (InputError listing the split's refusals,
        raised once the split has been read) instead of being collected in ``self.refusals``.
      progress: show a tqdm progress bar per split.

    After preparing, ``self.refusals`` (list of Refusal), ``self.clip_counts`` and ``self.audio_seconds``
    (split -> value) describe what was written.
    """
    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Clip records: 16 kHz int16 audio, FLAME coefficients at 25 fps, instructions."}

    # tfds' default `code_path` probes `importlib_resources` (not a dependency of ours); this file is the
    # builder's code path (tfds looks for an absent checksums.tsv beside it: no downloads are involved).
    code_path = tfds.core.utils.classproperty(classmethod(lambda cls: epath.Path(__file__)))

    def __init__(self, *, source: Source | None = None, description: str = "", strict: bool = False,
                 progress: bool = False, **kwargs):
        self._source = source
        self._description = description
        self._strict = bool(strict)
        self._progress = bool(progress)
        self.refusals: list[Refusal] = []
        self.clip_counts: dict[str, int] = {}
        self.audio_seconds: dict[str, float] = {}
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=self._description or "avi_jax clip records",
            features=schema.features(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        if self._source is None:
            raise InputError(f"{self.name}/{self.builder_config.name}: no source given to prepare from")
        bad = [s for s in self._source if s not in SPLITS]
        if bad:
            raise InputError(f"unknown split(s) {bad}; expected a subset of {SPLITS}")
        return {s: self._generate_examples(s) for s in self._source}

    def _generate_examples(self, split):
        items = self._source[split]
        items = items() if callable(items) else items
        if self._progress:
            from tqdm.auto import tqdm
            total = operator.length_hint(items, 0) or None
            items = tqdm(items, total=total, desc=f"{self.builder_config.name} [{split}]", unit="clip")
        seen = set()
        refused: list[Refusal] = []
        self.clip_counts[split] = 0
        self.audio_seconds[split] = 0.0
        for rec in items:
            if isinstance(rec, Refusal):
                rec = dataclasses.replace(rec, split=split)
                log.info("refused %s", rec)
                refused.append(rec)
                self.refusals.append(rec)
                continue
            ex = validate_record(rec)
            if ex["clip_id"] in seen:
                raise InputError(f"{ex['clip_id']}: duplicate clip_id in split '{split}'")
            seen.add(ex["clip_id"])
            self.clip_counts[split] += 1
            self.audio_seconds[split] += ex["audio"].size / schema.SAMPLE_RATE
            yield ex["clip_id"], ex
        if refused and self._strict:
            raise InputError(f"--strict: {len(refused)} clip(s) of split '{split}' refused:\n" +
                             "\n".join(f"  {r}" for r in refused))
        if not seen:   # tfds cannot write an empty split
            raise InputError(f"split '{split}' has no usable clip" + (
                f"; all {len(refused)} were refused:\n" + "\n".join(f"  {r}" for r in refused) if refused else ""))


def prepare(source: Source, data_dir: str | os.PathLike, config_name: str, *, description: str = "",
            metadata: Mapping[str, Any] | None = None, strict: bool = False) -> str:
    """Write ``source`` as ClipDataset config ``config_name`` under ``data_dir`` unless it already exists.

    Returns the dataset directory ``data_dir/clip_dataset/<config_name>/1.0.0`` (pass it to
    :func:`open_split`). Writing goes to a temporary ``*.incomplete*`` directory renamed at the end; on any
    error nothing is left at the returned path. Safe to call from several processes at once (deterministic
    sources: whoever renames first wins, the others reuse it), though preparing on one process and
    waiting at a barrier avoids duplicated work. ``metadata`` (JSON-able) is stored as ``avi_meta.json``.
    :class:`Refusal` items of the source are logged and skipped (see :func:`prepare_dataset` for the
    report), or fail the build when ``strict``.

    Raises:
      InputError: a record is invalid (names the clip); with ``strict``, a refused clip.
    """
    return prepare_dataset(source, data_dir, config_name, description=description, metadata=metadata,
                           strict=strict).path


def prepare_dataset(source: Source, data_dir: str | os.PathLike, config_name: str, *, description: str = "",
                    metadata: Mapping[str, Any] | None = None, strict: bool = False, progress: bool = False,
                    force: bool = False) -> PrepareResult:
    """:func:`prepare` returning a :class:`PrepareResult` (clips and audio hours per split, refusals).

    ``avi_meta.json`` always holds ``metadata`` plus a ``report`` (clips, audio_seconds, refused), so a
    reused dataset reports what its preparation refused. ``progress``: tqdm bar per split. ``force``:
    delete an existing prepared copy first and prepare again. With ``strict``, a reused dataset whose
    report lists refusals also fails.

    Raises:
      InputError: an invalid record (names the clip); with ``strict``, any refused clip (the message lists
        them); a split without any usable clip (tfds cannot write an empty split; the message lists its
        refusals).
    """
    data_dir = os.fspath(data_dir)
    if force:   # before the builder exists: tfds reads an existing dataset's info when it is constructed
        old = os.path.join(data_dir, "clip_dataset", config_name, VERSION)
        if os.path.isdir(old):
            shutil.rmtree(old)
    config = tfds.core.BuilderConfig(name=config_name, version=VERSION, description=description)
    builder = ClipDataset(source=source, description=description, data_dir=data_dir, config=config,
                          file_format="array_record", strict=strict, progress=progress)
    path = os.fspath(builder.data_dir)
    if _is_complete(path):
        log.info("reusing prepared dataset %s", path)
        return read_result(path, strict)
    try:
        builder.download_and_prepare(file_format="array_record",
                                     download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except Exception:
        # Another process (e.g. another host on a shared file system) may have finished the same dataset
        # first, so our final rename failed: the complete dataset is there, use it.
        if _is_complete(path):
            log.info("dataset %s was completed by another process; using it", path)
            return read_result(path, strict)
        raise
    result = PrepareResult(path=path, clips=dict(builder.clip_counts), audio_seconds=dict(builder.audio_seconds),
                           refusals=list(builder.refusals))
    meta = dict(metadata or {})
    meta["report"] = result.to_json()
    tmp = os.path.join(path, "avi_meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(path, "avi_meta.json"))
    return result


def read_result(path: str | os.PathLike, strict: bool = False) -> PrepareResult:
    """The :class:`PrepareResult` of an already prepared dataset (``reused=True``): its report from
    ``avi_meta.json``, or clip counts from the tfds info for datasets prepared without one.

    Raises:
      InputError: with ``strict``, when the report lists refused clips.
    """
    path = os.fspath(path)
    meta_path = os.path.join(path, "avi_meta.json")
    report = {}
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            report = json.load(f).get("report") or {}
    if report:
        refusals = [Refusal(str(r["clip_id"]), str(r["reason"]), str(r.get("split", "")))
                    for r in report.get("refused", [])]
        result = PrepareResult(path=path, clips={k: int(v) for k, v in report.get("clips", {}).items()},
                               audio_seconds={k: float(v) for k, v in report.get("audio_seconds", {}).items()},
                               refusals=refusals, reused=True)
    else:
        info = tfds.builder_from_directory(path).info
        result = PrepareResult(path=path, clips={k: int(v.num_examples) for k, v in info.splits.items()},
                               audio_seconds={}, refusals=[], reused=True)
    if strict and result.refusals:
        raise InputError(f"--strict: the prepared dataset {path} was built with {len(result.refusals)} "
                         "refused clip(s) (use --force to prepare it again):\n" +
                         "\n".join(f"  [{r.split}] {r}" for r in result.refusals))
    return result


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_info.json"))


def prepare_demo(data_dir: str | os.PathLike, *, seed: int = 0, num_speakers: int = 12,
                 clip_seconds: float = 2.0) -> str:
    """Prepare the demo corpus (:mod:`avi_jax.data.demo`) as ArrayRecord; idempotent.

    Default: 12 speakers x 8 MEAD emotions x 3 intensities = 288 clips of 2.0 s; splits train (speakers
    0-8, 216 clips), validation (speaker 9, 24), test (speakers 10-11, 48). Re-preparing with the same
    parameters returns the existing directory. Returns the dataset directory for :func:`open_split`.
    """
    from avi_jax.data import demo
    name = f"demo-seed{int(seed)}-spk{int(num_speakers)}-{float(clip_seconds):g}s"
    return prepare(demo.demo_source(seed=seed, num_speakers=num_speakers, clip_seconds=clip_seconds),
                   data_dir, name, description=f"avi_jax demo corpus ({name})",
                   metadata={"kind": "demo", "seed": int(seed), "num_speakers": int(num_speakers),
                             "clip_seconds": float(clip_seconds)})


def read_manifest(manifest_path: str | os.PathLike) -> dict[str, list[dict]]:
    """Parse a JSONL manifest into ``{split: [record, ...]}`` (audio decoded, coefficients loaded).

    One JSON object per line (blank lines and lines starting with '#' are skipped):
    ``audio`` (path; relative paths are relative to the manifest's folder), ``instruction`` (str) or
    ``instructions`` (list[str]), optional ``speaker``, ``emotion`` (name), ``intensity`` (0..3),
    ``split`` (train/validation/test; default train), ``clip_id`` (default: line number + audio stem),
    ``coefficients`` (path to a .npz holding ``expression`` (T, 50) and ``jaw_pose`` (T, 3), optional
    ``global_pose`` (T, 3), ``shape`` (100,)). Audio is read with :func:`audio.load_audio` (any rate,
    downmixed to mono, resampled to 16 kHz).

    Raises:
      InputError: naming the manifest line (``manifest.jsonl:LINE``) and file for a malformed line, a
        missing/unreadable audio or coefficient file, NaN/inf values or wrong shapes.
    """
    from avi_jax.data.audio import load_audio
    manifest_path = os.fspath(manifest_path)
    if not os.path.isfile(manifest_path):
        raise InputError(f"{manifest_path}: manifest does not exist")
    root = os.path.dirname(os.path.abspath(manifest_path))
    out: dict[str, list[dict]] = {}
    with open(manifest_path, encoding="utf-8") as f:
        lines = f.readlines()
    for lineno, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{manifest_path}:{lineno}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        if not isinstance(entry.get("audio"), str) or not entry["audio"]:
            raise InputError(f"{where}: missing 'audio' (path to the audio file)")
        audio_path = entry["audio"] if os.path.isabs(entry["audio"]) else os.path.join(root, entry["audio"])
        split = entry.get("split", "train")
        if split not in SPLITS:
            raise InputError(f"{where}: split must be one of {SPLITS}, got {split!r}")
        if "instructions" in entry:
            texts = entry["instructions"]
            if not isinstance(texts, list) or not all(isinstance(x, str) for x in texts):
                raise InputError(f"{where}: 'instructions' must be a list of strings")
        elif isinstance(entry.get("instruction"), str):
            texts = [entry["instruction"]]
        else:
            raise InputError(f"{where}: needs 'instruction' (str) or 'instructions' (list of str)")
        try:
            audio = load_audio(audio_path)
        except InputError as e:
            raise InputError(f"{where}: {e}") from e
        stem = os.path.splitext(os.path.basename(audio_path))[0]
        rec = {
            "clip_id": str(entry.get("clip_id") or f"{lineno:06d}_{stem}"),
            "speaker": str(entry.get("speaker") or ""),
            "audio": audio,
            "emotion": entry.get("emotion"),
            "intensity": entry.get("intensity", 0),
            "instructions": texts,
        }
        coeff = entry.get("coefficients")
        cpath = None
        if coeff is not None and not isinstance(coeff, str):
            raise InputError(f"{where}: 'coefficients' must be a path to a .npz file")
        if coeff:
            cpath = coeff if os.path.isabs(coeff) else os.path.join(root, coeff)
            if not os.path.isfile(cpath):
                raise InputError(f"{where}: coefficient file {cpath} does not exist")
            try:
                with np.load(cpath, allow_pickle=False) as z:
                    arrays = {k: np.asarray(z[k]) for k in z.files}
            except Exception as e:
                raise InputError(f"{where}: {cpath}: unreadable .npz ({type(e).__name__}: {e})") from e
            for k in ("expression", "jaw_pose"):
                if k not in arrays:
                    raise InputError(f"{where}: {cpath}: missing array '{k}' (has {sorted(arrays)})")
            for k in ("expression", "jaw_pose", "global_pose", "shape"):
                if k in arrays:
                    rec[k] = arrays[k]
        try:
            rec = validate_record(rec)
        except InputError as e:
            raise InputError(f"{where}: {audio_path}" + (f" / {cpath}" if cpath else "") + f": {e}") from e
        out.setdefault(split, []).append(rec)
    if not out:
        raise InputError(f"{manifest_path}: manifest has no entries")
    return out


def prepare_manifest(manifest_path: str | os.PathLike, data_dir: str | os.PathLike) -> str:
    """Prepare a bring-your-own JSONL manifest (see :func:`read_manifest`) as ArrayRecord; idempotent.

    The dataset name is ``manifest-<stem>-<sha1 of the manifest bytes>``; an unchanged manifest reuses the
    prepared directory (edit the manifest, or delete the directory, after changing referenced files).
    All lines are read and validated before anything is written. Returns the dataset directory.

    Raises:
      InputError: a bad line / missing audio / bad coefficients (names the manifest line and file).
    """
    manifest_path = os.fspath(manifest_path)
    if not os.path.isfile(manifest_path):
        raise InputError(f"{manifest_path}: manifest does not exist")
    with open(manifest_path, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()[:12]
    stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(manifest_path))[0])
    name = f"manifest-{stem.lower()}-{digest}"
    data_dir = os.fspath(data_dir)
    existing = os.path.join(data_dir, "clip_dataset", name, VERSION)
    if _is_complete(existing):
        return existing
    records = read_manifest(manifest_path)
    return prepare(records, data_dir, name, description=f"avi_jax manifest {manifest_path}",
                   metadata={"kind": "manifest", "manifest": os.path.abspath(manifest_path), "sha1": digest})


def map_ordered(fn: Callable[[Any], Any], items: Iterable[Any], workers: int = 1, lookahead: int = 2):
    """``(fn(x) for x in items)`` in order, computed by ``workers`` threads with bounded lookahead.

    At most ``workers * lookahead`` results are pending at a time (memory stays bounded for decoded
    audio). ``workers <= 1`` runs inline. Exceptions from ``fn`` propagate at their item.
    """
    if workers <= 1:
        for x in items:
            yield fn(x)
        return
    import collections
    from concurrent.futures import ThreadPoolExecutor
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="avi_prepare") as pool:
        try:
            for x in items:
                pending.append(pool.submit(fn, x))
                if len(pending) >= workers * lookahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


class SizedStream:
    """A re-iterable, sized ``map_ordered(fn, items, workers)``: a lazy split for :class:`ClipDataset`.

    ``len()`` gives the progress bar its total; iterating calls ``fn`` on each item (which returns a record
    dict or a :class:`Refusal`).
    """

    def __init__(self, items: list, fn: Callable[[Any], Any], workers: int = 1):
        self.items, self.fn, self.workers = list(items), fn, int(workers)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return map_ordered(self.fn, self.items, self.workers)


class SizedChain:
    """Fixed items (e.g. refusals found while scanning) followed by a sized iterable (sized, re-iterable)."""

    def __init__(self, head: list, tail: Any):
        self.head, self.tail = list(head), tail

    def __len__(self) -> int:
        return len(self.head) + len(self.tail)

    def __iter__(self):
        yield from self.head
        yield from self.tail


def fingerprint(*parts: Any, files: Iterable[str] = (), root: str | None = None) -> str:
    """12 hex digits of sha1 over JSON-able ``parts`` and the (relative path, size, mtime) of ``files``.

    Names prepared datasets so that preparing the same inputs with the same options reuses them, and
    changed audio/label files (size or modification time) prepare a new copy.
    """
    h = hashlib.sha1()
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    for path in sorted(files):
        st = os.stat(path)
        rel = os.path.relpath(path, root) if root else path
        h.update(f"\n{rel}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def open_split(path: str | os.PathLike, split: str):
    """Random-access source of a prepared split: ``tfds.builder_from_directory(path).as_data_source(split)``.

    ``len(src)`` records; ``src[i]`` is a dict of numpy values: clip_id/speaker bytes, audio int16 (N,),
    emotion int (-1 unknown), intensity int32, instructions array of bytes, has_coefficients bool,
    expression float32 (T, 50), jaw_pose (T, 3), global_pose (T, 3), shape (100,).

    Raises:
      InputError: ``path`` is not a prepared dataset or has no such split.
    """
    path = os.fspath(path)
    if not _is_complete(path):
        raise InputError(f"{path}: not a prepared dataset (no dataset_info.json); run prepare_demo/"
                         "prepare_manifest first")
    builder = tfds.builder_from_directory(path)
    if split not in builder.info.splits:
        raise InputError(f"{path}: no split {split!r}; available: {sorted(builder.info.splits)}")
    return builder.as_data_source(split)


def text(value) -> str:
    """bytes/str/np.bytes_ as read back from a data source -> str."""
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)
