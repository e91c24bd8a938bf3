"""Hugging Face model directories <-> plainlm, both ways, losslessly.

from-hf reads `config.json` and the weights (safetensors or `.bin`, sharded or not) one tensor
at a time and writes a native checkpoint; to-hf writes `config.json` plus safetensors
(sharded with an index past a size) that `transformers.AutoModelForCausalLM.from_pretrained`
loads as it is. The name maps per family are in `hf_weights.py`, the config maps in `hf_config.py`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from plainlm.checkpoint import (
    CONFIG_FILE,
    DEFAULT_SHARD_BYTES,
    TensorSource,
    atomic_write_text,
    check_output_path,
    checked_tensors,
    load_state,
    read_quantization,
    save_checkpoint,
    save_tensors,
)
from plainlm.config import Config
from plainlm.convert.hf_config import config_from_hf, config_to_hf
from plainlm.convert.hf_quantized import (
    DEQUANTIZED_METHODS,
    PackedLayers,
    packed_config,
    packed_tensors,
    quant_method,
    read_packed_format,
)
from plainlm.convert.hf_weights import IGNORED_HF_PREFIXES, IGNORED_HF_SUFFIXES, weight_rules
from plainlm.convert.mxfp4 import Mxfp4Source
from plainlm.errors import CheckpointError
from plainlm.model import GPT
from plainlm.quantize import check_mode, dequantize_model, finish_loading
from plainlm.tokenizer import copy_tokenizer_files


def read_hf_json(directory: str | Path) -> dict:
    """A Hugging Face directory's config.json, as it is."""
    path = Path(directory) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory}: no config.json; is this a Hugging Face model directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_hf_config(directory: str | Path) -> Config:
    path = Path(directory) / "config.json"
    hf = read_hf_json(directory)
    try:
        return config_from_hf(hf, name=Path(directory).name)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except KeyError as e:
        raise CheckpointError(f"{path}: missing field {e} that a {hf.get('model_type')} config needs") from None


