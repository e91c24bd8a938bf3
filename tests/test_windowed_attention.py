"""Sliding-window attention a block at a time (plainlm/windowed_attention.py) against SDPA under the whole (T, T)
window mask, forward and backward, and the model taking it where it may. The families' sliding layers are held to
transformers by tests/test_hf_families.py, whose 13-token inputs are longer than two of their 5-token windows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_gpt

import plainlm.model
from plainlm.config import Config
from plainlm.windowed_attention import windowed_attention


@pytest.mark.parametrize(("T", "window", "heads", "kv_heads"), [(37, 5, 4, 2), (40, 8, 2, 2), (11, 4, 4, 1)])
def test_blocks_of_queries_give_sdpas_answer_under_the_full_window_mask(T: int, window: int, heads: int, kv_heads: int):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, T, 16, generator=generator, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, T, 16, generator=generator, requires_grad=True) for _ in range(2))
    position = torch.arange(T)
    mask = (position[None, :] <= position[:, None]) & (position[:, None] - position[None, :] < window)
    gqa = heads != kv_heads
    expected = F.scaled_dot_product_attention(q, k, v, mask, scale=0.3, enable_gqa=gqa)
    ours = windowed_attention(q, k, v, window, 0.3, gqa)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)  # float32
    cotangent = torch.randn(expected.shape, generator=generator)
    expected_grads = torch.autograd.grad(expected, (q, k, v), cotangent)
    for got, want in zip(torch.autograd.grad(ours, (q, k, v), cotangent), expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_the_model_takes_it_on_sliding_layers_of_a_long_sequence_only(monkeypatch: pytest.MonkeyPatch) -> None:
    config = Config(
        vocab_size=97,
        block_size=64,
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_kv_head=2,
        intermediate_size=64,
        sliding_window=4,
        sliding_window_pattern=2,
    )  # layer 0 slides, layer 1 attends globally
    model = tiny_gpt(config, std=0.2).eval()
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(1))
    calls = []

    def counted(*args: object) -> torch.Tensor:
        calls.append(args[3])
        return windowed_attention(*args)

    monkeypatch.setattr(plainlm.model, "windowed_attention", counted)
    with torch.no_grad():
        logits = model(ids)
        assert calls == [4]  # the sliding layer, once
        model(ids[:, :8])  # two windows long: the mask is as cheap
        assert calls == [4]
        model.blocks[0].attn.window = None  # the same layer under SDPA's whole mask
        torch.testing.assert_close(model(ids), logits, atol=1e-5, rtol=1e-5)
