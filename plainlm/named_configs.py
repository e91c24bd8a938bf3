"""Named configs: real architectures with their real sizes and Hugging Face repo ids.

Each entry is the architectural part of that model's `config.json` on the Hugging Face hub,
keyed by repo id and read by `convert.hf_config.config_from_hf`, so every value can be checked
line by line against the hub. `config_for_name("Llama-3.2-1B")` looks up `NAMED_CONFIGS`, whose
keys are the model part of the repo ids. Nothing here builds a model or downloads anything.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from plainlm.config import Config
from plainlm.convert.hf_config import config_from_hf
from plainlm.errors import InvalidInput

# --- Meta Llama 2, Code Llama, TinyLlama: the 32k SentencePiece vocabulary ---
_LLAMA_2 = dict(
    model_type="llama",
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
_LLAMA_2_7B = dict(
    _LLAMA_2,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
)
_LLAMA_2_13B = dict(
    _LLAMA_2,
    hidden_size=5120,
    intermediate_size=13824,
    num_hidden_layers=40,
    num_attention_heads=40,
    num_key_value_heads=40,
)
_LLAMA_2_70B = dict(
    _LLAMA_2,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
)
_CODE_LLAMA = dict(vocab_size=32016, max_position_embeddings=16384, rope_theta=1000000)
_TINYLLAMA = dict(
    _LLAMA_2,
    max_position_embeddings=2048,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    rope_theta=10000.0,
)

# --- Meta Llama 3, 3.1, 3.2, 3.3: 128k tiktoken vocabulary, GQA; 3.1+ stretch RoPE to 128k ("llama3") ---
_LLAMA_3 = dict(
    model_type="llama",
    vocab_size=128256,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    rope_theta=500000.0,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
)
_LLAMA_3_CHAT_EOS = [128001, 128008, 128009]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
_LLAMA_3_8B = dict(
    _LLAMA_3,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
)
_LLAMA_3_70B = dict(
    _LLAMA_3,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
)


def _llama3_rope(factor: float) -> dict[str, Any]:
    return dict(
        max_position_embeddings=131072,
        rope_scaling=dict(
            factor=factor,
            high_freq_factor=4.0,
            low_freq_factor=1.0,
            original_max_position_embeddings=8192,
            rope_type="llama3",
        ),
    )


_LLAMA_3_1_8B = dict(_LLAMA_3_8B, **_llama3_rope(8.0))
_LLAMA_3_1_70B = dict(_LLAMA_3_70B, **_llama3_rope(8.0))
_LLAMA_3_2 = dict(
    _LLAMA_3, **_llama3_rope(32.0), tie_word_embeddings=True, intermediate_size=8192, num_key_value_heads=8
)
_LLAMA_3_2_1B = dict(_LLAMA_3_2, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, head_dim=64)
_LLAMA_3_2_3B = dict(_LLAMA_3_2, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, head_dim=128)

# --- Hugging Face SmolLM2: small Llamas with tied embeddings ---
_SMOLLM2 = dict(
    model_type="llama",
    vocab_size=49152,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
)
_SMOLLM2_INSTRUCT_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)
_SMOLLM2_135M = dict(
    _SMOLLM2,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    rope_theta=100000,
)
_SMOLLM2_360M = dict(
    _SMOLLM2,
    hidden_size=960,
    intermediate_size=2560,
    num_hidden_layers=32,
    num_attention_heads=15,
    num_key_value_heads=5,
    rope_theta=100000,
)
_SMOLLM2_1_7B = dict(
    _SMOLLM2,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=24,
    num_attention_heads=32,
    num_key_value_heads=32,
    rope_theta=130000,
)

# --- Mistral AI Mistral and Mixtral: v0.1 slides a 4k window over every layer; later versions do not ---
_MISTRAL_7B = dict(
    model_type="mistral",
    vocab_size=32000,
    max_position_embeddings=32768,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    rope_theta=10000.0,
    sliding_window=4096,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
_MISTRAL_7B_V0_3 = dict(_MISTRAL_7B, vocab_size=32768, rope_theta=1000000.0, sliding_window=None)
_MIXTRAL_8X7B = dict(
    _MISTRAL_7B,
    model_type="mixtral",
    rope_theta=1000000.0,
    sliding_window=None,
    num_local_experts=8,
    num_experts_per_tok=2,
)

# --- Alibaba Qwen2 and Qwen2.5: biases on q/k/v, no sliding window in use ---
_QWEN2 = dict(
    model_type="qwen2",
    vocab_size=151936,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    rope_theta=1000000.0,
    use_sliding_window=False,
    bos_token_id=151643,
    eos_token_id=151643,
)
_QWEN_CHAT_EOS = 151645  # <|im_end|>
_QWEN2_0_5B = dict(
    _QWEN2,
    max_position_embeddings=131072,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
_QWEN2_7B = dict(
    _QWEN2,
    vocab_size=152064,
    max_position_embeddings=131072,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)
_QWEN2_5_0_5B = dict(_QWEN2_0_5B, max_position_embeddings=32768)
_QWEN2_5_1_5B = dict(
    _QWEN2,
    max_position_embeddings=131072,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)

# --- Alibaba Qwen1.5-MoE and Qwen2-MoE: routed experts (softmax top-k, not renormalised) beside a shared expert
# behind a sigmoid gate, in every layer ---
_QWEN2_MOE = dict(
    _QWEN2, model_type="qwen2_moe", tie_word_embeddings=False, decoder_sparse_step=1, norm_topk_prob=False
)
_QWEN1_5_MOE_A2_7B = dict(
    _QWEN2_MOE,
    max_position_embeddings=8192,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=60,
    num_experts_per_tok=4,
    moe_intermediate_size=1408,
    shared_expert_intermediate_size=5632,
)
_QWEN2_57B_A14B = dict(
    _QWEN2_MOE,
    max_position_embeddings=131072,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    num_experts=64,
    num_experts_per_tok=8,
    moe_intermediate_size=2560,
    shared_expert_intermediate_size=20480,
)

# --- Alibaba Qwen3: RMSNorm on each query and key head, head_dim 128 apart from the width; one MoE ---
_QWEN3 = dict(
    model_type="qwen3",
    vocab_size=151936,
    max_position_embeddings=40960,
    head_dim=128,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    rope_theta=1000000.0,
    attention_bias=False,
    use_sliding_window=False,
    bos_token_id=151643,
    eos_token_id=151645,
)
_QWEN3_0_6B = dict(
    _QWEN3,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    tie_word_embeddings=True,
)
_QWEN3_1_7B = dict(
    _QWEN3,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    tie_word_embeddings=True,
)
_QWEN3_4B = dict(
    _QWEN3,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=True,
)
_QWEN3_8B = dict(
    _QWEN3,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=False,
)
_QWEN3_30B_A3B = dict(
    _QWEN3,
    model_type="qwen3_moe",
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    tie_word_embeddings=False,
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
)

# --- Meta Llama 4 (the text model of the multimodal releases): a shared expert beside the routed ones, every 4th
# layer without RoPE (and with attention temperature), the others attending in 8k chunks ---
_LLAMA_4 = dict(
    model_type="llama4_text",
    vocab_size=202048,
    hidden_size=5120,
    intermediate_size=8192,  # each expert's, and the shared expert's
    intermediate_size_mlp=16384,  # the dense layers' (Maverick's every other layer)
    num_hidden_layers=48,
    num_attention_heads=40,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    no_rope_layers=[int((i + 1) % 4 != 0) for i in range(48)],
    attention_chunk_size=8192,
    attn_temperature_tuning=True,
    floor_scale=8192,
    attn_scale=0.1,
    num_experts_per_tok=1,
    attention_bias=False,
    tie_word_embeddings=False,
    bos_token_id=200000,
    eos_token_id=[200001, 200007, 200008],
    pad_token_id=200018,
)
_LLAMA_4_SCOUT = dict(
    _LLAMA_4,
    max_position_embeddings=10485760,
    num_local_experts=16,
    interleave_moe_layer_step=1,
    use_qk_norm=True,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 16.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
    },
)
_LLAMA_4_MAVERICK = dict(
    _LLAMA_4, max_position_embeddings=1048576, num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False
)

# --- Google Gemma: GeGLU, (1 + w) RMSNorm, embeddings scaled by sqrt(width), 256k vocabulary ---
_GEMMA = dict(
    model_type="gemma",
    vocab_size=256000,
    max_position_embeddings=8192,
    head_dim=256,
    rms_norm_eps=1e-6,
    hidden_act="gelu",  # the legacy value of the release; it means the tanh approximation (see hf_config.py)
    rope_theta=10000.0,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
)
_GEMMA_2B = dict(
    _GEMMA,
    hidden_size=2048,
    intermediate_size=16384,
    num_hidden_layers=18,
    num_attention_heads=8,
    num_key_value_heads=1,
)
_GEMMA_7B = dict(
    _GEMMA,
    hidden_size=3072,
    intermediate_size=24576,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=16,
)

# --- Google Gemma 2: norms after attention and MLP, logit softcaps, every other layer slides over 4k ---
_GEMMA_2 = dict(
    _GEMMA,
    model_type="gemma2",
    hidden_act="gelu_pytorch_tanh",
    hidden_activation="gelu_pytorch_tanh",
    query_pre_attn_scalar=256,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    sliding_window=4096,
)
_GEMMA_2_2B = dict(
    _GEMMA_2,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
)
_GEMMA_2_9B = dict(
    _GEMMA_2,
    hidden_size=3584,
    intermediate_size=14336,
    num_hidden_layers=42,
    num_attention_heads=16,
    num_key_value_heads=8,
)
_GEMMA_2_27B = dict(
    _GEMMA_2,
    hidden_size=4608,
    intermediate_size=36864,
    num_hidden_layers=46,
    num_attention_heads=32,
    num_key_value_heads=16,
    head_dim=128,
    query_pre_attn_scalar=144,  # hidden_size / num_attention_heads, not head_dim
)

# --- Google Gemma 3 (text): q/k norms, 5 sliding 512-token layers per global one, local RoPE base 10k ---
_GEMMA_3 = dict(
    model_type="gemma3_text",
    vocab_size=262144,
    max_position_embeddings=32768,
    head_dim=256,
    rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
    query_pre_attn_scalar=256,
    attn_logit_softcapping=None,
    final_logit_softcapping=None,
    sliding_window=512,
    rope_theta=1000000.0,
    rope_local_base_freq=10000.0,
    rope_scaling=None,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
)
_GEMMA_3_270M = dict(
    _GEMMA_3,
    hidden_size=640,
    intermediate_size=2048,
    num_hidden_layers=18,
    num_attention_heads=4,
    num_key_value_heads=1,
    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
)
_GEMMA_3_1B = dict(
    _GEMMA_3,
    hidden_size=1152,
    intermediate_size=6912,
    num_hidden_layers=26,
    num_attention_heads=4,
    num_key_value_heads=1,
    sliding_window_pattern=6,
)

# --- Microsoft Phi-1.5 and Phi-2: parallel attention and MLP on one LayerNorm, partial RoPE ---
_PHI = dict(
    model_type="phi",
    vocab_size=51200,
    max_position_embeddings=2048,
    num_attention_heads=32,
    layer_norm_eps=1e-5,
    hidden_act="gelu_new",
    rope_theta=10000.0,
    qk_layernorm=False,
    tie_word_embeddings=False,
)

# --- Microsoft Phi-3 and Phi-4: Llama-like (fused q/k/v and gate/up in the checkpoint) ---
_PHI_3 = dict(model_type="phi3", rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False)

# --- EleutherAI Pythia (GPT-NeoX): parallel residual, a quarter of each head rotates ---
_PYTHIA = dict(
    model_type="gpt_neox",
    vocab_size=50304,
    max_position_embeddings=2048,
    layer_norm_eps=1e-5,
    hidden_act="gelu",
    rotary_pct=0.25,
    rotary_emb_base=10000,
    use_parallel_residual=True,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
)


def _pythia(hidden_size: int, num_hidden_layers: int, num_attention_heads: int, **kwargs: Any) -> dict[str, Any]:
    return dict(
        _PYTHIA,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        **kwargs,
    )


# --- Stability AI StableLM: LayerNorm, a quarter of each head rotates ---
_STABLELM = dict(
    model_type="stablelm",
    max_position_embeddings=4096,
    layer_norm_eps=1e-5,
    hidden_act="silu",
    rope_theta=10000,
    partial_rotary_factor=0.25,
    use_parallel_residual=False,
    qk_layernorm=False,
    tie_word_embeddings=False,
)

# --- TII Falcon: parallel attention and MLP; 7B is multi-query on one norm, 40B grouped on two ---
_FALCON = dict(
    model_type="falcon",
    vocab_size=65024,
    layer_norm_epsilon=1e-5,
    alibi=False,
    bias=False,
    parallel_attn=True,
    bos_token_id=11,
    eos_token_id=11,
)

# --- TII Falcon3: Llama architecture, head_dim 256 ---
_FALCON_3 = dict(
    model_type="llama",
    vocab_size=131072,
    head_dim=256,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    rope_theta=1000042.0,
    tie_word_embeddings=False,
)

# --- Allen AI OLMo: LayerNorm without parameters; OLMo 2: norms after attention and MLP, q/k norms ---
_OLMO = dict(
    model_type="olmo",
    vocab_size=50304,
    max_position_embeddings=2048,
    hidden_act="silu",
    rope_theta=10000.0,
    attention_bias=False,
    clip_qkv=None,
    eos_token_id=50279,
    pad_token_id=1,
)

# --- Hugging Face SmolLM3: a Llama whose every fourth layer has no RoPE (NoPE) ---
_SMOLLM3_3B = dict(
    model_type="smollm3",
    vocab_size=128256,
    max_position_embeddings=65536,
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    rope_theta=5000000.0,
    no_rope_layer_interval=4,
    no_rope_layers=[int((i + 1) % 4 != 0) for i in range(36)],  # 1: the layer rotates
    use_sliding_window=False,
    sliding_window=None,
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=True,
    eos_token_id=128012,
    pad_token_id=128004,
)

# --- Allen AI OLMo 3: OLMo 2 with three 4k sliding layers per global one; YaRN on the global layers only ---
_OLMO_3 = dict(
    model_type="olmo3",
    vocab_size=100278,
    max_position_embeddings=65536,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    rope_theta=500000,
    rope_scaling=dict(
        rope_type="yarn",
        factor=8.0,
        original_max_position_embeddings=8192,
        attention_factor=1.2079441541679836,
        beta_fast=32,
        beta_slow=1,
    ),
    sliding_window=4096,
    attention_bias=False,
    tie_word_embeddings=False,
    eos_token_id=100257,
    pad_token_id=100277,
)

# --- IBM Granite 3.3: a Llama with scaled embeddings, residual branches, attention and logits ---
_GRANITE_3_3 = dict(
    model_type="granite",
    vocab_size=49159,
    max_position_embeddings=131072,
    num_hidden_layers=40,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    rope_theta=10000000.0,
    embedding_multiplier=12.0,
    residual_multiplier=0.22,
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)

# --- OpenAI GPT-2: learned absolute positions, LayerNorm, biases everywhere, tied embeddings ---
_GPT2 = dict(
    model_type="gpt2",
    vocab_size=50257,
    n_positions=1024,
    layer_norm_epsilon=1e-5,
    activation_function="gelu_new",
    bos_token_id=50256,
    eos_token_id=50256,
)

# --- Cohere 2 (Command R7B, Command A): parallel attention and MLP on one LayerNorm, scaled logits; three
# sliding 4k-token layers with interleaved RoPE, then a global one without position encoding ---
_COHERE_2 = dict(
    model_type="cohere2",
    vocab_size=256000,
    hidden_act="silu",
    layer_norm_eps=1e-5,
    logit_scale=0.25,
    rope_theta=50000.0,
    sliding_window=4096,
    sliding_window_pattern=4,
    attention_bias=False,
    tie_word_embeddings=True,
    bos_token_id=5,
    eos_token_id=255001,
    pad_token_id=0,
)

# --- LG AI EXAONE 4.0: norms after attention and MLP only, per-head q/k norms; the 32B has three sliding 4k-token
# layers with RoPE per global one without position encoding, the 1.2B no window and RoPE everywhere ---
_EXAONE_4 = dict(
    model_type="exaone4",
    vocab_size=102400,
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=1000000.0,
    **_llama3_rope(16.0),
    bos_token_id=1,
    eos_token_id=361,
    pad_token_id=0,
)

# --- OpenAI gpt-oss: attention sinks, sliding (128) and full layers alternating, YaRN, 4 of 32 / 128 experts ---
# (The hub's weights are MXFP4 experts, dequantized as they load: convert/mxfp4.py.)
_GPT_OSS = dict(
    model_type="gpt_oss",
    vocab_size=201088,
    max_position_embeddings=131072,
    hidden_size=2880,
    intermediate_size=2880,
    head_dim=64,
    num_attention_heads=64,
    num_key_value_heads=8,
    num_experts_per_tok=4,
    rms_norm_eps=1e-5,
    attention_bias=True,
    sliding_window=128,
    swiglu_limit=7.0,
    rope_theta=150000,
    rope_scaling={
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 4096,
    },
    tie_word_embeddings=False,
    eos_token_id=200002,
    pad_token_id=199999,
)


def _gpt_oss(layers: int, experts: int) -> dict[str, Any]:
    layer_types = ["sliding_attention", "full_attention"] * (layers // 2)
    return dict(_GPT_OSS, num_hidden_layers=layers, num_local_experts=experts, layer_types=layer_types)


# Repo id -> the architectural part of its config.json, as the hub has it.
# --- DeepSeek-V3 / R1, Moonshot Kimi K2: multi-head latent attention, 256 (384) sigmoid-routed experts in groups ---
_DEEPSEEK_V3 = dict(
    model_type="deepseek_v3",
    vocab_size=129280,
    max_position_embeddings=163840,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    num_attention_heads=128,
    num_key_value_heads=128,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    n_routed_experts=256,
    n_shared_experts=1,
    num_experts_per_tok=8,
    n_group=8,
    topk_group=4,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    first_k_dense_replace=3,
    moe_layer_freq=1,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    attention_bias=False,
    rope_theta=10000,
    rope_scaling={
        "rope_type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
)
# Kimi K2's config.json says model_type "kimi_k2", which transformers does not know: its remote code is DeepSeek-V3's,
# and config_from_hf reads "kimi_k2" as deepseek_v3 (as this entry, for transformers to compare, says)
_KIMI_K2 = dict(
    _DEEPSEEK_V3,
    vocab_size=163840,
    max_position_embeddings=131072,
    num_attention_heads=64,
    num_key_value_heads=64,
    n_routed_experts=384,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.827,
    first_k_dense_replace=1,
    rope_theta=50000.0,
    rope_scaling={
        "rope_type": "yarn",
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    bos_token_id=163584,
    eos_token_id=163585,
)

# --- Zhipu GLM-4.5: grouped-query attention with biases, half of each head rotates, DeepSeek-V3's routing ---
_GLM_4_5 = dict(
    model_type="glm4_moe",
    vocab_size=151552,
    max_position_embeddings=131072,
    head_dim=128,
    num_attention_heads=96,
    num_key_value_heads=8,
    partial_rotary_factor=0.5,
    attention_bias=True,
    n_group=1,
    topk_group=1,
    n_shared_experts=1,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=1000000,
    tie_word_embeddings=False,
    pad_token_id=151329,
    eos_token_id=[151329, 151336, 151338],
)

HF_CONFIG_JSON: dict[str, dict[str, Any]] = {
    # Llama 2 and Code Llama
    "meta-llama/Llama-2-7b-hf": _LLAMA_2_7B,
    "meta-llama/Llama-2-7b-chat-hf": _LLAMA_2_7B,
    "meta-llama/Llama-2-13b-hf": _LLAMA_2_13B,
    "meta-llama/Llama-2-70b-hf": _LLAMA_2_70B,
    "codellama/CodeLlama-7b-hf": dict(_LLAMA_2_7B, **_CODE_LLAMA),
    "codellama/CodeLlama-13b-hf": dict(_LLAMA_2_13B, **_CODE_LLAMA),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": _TINYLLAMA,
    # Llama 3
    "meta-llama/Meta-Llama-3-8B": dict(_LLAMA_3_8B, max_position_embeddings=8192),
    "meta-llama/Meta-Llama-3-8B-Instruct": dict(_LLAMA_3_8B, max_position_embeddings=8192, eos_token_id=128009),
    "meta-llama/Llama-3.1-8B": _LLAMA_3_1_8B,
    "meta-llama/Llama-3.1-8B-Instruct": dict(_LLAMA_3_1_8B, eos_token_id=_LLAMA_3_CHAT_EOS),
    "meta-llama/Llama-3.1-70B": _LLAMA_3_1_70B,
    "meta-llama/Llama-3.2-1B": _LLAMA_3_2_1B,
    "meta-llama/Llama-3.2-1B-Instruct": dict(_LLAMA_3_2_1B, eos_token_id=_LLAMA_3_CHAT_EOS),
    "meta-llama/Llama-3.2-3B": _LLAMA_3_2_3B,
    "meta-llama/Llama-3.2-3B-Instruct": dict(_LLAMA_3_2_3B, eos_token_id=_LLAMA_3_CHAT_EOS),
    "meta-llama/Llama-3.3-70B-Instruct": dict(_LLAMA_3_1_70B, eos_token_id=_LLAMA_3_CHAT_EOS),
    "meta-llama/Llama-4-Scout-17B-16E-Instruct": _LLAMA_4_SCOUT,
    "meta-llama/Llama-4-Maverick-17B-128E-Instruct": _LLAMA_4_MAVERICK,
    # SmolLM2
    "HuggingFaceTB/SmolLM2-135M": _SMOLLM2_135M,
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(_SMOLLM2_135M, **_SMOLLM2_INSTRUCT_TOKENS),
    "HuggingFaceTB/SmolLM2-360M": _SMOLLM2_360M,
    "HuggingFaceTB/SmolLM2-360M-Instruct": dict(_SMOLLM2_360M, **_SMOLLM2_INSTRUCT_TOKENS),
    "HuggingFaceTB/SmolLM2-1.7B": _SMOLLM2_1_7B,
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": dict(_SMOLLM2_1_7B, **_SMOLLM2_INSTRUCT_TOKENS),
    # Mistral and Mixtral
    "mistralai/Mistral-7B-v0.1": _MISTRAL_7B,
    "mistralai/Mistral-7B-Instruct-v0.3": _MISTRAL_7B_V0_3,
    "mistralai/Mixtral-8x7B-v0.1": _MIXTRAL_8X7B,
    "mistralai/Mixtral-8x7B-Instruct-v0.1": _MIXTRAL_8X7B,
    # Qwen2 and Qwen2.5
    "Qwen/Qwen2-0.5B": _QWEN2_0_5B,
    "Qwen/Qwen2-7B": _QWEN2_7B,
    "Qwen/Qwen2.5-0.5B": _QWEN2_5_0_5B,
    "Qwen/Qwen2.5-0.5B-Instruct": dict(_QWEN2_5_0_5B, eos_token_id=_QWEN_CHAT_EOS),
    "Qwen/Qwen2.5-1.5B": _QWEN2_5_1_5B,
    "Qwen/Qwen2.5-7B-Instruct": dict(_QWEN2_7B, max_position_embeddings=32768, eos_token_id=_QWEN_CHAT_EOS),
    # Qwen1.5-MoE and Qwen2-MoE
    "Qwen/Qwen1.5-MoE-A2.7B": _QWEN1_5_MOE_A2_7B,
    "Qwen/Qwen2-57B-A14B": _QWEN2_57B_A14B,
    "Qwen/Qwen2-57B-A14B-Instruct": dict(_QWEN2_57B_A14B, max_position_embeddings=32768, eos_token_id=_QWEN_CHAT_EOS),
    # Qwen3
    "Qwen/Qwen3-0.6B": _QWEN3_0_6B,
    "Qwen/Qwen3-1.7B": _QWEN3_1_7B,
    "Qwen/Qwen3-4B": _QWEN3_4B,
    "Qwen/Qwen3-8B": _QWEN3_8B,
    "Qwen/Qwen3-30B-A3B": _QWEN3_30B_A3B,
    # Gemma, Gemma 2, Gemma 3
    "google/gemma-2b": _GEMMA_2B,
    "google/gemma-7b": _GEMMA_7B,
    "google/gemma-2-2b": _GEMMA_2_2B,
    "google/gemma-2-9b": _GEMMA_2_9B,
    "google/gemma-2-27b": _GEMMA_2_27B,
    "google/gemma-3-270m": _GEMMA_3_270M,
    "google/gemma-3-1b-pt": _GEMMA_3_1B,
    "google/gemma-3-1b-it": dict(_GEMMA_3_1B, eos_token_id=[1, 106]),  # 106: <end_of_turn>
    # Phi
    "microsoft/phi-1_5": dict(
        _PHI, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, partial_rotary_factor=0.5
    ),
    "microsoft/phi-2": dict(
        _PHI,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=32,
        partial_rotary_factor=0.4,
        bos_token_id=50256,
        eos_token_id=50256,
    ),
    "microsoft/Phi-3-mini-4k-instruct": dict(
        _PHI_3,
        vocab_size=32064,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        rope_theta=10000.0,
        sliding_window=2047,
        bos_token_id=1,
        eos_token_id=32000,
        pad_token_id=32000,
    ),
    "microsoft/phi-4": dict(
        _PHI_3,
        vocab_size=100352,
        max_position_embeddings=16384,
        original_max_position_embeddings=16384,
        hidden_size=5120,
        intermediate_size=17920,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=10,
        rope_theta=250000,
        sliding_window=None,
    ),
    # Pythia
    "EleutherAI/pythia-70m": _pythia(512, 6, 8),
    "EleutherAI/pythia-160m": _pythia(768, 12, 12),
    "EleutherAI/pythia-410m": _pythia(1024, 24, 16),
    "EleutherAI/pythia-1b": _pythia(2048, 16, 8),
    "EleutherAI/pythia-1.4b": _pythia(2048, 24, 16),
    "EleutherAI/pythia-2.8b": _pythia(2560, 32, 32),
    "EleutherAI/pythia-6.9b": _pythia(4096, 32, 32, vocab_size=50432),
    "EleutherAI/pythia-12b": _pythia(5120, 36, 40, vocab_size=50688),
    # StableLM
    "stabilityai/stablelm-3b-4e1t": dict(
        _STABLELM,
        vocab_size=50304,
        hidden_size=2560,
        intermediate_size=6912,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        use_qkv_bias=False,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "stabilityai/stablelm-2-1_6b": dict(
        _STABLELM,
        vocab_size=100352,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        use_qkv_bias=True,
        bos_token_id=100257,
        eos_token_id=100257,
    ),
    # Falcon and Falcon3
    "tiiuae/falcon-7b": dict(
        _FALCON,
        hidden_size=4544,
        num_hidden_layers=32,
        num_attention_heads=71,
        multi_query=True,
        new_decoder_architecture=False,
    ),
    "tiiuae/falcon-40b": dict(
        _FALCON,
        hidden_size=8192,
        num_hidden_layers=60,
        num_attention_heads=128,
        num_kv_heads=8,
        new_decoder_architecture=True,
    ),
    "tiiuae/Falcon3-1B-Base": dict(
        _FALCON_3,
        max_position_embeddings=4096,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=18,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
    "tiiuae/Falcon3-7B-Base": dict(
        _FALCON_3,
        max_position_embeddings=32768,
        hidden_size=3072,
        intermediate_size=23040,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=4,
    ),
    # OLMo and OLMo 2
    "allenai/OLMo-1B-hf": dict(
        _OLMO,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=True,
    ),
    "allenai/OLMo-7B-hf": dict(
        _OLMO,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        tie_word_embeddings=False,
    ),
    "allenai/OLMo-2-1124-7B": dict(
        model_type="olmo2",
        vocab_size=100352,
        max_position_embeddings=4096,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        rope_theta=500000.0,
        attention_bias=False,
        tie_word_embeddings=False,
        eos_token_id=100257,
        pad_token_id=100277,
    ),
    # Cohere 2
    "CohereLabs/c4ai-command-r7b-12-2024": dict(
        _COHERE_2,
        max_position_embeddings=132096,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "CohereLabs/c4ai-command-a-03-2025": dict(
        _COHERE_2,
        max_position_embeddings=131072,
        hidden_size=12288,
        intermediate_size=36864,
        num_hidden_layers=64,
        num_attention_heads=96,
        num_key_value_heads=8,
    ),
    # EXAONE 4.0
    "LGAI-EXAONE/EXAONE-4.0-1.2B": dict(
        _EXAONE_4,
        max_position_embeddings=65536,
        hidden_size=2048,
        intermediate_size=4096,
        num_hidden_layers=30,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        sliding_window=None,
        layer_types=["full_attention"] * 30,
        tie_word_embeddings=True,
    ),
    "LGAI-EXAONE/EXAONE-4.0-32B": dict(
        _EXAONE_4,
        max_position_embeddings=131072,
        hidden_size=5120,
        intermediate_size=27392,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        head_dim=128,
        sliding_window=4096,
        sliding_window_pattern="LLLG",
        layer_types=["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(64)],
        tie_word_embeddings=False,
    ),
    # SmolLM3, OLMo 3, Granite 3.3, Seed-OSS, ERNIE 4.5
    "HuggingFaceTB/SmolLM3-3B": _SMOLLM3_3B,
    "allenai/Olmo-3-1025-7B": dict(
        _OLMO_3,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "allenai/Olmo-3-1125-32B": dict(
        _OLMO_3,
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
    ),
    "ibm-granite/granite-3.3-2b-instruct": dict(
        _GRANITE_3_3, hidden_size=2048, intermediate_size=8192, attention_multiplier=0.015625, logits_scaling=8.0
    ),
    "ibm-granite/granite-3.3-8b-instruct": dict(
        _GRANITE_3_3, hidden_size=4096, intermediate_size=12800, attention_multiplier=0.0078125, logits_scaling=16.0
    ),
    "ByteDance-Seed/Seed-OSS-36B-Instruct": dict(
        model_type="seed_oss",
        vocab_size=155136,
        max_position_embeddings=524288,
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=80,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        rope_theta=10000000.0,
        attention_bias=True,  # on q, k and v; not on the output projection
        attention_out_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    ),
    "baidu/ERNIE-4.5-0.3B-PT": dict(
        model_type="ernie4_5",
        vocab_size=103424,
        max_position_embeddings=131072,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=18,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=128,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        rope_theta=500000.0,
        use_bias=False,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    # gpt-oss
    "openai/gpt-oss-20b": _gpt_oss(24, 32),
    "openai/gpt-oss-120b": _gpt_oss(36, 128),
    # DeepSeek-V3, DeepSeek-R1 (the same network), Kimi K2
    "deepseek-ai/DeepSeek-V3": _DEEPSEEK_V3,
    "deepseek-ai/DeepSeek-R1": _DEEPSEEK_V3,
    "moonshotai/Kimi-K2-Instruct": _KIMI_K2,
    # GLM-4.5
    "zai-org/GLM-4.5": dict(
        _GLM_4_5,
        hidden_size=5120,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        num_hidden_layers=92,
        n_routed_experts=160,
        routed_scaling_factor=2.5,
        first_k_dense_replace=3,
        use_qk_norm=True,
    ),
    "zai-org/GLM-4.5-Air": dict(
        _GLM_4_5,
        hidden_size=4096,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=46,
        n_routed_experts=128,
        routed_scaling_factor=1.0,
        first_k_dense_replace=1,
        use_qk_norm=False,
    ),
    # GPT-2
    "openai-community/gpt2": dict(_GPT2, n_embd=768, n_layer=12, n_head=12),
    "openai-community/gpt2-medium": dict(_GPT2, n_embd=1024, n_layer=24, n_head=16),
    "openai-community/gpt2-large": dict(_GPT2, n_embd=1280, n_layer=36, n_head=20),
    "openai-community/gpt2-xl": dict(_GPT2, n_embd=1600, n_layer=48, n_head=25),
}


def _named(repo: str) -> Config:
    config = config_from_hf(HF_CONFIG_JSON[repo], name=repo.split("/")[1])
    return dataclasses.replace(config, hf_repo=repo)


NAMED_CONFIGS: dict[str, Config] = {repo.split("/")[1]: _named(repo) for repo in HF_CONFIG_JSON}


def config_for_name(name: str, **overrides: Any) -> Config:
    """The named config `name` (a key of NAMED_CONFIGS), with `overrides` replacing fields."""
    if name not in NAMED_CONFIGS:
        known = ", ".join(sorted(NAMED_CONFIGS))
        raise InvalidInput(f"Unknown model name {name!r}. Known names: {known}")
    # A deep copy: callers may change hf_extra or rope_scaling without touching the table.
    return dataclasses.replace(copy.deepcopy(NAMED_CONFIGS[name]), **overrides)
