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

DEEPSEEK_V3 = dict(
    LLAMA,
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=32,
    v_head_dim=32,
    n_routed_experts=8,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=3,
    moe_intermediate_size=32,
    n_shared_experts=2,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    # DeepSeek-V3's YaRN: mscale equal to mscale_all_dim, as GGUF assumes (it stores only the latter)
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
)
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
    "qwen2moe": (
        "qwen2moe",
        "Qwen2MoeConfig",
        dict(LLAMA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
    ),
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
    # Three sliding layers with interleaved RoPE, then a global one without any position encoding
    "cohere2": (
        "cohere2",
        "Cohere2Config",
        dict(LLAMA, num_hidden_layers=4, sliding_window=5, logit_scale=0.25, pad_token_id=0, eos_token_id=2),
    ),
    "exaone4": (
        "exaone4",
        "Exaone4Config",
        dict(
            LLAMA,
            max_position_embeddings=16384,
            num_hidden_layers=4,
            head_dim=24,
            sliding_window=5,
            layer_types=["sliding_attention"] * 3 + ["full_attention"],
            rope_parameters=dict(LLAMA31_ROPE, factor=16.0, rope_theta=1000000.0),
        ),
    ),
    "exaone4-1.2b": (  # no window: every layer rotates
        "exaone4",
        "Exaone4Config",
        dict(LLAMA, sliding_window=None, layer_types=["full_attention"] * 2, tie_word_embeddings=True),
    ),
    # llama.cpp's fixed NoPE step: the fourth layer has no RoPE
    "smollm3": (
        "smollm3",
        "SmolLM3Config",
        dict(LLAMA, num_hidden_layers=4, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    ),
    "olmo2": ("olmo2", "Olmo2Config", dict(LLAMA, pad_token_id=0, eos_token_id=2)),
    # OLMo 3 is llama.cpp's "olmo2" with a sliding window: three sliding layers, then a YaRN-scaled global one
    "olmo3": (
        "olmo2",
        "Olmo3Config",
        dict(
            LLAMA,
            num_hidden_layers=4,
            sliding_window=5,
            pad_token_id=0,
            eos_token_id=2,
            rope_parameters={
                "full_attention": {
                    "rope_type": "yarn",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "original_max_position_embeddings": 8,
                    "attention_factor": 1.25,  # exact in float32, as GGUF stores it
                },
                "sliding_attention": {"rope_type": "default", "rope_theta": 500000.0},
            },
        ),
    ),
    "granite": (
        "granite",
        "GraniteConfig",
        dict(
            LLAMA, embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625, logits_scaling=8.0
        ),
    ),
    "seed_oss": ("seed_oss", "SeedOssConfig", dict(LLAMA, head_dim=24)),
    "ernie4_5": ("ernie4_5", "Ernie4_5Config", dict(LLAMA, head_dim=16, use_bias=True)),
    "gpt-oss": (  # llama.cpp hard-codes swiglu_limit 7 and alpha 1.702, as GptOssConfig's defaults
        "gpt-oss",
        "GptOssConfig",
        dict(
            LLAMA,
            num_hidden_layers=4,
            head_dim=16,
            sliding_window=5,
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 16,
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
    # Sizes in multiples of 32 where a row is quantized in blocks (q8_0, q4_0): experts, latent, heads.
    "deepseek-v3": ("deepseek2", "DeepseekV3Config", DEEPSEEK_V3),
    "deepseek-v3-plain-q": (
        "deepseek2",
        "DeepseekV3Config",
        dict(DEEPSEEK_V3, q_lora_rank=None, norm_topk_prob=False, rope_parameters={"rope_theta": 10000.0}),
    ),
    "glm4-moe": (
        "glm4moe",
        "Glm4MoeConfig",
        dict(
            LLAMA,
            num_hidden_layers=3,
            head_dim=32,
            partial_rotary_factor=0.5,
            attention_bias=True,
            use_qk_norm=True,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            routed_scaling_factor=1.5,
        ),
    ),
}
# Architectures whose q and k rows convert_hf_to_gguf.py permutes (its LlamaModel and subclasses).
PERMUTED_QK = ("llama", "smollm3", "granite")


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


def model_arch(arch: str) -> gguf.MODEL_ARCH:
    """The gguf package's enum member for an architecture name ("glm4moe" -> MODEL_ARCH.GLM4_MOE)."""
    return next(member for member, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)


def make_tiny_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny transformers model with every parameter (norms included) random."""
    _, config_class, kwargs = TINY_MODELS[name]
    model = tiny_hf_model(getattr(transformers, config_class)(**kwargs), seed)
    with torch.no_grad():
        for key, buffer in model.named_buffers():
            if key.endswith("e_score_correction_bias"):  # DeepSeek-V3 / GLM-4.5's routing bias is a buffer
                buffer.normal_(0, 0.3)
    return model


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


# What llama.cpp keeps in float32 whatever the file's type (convert_hf_to_gguf.py): MoE routers (FFN_GATE_INP,
# FFN_GATE_INP_SHEXP) and gpt-oss's expert biases (E, out).
KEPT_IN_FLOAT32 = ("mlp.gate.weight", "mlp.shared_expert_gate.weight", "router.weight", "_bias")


def quantized_reference(
    model: transformers.PreTrainedModel, qtype: GGMLQuantizationType, expert_qtype: GGMLQuantizationType | None = None
) -> None:
    """Give `model` (in place) the weights a GGUF file of `qtype` holds: 2-D weights round-tripped, and 3-D experts
    in `expert_qtype` (default qtype), quantized along their inputs (gpt-oss and Llama 4 hold them transposed)."""
    transposed = model.config.model_type in ("gpt_oss", "llama4_text")  # (E, in, out)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(KEPT_IN_FLOAT32):
                continue
            if name.endswith("kv_b_proj.weight"):  # quantized as llama.cpp's attn_k_b (transposed) and attn_v_b
                k_b, v_b = _split_kv_b(model.config, p)
                k_b, v_b = (torch.from_numpy(round_trip(t.numpy(), qtype)) for t in (k_b, v_b))
                p.copy_(torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(p.shape))
            elif p.ndim == 2:
                p.copy_(torch.from_numpy(round_trip(p.numpy(), qtype)))
            if p.ndim == 3:
                rows = p.transpose(1, 2) if transposed else p
                rows.copy_(torch.from_numpy(round_trip(rows.contiguous().numpy(), expert_qtype or qtype)))


def _split_kv_b(cfg: transformers.PretrainedConfig, kv_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """convert_hf_to_gguf.py's DeepseekV2Model: kv_b_proj -> attn_k_b (H, rank, nope), attn_v_b (H, V, rank)."""
    nope, v = cfg.qk_nope_head_dim, cfg.v_head_dim
    k_b, v_b = kv_b.view(cfg.num_attention_heads, nope + v, -1).split([nope, v], dim=1)
    return k_b.transpose(1, 2).contiguous(), v_b.contiguous()


def llama_cpp_inputs(model: transformers.PreTrainedModel, arch: str) -> list[tuple[str, torch.Tensor]]:
    """The model's tensors as convert_hf_to_gguf.py takes them: the experts transformers 5 holds stacked as
    gate_up_proj (E, 2I, C) split into stacked gate and up (Qwen2MoeModel.modify_tensors does the same),
    DeepSeek's kv_b_proj split, the routing bias a `.bias`."""
    if arch == "gpt-oss":
        return _gpt_oss_tensors(model)
    if arch == "llama4":
        return _llama4_tensors(model)
    out = []
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            gate, up = tensor.chunk(2, dim=1)
            out += [
                (name.replace("gate_up_proj", "gate_proj.weight"), gate),
                (name.replace("gate_up_proj", "up_proj.weight"), up),
            ]
        elif name.endswith("mlp.experts.down_proj"):
            out.append((name + ".weight", tensor))
        elif name.endswith("e_score_correction_bias"):
            out.append((name.replace("e_score_correction_bias", "e_score_correction.bias"), tensor))
        elif arch == "deepseek2" and name.endswith("kv_b_proj.weight"):
            k_b, v_b = _split_kv_b(model.config, tensor)
            out += [(name.replace("kv_b_proj", "k_b_proj"), k_b), (name.replace("kv_b_proj", "v_b_proj"), v_b)]
        else:
            out.append((name, tensor))
    return out


def _llama4_tensors(model: transformers.PreTrainedModel) -> list[tuple[str, torch.Tensor]]:
    """Llama 4's state dict as Llama4Model.modify_tensors writes it: the experts' (E, in, out) weights transposed,
    gate_up_proj split into gate and up."""
    out = []
    for name, t in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            gate, up = t.transpose(1, 2).chunk(2, dim=1)
            stem = name.removesuffix("gate_up_proj")
            out += [(stem + "gate_proj.weight", gate.contiguous()), (stem + "up_proj.weight", up.contiguous())]
        elif name.endswith("experts.down_proj"):
            out.append((name + ".weight", t.transpose(1, 2).contiguous()))
        else:
            out.append((name, t))
    return out


def _gpt_oss_tensors(model: transformers.PreTrainedModel) -> list[tuple[str, torch.Tensor]]:
    """gpt-oss's state dict as GptOssModel.modify_tensors writes it: sinks get ".weight"; the interleaved
    gate_up_proj (E, C, 2I) and its bias split into gate (even columns) and up (odd), transposed to (E, I, C);
    down_proj (E, I, C) transposed to (E, C, I)."""
    out = []
    for name, t in model.state_dict().items():
        stem = name.removesuffix("_bias").removesuffix(".weight")
        if name.endswith("sinks"):
            out.append((f"{name}.weight", t))
        elif stem.endswith("gate_up_proj"):
            suffix, rows = ("bias", t) if name.endswith("_bias") else ("weight", t.transpose(1, 2))
            gate_up = stem.removesuffix("gate_up_proj")
            out += [(f"{gate_up}gate_proj.{suffix}", rows[:, 0::2]), (f"{gate_up}up_proj.{suffix}", rows[:, 1::2])]
        elif stem.endswith("down_proj") and "experts" in stem:
            out.append((f"{stem}.bias", t) if name.endswith("_bias") else (f"{stem}.weight", t.transpose(1, 2)))
        else:
            out.append((name, t))
    return [(name, t.contiguous()) for name, t in out]


def write_gguf(
    model: transformers.PreTrainedModel,
    arch: str,
    path: Path,
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
    tokens: list[str] | None = None,
    expert_qtype: GGMLQuantizationType | None = None,
) -> Path:
    """2-D weights in `qtype`, 3-D experts in `expert_qtype` (default qtype), 1-D tensors in float32."""
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
    name_map = gguf.get_tensor_name_map(model_arch(arch), cfg.num_hidden_layers)
    for hf_name, tensor in llama_cpp_inputs(model, arch):
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        name = name_map.get_name(stem)
        assert name is not None, hf_name
        data = tensor.float().numpy()
        if name.endswith("ffn_gate_inp_shexp"):  # squeezed, as the converter did for the released Qwen1.5-MoE files
            data = data.reshape(-1)
        if arch in PERMUTED_QK and ".attn_q" in name and "norm" not in name:
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        if arch in PERMUTED_QK and ".attn_k" in name and "norm" not in name:
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            data = data + 1
        kind = {2: qtype, 3: expert_qtype or qtype}.get(data.ndim, GGMLQuantizationType.F32)
        if hf_name.endswith(KEPT_IN_FLOAT32) or suffix == "bias":
            kind = GGMLQuantizationType.F32
        if kind != GGMLQuantizationType.F32:
            writer.add_tensor(f"{name}.{suffix}", gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(f"{name}.{suffix}", data.astype(np.float32))
    if arch == "glm4moe":  # llama.cpp keeps GLM-4.5's multi-token-prediction layer as one more block
        mtp = f"blk.{cfg.num_hidden_layers}."
        writer.add_tensor(mtp + "nextn.eh_proj.weight", np.ones((cfg.hidden_size, 2 * cfg.hidden_size), np.float32))
        writer.add_tensor(mtp + "attn_norm.weight", np.ones(cfg.hidden_size, np.float32))
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type") == "llama3":  # llama.cpp's LlamaModel.generate_extra_tensors
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(cfg, rope))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_hparams(writer: gguf.GGUFWriter, cfg: transformers.PretrainedConfig, arch: str) -> None:
    rope = cfg.rope_parameters or {}
    full = rope.get("full_attention", rope)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers + (arch == "glm4moe"))
    # Llama 4's dense layers are intermediate_size_mlp wide (its intermediate_size is the experts')
    writer.add_feed_forward_length(getattr(cfg, "intermediate_size_mlp", cfg.intermediate_size))
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(1 if arch == "deepseek2" else cfg.num_key_value_heads)  # MLA: one latent "head"
    if arch == "cohere2":
        writer.add_layer_norm_eps(cfg.layer_norm_eps)
    else:
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(full["rope_theta"])
    if arch == "qwen2moe":  # TextModel and Qwen2MoeModel.set_gguf_parameters
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if arch in ("qwen3", "gemma2", "gemma3", "exaone4", "seed_oss", "ernie4_5", "gpt-oss", "llama4"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch in (*PERMUTED_QK, "llama4"):
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if arch == "llama4":
        writer.add_expert_count(cfg.num_local_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        writer.add_expert_feed_forward_length(cfg.intermediate_size)
        writer.add_interleave_moe_layer_step(cfg.interleave_moe_layer_step)
    if arch == "granite":  # GraniteModel's multipliers, named as scales
        writer.add_attention_scale(cfg.attention_multiplier)
        writer.add_embedding_scale(cfg.embedding_multiplier)
        writer.add_residual_scale(cfg.residual_multiplier)
        writer.add_logit_scale(cfg.logits_scaling)
    if arch == "olmo2" and full.get("rope_type") == "yarn":  # Olmo2Model.set_gguf_parameters
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(full["factor"])
        writer.add_rope_scaling_attn_factors(full["attention_factor"])
        writer.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])
    if arch == "olmo2" and getattr(cfg, "sliding_window", None) is not None:
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
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
    if arch == "gpt-oss":  # GptOssModel.set_gguf_parameters
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_expert_count(cfg.num_local_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        writer.add_expert_feed_forward_length(cfg.intermediate_size)
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(full["factor"])
        writer.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])
    if arch in ("deepseek2", "glm4moe"):
        _write_moe_hparams(writer, cfg, arch, full)
    if arch == "gemma3":
        writer.add_sliding_window(cfg.sliding_window)
        if full.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(full["factor"])
    if arch == "gemma3":
        writer.add_sliding_window(cfg.sliding_window)
        if full.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(full["factor"])
    if arch == "cohere2":  # convert_hf_to_gguf.py's Cohere2Model: no pattern, llama.cpp assumes every 4th layer global
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_logit_scale(cfg.logit_scale)
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_rope_dimension_count(head_dim)
    if arch == "exaone4" and cfg.sliding_window is not None:  # Exaone4Model
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])


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


