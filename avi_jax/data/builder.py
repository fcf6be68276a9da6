"""One tfds builder for every clip dataset (demo corpus, JSONL manifests, MEAD/MeadText, RAVDESS), and
reading the prepared splits back.

:class:`ClipDataset` writes ArrayRecord files whose examples follow :func:`schema.features`; the examples
come from a *source*: a mapping ``split -> records`` where each value is an iterable of record dicts or a
zero-argument callable returning one (lazy). Every record is validated by
:func:`avi_jax.data.records.validate_record` (shapes, finite values, coefficient frame count vs audio length)
before it is written; a bad record raises :class:`InputError` naming the clip, and tfds'
write-to-``*.incomplete*``-then-rename leaves nothing complete-looking behind.

Refusals: a source for real data (MEAD, RAVDESS) may yield a :class:`avi_jax.data.records.Refusal` (clip id +
reason naming the file at fault) in place of a record it cannot use. Refusals are collected and reported
(:class:`PrepareResult`, ``avi_meta.json``) while the rest of the dataset is written; with ``strict=True``
any refusal fails the build instead (after the split it occurs in, listing all of that split's refusals).

Datasets live at ``data_dir/clip_dataset/<config name>/<version>``; the config name encodes what was
prepared (``demo-seed0-spk12-2.0s``, ``manifest-<stem>-<hash>``) so preparing again with the same
parameters reuses the existing files. Each corpus prepares itself through :func:`prepare_dataset`
(``demo.prepare_demo``, ``manifest.prepare_manifest``, ``mead.prepare_mead``, ``ravdess.prepare_ravdess``).
Read them back with :func:`open_split` (random access, for grain).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import operator
import os
import shutil
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from avi_jax.data import schema
from avi_jax.data.records import Refusal, validate_record
from avi_jax.errors import InputError

log = logging.getLogger(__name__)

VERSION = "1.0.0"
SPLITS = ("train", "validation", "test")

Source = Mapping[str, "Iterable[dict | Refusal] | Callable[[], Iterable[dict | Refusal]]"]


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
        self._split_of: dict[str, str] = {}     # clip id -> split, over all splits (duplicates, leakage)
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
            _check_clip_id(ex["clip_id"], split, self._split_of)
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


def _check_clip_id(clip_id: str, split: str, split_of: dict[str, str]) -> None:
    """Record ``clip_id`` in ``split``; a clip id seen before (same split: duplicate; another split:
    train/test leakage) raises InputError."""
    other = split_of.get(clip_id)
    if other == split:
        raise InputError(f"{clip_id}: duplicate clip_id in split '{split}'; clip ids must be unique")
    if other is not None:
        raise InputError(f"{clip_id}: clip id is in split '{other}' and in split '{split}'; one clip in two "
                         "splits leaks training data into evaluation -- give each clip exactly one split")
    split_of[clip_id] = split


def check_clip_ids(source: Source) -> None:
    """Find duplicate clip ids and clips in two splits among the splits of ``source`` that are already
    materialised (lists/tuples of records), before anything is built; lazy splits are checked as they are
    written.

    Raises:
      InputError: naming the clip id and the split(s).
    """
    split_of: dict[str, str] = {}
    for split, items in source.items():
        if not isinstance(items, (list, tuple)):
            continue
        for rec in items:
            if isinstance(rec, Refusal) or not isinstance(rec, Mapping) or "clip_id" not in rec:
                continue
            _check_clip_id(str(rec["clip_id"]), split, split_of)


def _missing_dirs(data_dir: str, config_name: str) -> list[str]:
    """The folders a build may create under ``data_dir`` that do not exist yet (deepest first)."""
    cands = [os.path.join(data_dir, "downloads", "extracted"), os.path.join(data_dir, "downloads"),
             os.path.join(data_dir, "clip_dataset", config_name, VERSION),
             os.path.join(data_dir, "clip_dataset", config_name), os.path.join(data_dir, "clip_dataset"),
             data_dir]
    return [d for d in cands if not os.path.exists(d)]


def _remove_empty(dirs: list[str]) -> None:
    """``rmdir`` each of ``dirs`` (deepest first) that exists and is empty (never anything with content)."""
    for d in dirs:
        try:
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        except OSError:
            pass


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

    Duplicate clip ids and clips in two splits are refused: before anything is written for splits given as
    lists, while writing for lazy ones. A failed build leaves neither a dataset nor the empty folders it
    created behind.

    Raises:
      InputError: an invalid record (names the clip); a duplicate clip id or one clip in two splits; with
        ``strict``, any refused clip (the message lists them); a split without any usable clip (tfds cannot
        write an empty split; the message lists its refusals).
    """
    data_dir = os.fspath(data_dir)
    existing = os.path.join(data_dir, "clip_dataset", config_name, VERSION)
    if not force and is_complete(existing):
        log.info("reusing prepared dataset %s", existing)
        return read_result(existing, strict)
    check_clip_ids(source)        # duplicates and leakage among materialised splits: before any folder
    if force:   # before the builder exists: tfds reads an existing dataset's info when it is constructed
        if os.path.isdir(existing):
            shutil.rmtree(existing)
    created = _missing_dirs(data_dir, config_name)
    downloads = [d for d in created if d.startswith(os.path.join(data_dir, "downloads"))]
    path = existing
    try:
        config = tfds.core.BuilderConfig(name=config_name, version=VERSION, description=description)
        builder = ClipDataset(source=source, description=description, data_dir=data_dir, config=config,
                              file_format="array_record", strict=strict, progress=progress)
        path = os.fspath(builder.data_dir)
        if is_complete(path):
            log.info("reusing prepared dataset %s", path)
            _remove_empty(downloads)
            return read_result(path, strict)
        builder.download_and_prepare(file_format="array_record",
                                     download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except BaseException as e:
        # Another process (e.g. another host on a shared file system) may have finished the same dataset
        # first, so our final rename failed: the complete dataset is there, use it.
        if isinstance(e, Exception) and is_complete(path):
            log.info("dataset %s was completed by another process; using it", path)
            _remove_empty(downloads)
            return read_result(path, strict)
        _remove_empty(created)    # a failed build leaves no empty folders behind
        raise
    _remove_empty(downloads)      # tfds' (unused) downloads folders
    result = PrepareResult(path=path, clips=dict(builder.clip_counts), audio_seconds=dict(builder.audio_seconds),
                           refusals=list(builder.refusals))
    meta = dict(metadata or {})
    meta["report"] = result.to_json()
    tmp = os.path.join(path, "avi_meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(path, "avi_meta.json"))
    return result


def read_result(path: str | os.PathLike, strict: bool = False, reused: bool = True) -> PrepareResult:
    """The :class:`PrepareResult` of a prepared dataset: its report from ``avi_meta.json``, or clip counts
    from the tfds info for datasets prepared without one. ``reused``: whether this run found the dataset
    already prepared (pass False right after building it; the summary then does not say "reused").

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
                               refusals=refusals, reused=reused)
    else:
        info = tfds.builder_from_directory(path).info
        result = PrepareResult(path=path, clips={k: int(v.num_examples) for k, v in info.splits.items()},
                               audio_seconds={}, refusals=[], reused=reused)
    if strict and result.refusals:
        raise InputError(f"--strict: the prepared dataset {path} was built with {len(result.refusals)} "
                         "refused clip(s) (use --force to prepare it again):\n" +
                         "\n".join(f"  [{r.split}] {r}" for r in result.refusals))
    return result


def is_complete(path: str) -> bool:
    """Whether ``path`` is a completely prepared dataset (tfds wrote its ``dataset_info.json`` last)."""
    return os.path.isfile(os.path.join(path, "dataset_info.json"))


def open_split(path: str | os.PathLike, split: str):
    """Random-access source of a prepared split: ``tfds.builder_from_directory(path).as_data_source(split)``.

    ``len(src)`` records; ``src[i]`` is a dict of numpy values: clip_id/speaker bytes, audio int16 (N,),
    emotion int (-1 unknown), intensity int32, instructions array of bytes, has_coefficients bool,
    expression float32 (T, 50), jaw_pose (T, 3), global_pose (T, 3), shape (100,).

    Raises:
      InputError: ``path`` is not a prepared dataset or has no such split.
    """
    path = os.fspath(path)
    if not is_complete(path):
        raise InputError(f"{path}: not a prepared dataset (no dataset_info.json); prepare it first "
                         "(`python -m avi_jax.data.prepare ...`)")
    builder = tfds.builder_from_directory(path)
    if split not in builder.info.splits:
        raise InputError(f"{path}: no split {split!r}; available: {sorted(builder.info.splits)}")
    return builder.as_data_source(split)


def text(value) -> str:
    """bytes/str/np.bytes_ as read back from a data source -> str."""
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)
