"""Hugging Face tensor names <-> plainlm tensor names, per family.

`weight_rules(config)` lists, for the whole model, which Hugging Face tensor holds which of
our tensors. Most rules are one to one; where Hugging Face fuses tensors (Phi-3's qkv_proj,
GPT-NeoX's and Falcon's query_key_value, GPT-2's c_attn) a rule splits one tensor into
several and joins them back, so both directions are exact inverses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from plainlm.config import Config


def _identity_split(t: torch.Tensor) -> list[torch.Tensor]:
    return [t]


def _identity_join(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0]


@dataclass
class Rule:
    hf: str  # one Hugging Face tensor (the first of `parts` where there are several)
    ours: list[str]  # the plainlm tensors it holds, several when Hugging Face fuses them
    split: Callable = field(default=_identity_split)  # hf tensor (or the list of `parts`) -> ours
    join: Callable = field(default=_identity_join)  # ours -> hf tensor (or the list of `parts`)
    # Where one of ours is made of several Hugging Face tensors (MoE experts, which checkpoints keep one
    # tensor per expert and we stack into one 3-D weight): their names, in the order split takes them.
    parts: list[str] | None = None

    @property
    def hf_names(self) -> list[str]:
        return self.parts or [self.hf]


# The image side of a multimodal checkpoint (Llama 4), whose text model is what plainlm reads; its tensors
# carry a "language_model." prefix there (hf.py looks for it).
IGNORED_HF_PREFIXES = ("vision_model.", "multi_modal_projector.")
# Buffers some checkpoints carry that are recomputed, not learned.
IGNORED_HF_SUFFIXES = (
    ".rotary_emb.inv_freq",
    ".attn.bias",
    ".attn.masked_bias",
    ".attention.bias",
    ".attention.masked_bias",
)


def weight_rules(c: Config) -> list[Rule]:
    t = c.hf_model_type
    if t == "gpt2":
        return _gpt2_rules(c)
    if t == "gpt_neox":
        return _neox_rules(c)
    if t == "falcon":
        return _falcon_rules(c)
    if t == "phi":
        return _phi_rules(c)
    return _llama_like_rules(c)


def _one(hf: str, ours: str, bias: bool = False) -> list[Rule]:
    rules = [Rule(f"{hf}.weight", [f"{ours}.weight"])]
    if bias:
        rules.append(Rule(f"{hf}.bias", [f"{ours}.bias"]))
    return rules


def _norm(c: Config, hf: str, ours: str) -> list[Rule]:
    if not c.norm_affine:  # OLMo-1's norms have no parameters
        return []
    return _one(hf, ours, bias=c.norm_class == "layernorm" and c.norm_bias)


def _head(c: Config, hf_embed: str, hf_norm: str, hf_head: str) -> list[Rule]:
    rules = _one(hf_embed, "embed") + _norm(c, hf_norm, "final_norm")
    if not c.tie_embeddings:
        rules += _one(hf_head, "lm_head", bias=c.lm_head_bias)
    return rules


def _llama_like_rules(c: Config) -> list[Rule]:
    t = c.hf_model_type
    rules = _head(c, "model.embed_tokens", "model.norm", "lm_head")
    for i in range(c.n_layer):
        p, o = f"model.layers.{i}.", f"blocks.{i}."
        if c.pre_attention_norm:
            rules += _norm(c, p + "input_layernorm", o + "attn_norm")
        if t == "deepseek_v3":
            rules += _latent_attention_rules(c, p + "self_attn.", o + "attn.")
        elif t == "phi3":
            rules.append(
                _concat(p + "self_attn.qkv_proj.weight", [o + f"attn.{x}_proj.weight" for x in "qkv"], _qkv_sizes(c))
            )
        else:
            for x in "qkv":
                rules += _one(p + f"self_attn.{x}_proj", o + f"attn.{x}_proj", bias=c.qkv_bias)
        rules += _one(p + "self_attn.o_proj", o + "attn.o_proj", bias=c.attn_out_bias)
        if c.attention_sinks:  # gpt-oss
            rules.append(Rule(p + "self_attn.sinks", [o + "attn.sinks"]))
        if c.qk_norm in ("head", "full"):  # Llama 4's "l2" has no weight
            rules += _norm(c, p + "self_attn.q_norm", o + "attn.q_norm") + _norm(
                c, p + "self_attn.k_norm", o + "attn.k_norm"
            )
        if t in ("gemma2", "gemma3_text"):  # sandwich norms: HF's post_attention_layernorm is on the output
            rules += _norm(c, p + "post_attention_layernorm", o + "post_attn_norm")
            rules += _norm(c, p + "pre_feedforward_layernorm", o + "mlp_norm")
            rules += _norm(c, p + "post_feedforward_layernorm", o + "post_mlp_norm")
        elif t in ("olmo2", "olmo3", "exaone4"):  # norms after attention and MLP only
            rules += _norm(c, p + "post_attention_layernorm", o + "post_attn_norm")
            rules += _norm(c, p + "post_feedforward_layernorm", o + "post_mlp_norm")
        elif not c.shared_attention_norm:
            rules += _norm(c, p + "post_attention_layernorm", o + "mlp_norm")
        rules += _mlp_rules(c, p, o, i)
    return rules


def _latent_attention_rules(c: Config, p: str, o: str) -> list[Rule]:
    """DeepSeek-V3's multi-head latent attention (o_proj is the common rule)."""
    if c.q_lora_rank is None:
        rules = _one(p + "q_proj", o + "q_proj")
    else:
        rules = _one(p + "q_a_proj", o + "q_a_proj", bias=c.qkv_bias) + _norm(c, p + "q_a_layernorm", o + "q_a_norm")
        rules += _one(p + "q_b_proj", o + "q_b_proj")
    rules += _one(p + "kv_a_proj_with_mqa", o + "kv_a_proj", bias=c.qkv_bias)
    return rules + _norm(c, p + "kv_a_layernorm", o + "kv_a_norm") + _one(p + "kv_b_proj", o + "kv_b_proj")


