"""load_torch_bin: torch.save checkpoints read without torch, and hostile pickles refused."""
from __future__ import annotations

import builtins
import collections
import json
import os
import pickle
import zipfile

import tracemalloc

import numpy as np
import pytest

from avi_jax.checkpoints.hf_folder import HFCheckpoint
from avi_jax.checkpoints.torch_bin import load_torch_bin
from avi_jax.errors import CheckpointError, UnsafePickleError


def _as_numpy(t) -> np.ndarray:
    """Reference value: bit patterns for dtypes numpy lacks, else ``Tensor.numpy()``."""
    import torch
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return t.view(torch.uint8).numpy()
    return t.numpy()


def _bits(a: np.ndarray) -> np.ndarray:
    if a.dtype.name == "bfloat16":
        return a.view(np.int16)
    if a.dtype.name.startswith("float8"):
        return a.view(np.uint8)
    return a


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_round_trip_dtypes_views_and_shared_storage(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=gen)
    state = collections.OrderedDict(
        f32=torch.randn(3, 5, generator=gen),
        f16=torch.randn(4, 3, generator=gen).half(),
        bf16=torch.randn(7, generator=gen).bfloat16(),
        f64=torch.randn(2, 2, generator=gen).double(),
        i64=torch.arange(-3, 5),
        i32=torch.arange(6, dtype=torch.int32).reshape(2, 3),
        i8=torch.tensor([-128, 0, 127], dtype=torch.int8),
        u8=torch.tensor([0, 200, 255], dtype=torch.uint8),
        flag=torch.tensor([True, False, True]),
        transposed=base.t(),                          # non-contiguous view of `base`'s storage
        window=base[1:3, 2:5],                        # storage offset + strides
        base=base,                                    # shares its storage with the two views
        every_other=torch.arange(10.0)[::2],
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 4),
        f8=torch.randn(5, generator=gen).to(torch.float8_e4m3fn),   # _rebuild_tensor_v3 path
        param=torch.nn.Parameter(torch.randn(2, 3, generator=gen)),  # _rebuild_parameter path
    )
    state["f16_t"] = state["f16"].t()
    state["bf16_view"] = state["bf16"][2:]
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format

    loaded = load_torch_bin(str(path))
    assert list(loaded) == list(state)
    for key, tensor in state.items():
        got, want = loaded[key], _as_numpy(tensor)
        assert got.shape == tuple(tensor.shape), key
        assert got.flags.c_contiguous and got.flags.writeable, key
        np.testing.assert_array_equal(_bits(got), want, err_msg=key)
    assert loaded["bf16"].dtype.name == "bfloat16" and loaded["f16"].dtype == np.float16
    # Results are independent copies even where the storages were shared.
    loaded["base"][0, 0] = 1e9
    assert loaded["transposed"][0, 0] == base[0, 0].item()


def test_hf_checkpoint_reads_bin_folders(tmp_path):
    torch = pytest.importorskip("torch")
    lin = torch.nn.Linear(3, 2)
    (tmp_path / "config.json").write_text("{}")
    torch.save(lin.state_dict(), tmp_path / "pytorch_model.bin")
    ckpt = HFCheckpoint(str(tmp_path))
    assert sorted(ckpt.keys()) == ["bias", "weight"]
    np.testing.assert_array_equal(ckpt["weight"], lin.weight.detach().numpy())

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text("{}")
    torch.save({"weight": lin.weight.detach()}, sharded / "pytorch_model-00001-of-00002.bin")
    torch.save({"bias": lin.bias.detach()}, sharded / "pytorch_model-00002-of-00002.bin")
    index = {"weight_map": {"weight": "pytorch_model-00001-of-00002.bin",
                            "bias": "pytorch_model-00002-of-00002.bin"}}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    ckpt = HFCheckpoint(str(sharded))
    np.testing.assert_array_equal(ckpt["bias"], lin.bias.detach().numpy())
    np.testing.assert_array_equal(ckpt["weight"], lin.weight.detach().numpy())