def _write_moe_hparams(writer: gguf.GGUFWriter, cfg: transformers.PretrainedConfig, arch: str, rope: dict) -> None:
    """What convert_hf_to_gguf.py's DeepseekV2Model and Glm4MoeModel write on top of the common keys."""
    writer.add_expert_count(cfg.n_routed_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_expert_group_count(cfg.n_group)
    writer.add_expert_group_used_count(cfg.topk_group)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    writer.add_expert_shared_count(cfg.n_shared_experts)
    writer.add_leading_dense_block_count(cfg.first_k_dense_replace)
    writer.add_expert_weights_scale(cfg.routed_scaling_factor)
    if cfg.norm_topk_prob:
        writer.add_expert_weights_norm(True)
    if arch == "glm4moe":
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_dimension_count(int(cfg.head_dim * rope.get("partial_rotary_factor", 0.5)))
        writer.add_nextn_predict_layers(1)
        return
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.q_lora_rank is not None:
        writer.add_q_lora_rank(cfg.q_lora_rank)
    writer.add_kv_lora_rank(cfg.kv_lora_rank)
    writer.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    writer.add_value_length(cfg.kv_lora_rank)
    writer.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    writer.add_value_length_mla(cfg.v_head_dim)
    writer.add_rope_dimension_count(cfg.qk_rope_head_dim)
    if rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