def _mlp_rules(c: Config, p: str, o: str, layer: int) -> list[Rule]:
    t, moe = c.hf_model_type, c.is_moe(layer)
    if t == "llama4_text":
        return _llama4_mlp_rules(c, p + "feed_forward.", o + "mlp.", layer)
    if t in ("deepseek_v3", "glm4_moe") and c.is_moe(layer):  # sigmoid router with its bias, shared experts
        rules = _one(p + "mlp.gate", o + "mlp.router") + [
            Rule(p + "mlp.gate.e_score_correction_bias", [o + "mlp.router_bias"])
        ]
        rules += _experts(c, p + "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj"), o + "mlp.experts.")
        if c.moe_shared_intermediate_size:
            rules += [
                r
                for x in ("gate", "up", "down")
                for r in _one(p + f"mlp.shared_experts.{x}_proj", o + f"mlp.shared_expert.{x}_proj")
            ]
        return rules
    if moe and t in ("mixtral", "phimoe"):
        return _one(p + "block_sparse_moe.gate", o + "mlp.router") + _experts(
            c, p + "block_sparse_moe.experts.{e}.", ("w1", "w3", "w2"), o + "mlp.experts."
        )
    if moe and t in ("qwen3_moe", "qwen2_moe"):
        rules = _one(p + "mlp.gate", o + "mlp.router") + _experts(
            c, p + "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj"), o + "mlp.experts."
        )
        if c.moe_shared_intermediate_size:  # Qwen2-MoE's shared expert and its sigmoid gate
            for x in ("gate_proj", "up_proj", "down_proj"):
                rules += _one(p + "mlp.shared_expert." + x, o + "mlp.shared_expert." + x)
        if c.moe_shared_gate:
            rules += _one(p + "mlp.shared_expert_gate", o + "mlp.shared_expert_gate")
        return rules
    if moe and t == "gpt_oss":
        return _one(p + "mlp.router", o + "mlp.router", bias=True) + _interleaved_experts(
            p + "mlp.experts.", o + "mlp.experts."
        )
    if t == "phi3":
        size = c.intermediate_size
        return [
            _concat(p + "mlp.gate_up_proj.weight", [o + "mlp.gate_proj.weight", o + "mlp.up_proj.weight"], [size, size])
        ] + _one(p + "mlp.down_proj", o + "mlp.down_proj")
    return [r for x in ("gate", "up", "down") for r in _one(p + f"mlp.{x}_proj", o + f"mlp.{x}_proj", bias=c.mlp_bias)]


