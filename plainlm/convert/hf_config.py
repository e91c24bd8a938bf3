"""Hugging Face `config.json` <-> `Config`, for every supported `model_type`.

`config_from_hf` reads the fields each family's config class defines, with the family's
defaults where a field is absent; `config_to_hf` writes a `config.json` that
`transformers.AutoConfig` reads back to the same architecture. Weight names are in `hf.py`.
"""

from __future__ import annotations

from typing import Any

from plainlm.config import Config
from plainlm.errors import UnsupportedModelError

# Keys copied through unchanged so that to-hf writes back what from-hf read.
PASSTHROUGH_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "initializer_range")

LLAMA_LIKE = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "olmo",
    "olmo2",
    "phi3",
    "cohere2",
    "exaone4",
    "smollm3",
    "olmo3",
    "granite",
    "seed_oss",
    "ernie4_5",
    "phimoe",
    "glm4_moe",
)
GEMMA_LIKE = ("gemma", "gemma2", "gemma3_text")
SUPPORTED_MODEL_TYPES = (
    *LLAMA_LIKE,
    *GEMMA_LIKE,
    "llama4_text",
    "stablelm",
    "phi",
    "gpt_neox",
    "falcon",
    "gpt2",
    "gpt_oss",
    "deepseek_v3",
)
# Multimodal model types whose config.json holds the text model's config as its text_config
TEXT_MODEL_TYPES = {"gemma3": "gemma3_text", "llama4": "llama4_text"}

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmo": "OlmoForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "olmo3": "Olmo3ForCausalLM",
    "granite": "GraniteForCausalLM",
    "seed_oss": "SeedOssForCausalLM",
    "ernie4_5": "Ernie4_5ForCausalLM",
    "phimoe": "PhimoeForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "stablelm": "StableLmForCausalLM",
    "phi": "PhiForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "falcon": "FalconForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "llama4_text": "Llama4ForCausalLM",
    "cohere2": "Cohere2ForCausalLM",
    "exaone4": "Exaone4ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
}

# What these families' configuration classes (transformers 5) default to where the generic reading below
# would take another value: config.json may leave any of them out.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "smollm3": dict(rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=2000000.0, max_position_embeddings=32768),
    "olmo3": dict(rms_norm_eps=1e-5, rope_theta=500000.0),
    "granite": dict(rms_norm_eps=1e-6),
    "seed_oss": dict(rms_norm_eps=1e-6, attention_bias=True, head_dim=128, max_position_embeddings=524288),
    "ernie4_5": dict(
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        head_dim=128,
        max_position_embeddings=131072,
    ),
}
# Granite's scalars, named alike in config.json and Config (its attention_multiplier is attention_scale).
GRANITE_MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "logits_scaling")

ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}


def config_from_hf(hf: dict[str, Any], name: str | None = None) -> Config:
    model_type = hf.get("model_type")
    if model_type in TEXT_MODEL_TYPES and "text_config" in hf:  # a multimodal config: take its text model
        model_type = TEXT_MODEL_TYPES[model_type]
        hf = {**hf["text_config"], "model_type": model_type}
    if model_type == "kimi_k2":  # Kimi K2's config.json names DeepSeek-V3's architecture (its remote code) so
        hf, model_type = {**hf, "model_type": "deepseek_v3"}, "deepseek_v3"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    hf = {**FAMILY_DEFAULTS.get(model_type, {}), **hf}
    if model_type == "gpt2":
        fields = _gpt2_fields(hf)
    elif model_type == "gpt_neox":
        fields = _neox_fields(hf)
    elif model_type == "falcon":
        fields = _falcon_fields(hf)
    elif model_type == "phi":
        fields = _phi_fields(hf)
    elif model_type == "llama4_text":
        fields = _llama4_fields(hf)
    elif model_type == "gpt_oss":
        fields = _gpt_oss_fields(hf)
    else:
        fields = _llama_like_fields(hf, model_type)
    extra = {k: hf[k] for k in PASSTHROUGH_KEYS if k in hf}
    return Config(
        name=name or hf.get("_name_or_path") or model_type, hf_model_type=model_type, hf_extra=extra, **fields
    )


