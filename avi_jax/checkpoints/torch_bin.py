"""Read PyTorch checkpoints (``pytorch_model.bin``, ``.pth``) into numpy, without torch or running code.

Both of torch.save's formats are read:

* **zip** (the default since torch 1.6): ``<root>/data.pkl`` (a pickle of the object tree) and one raw
  byte file per storage, ``<root>/data/<key>``; storages are persistent ids
  ``('storage', torch.<Type>Storage, key, location, numel)``.
* **legacy** (torch < 1.6, or ``_use_new_zipfile_serialization=False``; e.g. pytorch-fid's
  ``pt_inception-2015-12-05-6726825d.pth`` and syncnet_python's ``syncnet_v2.model``): one stream of
  pickles -- the magic number ``0x1950a86a20f9469cfc6c``, the protocol version (1001), a ``sys_info`` dict
  (byte order), the object tree (storages as ``('storage', torch.<Type>Storage, key, location, numel,
  view_metadata)``), the list of storage keys -- followed, for each key in that order, by an int64
  element count and the storage's raw bytes (torch/serialization.py ``_legacy_save`` / ``_legacy_load``).

Tensors appear in the pickle as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, hooks[, metadata])`` (``_rebuild_tensor`` in torch 0.4 files; ``_rebuild_tensor_v3`` with
an explicit dtype for newer dtypes such as float8).

The pickle is read with ``safe_pickle.restricted_load``: only the rebuild functions, the storage types,
the dtypes listed below and ``collections.OrderedDict`` resolve, each to a numpy-based stand-in written
here; any other global (``os.system``, ``builtins.eval``, ...) raises ``UnsafePickleError`` before
anything is called. Offsets and strides are honoured (views, transposes, storages shared between
tensors) and checked against the storage size, and every returned array owns its memory.

The file is untrusted input, so its resources are bounded too: zip entries must be stored (torch.save
never compresses; a deflated entry can expand a thousandfold) and no larger than the archive; a legacy
storage's declared element count must match its persistent id and fit in the bytes left in the file;
the rebuild functions only record each tensor's layout, which is checked (declared bytes and last element
against its storage: no stride-0 or overlapping expansion) before its copy is allocated; and all tensors
together may hold at most ``max(4 x file size, 64 MiB)``. A refusal is a ``CheckpointError`` naming the
file and the tensor.
"""
from __future__ import annotations

import collections
import os
import pickle
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np

from avi_jax.checkpoints.safe_pickle import restricted_load
from avi_jax.errors import CheckpointError

# Legacy typed storages: element dtype of torch.<Name>.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "UntypedStorage": np.dtype(np.uint8),
}

# torch.<dtype> globals used by _rebuild_tensor_v3 (dtypes without a legacy storage class).
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}


class _StorageType:
    """Stand-in for a ``torch.<Name>Storage`` class: only carries the element dtype."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _DType:
    """Stand-in for a ``torch.dtype`` global."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype


class _Storage:
    """A storage: a flat numpy array of its elements, ``None`` until its bytes are read (at once in the
    zip format; after the object pickle in the legacy one)."""

    def __init__(self, source: str, data: np.ndarray | None = None):
        self.source, self.data = source, data


class _Tensor:
    """A tensor as the pickle declares it: nothing is allocated until ``load_torch_bin`` has checked
    its layout against the bytes its storage really holds. ``dtype`` reinterprets a byte storage
    (``_rebuild_tensor_v3``); ``None`` keeps the storage's element type."""

    def __init__(self, storage: _Storage, dtype: _DType | None, offset: Any, size: Any, stride: Any):
        self.storage, self.dtype = storage, dtype
        self.offset, self.size, self.stride = offset, size, stride

    def elements(self, where: str) -> np.ndarray:
        raw = self.storage.data
        if raw is None:
            raise CheckpointError(f"{where}: its storage's bytes are missing from the file")
        if self.dtype is None:
            return raw
        if raw.dtype != np.uint8 or raw.size % self.dtype.dtype.itemsize:
            raise CheckpointError(f"{where}: storage of {raw.size} elements ({raw.dtype}) cannot hold "
                                  f"{self.dtype.name} elements")
        return raw.view(self.dtype.dtype)


