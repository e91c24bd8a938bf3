"""GGUF files (llama.cpp) -> plainlm: read them safely, dequantize the weights, load or convert.

`load_gguf_model` builds a `GPT` in memory; `convert_from_gguf` writes a native checkpoint (weights,
config.yaml and the tokenizer files from `gguf_tokenizer.py`). Tensors are dequantized one at a time
with the `gguf` package, so the peak is the model in float32 plus one tensor. Before the `gguf` reader
sees a file, `check_gguf_header` walks its header and checks every count, length, type and offset
against the file's size: the reader trusts them, and a corrupt count would make it allocate or loop
without end. What llama.cpp calls things, per architecture (metadata keys -> Config, tensor names and
layouts), is in `gguf_names.py`.
"""

from __future__ import annotations

import importlib.metadata
import math
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderTensor

from plainlm.checkpoint import CONFIG_FILE, check_output_path, load_state, save_tensors
from plainlm.config import Config
from plainlm.convert.gguf_names import ignored_tensor, read_config, tensor_rules
from plainlm.convert.gguf_tokenizer import write_tokenizer_files
from plainlm.errors import CheckpointError
from plainlm.model import GPT


# --- reading the file ---
def read_gguf(path: str | Path) -> GGUFReader:
    """A memory-mapped `GGUFReader` over a file whose header has been checked, or a CheckpointError."""
    path = Path(path)
    check_gguf_header(path)
    try:
        return GGUFReader(path)
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


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


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> size
_STRING, _ARRAY = int(GGUFValueType.STRING), int(GGUFValueType.ARRAY)
_MAX_DIMS = 4  # GGML_MAX_DIMS


def check_gguf_header(path: Path) -> None:
    """Walk the header (metadata and tensor infos) and check it against the file; raise CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    if size < 24:
        raise CheckpointError(f"{path}: {size} bytes is too short for a GGUF header; the file is truncated")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
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
        alignment = _check_metadata(cur, n_kv)
        infos = _check_tensor_infos(cur, n_tensors)
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    for name, offset, n_bytes in infos:
        if offset % alignment or data_start + offset + n_bytes > size:
            raise CheckpointError(
                f"{path}: the data of tensor {name!r} ({n_bytes} bytes at offset {offset}) is misaligned or runs past "
                f"the end of the file ({size} bytes); the file is truncated or corrupt"
            )


def _check_metadata(cur: _Cursor, count: int) -> int:
    """Skip over `count` metadata entries, checking them; returns the data alignment."""
    keys: set[str] = set()
    alignment = 32
    for i in range(count):
        key = cur.text(f"metadata key #{i}")
        if key in keys:
            raise CheckpointError(f"{cur.path}: metadata key {key!r} appears twice; the file is corrupt")
        keys.add(key)
        kind = cur.u32(f"the type of metadata {key!r}")
        if key == "general.alignment":
            alignment = cur.u32(key) if kind == int(GGUFValueType.UINT32) else 0
            if alignment == 0 or alignment & (alignment - 1):
                raise CheckpointError(f"{cur.path}: general.alignment must be a power of two stored as uint32")
        else:
            _skip_value(cur, kind, key)
    return alignment


def _skip_value(cur: _Cursor, kind: int, key: str, depth: int = 0) -> None:
    if kind in _SCALAR_BYTES:
        cur.take(_SCALAR_BYTES[kind], f"metadata {key!r}")
    elif kind == _STRING:
        cur.take(cur.u64(f"the length of metadata {key!r}"), f"metadata {key!r}")
    elif kind == _ARRAY and depth < 2:  # the format allows arrays of arrays; no model uses deeper ones
        item_kind, n = cur.u32(f"the item type of {key!r}"), cur.u64(f"the length of {key!r}")
        if item_kind in _SCALAR_BYTES:
            cur.take(n * _SCALAR_BYTES[item_kind], f"array {key!r} of {n} items")
            return
        cur.need(n * 8, f"array {key!r} of {n} items")  # strings and arrays take 8 bytes or more each
        for _ in range(n):
            _skip_value(cur, item_kind, key, depth + 1)
    else:
        raise CheckpointError(f"{cur.path}: metadata {key!r} has unknown value type {kind}; the file is corrupt")


def _check_tensor_infos(cur: _Cursor, count: int) -> list[tuple[str, int, int]]:
    """(name, data offset, bytes) of each tensor, after checking its dimensions and type."""
    infos, names = [], set()
    for i in range(count):
        name = cur.text(f"the name of tensor #{i}")
        if name in names:
            raise CheckpointError(f"{cur.path}: tensor {name!r} appears twice; the file is corrupt")
        names.add(name)
        n_dims = cur.u32(f"tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise CheckpointError(f"{cur.path}: tensor {name!r} claims {n_dims} dimensions; the file is corrupt")
        dims = [cur.u64(f"tensor {name!r}") for _ in range(n_dims)]
        type_id, offset = cur.u32(f"tensor {name!r}"), cur.u64(f"tensor {name!r}")
        if type_id not in GGMLQuantizationType._value2member_map_:
            raise CheckpointError(
                f"{cur.path}: tensor {name!r} has unknown type id {type_id}; the file is corrupt or newer than "
                f"the installed gguf package ({_gguf_version()})"
            )
        block, type_bytes = gguf.GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
        if min(dims) == 0 or dims[0] % block:
            raise CheckpointError(f"{cur.path}: tensor {name!r} has impossible dimensions {dims}; the file is corrupt")
        infos.append((name, offset, math.prod(dims) // block * type_bytes))
    return infos


def _gguf_version() -> str:
    return f"gguf {importlib.metadata.version('gguf')}"


# --- tensors ---
def _dequantize_array(tensor: ReaderTensor) -> np.ndarray:
    if tensor.tensor_type == GGMLQuantizationType.F64:  # the one float type gguf.quants leaves out
        return tensor.data.astype(np.float32)
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


def dequantize(tensor: ReaderTensor, path: Path) -> torch.Tensor:
    """One tensor as float32 in PyTorch's dimension order, copied out of the memory-mapped file."""
    try:
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite results are refused below
            array = _dequantize_array(tensor)
    except NotImplementedError:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which the gguf package "
            f"({_gguf_version()}) cannot dequantize; use a file quantized to another type"
        ) from None
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    # F32 tensors come back as read-only views of the file: copy them out.
    result = torch.from_numpy(np.require(array, np.float32, ["C", "W"])).reshape(shape)
    # GGUF has no checksums; bytes read from the wrong place often decode to NaN or infinity.
    if not torch.isfinite(result).all():
        raise CheckpointError(f"{path}: tensor {tensor.name!r} holds NaN or infinite values; the file is corrupt")
    return result


