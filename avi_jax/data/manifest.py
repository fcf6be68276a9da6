"""Bring-your-own data: a JSONL manifest (one clip per line: audio path, instructions, optional labels and
FLAME coefficients) read into records and prepared as a clip dataset.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from avi_jax.data.audio import load_audio
from avi_jax.data.builder import SPLITS, VERSION, is_complete, prepare
from avi_jax.data.records import validate_record
from avi_jax.errors import InputError


def read_manifest(manifest_path: str | os.PathLike) -> dict[str, list[dict]]:
    """Parse a JSONL manifest into ``{split: [record, ...]}`` (audio decoded, coefficients loaded).

    One JSON object per line (blank lines and lines starting with '#' are skipped):
    ``audio`` (path; relative paths are relative to the manifest's folder), ``instruction`` (str) or
    ``instructions`` (list[str]), optional ``speaker``, ``emotion`` (name), ``intensity`` (0..3),
    ``split`` (train/validation/test; default train), ``clip_id`` (default: line number + audio stem),
    ``coefficients`` (path to a .npz holding ``expression`` (T, 50) and ``jaw_pose`` (T, 3), optional
    ``global_pose`` (T, 3), ``shape`` (100,)). Audio is read with :func:`audio.load_audio` (any rate,
    downmixed to mono, resampled to 16 kHz).

    All lines are parsed first: a duplicate ``clip_id``, or one clip id (or one audio file) in two splits
    (train/test leakage), is refused before any audio is decoded.

    Raises:
      InputError: naming the manifest line (``manifest.jsonl:LINE``) and file for a malformed line, a
        duplicate clip id or a clip in two splits (with the line of its first occurrence), a
        missing/unreadable audio or coefficient file, NaN/inf values or wrong shapes.
    """
    manifest_path = os.fspath(manifest_path)
    if not os.path.isfile(manifest_path):
        raise InputError(f"{manifest_path}: manifest does not exist")
    root = os.path.dirname(os.path.abspath(manifest_path))
    out: dict[str, list[dict]] = {}
    with open(manifest_path, encoding="utf-8") as f:
        lines = f.readlines()
    # First pass (cheap, nothing decoded): every line's fields, clip id and split, so that duplicate clip
    # ids and clips in two splits are found before any audio is read or anything is written.
    entries = []
    first_id: dict[str, tuple[str, str]] = {}        # clip id -> (where, split)
    first_audio: dict[str, tuple[str, str]] = {}     # real audio path -> (where, split)
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
        stem = os.path.splitext(os.path.basename(audio_path))[0]
        cid = str(entry.get("clip_id") or f"{lineno:06d}_{stem}")
        if cid in first_id:
            where0, split0 = first_id[cid]
            if split0 == split:
                raise InputError(f"{where}: duplicate clip_id {cid!r} (already at {where0}); clip ids must be "
                                 "unique")
            raise InputError(f"{where}: clip_id {cid!r} is in split '{split}' here and in split '{split0}' at "
                             f"{where0}; one clip in two splits leaks training data into evaluation -- give "
                             "each clip exactly one split")
        first_id[cid] = (where, split)
        real_audio = os.path.realpath(audio_path)
        if real_audio in first_audio and first_audio[real_audio][1] != split:
            where0, split0 = first_audio[real_audio]
            raise InputError(f"{where}: audio {audio_path} is in split '{split}' here and in split '{split0}' at "
                             f"{where0}; one recording in two splits leaks training data into evaluation")
        first_audio.setdefault(real_audio, (where, split))
        entries.append((where, entry, audio_path, split, texts, cid))
    for where, entry, audio_path, split, texts, cid in entries:
        try:
            audio = load_audio(audio_path)
        except InputError as e:
            raise InputError(f"{where}: {e}") from e
        rec = {
            "clip_id": cid,
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
    if is_complete(existing):
        return existing
    records = read_manifest(manifest_path)
    return prepare(records, data_dir, name, description=f"avi_jax manifest {manifest_path}",
                   metadata={"kind": "manifest", "manifest": os.path.abspath(manifest_path), "sha1": digest})
