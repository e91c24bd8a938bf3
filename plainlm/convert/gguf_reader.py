"""Reading a GGUF file (llama.cpp's format) in one checked pass: its metadata as Python values, its tensors as
numpy arrays over the memory-mapped file.

Every count, length, type and offset in the header is checked against the file's size as it is read, so a
corrupt or truncated file ends in one CheckpointError that names the file and the byte, never in a huge
allocation or a loop without end. Strings are decoded straight from the mapped bytes and numeric arrays
taken with one `numpy.frombuffer` each: the `gguf` package's own GGUFReader builds numpy views for every
part of every value, which took 18 s for Gemma 3's 262,144-token vocabulary. Dequantizing the tensors is
`gguf.py`'s, with `gguf.quants`; writing files is `gguf_export.py`'s, with the `gguf` package's writer.
"""

from __future__ import annotations

import importlib.metadata
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from plainlm.errors import CheckpointError


@dataclass(frozen=True)
class GGUFField:
    """One metadata value: `types` is (its type,) or, for an array, (ARRAY, the items' type)."""

    types: tuple[int, ...]
    value: Any


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF's order: the fastest-varying dimension first (PyTorch's reversed)
    n_elements: int
    n_bytes: int
    # float and integer types in their numpy dtype, quantized ones as raw bytes, (..., bytes per row);
    # either way a read-only view of the file in PyTorch's dimension order
    data: np.ndarray


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    fields: dict[str, GGUFField]
    tensors: list[GGUFTensor]