class _Hostile:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _zip_with_pickle(path, payload: bytes, extra: dict | None = None) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "nested"])
def test_malicious_pickle_is_refused_without_running(kind, tmp_path):
    marker = tmp_path / "pwned"
    if kind == "os.system":
        obj = _Hostile(os.system, f"touch {marker}")
    elif kind == "builtins.exec":
        obj = _Hostile(builtins.exec, f"open({str(marker)!r}, 'w').close()")
    else:   # hidden inside an otherwise normal-looking state dict
        obj = collections.OrderedDict(weight=[0.0, 1.0], evil=_Hostile(os.system, f"touch {marker}"))
    path = tmp_path / "pytorch_model.bin"
    _zip_with_pickle(path, pickle.dumps(obj, protocol=2))
    expected = r"(builtins|__builtin__)\.exec" if kind == "builtins.exec" else r"(posix|nt|os)\.system"
    with pytest.raises(UnsafePickleError, match=r"refusing to load global '" + expected):
        load_torch_bin(str(path))
    assert not marker.exists()


def _frag(obj) -> bytes:
    """The pickle opcodes of a plain value (no PROTO/STOP), to splice into a hand-assembled pickle."""
    return pickle.dumps(obj, protocol=2)[2:-1]


def _torch_pickle(tensors: dict, numel: int = 4, storage_type: str = "FloatStorage",
                  legacy: bool = False) -> bytes:
    """A torch-style state-dict pickle assembled by hand (no torch needed):
    ``{name: _rebuild_tensor_v2(storage key, offset, size, stride, False, {})}`` for ``name -> (key,
    offset, size, stride)``; storages are persistent ids ``('storage', torch.<storage_type>, key, 'cpu',
    numel)``, with a sixth element ``None`` (no view) in the legacy format."""
    out = b"\x80\x02}"                                              # PROTO 2, EMPTY_DICT
    for name, (key, offset, size, stride) in tensors.items():
        out += _frag(name) + b"ctorch._utils\n_rebuild_tensor_v2\n("  # GLOBAL, MARK
        out += (b"(" + _frag("storage") + b"ctorch\n" + storage_type.encode() + b"\n" + _frag(key)
                + _frag("cpu") + _frag(numel) + (b"N" if legacy else b"") + b"tQ")  # TUPLE, BINPERSID
        out += _frag(offset) + _frag(tuple(size)) + _frag(tuple(stride)) + b"\x89}"  # NEWFALSE, {}
        out += b"tRs"                                                   # TUPLE, REDUCE, SETITEM
    return out + b"."


def _crafted_tensor_pickle(size, stride, offset=0, numel=4) -> bytes:
    """A torch-style pickle of {'w': _rebuild_tensor_v2(storage '0', offset, size, stride)}."""
    return _torch_pickle({"w": ("0", offset, size, stride)}, numel=numel)


def test_out_of_bounds_layout_is_refused(tmp_path):
    data = {"archive/data/0": np.arange(4, dtype=np.float32).tobytes()}
    good = tmp_path / "good.bin"
    _zip_with_pickle(good, _crafted_tensor_pickle((2, 2), (1, 2)), data)
    np.testing.assert_array_equal(load_torch_bin(str(good))["w"], [[0.0, 2.0], [1.0, 3.0]])
    for i, (size, stride, offset) in enumerate([((1000,), (1,), 0), ((2, 2), (2, 1), 1), ((3,), (-1,), 2)]):
        bad = tmp_path / f"bad{i}.bin"
        _zip_with_pickle(bad, _crafted_tensor_pickle(size, stride, offset), data)
        with pytest.raises(CheckpointError):
            load_torch_bin(str(bad))


