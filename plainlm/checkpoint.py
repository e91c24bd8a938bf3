"""Reading and writing weights: the native checkpoint format, lazy tensor sources, format detection.

A native checkpoint directory holds `model.safetensors` (or shards plus
`model.safetensors.index.json`), `config.yaml` and the tokenizer files as the source had them.
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

from plainlm.config import Config
from plainlm.model import GPT
from plainlm.tokenizer import copy_tokenizer_files

CONFIG_FILE = "config.yaml"
DEFAULT_SHARD_BYTES = 5 * 1024**3


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read: the message names the file and what to do."""


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
    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            written.append((_write_shard(shard, directory, f".{stem}-{len(written)}.shard", metadata), list(shard)))
            shard, shard_bytes = {}, 0
        shard[name] = tensor.contiguous()
        shard_bytes += size
        total += size
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
    for name, tensor in model.state_dict().items():
        if model.config.tie_embeddings and name == "lm_head.weight":
            continue
        yield name, tensor.detach()


def save_checkpoint(model: GPT, directory: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write a native checkpoint: weights, config.yaml and (copied unchanged) tokenizer files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(model_tensors(model), directory)
    model.config.save(directory / CONFIG_FILE)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, directory)
    return directory


# --- loading into a model ---
def load_state(model: GPT, tensors: Iterable[tuple[str, torch.Tensor]], origin: str | Path) -> GPT:
    """Assign tensors into a model built on the meta device, checking every name and shape."""
    expected = dict(model.state_dict())
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if name not in expected:
            raise CheckpointError(f"{origin}: unexpected tensor {name!r}; the weights do not belong to this config")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{origin}: tensor {name!r} has shape {tuple(tensor.shape)} but the config needs "
                f"{tuple(expected[name].shape)}; the config and the weights are of different models"
            )
        state[name] = tensor
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{origin}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
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
    source = TensorSource(directory)
    with torch.device("meta"):
        model = GPT(config)
    tensors = ((k, _cast(source.get(k), dtype, device)) for k in source.keys())
    return load_state(model, tensors, directory).to(device)


def _cast(t: torch.Tensor, dtype: torch.dtype | None, device: str | torch.device) -> torch.Tensor:
    return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)


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
