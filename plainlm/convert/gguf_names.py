"""What llama.cpp calls things, per architecture: metadata keys -> `Config`, tensor names and layouts.

`read_config(reader, path)` builds our `Config` from a GGUF file's metadata and tensor shapes, filling in
what llama.cpp hard-codes instead of storing (Gemma's sliding-window pattern, local RoPE base, query
scale). `write_config(writer, config)` is its inverse, for export. `tensor_rules(config)` lists every GGUF
tensor of a model with the plainlm tensors it holds, as llama.cpp's `convert_hf_to_gguf.py` writes them:
`to_ours` undoes what it did on export (permuted q/k rows, Gemma's +1 on norm weights, Phi-3's fused
tensors) and `to_gguf` redoes it, so GGUF export can use the same rules. Reading the file safely and
dequantizing is in `gguf.py`; writing one is in `gguf_export.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import (
    ExpertGatingFuncType,
    GGMLQuantizationType,
    GGUFValueType,
    GGUFWriter,
    RopeScalingType,
)

from plainlm.config import Config
from plainlm.convert.gguf_reader import GGUFFile, GGUFTensor
from plainlm.convert.hf_config import interleave_moe_layer_step
from plainlm.errors import CheckpointError
from plainlm.model import rope_inv_freq

# RoPE tables are precomputed for the whole context, so a corrupt context_length would allocate without
# bound; no supported model comes near this (Qwen2.5-1M: 1,010,000).
MAX_CONTEXT = 1 << 20
IGNORED_TENSORS = ("rope_freqs.weight",)  # Llama 3 RoPE factors: read into Config.rope_scaling instead

# GGUF general.architecture -> Config.hf_model_type (what the model exports to with to-hf).
GGUF_ARCHITECTURES = {
    "llama": "llama",  # also SmolLM2, Mistral 7B, TinyLlama: llama.cpp writes them all as "llama"
    "qwen2": "qwen2",
    "qwen2moe": "qwen2_moe",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "cohere2": "cohere2",
    "exaone4": "exaone4",
    "smollm3": "smollm3",
    "olmo2": "olmo2",  # also OLMo 3: "olmo3" where the file has a sliding window (read_config)
    "granite": "granite",
    "seed_oss": "seed_oss",
    "ernie4_5": "ernie4_5",
    "gpt-oss": "gpt_oss",
    "llama4": "llama4_text",
    "deepseek2": "deepseek_v3",  # DeepSeek-V3 / R1, Kimi K2 (DeepSeek-V2's softmax routing is refused)
    "glm4moe": "glm4_moe",
}
HF_TO_GGUF_ARCHITECTURE = {hf: arch for arch, hf in GGUF_ARCHITECTURES.items()} | {"olmo3": "olmo2"}
# Architectures whose q and k rows llama.cpp permutes (LlamaModel.permute) for its interleaved RoPE kernel.
PERMUTED_QK = ("llama", "smollm3", "granite")
# Read, not written (gpt-oss: llama.cpp's files hold its experts in MXFP4, which plainlm does not write).
IMPORT_ONLY_ARCHITECTURES = ("gpt-oss",)

# What llama.cpp hard-codes instead of storing it in the file (src/llama-model.cpp, llm_load_hparams).
GPT_OSS_SWIGLU = (7.0, 1.702)  # the experts' clamp limit and sigmoid gain (swiglu_limit, swiglu_alpha)
GEMMA_SLIDING_WINDOW_PATTERN = {"gemma2": 2, "gemma3": 6}  # every k-th layer attends globally
EXAONE4_32B_LAYERS = 64  # llama.cpp gives this EXAONE 4 (only) a 4096-token window when the file names none
GEMMA3_LOCAL_ROPE_THETA = 10000.0  # unless the file has gemma3.rope.freq_base_swa
GEMMA2_SOFTCAPS = (50.0, 30.0)  # attention, final logits: unless the file has the keys
SMOLLM3_NOPE_STEP = 4  # every 4th layer has no RoPE (n_no_rope_layer_step); the file has no key for it
OLMO3_SLIDING_WINDOW_PATTERN = 4  # three sliding layers, then a global one, unless the file lists them
SLIDING_WINDOW_PATTERN = {
    **GEMMA_SLIDING_WINDOW_PATTERN,
    "cohere2": 4,
    "exaone4": 4,
    "olmo2": OLMO3_SLIDING_WINDOW_PATTERN,
}
# Llama 4's chunked attention (every RoPE layer), NoPE layers (every 4th) and their attention temperature
# (floor scale, scale); q/k L2 norm on all but the 128-expert model (Maverick)
LLAMA4_CHUNK, LLAMA4_NOPE_STEP, LLAMA4_TEMPERATURE, LLAMA4_NO_QK_NORM_EXPERTS = 8192, 4, (8192, 0.1), 128
# Gemma 2 27B (46 layers) and Gemma 3 27B (62 layers) scale queries by n_embd / n_head instead of
# head_dim (query_pre_attn_scalar in their config.json); llama.cpp recognises them by layer count.
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def gemma_query_pre_attn_scalar(arch: str, n_layer: int, n_embd: int, n_head: int, head_dim: int) -> int:
    return n_embd // n_head if GEMMA_27B_LAYERS.get(arch) == n_layer else head_dim


# --- metadata -> Config ---
_REQUIRED, _MISSING = object(), object()
_INTS = {int(t) for t in GGUFValueType if t.name.startswith(("UINT", "INT"))}
_FLOATS = {int(GGUFValueType.FLOAT32), int(GGUFValueType.FLOAT64)}


class _Metadata:
    """Typed access to one file's metadata; keys without a "general." or "tokenizer." prefix are the
    architecture's own ("{arch}.block_count"). Errors name the file and the key."""

    def __init__(self, reader: GGUFFile, path: Path) -> None:
        self.reader, self.path, self.arch = reader, path, ""

    def key(self, key: str) -> str:
        return key if key.startswith(("general.", "tokenizer.")) else f"{self.arch}.{key}"

    def get(self, key: str, kinds: set[int], default: Any, what: str) -> Any:
        field = self.reader.fields.get(self.key(key))
        if field is None:
            if default is _REQUIRED:
                raise CheckpointError(
                    f"{self.path}: metadata key {self.key(key)!r} is missing; "
                    f"a GGUF file of architecture {self.arch!r} needs it"
                )
            return default
        if len(field.types) not in (1, 2) or int(field.types[0]) not in kinds:
            found = "/".join(GGUFValueType(t).name for t in field.types)  # the reader refused unknown types
            raise CheckpointError(f"{self.path}: metadata {self.key(key)!r} should be {what}, found {found}")
        return field.value

    def int(self, key: str, default: Any = _REQUIRED, minimum: int = 1, maximum: int = 1 << 31) -> Any:
        value = self.get(key, _INTS, _MISSING if default is not _REQUIRED else _REQUIRED, "an integer")
        if value is _MISSING:
            return default
        if not minimum <= value <= maximum:
            raise CheckpointError(
                f"{self.path}: metadata {self.key(key)!r} = {value} is outside the plausible range "
                f"[{minimum}, {maximum}]; the file is corrupt or of an unsupported model"
            )
        return value

    def float(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.get(key, _FLOATS, _MISSING if default is not _REQUIRED else _REQUIRED, "a float")
        if value is _MISSING:
            return default
        if not (math.isfinite(value) and value > 0):
            raise CheckpointError(f"{self.path}: metadata {self.key(key)!r} = {value} should be a positive number")
        return value

    def string(self, key: str, default: Any = _REQUIRED) -> Any:
        return self.get(key, {int(GGUFValueType.STRING)}, default, "a string")


def read_config(reader: GGUFFile, path: Path) -> Config:
    """Our `Config` from a GGUF file's metadata and tensor shapes, with llama.cpp's defaults per architecture."""
    meta = _Metadata(reader, path)
    arch = meta.arch = meta.string("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    tensors = {t.name: t for t in reader.tensors}
    vocab_size, n_embd = _shape(tensors, "token_embd.weight", path, dims=2)
    if meta.int("embedding_length") != n_embd:
        raise CheckpointError(f"{path}: embedding_length does not match the {n_embd} columns of token_embd.weight")
    n_head = meta.int("attention.head_count", maximum=n_embd)
    n_kv_head = meta.int("attention.head_count_kv", default=n_head, maximum=n_head)
    head_dim = meta.int("attention.key_length", default=n_embd // n_head)
    if arch == "deepseek2":  # llama.cpp stores MLA as one key/value head of the latent; the real heads are *_mla
        n_kv_head = n_head
        head_dim = meta.int("attention.key_length_mla", default=head_dim)  # absent in files before the split
    _check_head_dim(tensors, arch, n_head, n_kv_head, head_dim, path)
    # GLM-4.5's count includes its multi-token-prediction layers, which next-token decoding does not run
    n_layer = meta.int("block_count", maximum=len(tensors)) - meta.int("nextn_predict_layers", default=0, minimum=0)
    rope_dims = meta.int("rope.dimension_count", default=head_dim, maximum=head_dim)
    fields: dict[str, Any] = dict(
        name=meta.string("general.name", default=path.stem),
        hf_model_type=GGUF_ARCHITECTURES[arch],
        vocab_size=vocab_size,
        block_size=meta.int("context_length", maximum=MAX_CONTEXT),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_kv_head=n_kv_head,
        head_dim=head_dim,
        intermediate_size=meta.int("feed_forward_length"),
        tie_embeddings="output.weight" not in tensors,
        norm_eps=meta.float(
            "attention.layer_norm_epsilon" if arch == "cohere2" else "attention.layer_norm_rms_epsilon"
        ),
        qkv_bias=any(f"blk.0.{name}.bias" in tensors for name in ("attn_q", "attn_qkv", "attn_kv_a_mqa")),
        attn_out_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        rope_theta=meta.float("rope.freq_base", default=10000.0),
        rotary_fraction=rope_dims / head_dim,
        rope_scaling=_rope_scaling(meta, tensors, rope_dims),
        hf_extra=_token_ids(meta),
    )
    if arch in ("qwen3", "gemma3", "exaone4"):
        fields["qk_norm"] = "head"
    if arch == "phi3":  # 0 marks Phi-4, which has no sliding window
        fields["sliding_window"] = meta.int("attention.sliding_window", default=0, minimum=0) or None
    if arch in ("gemma2", "gemma3"):
        fields.update(_gemma_fields(meta, n_layer, n_embd, n_head, head_dim))
    if arch == "cohere2":  # attention and MLP read one bias-free LayerNorm; RoPE on adjacent pairs; scaled logits
        fields.update(norm_class="layernorm", norm_bias=False, parallel_residual=True, shared_attention_norm=True)
        fields.update(rope_interleaved=True, logit_scale=meta.float("logit_scale"))
        fields.update(_hybrid_attention(meta, n_layer, meta.int("attention.sliding_window")))
    if arch == "exaone4":  # norms after attention and MLP only
        fields.update(pre_attention_norm=False, pre_mlp_norm=False, post_attention_norm=True, post_mlp_norm=True)
        default = 4096 if n_layer == EXAONE4_32B_LAYERS else 0
        window = meta.int("attention.sliding_window", default=default, minimum=0)
        fields.update(_hybrid_attention(meta, n_layer, window) if window else {})
    if arch == "smollm3":
        fields["nope_layers"] = [i for i in range(n_layer) if (i + 1) % SMOLLM3_NOPE_STEP == 0]
    if arch == "olmo2":
        fields.update(_olmo2_fields(meta, n_layer, fields["rope_theta"]))
    if arch == "granite":  # llama.cpp's f_attention_scale 0 (no key) means 1/sqrt(head_dim)
        fields.update(
            embedding_multiplier=meta.float("embedding_scale", default=1.0),
            residual_multiplier=meta.float("residual_scale", default=1.0),
            logits_scaling=meta.float("logit_scale", default=1.0),
            attention_scale=meta.float("attention.scale", default=None),
        )
    if arch == "ernie4_5":  # its RoPE rotates pairs (2i, 2i+1), as llama.cpp's does: the rows are as they were
        fields["rope_interleaved"] = True
    if arch == "qwen2moe":
        fields.update(_qwen2moe_fields(meta))
    if arch == "gpt-oss":
        fields.update(_gpt_oss_fields(meta, fields["intermediate_size"], fields["rope_scaling"]))
    if arch == "llama4":
        fields.update(_llama4_fields(meta, n_layer))
    if arch == "deepseek2":
        fields.update(_mla_fields(meta, tensors, rope_dims), **_moe_fields(meta, tensors, n_layer))
    if arch == "glm4moe":
        fields.update(
            _moe_fields(meta, tensors, n_layer), qk_norm="head" if "blk.0.attn_q_norm.weight" in tensors else "none"
        )
    try:
        config = Config(**fields)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if config.rope_dim != rope_dims:
        raise CheckpointError(f"{path}: rope.dimension_count {rope_dims} is not a usable part of head_dim {head_dim}")
    return config


def _shape(tensors: dict[str, GGUFTensor], name: str, path: Path, dims: int) -> tuple[int, ...]:
    """A tensor's shape as PyTorch orders it (GGUF lists the fastest-varying dimension first)."""
    if name not in tensors:
        raise CheckpointError(f"{path}: no tensor {name!r}; the file is not a complete model")
    shape = tuple(reversed(tensors[name].shape))
    if len(shape) != dims:
        raise CheckpointError(f"{path}: tensor {name!r} has shape {shape}, expected {dims} dimensions")
    return shape


def _check_head_dim(tensors: dict, arch: str, n_head: int, n_kv_head: int, head_dim: int, path: Path) -> None:
    # Checked before the model is built: its RoPE tables are sized by head_dim.
    name, heads = (
        ("blk.0.attn_qkv.weight", n_head + 2 * n_kv_head) if arch == "phi3" else ("blk.0.attn_q.weight", n_head)
    )
    if arch == "deepseek2" and "blk.0.attn_q_b.weight" in tensors:  # queries through a low-rank bottleneck
        name = "blk.0.attn_q_b.weight"
    rows = _shape(tensors, name, path, dims=2)[0]
    if rows != heads * head_dim:
        raise CheckpointError(
            f"{path}: tensor {name!r} has {rows} rows but the metadata says {heads} heads of {head_dim}; "
            "the metadata and the weights do not match"
        )


def _rope_scaling(meta: _Metadata, tensors: dict[str, GGUFTensor], rope_dims: int) -> dict[str, Any] | None:
    kind = meta.string("rope.scaling.type", default="none")
    if kind == "linear":
        return {"rope_type": "linear", "factor": meta.float("rope.scaling.factor")}
    if kind == "yarn":
        scaling = {
            "rope_type": "yarn",
            "factor": meta.float("rope.scaling.factor"),
            "original_max_position_embeddings": meta.int("rope.scaling.original_context_length"),
        }
        for name in ("beta_fast", "beta_slow"):
            if (value := meta.float(f"rope.scaling.yarn_{name}", default=None)) is not None:
                scaling[name] = value
        # Olmo2Model writes Hugging Face's attention_factor here; other converters give the key other meanings
        if meta.arch == "olmo2" and (value := meta.float("rope.scaling.attn_factor", default=None)) is not None:
            scaling["attention_factor"] = value
        return scaling
    if kind != "none":
        raise CheckpointError(f"{meta.path}: RoPE scaling {kind!r} is not supported; supported: linear, yarn")
    if "rope_factors_long.weight" in tensors:
        raise CheckpointError(f"{meta.path}: Phi-3 LongRoPE (rope_factors_long.weight) is not supported")
    if "rope_freqs.weight" in tensors:
        return _llama3_scaling(meta, tensors["rope_freqs.weight"], rope_dims)
    return None


def _llama3_scaling(meta: _Metadata, tensor: GGUFTensor, rope_dims: int) -> dict[str, Any]:
    """Llama 3.1+ RoPE scaling from the per-frequency factors llama.cpp writes as rope_freqs.weight.

    llama.cpp computes them with an original context of 8192 and low_freq_factor 1, high_freq_factor 4 (every
    Llama 3.x) or 1 (Llama 4 Scout); the factor is the largest of them. Anything else is refused, not guessed.
    """
    if tensor.tensor_type != GGMLQuantizationType.F32 or len(tensor.shape) != 1:
        raise CheckpointError(f"{meta.path}: rope_freqs.weight should be a float32 vector, as llama.cpp writes it")
    factors = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    theta = meta.float("rope.freq_base", default=10000.0)
    plain = rope_inv_freq(rope_dims, theta, None, 0)[0]
    for high in (1.0, 4.0) if meta.arch == "llama4" else (4.0, 1.0):
        scaling = {
            "rope_type": "llama3",
            "factor": float(factors.max()),
            "low_freq_factor": 1.0,
            "high_freq_factor": high,
            "original_max_position_embeddings": 8192,
        }
        scaled = rope_inv_freq(rope_dims, theta, scaling, 0)[0]
        if factors.shape == plain.shape and torch.allclose(plain / scaled, factors, rtol=1e-4):
            return scaling
    raise CheckpointError(f"{meta.path}: rope_freqs.weight matches no Llama 3 RoPE scaling; not supported")


def _gemma_fields(meta: _Metadata, n_layer: int, n_embd: int, n_head: int, head_dim: int) -> dict[str, Any]:
    arch = meta.arch
    scalar = gemma_query_pre_attn_scalar(arch, n_layer, n_embd, n_head, head_dim)
    fields: dict[str, Any] = dict(
        norm_unit_offset=True,
        scale_embeddings=True,
        mlp_activation="gelu_tanh",
        post_attention_norm=True,
        post_mlp_norm=True,
        attention_scale=scalar**-0.5,
        sliding_window=meta.int("attention.sliding_window", default=0, minimum=0) or None,
        sliding_window_pattern=_sliding_pattern(meta, n_layer),
    )
    if arch == "gemma2":
        fields["attention_logit_softcap"] = meta.float("attn_logit_softcapping", default=GEMMA2_SOFTCAPS[0])
        fields["final_logit_softcap"] = meta.float("final_logit_softcapping", default=GEMMA2_SOFTCAPS[1])
    else:
        fields["final_logit_softcap"] = meta.float("final_logit_softcapping", default=None)
        fields["rope_local_theta"] = meta.float("rope.freq_base_swa", default=GEMMA3_LOCAL_ROPE_THETA)
    return fields


def _hybrid_attention(meta: _Metadata, n_layer: int, window: int) -> dict[str, Any]:
    """Cohere 2's and EXAONE 4's sliding layers, which rotate, and their global layers, which have no RoPE.

    llama.cpp reads EXAONE 4's window and pattern only in 64-layer files (the 32B); other files with them are
    read here as transformers runs the config.json they were converted from."""
    pattern = _sliding_pattern(meta, n_layer)
    nope = [i for i in range(n_layer) if pattern and (i + 1) % pattern == 0]
    return dict(sliding_window=window, sliding_window_pattern=pattern, nope_layers=nope)


def _olmo2_fields(meta: _Metadata, n_layer: int, rope_theta: float) -> dict[str, Any]:
    """OLMo 2: norms after attention and MLP only, q/k norm over the whole projection. A file with a sliding
    window is OLMo 3, whose sliding layers llama.cpp rotates with the unscaled base (as transformers does)."""
    fields: dict[str, Any] = dict(
        pre_attention_norm=False, pre_mlp_norm=False, post_attention_norm=True, post_mlp_norm=True, qk_norm="full"
    )
    window = meta.int("attention.sliding_window", default=None, minimum=0)
    if window is None:
        return fields
    fields.update(hf_model_type="olmo3", rope_local_theta=meta.float("rope.freq_base_swa", default=rope_theta))
    slides = meta.get("attention.sliding_window_pattern", {int(GGUFValueType.ARRAY)}, None, "a list of booleans")
    if window and (slides is None or any(slides)):
        fields.update(sliding_window=window, sliding_window_pattern=_sliding_pattern(meta, n_layer))
    return fields


def _qwen2moe_fields(meta: _Metadata) -> dict[str, Any]:
    """llama.cpp's qwen2moe (llm_build_qwen2moe): experts in every layer, softmax top-k weights never
    renormalised, and the shared expert behind its sigmoid gate; sizes from the expert metadata."""
    n_expert = meta.int("expert_count", maximum=1 << 16)
    return dict(
        n_expert=n_expert,
        n_expert_per_token=meta.int("expert_used_count", maximum=n_expert),
        moe_intermediate_size=meta.int("expert_feed_forward_length"),
        moe_normalize_topk=False,
        moe_shared_intermediate_size=meta.int("expert_shared_feed_forward_length"),
        moe_shared_gate=True,
    )


def _gpt_oss_fields(meta: _Metadata, feed_forward: int, rope_scaling: dict[str, Any] | None) -> dict[str, Any]:
    limit, alpha = GPT_OSS_SWIGLU
    if rope_scaling is not None and rope_scaling["rope_type"] == "yarn":
        rope_scaling["truncate"] = False  # gpt-oss's config.json says so; GGUF has no key for it
    return dict(
        attention_sinks=True,
        sliding_window=meta.int("attention.sliding_window"),
        sliding_window_pattern=2,  # llama.cpp: every other layer slides, from the first
        n_expert=meta.int("expert_count"),
        n_expert_per_token=meta.int("expert_used_count"),
        intermediate_size=meta.int("expert_feed_forward_length", default=feed_forward),
        moe_router="topk_softmax",
        moe_router_bias=True,
        moe_expert_bias=True,
        mlp_activation="clamped_swiglu",
        swiglu_limit=limit,
        swiglu_alpha=alpha,
    )


def _llama4_fields(meta: _Metadata, n_layer: int) -> dict[str, Any]:
    """What llama.cpp reads for Llama 4, and what it hard-codes (src/llama-model.cpp)."""
    if meta.int("attention.sliding_window", default=LLAMA4_CHUNK, minimum=0) == 0:
        raise CheckpointError(
            f"{meta.path}: llama4 with attention.sliding_window 0 (no chunked attention: MobileLLM) is not supported"
        )
    n_expert = meta.int("expert_count", default=0, minimum=0)
    fields: dict[str, Any] = dict(
        rope_interleaved=True,
        nope_layers=[i for i in range(n_layer) if (i + 1) % LLAMA4_NOPE_STEP == 0],
        qk_norm="none" if n_expert == LLAMA4_NO_QK_NORM_EXPERTS else "l2",
        attention_chunk_size=LLAMA4_CHUNK,
        attn_temperature_floor_scale=LLAMA4_TEMPERATURE[0],
        attn_temperature_scale=LLAMA4_TEMPERATURE[1],
    )
    if n_expert:
        size, step = meta.int("expert_feed_forward_length"), meta.int("interleave_moe_layer_step", maximum=n_layer)
        fields.update(
            n_expert=n_expert,
            n_expert_per_token=meta.int("expert_used_count", maximum=n_expert),
            moe_intermediate_size=size,
            moe_shared_intermediate_size=size,
            moe_router="sigmoid_input",
            moe_dense_layers=[i for i in range(n_layer) if (i + 1) % step],
        )
    return fields


def _sliding_pattern(meta: _Metadata, n_layer: int) -> int | None:
    """llama.cpp's pattern: an int k (every k-th layer global, 0 = all sliding) or one bool per layer."""
    key = "attention.sliding_window_pattern"
    default = SLIDING_WINDOW_PATTERN[meta.arch]
    value = meta.get(key, _INTS | {int(GGUFValueType.ARRAY)}, default, "an integer or a list of booleans")
    if isinstance(value, int):
        return value or None
    for pattern in (None, 2, 3, 4, 5, 6, 8):
        if list(value) == [bool(pattern is None or (i + 1) % pattern) for i in range(n_layer)]:
            return pattern
    raise CheckpointError(f"{meta.path}: {meta.arch}.{key} {value} does not follow a repeating pattern")


def _mla_fields(meta: _Metadata, tensors: dict[str, GGUFTensor], rope_dims: int) -> dict[str, Any]:
    """DeepSeek-V3's multi-head latent attention, as llama.cpp's deepseek2 stores it."""
    fields: dict[str, Any] = dict(
        kv_lora_rank=meta.int("attention.kv_lora_rank"),
        q_lora_rank=meta.int("attention.q_lora_rank") if "blk.0.attn_q_a.weight" in tensors else None,
        qk_rope_head_dim=rope_dims,
        v_head_dim=meta.int("attention.value_length_mla", default=None) or meta.int("attention.value_length"),
        rotary_fraction=1.0,
        rope_interleaved=True,  # llama.cpp rotates deepseek2's pairs (2i, 2i+1), as DeepSeek's rope_interleave
    )
    log_mul = meta.get("rope.scaling.yarn_log_multiplier", _FLOATS, None, "a float")
    scaling = _rope_scaling(meta, tensors, rope_dims)
    if scaling is not None and log_mul:  # llama.cpp writes 0.1 * mscale_all_dim; mscale is not stored, and is
        # equal to it in every DeepSeek-V3 and Kimi K2 config.json (so YaRN's cos/sin factor is 1)
        mscale = round(log_mul / 0.1, 6)  # stored as float32
        scaling.update(mscale=mscale, mscale_all_dim=mscale)
    fields["rope_scaling"] = scaling
    return fields


def _moe_fields(meta: _Metadata, tensors: dict[str, GGUFTensor], n_layer: int) -> dict[str, Any]:
    """DeepSeek-V3 / GLM-4.5 experts: sigmoid scores chosen by group with exp_probs_b, shared experts, the
    leading layers dense."""
    gating = meta.int("expert_gating_func", default=1)  # llama.cpp: absent means softmax (DeepSeek-V2)
    if gating != int(ExpertGatingFuncType.SIGMOID) or f"blk.{n_layer - 1}.exp_probs_b.bias" not in tensors:
        raise CheckpointError(
            f"{meta.path}: {meta.arch} with expert_gating_func {gating} (1 softmax, 2 sigmoid) and without "
            "exp_probs_b is not supported: only DeepSeek-V3's sigmoid routing with its selection bias"
        )
    size = meta.int("expert_feed_forward_length")
    bools = {int(GGUFValueType.BOOL)}
    return dict(
        n_expert=meta.int("expert_count"),
        n_expert_per_token=meta.int("expert_used_count"),
        moe_intermediate_size=size,
        moe_shared_intermediate_size=meta.int("expert_shared_count", default=0, minimum=0) * size,
        moe_dense_layers=list(range(meta.int("leading_dense_block_count", default=0, minimum=0, maximum=n_layer))),
        moe_normalize_topk=bool(meta.get("expert_weights_norm", bools, False, "a boolean")),
        moe_router="noaux_tc",
        moe_n_group=meta.int("expert_group_count", default=1),
        moe_topk_group=meta.int("expert_group_used_count", default=1),
        moe_routed_scale=meta.float("expert_weights_scale", default=1.0),
    )


def _token_ids(meta: _Metadata) -> dict[str, int]:
    """BOS / EOS / padding ids, carried through to config.json on export as from-hf does."""
    ids = {}
    for ours, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        value = meta.int(f"tokenizer.ggml.{key}", default=None, minimum=0)
        if value is not None:
            ids[f"{ours}_token_id"] = value
    return ids


# --- Config -> metadata (export) ---
def write_config(writer: GGUFWriter, c: Config) -> None:
    """The metadata `read_config` reads, as llama.cpp's convert_hf_to_gguf.py writes it for `writer.arch`.

    What llama.cpp hard-codes per architecture (Gemma's sliding pattern) is written only where the model
    differs. Llama 3's RoPE scaling is a tensor, not metadata: `llama3_rope_factors`. Token ids come with
    the tokenizer (`gguf_tokenizer.add_tokenizer_to_gguf`), or from `write_token_ids` without one.
    """
    arch = writer.arch
    writer.add_name(c.name)
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_kv_head)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.v_head_dim or c.head_dim)
    writer.add_rope_dimension_count(c.rope_dim)
    writer.add_rope_freq_base(c.rope_theta)
    if c.norm_class == "layernorm":  # Cohere 2
        writer.add_layer_norm_eps(c.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(c.norm_eps)
    _write_rope_scaling(writer, c)
    gemma = arch in ("gemma2", "gemma3")
    if gemma or arch == "phi3":  # 0: no sliding window (Phi-4)
        writer.add_sliding_window(c.sliding_window or 0)
    if gemma and c.sliding_window and c.sliding_window_pattern != GEMMA_SLIDING_WINDOW_PATTERN[arch]:
        writer.add_sliding_window_pattern([c.is_sliding(i) for i in range(c.n_layer)])
    if c.attention_logit_softcap is not None:
        writer.add_attn_logit_softcapping(c.attention_logit_softcap)
    if c.final_logit_softcap is not None:
        writer.add_final_logit_softcapping(c.final_logit_softcap)
    if arch == "gemma3" and c.rope_local_theta is not None:
        writer.add_rope_freq_base_swa(c.rope_local_theta)
    if c.logit_scale is not None:  # Cohere 2
        writer.add_logit_scale(c.logit_scale)
    if arch in ("cohere2", "exaone4") and c.sliding_window:
        writer.add_sliding_window(c.sliding_window)
        writer.add_sliding_window_pattern([c.is_sliding(i) for i in range(c.n_layer)])
    if c.hf_model_type == "olmo3":  # as convert_hf_to_gguf.py's Olmo2Model: the window and one bool per layer
        writer.add_sliding_window(c.sliding_window or 0)
        if c.sliding_window:
            writer.add_sliding_window_pattern([c.is_sliding(i) for i in range(c.n_layer)])
        if c.rope_local_theta not in (None, c.rope_theta):
            writer.add_rope_freq_base_swa(c.rope_local_theta)
    if arch == "granite":
        writer.add_embedding_scale(c.embedding_multiplier)
        writer.add_residual_scale(c.residual_multiplier)
        writer.add_logit_scale(c.logits_scaling)
        if c.attention_scale is not None:
            writer.add_attention_scale(c.attention_scale)
    if c.kv_lora_rank is not None:  # the layout before llama.cpp split attn_kv_b (tensor_rules(c, False))
        writer.add_kv_lora_rank(c.kv_lora_rank)
        if c.q_lora_rank is not None:
            writer.add_q_lora_rank(c.q_lora_rank)
        if mscale := (c.rope_scaling or {}).get("mscale_all_dim"):
            writer.add_rope_scaling_yarn_log_mul(0.1 * mscale)
    if c.moe_router == "noaux_tc":
        _write_moe(writer, c)
    elif c.n_expert:
        writer.add_expert_count(c.n_expert)
        writer.add_expert_used_count(c.n_expert_per_token)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size or c.intermediate_size)
        if c.moe_shared_intermediate_size and arch != "llama4":  # llama4's shared expert is as wide as each expert
            writer.add_expert_shared_feed_forward_length(c.moe_shared_intermediate_size)
        if arch == "llama4":
            writer.add_interleave_moe_layer_step(interleave_moe_layer_step(c))


def _write_moe(writer: GGUFWriter, c: Config) -> None:
    size = c.moe_intermediate_size or c.intermediate_size
    writer.add_expert_count(c.n_expert)
    writer.add_expert_used_count(c.n_expert_per_token)
    writer.add_expert_feed_forward_length(size)
    writer.add_expert_shared_count(c.moe_shared_intermediate_size // size)
    writer.add_leading_dense_block_count(len(c.moe_dense_layers))
    writer.add_expert_weights_scale(c.moe_routed_scale)
    writer.add_expert_weights_norm(c.moe_normalize_topk)
    writer.add_expert_group_count(c.moe_n_group)
    writer.add_expert_group_used_count(c.moe_topk_group)
    writer.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)


def _write_rope_scaling(writer: GGUFWriter, c: Config) -> None:
    scaling = c.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        for name in ("beta_fast", "beta_slow"):
            if name in scaling:
                getattr(writer, f"add_rope_scaling_yarn_{name}")(scaling[name])
        if "attention_factor" in scaling and writer.arch == "olmo2":  # as _rope_scaling reads it
            writer.add_rope_scaling_attn_factors(scaling["attention_factor"])
    elif kind not in ("default", "llama3"):
        raise CheckpointError(
            f"model {c.name!r}: RoPE scaling {kind!r} cannot be written to GGUF; supported: linear, llama3, yarn"
        )


def llama3_rope_factors(c: Config) -> torch.Tensor | None:
    """Llama 3.1+'s rope_freqs.weight (what `_llama3_scaling` reads back), or None for other RoPE types."""
    if (c.rope_scaling or {}).get("rope_type") != "llama3":
        return None
    plain = rope_inv_freq(c.rope_dim, c.rope_theta, None, 0)[0]
    return plain / rope_inv_freq(c.rope_dim, c.rope_theta, c.rope_scaling, 0)[0]


def write_token_ids(writer: GGUFWriter, c: Config) -> None:
    """BOS / EOS / padding ids from the config (the inverse of `_token_ids`), for a model without tokenizer files."""
    for ours, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if isinstance(token_id := c.hf_extra.get(f"{ours}_token_id"), int):
            add(token_id)


# --- tensors ---
@dataclass
class GGUFRule:
    gguf: str  # one GGUF tensor (the first of `parts` where there are several)
    ours: list[str]  # the plainlm tensors it holds, several where llama.cpp fuses them
    to_ours: Callable[[Any], list[torch.Tensor]]  # the GGUF tensor (or the list of `parts`) -> ours
    to_gguf: Callable[[list[torch.Tensor]], Any]  # ours -> the GGUF tensor (or the list of `parts`)
    # Where one of ours is several GGUF tensors (MoE experts: llama.cpp keeps gate and up apart, we stack
    # them in one gate_up_proj): their names, in the order to_ours takes them.
    parts: list[str] | None = None

    @property
    def gguf_names(self) -> list[str]:
        return self.parts or [self.gguf]

    def from_stored(self, stored: list[torch.Tensor]) -> list[torch.Tensor]:
        """Our tensors from the GGUF tensors named by gguf_names, in that order."""
        return self.to_ours(stored if self.parts else stored[0])

    def to_stored(self, ours: list[torch.Tensor]) -> list[torch.Tensor]:
        """The GGUF tensors named by gguf_names, from ours."""
        return self.to_gguf(ours) if self.parts else [self.to_gguf(ours)]


def tensor_rules(c: Config, split_kv_b: bool = True) -> list[GGUFRule]:
    """Every GGUF tensor of a model with this config, in llama.cpp's names and layout. split_kv_b: DeepSeek's
    kv_b_proj as attn_k_b and attn_v_b (llama.cpp since 2025), else as one attn_kv_b (the files before)."""
    arch = HF_TO_GGUF_ARCHITECTURE[c.hf_model_type]
    rules = [_plain("token_embd.weight", "embed.weight"), _norm(c, "output_norm.weight", "final_norm.weight")]
    if not c.tie_embeddings:
        if arch == "cohere2":
            raise CheckpointError(f"model {c.name!r}: llama.cpp's cohere2 has no output.weight, only a tied head")
        rules.append(_plain("output.weight", "lm_head.weight"))
    for i in range(c.n_layer):
        g, o = f"blk.{i}.", f"blocks.{i}."
        if c.pre_attention_norm:  # OLMo 2/3 and EXAONE 4 have none
            rules.append(_norm(c, g + "attn_norm.weight", o + "attn_norm.weight"))
        rules += _attention_rules(c, arch, g, o + "attn.", split_kv_b)
        if c.post_attention_norm:  # Gemma 2/3: "ffn_norm" is the pre-MLP norm, the post norms have their own names
            rules.append(_norm(c, g + "post_attention_norm.weight", o + "post_attn_norm.weight"))
            rules.append(_norm(c, g + "post_ffw_norm.weight", o + "post_mlp_norm.weight"))
        if c.pre_mlp_norm and not c.shared_attention_norm:  # Cohere 2's MLP reads attn_norm; EXAONE 4 has none
            # Seed-OSS's, gpt-oss's and GLM-4.5's pre-MLP norm keeps Hugging Face's name, post_attention_layernorm
            mlp_norm = "post_attention_norm" if arch in ("seed_oss", "gpt-oss", "glm4moe") else "ffn_norm"
            rules.append(_norm(c, g + mlp_norm + ".weight", o + "mlp_norm.weight"))
        if c.is_moe(i):
            rules += _moe_rules(c, g, o + "mlp.")
        elif arch == "phi3":  # ffn_up holds Phi-3's gate_up_proj: gate rows first, then up
            size = c.intermediate_size
            rules.append(
                _fused(g + "ffn_up.weight", [o + "mlp.gate_proj.weight", o + "mlp.up_proj.weight"], [size] * 2)
            )
            rules.append(_plain(g + "ffn_down.weight", o + "mlp.down_proj.weight"))
        else:
            for gguf_name, ours in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
                rules += _linear(g + gguf_name, o + f"mlp.{ours}", c.mlp_bias)
    return rules


def _moe_rules(c: Config, g: str, o: str) -> list[GGUFRule]:
    """The router (ffn_gate_inp) and the experts as convert_hf_to_gguf.py writes them: ffn_{gate,up,down}_exps
    (E, out, in), each expert's slice a Linear weight, gate and up our gate_up_proj's halves, and (gpt-oss) their
    biases (E, out); DeepSeek-V3's and GLM-4.5's choosing bias; the shared expert with its gate (qwen2moe)."""
    rules = _linear(g + "ffn_gate_inp", o + "router", c.moe_router_bias)
    if c.moe_router == "noaux_tc":  # DeepSeek-V3, GLM-4.5: the bias that only chooses experts
        rules.append(_plain(g + "exp_probs_b.bias", o + "router_bias"))
    for suffix, ours, dim in ((".weight", "gate_up_proj", 1), (".bias", "gate_up_proj_bias", -1)):
        if suffix == ".bias" and not c.moe_expert_bias:
            continue
        rules.append(
            GGUFRule(
                g + "ffn_gate_exps" + suffix,
                [o + "experts." + ours],
                lambda ts, dim=dim: [torch.cat(ts, dim=dim)],
                lambda ts, dim=dim: [x.contiguous() for x in ts[0].chunk(2, dim=dim)],
                parts=[g + "ffn_gate_exps" + suffix, g + "ffn_up_exps" + suffix],
            )
        )
    rules.append(_plain(g + "ffn_down_exps.weight", o + "experts.down_proj"))
    if c.moe_expert_bias:
        rules.append(_plain(g + "ffn_down_exps.bias", o + "experts.down_proj_bias"))
    if c.moe_shared_intermediate_size:
        for gguf_name, ours in (
            ("ffn_gate_shexp", "gate_proj"),
            ("ffn_up_shexp", "up_proj"),
            ("ffn_down_shexp", "down_proj"),
        ):
            rules.append(_plain(g + gguf_name + ".weight", o + f"shared_expert.{ours}.weight"))
    # The shared expert's gate as (n_embd,), as llama.cpp loads it and the released files hold it (newer
    # converters write (1, n_embd), which reads back the same)
    if c.moe_shared_gate:
        rules.append(
            GGUFRule(
                g + "ffn_gate_inp_shexp.weight",
                [o + "shared_expert_gate.weight"],
                lambda t: [t.reshape(1, -1)],
                lambda ts: ts[0].reshape(-1),
            )
        )
    return rules


def _attention_rules(c: Config, arch: str, g: str, o: str, split_kv_b: bool) -> list[GGUFRule]:
    if arch == "deepseek2":
        rules = _latent_attention_rules(c, g, o, split_kv_b)
    elif arch == "phi3":  # attn_qkv is Phi-3's qkv_proj as it is
        sizes = [c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim]
        rules = [_fused(g + "attn_qkv.weight", [o + f"{x}_proj.weight" for x in "qkv"], sizes)]
    elif arch in PERMUTED_QK:
        # llama.cpp permutes the rows of q and k (weights and biases) from Hugging Face's "halves" RoPE
        # layout to the interleaved pairs its RoPE kernel expects; undo it.
        rules = [_permuted(g + "attn_q" + s, o + "q_proj" + s, c.n_head) for s in _suffixes(c.qkv_bias)] + [
            _permuted(g + "attn_k" + s, o + "k_proj" + s, c.n_kv_head) for s in _suffixes(c.qkv_bias)
        ]
        rules += _linear(g + "attn_v", o + "v_proj", c.qkv_bias)
    else:
        rules = [r for x in "qkv" for r in _linear(g + f"attn_{x}", o + f"{x}_proj", c.qkv_bias)]
    rules += _linear(g + "attn_output", o + "o_proj", c.attn_out_bias)
    if c.attention_sinks:  # gpt-oss
        rules.append(_plain(g + "attn_sinks.weight", o + "sinks"))
    if c.qk_norm in ("head", "full"):  # Qwen3, Gemma 3, EXAONE 4: per head; OLMo 2/3: whole; Llama 4's l2: none
        rules += [_norm(c, g + "attn_q_norm.weight", o + "q_norm.weight")]
        rules += [_norm(c, g + "attn_k_norm.weight", o + "k_norm.weight")]
    return rules


def _latent_attention_rules(c: Config, g: str, o: str, split_kv_b: bool) -> list[GGUFRule]:
    """DeepSeek-V3's multi-head latent attention (attn_output is the common rule)."""
    if c.q_lora_rank is None:
        rules = [_plain(g + "attn_q.weight", o + "q_proj.weight")]
    else:
        rules = _linear(g + "attn_q_a", o + "q_a_proj", c.qkv_bias) + [
            _norm(c, g + "attn_q_a_norm.weight", o + "q_a_norm.weight"),
            _plain(g + "attn_q_b.weight", o + "q_b_proj.weight"),
        ]
    rules += _linear(g + "attn_kv_a_mqa", o + "kv_a_proj", c.qkv_bias)
    rules.append(_norm(c, g + "attn_kv_a_norm.weight", o + "kv_a_norm.weight"))
    if not split_kv_b:
        return rules + [_plain(g + "attn_kv_b.weight", o + "kv_b_proj.weight")]
    H, nope, V = c.n_head, c.head_dim - c.qk_rope_head_dim, c.v_head_dim or c.head_dim

    def to_ours(ts: list[torch.Tensor]) -> list[torch.Tensor]:  # attn_k_b (H, rank, nope), attn_v_b (H, V, rank)
        return [torch.cat((ts[0].transpose(1, 2), ts[1]), dim=1).reshape(H * (nope + V), -1)]

    def to_gguf(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        k_b, v_b = ts[0].reshape(H, nope + V, -1).split([nope, V], dim=1)
        return [k_b.transpose(1, 2).contiguous(), v_b.contiguous()]

    names = [g + "attn_k_b.weight", g + "attn_v_b.weight"]
    return rules + [GGUFRule(names[0], [o + "kv_b_proj.weight"], to_ours, to_gguf, parts=names)]


def ignored_tensor(c: Config, name: str) -> bool:
    """Tensors a file may hold that next-token decoding does not use: Llama 3's RoPE factors (read into
    Config.rope_scaling instead), GLM-4.5's multi-token-prediction layers past n_layer."""
    if name in IGNORED_TENSORS:
        return True
    return c.hf_model_type == "glm4_moe" and name.startswith("blk.") and int(name.split(".")[1]) >= c.n_layer


def _suffixes(bias: bool) -> list[str]:
    return [".weight", ".bias"] if bias else [".weight"]


def _plain(gguf_name: str, ours: str) -> GGUFRule:
    return GGUFRule(gguf_name, [ours], lambda t: [t], lambda ts: ts[0])


def _linear(gguf_stem: str, our_stem: str, bias: bool) -> list[GGUFRule]:
    return [_plain(gguf_stem + s, our_stem + s) for s in _suffixes(bias)]


def _norm(c: Config, gguf_name: str, ours: str) -> GGUFRule:
    if not c.norm_unit_offset:
        return _plain(gguf_name, ours)
    # Gemma scales by (1 + weight); llama.cpp stores the 1 in the file, we store weight - 1 (as transformers).
    return GGUFRule(gguf_name, [ours], lambda t: [t - 1.0], lambda ts: ts[0] + 1.0)


def _fused(gguf_name: str, ours: list[str], sizes: list[int]) -> GGUFRule:
    return GGUFRule(
        gguf_name, ours, lambda t: [x.contiguous() for x in t.split(sizes, dim=0)], lambda ts: torch.cat(ts, dim=0)
    )


def _permuted(gguf_name: str, ours: str, n_head: int) -> GGUFRule:
    return GGUFRule(
        gguf_name, [ours], lambda t: [unpermute_rope_rows(t, n_head)], lambda ts: permute_rope_rows(ts[0], n_head)
    )


def permute_rope_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute`: per head, rows (half 0, half 1) -> interleaved pairs."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def unpermute_rope_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_rope_rows` (transformers' `reverse_permute_weights`)."""
    return t.reshape(n_head, t.shape[0] // n_head // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()