def gguf_tensors(reader: GGUFReader, config: Config, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Our tensors in float32, one GGUF tensor at a time; the set of names is checked before any is read."""
    tensors = {t.name: t for t in reader.tensors}
    rules = tensor_rules(config, split_kv_b="blk.0.attn_kv_b.weight" not in tensors)
    missing = [name for r in rules for name in r.gguf_names if name not in tensors]
    expected = {name for r in rules for name in r.gguf_names}
    unexpected = [name for name in tensors if name not in expected and not ignored_tensor(config, name)]
    if missing or unexpected:
        problem = f"has no tensor {missing[:3]}" if missing else f"has tensors {unexpected[:3]} with no place"
        raise CheckpointError(
            f"{path}: the file {problem} in a {config.hf_model_type} model of {config.n_layer} layers; "
            "the metadata and the weights do not match"
        )
    for rule in rules:
        stored = [dequantize(tensors[name], path) for name in rule.gguf_names]
        yield from zip(rule.ours, rule.from_stored(stored), strict=True)


# --- entry points ---
def load_gguf_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tokenizer_dir: str | Path | None = None,
) -> GPT:
    """A `GPT` from a GGUF file, dequantized in memory (float32 unless `dtype` says otherwise).

    With `tokenizer_dir`, the tokenizer files are written there from the same read of the file.
    """
    path = Path(path)
    reader = read_gguf(path)
    config = read_config(reader, path)
    if tokenizer_dir is not None:
        _write_tokenizer(reader, Path(tokenizer_dir))
    with torch.device("meta"):
        model = GPT(config)
    tensors = ((k, t.to(device=device, dtype=dtype or torch.float32)) for k, t in gguf_tensors(reader, config, path))
    return load_state(model, tensors, path).to(device)


def convert_from_gguf(path: str | Path, dst_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """GGUF file -> native checkpoint: float32 weights (or `dtype`), config.yaml and tokenizer files."""
    path, dst = Path(path), check_output_path(dst_dir, "dst_dir")
    reader = read_gguf(path)
    config = read_config(reader, path)
    dst.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(reader, dst)
    tensors = gguf_tensors(reader, config, path)
    save_tensors(((k, t.to(dtype)) for k, t in tensors) if dtype is not None else tensors, dst)
    config.save(dst / CONFIG_FILE)
    return dst


def _write_tokenizer(reader: GGUFReader, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(reader, dst)
