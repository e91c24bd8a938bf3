"""Reading and writing weights: the native checkpoint format, lazy tensor sources, format detection.

A native checkpoint directory holds `model.safetensors` (or shards plus
`model.safetensors.index.json`), `config.yaml` and the tokenizer files as the source had them.
A quantized model's checkpoint also holds `quantization.json` ({"mode": "int8", "group_size": null})
and its quantized tensors as they are stored in memory (see `quantize.py`).
Only tensors are ever deserialised: safetensors first, `.bin` / `.pth` through
`torch.load(weights_only=True)`, which refuses anything but tensors.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from plainlm import quantize
from plainlm.config import Config
from plainlm.errors import CheckpointError, InvalidInput
from plainlm.model import GPT
from plainlm.tokenizer import copy_tokenizer_files

CONFIG_FILE = "config.yaml"
QUANTIZATION_FILE = "quantization.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3


# --- reading ---
class TensorSource:
    """Every tensor of a directory's weight files, read one at a time on request.

    Safetensors files are opened lazily (memory-mapped); `.bin` files are loaded with
    `weights_only=True` and memory-mapped where the format allows.
    """

    def __init__(self, directory: str | Path, stem: str = "model") -> None:
        self.directory = Path(directory)
        self.files = find_weight_files(self.directory, stem)
        self._where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        for file in self.files:
            for key in self._handle(file).keys():
                self._where[key] = file

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        handle = self._handle(self._where[key])
        if isinstance(handle, dict):
            return tuple(handle[key].shape)
        return tuple(handle.get_slice(key).get_shape())

    def meta(self, key: str) -> torch.Tensor:
        """A tensor of `key`'s shape on the meta device: what shape checks need, without reading the data."""
        return torch.empty(self.shape(key), device="meta")

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise CheckpointError(f"{self.directory}: the weights have no tensor named {key!r}")
        file = self._where[key]
        handle = self._handle(file)
        try:
            return handle[key] if isinstance(handle, dict) else handle.get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(
                f"{file}: tensor {key!r} cannot be read ({e}); the file is corrupt, download it again"
            ) from None

    def _handle(self, file: Path) -> object:
        if file not in self._open:
            self._open[file] = _open_weights(file)
        return self._open[file]