def _llama4_mlp_rules(c: Config, hf: str, ours: str, layer: int) -> list[Rule]:
    def gated(hf_prefix: str, ours_prefix: str) -> list[Rule]:
        return [r for x in ("gate", "up", "down") for r in _one(f"{hf_prefix}{x}_proj", f"{ours_prefix}{x}_proj")]

    if not c.is_moe(layer):
        return gated(hf, ours)
    # Llama 4 keeps its experts as (E, in, out), gate_up_proj (E, C, 2I) with the gate columns first: ours transposed
    experts = [_transposed(f"{hf}experts.{x}", f"{ours}experts.{x}") for x in ("gate_up_proj", "down_proj")]
    return _one(hf + "router", ours + "router") + experts + gated(hf + "shared_expert.", ours + "shared_expert.")


def _phi_rules(c: Config) -> list[Rule]:
    rules = _head(c, "model.embed_tokens", "model.final_layernorm", "lm_head")
    for i in range(c.n_layer):
        p, o = f"model.layers.{i}.", f"blocks.{i}."
        rules += _norm(c, p + "input_layernorm", o + "attn_norm")
        for x in "qkv":
            rules += _one(p + f"self_attn.{x}_proj", o + f"attn.{x}_proj", bias=True)
        rules += _one(p + "self_attn.dense", o + "attn.o_proj", bias=True)
        rules += _one(p + "mlp.fc1", o + "mlp.up_proj", bias=True) + _one(p + "mlp.fc2", o + "mlp.down_proj", bias=True)
    return rules


def _neox_rules(c: Config) -> list[Rule]:
    rules = _head(c, "gpt_neox.embed_in", "gpt_neox.final_layer_norm", "embed_out")
    for i in range(c.n_layer):
        p, o = f"gpt_neox.layers.{i}.", f"blocks.{i}."
        rules += _norm(c, p + "input_layernorm", o + "attn_norm") + _norm(
            c, p + "post_attention_layernorm", o + "mlp_norm"
        )
        rules += _grouped_qkv(c, p + "attention.query_key_value", o + "attn.", c.qkv_bias)
        rules += _one(p + "attention.dense", o + "attn.o_proj", bias=c.attn_out_bias)
        rules += _one(p + "mlp.dense_h_to_4h", o + "mlp.up_proj", bias=True)
        rules += _one(p + "mlp.dense_4h_to_h", o + "mlp.down_proj", bias=True)
    return rules


def _falcon_rules(c: Config) -> list[Rule]:
    rules = _head(c, "transformer.word_embeddings", "transformer.ln_f", "lm_head")
    for i in range(c.n_layer):
        p, o = f"transformer.h.{i}.", f"blocks.{i}."
        if c.parallel_residual and not c.shared_attention_norm:  # Falcon-40B/180B: two norms side by side
            rules += _norm(c, p + "ln_attn", o + "attn_norm") + _norm(c, p + "ln_mlp", o + "mlp_norm")
        else:
            rules += _norm(c, p + "input_layernorm", o + "attn_norm")
            if not c.parallel_residual:
                rules += _norm(c, p + "post_attention_layernorm", o + "mlp_norm")
        rules += _grouped_qkv(c, p + "self_attention.query_key_value", o + "attn.", c.qkv_bias)
        rules += _one(p + "self_attention.dense", o + "attn.o_proj", bias=c.attn_out_bias)
        rules += _one(p + "mlp.dense_h_to_4h", o + "mlp.up_proj", bias=c.mlp_bias)
        rules += _one(p + "mlp.dense_4h_to_h", o + "mlp.down_proj", bias=c.mlp_bias)
    return rules


