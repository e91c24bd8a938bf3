"""kernels/rows_matmul.cpp, float32 x @ W^T for a few rows, and kernel_layers.KernelLinear and KernelExperts,
which call it:
the product's values against PyTorch's, each row's bits independent of the rows and threads beside it, and a
model with it swapped in decoding as before (eagerly and compiled) and training through PyTorch's path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, reference_greedy, tiny_gpt

from plainlm.generate import generate
from plainlm.kernel_layers import KernelExperts, KernelLinear, use_cpu_kernels
from plainlm.kernels import ROWS_MATMUL_MAX_ROWS, fp32_kernels_loaded

pytestmark = pytest.mark.skipif(not fp32_kernels_loaded(), reason="rows_matmul needs AVX2, FMA and a C++ compiler")


@pytest.mark.parametrize("shape", [(1000, 576), (1003, 577), (5, 7), (64, 8)])
def test_rows_matmul_equals_pytorchs_product_and_each_rows_bits_stand_alone(shape: tuple[int, int]) -> None:
    N, K = shape
    generator = torch.Generator().manual_seed(0)
    w, x = torch.randn(N, K, generator=generator), torch.randn(ROWS_MATMUL_MAX_ROWS, K, generator=generator)
    y = torch.ops.plainlm_fp32.rows_matmul(x, w)
    torch.testing.assert_close(y, F.linear(x, w), atol=1e-4, rtol=1e-5)  # float32 sums in another order
    for m in range(1, ROWS_MATMUL_MAX_ROWS + 1):  # a row computed with 0..15 others: the same bits
        assert torch.equal(torch.ops.plainlm_fp32.rows_matmul(x[:m].contiguous(), w), y[:m])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(torch.ops.plainlm_fp32.rows_matmul(x, w), y)
    finally:
        torch.set_num_threads(threads)


def test_a_model_with_kernel_linears_decodes_as_before_and_trains_through_pytorch() -> None:
    config = {**TINY, "n_embd": 64, "intermediate_size": 128}
    plain = tiny_gpt(std=0.3, **config).eval()
    model = use_cpu_kernels(tiny_gpt(std=0.3, **config).eval())
    assert type(model.lm_head) is KernelLinear and type(model.blocks[0].mlp.down_proj) is KernelLinear
    assert model.state_dict().keys() == plain.state_dict().keys()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([prompt])), plain(torch.tensor([prompt])), atol=1e-5, rtol=1e-5)
    assert generate(model, [prompt], max_new_tokens=20) == [reference_greedy(plain, prompt, 20)]
    # With a gradient (training), PyTorch's linear runs: the gradients are autograd's own.
    model.train(), plain.train()
    model(torch.tensor([prompt])).sum().backward()
    plain(torch.tensor([prompt])).sum().backward()
    torch.testing.assert_close(model.lm_head.weight.grad, plain.lm_head.weight.grad)


@pytest.mark.slow  # compiles a decode step
def test_compiled_decoding_calls_the_kernel_inside_the_graph() -> None:
    config = {**TINY, "n_embd": 64, "intermediate_size": 128}
    model = use_cpu_kernels(tiny_gpt(std=0.3, **config).eval())
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    expected = reference_greedy(model, prompt, 12)
    assert generate(model, [prompt], max_new_tokens=12, compile=True) == [expected]


def test_kernel_experts_multiply_each_chosen_experts_rows_as_grouped_mm_does() -> None:
    """A mixture of experts' decode steps run rows_matmul on each chosen expert (empty experts skipped):
    the logits as the plain model's, the same greedy tokens eagerly and compiled (the loop is one op there),
    and a gradient still takes PyTorch's grouped path."""
    config = {**TINY, "n_embd": 64, "n_expert": 8, "n_expert_per_token": 2, "moe_intermediate_size": 48}
    plain = tiny_gpt(std=0.3, **config).eval()
    model = use_cpu_kernels(tiny_gpt(std=0.3, **config).eval())
    assert type(model.blocks[0].mlp.experts) is KernelExperts
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        for ids in (torch.tensor([prompt]), torch.tensor([prompt[:1]])):  # 8 rows, and 1
            torch.testing.assert_close(model(ids), plain(ids), atol=1e-5, rtol=1e-5)
    expected = reference_greedy(plain, prompt, 12)
    assert generate(model, [prompt], max_new_tokens=12) == [expected]
    assert generate(model, [prompt], max_new_tokens=12, compile=True) == [expected]
    model.train(), plain.train()
    model(torch.tensor([prompt])).sum().backward()
    plain(torch.tensor([prompt])).sum().backward()
    grads = (m.blocks[0].mlp.experts.down_proj.grad for m in (model, plain))
    torch.testing.assert_close(*grads)
