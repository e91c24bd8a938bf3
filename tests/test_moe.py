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
        gate, up = F.linear(x[token], experts.gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(activate(gate, experts.activation) * up, experts.down_proj[e])
        out.index_add_(0, token, y * weights[token, slot, None])
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


@pytest.mark.slow
@pytest.mark.parametrize(
    "fields", [dict(n_expert=4, n_expert_per_token=2), DEEPSEEK_V3], ids=["mixtral", "deepseek-v3"]
)
def test_moe_model_compiles_as_one_graph(fields: dict) -> None:
    model = tiny_gpt(**fields, std=0.2).eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    # dynamic=True as in a full run, where earlier compiles of the same forward have made the length symbolic.
    compiled = torch.compile(model, fullgraph=True, dynamic=True)  # a graph break raises
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_moe_training_step_compiles_as_one_graph() -> None:
    model = tiny_gpt(n_expert=4, n_expert_per_token=2, std=0.2)
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