def _gpt2_rules(c: Config) -> list[Rule]:
    rules = (
        _one("transformer.wte", "embed")
        + _one("transformer.wpe", "pos_embed")
        + _norm(c, "transformer.ln_f", "final_norm")
    )
    if not c.tie_embeddings:
        rules += _one("lm_head", "lm_head")
    for i in range(c.n_layer):
        p, o = f"transformer.h.{i}.", f"blocks.{i}."
        rules += _norm(c, p + "ln_1", o + "attn_norm") + _norm(c, p + "ln_2", o + "mlp_norm")
        sizes = _qkv_sizes(c)
        # GPT-2's Conv1D stores weights as (in, out): transpose on the way in and out.
        rules.append(
            _concat(p + "attn.c_attn.weight", [o + f"attn.{x}_proj.weight" for x in "qkv"], sizes, transpose=True)
        )
        rules.append(_concat(p + "attn.c_attn.bias", [o + f"attn.{x}_proj.bias" for x in "qkv"], sizes))
        for hf, ours in (("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"), ("mlp.c_proj", "mlp.down_proj")):
            rules.append(
                Rule(
                    p + hf + ".weight",
                    [o + ours + ".weight"],
                    lambda t: [t.t().contiguous()],
                    lambda ts: ts[0].t().contiguous(),
                )
            )
            rules += [Rule(p + hf + ".bias", [o + ours + ".bias"])]
    return rules


def peft_experts(c: Config, layer: int) -> tuple[str, bool] | None:
    """Where transformers holds layer `layer`'s stacked experts in memory (the module peft's expert adapters
    name), and whether its gate_up_proj's outputs alternate gate and up (gpt-oss's, stored (E, C, 2I)) rather
    than come gate rows first (ours, (E, 2I, C)); None for any other layout. Checkpoints kept one tensor per
    expert are stacked at load into model.layers.{layer}.mlp.experts."""
    rule = next(r for r in weight_rules(c) if r.ours == [f"blocks.{layer}.mlp.experts.gate_up_proj"])
    if rule.parts is not None:
        return f"model.layers.{layer}.mlp.experts", False
    if rule.split is _identity_split or c.hf_model_type == "gpt_oss":
        return rule.hf.removesuffix(".gate_up_proj"), c.hf_model_type == "gpt_oss"
    return None