# numpy's limit on the number of dimensions.
_MAX_DIMS = 64
# All tensors of one file together may hold at most this many times the file's bytes (views and tied
# weights share storages, so a little more than 1x is normal) -- and at least _MIN_BUDGET bytes.
_EXPANSION = 4
_MIN_BUDGET = 64 << 20


def _check_layout(storage: np.ndarray, offset: Any, size: Any, stride: Any, source: str) -> tuple:
    """Validate a tensor layout against its storage before anything is allocated.

    Checks: integer offset/size/stride of equal length, none negative, at most 64 dimensions, the last
    element addressed inside the storage, and the declared size (numel x itemsize) not larger than the
    storage's bytes (a stride-0 or overlapping layout cannot expand a small storage into a huge array).
    """
    try:
        offset = int(offset)
        size = tuple(int(s) for s in size)
        stride = tuple(int(s) for s in stride)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: malformed tensor layout ({e})") from None
    if (len(size) != len(stride) or len(size) > _MAX_DIMS or offset < 0 or any(s < 0 for s in size)
            or any(s < 0 for s in stride)):
        raise CheckpointError(
            f"{source}: invalid tensor layout offset={offset} size={size} stride={stride}")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise CheckpointError(
                f"{source}: tensor (offset {offset}, size {size}, stride {stride}) reaches element {last} "
                f"of a storage with {storage.size} elements")
        numel = 1
        for n in size:
            numel *= n
        if numel > storage.size:
            raise CheckpointError(
                f"{source}: tensor of size {size} declares {numel * storage.dtype.itemsize} bytes "
                f"({numel} elements, stride {stride}) but its storage holds only {storage.nbytes} bytes; "
                "refusing to expand it")
    # The stride of a length-1 dimension is never used; keep it from overflowing numpy's byte strides.
    stride = tuple(0 if n == 1 else s for n, s in zip(size, stride))
    return offset, size, stride


def _view(storage: np.ndarray, offset: int, size: tuple, stride: tuple) -> np.ndarray:
    if 0 in size:
        return np.zeros(size, storage.dtype)
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False)
    return np.array(view, copy=True, order="C")


def _rebuild_tensor_v2(storage: _Storage, storage_offset: int, size: tuple, stride: tuple,
                       requires_grad: bool = False, backward_hooks: Any = None,
                       metadata: Any = None) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise CheckpointError("torch checkpoint: tensor rebuilt from something that is not a storage")
    return _Tensor(storage, None, storage_offset, size, stride)


def _rebuild_tensor(storage: _Storage, storage_offset: int, size: tuple, stride: tuple) -> _Tensor:
    """torch 0.4's form (legacy files)."""
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage: _Storage, storage_offset: int, size: tuple, stride: tuple,
                       requires_grad: bool, backward_hooks: Any, dtype: _DType,
                       metadata: Any = None) -> _Tensor:
    if not isinstance(storage, _Storage) or not isinstance(dtype, _DType):
        raise CheckpointError("torch checkpoint: malformed _rebuild_tensor_v3 call")
    return _Tensor(storage, dtype, storage_offset, size, stride)


def _rebuild_parameter(data: _Tensor, requires_grad: bool = False, backward_hooks: Any = None
                       ) -> _Tensor:
    return data


def _rebuild_parameter_with_state(data: _Tensor, requires_grad: bool, backward_hooks: Any,
                                  state: Any) -> _Tensor:
    return data


def _from_big_endian(raw: bytes, dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "c":
        return np.frombuffer(raw, dtype=dtype.newbyteorder(">")).astype(dtype)
    swapped = np.frombuffer(raw, np.uint8).reshape(-1, dtype.itemsize)[:, ::-1]
    return np.ascontiguousarray(swapped).view(dtype).reshape(-1)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dtype)
    allowed[("torch.storage", "UntypedStorage")] = allowed[("torch", "UntypedStorage")]
    for name, dtype in _TORCH_DTYPES.items():
        allowed[("torch", name)] = _DType(name, dtype)
    return allowed


def _member(zf: zipfile.ZipFile, name: str, path: str, archive_size: int) -> zipfile.ZipInfo:
    """The zip entry ``name``, refused if compressed or declaring more bytes than the archive has."""
    info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(
            f"{path}: zip entry '{name}' is compressed (method {info.compress_type}); torch.save stores "
            "checkpoint entries uncompressed, and a compressed entry can expand far beyond the file's "
            "size -- refusing it (re-save the checkpoint with torch.save)")
    if info.file_size > archive_size or info.compress_size != info.file_size:
        raise CheckpointError(
            f"{path}: zip entry '{name}' declares {info.file_size} bytes ({info.compress_size} stored) in "
            f"an archive of {archive_size} bytes; the file is damaged or crafted")
    return info