def hf_to_plainlm_tensors(
    config: Config,
    source: TensorSource,
    read: Callable[[str], torch.Tensor] | None = None,
    packed: PackedLayers | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Our tensors, produced one Hugging Face tensor at a time, read through `read` (default source.get;
    source.meta gives the shapes alone). `packed`: a GPTQ or AWQ checkpoint's layers (hf_quantized.py)."""
    read = read or source.get
    used: set[str] = set()
    for rule in weight_rules(config):
        if packed is not None and rule.hf in packed:
            used.update(packed.source_keys(rule.hf))
            yield from packed.tensors(rule.hf, read)
            continue
        keys = [_find_key(source, name) for name in rule.hf_names]
        if None in keys:
            raise CheckpointError(
                f"{source.directory}: the weights have no tensor {rule.hf_names[keys.index(None)]!r}, which a "
                f"{config.hf_model_type} model with this config.json needs; the config and the weights do not match"
            )
        used.update(keys)
        tensors = [read(key) for key in keys]
        try:
            parts = rule.split(tensors if rule.parts else tensors[0])
        except RuntimeError:  # a fused tensor (q/k/v, gate/up) whose size this config cannot split
            shapes = ", ".join(f"{key!r} has shape {tuple(t.shape)}" for key, t in zip(keys, tensors, strict=True))
            raise CheckpointError(
                f"{source.directory}: tensor {shapes[:300]}, which does not split into "
                f"{', '.join(rule.ours)} for this config.json; the config and the weights are of different models"
            ) from None
        yield from zip(rule.ours, parts, strict=True)
    unused = [
        k
        for k in source.keys()
        if k not in used and not k.endswith(IGNORED_HF_SUFFIXES) and not k.startswith(IGNORED_HF_PREFIXES)
    ]
    if config.hf_model_type in ("deepseek_v3", "glm4_moe"):
        # their multi-token-prediction layers (model.layers.{n_layer}.*), which next-token decoding never runs
        # and transformers does not load either
        unused = [k for k in unused if not k.startswith(f"model.layers.{config.n_layer}.")]
    if config.tie_embeddings:
        unused = [k for k in unused if not k.endswith("lm_head.weight")]
    if unused:
        raise CheckpointError(
            f"{source.directory}: tensors {unused[:5]}{' ...' if len(unused) > 5 else ''} have no place in a "
            f"{config.hf_model_type} model with this config.json; the weights belong to a different architecture"
        )


def _find_key(source: TensorSource, name: str) -> str | None:
    # Old GPT-2 checkpoints have no "transformer." prefix; some exports add a "model." one; a multimodal
    # checkpoint (Llama 4) holds its text model under "language_model.".
    candidates = (name, name.removeprefix("transformer."), name.removeprefix("model."), f"model.{name}")
    for candidate in (*candidates, f"language_model.{name}"):
        if candidate in source:
            return candidate
    return None


def plainlm_to_hf_tensors(
    config: Config,
    get: Callable[[str], torch.Tensor],
    packed: dict[str, bool] | None = None,
    method: str = "gptq",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face tensors from ours, read through `get(name)` one rule at a time. `packed`: the layers held
    as a GPTQ or AWQ checkpoint's int4 or int8 (hf_quantized.py), and whether each has an input order: written
    as `method`'s layers ("gptq" or "awq")."""
    packed = packed or {}
    for rule in weight_rules(config):
        layer = rule.ours[0].removesuffix(".weight")
        if layer in packed:
            order = get(f"{layer}.input_order") if packed[layer] else None
            tensors = packed_tensors(method, get(rule.ours[0]), get(f"{layer}.scales_and_zeros"), order, layer)
            yield from ((f"{rule.hf.removesuffix('.weight')}.{suffix}", t) for suffix, t in tensors.items())
        else:
            joined = rule.join([get(name) for name in rule.ours])
            yield from zip(rule.hf_names, joined if rule.parts else [joined], strict=True)


def load_hf_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """A `GPT` straight from a Hugging Face directory, converted in memory."""
    config = read_hf_config(directory)
    source = hf_tensor_source(directory)
    with torch.device("meta"):
        model = GPT(config)
    packed = packed_layers(model, directory, source)
    if packed is not None:
        check_mode(packed.format.mode, None, torch.device(device))  # CPU and CUDA kernels: elsewhere, one refusal

    def cast(name: str, t: torch.Tensor) -> torch.Tensor:
        keep = not t.is_floating_point() or dtype is None or name.endswith(".scales_and_zeros")
        return t.to(device=device, dtype=t.dtype if keep else dtype)

    tensors = ((k, cast(k, t)) for k, t in hf_to_plainlm_tensors(config, source, packed=packed))
    model = load_state(model, tensors, directory).to(device)
    return model if packed is None else finish_loading(packed.finish(model))


def hf_tensor_source(directory: str | Path) -> TensorSource:
    """A Hugging Face directory's tensors; an MXFP4 checkpoint's (gpt-oss) dequantized as they are read, to
    the dtype config.json gives the model (bfloat16 on the hub), so that every weight has one dtype."""
    hf = read_hf_json(directory)
    if quant_method(hf) not in DEQUANTIZED_METHODS:
        return TensorSource(directory)
    dtype = getattr(torch, str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"), None)
    return Mxfp4Source(directory, dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None)


def packed_layers(model: GPT, directory: str | Path, source: TensorSource) -> PackedLayers | None:
    """A GPTQ or AWQ checkpoint's layers, made empty in `model` (meta device), or None for a float one."""
    packed = read_packed_format(read_hf_json(directory), Path(directory) / "config.json")
    return None if packed is None else PackedLayers(model, weight_rules(model.config), source, packed)


def convert_from_hf(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Hugging Face directory -> native checkpoint (weights, config.yaml, tokenizer files)."""
    src, dst = Path(src), check_output_path(dst, "dst_dir")
    if read_packed_format(read_hf_json(src), src / "config.json") is not None:
        # GPTQ or AWQ: kept as plainlm's int4 / int8 layers (a quantized checkpoint), or dequantized to `dtype`
        model = load_hf_model(src)
        return save_checkpoint(model if dtype is None else dequantize_model(model, dtype), dst, tokenizer_dir=src)
    config = read_hf_config(src)
    source = hf_tensor_source(src)
    with torch.device("meta"):
        model = GPT(config)
    # Every name and shape first, as loading checks them (from the files' headers: no data is read), so
    # weights that do not fit their config fail here and never become a checkpoint that fails later.
    for _ in checked_tensors(model, hf_to_plainlm_tensors(config, source, source.meta), src):
        pass
    tensors = hf_to_plainlm_tensors(config, source)
    if dtype is not None:
        tensors = ((k, t.to(dtype) if t.is_floating_point() else t) for k, t in tensors)
    dst.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, dst)
    config.save(dst / CONFIG_FILE)
    copy_tokenizer_files(src, dst)
    return dst


def convert_to_hf(src: str | Path, dst: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Native checkpoint -> a directory that transformers' from_pretrained loads as it is."""
    src, dst = Path(src), check_output_path(dst, "dst_dir")
    if not (src / CONFIG_FILE).exists():
        raise CheckpointError(f"{src}: no {CONFIG_FILE}; is this a plainlm checkpoint?")
    config = Config.from_file(src / CONFIG_FILE)
    source = TensorSource(src)
    quantization = read_quantization(src)
    if quantization is not None and not quantization.get("packed"):
        raise CheckpointError(
            f"{src} is quantized as plainlm's {quantization['mode']}, which Hugging Face has no format for; convert "
            "the float checkpoint it came from (models loaded from GPTQ or AWQ are written back in their format)"
        )
    packed = {
        name: f"{name}.input_order" in source
        for name in (k.removesuffix(".scales_and_zeros") for k in source.keys() if k.endswith(".scales_and_zeros"))
    }
    dst.mkdir(parents=True, exist_ok=True)
    written = packed_config(quantization, any(packed.values())) if packed else None
    method = written["quant_method"] if written else "gptq"
    save_tensors(plainlm_to_hf_tensors(config, source.get, packed, method), dst, max_shard_bytes=max_shard_bytes)
    hf_config = config_to_hf(config)
    dtype = _dtype_name(source)
    if dtype and "torch_dtype" not in hf_config and "dtype" not in hf_config:
        hf_config["torch_dtype"] = dtype
    if written:
        hf_config["quantization_config"] = written
    atomic_write_text(dst / "config.json", json.dumps(hf_config, indent=2))
    copy_tokenizer_files(src, dst)
    return dst


def _dtype_name(source: TensorSource) -> str | None:
    """The float weights' dtype (a packed layer's integers and float32 pairs aside)."""
    for key in source.keys():
        tensor = source.meta(key)
        if tensor.is_floating_point() and not key.endswith(".scales_and_zeros"):
            return str(tensor.dtype).removeprefix("torch.")
    return None