def find_weight_files(directory: Path, stem: str = "model") -> list[Path]:
    """The weight files of a directory: an index's shards, else single files, safetensors first."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; pass the folder that holds the model's weights")
    for index_name in (f"{stem}.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid weight index ({e}); download it again") from None
            files = [directory / f for f in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index}: lists shards that are missing: {missing}; download them again")
            return files
    for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt"):
        files = sorted(p for p in directory.glob(pattern) if not p.name.startswith(("adapter_", "training_")))
        if files:
            return files
    raise CheckpointError(
        f"{directory}: no weights found (looked for *.safetensors, *.bin, *.pth and their index files); "
        "point to a model directory, or download the model first with `plainlm download ORG/NAME`"
    )


def _open_weights(file: Path) -> object:
    if file.suffix == ".safetensors":
        try:
            return safe_open(str(file), framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{file}: not a readable safetensors file ({e}); it is truncated or corrupt, download it again"
            ) from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise CheckpointError(f"{file}: cannot be read as a PyTorch weights file ({e})") from None
        state = _load_tensors_only(file)
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, AttributeError) as e:
        raise _unsafe_or_corrupt(file, e) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: holds something other than a flat dict of tensors; refusing to use it")
    return state


def _load_tensors_only(file: Path) -> object:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, RuntimeError, AttributeError) as e:
        raise _unsafe_or_corrupt(file, e) from None


def _unsafe_or_corrupt(file: Path, error: Exception) -> CheckpointError:
    if isinstance(error, pickle.UnpicklingError):
        return CheckpointError(
            f"{file}: holds objects other than tensors, which plainlm never unpickles (they could run code). "
            "Convert it to safetensors with a tool you trust, or use the model's .safetensors files"
        )
    return CheckpointError(f"{file}: truncated or corrupt ({type(error).__name__}: {error}); download it again")


# --- writing ---
def check_output_path(path: str | Path, name: str, file: bool = False) -> Path:
    """`path`, a folder to write into (with file=True, a file to write), as a Path; an InvalidInput naming
    `name`, the argument as the CLI spells it ("--out_dir", "dst_dir"), when it or a folder it needs is an
    existing file. Creates nothing: a command checks before it loads, downloads or trains."""
    path = Path(path)
    for folder in path.parents if file else (path, *path.parents):
        if folder.exists() and not folder.is_dir():
            what = "is an existing file" if folder == path else f"cannot be created: {folder} is a file"
            where = "write it into a folder" if file else "pass a folder to write into (it is created if missing)"
            raise InvalidInput(f"{name} {path} {what}; {where}")
    return path


def save_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]],
    directory: str | Path,
    stem: str = "model",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write tensors to `stem.safetensors`, or to numbered shards plus an index past `max_shard_bytes`.

    Tensors are consumed one at a time, so a caller that produces them lazily keeps at most one
    shard in memory. Every file is written under a temporary name and renamed into place.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, total = 0, 0
    written: list[tuple[Path, list[str]]] = []  # temporary shard files and their keys
    try:
        for name, tensor in tensors:
            size = tensor.numel() * tensor.element_size()
            if shard and shard_bytes + size > max_shard_bytes:
                shard_file = _write_shard(shard, directory, f".{stem}-{len(written)}.shard", metadata)
                written.append((shard_file, list(shard)))
                shard, shard_bytes = {}, 0
            shard[name] = tensor.contiguous()
            shard_bytes += size
            total += size
    except BaseException:  # a tensor that fails to read or convert: leave no hidden shards behind
        for path, _ in written:
            path.unlink(missing_ok=True)
        raise
    if not written:
        return [_write_shard(shard, directory, f"{stem}.safetensors", metadata)]
    written.append((_write_shard(shard, directory, f".{stem}-{len(written)}.shard", metadata), list(shard)))
    # Name the shards as Hugging Face does, now that their count is known.
    final, weight_map = [], {}
    for i, (path, keys) in enumerate(written):
        target = directory / f"{stem}-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(path, target)
        final.append(target)
        weight_map.update(dict.fromkeys(keys, target.name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_text(directory / f"{stem}.safetensors.index.json", json.dumps(index, indent=2))
    return final


def _write_shard(tensors: dict[str, torch.Tensor], directory: Path, name: str, metadata: dict[str, str] | None) -> Path:
    target = directory / name
    tmp = directory / f".{name}.partial"
    save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, target)
    return target


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def model_tensors(model: GPT) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors to save: the tied head is written once, as the embedding."""
    written: set[int] = set()
    for name, tensor in model.state_dict().items():
        if _is_tied_head(model, name):
            continue
        # safetensors refuses two names for one storage (bitsandbytes shares its NF4 code table).
        if tensor.data_ptr() in written and tensor.numel():
            tensor = tensor.clone()
        written.add(tensor.data_ptr())
        yield name, tensor.detach()


def _is_tied_head(model: GPT, name: str) -> bool:
    """The lm_head's tensors that are the embedding's (its weight, and the scales of a quantized one)."""
    return model.config.tie_embeddings and name.startswith("lm_head.") and name != "lm_head.bias"


def save_checkpoint(model: GPT, directory: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write a native checkpoint: weights, config.yaml and (copied unchanged) tokenizer files.

    A quantized model (`quantize.quantize_model`) writes its quantized tensors and quantization.json.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(model_tensors(model), directory)
    if model.quantization is not None:
        atomic_write_text(directory / QUANTIZATION_FILE, json.dumps(model.quantization))
    elif (directory / QUANTIZATION_FILE).exists():  # a float model written over a quantized one
        (directory / QUANTIZATION_FILE).unlink()
    model.config.save(directory / CONFIG_FILE)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, directory)
    return directory


