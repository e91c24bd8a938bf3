"""plainlm checkpoint -> GGUF file (llama.cpp), written as llama.cpp's convert_hf_to_gguf.py writes one.

`convert_to_gguf(src_dir, file, dtype)` writes the metadata (`gguf_names.write_config`), the tokenizer
(`gguf_tokenizer.add_tokenizer_to_gguf`) and every tensor through `gguf_names.tensor_rules`' `to_gguf`, which
redoes llama.cpp's layout (q/k rows permuted for "llama", "smollm3" and "granite", +1 on Gemma's norm weights,
Phi-3's fused qkv and gate_up). As in llama.cpp, 1-D tensors (norms, biases) stay float32 and 2-D weights take
`dtype`; a q8_0 weight whose rows are not whole 32-value blocks falls back to f16. The tensor infos are planned
from shapes alone and the config a reader would get from them is checked first (GGUF cannot carry every switch plainlm
has); then tensors are converted and written one at a time into a temporary file that takes FILE's name only
when complete. Reading GGUF files is `gguf.py`'s business.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, LlamaFileType

from plainlm.checkpoint import CONFIG_FILE, TensorSource, check_output_path, read_quantization
from plainlm.config import Config
from plainlm.convert.gguf_names import (
    HF_TO_GGUF_ARCHITECTURE,
    IMPORT_ONLY_ARCHITECTURES,
    GGUFRule,
    llama3_rope_factors,
    read_config,
    tensor_rules,
    write_config,
    write_token_ids,
)
from plainlm.convert.gguf_reader import read_gguf
from plainlm.convert.gguf_tokenizer import add_tokenizer_to_gguf
from plainlm.errors import CheckpointError, InvalidInput

# --dtype: the type of the 2-D weights, and the general.file_type that announces it.
DTYPES = {
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# MoE routers stay float32, as convert_hf_to_gguf.py keeps them (FFN_GATE_INP, FFN_GATE_INP_SHEXP).
ROUTERS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")
# Config fields that do not change what the model computes: the file need not give them back.
UNCHECKED_FIELDS = ("name", "hf_repo", "hf_extra")


@dataclasses.dataclass
class PlannedTensor:
    rule: GGUFRule
    name: str  # the GGUF tensor: rule.gguf, or one of its parts
    shape: tuple[int, ...]  # PyTorch's order
    qtype: GGMLQuantizationType


def convert_to_gguf(src_dir: str | Path, file: str | Path, dtype: str = "f16") -> Path:
    """Native checkpoint -> a GGUF file for llama.cpp (or transformers' `gguf_file=`); `dtype` is f16, q8_0,
    f32 or bf16 for the weights of 2 and more dimensions. Architectures: llama, qwen2, qwen2moe, qwen3, phi3, gemma2,
    gemma3, cohere2, exaone4, smollm3, olmo2 (OLMo 2 and 3), granite, seed_oss, ernie4_5, llama4, deepseek2
    (DeepSeek-V3, Kimi K2), glm4moe (GLM-4.5)."""
    src, file = Path(src_dir), check_output_path(file, "file", file=True)
    if dtype not in DTYPES:
        raise InvalidInput(f"GGUF dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if file.is_dir():
        raise InvalidInput(f"{file}: is a directory; pass the path of the .gguf file to write")
    weight_type, file_type = DTYPES[dtype]
    config = _checkpoint_config(src)
    source = TensorSource(src)
    # One rule per GGUF tensor; DeepSeek's kv_b_proj as one attn_kv_b, which llama.cpp still reads (without
    # its absorbed-MLA path) and which quantizes by the same rows as ours
    rules = tensor_rules(config, split_kv_b=False)  # DeepSeek's kv_b_proj whole, as llama.cpp still reads it
    _check_tensor_names(source, rules, src)
    if (factors := llama3_rope_factors(config)) is not None:  # Llama 3.1+: RoPE scaling as llama.cpp stores it
        rules.append(GGUFRule("rope_freqs.weight", [], lambda t: [], lambda ts: factors))

    plan = [planned for rule in rules for planned in _plan(rule, source, weight_type)]
    _check_expressible(config, plan, src)

    writer = _writer(config, plan)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if any((src / name).is_file() for name in TOKENIZER_FILES):
        add_tokenizer_to_gguf(writer, src)
        _pad_vocabulary(writer, config.vocab_size, src)
    else:  # no tokenizer files: llama.cpp loads the model with no vocabulary ("none"), to be fed token ids
        writer.add_tokenizer_model("none")
        write_token_ids(writer, config)
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_name(f".{file.name}.partial")
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for planned in plan:
            # float32 first: Gemma's +1 on a bfloat16 norm weight would round.
            stored = planned.rule.to_stored([source.get(name).float() for name in planned.rule.ours])
            tensor = stored[planned.rule.gguf_names.index(planned.name)]
            writer.write_tensor_data(gguf.quants.quantize(tensor.contiguous().numpy(), planned.qtype))
        writer.close()
        os.replace(partial, file)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    return file


def _checkpoint_config(src: Path) -> Config:
    if not (src / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{src}: no {CONFIG_FILE}; pass a plainlm checkpoint directory "
            "(make one with `plainlm convert from-hf` or `plainlm convert from-gguf`)"
        )
    config = Config.from_file(src / CONFIG_FILE)
    arch = HF_TO_GGUF_ARCHITECTURE.get(config.hf_model_type)
    if arch is None or arch in IMPORT_ONLY_ARCHITECTURES:
        raise CheckpointError(
            f"{src}: a {config.hf_model_type!r} model cannot be exported to GGUF; supported model types: "
            + ", ".join(
                f"{hf} (GGUF {name})"
                for hf, name in HF_TO_GGUF_ARCHITECTURE.items()
                if name not in IMPORT_ONLY_ARCHITECTURES
            )
        )
    if (quantization := read_quantization(src)) is not None:
        raise CheckpointError(
            f"{src}: a {quantization['mode']}-quantized checkpoint; export the float checkpoint it was made "
            "from (pass --dtype q8_0 to quantize the GGUF file)"
        )
    return config


def _check_tensor_names(source: TensorSource, rules: list[GGUFRule], src: Path) -> None:
    wanted = {name for rule in rules for name in rule.ours}
    missing, unexpected = sorted(wanted - set(source.keys())), sorted(set(source.keys()) - wanted)
    if missing or unexpected:
        problem = f"has no tensor {missing[:3]}" if missing else f"has tensors {unexpected[:3]} with no place in GGUF"
        raise CheckpointError(f"{src}: the checkpoint {problem}; its weights and config.yaml do not match")


def _plan(rule: GGUFRule, source: TensorSource, weight_type: GGMLQuantizationType) -> list[PlannedTensor]:
    # The GGUF tensors' shapes, from `to_gguf` on empty tensors: nothing is read yet.
    stored = rule.to_stored([torch.empty(source.shape(name), device="meta") for name in rule.ours])
    return [_planned(rule, name, tuple(t.shape), weight_type) for name, t in zip(rule.gguf_names, stored, strict=True)]


def _planned(rule: GGUFRule, name: str, shape: tuple[int, ...], weight_type: GGMLQuantizationType) -> PlannedTensor:
    if len(shape) == 1 or name.endswith(ROUTERS):
        return PlannedTensor(rule, name, shape, GGMLQuantizationType.F32)
    block = gguf.GGML_QUANT_SIZES[weight_type][0]
    return PlannedTensor(rule, name, shape, weight_type if shape[-1] % block == 0 else GGMLQuantizationType.F16)


def _writer(config: Config, plan: list[PlannedTensor]) -> gguf.GGUFWriter:
    """A writer holding the model's metadata and its tensor infos, ready to write."""
    writer = gguf.GGUFWriter(None, HF_TO_GGUF_ARCHITECTURE[config.hf_model_type])
    write_config(writer, config)
    for planned in plan:
        writer.add_tensor_info(planned.name, planned.shape, np.dtype(np.float32), _nbytes(planned), planned.qtype)
    return writer


def _nbytes(planned: PlannedTensor) -> int:
    block, type_bytes = gguf.GGML_QUANT_SIZES[planned.qtype]
    return math.prod(planned.shape) // block * type_bytes


def _pad_vocabulary(writer: gguf.GGUFWriter, vocab_size: int, src: Path) -> None:
    """One token per embedding row, as llama.cpp requires: pad as convert_hf_to_gguf.py does (Qwen needs it)."""
    kv = writer.kv_data[0]
    n_tokens = len(kv[gguf.Keys.Tokenizer.LIST].value)
    if n_tokens > vocab_size:
        raise CheckpointError(
            f"{src}: the tokenizer has {n_tokens} tokens but the model embeds only {vocab_size}; "
            "llama.cpp needs one embedding row per token"
        )
    extra = range(n_tokens, vocab_size)
    for key, filler in (
        (gguf.Keys.Tokenizer.LIST, lambda i: f"[PAD{i}]"),
        (gguf.Keys.Tokenizer.TOKEN_TYPE, lambda i: int(gguf.TokenType.UNUSED)),
        (gguf.Keys.Tokenizer.SCORES, lambda i: -1000.0),
    ):
        if key in kv:
            kv[key].value = [*kv[key].value, *map(filler, extra)]


def _check_expressible(config: Config, plan: list[PlannedTensor], src: Path) -> None:
    """GGUF cannot carry every switch plainlm has: before anything is written, read the config back from a
    scratch file with the same metadata and tensor infos, whose data is a hole (a sparse file) but for
    rope_freqs.weight, the one tensor `read_config` reads."""
    plan = [dataclasses.replace(p, qtype=GGMLQuantizationType.F32) for p in plan]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metadata.gguf"
        writer = _writer(config, plan)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        out, position = writer.fout[0], writer.fout[0].tell()
        for planned in plan:
            position = writer.ggml_pad(position, writer.data_alignment)
            if not planned.rule.ours:
                out.seek(position)
                out.write(planned.rule.to_gguf([]).numpy().tobytes())
            position += _nbytes(planned)
        out.truncate(writer.ggml_pad(position, writer.data_alignment))
        writer.close()
        written = read_config(read_gguf(path), path)
    differences = [
        f"{f.name} is {getattr(config, f.name)!r}, the file would give {getattr(written, f.name)!r}"
        for f in dataclasses.fields(Config)
        if f.name not in UNCHECKED_FIELDS and not _same(getattr(config, f.name), getattr(written, f.name))
    ]
    if differences:
        raise CheckpointError(
            f"{src}: GGUF ({HF_TO_GGUF_ARCHITECTURE[config.hf_model_type]}) cannot express this model, llama.cpp "
            f"would run a different one: {'; '.join(differences)}"
        )


def _same(ours: Any, theirs: Any) -> bool:
    if isinstance(ours, float) and isinstance(theirs, float):
        return math.isclose(ours, theirs, rel_tol=1e-6)  # GGUF stores float32
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return ours.keys() == theirs.keys() and all(_same(v, theirs[k]) for k, v in ours.items())
    return ours == theirs