def _activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _rope_fields(hf: dict[str, Any], default_theta: float = 10000.0) -> dict[str, Any]:
    """RoPE base, partial rotary and scaling from either the old (rope_theta / rope_scaling)
    or the transformers-5 (rope_parameters, possibly per layer type) layout."""
    params = hf.get("rope_parameters") or {}
    local = None
    if "full_attention" in params or "sliding_attention" in params:
        local = params.get("sliding_attention")
        params = params.get("full_attention") or {}
    params = {**(hf.get("rope_scaling") or {}), **params}
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or default_theta
    partial = params.pop("partial_rotary_factor", None) or hf.get("partial_rotary_factor")
    kind = params.pop("rope_type", params.pop("type", "default"))
    fields: dict[str, Any] = {"rope_theta": float(theta)}
    if partial is not None:
        fields["rotary_fraction"] = float(partial)
    if kind not in ("default", None):
        if kind in ("llama3", "yarn", "longrope"):
            params.setdefault("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
        if kind not in ("linear", "llama3", "yarn"):
            raise UnsupportedModelError(f"unsupported rope scaling {kind!r}; supported: linear, llama3, yarn")
        fields["rope_scaling"] = {"rope_type": kind, **params}
    if local is not None:
        if local.get("rope_type", "default") != "default":
            raise UnsupportedModelError(
                f"rope_parameters.sliding_attention.rope_type {local['rope_type']!r} is not supported: "
                "scaled RoPE on sliding-window layers"
            )
        fields["rope_local_theta"] = float(local.get("rope_theta") or hf.get("rope_local_base_freq") or 10000.0)
    elif hf.get("rope_local_base_freq") is not None:
        fields["rope_local_theta"] = float(hf["rope_local_base_freq"])
    return fields


def _sliding_pattern(hf: dict[str, Any], n_layer: int, default_pattern: int | None) -> int | None:
    """Our sliding_window_pattern from HF's layer_types list (or the family's default)."""
    layer_types = hf.get("layer_types")
    if not layer_types:
        return default_pattern
    for pattern in (None, default_pattern, 2, 3, 4, 5, 6, 8):
        expected = [
            "full_attention" if pattern and (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layer)
        ]
        if list(layer_types) == expected:
            return pattern
    raise UnsupportedModelError(f"layer_types {layer_types} do not follow a repeating sliding/global pattern")


def _sizes(hf: dict[str, Any]) -> dict[str, Any]:
    """The size fields every family but GPT-2 names alike."""
    return dict(
        vocab_size=hf["vocab_size"],
        block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"],
        n_embd=hf["hidden_size"],
        n_head=hf["num_attention_heads"],
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        intermediate_size=hf.get("intermediate_size") or 4 * hf["hidden_size"],
    )


def _llama_like_fields(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    fields: dict[str, Any] = dict(
        **_sizes(hf),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        norm_eps=hf.get("rms_norm_eps", hf.get("layer_norm_eps", 1e-6)),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=hf.get("attention_bias", False),
        attn_out_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        mlp_activation=_activation(hf.get("hidden_act", "silu")),
        **_rope_fields(hf, default_theta=1000000.0 if model_type == "phimoe" else 10000.0),
    )
    if model_type == "qwen2":  # Qwen2 always has q/k/v biases and no output bias
        fields.update(qkv_bias=True, attn_out_bias=False)
    if model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and hf.get("use_sliding_window"):
        raise UnsupportedModelError(f"{model_type} with use_sliding_window=true is not supported")
    if model_type in ("mistral", "mixtral", "phi3", "phimoe") and hf.get("sliding_window"):
        fields["sliding_window"] = hf["sliding_window"]
    if model_type in ("qwen3", "qwen3_moe", "gemma3_text"):
        fields["qk_norm"] = "head"
    if model_type == "mixtral":
        fields.update(n_expert=hf["num_local_experts"], n_expert_per_token=hf["num_experts_per_tok"])
    if model_type == "qwen3_moe":
        if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
            raise UnsupportedModelError(
                "qwen3_moe with dense layers (decoder_sparse_step, mlp_only_layers) is not supported"
            )
        fields.update(
            n_expert=hf.get("num_experts") or hf["num_local_experts"],  # transformers 5 writes the latter
            n_expert_per_token=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["moe_intermediate_size"],
            moe_normalize_topk=hf.get("norm_topk_prob", False),
        )
    if model_type == "qwen2_moe":
        fields.update(_qwen2_moe_fields(hf))
    if model_type == "phimoe":
        fields.update(_phimoe_fields(hf))
    if model_type == "olmo":  # OLMo-1: LayerNorm without any parameters
        fields.update(norm_class="layernorm", norm_affine=False, norm_eps=1e-5, clip_qkv=hf.get("clip_qkv"))
    if model_type in ("olmo2", "olmo3"):  # OLMo-2: norms after attention and MLP only, q/k norm over the projection
        fields.update(
            pre_attention_norm=False, pre_mlp_norm=False, post_attention_norm=True, post_mlp_norm=True, qk_norm="full"
        )
    if model_type == "olmo3":
        fields.update(_olmo3_fields(hf, fields))
    if model_type == "smollm3":
        fields["nope_layers"] = _smollm3_nope_layers(hf, fields["n_layer"])
    if model_type == "granite":
        fields.update({name: float(hf.get(name, 1.0)) for name in GRANITE_MULTIPLIERS})
        fields["attention_scale"] = float(hf.get("attention_multiplier", 1.0))
    if model_type == "seed_oss":  # biased q, k and v; the output projection has its own switch
        fields["attn_out_bias"] = hf.get("attention_out_bias", False)
    if model_type == "ernie4_5":  # one switch for every projection's bias; RoPE rotates pairs (2i, 2i+1)
        bias = hf.get("use_bias", False)
        fields.update(qkv_bias=bias, attn_out_bias=bias, mlp_bias=bias, rope_interleaved=True)
    if model_type == "stablelm":
        if hf.get("qk_layernorm"):
            raise UnsupportedModelError("stablelm with qk_layernorm=true (one norm per head) is not supported")
        fields.update(
            norm_class="layernorm",
            norm_eps=hf.get("layer_norm_eps", 1e-5),
            qkv_bias=hf.get("use_qkv_bias", False),
            attn_out_bias=False,
            parallel_residual=hf.get("use_parallel_residual", False),
            shared_attention_norm=hf.get("use_parallel_residual", False),
            rotary_fraction=float(hf.get("partial_rotary_factor", 0.25)),
        )
    if model_type in GEMMA_LIKE:
        fields.update(_gemma_fields(hf, model_type, fields["n_layer"]))
    if model_type == "cohere2":
        fields.update(_cohere2_fields(hf))
    if model_type == "exaone4":
        fields.update(_exaone4_fields(hf))
    if model_type == "glm4_moe":
        fields.update(qkv_bias=hf.get("attention_bias", False), attn_out_bias=False, **_noaux_moe_fields(hf, GLM4_MOE))
        fields.setdefault("rotary_fraction", 0.5)  # Glm4MoeConfig's default
        if hf.get("use_qk_norm"):
            fields["qk_norm"] = "head"
    if model_type == "deepseek_v3":
        fields.update(_deepseek_fields(hf))
    return fields


# The defaults of transformers' DeepseekV3Config and Glm4MoeConfig, for keys a config.json leaves out.
DEEPSEEK_V3 = dict(
    n_routed_experts=256, num_experts_per_tok=8, moe_intermediate_size=2048, n_shared_experts=1, n_group=8,
    topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=3, norm_topk_prob=True,
)  # fmt: skip
GLM4_MOE = dict(
    n_routed_experts=128, num_experts_per_tok=8, moe_intermediate_size=1408, n_shared_experts=1, n_group=1,
    topk_group=1, routed_scaling_factor=1.0, first_k_dense_replace=1, norm_topk_prob=True,
)  # fmt: skip


def _noaux_moe_fields(hf: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V3 / GLM-4.5 experts: sigmoid routing by groups, shared experts, the first layers dense."""
    h = {**defaults, **{k: v for k, v in hf.items() if v is not None}}
    for key, ours in (("topk_method", "noaux_tc"), ("scoring_func", "sigmoid"), ("moe_layer_freq", 1)):
        if h.get(key, ours) != ours:
            raise UnsupportedModelError(f"{hf['model_type']} with {key}={h[key]!r} is not supported (only {ours!r})")
    return dict(
        n_expert=h["n_routed_experts"],
        n_expert_per_token=h["num_experts_per_tok"],
        moe_intermediate_size=h["moe_intermediate_size"],
        moe_shared_intermediate_size=h["n_shared_experts"] * h["moe_intermediate_size"],
        moe_dense_layers=list(range(min(h["first_k_dense_replace"], hf["num_hidden_layers"]))),
        moe_normalize_topk=h["norm_topk_prob"],
        moe_router="noaux_tc",
        moe_n_group=h["n_group"],
        moe_topk_group=h["topk_group"],
        moe_routed_scale=float(h["routed_scaling_factor"]),
    )


def _deepseek_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Multi-head latent attention and DeepSeek-V3's experts (DeepseekV3Config's defaults where keys are absent)."""
    h = {"kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, **hf}
    bias = hf.get("attention_bias", False)
    return dict(
        head_dim=h["qk_nope_head_dim"] + h["qk_rope_head_dim"],
        kv_lora_rank=h["kv_lora_rank"],
        q_lora_rank=h["q_lora_rank"],
        qk_rope_head_dim=h["qk_rope_head_dim"],
        v_head_dim=hf.get("v_head_dim") or 128,
        rope_interleaved=hf.get("rope_interleave", True),
        qkv_bias=bias,
        attn_out_bias=bias,
        **_noaux_moe_fields(hf, DEEPSEEK_V3),
    )


def _layer_types(hf: dict[str, Any], pattern: int | str | None) -> list[str]:
    """HF's layer_types, or the list its sliding_window_pattern makes: an int k (every k-th layer global) or,
    EXAONE 4's form, a string of L (local) and G (global) repeated over the layers, the last one global."""
    n = hf["num_hidden_layers"]
    if hf.get("layer_types"):
        layer_types = list(hf["layer_types"])
    elif isinstance(pattern, str):
        layer_types = [
            "sliding_attention" if pattern[i % len(pattern)] == "L" and i < n - 1 else "full_attention"
            for i in range(n)
        ]
    elif isinstance(pattern, int) and pattern > 0:
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    else:
        raise UnsupportedModelError(f"sliding_window_pattern {pattern!r} without layer_types is not supported")
    if len(layer_types) != n or set(layer_types) - {"sliding_attention", "full_attention"}:
        raise UnsupportedModelError(f"layer_types {layer_types} is not one sliding_attention/full_attention per layer")
    return layer_types


def _cohere2_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Cohere 2 (Command R7B, Command A): one bias-free LayerNorm read by attention and MLP side by side,
    interleaved RoPE on the sliding-window layers only (the global ones have no position encoding),
    logits scaled by logit_scale. Cohere2Config derives head_dim from the sizes, whatever config.json says."""
    window = hf.get("sliding_window", 4096)
    layer_types = _layer_types(hf, hf.get("sliding_window_pattern", 4))
    return dict(
        head_dim=hf["hidden_size"] // hf["num_attention_heads"],
        norm_class="layernorm",
        norm_bias=False,
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        parallel_residual=True,
        shared_attention_norm=True,
        rope_interleaved=True,
        logit_scale=float(hf.get("logit_scale", 0.0625)),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        sliding_window=window,
        sliding_window_pattern=_sliding_pattern({**hf, "layer_types": layer_types}, hf["num_hidden_layers"], 4),
        # Cohere2Attention rotates only where it has a window: with sliding_window null no layer does
        nope_layers=[i for i, t in enumerate(layer_types) if not (window and t == "sliding_attention")],
    )


def _exaone4_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """EXAONE 4: norms after attention and MLP only (as OLMo-2), q/k RMSNorm per head. With a sliding window the
    sliding layers rotate and the global ones have no position encoding; without one (1.2B) every layer rotates."""
    window = hf.get("sliding_window", 4096)
    layer_types = _layer_types(hf, hf.get("sliding_window_pattern", 4)) if window else []
    if window and "sliding_attention" not in layer_types:
        window = None  # a window no layer uses; the layers still skip RoPE below, as Exaone4Attention does
    return dict(
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        pre_attention_norm=False,
        pre_mlp_norm=False,
        post_attention_norm=True,
        post_mlp_norm=True,
        qk_norm="head",
        sliding_window=window,
        sliding_window_pattern=_sliding_pattern({**hf, "layer_types": layer_types}, hf["num_hidden_layers"], 4)
        if window
        else None,
        nope_layers=[i for i, t in enumerate(layer_types) if t != "sliding_attention"],
    )


def _smollm3_nope_layers(hf: dict[str, Any], n_layer: int) -> list[int]:
    """Our nope_layers from SmolLM3's no_rope_layers, where 1 means the layer *uses* RoPE (by default
    every no_rope_layer_interval-th layer has none)."""
    uses_rope = hf.get("no_rope_layers")
    if uses_rope is None:
        interval = hf.get("no_rope_layer_interval", 4)
        uses_rope = [int((i + 1) % interval != 0) for i in range(n_layer)]
    if len(uses_rope) < n_layer:
        raise UnsupportedModelError(f"smollm3 no_rope_layers {uses_rope} has fewer entries than the {n_layer} layers")
    # SmolLM3 slides a window over the NoPE layers where use_sliding_window says so, unlike our pattern
    slides = hf.get("use_sliding_window") and hf.get("sliding_window") is not None
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if slides and not uses_rope[i] else "full_attention" for i in range(n_layer)
    ]
    if "sliding_attention" in layer_types:
        raise UnsupportedModelError(
            f"smollm3 with sliding-window layers (use_sliding_window={hf.get('use_sliding_window')}, "
            f"layer_types={layer_types}) is not supported"
        )
    return [i for i in range(n_layer) if not uses_rope[i]]


def _olmo3_fields(hf: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """OLMo 3: OLMo 2 with sliding-window layers (three of four by default), which rotate with the
    unscaled base (RoPE scaling is for the global layers only)."""
    n_layer = fields["n_layer"]
    layer_types = _layer_types(hf, 4)
    out: dict[str, Any] = {"rope_local_theta": fields.get("rope_local_theta", fields["rope_theta"])}
    if "sliding_attention" not in layer_types:
        return out
    window = hf.get("sliding_window", 4096)
    if window is None:
        raise UnsupportedModelError("olmo3 with sliding_attention layers and sliding_window=null is not supported")
    pattern = _sliding_pattern({"layer_types": layer_types}, n_layer, 4)
    return {**out, "sliding_window": window, "sliding_window_pattern": pattern}


def _qwen2_moe_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Qwen1.5-MoE / Qwen2-MoE: q/k/v biases, routed experts beside a sigmoid-gated shared expert, and
    dense layers where mlp_only_layers or decoder_sparse_step say so (Qwen2MoeDecoderLayer)."""
    step = hf.get("decoder_sparse_step", 1)
    if not isinstance(step, int) or step < 1:
        raise UnsupportedModelError(f"qwen2_moe with decoder_sparse_step={step!r} is not supported; it must be >= 1")
    dense = set(hf.get("mlp_only_layers") or [])
    return dict(
        block_size=hf.get("max_position_embeddings", 32768),
        qkv_bias=hf.get("qkv_bias", True),
        attn_out_bias=False,
        n_expert=hf.get("num_experts", 60),
        n_expert_per_token=hf.get("num_experts_per_tok", 4),
        moe_intermediate_size=hf.get("moe_intermediate_size", 1408),
        moe_normalize_topk=hf.get("norm_topk_prob", False),
        moe_shared_intermediate_size=hf.get("shared_expert_intermediate_size", 5632),
        moe_shared_gate=True,
        moe_dense_layers=[i for i in range(hf["num_hidden_layers"]) if i in dense or (i + 1) % step],
    )


def _phimoe_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Phi-3.5-MoE: LayerNorm with biases, biased attention and head, sparsemixer routing to 2 experts."""
    if hf.get("num_experts_per_tok", 2) != 2:
        raise UnsupportedModelError(
            f"phimoe with num_experts_per_tok={hf['num_experts_per_tok']} is not supported: "
            "its sparsemixer routing always picks 2 experts (transformers ignores the value)"
        )
    return dict(
        block_size=hf.get("max_position_embeddings", 4096 * 32),
        norm_class="layernorm",
        norm_eps=hf.get("rms_norm_eps", 1e-5),  # the LayerNorms' eps, under this name
        lm_head_bias=hf.get("lm_head_bias", False),
        n_expert=hf.get("num_local_experts", 16),
        n_expert_per_token=2,
        moe_router="sparsemixer",
        moe_jitter_eps=hf.get("router_jitter_noise", 0.01),
    )


def _llama4_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Llama 4's text model, with Llama4TextConfig's defaults: MoE with a shared expert (dense layers between,
    on Maverick), NoPE every 4th layer, chunked attention with L2-normalised q and k on the RoPE layers."""
    n_layer = hf["num_hidden_layers"]
    uses_rope = hf.get("no_rope_layers") or [
        int((i + 1) % hf.get("no_rope_layer_interval", 4) != 0) for i in range(n_layer)
    ]
    if len(uses_rope) < n_layer:
        raise UnsupportedModelError(f"llama4_text no_rope_layers has {len(uses_rope)} entries for {n_layer} layers")
    nope_layers = [i for i in range(n_layer) if not uses_rope[i]]
    step = hf.get("interleave_moe_layer_step", 1)
    moe_layers = hf.get("moe_layers")
    moe_layers = list(range(step - 1, n_layer, step)) if moe_layers is None else moe_layers
    chunk = hf.get("attention_chunk_size", 8192)
    local = ["chunked_attention" if chunk and i not in nope_layers else "full_attention" for i in range(n_layer)]
    if hf.get("layer_types") and list(hf["layer_types"]) != local:
        raise UnsupportedModelError(
            f"llama4_text layer_types {hf['layer_types']} do not chunk exactly the RoPE layers (no_rope_layers); "
            "plainlm supports chunked attention on the RoPE layers only"
        )
    bias = hf.get("attention_bias", False)
    expert_size = hf.get("intermediate_size", 8192)
    return dict(
        **{
            **_sizes(hf),
            "block_size": hf.get("max_position_embeddings", 4096 * 32),
            "intermediate_size": hf.get("intermediate_size_mlp", 16384),  # the dense layers' MLP
        },
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=bias,
        attn_out_bias=bias,
        mlp_activation=_activation(hf.get("hidden_act", "silu")),
        **_rope_fields(hf, default_theta=500000.0),
        rope_interleaved=True,  # rotates (2i, 2i+1) as complex numbers
        nope_layers=nope_layers,
        qk_norm="l2" if hf.get("use_qk_norm", True) else "none",
        attention_chunk_size=chunk or None,
        attn_temperature_floor_scale=hf.get("floor_scale", 8192) if hf.get("attn_temperature_tuning", True) else None,
        attn_temperature_scale=hf.get("attn_scale", 0.1),
        n_expert=hf.get("num_local_experts", 16),
        n_expert_per_token=hf.get("num_experts_per_tok", 1),
        moe_intermediate_size=expert_size,
        moe_shared_intermediate_size=expert_size,
        moe_router="sigmoid_input",
        moe_dense_layers=[i for i in range(n_layer) if i not in moe_layers],
    )


def _gemma_fields(hf: dict[str, Any], model_type: str, n_layer: int) -> dict[str, Any]:
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{model_type} with use_bidirectional_attention=true is not supported")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if model_type == "gemma" and act == "gelu" and not hf.get("hidden_activation"):
        act = "gelu_pytorch_tanh"  # Gemma 1's legacy "gelu" means the tanh approximation, as in transformers
    fields: dict[str, Any] = dict(
        norm_unit_offset=True,
        scale_embeddings=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        mlp_activation=_activation(act),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
    )
    if model_type == "gemma":
        return fields
    default_pattern = 2 if model_type == "gemma2" else hf.get("sliding_window_pattern", 6)
    fields.update(
        post_attention_norm=True,
        post_mlp_norm=True,
        attention_scale=hf.get("query_pre_attn_scalar", 256) ** -0.5,
        attention_logit_softcap=hf.get("attn_logit_softcapping", 50.0 if model_type == "gemma2" else None),
        final_logit_softcap=hf.get("final_logit_softcapping", 30.0 if model_type == "gemma2" else None),
        sliding_window=hf.get("sliding_window", 4096),
        sliding_window_pattern=_sliding_pattern(hf, hf["num_hidden_layers"], default_pattern),
    )
    if model_type == "gemma3_text":
        fields["rope_local_theta"] = _rope_fields(hf).get("rope_local_theta", 10000.0)
    return fields


# GptOssConfig's rope when config.json names none
GPT_OSS_ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}


def _gpt_oss_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """gpt-oss: attention sinks and biases, sliding and full layers alternating, YaRN, and biased experts
    with a clamped SwiGLU, chosen by a top-k of the router's logits (GptOssConfig's defaults throughout)."""
    n_layer = hf.get("num_hidden_layers", 36)
    if not (hf.get("rope_parameters") or hf.get("rope_scaling")):
        hf = {**hf, "rope_parameters": GPT_OSS_ROPE}
    bias, window = hf.get("attention_bias", True), hf.get("sliding_window", 128)
    return dict(
        vocab_size=hf.get("vocab_size", 201088),
        block_size=hf.get("max_position_embeddings", 131072),
        n_layer=n_layer,
        n_embd=hf.get("hidden_size", 2880),
        n_head=hf.get("num_attention_heads", 64),
        n_kv_head=hf.get("num_key_value_heads") or hf.get("num_attention_heads", 64),
        head_dim=hf.get("head_dim") or 64,
        intermediate_size=hf.get("intermediate_size", 2880),
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=bias,
        attn_out_bias=bias,
        attention_sinks=True,
        sliding_window=window,
        sliding_window_pattern=_sliding_pattern(hf, n_layer, 2) if window else None,
        n_expert=hf.get("num_local_experts", 128),
        n_expert_per_token=hf.get("num_experts_per_tok", 4),
        moe_router="topk_softmax",
        moe_router_bias=True,
        moe_expert_bias=True,
        mlp_activation="clamped_swiglu",  # the experts ignore hidden_act
        swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
        swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
        **_rope_fields(hf, default_theta=150000.0),
    )


def _phi_fields(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("qk_layernorm"):
        raise UnsupportedModelError("phi with qk_layernorm=true is not supported")
    return dict(
        **_sizes(hf),
        norm_class="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        lm_head_bias=True,
        mlp_class="plain",
        mlp_activation=_activation(hf.get("hidden_act", "gelu_new")),
        parallel_residual=True,
        shared_attention_norm=True,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        **{"rotary_fraction": 0.5, **_rope_fields(hf)},
    )


def _neox_fields(hf: dict[str, Any]) -> dict[str, Any]:
    rope = _rope_fields(hf, default_theta=hf.get("rotary_emb_base", 10000.0))
    rope.setdefault("rotary_fraction", float(hf.get("rotary_pct", 0.25)))
    return dict(
        **_sizes(hf),
        norm_class="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        qkv_bias=hf.get("attention_bias", True),
        attn_out_bias=hf.get("attention_bias", True),
        mlp_bias=True,
        mlp_class="plain",
        mlp_activation=_activation(hf.get("hidden_act", "gelu")),
        parallel_residual=hf.get("use_parallel_residual", True),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        **rope,
    )


def _falcon_fields(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("alibi"):
        raise UnsupportedModelError("falcon with alibi=true (Falcon-RW) is not supported")
    n_head = hf["num_attention_heads"]
    new_arch = hf.get("new_decoder_architecture", False)
    parallel = hf.get("parallel_attn", True)
    if new_arch and not parallel:
        raise UnsupportedModelError("falcon with new_decoder_architecture and parallel_attn=false is not supported")
    if new_arch:
        n_kv_head = hf.get("num_kv_heads") or n_head
    else:
        n_kv_head = 1 if hf.get("multi_query", True) else n_head
    two_norms = new_arch and hf.get("num_ln_in_parallel_attn") in (None, 2)
    bias = hf.get("bias", False)
    return dict(
        **{
            **_sizes(hf),
            "n_kv_head": n_kv_head,
            "intermediate_size": hf.get("ffn_hidden_size") or 4 * hf["hidden_size"],
        },
        norm_class="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        qkv_bias=bias,
        attn_out_bias=bias,
        mlp_bias=bias,
        mlp_class="plain",
        mlp_activation=_activation(hf.get("activation", "gelu")),
        parallel_residual=parallel,
        shared_attention_norm=parallel and not two_norms,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        **_rope_fields(hf),
    )


def _gpt2_fields(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn") is True:
        raise UnsupportedModelError(
            "gpt2 with scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn is not supported"
        )
    n_embd = hf.get("n_embd", 768)
    return dict(
        vocab_size=hf.get("vocab_size", 50257),
        block_size=hf.get("n_positions", 1024),
        n_layer=hf.get("n_layer", 12),
        n_embd=n_embd,
        n_head=hf.get("n_head", 12),
        intermediate_size=hf.get("n_inner") or 4 * n_embd,
        position_embedding="learned",
        norm_class="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        mlp_class="plain",
        mlp_activation=_activation(hf.get("activation_function", "gelu_new")),
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


# --- Config -> config.json ---
def config_to_hf(c: Config) -> dict[str, Any]:
    t = c.hf_model_type
    if t not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"cannot export hf_model_type {t!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if t != "granite" and any(getattr(c, name) != 1.0 for name in GRANITE_MULTIPLIERS):
        raise UnsupportedModelError(f"{t} has no {', '.join(GRANITE_MULTIPLIERS)}: only granite exports them")
    hf: dict[str, Any] = {"architectures": [ARCHITECTURES[t]], "model_type": t, **c.hf_extra}
    hf["tie_word_embeddings"] = c.tie_embeddings
    if t == "gpt2":
        hf.update(
            vocab_size=c.vocab_size,
            n_positions=c.block_size,
            n_embd=c.n_embd,
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_inner=c.intermediate_size,
            activation_function=_hf_activation(c, "gelu_new"),
            layer_norm_epsilon=c.norm_eps,
        )
        return hf
    hf.update(
        vocab_size=c.vocab_size,
        max_position_embeddings=c.block_size,
        num_hidden_layers=c.n_layer,
        hidden_size=c.n_embd,
        num_attention_heads=c.n_head,
        intermediate_size=c.intermediate_size,
    )
    hf.update(_hf_rope(c))
    if t == "gpt_neox":
        hf.update(
            hidden_act=_hf_activation(c, "gelu"),
            layer_norm_eps=c.norm_eps,
            use_parallel_residual=c.parallel_residual,
            attention_bias=c.qkv_bias,
            partial_rotary_factor=c.rotary_fraction,
        )
    elif t == "falcon":
        new_arch = c.n_kv_head not in (1, c.n_head) or not c.shared_attention_norm and c.parallel_residual
        hf.update(
            new_decoder_architecture=new_arch,
            multi_query=c.n_kv_head == 1,
            num_kv_heads=c.n_kv_head,
            parallel_attn=c.parallel_residual,
            bias=c.qkv_bias,
            layer_norm_epsilon=c.norm_eps,
            alibi=False,
            ffn_hidden_size=c.intermediate_size,
            activation=_hf_activation(c, "gelu"),
            num_ln_in_parallel_attn=(1 if c.shared_attention_norm else 2) if new_arch else None,
        )
    elif t == "phi":
        hf.update(
            num_key_value_heads=c.n_kv_head,
            hidden_act=_hf_activation(c, "gelu_new"),
            layer_norm_eps=c.norm_eps,
            partial_rotary_factor=c.rotary_fraction,
            qk_layernorm=False,
        )
    elif t == "gpt_oss":
        hf.update(
            num_key_value_heads=c.n_kv_head,
            head_dim=c.head_dim,
            hidden_act="silu",
            rms_norm_eps=c.norm_eps,
            attention_bias=c.qkv_bias,
            sliding_window=c.sliding_window,
            layer_types=["sliding_attention" if c.is_sliding(i) else "full_attention" for i in range(c.n_layer)],
            num_local_experts=c.n_expert,
            num_experts_per_tok=c.n_expert_per_token,
            swiglu_limit=c.swiglu_limit,
            swiglu_alpha=c.swiglu_alpha,
        )
    else:
        hf.update(num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, hidden_act=_hf_activation(c, "silu"))
        hf.update(_hf_llama_like_extras(c))
    return hf


def _hf_activation(c: Config, preferred: str) -> str:
    if ACTIVATIONS.get(preferred) == c.mlp_activation:
        return preferred
    return {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}[c.mlp_activation]


def _hf_rope(c: Config) -> dict[str, Any]:
    if c.hf_model_type == "olmo3":  # one set per layer type: transformers applies rope_scaling to both otherwise
        full = {"rope_type": "default", "rope_theta": c.rope_theta, **(c.rope_scaling or {})}
        local = {"rope_type": "default", "rope_theta": c.rope_local_theta or c.rope_theta}
        return {"rope_parameters": {"full_attention": full, "sliding_attention": local}}
    out: dict[str, Any] = {"rope_theta": c.rope_theta}
    if c.rope_scaling:
        out["rope_scaling"] = dict(c.rope_scaling)
    if c.rotary_fraction != 1.0 and c.hf_model_type not in ("gpt_neox", "phi"):
        out["partial_rotary_factor"] = c.rotary_fraction
    if c.rope_local_theta is not None:
        out["rope_local_base_freq"] = c.rope_local_theta
    return out


def _hf_llama_like_extras(c: Config) -> dict[str, Any]:
    t = c.hf_model_type
    out: dict[str, Any] = {}
    if t in (
        "llama",
        "olmo",
        "olmo2",
        "qwen3",
        "qwen3_moe",
        "phimoe",
        "gemma",
        "gemma2",
        "gemma3_text",
        "llama4_text",
        "deepseek_v3",
        "glm4_moe",
    ):
        out["attention_bias"] = c.qkv_bias
    if t in ("smollm3", "olmo3", "granite", "seed_oss"):
        out["attention_bias"] = c.qkv_bias
    if t in ("llama", "smollm3", "granite", "seed_oss"):
        out["mlp_bias"] = c.mlp_bias
    if t == "seed_oss":
        out["attention_out_bias"] = c.attn_out_bias
    if t == "ernie4_5":
        if not c.qkv_bias == c.attn_out_bias == c.mlp_bias or not c.rope_interleaved:
            raise UnsupportedModelError(
                f"ernie4_5 has one use_bias for every projection and interleaved RoPE, not qkv_bias={c.qkv_bias}, "
                f"attn_out_bias={c.attn_out_bias}, mlp_bias={c.mlp_bias}, rope_interleaved={c.rope_interleaved}"
            )
        out["use_bias"] = c.qkv_bias
    if t == "smollm3":
        out.update(no_rope_layers=[int(c.uses_rope(i)) for i in range(c.n_layer)], use_sliding_window=False)
    if t == "olmo3":  # transformers builds the sliding mask even without sliding layers: it needs some window
        out.update(
            sliding_window=c.sliding_window or 4096,
            layer_types=["sliding_attention" if c.is_sliding(i) else "full_attention" for i in range(c.n_layer)],
        )
    if t == "granite":
        out.update({name: getattr(c, name) for name in GRANITE_MULTIPLIERS})
        out["attention_multiplier"] = c.attention_scale if c.attention_scale is not None else c.head_dim**-0.5
    if t not in ("olmo", "stablelm", "cohere2"):
        out["rms_norm_eps"] = c.norm_eps
    if t in ("mistral", "mixtral", "phi3", "phimoe"):
        out["sliding_window"] = c.sliding_window
    if t == "mixtral":
        out.update(num_local_experts=c.n_expert, num_experts_per_tok=c.n_expert_per_token)
    if t == "qwen3_moe":
        out.update(
            num_experts=c.n_expert,
            num_experts_per_tok=c.n_expert_per_token,
            moe_intermediate_size=c.moe_intermediate_size or c.intermediate_size,
            norm_topk_prob=c.moe_normalize_topk,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if t == "qwen2_moe":
        out.update(
            qkv_bias=c.qkv_bias,
            use_sliding_window=False,
            num_experts=c.n_expert,
            num_experts_per_tok=c.n_expert_per_token,
            moe_intermediate_size=c.moe_intermediate_size or c.intermediate_size,
            norm_topk_prob=c.moe_normalize_topk,
            shared_expert_intermediate_size=c.moe_shared_intermediate_size,
            decoder_sparse_step=1,
            mlp_only_layers=list(c.moe_dense_layers),
        )
    if t == "phimoe":
        out.update(
            num_local_experts=c.n_expert,
            num_experts_per_tok=c.n_expert_per_token,
            router_jitter_noise=c.moe_jitter_eps,
            lm_head_bias=c.lm_head_bias,
        )
    if t == "olmo":
        out["clip_qkv"] = c.clip_qkv
    if t == "stablelm":
        out.update(
            layer_norm_eps=c.norm_eps,
            use_qkv_bias=c.qkv_bias,
            use_parallel_residual=c.parallel_residual,
            partial_rotary_factor=c.rotary_fraction,
            qk_layernorm=False,
        )
    if t in ("gemma2", "gemma3_text"):
        out.update(
            hidden_activation=_hf_activation(c, "gelu_pytorch_tanh"),
            query_pre_attn_scalar=round((c.attention_scale or c.head_dim**-0.5) ** -2),
            attn_logit_softcapping=c.attention_logit_softcap,
            final_logit_softcapping=c.final_logit_softcap,
            sliding_window=c.sliding_window,
            layer_types=["sliding_attention" if c.is_sliding(i) else "full_attention" for i in range(c.n_layer)],
        )
    if t == "gemma3_text" and c.sliding_window_pattern:
        out["sliding_window_pattern"] = c.sliding_window_pattern
    if t in ("cohere2", "exaone4"):
        out.update(_hf_hybrid_attention(c))
    if t == "llama4_text":
        out.update(_hf_llama4(c))
    if t in ("deepseek_v3", "glm4_moe"):
        out.update(_hf_noaux_moe(c))
    if t == "glm4_moe":
        out["use_qk_norm"] = c.qk_norm == "head"
    if t == "deepseek_v3":
        out.update(
            head_dim=c.qk_rope_head_dim,  # what DeepseekV3Config sets it to
            kv_lora_rank=c.kv_lora_rank,
            q_lora_rank=c.q_lora_rank,
            qk_rope_head_dim=c.qk_rope_head_dim,
            qk_nope_head_dim=c.head_dim - c.qk_rope_head_dim,
            v_head_dim=c.v_head_dim or c.head_dim,
            rope_interleave=c.rope_interleaved,
            # DeepSeek's own code reads these three; transformers knows only this routing
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            moe_layer_freq=1,
        )
    if t == "cohere2":
        out.update(layer_norm_eps=c.norm_eps, logit_scale=c.logit_scale, attention_bias=c.qkv_bias)
        out["rotary_pct"] = 1.0  # ignored by transformers (whole heads rotate), required by llama.cpp's converter
    return out


def _hf_hybrid_attention(c: Config) -> dict[str, Any]:
    """Cohere 2's and EXAONE 4's sliding window and layer_types, from which each derives its layers without
    RoPE: only a nope_layers list that rule gives back can be written."""
    types = ["sliding_attention" if c.is_sliding(i) else "full_attention" for i in range(c.n_layer)]
    out: dict[str, Any] = {"sliding_window": c.sliding_window, "layer_types": types}
    if c.hf_model_type == "exaone4" and c.sliding_window_pattern:  # EXAONE's own notation, e.g. "LLLG"
        out["sliding_window_pattern"] = "L" * (c.sliding_window_pattern - 1) + "G"
    rotating = [c.sliding_window is not None and c.is_sliding(i) for i in range(c.n_layer)]
    if c.hf_model_type == "exaone4" and c.sliding_window is None:
        rotating = [True] * c.n_layer
    if c.nope_layers != [i for i, r in enumerate(rotating) if not r]:
        raise UnsupportedModelError(
            f"{c.hf_model_type} skips RoPE exactly on its global layers; nope_layers={c.nope_layers} "
            "cannot be written to its config.json"
        )
    return out


def interleave_moe_layer_step(c: Config) -> int:
    """Llama 4's interleave_moe_layer_step: every k-th layer has experts (1 where the MoE layers follow no step)."""
    moe_layers = [i for i in range(c.n_layer) if c.is_moe(i)]
    return next((k for k in range(1, c.n_layer + 1) if list(range(k - 1, c.n_layer, k)) == moe_layers), 1)


def _hf_llama4(c: Config) -> dict[str, Any]:
    return dict(
        intermediate_size=c.moe_intermediate_size or c.intermediate_size,
        intermediate_size_mlp=c.intermediate_size,
        num_local_experts=c.n_expert,
        num_experts_per_tok=c.n_expert_per_token,
        interleave_moe_layer_step=interleave_moe_layer_step(c),
        moe_layers=[i for i in range(c.n_layer) if c.is_moe(i)],
        no_rope_layers=[int(c.uses_rope(i)) for i in range(c.n_layer)],
        use_qk_norm=c.qk_norm == "l2",
        attention_chunk_size=c.attention_chunk_size,
        layer_types=["chunked_attention" if c.is_sliding(i) else "full_attention" for i in range(c.n_layer)],
        attn_temperature_tuning=c.attn_temperature_floor_scale is not None,
        floor_scale=c.attn_temperature_floor_scale or 8192,
        attn_scale=c.attn_temperature_scale,
    )


def _hf_noaux_moe(c: Config) -> dict[str, Any]:
    first_k = len(c.moe_dense_layers)
    if c.moe_dense_layers != list(range(first_k)):
        raise UnsupportedModelError(
            f"cannot export {c.hf_model_type} with dense layers {c.moe_dense_layers}: its config.json only has "
            "first_k_dense_replace, the first k layers"
        )
    size = c.moe_intermediate_size or c.intermediate_size
    return dict(
        n_routed_experts=c.n_expert,
        num_experts_per_tok=c.n_expert_per_token,
        moe_intermediate_size=size,
        n_shared_experts=c.moe_shared_intermediate_size // size,
        first_k_dense_replace=first_k,
        norm_topk_prob=c.moe_normalize_topk,
        n_group=c.moe_n_group,
        topk_group=c.moe_topk_group,
        routed_scaling_factor=c.moe_routed_scale,
    )
