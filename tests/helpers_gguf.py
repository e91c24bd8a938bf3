"""Tiny GGUF files written as llama.cpp's convert_hf_to_gguf.py writes them, from tiny transformers models.

Tensor names come from the gguf package's own HF -> GGUF map (`gguf.get_tensor_name_map`), not from
plainlm, and the export transforms are llama.cpp's: q/k rows permuted for "llama", +1 on Gemma's norm
weights, 1-D tensors kept in float32, 2-D tensors in the requested type.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType
from helpers import tiny_hf_model

VOCAB = 160
LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

LLAMA4_ROPE = dict(LLAMA31_ROPE, factor=16.0, high_freq_factor=1.0)  # Llama 4 Scout's

# name -> (GGUF architecture, transformers config class, kwargs): one entry per supported architecture,
# each with the switches that make it what it is. Gemma's query_pre_attn_scalar equals head_dim because
# GGUF does not store it (llama.cpp derives it; only the 27B models differ).
TINY_MODELS: dict[str, tuple[str, str, dict]] = {
    "llama": ("llama", "LlamaConfig", dict(LLAMA, attention_bias=True)),
    "llama3.2": (
        "llama",
        "LlamaConfig",
        dict(LLAMA, max_position_embeddings=16384, tie_word_embeddings=True, rope_parameters=LLAMA31_ROPE),
    ),
    "qwen2": ("qwen2", "Qwen2Config", dict(LLAMA)),
    "qwen3": ("qwen3", "Qwen3Config", dict(LLAMA, head_dim=24, tie_word_embeddings=True)),
    "phi3": ("phi3", "Phi3Config", dict(LLAMA, pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=5)),
    "gemma2": (
        "gemma2",
        "Gemma2Config",
        dict(
            LLAMA,
            num_hidden_layers=4,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=5,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3": (
        "gemma3",
        "Gemma3TextConfig",
        dict(
            LLAMA,
            num_hidden_layers=6,  # llama.cpp's fixed pattern: five sliding layers, then a global one
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=5,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
    ),
    # Four layers: the fourth without RoPE, the second and fourth with experts. llama.cpp hard-codes the 8k chunks
    # and the temperature's floor of 8k positions, so they are Llama 4's own here (and out of reach of 12 tokens).
    "llama4": (
        "llama4",
        "Llama4TextConfig",
        dict(
            LLAMA,
            num_hidden_layers=4,
            head_dim=16,
            intermediate_size=32,
            intermediate_size_mlp=96,
            num_local_experts=4,
            num_experts_per_tok=2,
            interleave_moe_layer_step=2,
            rope_parameters=LLAMA4_ROPE,
        ),
    ),
}


# Prompt ids as transformers' tokenizer for each packaged GGUF gives them (AutoTokenizer with gguf_file=...):
# "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,".
REAL_PROMPTS = {
    "smollm2": [
        [504, 3575, 282, 4649, 314],
        [1604, 3987, 46477, 24, 94, 727],
        [6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 28],
    ],
    "gemma3": [
        [2, 818, 5279, 529, 7001, 563],
        [2, 2063, 10779, 78113, 236769, 236749, 1473],
        [2, 14946, 3324, 496, 990, 236764, 528, 496, 1944, 9744, 236764],
    ],
}


def make_tiny_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny transformers model with every parameter (norms included) random."""
    _, config_class, kwargs = TINY_MODELS[name]
    return tiny_hf_model(getattr(transformers, config_class)(**kwargs), seed)


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (n_head is n_kv_head for k)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def round_trip(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """What a 2-D weight becomes after quantizing to `qtype` and back."""
    return gguf.quants.dequantize(gguf.quants.quantize(array.astype(np.float32), qtype), qtype)


def quantized_reference(model: transformers.PreTrainedModel, qtype: GGMLQuantizationType) -> None:
    """Give `model` (in place) the weights a GGUF file of `qtype` holds: 2-D weights round-tripped."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(round_trip(p.numpy(), qtype)))


def write_gguf(
    model: transformers.PreTrainedModel,
    arch: str,
    path: Path,
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
    tokens: list[str] | None = None,
) -> Path:
    cfg = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny-{arch}")
    _write_hparams(writer, cfg, arch)
    if tokens is not None:  # a vocabulary list, so that corrupt-file tests have string arrays to damage
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
    # llama.cpp writes the special token ids it finds (gguf.SpecialVocab).
    for kind in ("bos", "eos", "pad"):
        if isinstance(token_id := getattr(cfg, f"{kind}_token_id", None), int) and token_id < cfg.vocab_size:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    tensors = [(k, v) for hf_name, t in model.state_dict().items() for k, v in _llama_cpp_tensors(arch, hf_name, t)]
    for hf_name, data in tensors:
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        name = name_map.get_name(stem)
        assert name is not None, hf_name
        if arch == "llama" and ".attn_q" in name:
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        if arch == "llama" and ".attn_k" in name:
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            data = data + 1
        if data.ndim == 2 and qtype != GGMLQuantizationType.F32:
            writer.add_tensor(f"{name}.{suffix}", gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(f"{name}.{suffix}", data.astype(np.float32))
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type") == "llama3":  # llama.cpp's LlamaModel.generate_extra_tensors
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(cfg, rope))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _llama_cpp_tensors(arch: str, hf_name: str, tensor: torch.Tensor) -> list[tuple[str, np.ndarray]]:
    """The tensors convert_hf_to_gguf.py makes of one: Llama4Model transposes the experts' (E, in, out) weights and
    splits gate_up_proj into gate and up."""
    data = tensor.float().numpy()
    if arch == "llama4" and hf_name.endswith("experts.gate_up_proj"):
        gate, up = np.split(data.swapaxes(-1, -2), 2, axis=-2)
        stem = hf_name.removesuffix("gate_up_proj")
        return [
            (stem + "gate_proj.weight", np.ascontiguousarray(gate)),
            (stem + "up_proj.weight", np.ascontiguousarray(up)),
        ]
    if arch == "llama4" and hf_name.endswith("experts.down_proj"):
        return [(hf_name + ".weight", np.ascontiguousarray(data.swapaxes(-1, -2)))]
    return [(hf_name, data)]


def _write_hparams(writer: gguf.GGUFWriter, cfg: transformers.PretrainedConfig, arch: str) -> None:
    rope = cfg.rope_parameters or {}
    full = rope.get("full_attention", rope)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    # Llama 4's dense layers are intermediate_size_mlp wide (its intermediate_size is the experts')
    writer.add_feed_forward_length(getattr(cfg, "intermediate_size_mlp", cfg.intermediate_size))
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(full["rope_theta"])
    if arch in ("qwen3", "gemma2", "gemma3", "llama4"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch in ("llama", "llama4"):
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if arch == "llama4":
        writer.add_expert_count(cfg.num_local_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        writer.add_expert_feed_forward_length(cfg.intermediate_size)
        writer.add_interleave_moe_layer_step(cfg.interleave_moe_layer_step)
    if arch == "phi3":
        writer.add_rope_dimension_count(
            int(getattr(cfg, "partial_rotary_factor", 1.0) * cfg.hidden_size) // cfg.num_attention_heads
        )
        writer.add_rope_scaling_orig_ctx_len(cfg.max_position_embeddings)
        writer.add_sliding_window(cfg.sliding_window or 0)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
        writer.add_sliding_window(cfg.sliding_window)
    if arch == "gemma3":
        writer.add_sliding_window(cfg.sliding_window)
        if full.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(full["factor"])


def _llama3_rope_factors(cfg: transformers.PretrainedConfig, rope: dict) -> np.ndarray:
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = 8192  # llama.cpp reads a top-level original_max_position_embeddings, which Llama 3.x lacks
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)