def _read(zf: zipfile.ZipFile, name: str, path: str, archive_size: int) -> bytes:
    _member(zf, name, path, archive_size)
    try:
        return zf.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: zip entry '{name}' cannot be read ({type(e).__name__}: {e})") from None


def _load_zip(path: str, archive_size: int) -> Any:
    """The object tree of a zip-format checkpoint, its storages read."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged zip archive ({type(e).__name__}: {e})") from None
    with zf:
        names = zf.namelist()
        pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        pickles = [n for n in pickles if n.count("/") <= 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: expected one '<root>/data.pkl' in the zip, found {pickles}")
        root = pickles[0][: -len("data.pkl")]
        big_endian = False
        if f"{root}byteorder" in names:
            big_endian = _read(zf, f"{root}byteorder", path, archive_size).strip() == b"big"
        storages: dict[str, _Storage] = {}

        def persistent_load(pid: Any) -> _Storage:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                raise CheckpointError(f"{path}: unexpected persistent id {pid!r:.80}")
            _, storage_type, key, _location, _numel = pid
            if not isinstance(storage_type, _StorageType):
                raise CheckpointError(f"{path}: storage of unknown type {storage_type!r:.80}")
            key = str(key)
            if key not in storages:
                member = f"{root}data/{key}"
                if member not in names:
                    raise CheckpointError(f"{path}: storage '{member}' is missing from the zip")
                raw = _read(zf, member, path, archive_size)
                data = _storage_array(raw, storage_type, big_endian, f"{path}: storage '{member}'")
                storages[key] = _Storage(f"{path}:{member}", data)
            return storages[key]

        _member(zf, pickles[0], path, archive_size)
        with zf.open(pickles[0]) as f:
            return restricted_load(f, _allowed_globals(), source=f"{path}:{pickles[0]}",
                                   persistent_load=persistent_load)


def _storage_array(raw: bytes, storage_type: _StorageType, big_endian: bool, where: str) -> np.ndarray:
    dtype = storage_type.dtype
    if len(raw) % dtype.itemsize:
        raise CheckpointError(f"{where} has {len(raw)} bytes, not a multiple of {dtype.itemsize} "
                              f"({storage_type!r})")
    if big_endian and dtype.itemsize > 1:
        return _from_big_endian(raw, dtype)
    return np.frombuffer(raw, dtype=dtype)


# The legacy format's first pickle: torch.serialization.MAGIC_NUMBER as torch.save (protocol 2) writes it.
_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
_LEGACY_PROTOCOL = 1001


def _load_legacy(path: str, file_size: int) -> Any:
    """The object tree of a legacy-format checkpoint (see the module docstring), its storages read.

    Each storage's element count (int64 header) must equal the count in its persistent id and fit in
    the bytes left in the file; every storage the object tree uses must be listed and stored.
    """
    with open(path, "rb") as f:
        f.seek(len(_LEGACY_MAGIC))
        version = restricted_load(f, {}, source=f"{path} (protocol version)")
        if version != _LEGACY_PROTOCOL:
            raise CheckpointError(f"{path}: legacy torch checkpoint of protocol {version!r:.40}, expected "
                                  f"{_LEGACY_PROTOCOL}")
        sys_info = restricted_load(f, {}, source=f"{path} (sys_info)")
        if not isinstance(sys_info, dict):
            raise CheckpointError(f"{path}: legacy torch checkpoint without its sys_info dict")
        byteorder = "little" if sys_info.get("little_endian", True) else "big"
        declared: dict[str, tuple[_Storage, _StorageType, Any]] = {}

        def persistent_load(pid: Any) -> _Storage:
            if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
                raise CheckpointError(f"{path}: unexpected persistent id {pid!r:.80}")
            _, storage_type, key, _location, numel, view_metadata = pid
            if not isinstance(storage_type, _StorageType):
                raise CheckpointError(f"{path}: storage of unknown type {storage_type!r:.80}")
            if view_metadata is not None:
                raise CheckpointError(f"{path}: storage views (written by torch < 1.0) are not supported; "
                                      "re-save the checkpoint with a current torch.save")
            key = str(key)
            if key not in declared:
                declared[key] = (_Storage(f"{path}:{key}"), storage_type, numel)
            return declared[key][0]

        obj = restricted_load(f, _allowed_globals(), source=f"{path} (object pickle)",
                              persistent_load=persistent_load)
        keys = restricted_load(f, {}, source=f"{path} (storage keys)")
        if not isinstance(keys, list):
            raise CheckpointError(f"{path}: legacy torch checkpoint without its list of storage keys")
        for key in map(str, keys):
            if key not in declared or declared[key][0].data is not None:
                raise CheckpointError(f"{path}: storage '{key}' is listed twice or used by no tensor; the "
                                      "file is damaged or crafted")
            storage, storage_type, numel = declared[key]
            header = f.read(8)
            count = int.from_bytes(header, byteorder, signed=True) if len(header) == 8 else -1
            nbytes = count * storage_type.dtype.itemsize
            left = file_size - f.tell()
            if count < 0 or count != numel or nbytes > left:
                raise CheckpointError(
                    f"{path}: storage '{key}' declares {count} elements ({nbytes} bytes; its persistent id "
                    f"says {numel!r:.40}) with {left} bytes left in the file; the file is truncated or "
                    "crafted")
            storage.data = _storage_array(f.read(nbytes), storage_type, byteorder == "big",
                                          f"{path}: storage '{key}'")
    missing = [key for key, (storage, _, _) in declared.items() if storage.data is None]
    if missing:
        raise CheckpointError(f"{path}: storages {missing[:3]} are used but missing from the file")
    return obj


def load_torch_bin(path: str) -> dict[str, np.ndarray]:
    """Read a ``torch.save`` checkpoint of a state dict (zip or legacy format) into ``{name: np.ndarray}``.

    Dtypes map to numpy (bfloat16 and float8 through ``ml_dtypes``); shapes, offsets and strides are
    those of the saved tensors (each result is a C-contiguous copy). Nested non-tensor entries are
    dropped; nested dicts of tensors are flattened with '.' (e.g. ``{'model': {...}}`` -> 'model.x').

    The file is untrusted: zip entries must be stored uncompressed (as torch.save writes them) and no
    larger than the archive; legacy storages must declare the element count of their persistent id and
    fit in the file; every tensor's declared size (numel x itemsize) and strides are checked against the
    bytes of its storage before anything is allocated (no stride-0 or overlapping expansion), and all
    tensors together may not exceed ``max(4 x file size, 64 MiB)``. Memory use stays within a small
    multiple of the file's size.

    Raises:
      UnsafePickleError: the pickle names a global outside the allow-list (nothing was executed).
      CheckpointError: neither format, missing or truncated storages, compressed or oversized zip
        entries, or tensor layouts/sizes that do not fit their storages (naming the file and the tensor).
    """
    path = os.fspath(path)
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror or e})") from None
    if zipfile.is_zipfile(path):
        obj = _load_zip(path, file_size)
    elif head == _LEGACY_MAGIC:
        obj = _load_legacy(path, file_size)
    else:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint: neither the zip format (torch >= 1.6) "
                              "nor the legacy format (its magic number is missing)")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    budget = max(_EXPANSION * file_size, _MIN_BUDGET)
    used = 0

    def flatten(d: dict, prefix: str, depth: int = 0) -> None:
        nonlocal used
        if depth > 100:
            raise CheckpointError(f"{path}: state dict nested more than 100 levels deep")
        for k, v in d.items():
            name = prefix + str(k)
            if isinstance(v, _Tensor):
                where = f"{path}: tensor '{name}' (storage {v.storage.source.rsplit(':', 1)[-1]})"
                elements = v.elements(where)
                offset, size, stride = _check_layout(elements, v.offset, v.size, v.stride, where)
                nbytes = int(np.prod(size, dtype=object) if size else 1) * elements.dtype.itemsize
                if used + nbytes > budget:
                    raise CheckpointError(
                        f"{where}: the tensors read so far hold {used + nbytes} bytes, more than "
                        f"{_EXPANSION}x the file's {file_size} bytes; refusing to expand it further")
                used += nbytes
                out[name] = _view(elements, offset, size, stride)
            elif isinstance(v, dict):
                flatten(v, f"{name}.", depth + 1)

    flatten(obj, "")
    return out
