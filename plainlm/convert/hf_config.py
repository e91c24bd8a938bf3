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

LLAMA_LIKE = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "olmo", "olmo2", "phi3", "glm4_moe")
GEMMA_LIKE = ("gemma", "gemma2", "gemma3_text")
SUPPORTED_MODEL_TYPES = (*LLAMA_LIKE, *GEMMA_LIKE, "stablelm", "phi", "gpt_neox", "falcon", "gpt2", "deepseek_v3")

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmo": "OlmoForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "stablelm": "StableLmForCausalLM",
    "phi": "PhiForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "falcon": "FalconForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
}

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
    if model_type == "gemma3" and "text_config" in hf:  # a multimodal Gemma 3 config: take its text model
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    if model_type == "kimi_k2":  # Kimi K2's config.json names DeepSeek-V3's architecture (its remote code) so
        hf, model_type = {**hf, "model_type": "deepseek_v3"}, "deepseek_v3"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type == "gpt2":
        fields = _gpt2_fields(hf)
    elif model_type == "gpt_neox":
        fields = _neox_fields(hf)
    elif model_type == "falcon":
        fields = _falcon_fields(hf)
    elif model_type == "phi":
        fields = _phi_fields(hf)
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
            raise UnsupportedModelError("scaled RoPE on sliding-window layers is not supported")
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
        **_rope_fields(hf),
    )
    if model_type == "qwen2":  # Qwen2 always has q/k/v biases and no output bias
        fields.update(qkv_bias=True, attn_out_bias=False)
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and hf.get("use_sliding_window"):
        raise UnsupportedModelError(f"{model_type} with use_sliding_window=true is not supported")
    if model_type in ("mistral", "mixtral", "phi3") and hf.get("sliding_window"):
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
    if model_type == "olmo":  # OLMo-1: LayerNorm without any parameters
        fields.update(norm_class="layernorm", norm_affine=False, norm_eps=1e-5, clip_qkv=hf.get("clip_qkv"))
    if model_type == "olmo2":  # OLMo-2: norms after attention and MLP only, q/k norm over the whole projection
        fields.update(
            pre_attention_norm=False, pre_mlp_norm=False, post_attention_norm=True, post_mlp_norm=True, qk_norm="full"
        )
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
    else:
        hf.update(num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, hidden_act=_hf_activation(c, "silu"))
        hf.update(_hf_llama_like_extras(c))
    return hf


def _hf_activation(c: Config, preferred: str) -> str:
    if ACTIVATIONS.get(preferred) == c.mlp_activation:
        return preferred
    return {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}[c.mlp_activation]


def _hf_rope(c: Config) -> dict[str, Any]:
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
        "gemma",
        "gemma2",
        "gemma3_text",
        "deepseek_v3",
        "glm4_moe",
    ):
        out["attention_bias"] = c.qkv_bias
    if t == "llama":
        out["mlp_bias"] = c.mlp_bias
    if t != "olmo" and t != "stablelm":
        out["rms_norm_eps"] = c.norm_eps
    if t in ("mistral", "mixtral", "phi3"):
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
    return out


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