def test_malformed_files(tmp_path):
    not_zip = tmp_path / "legacy.bin"
    not_zip.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(CheckpointError, match="zip"):
        load_torch_bin(str(not_zip))
    missing_storage = tmp_path / "missing.bin"
    _zip_with_pickle(missing_storage, _crafted_tensor_pickle((2,), (1,)))
    with pytest.raises(CheckpointError, match="missing"):
        load_torch_bin(str(missing_storage))
    truncated = tmp_path / "truncated.bin"
    _zip_with_pickle(truncated, _crafted_tensor_pickle((2,), (1,))[:-5],
                     {"archive/data/0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(UnsafePickleError):
        load_torch_bin(str(truncated))


# ---- resource bombs: refused before anything large is allocated ------------------------------------------

_PEAK_LIMIT = 32 << 20     # bytes; each bomb below would expand to >= 256 MiB


def _peak_while_refused(path, match: str) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=match) as info:
            load_torch_bin(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value)
    return peak


@pytest.mark.parametrize("size,stride,numel", [
    ((2 ** 28,), (0,), 1),                   # stride 0: 4 bytes -> 1 GiB
    ((50_000_000_000,), (0,), 1),            # declared 186 GiB (numpy MemoryError before)
    ((2 ** 14, 2 ** 14), (1, 1), 2 ** 15),   # overlapping rows: 128 KiB -> 1 GiB
    ((2 ** 20, 2 ** 20, 1), (0, 1, 2 ** 80), 2 ** 20),   # stride 0 on one axis + absurd unused stride
])
def test_declared_size_beyond_storage_is_refused(tmp_path, size, stride, numel):
    path = tmp_path / "pytorch_model.bin"
    pkl = _torch_pickle({"encoder.weight": ("0", 0, size, stride)}, numel=numel)
    _zip_with_pickle(path, pkl, {"archive/data/0": np.zeros(numel, np.float32).tobytes()})
    assert path.stat().st_size < (numel * 4 + 4096)
    peak = _peak_while_refused(path, r"tensor 'encoder\.weight'.*storage holds only")
    assert peak < _PEAK_LIMIT + numel * 8


def test_tensors_together_beyond_the_file_are_refused(tmp_path):
    # Each tensor fits its 1 MiB storage, but 600 full views of it would be 600 MiB from a ~1 MiB file.
    numel = 2 ** 18
    path = tmp_path / "pytorch_model.bin"
    pkl = _torch_pickle({f"layer{i}.w": ("0", 0, (numel,), (1,)) for i in range(600)}, numel=numel)
    _zip_with_pickle(path, pkl, {"archive/data/0": np.zeros(numel, np.float32).tobytes()})
    peak = _peak_while_refused(path, r"tensor 'layer\d+\.w'.*more than 4x the file")
    assert peak < 200 << 20


def test_compressed_entry_is_refused(tmp_path):
    numel = 2 ** 26                              # 256 MiB of zeros, deflated to ~256 KiB
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w", compresslevel=9) as zf:
        zf.writestr("archive/data.pkl", _crafted_tensor_pickle((numel,), (1,), numel=numel))
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        chunk = bytes(1 << 20)
        with zf.open(info, "w") as f:
            for _ in range(numel * 4 // len(chunk)):
                f.write(chunk)
    assert path.stat().st_size < 2 << 20
    peak = _peak_while_refused(path, r"'archive/data/0' is compressed")
    assert peak < _PEAK_LIMIT


def test_entry_larger_than_the_archive_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    _zip_with_pickle(path, _crafted_tensor_pickle((4,), (1,)),
                     {"archive/data/0": np.zeros(4, np.float32).tobytes()})
    raw = bytearray(path.read_bytes())
    # Claim 3 GiB for the storage in the central directory (compressed and uncompressed sizes).
    name = b"archive/data/0"
    pos = 0
    while True:
        pos = raw.index(b"PK\x01\x02", pos)
        nlen = int.from_bytes(raw[pos + 28: pos + 30], "little")
        if raw[pos + 46: pos + 46 + nlen] == name:
            break
        pos += 4
    raw[pos + 20: pos + 28] = (3 << 30).to_bytes(4, "little") * 2
    path.write_bytes(bytes(raw))
    peak = _peak_while_refused(path, r"'archive/data/0' declares 3221225472 bytes")
    assert peak < _PEAK_LIMIT


# ---- the legacy (torch < 1.6) format ----------------------------------------------------------------

_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


def _legacy_file(path, object_pickle: bytes, storages: list, header_counts: list | None = None,
                 keys: list | None = None) -> None:
    """A legacy torch.save stream assembled by hand: magic, protocol 1001, sys_info, the object pickle,
    the storage keys, then per storage an int64 element count (``header_counts`` overrides it) and its
    bytes. ``storages`` is a list of ``(key, float32 array)``."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4}}
    out = _LEGACY_MAGIC + pickle.dumps(1001, protocol=2) + pickle.dumps(sys_info, protocol=2)
    out += object_pickle + pickle.dumps(keys if keys is not None else [k for k, _ in storages], protocol=2)
    for i, (_, data) in enumerate(storages):
        count = data.size if header_counts is None else header_counts[i]
        out += int(count).to_bytes(8, "little", signed=True) + data.astype("<f4").tobytes()
    path.write_bytes(out)


def test_legacy_hand_assembled_round_trip(tmp_path):
    path = tmp_path / "model.pth"
    pkl = _torch_pickle({"w": ("k0", 0, (2, 2), (1, 2)), "v": ("k1", 1, (2,), (1,))}, legacy=True)
    _legacy_file(path, pkl, [("k0", np.arange(4.0)), ("k1", np.arange(4.0) + 10)])
    loaded = load_torch_bin(str(path))
    np.testing.assert_array_equal(loaded["w"], [[0.0, 2.0], [1.0, 3.0]])
    np.testing.assert_array_equal(loaded["v"], [11.0, 12.0])


@pytest.mark.parametrize("case,match", [
    ("count_differs", r"storage 'k0' declares 3 elements.*persistent id says 4"),
    ("truncated", r"storage 'k0' declares 4 elements.*bytes left in the file"),
    ("bomb", r"storage 'k0' declares 4294967296 elements \(17179869184 bytes"),
    ("missing", r"storages \['k0'\] are used but missing"),
    ("unused_key", r"storage 'zz' is listed twice or used by no tensor"),
])
def test_legacy_damaged_or_crafted_storages_are_refused(tmp_path, case, match):
    path = tmp_path / "model.pth"
    numel = 2 ** 32 if case == "bomb" else 4
    pkl = _torch_pickle({"w": ("k0", 0, (4,), (1,))}, numel=numel, legacy=True)
    data = [("k0", np.arange(4.0))]
    if case == "count_differs":
        _legacy_file(path, pkl, data, header_counts=[3])
    elif case == "truncated":
        _legacy_file(path, pkl, data)
        path.write_bytes(path.read_bytes()[:-3])
    elif case == "bomb":
        _legacy_file(path, pkl, data, header_counts=[numel])
    elif case == "missing":
        _legacy_file(path, pkl, [], keys=[])
    else:
        _legacy_file(path, pkl, data + [("zz", np.arange(2.0))])
    peak = _peak_while_refused(path, match)
    assert peak < _PEAK_LIMIT


def test_legacy_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth"
    hostile = pickle.dumps(collections.OrderedDict(w=_Hostile(os.system, f"touch {marker}")), protocol=2)
    _legacy_file(path, hostile, [])
    with pytest.raises(UnsafePickleError, match=r"refusing to load global '(posix|nt|os)\.system"):
        load_torch_bin(str(path))
    # A hostile sys_info pickle (the stream's third pickle) is refused too.
    evil_info = _LEGACY_MAGIC + pickle.dumps(1001, protocol=2) + pickle.dumps(
        _Hostile(os.system, f"touch {marker}"), protocol=2)
    path.write_bytes(evil_info)
    with pytest.raises(UnsafePickleError, match="refusing to load global"):
        load_torch_bin(str(path))
    assert not marker.exists()


def test_legacy_storage_views_are_refused(tmp_path):
    path = tmp_path / "model.pth"
    pkl = _torch_pickle({"w": ("k0", 0, (4,), (1,))}, legacy=True).replace(b"NtQ", _frag(("v", 0, 2)) + b"tQ")
    _legacy_file(path, pkl, [("k0", np.arange(4.0))])
    with pytest.raises(CheckpointError, match="storage views"):
        load_torch_bin(str(path))
