"""GGUF files (llama.cpp) -> plainlm: read them safely, dequantize the weights, load or convert.

`load_gguf_model` builds a `GPT` in memory; `convert_from_gguf` writes a native checkpoint (weights,
config.yaml and the tokenizer files from `gguf_tokenizer.py`). Tensors are dequantized one at a time
with `gguf.quants`, so the peak is the model in float32 plus one tensor. Reading the file, with every
count and offset of its header checked, is `gguf_reader.py`'s; what llama.cpp calls things, per
architecture (metadata keys -> Config, tensor names and layouts), is `gguf_names.py`'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

from plainlm.checkpoint import CONFIG_FILE, check_output_path, load_state, save_tensors
from plainlm.config import Config
from plainlm.convert.gguf_names import ignored_tensor, read_config, tensor_rules
from plainlm.convert.gguf_reader import GGUFFile, GGUFTensor, gguf_version, read_gguf
from plainlm.convert.gguf_tokenizer import write_tokenizer_files
from plainlm.errors import CheckpointError
from plainlm.model import GPT


# --- tensors ---
def _dequantize_array(tensor: GGUFTensor) -> np.ndarray:
    if tensor.tensor_type == GGMLQuantizationType.F64:  # the one float type gguf.quants leaves out
        return tensor.data.astype(np.float32)
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


def dequantize(tensor: GGUFTensor, path: Path) -> torch.Tensor:
    """One tensor as float32 in PyTorch's dimension order, copied out of the memory-mapped file."""
    try:
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite results are refused below
            array = _dequantize_array(tensor)
    except NotImplementedError:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which the gguf package "
            f"({gguf_version()}) cannot dequantize; use a file quantized to another type"
        ) from None
    # F32 tensors come back as read-only views of the file: copy them out.
    result = torch.from_numpy(np.require(array, np.float32, ["C", "W"])).reshape(tuple(reversed(tensor.shape)))
    # GGUF has no checksums; bytes read from the wrong place often decode to NaN or infinity.
    if not torch.isfinite(result).all():
        raise CheckpointError(f"{path}: tensor {tensor.name!r} holds NaN or infinite values; the file is corrupt")
    return result


def gguf_tensors(reader: GGUFFile, config: Config, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
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


def _write_tokenizer(reader: GGUFFile, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(reader, dst)
