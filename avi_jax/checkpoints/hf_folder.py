"""Read local Hugging Face model folders without downloading anything.

A folder holds ``config.json`` and weights as ``model.safetensors``, sharded ``*.safetensors`` with
``model.safetensors.index.json``, or ``pytorch_model.bin`` (optionally sharded with
``pytorch_model.bin.index.json``). Tensors are read lazily, one key at a time, so converting a 7B model
never holds a second full copy on the host. A converter that reads its keys in ``in_file_order`` opens
(``.bin``: unpickles) each shard of a sharded checkpoint once: a ``.bin`` shard stays loaded only until a
key of another shard is read, so reading in the converter table's own order would load Vicuna-7B's two
~5 GB shards several times over.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator, Sequence

import numpy as np

from avi_jax.errors import CheckpointError

_SAFE_SINGLE = "model.safetensors"
_SAFE_INDEX = "model.safetensors.index.json"
_BIN_SINGLE = "pytorch_model.bin"
_BIN_INDEX = "pytorch_model.bin.index.json"


def read_config(folder: str, filename: str = "config.json") -> dict:
    """Return the parsed ``filename`` (a JSON file, default ``config.json``) of ``folder``;
    ``CheckpointError`` if missing or malformed."""
    path = os.path.join(folder, filename)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: pretrained model folder does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; a Hugging Face model folder needs {filename}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable config: {e}") from e


class HFCheckpoint:
    """Lazy, read-only mapping ``parameter name -> np.ndarray`` over a Hugging Face folder.

    Raises ``CheckpointError`` naming the folder when no weight file is found, and naming the key
    and file when a tensor is missing.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.config = read_config(folder)
        self._files: dict[str, str] = {}   # key -> file
        self._bin_cache: dict[str, dict[str, np.ndarray]] = {}
        self._safe_handle: tuple[str, Any] | None = None   # (path, safe_open handle) of the last shard read
        single, index = self._layout()
        if index:
            with open(os.path.join(folder, index)) as f:
                weight_map = json.load(f)["weight_map"]
            self._files = {k: os.path.join(folder, v) for k, v in weight_map.items()}
        else:
            path = os.path.join(folder, single)
            for key in self._file_keys(path):
                self._files[key] = path

    def _layout(self) -> tuple[str | None, str | None]:
        names = set(os.listdir(self.folder))
        if _SAFE_INDEX in names:
            return None, _SAFE_INDEX
        if _SAFE_SINGLE in names:
            return _SAFE_SINGLE, None
        if _BIN_INDEX in names:
            return None, _BIN_INDEX
        if _BIN_SINGLE in names:
            return _BIN_SINGLE, None
        raise CheckpointError(
            f"{self.folder}: no weights found; expected {_SAFE_SINGLE}, {_SAFE_INDEX} with shards, "
            f"or {_BIN_SINGLE}")

    def _file_keys(self, path: str) -> list[str]:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(path, framework="numpy") as f:
                return list(f.keys())
        return list(self._load_bin(path))

    def _load_bin(self, path: str) -> dict[str, np.ndarray]:
        if path not in self._bin_cache:
            from avi_jax.checkpoints.torch_bin import load_torch_bin
            self._bin_cache = {path: load_torch_bin(path)}   # keep one shard in memory at a time
        return self._bin_cache[path]

    def _safe_open(self, path: str) -> Any:
        """The ``safe_open`` handle of ``path``, kept open until a key of another file is read."""
        if self._safe_handle is None or self._safe_handle[0] != path:
            from safetensors import safe_open
            self._safe_handle = None
            self._safe_handle = (path, safe_open(path, framework="numpy"))
        return self._safe_handle[1]

    def in_file_order(self, rows: Sequence[tuple]) -> list[tuple]:
        """``rows`` (tuples whose second item is a key, e.g. converter rows ``(flax_path, key, transform)``)
        reordered so that the keys of each weight file come together, files in the order they are named
        (the index's ``weight_map``); stable within a file. Keys the checkpoint lacks come first, so a
        missing tensor is reported before any shard is read."""
        rank = {path: i for i, path in enumerate(dict.fromkeys(self._files.values()))}
        return sorted(rows, key=lambda row: rank.get(self._files.get(row[1]), -1))

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._files:
            raise CheckpointError(f"{self.folder}: checkpoint has no tensor '{key}'")
        path = self._files[key]
        if path.endswith(".safetensors"):
            try:
                return self._safe_open(path).get_tensor(key)
            except TypeError:   # numpy has no bfloat16/float8: read the raw bytes instead
                return _read_safetensors_raw(path, key)
        return self._load_bin(path)[key]


def _read_safetensors_raw(path: str, key: str) -> np.ndarray:
    """One tensor of a dtype numpy lacks (BF16, F8_*) as an ``ml_dtypes`` array, read from the
    safetensors layout (8-byte little-endian header size, JSON header, raw little-endian data)."""
    import ml_dtypes
    kinds = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
             "F8_E5M2": ml_dtypes.float8_e5m2}
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        info = json.loads(fh.read(size))[key]
        if info["dtype"] not in kinds:
            raise CheckpointError(f"{path}: tensor '{key}' has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        fh.seek(8 + size + start)
        data = fh.read(end - start)
    return np.frombuffer(data, dtype=kinds[info["dtype"]]).reshape(info["shape"])
