"""Corrupt GGUF files: every damaged variant of a small valid file ends in a clean CheckpointError.

The base file is a tiny llama model (q8_0 matrices, float32 norms, a 160-token vocabulary list), about
100 KB, written as llama.cpp writes it. Each variant truncates it, flips header bytes, or sets a count,
length, dimension, offset, type or metadata value to something absurd. Loading must raise a
CheckpointError that names the file: never hang (60 s timeout per case), crash, or allocate on the
strength of a corrupt count (numpy's peak, which the gguf reader allocates through, stays under 64 MB).
"""

from __future__ import annotations

import random
import struct
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType, GGUFReader
from helpers import run_cli
from helpers_gguf import VOCAB, make_tiny_model, write_gguf

from plainlm import LLM
from plainlm.convert.gguf import load_gguf_model
from plainlm.errors import CheckpointError

PEAK_BYTES = 64 * 1024**2


@dataclass
class Layout:
    """Where things are in the base file, found with the gguf reader."""

    data: bytes
    values: dict[str, int]  # metadata key -> byte offset of its value
    types: dict[str, int]  # metadata key -> byte offset of its value type
    keys: dict[str, int]  # metadata key -> byte offset of the key's length
    tensors: list[dict[str, int]]  # per tensor: offsets of name, n_dims, dim0, type, offset
    tensor_names: list[str]
    data_offset: int


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    path = tmp_path_factory.mktemp("gguf") / "base.gguf"
    write_gguf(make_tiny_model("llama"), "llama", path, GGMLQuantizationType.Q8_0, [f"tok{i}" for i in range(VOCAB)])
    load_gguf_model(path)  # the base file itself is fine
    reader = GGUFReader(path)
    values, types, keys = {}, {}, {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        keys[key] = field.offset
        types[key] = field.offset + 8 + len(key.encode())
        values[key] = types[key] + 4
    tensors = []
    for t in reader.tensors:
        n_dims_at = t.field.offset + 8 + len(t.name.encode())
        n_dims = len(t.shape)
        tensors.append(dict(name=t.field.offset, n_dims=n_dims_at, dim0=n_dims_at + 4, type=n_dims_at + 4 + 8 * n_dims))
        tensors[-1]["offset"] = tensors[-1]["type"] + 4
    names = [t.name for t in reader.tensors]
    return Layout(path.read_bytes(), values, types, keys, tensors, names, reader.data_offset)


def put(data: bytes, at: int, fmt: str, value: int | float | bytes) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def same_length_keys(base: Layout) -> tuple[str, str]:
    by_length: dict[int, str] = {}
    for key in base.keys:
        if len(key) in by_length:
            return by_length[len(key)], key
        by_length[len(key)] = key
    raise AssertionError("no two metadata keys of equal length")


def rename_key(base: Layout, key: str, new: str) -> bytes:
    assert len(new) == len(key)
    return put(base.data, base.keys[key] + 8, f"{len(new)}s", new.encode())


# name -> how to damage the base file
VARIANTS: dict[str, Callable[[Layout], bytes]] = {
    # truncations, from inside the magic to one byte short of the end
    **{f"truncated-at-{n}": (lambda b, n=n: b.data[:n]) for n in (0, 3, 4, 12, 23, 24, 40, 100)},
    "truncated-in-token-list": lambda b: b.data[: b.values["tokenizer.ggml.tokens"] + 500],
    "truncated-in-tensor-infos": lambda b: b.data[: b.tensors[3]["dim0"] + 3],
    "truncated-at-data-start": lambda b: b.data[: b.data_offset],
    "truncated-in-data": lambda b: b.data[: b.data_offset + 1000],
    "truncated-one-byte-short": lambda b: b.data[:-1],
    # header
    "bad-magic": lambda b: put(b.data, 0, "4s", b"GGUX"),
    "version-1": lambda b: put(b.data, 4, "<I", 1),
    "version-99": lambda b: put(b.data, 4, "<I", 99),
    "version-big-endian": lambda b: put(b.data, 4, ">I", 3),
    "tensor-count-2**63": lambda b: put(b.data, 8, "<Q", 2**63),
    "tensor-count-million": lambda b: put(b.data, 8, "<Q", 10**6),
    "tensor-count-plus-one": lambda b: put(b.data, 8, "<Q", len(b.tensors) + 1),
    # One tensor fewer shifts where the data starts; caught because the shifted bytes decode to NaN. GGUF has
    # no checksum, so a shift that happened to decode to finite numbers could not be told from a valid file.
    "tensor-count-minus-one": lambda b: put(b.data, 8, "<Q", len(b.tensors) - 1),
    "kv-count-2**40": lambda b: put(b.data, 16, "<Q", 2**40),
    "kv-count-plus-one": lambda b: put(b.data, 16, "<Q", len(b.keys) + 1),
    "kv-count-minus-one": lambda b: put(b.data, 16, "<Q", len(b.keys) - 1),
    # metadata
    "key-length-2**62": lambda b: put(b.data, 24, "<Q", 2**62),
    "key-not-utf8": lambda b: put(b.data, 32, "2s", b"\xff\xfe"),
    "duplicate-key": lambda b: rename_key(b, same_length_keys(b)[1], same_length_keys(b)[0]),
    "value-type-99": lambda b: put(b.data, b.types["llama.block_count"], "<I", 99),
    "array-item-type-99": lambda b: put(b.data, b.values["tokenizer.ggml.tokens"], "<I", 99),
    "array-count-2**60": lambda b: put(b.data, b.values["tokenizer.ggml.tokens"] + 4, "<Q", 2**60),
    "array-count-plus-1000": lambda b: put(b.data, b.values["tokenizer.ggml.tokens"] + 4, "<Q", VOCAB + 1000),
    "string-length-2**63": lambda b: put(b.data, b.values["tokenizer.ggml.tokens"] + 12, "<Q", 2**63),
    "string-length-past-end": lambda b: put(b.data, b.values["general.architecture"], "<Q", len(b.data)),
    # metadata values
    "unknown-architecture": lambda b: put(b.data, b.values["general.architecture"] + 8, "5s", b"mamba"),
    "missing-block-count": lambda b: rename_key(b, "llama.block_count", "llama.block_counx"),
    "block-count-as-float": lambda b: put(b.data, b.types["llama.block_count"], "<I", 6),
    "block-count-2**31": lambda b: put(b.data, b.values["llama.block_count"], "<I", 2**31),
    "block-count-0": lambda b: put(b.data, b.values["llama.block_count"], "<I", 0),
    "block-count-1000": lambda b: put(b.data, b.values["llama.block_count"], "<I", 1000),
    "block-count-one-too-few": lambda b: put(b.data, b.values["llama.block_count"], "<I", 1),
    "context-length-2**32-1": lambda b: put(b.data, b.values["llama.context_length"], "<I", 2**32 - 1),
    "head-count-0": lambda b: put(b.data, b.values["llama.attention.head_count"], "<I", 0),
    "head-count-7": lambda b: put(b.data, b.values["llama.attention.head_count"], "<I", 7),
    "head-count-kv-3": lambda b: put(b.data, b.values["llama.attention.head_count_kv"], "<I", 3),
    "embedding-length-wrong": lambda b: put(b.data, b.values["llama.embedding_length"], "<I", 65),
    "rms-eps-nan": lambda b: put(b.data, b.values["llama.attention.layer_norm_rms_epsilon"], "<f", float("nan")),
    # tensor infos
    "n-dims-0": lambda b: put(b.data, b.tensors[0]["n_dims"], "<I", 0),
    "n-dims-1000": lambda b: put(b.data, b.tensors[0]["n_dims"], "<I", 1000),
    "dim-2**40": lambda b: put(b.data, b.tensors[0]["dim0"], "<Q", 2**40),
    "dim-0": lambda b: put(b.data, b.tensors[0]["dim0"], "<Q", 0),
    "dim-not-a-block-multiple": lambda b: put(b.data, b.tensors[0]["dim0"], "<Q", 33),
    "dim-halved": lambda b: put(b.data, b.tensors[0]["dim0"], "<Q", 32),
    "tensor-name-length-2**63": lambda b: put(b.data, b.tensors[0]["name"], "<Q", 2**63),
    "duplicate-tensor-name": lambda b: put(
        b.data, b.tensors[b.tensor_names.index("blk.0.attn_k.weight")]["name"] + 8, "19s", b"blk.0.attn_q.weight"
    ),
    "unknown-tensor-type-99": lambda b: put(b.data, b.tensors[0]["type"], "<I", 99),
    "tensor-type-q8_1-cannot-dequantize": lambda b: put(b.data, b.tensors[0]["type"], "<I", 9),
    "tensor-type-i32": lambda b: put(b.data, b.tensors[0]["type"], "<I", 26),
    "tensor-offset-2**50": lambda b: put(b.data, b.tensors[0]["offset"], "<Q", 2**50),
    "tensor-offset-misaligned": lambda b: put(b.data, b.tensors[-1]["offset"], "<Q", 1),
    "tensor-offset-past-end": lambda b: put(b.data, b.tensors[-1]["offset"], "<Q", len(b.data) - b.data_offset),
    # not GGUF at all
    "empty-file": lambda b: b"",
    "zeros": lambda b: bytes(4096),
    "random-bytes": lambda b: random.Random(0).randbytes(4096),
    "magic-then-random": lambda b: b"GGUF" + struct.pack("<I", 3) + random.Random(1).randbytes(4096),
}


def load_measured(path: Path) -> None:
    tracemalloc.start()
    try:
        load_gguf_model(path)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < PEAK_BYTES, f"loading allocated {peak / 1e6:.0f} MB (numpy / Python)"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_corrupt_file_raises_checkpoint_error(variant: str, base: Layout, tmp_path: Path) -> None:
    path = tmp_path / f"{variant}.gguf"
    path.write_bytes(VARIANTS[variant](base))
    assert path.read_bytes() != base.data
    with pytest.raises(CheckpointError) as error:
        load_measured(path)
    assert str(path) in str(error.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(8))
def test_random_damage_loads_or_raises_checkpoint_error(seed: int, base: Layout, tmp_path: Path) -> None:
    """Bytes overwritten at random places in the header: the result loads (a harmless change, e.g.
    inside a token string) or raises a CheckpointError, nothing else."""
    rng = random.Random(seed)
    data = bytearray(base.data)
    for _ in range(4):
        data[rng.randrange(base.data_offset)] = rng.randrange(256)
    path = tmp_path / f"random-{seed}.gguf"
    path.write_bytes(bytes(data))
    try:
        load_measured(path)
    except CheckpointError as e:
        assert str(path) in str(e)


@pytest.mark.timeout(60)
def test_random_truncations_raise(base: Layout, tmp_path: Path) -> None:
    rng = random.Random(0)
    for n in sorted(rng.sample(range(len(base.data)), 24)):
        path = tmp_path / f"cut-{n}.gguf"
        path.write_bytes(base.data[:n])
        with pytest.raises(CheckpointError):
            load_measured(path)


@pytest.mark.timeout(60)
def test_llm_load_and_cli_report_corrupt_files_cleanly(base: Layout, tmp_path: Path) -> None:
    path = tmp_path / "truncated.gguf"
    path.write_bytes(base.data[: base.data_offset + 1000])
    with pytest.raises(CheckpointError):
        LLM.load(path)
    result = run_cli("convert", "from-gguf", str(path), str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and str(path) in result.stderr
    assert "Traceback" not in result.stderr