def read_gguf(path: str | Path) -> GGUFFile:
    """The file's metadata and memory-mapped tensors, after checking its whole header; or a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    if size < 24:
        raise CheckpointError(f"{path}: {size} bytes is too short for a GGUF header; the file is truncated")
    with open(path, "rb") as f:
        # not closed here: the tensors' arrays are views of it, and it closes when the last of them goes
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if data[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    cur = _Cursor(data, path)
    cur.take(4, "magic")
    version = cur.u32("version")
    if version & 0xFFFF == 0:
        raise CheckpointError(f"{path}: a big-endian GGUF file; convert it with gguf_convert_endian first")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version}; only versions 2 and 3 can be read")
    n_tensors, n_kv = cur.u64("tensor count"), cur.u64("metadata count")
    # Each metadata entry takes at least 13 bytes and each tensor info at least 32.
    if n_kv * 13 + n_tensors * 32 > size - cur.pos:
        raise CheckpointError(
            f"{path}: the header claims {n_tensors} tensors and {n_kv} metadata entries, more than a "
            f"{size}-byte file can hold; the file is corrupt"
        )
    fields = _read_metadata(cur, n_kv)
    alignment = _alignment(fields, path)
    infos = _read_tensor_infos(cur, n_tensors)
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, tensor_type, shape, offset in infos:
        block, type_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
        n_elements = math.prod(shape)
        n_bytes = n_elements // block * type_bytes
        if offset % alignment or data_start + offset + n_bytes > size:
            raise CheckpointError(
                f"{path}: the data of tensor {name!r} ({n_bytes} bytes at offset {offset}) is misaligned or runs past "
                f"the end of the file ({size} bytes); the file is truncated or corrupt"
            )
        dims = tuple(reversed(shape))
        if tensor_type in _PLAIN_DTYPES:
            array = np.frombuffer(data, _PLAIN_DTYPES[tensor_type], n_elements, data_start + offset).reshape(dims)
        else:
            array = np.frombuffer(data, np.uint8, n_bytes, data_start + offset)
            array = array.reshape(*dims[:-1], dims[-1] // block * type_bytes)
        tensors.append(GGUFTensor(name, tensor_type, shape, n_elements, n_bytes, array))
    return GGUFFile(path, fields, tensors)


def gguf_version() -> str:
    return f"gguf {importlib.metadata.version('gguf')}"


class _Cursor:
    """Reads little-endian values from the mapped file, never past its end."""

    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data, self.path, self.pos = data, path, 0

    def need(self, n: int, what: str) -> None:
        if n > len(self.data) - self.pos:
            raise CheckpointError(
                f"{self.path}: {what} at byte {self.pos} needs {n} bytes but the file ends at {len(self.data)}; "
                "the file is truncated or corrupt, download it again"
            )

    def take(self, n: int, what: str) -> int:
        self.need(n, what)
        self.pos += n
        return self.pos - n

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.data, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.data, self.take(8, what))[0]

    def text(self, what: str) -> str:
        n = self.u64(what)
        start = self.take(n, what)
        try:
            return self.data[start : start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: {what} at byte {start} is not UTF-8; the file is corrupt") from None


# GGUFValueType -> little-endian numpy dtype, for the scalar types
_SCALARS = {
    int(getattr(GGUFValueType, name)): np.dtype(code)
    for name, code in (
        ("UINT8", "u1"), ("INT8", "i1"), ("UINT16", "<u2"), ("INT16", "<i2"), ("UINT32", "<u4"), ("INT32", "<i4"),
        ("FLOAT32", "<f4"), ("BOOL", "?"), ("UINT64", "<u8"), ("INT64", "<i8"), ("FLOAT64", "<f8"),
    )
}  # fmt: skip
_STRING, _ARRAY = int(GGUFValueType.STRING), int(GGUFValueType.ARRAY)
_MAX_DIMS = 4  # GGML_MAX_DIMS
# Tensor types held as numbers rather than blocks (BF16 is left to gguf.quants, as bytes)
_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: np.dtype("<f4"),
    GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.F64: np.dtype("<f8"),
    GGMLQuantizationType.I8: np.dtype("i1"),
    GGMLQuantizationType.I16: np.dtype("<i2"),
    GGMLQuantizationType.I32: np.dtype("<i4"),
    GGMLQuantizationType.I64: np.dtype("<i8"),
}


def _read_metadata(cur: _Cursor, count: int) -> dict[str, GGUFField]:
    fields: dict[str, GGUFField] = {}
    for i in range(count):
        key = cur.text(f"metadata key #{i}")
        if key in fields:
            raise CheckpointError(f"{cur.path}: metadata key {key!r} appears twice; the file is corrupt")
        kind = cur.u32(f"the type of metadata {key!r}")
        if kind == _ARRAY:
            item_kind = cur.u32(f"the item type of {key!r}")
            fields[key] = GGUFField((kind, item_kind), _read_array(cur, item_kind, key))
        else:
            fields[key] = GGUFField((kind,), _read_value(cur, kind, key))
    return fields


def _read_value(cur: _Cursor, kind: int, key: str) -> Any:
    if kind in _SCALARS:
        dtype = _SCALARS[kind]
        return np.frombuffer(cur.data, dtype, 1, cur.take(dtype.itemsize, f"metadata {key!r}")).item()
    if kind == _STRING:
        return cur.text(f"metadata {key!r}")
    raise CheckpointError(f"{cur.path}: metadata {key!r} has unknown value type {kind}; the file is corrupt")


def _read_array(cur: _Cursor, item_kind: int, key: str, depth: int = 0) -> list:
    n = cur.u64(f"the length of {key!r}")
    if item_kind in _SCALARS:
        dtype = _SCALARS[item_kind]
        return np.frombuffer(cur.data, dtype, n, cur.take(n * dtype.itemsize, f"array {key!r} of {n} items")).tolist()
    cur.need(n * 8, f"array {key!r} of {n} items")  # strings and arrays take 8 bytes or more each
    if item_kind == _STRING:
        return [cur.text(f"item {i} of {key!r}") for i in range(n)]
    if item_kind == _ARRAY and depth < 1:  # the format allows arrays of arrays; no model uses deeper ones
        return [_read_array(cur, cur.u32(f"the item type of {key!r}"), key, depth + 1) for _ in range(n)]
    raise CheckpointError(f"{cur.path}: metadata {key!r} has unknown value type {item_kind}; the file is corrupt")


def _alignment(fields: dict[str, GGUFField], path: Path) -> int:
    field = fields.get("general.alignment")
    if field is None:
        return 32
    if field.types != (int(GGUFValueType.UINT32),) or field.value == 0 or field.value & (field.value - 1):
        raise CheckpointError(f"{path}: general.alignment must be a power of two stored as uint32")
    return field.value


def _read_tensor_infos(cur: _Cursor, count: int) -> list[tuple[str, GGMLQuantizationType, tuple[int, ...], int]]:
    """(name, type, shape in GGUF's order, data offset) of each tensor, after checking its dimensions and type."""
    infos, names = [], set()
    for i in range(count):
        name = cur.text(f"the name of tensor #{i}")
        if name in names:
            raise CheckpointError(f"{cur.path}: tensor {name!r} appears twice; the file is corrupt")
        names.add(name)
        n_dims = cur.u32(f"tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise CheckpointError(f"{cur.path}: tensor {name!r} claims {n_dims} dimensions; the file is corrupt")
        dims = tuple(cur.u64(f"tensor {name!r}") for _ in range(n_dims))
        type_id, offset = cur.u32(f"tensor {name!r}"), cur.u64(f"tensor {name!r}")
        if type_id not in GGMLQuantizationType._value2member_map_:
            raise CheckpointError(
                f"{cur.path}: tensor {name!r} has unknown type id {type_id}; the file is corrupt or newer than "
                f"the installed gguf package ({gguf_version()})"
            )
        tensor_type = GGMLQuantizationType(type_id)
        if min(dims) == 0 or dims[0] % gguf.GGML_QUANT_SIZES[tensor_type][0]:
            raise CheckpointError(f"{cur.path}: tensor {name!r} has impossible dimensions {dims}; the file is corrupt")
        infos.append((name, tensor_type, dims, offset))
    return infos
