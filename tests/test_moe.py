"""Mixture of experts (model.MoE, model.Experts, grouped_mm.py): the grouped path against the plain loop.

The reference is the loop plainlm ran before the grouped path: for each expert that got tokens, its MLP on
those tokens, weighted and added in. Tolerance: 1e-6 in float32, forward and backward, on the shapes of the
families that use experts; and one graph under torch.compile(fullgraph=True).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_gpt

from plainlm.config import Config
from plainlm.grouped_mm import expert_loop, grouped_mm
from plainlm.metrics import flops_per_token, unchosen_expert_params
from plainlm.model import MoE, activate

ATOL = RTOL = 1e-6

# name -> Config fields of a tiny model with that family's expert layout
SHAPES = {
    "mixtral": dict(n_expert=8, n_expert_per_token=2, intermediate_size=48),
    "qwen3-moe": dict(n_expert=16, n_expert_per_token=4, moe_intermediate_size=24, moe_normalize_topk=False),
    "one-expert-per-token": dict(n_expert=4, n_expert_per_token=1, intermediate_size=40),
    "qwen2-moe-shared": dict(
        n_expert=8, n_expert_per_token=2, moe_intermediate_size=16, moe_shared_intermediate_size=40, moe_shared_gate=1
    ),
    "phimoe-sparsemixer": dict(n_expert=16, n_expert_per_token=2, intermediate_size=40, moe_router="sparsemixer"),
    # a small swiglu_limit, so that both clamps bite
    "gpt-oss": dict(
        n_expert=8,
        n_expert_per_token=4,
        intermediate_size=24,
        moe_router="topk_softmax",
        moe_router_bias=True,
        moe_expert_bias=True,
        mlp_activation="clamped_swiglu",
        swiglu_limit=0.5,
    ),
    # Llama 4: the router's sigmoid scales the expert's input; a shared expert of the experts' size
    "llama4": dict(
        n_expert=8,
        n_expert_per_token=2,
        moe_intermediate_size=24,
        moe_shared_intermediate_size=24,
        moe_router="sigmoid_input",
    ),
    "deepseek-v3": dict(  # sigmoid scores, top-k within the best 2 of 4 groups, shared experts
        n_expert=16,
        n_expert_per_token=4,
        moe_intermediate_size=12,
        moe_shared_intermediate_size=24,
        moe_router="noaux_tc",
        moe_n_group=4,
        moe_topk_group=2,
        moe_routed_scale=2.5,
    ),
}


def expert_activation(config: Config, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if config.mlp_activation == "clamped_swiglu":  # as transformers' GptOssExperts._apply_gate
        gate, up = gate.clamp(min=None, max=config.swiglu_limit), up.clamp(-config.swiglu_limit, config.swiglu_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * config.swiglu_alpha))
    return activate(gate, config.mlp_activation) * up


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The loop over experts, one expert's weights as nn.Linear weights at a time."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    weights, chosen = moe.route(x)
    weights = weights.to(x.dtype)
    experts = moe.experts
    out = torch.zeros_like(x)
    for e in chosen.unique().tolist():
        token, slot = (chosen == e).nonzero(as_tuple=True)
        weight = weights[token, slot, None]
        scale_input = moe.config.moe_router == "sigmoid_input"  # Llama 4
        biases = (
            (experts.gate_up_proj_bias[e], experts.down_proj_bias[e]) if moe.config.moe_expert_bias else (None,) * 2
        )
        rows = x[token] * weight if scale_input else x[token]
        gate, up = F.linear(rows, experts.gate_up_proj[e], biases[0]).chunk(2, dim=-1)
        y = F.linear(expert_activation(moe.config, gate, up), experts.down_proj[e], biases[1])
        out.index_add_(0, token, y if scale_input else y * weight)
    if moe.config.moe_shared_intermediate_size:
        shared = moe.shared_expert(x)
        if moe.config.moe_shared_gate:
            shared = torch.sigmoid(moe.shared_expert_gate(x)) * shared
        out = out + shared
    return out.view(shape)


def moe_layer(shape: str, seed: int = 0) -> MoE:
    config = Config(n_embd=32, n_head=4, **SHAPES[shape])
    torch.manual_seed(seed)
    moe = MoE(config)
    with torch.no_grad():
        for p in (*moe.parameters(), *moe.buffers()):  # DeepSeek-V3's routing bias is a buffer
            p.normal_(0, 0.2)
    return moe


@pytest.mark.parametrize("shape", list(SHAPES))
def test_grouped_experts_equal_the_loop_forward_and_backward(shape: str) -> None:
    moe = moe_layer(shape)
    x = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(2))
    results = []
    for forward in (moe, lambda t: reference_moe(moe, t)):
        moe.zero_grad()
        inputs = x.clone().requires_grad_()
        out = forward(inputs)
        out.backward(grad)
        results.append((out.detach(), inputs.grad, *(p.grad.clone() for p in moe.parameters())))
    for ours, reference in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference, atol=ATOL, rtol=RTOL)


def test_one_token_decodes_through_its_experts_only() -> None:
    moe = moe_layer("mixtral")
    x = torch.randn(1, 1, 32)
    torch.testing.assert_close(moe(x), reference_moe(moe, x), atol=ATOL, rtol=RTOL)


def test_an_expert_without_tokens_gets_a_zero_gradient() -> None:
    moe = moe_layer("mixtral")
    x = torch.randn(1, 1, 32)
    moe(x).sum().backward()
    _, chosen = moe.route(x.reshape(1, 32))
    idle = sorted(set(range(8)) - set(chosen.flatten().tolist()))
    assert torch.equal(moe.experts.down_proj.grad[idle], torch.zeros_like(moe.experts.down_proj.grad[idle]))
    assert moe.experts.down_proj.grad[chosen[0, 0]].abs().sum() > 0


def test_dense_layers_keep_a_plain_mlp() -> None:
    model = tiny_gpt(n_expert=4, n_expert_per_token=2, moe_dense_layers=[0])
    assert type(model.blocks[0].mlp).__name__ == "MLP" and isinstance(model.blocks[1].mlp, MoE)


# DeepSeek-V3 in small: multi-head latent attention and grouped sigmoid routing compile whole too
DEEPSEEK_V3 = dict(
    n_expert=8, n_expert_per_token=2, moe_router="noaux_tc", moe_n_group=4, moe_topk_group=2,
    moe_shared_intermediate_size=16, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, head_dim=24, v_head_dim=12,
)  # fmt: skip


# the models compiled whole: Mixtral's layout, gpt-oss's (sinks, sliding layers, biased experts), Llama 4's
# attention (chunks, NoPE layer with its temperature, L2 q/k norm) around its router, and DeepSeek-V3's
COMPILED = {
    "mixtral": dict(n_expert=4, n_expert_per_token=2),
    "phimoe": dict(n_expert=4, n_expert_per_token=2, moe_router="sparsemixer"),
    "gpt-oss": dict(
        SHAPES["gpt-oss"],
        n_expert=4,
        n_expert_per_token=2,
        attention_sinks=True,
        sliding_window=4,
        sliding_window_pattern=2,
    ),
    "llama4": dict(
        n_expert=4,
        n_expert_per_token=1,
        moe_router="sigmoid_input",
        moe_shared_intermediate_size=32,
        moe_dense_layers=[0],
        nope_layers=[1],
        attention_chunk_size=4,
        attn_temperature_floor_scale=3,
        qk_norm="l2",
        rope_interleaved=True,
    ),
    "deepseek-v3": DEEPSEEK_V3,
}


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(COMPILED))
def test_moe_model_compiles_as_one_graph(shape: str) -> None:
    model = tiny_gpt(**COMPILED[shape], std=0.2).eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    # dynamic=True as in a full run, where earlier compiles of the same forward have made the length symbolic.
    compiled = torch.compile(model, fullgraph=True, dynamic=True)  # a graph break raises
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(COMPILED))
def test_moe_training_step_compiles_as_one_graph(shape: str) -> None:
    model = tiny_gpt(**COMPILED[shape], std=0.2)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    explanation = torch._dynamo.explain(lambda i: model(i).logsumexp(-1).mean())(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_grouped_mm_loop_path_equals_the_kernel() -> None:
    """The op's loop (CUDA float32, GPUs without the kernel) against torch._grouped_mm, on the CPU."""
    x, weight = torch.randn(10, 6), torch.randn(3, 5, 6)
    ends = torch.tensor([4, 4, 10], dtype=torch.int32)
    expected = torch.cat([x[:4] @ weight[0].T, x[4:] @ weight[2].T])
    torch.testing.assert_close(grouped_mm(x, weight, ends), expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(expert_loop(x, weight, ends), expected, atol=ATOL, rtol=RTOL)


def test_flops_count_only_the_chosen_experts() -> None:
    """MFU's FLOPs per token: a token passes through k of the E experts, so the other experts' weights count
    nothing (gated experts: 3 matrices of C x I each)."""
    model = tiny_gpt(n_expert=8, n_expert_per_token=2, moe_dense_layers=[0])
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    moe_layers = c.n_layer - 1
    unchosen = moe_layers * (8 - 2) * 3 * c.n_embd * c.intermediate_size
    assert unchosen_expert_params(c) == unchosen
    dense = flops_per_token(tiny_gpt().config, n_params - unchosen, 16)
    assert flops_per_token(c, n_params, 16) == dense
