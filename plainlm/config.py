"""The `Config` dataclass: every architectural switch of every model family, in one place.

`model.py` reads these fields and nothing else, so a family is a set of values here,
never a subclass. This file imports nothing else of plainlm but its errors: the named configs
(real sizes, real Hugging Face repo ids; `config_for_name`) live in `named_configs.py`, and the
translation from any `config.json` of a supported architecture (`config_from_hf`) in
`convert/hf_config.py`; both build on `Config`, never the other way round.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from plainlm.errors import InvalidInput


@dataclass
class Config:
    name: str = "custom"
    hf_repo: str | None = None  # where the weights live on the Hugging Face hub
    # The Hugging Face `model_type` this config converts to and from (weight names, config.json).
    hf_model_type: str = "llama"

    # --- sizes ---
    vocab_size: int = 32000
    block_size: int = 4096  # maximum context length (max_position_embeddings)
    n_layer: int = 2
    n_embd: int = 256
    n_head: int = 4
    n_kv_head: int | None = None  # None = n_head (MHA); 1 = MQA; in between = GQA
    head_dim: int | None = None  # None = n_embd // n_head (Gemma and Qwen3 set it apart)
    intermediate_size: int = 1024

    # --- embeddings and head ---
    position_embedding: Literal["rope", "learned"] = "rope"  # "learned": GPT-2's absolute positions
    scale_embeddings: bool = False  # Gemma multiplies embeddings by sqrt(n_embd)
    tie_embeddings: bool = False
    lm_head_bias: bool = False  # Phi-1.5 / Phi-2
    final_logit_softcap: float | None = None  # Gemma 2
    logit_scale: float | None = None  # Cohere multiplies the logits by it (Command R7B / Command A: 0.25)
    # Granite: embeddings are multiplied by embedding_multiplier, each attention / MLP output by
    # residual_multiplier before it joins the residual stream, and the logits divided by logits_scaling
    # (its attention_multiplier is attention_scale)
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0

    # --- normalisation ---
    norm_class: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # Gemma's RMSNorm scales by (1 + weight)
    norm_affine: bool = True  # OLMo-1 uses LayerNorm without weight or bias
    norm_bias: bool = True  # only for layernorm: whether it has a bias
    pre_attention_norm: bool = True  # OLMo-2 normalises only after attention and MLP
    post_attention_norm: bool = False  # Gemma 2/3, OLMo-2: norm on the attention output
    pre_mlp_norm: bool = True
    post_mlp_norm: bool = False  # Gemma 2/3, OLMo-2: norm on the MLP output
    parallel_residual: bool = False  # GPT-NeoX, Phi-1.5/2, Falcon: x + attn(n1(x)) + mlp(n2(x))
    shared_attention_norm: bool = False  # Phi-1.5/2, Falcon-7B: attention and MLP read one norm

    # --- attention ---
    qkv_bias: bool = False  # Qwen2, GPT-2, NeoX, Phi, StableLM
    attn_out_bias: bool = False
    # "head": Qwen3/Gemma 3; "full": OLMo-2; "l2": Llama 4, q and k over their RMS (no weight) on RoPE layers
    qk_norm: Literal["none", "head", "full", "l2"] = "none"
    attention_scale: float | None = None  # None = head_dim ** -0.5; Gemma 2/3 use query_pre_attn_scalar
    attention_logit_softcap: float | None = None  # Gemma 2
    clip_qkv: float | None = None  # OLMo-1 clamps q, k and v to [-clip, clip]
    attention_sinks: bool = False  # gpt-oss: a learned logit per head joins each query's softmax denominator
    sliding_window: int | None = None
    # None: every layer slides (Mistral). k: every k-th layer attends globally (Gemma 2: 2, Gemma 3: 6).
    sliding_window_pattern: int | None = None
    # Llama 4: the RoPE layers attend in chunks of this many positions, a query only to keys of its own chunk
    attention_chunk_size: int | None = None
    # Llama 4's attention temperature: NoPE layers scale q by log1p(floor((position + 1) / floor_scale)) * scale + 1
    attn_temperature_floor_scale: int | None = None  # None: no temperature tuning
    attn_temperature_scale: float = 0.1
    # Multi-head latent attention (DeepSeek-V3, Kimi K2), on when kv_lora_rank is set: keys and values come from
    # a per-token latent of kv_lora_rank values, which with one rotated key of qk_rope_head_dim is all the KV cache
    # holds. head_dim is then a query/key head (qk_nope_head_dim + qk_rope_head_dim); v_head_dim a value head.
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None  # None: a plain q_proj; else queries pass a low-rank bottleneck too
    qk_rope_head_dim: int = 0
    v_head_dim: int | None = None  # None = head_dim

    # --- rotary position embedding ---
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0  # partial rotary: GPT-NeoX 0.25, Phi-2 0.4, StableLM 0.25
    # {"rope_type": "linear" | "llama3" | "yarn", "factor": ..., ...} as in Hugging Face's rope_scaling
    rope_scaling: dict[str, Any] | None = None
    rope_local_theta: float | None = None  # Gemma 3: sliding layers use their own base, unscaled
    # Pairs (2i, 2i+1) rotate together instead of (i, i + d/2): Cohere, ERNIE 4.5
    rope_interleaved: bool = False
    # Layers without any position encoding (NoPE): SmolLM3, Cohere 2 and EXAONE 4's global layers, Llama 4
    nope_layers: list[int] = field(default_factory=list)

    # --- MLP ---
    mlp_class: Literal["gated", "plain"] = "gated"  # gated: act(gate(x)) * up(x); plain: act(up(x))
    # "clamped_swiglu" (gpt-oss's experts): gate clamped above and up both sides at swiglu_limit, then
    # gate * sigmoid(swiglu_alpha * gate) * (up + 1)
    mlp_activation: Literal["silu", "gelu", "gelu_tanh", "relu", "clamped_swiglu"] = "silu"
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    mlp_bias: bool = False
    # Mixture of experts: n_expert > 0 replaces every MLP with n_expert gated experts.
    n_expert: int = 0
    n_expert_per_token: int = 0
    moe_intermediate_size: int | None = None  # None = intermediate_size
    moe_normalize_topk: bool = True  # Mixtral renormalises the top-k router weights; Qwen3-MoE may not
    # How router logits become each token's experts and weights (MoE.route): "softmax" = softmax, then top-k;
    # "sparsemixer" (PhiMoE) = the best expert, then the best of the rest, each weighted by a softmax over near ties;
    # "topk_softmax" (gpt-oss) = top-k of the logits, then softmax over the k chosen;
    # "sigmoid_input" (Llama 4): sigmoid of the top-k logits, which scales the expert's input, not its output;
    # "noaux_tc" (DeepSeek-V3, GLM-4.5) = sigmoid scores, top-k among the best moe_topk_group of moe_n_group groups
    # as chosen with a learned per-expert bias, weights scaled by moe_routed_scale
    moe_router: Literal["softmax", "sparsemixer", "topk_softmax", "sigmoid_input", "noaux_tc"] = "softmax"
    moe_jitter_eps: float = 0.01  # "sparsemixer" (router_jitter_noise): logits within 2 * eps (relative) count as ties
    moe_router_bias: bool = False  # gpt-oss: the router Linear has a bias
    moe_expert_bias: bool = False  # gpt-oss: every expert's gate/up and down projections have biases
    moe_n_group: int = 1
    moe_topk_group: int = 1
    moe_routed_scale: float = 1.0
    # Qwen2-MoE, DeepSeek-V3, GLM-4.5, Llama 4: a shared expert, a gated MLP of this size every token goes through
    moe_shared_intermediate_size: int = 0
    moe_shared_gate: bool = False  # Qwen2-MoE: the shared expert's output scaled by sigmoid(Linear(x))
    # Layers with a dense MLP of intermediate_size instead of experts (DeepSeek-V3's first_k_dense_replace,
    # Qwen2-MoE's mlp_only_layers, Llama 4's interleave_moe_layer_step)
    moe_dense_layers: list[int] = field(default_factory=list)

    # Everything Hugging Face's config.json says that we carry through conversion unchanged
    # (token ids, dtype, ...), so that to-hf writes back what from-hf read.
    hf_extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise InvalidInput(
                f"Config {self.name!r}: n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}"
            )
        if self.sliding_window is not None and self.attention_chunk_size is not None:
            raise InvalidInput(f"Config {self.name!r}: sliding_window and attention_chunk_size cannot be combined")
        if self.n_expert and not 0 < self.n_expert_per_token <= self.n_expert:
            raise InvalidInput(f"Config {self.name!r}: n_expert_per_token must be in 1..{self.n_expert}")
        self._check_multipliers()

    def _check_multipliers(self) -> None:
        """Granite's multipliers: positive, and never stacked on another family's version of the same switch,
        where the order of the two would be a guess."""
        for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise InvalidInput(f"Config {self.name!r}: {name} must be a positive number, not {value!r}")
        for name, other, clash in (
            ("embedding_multiplier", "scale_embeddings", self.scale_embeddings),
            ("residual_multiplier", "parallel_residual", self.parallel_residual),
            ("logits_scaling", "final_logit_softcap", self.final_logit_softcap is not None),
        ):
            if getattr(self, name) != 1.0 and clash:
                raise InvalidInput(f"Config {self.name!r}: {name} != 1 together with {other} is not supported")
        if (
            self.n_expert
            and self.moe_router == "noaux_tc"
            and (self.n_expert % self.moe_n_group or not 0 < self.moe_topk_group <= self.moe_n_group)
        ):
            raise InvalidInput(
                f"Config {self.name!r}: moe_n_group={self.moe_n_group} must divide n_expert={self.n_expert} "
                f"and moe_topk_group={self.moe_topk_group} be in 1..{self.moe_n_group}"
            )

    # --- derived values ---
    def is_moe(self, layer: int) -> bool:
        return self.n_expert > 0 and layer not in self.moe_dense_layers

    @property
    def rope_dim(self) -> int:
        """How many dimensions of each head rotate (the rest pass through unchanged)."""
        if self.kv_lora_rank is not None:  # multi-head latent attention rotates a part of its own
            return self.qk_rope_head_dim
        return int(self.head_dim * self.rotary_fraction)

    @property
    def kv_cache_width(self) -> int:
        """Values the KV cache holds per token and layer: keys and values, or multi-head latent attention's
        latent and rotated key."""
        if self.kv_lora_rank is not None:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.n_kv_head * self.head_dim

    def uses_rope(self, layer: int) -> bool:
        return self.position_embedding == "rope" and layer not in self.nope_layers

    def is_sliding(self, layer: int) -> bool:
        """Whether the layer attends locally: in a sliding window, or in Llama 4's chunks (its RoPE layers)."""
        if self.attention_chunk_size is not None:
            return self.uses_rope(layer)
        if self.sliding_window is None:
            return False
        if self.sliding_window_pattern is None:
            return True
        return (layer + 1) % self.sliding_window_pattern != 0

    # --- construction ---
    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict):
            raise InvalidInput(f"{path}: expected a mapping of config fields, found {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInput(f"{path}: unknown config fields {unknown}; valid fields are {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