# --- fused tensors ---
def _experts(c: Config, hf: str, names: tuple[str, str, str], ours: str) -> list[Rule]:
    """Experts kept one Linear per expert (`hf` formats with {e}; names: gate, up, down) <-> our stacked
    gate_up_proj (E, 2I, C) and down_proj (E, C, I)."""
    E = c.n_expert
    gate, up, down = ([f"{hf.format(e=e)}{name}.weight" for e in range(E)] for name in names)

    def split_gate_up(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat((torch.stack(ts[:E]), torch.stack(ts[E:])), dim=1)]

    def join_gate_up(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        gate_rows, up_rows = ts[0].chunk(2, dim=1)
        return [w.clone() for w in (*gate_rows.unbind(), *up_rows.unbind())]

    return [
        Rule(gate[0], [ours + "gate_up_proj"], split_gate_up, join_gate_up, parts=gate + up),
        Rule(
            down[0],
            [ours + "down_proj"],
            lambda ts: [torch.stack(ts)],
            lambda ts: [w.clone() for w in ts[0].unbind()],
            parts=down,
        ),
    ]


def _interleaved_experts(hf: str, ours: str) -> list[Rule]:
    """gpt-oss's experts: gate_up_proj (E, C, 2I) with gate and up interleaved along the last dimension (gate at
    even columns), its bias (E, 2I) alike, down_proj (E, I, C) and its bias (E, C) <-> our gate_up_proj (E, 2I, C)
    gate rows first, down_proj (E, C, I) and the biases as they are."""

    def halves(t: torch.Tensor) -> torch.Tensor:  # (..., 2I) alternating -> gate half, then up half
        return torch.cat((t[..., 0::2], t[..., 1::2]), dim=-1)

    def alternating(t: torch.Tensor) -> torch.Tensor:  # halves' inverse
        gate, up = t.chunk(2, dim=-1)
        return torch.stack((gate, up), dim=-1).flatten(-2)

    return [
        Rule(
            hf + "gate_up_proj",
            [ours + "gate_up_proj"],
            lambda t: [halves(t).transpose(1, 2).contiguous()],
            lambda ts: alternating(ts[0].transpose(1, 2)).contiguous(),
        ),
        Rule(
            hf + "gate_up_proj_bias",
            [ours + "gate_up_proj_bias"],
            lambda t: [halves(t).contiguous()],
            lambda ts: alternating(ts[0]).contiguous(),
        ),
        Rule(
            hf + "down_proj",
            [ours + "down_proj"],
            lambda t: [t.transpose(1, 2).contiguous()],
            lambda ts: ts[0].transpose(1, 2).contiguous(),
        ),
        Rule(hf + "down_proj_bias", [ours + "down_proj_bias"]),
    ]


def _transposed(hf: str, ours: str) -> Rule:
    """A stack of matrices (E, a, b) that we hold as (E, b, a)."""
    return Rule(hf, [ours], lambda t: [t.transpose(1, 2).contiguous()], lambda ts: ts[0].transpose(1, 2).contiguous())


def _qkv_sizes(c: Config) -> list[int]:
    return [c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim]


def _concat(hf: str, ours: list[str], sizes: list[int], transpose: bool = False) -> Rule:
    """One HF tensor that is our tensors stacked along the output dimension."""
    if transpose:
        return Rule(
            hf,
            ours,
            lambda t: [x.t().contiguous() for x in t.split(sizes, dim=1)],
            lambda ts: torch.cat(ts, dim=0).t().contiguous(),
        )
    return Rule(hf, ours, lambda t: [x.contiguous() for x in t.split(sizes, dim=0)], lambda ts: torch.cat(ts, dim=0))


def _grouped_qkv(c: Config, hf: str, ours: str, bias: bool) -> list[Rule]:
    """GPT-NeoX / Falcon fuse q, k and v per key/value group: (K, H/K + 2, D, ...) with each
    group's query heads first, then its key and its value head. This one layout covers
    NeoX (K = H), Falcon-7B (multi-query, K = 1) and Falcon-40B (grouped)."""
    H, K, D = c.n_head, c.n_kv_head, c.head_dim
    per_group = H // K

    def split(t: torch.Tensor) -> list[torch.Tensor]:
        g = t.reshape(K, per_group + 2, D, *t.shape[1:])
        q = g[:, :per_group].reshape(H * D, *t.shape[1:])
        k = g[:, per_group].reshape(K * D, *t.shape[1:])
        v = g[:, per_group + 1].reshape(K * D, *t.shape[1:])
        return [q.contiguous(), k.contiguous(), v.contiguous()]

    def join(ts: list[torch.Tensor]) -> torch.Tensor:
        q, k, v = ts
        rest = q.shape[1:]
        g = torch.cat((q.reshape(K, per_group, D, *rest), k.reshape(K, 1, D, *rest), v.reshape(K, 1, D, *rest)), dim=1)
        return g.reshape(K * (per_group + 2) * D, *rest)

    names = [f"{ours}{x}_proj" for x in "qkv"]
    rules = [Rule(f"{hf}.weight", [n + ".weight" for n in names], split, join)]
    if bias:
        rules.append(Rule(f"{hf}.bias", [n + ".bias" for n in names], split, join))
    return rules
