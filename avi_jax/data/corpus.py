"""Helpers shared by the real-corpus sources (MEAD/MeadText, RAVDESS): one clip from its files, lazy
sized splits read by worker threads in order, and the fingerprint that names a prepared dataset.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Iterable, Mapping

from avi_jax.data import emoca
from avi_jax.data.audio import load_audio
from avi_jax.data.records import Refusal, validate_record
from avi_jax.errors import InputError


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
    """A re-iterable, sized ``map_ordered(fn, items, workers)``: a lazy split for
    :class:`avi_jax.data.builder.ClipDataset`.

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
