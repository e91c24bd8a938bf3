"""plainlm's GGUF reader (plainlm/convert/gguf_reader.py) against the `gguf` package's own GGUFReader: the same
metadata values and types, the same tensors (names, types, shapes, sizes, bytes), on a file holding every
value type and a spread of tensor types, and on the packaged SmolLM2 file. Corrupt files are
test_gguf_corrupt.py's."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType

from plainlm.convert.gguf_reader import GGUFFile, read_gguf
from plainlm.errors import PackagedModelMissing
from plainlm.packaged_models import smollm2_gguf

# GGUFReader's own entries for the header's counts, not metadata of the file
HEADER_ENTRIES = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")


def assert_same_as_ggufs_reader(ours: GGUFFile, path: Path) -> None:
    theirs = gguf.GGUFReader(path)
    keys = [k for k in theirs.fields if k not in HEADER_ENTRIES]
    assert list(ours.fields) == keys
    for key in keys:
        assert ours.fields[key].types == tuple(int(t) for t in theirs.fields[key].types), key
        assert ours.fields[key].value == theirs.fields[key].contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, their in zip(ours.tensors, theirs.tensors, strict=True):
        assert (mine.tensor_type, mine.shape, mine.n_elements, mine.n_bytes) == (
            their.tensor_type,
            tuple(their.shape.tolist()),
            their.n_elements,
            their.n_bytes,
        ), mine.name
        assert mine.data.dtype == their.data.dtype and mine.data.shape == their.data.shape, mine.name
        assert np.array_equal(mine.data, their.data, equal_nan=True), mine.name
        assert not mine.data.flags.writeable  # a view of the file, which must not change under it


def test_every_value_type_and_a_spread_of_tensor_types_read_as_ggufs_reader_reads_them(tmp_path: Path) -> None:
    path = tmp_path / "all.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.1)  # not exact in float32: both readers give the float32's value
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.text", "naïve ▁tokens 🙂")
    writer.add_string("t.empty", "")
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, -1.25, 3.1])
    writer.add_array("t.bools", [True, False, True])
    writer.add_array("t.texts", ["a", "", "ü", "<0x0A>"])
    writer.add_array("t.none", [])
    generator = np.random.default_rng(0)
    weights = generator.standard_normal((8, 64)).astype(np.float32)
    writer.add_tensor("f32", weights[:3, :5])
    writer.add_tensor("f16", weights.astype(np.float16))
    writer.add_tensor("i32", np.arange(12, dtype=np.int32).reshape(3, 4))
    writer.add_tensor("vector", weights[0])
    for qtype in (GGMLQuantizationType.BF16, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_1):
        writer.add_tensor(qtype.name, gguf.quants.quantize(weights, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = read_gguf(path)
    assert_same_as_ggufs_reader(ours, path)
    assert ours.fields["t.texts"].types == (int(GGUFValueType.ARRAY), int(GGUFValueType.STRING))
    assert ours.fields["t.u64"].value == 2**63 + 5 and ours.fields["t.bool"].value is True
    assert ours.tensors[1].data.dtype == np.float16 and ours.tensors[1].data.shape == (8, 64)
    assert ours.tensors[-1].data.shape == (8, 64 // 32 * 20)  # Q4_1: 20 bytes per block of 32


def test_an_array_of_arrays_reads_as_lists(tmp_path: Path) -> None:
    """The format allows it and the `gguf` package writes it; no model uses it, and its reader does not list it."""
    path = tmp_path / "nested.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_array("t.nested", [[1, 2], [3]])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    field = read_gguf(path).fields["t.nested"]
    assert field.types == (int(GGUFValueType.ARRAY), int(GGUFValueType.ARRAY)) and field.value == [[1, 2], [3]]


def test_the_packaged_smollm2_file_reads_as_ggufs_reader_reads_it() -> None:
    """A real vocabulary (49,152 tokens and their merges) and llama.cpp's Q4_1 and Q8_0 blocks."""
    try:
        path = smollm2_gguf()
    except PackagedModelMissing as e:
        pytest.skip(str(e))
    assert_same_as_ggufs_reader(read_gguf(path), path)