# --- loading into a model ---
def checked_tensors(
    model: GPT, tensors: Iterable[tuple[str, torch.Tensor]], origin: str | Path
) -> Iterator[tuple[str, torch.Tensor]]:
    """`tensors` as they come, each checked against `model` (built on the meta device: its names and shapes
    are the config's): a name it has, the shape it needs; at the end, none missing. Loading and from-hf
    both check through this."""
    expected = {k: v for k, v in model.state_dict().items() if not _is_tied_head(model, k)}
    seen: set[str] = set()
    for name, tensor in tensors:
        if name not in expected:
            raise CheckpointError(f"{origin}: unexpected tensor {name!r}; the weights do not belong to this config")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{origin}: tensor {name!r} has shape {tuple(tensor.shape)} but the config needs "
                f"{tuple(expected[name].shape)}; the config and the weights are of different models"
            )
        seen.add(name)
        yield name, tensor
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{origin}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def load_state(model: GPT, tensors: Iterable[tuple[str, torch.Tensor]], origin: str | Path) -> GPT:
    """Assign tensors into a model built on the meta device, checking every name and shape."""
    state = dict(checked_tensors(model, tensors, origin))
    model.load_state_dict(state, strict=False, assign=True)
    for name in [k for k in model.state_dict() if _is_tied_head(model, k)]:
        attribute = name.removeprefix("lm_head.")  # weight, and a quantized matrix's scales
        setattr(model.lm_head, attribute, getattr(model.embed, attribute))
    return model


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """A `GPT` with the weights of a native checkpoint directory."""
    directory = Path(directory)
    config_file = directory / CONFIG_FILE
    if not config_file.exists():
        raise CheckpointError(
            f"{directory}: no {CONFIG_FILE}; is this a plainlm checkpoint? (convert one with `plainlm convert from-hf`)"
        )
    config = Config.from_file(config_file)
    quantization = read_quantization(directory)
    source = TensorSource(directory)
    with torch.device("meta"):
        model = GPT(config)
    if quantization is not None:
        return _load_quantized(model, source, quantization, directory, torch.device(device), dtype)
    tensors = ((k, _cast(source.get(k), dtype, device)) for k in source.keys())
    return load_state(model, tensors, directory).to(device)


def _cast(t: torch.Tensor, dtype: torch.dtype | None, device: str | torch.device) -> torch.Tensor:
    return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)


def read_quantization(directory: str | Path) -> dict | None:
    """The contents of a checkpoint's quantization.json, or None for a float checkpoint."""
    file = Path(directory) / QUANTIZATION_FILE
    if not file.exists():
        return None
    try:
        quantization = json.loads(file.read_text())
        mode = quantization["mode"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f'{file}: not valid ({e}); expected {{"mode": "int8", "group_size": null}}') from None
    if mode not in quantize.MODES:
        known = ", ".join(quantize.MODES)
        raise CheckpointError(f"{file}: unknown quantization mode {mode!r}; this plainlm knows {known}")
    return quantization


def _load_quantized(
    model: GPT,
    source: TensorSource,
    quantization: dict,
    directory: Path,
    device: torch.device,
    dtype: torch.dtype | None,
) -> GPT:
    """Build the quantized layers of a meta-device model straight from their saved tensors (no re-quantizing)."""
    mode = quantization["mode"]
    nf4_layers = quantize.quantized_linear_names(model, mode) if mode in quantize.BITSANDBYTES_MODES else []
    if quantization.get("packed"):  # a GPTQ or AWQ checkpoint's layers, as its loader made them
        quantize.empty_packed_model(model, {k: source.shape(k) for k in source.keys()}, quantization)
    else:
        quantize.empty_quantized_model(model, mode, quantization.get("group_size"), dtype or torch.float32)
    nf4_keys = {k for k in source.keys() if k.startswith(tuple(f"{name}." for name in nf4_layers))}

    def cast(key: str) -> torch.Tensor:
        t = source.get(key)
        stored = key.endswith((".scales", ".scales_and_zeros")) or (key in nf4_keys and not key.endswith(".bias"))
        if stored or not t.is_floating_point():
            # Quantized tensors keep their dtype, in memory of their own: PyTorch's int8 kernel
            # faults on the unaligned addresses a tensor inside a safetensors file can have.
            return t.to(device, copy=True)
        return _cast(t, dtype, device)

    load_state(model, ((k, cast(k)) for k in source.keys() if k not in nf4_keys), directory).to(device)
    for name in nf4_layers:
        prefix = f"{name}."
        tensors = {k.removeprefix(prefix): cast(k) for k in nf4_keys if k.startswith(prefix)}
        if "weight" not in tensors:
            raise CheckpointError(
                f"{directory}: no tensors for the {mode} layer {name!r}; the checkpoint is incomplete"
            )
        quantize.set_module(model, name, quantize.nf4_from_tensors(tensors, device))
    return quantize.finish_loading(model)


def detect_format(path: str | Path) -> str:
    """'plainlm', 'hf' or 'gguf' for a checkpoint path, or a clear error."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir() and (path / CONFIG_FILE).exists():
        return "plainlm"
    if path.is_dir() and (path / "config.json").exists():
        return "hf"
    raise CheckpointError(
        f"{path}: neither a plainlm checkpoint (config.yaml) nor a Hugging Face model (config.json) nor a .gguf file"
    )
