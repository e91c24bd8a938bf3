"""plainlm's own CPU kernels (plainlm/kernels/) against the math they implement and against PyTorch's
SDPA, and in use: eager and compiled decoding give the tokens that PyTorch's kernels give."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_gpt

from plainlm import gptq, quantize
from plainlm.config import Config
from plainlm.generate import generate
from plainlm.kernel_layers import KernelAttention, project_together, use_cpu_kernels
from plainlm.kernels import HEADERS, NAME, SOURCES, kernels_loaded, needs_build
from plainlm.model import GPT
from plainlm.quantize import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    quantize_model,
    tile_int8,
    tile_nibbles,
    tile_rows,
)

# slow: the first test builds the kernels (a C++ compile), and several compile decode steps
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not kernels_loaded(), reason="plainlm's kernels need AVX512-VNNI and a C++ compiler"),
]

# head_dim 16: the smallest the attention kernel takes.
TINY = dict(vocab_size=160, block_size=64, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128)


def rounded_inputs(x: torch.Tensor, group: int) -> torch.Tensor:
    """x as the kernels see it: rounded to int8 per group of inputs, d = amax / 127."""
    M, K = x.shape
    groups = x.float().reshape(M, K // group, group)
    amax = groups.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return ((groups * inverse).round() * (amax / 127)).reshape(M, K)


def int4_reference(x: torch.Tensor, nibbles: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """The kernel's math in PyTorch: activations rounded to int8 per group, then an exact product."""
    return rounded_inputs(x, group).double() @ dequantize_int4(nibbles, scales_and_zeros, group).double().T


def test_tiles_hold_the_rows_bytes_in_the_kernels_order() -> None:
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (32, 16), dtype=torch.int8)
    tiles = tile_int8(q)
    assert tiles.shape == (2, 4, 64)
    assert tiles[1, 2, 4 * 5 + 3] == q[16 + 5, 4 * 2 + 3]  # byte 4r + i of tile (b, j): row 16b + r, input 4j + i
    nibbles, _ = quantize_int4(torch.randn(32, 16), 16)
    tiles = tile_nibbles(nibbles)
    assert tiles.shape == (2, 2, 64)
    values = torch.stack((nibbles & 15, nibbles >> 4), -1).flatten(-2)  # (32, 16) values 0..15
    byte = tiles[1, 1, 4 * 5 + 3]  # row 21, inputs 8 + 3 (low nibble) and 8 + 4 + 3 (high)
    assert byte & 15 == values[21, 11] and byte >> 4 == values[21, 15]
    rows = torch.tensor([[0, 31], [21, 7]])
    for matrix, tiled in ((q, tile_int8(q)), (nibbles, tiles)):
        assert torch.equal(tile_rows(tiled), matrix)
        assert torch.equal(tile_rows(tiled, rows), matrix[rows])


@pytest.mark.parametrize(
    ("M", "N", "K", "group"),
    [(1, 16, 64, 64), (3, 48, 256, 64), (2, 32, 256, 128), (5, 16, 512, 256), (2, 32, 96, 32), (1, 16, 48, 16)],
)
def test_int4_matmul_computes_its_math(M: int, N: int, K: int, group: int) -> None:
    torch.manual_seed(0)
    nibbles, scales_and_zeros = quantize_int4(torch.randn(N, K), group)
    x = torch.randn(M, K) * torch.linspace(0.1, 3, K)  # groups of different ranges
    tiles = tile_nibbles(nibbles)
    y = torch.ops.plainlm.int4_matmul(x, tiles, scales_and_zeros, group)
    expected = int4_reference(x, nibbles, scales_and_zeros, group)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    # Only the order of fp32 sums differs from the float64 reference.
    assert (y.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    # float32 pairs (a GPTQ or AWQ checkpoint's) of the same values: the same arithmetic, the same bits
    y32 = torch.ops.plainlm.int4_matmul(x, tiles, scales_and_zeros.float(), group)
    torch.testing.assert_close(y32, y, rtol=0, atol=0)
    y16 = torch.ops.plainlm.int4_matmul(x.bfloat16(), tiles, scales_and_zeros, group)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(
        y16.float(),
        int4_reference(x.bfloat16(), nibbles, scales_and_zeros, group).float(),
        rtol=1e-2,
        atol=1e-2 * expected.abs().max().item(),
    )


@pytest.mark.parametrize(("M", "N", "K"), [(1, 16, 64), (3, 48, 256), (2, 576, 1536)])
def test_int8_matmul_computes_its_math(M: int, N: int, K: int) -> None:
    torch.manual_seed(0)
    weight, scales = quantize_int8(torch.randn(N, K))
    x = torch.randn(M, K) * torch.linspace(0.1, 3, K)
    y = torch.ops.plainlm.int8_matmul(x, tile_int8(weight), scales)
    expected = rounded_inputs(x, 64).double() @ dequantize_int8(weight, scales).double().T
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert (y.double() - expected).abs().max() <= 1e-5 * expected.abs().max()  # integer sums: exact but fp32 scaling
    exact = x @ dequantize_int8(weight, scales).T
    assert (y - exact).norm() / exact.norm() < 0.01  # the int8 activations' cost
    y16 = torch.ops.plainlm.int8_matmul(x.bfloat16(), tile_int8(weight), scales)
    torch.testing.assert_close(y16.float(), y, rtol=2e-2, atol=2e-2 * y.abs().max().item())


def int8_groups(N: int, K: int, G: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An 8-bit GPTQ layer's weight as GroupedInt8Linear holds it: int8 rows q - 128 (N, K), float32 pairs."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, (N, K), generator=generator)
    z = torch.randint(0, 256, (K // G, N), generator=generator)
    scales = (torch.rand(K // G, N, generator=generator) * 0.01 + 0.001).half()
    return (q - 128).to(torch.int8), quantize.zero_point_pairs(scales, z, bits=8)


@pytest.mark.parametrize(
    ("M", "N", "K", "group"),
    [(1, 16, 64, 64), (17, 48, 256, 32), (1, 32, 256, 128), (17, 16, 192, 192), (3, 576, 1536, 128), (2, 16, 48, 16)],
)
def test_int8_group_matmul_computes_its_math(M: int, N: int, K: int, group: int) -> None:
    """int8 in groups with (scale, zero) pairs (8-bit GPTQ): the activations rounded per 64 inputs, or per
    group below 64 (the whole row too, 192 inputs: three of 64), then an exact product."""
    torch.manual_seed(0)
    weight, scales_and_zeros = int8_groups(N, K, group)
    x = torch.randn(M, K) * torch.linspace(0.1, 3, K)
    y = torch.ops.plainlm.int8_group_matmul(x, tile_int8(weight), scales_and_zeros, group)
    w = quantize.dequantize_groups(weight.float(), scales_and_zeros, group)
    expected = rounded_inputs(x, math.gcd(group, 64)).double() @ w.double().T
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert (y.double() - expected).abs().max() <= 1e-5 * expected.abs().max()  # integer sums: fp32 scaling only
    exact = x @ w.T
    # The int8 activations' cost, 0.5-0.6% (1.3% over the one group of 64 inputs of the first shape): these
    # zero points, any of 0..255, shift a row's weights by up to 128 steps, where rounding errors add up.
    assert (y - exact).norm() / exact.norm() < 0.02
    y16 = torch.ops.plainlm.int8_group_matmul(x.bfloat16(), tile_int8(weight), scales_and_zeros, group)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y, rtol=2e-2, atol=2e-2 * y.abs().max().item())


def test_int4_matmul_stays_within_one_percent_of_the_float_product() -> None:
    """The cost of int8 activations: with their sum taken from the rounded values too, the error is
    sum w_k e_k (about 0.6% of the output's size here), not sum (w_k - min) e_k (about 2%)."""
    torch.manual_seed(0)
    w, x = torch.randn(576, 1536), torch.randn(4, 1536)
    nibbles, scales_and_zeros = quantize_int4(w, 64)
    exact = x @ dequantize_int4(nibbles, scales_and_zeros, 64).T
    y = torch.ops.plainlm.int4_matmul(x, tile_nibbles(nibbles), scales_and_zeros, 64)
    assert (y - exact).norm() / exact.norm() < 0.01


def test_the_matmul_kernels_give_the_same_bits_on_any_thread_count() -> None:
    """Large matrices are split across threads by blocks of 16 rows, each computed whole by one thread."""
    torch.manual_seed(0)
    w, x = torch.randn(4096, 576), torch.randn(3, 576)  # 1.2 MB of int4: several threads' shares
    nibbles, scales_and_zeros = quantize_int4(w, 64)
    weight, scales = quantize_int8(w)
    grouped, pairs = int8_groups(4096, 576, 64)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outputs.append(
                (
                    torch.ops.plainlm.int4_matmul(x, tile_nibbles(nibbles), scales_and_zeros, 64),
                    torch.ops.plainlm.int8_matmul(x, tile_int8(weight), scales),
                    torch.ops.plainlm.int8_group_matmul(x, tile_int8(grouped), pairs, 64),
                )
            )
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*outputs, strict=True):
        assert torch.equal(one, two)


def test_the_matmul_kernels_refuse_what_they_cannot_run() -> None:
    nibbles, scales_and_zeros = quantize_int4(torch.randn(16, 64), 64)
    tiles = tile_nibbles(nibbles)
    with pytest.raises(RuntimeError, match="must be contiguous uint8 tiles"):
        torch.ops.plainlm.int4_matmul(torch.randn(1, 64), nibbles, scales_and_zeros, 64)
    with pytest.raises(RuntimeError, match="the tiles hold 64 inputs, x has 128"):
        torch.ops.plainlm.int4_matmul(torch.randn(1, 128), tiles, scales_and_zeros, 64)
    with pytest.raises(RuntimeError, match="groups of a multiple of 16"):
        torch.ops.plainlm.int4_matmul(torch.randn(1, 64), tiles, quantize_int4(torch.randn(16, 64), 8)[1], 8)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        torch.ops.plainlm.int4_matmul(torch.randn(1, 64).double(), tiles, scales_and_zeros, 64)
    weight, scales = quantize_int8(torch.randn(16, 64))
    with pytest.raises(RuntimeError, match="must be contiguous int8 tiles"):
        torch.ops.plainlm.int8_matmul(torch.randn(1, 64), weight, scales)
    grouped, pairs = int8_groups(16, 64, 32)
    with pytest.raises(RuntimeError, match="needs groups of a multiple of 16 inputs that divide the 64 inputs"):
        torch.ops.plainlm.int8_group_matmul(torch.randn(1, 64), tile_int8(grouped), int8_groups(16, 64, 8)[1], 8)
    with pytest.raises(RuntimeError, match="scales_and_zeros must be contiguous fp32"):
        torch.ops.plainlm.int8_group_matmul(torch.randn(1, 64), tile_int8(grouped), pairs.bfloat16(), 32)


@pytest.mark.parametrize("mode", ["int8", "int4", "int8_group"])
def test_layers_that_read_one_input_share_one_kernel_call(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """kernel_layers.project_together (q, k, v; gate, up): one call of int8_matmuls / int4_matmuls /
    int8_group_matmuls (8-bit GPTQ's layers), the same outputs, biases included, as one call per layer; with a
    gradient to pass back, one call each (through their backward)."""
    torch.manual_seed(0)
    linears = [torch.nn.Linear(64, n, bias=bias) for n, bias in ((48, True), (16, False), (32, True))]
    if mode == "int8_group":
        layers = [gptq.rtn(linear.weight, 32, sym=False, bits=8).linear(linear.bias) for linear in linears]
    else:
        layers = [quantize._quantize_linear(linear, mode, 32 if mode == "int4" else None) for linear in linears]
    x = torch.randn(2, 3, 64)
    shared = getattr(torch.ops.plainlm, f"{mode}_matmuls")
    calls = []
    monkeypatch.setattr(torch.ops.plainlm, f"{mode}_matmuls", lambda *args: calls.append(1) or shared(*args))
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad():
            together, alone = project_together(x.to(dtype), layers), [layer(x.to(dtype)) for layer in layers]
        for a, b in zip(together, alone, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert len(calls) == 2
    x.requires_grad_(True)
    sum(y.sum() for y in project_together(x, layers)).backward()
    assert len(calls) == 2 and x.grad is not None


@pytest.mark.parametrize(("B", "H", "KH", "D"), [(1, 4, 4, 16), (3, 6, 2, 64), (2, 9, 3, 64), (1, 8, 1, 32)])
def test_decode_attention_matches_sdpa(B: int, H: int, KH: int, D: int) -> None:
    torch.manual_seed(0)
    S = 40
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, KH, S, D), torch.randn(B, KH, S, D)
    # Each row: its own left padding, slots up to its current position, a hole (as a sliding window leaves).
    mask = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        mask[b, 2 * b : 30 - b] = True
        mask[b, 10 + b] = False
    for m, scale in ((mask, 0.3), (mask[:1], 0.3), (mask, 3.0)):  # per row, one for the batch; a peaked softmax
        # Against SDPA in float64: at scale 3, SDPA's own fp32 result is 6e-6 off it, the kernel's 5e-6.
        qkv = (q.double(), k.double(), v.double())
        expected = F.scaled_dot_product_attention(*qkv, attn_mask=m[:, None, None, :], scale=scale, enable_gqa=True)
        y = torch.ops.plainlm.decode_attention(q.reshape(B, H, D), k, v, m.contiguous(), scale)
        torch.testing.assert_close(y.view(B, H, 1, D).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("T", "H", "KH"), [(3, 4, 4), (3, 9, 3), (9, 9, 3), (150, 8, 2)])
@pytest.mark.parametrize("shared_mask", [True, False])
def test_decode_attention_of_several_new_tokens_matches_sdpa(T: int, H: int, KH: int, shared_mask: bool) -> None:
    """A speculative verification or a prompt over model.KVCache: T new tokens after a cached prefix, each query
    with its own causal mask row over the whole preallocated cache (one for the batch, or one a sequence with
    its own left padding and a sliding window), a pass a token for few queries a KV head and tiles for many."""
    torch.manual_seed(2)
    B, D, prefix, S = 2, 64, 30, 200
    q, k, v = torch.randn(B * T, H, D), torch.randn(B, KH, S, D), torch.randn(B, KH, S, D)
    slots = torch.arange(S)
    causal = slots <= prefix + torch.arange(T)[:, None]  # (T, S): token t sits at slot prefix + t
    if shared_mask:
        mask = causal
    else:
        mask = causal.expand(B, T, S).clone()
        mask[1, :, :5] = False  # sequence 1: left padding ...
        mask[1] &= slots > prefix + torch.arange(T)[:, None] - 12  # ... and a window of 12 keys
        mask = mask.reshape(B * T, S)
    y = torch.ops.plainlm.decode_attention(q, k, v, mask.contiguous(), 0.125)
    queries = q.view(B, T, H, D).transpose(1, 2).double()
    seen = mask.view(-1, 1, T, S)
    expected = F.scaled_dot_product_attention(
        queries, k.double(), v.double(), attn_mask=seen, scale=0.125, enable_gqa=True
    )
    torch.testing.assert_close(y.double(), expected.transpose(1, 2).reshape(B * T, H, D), rtol=1e-5, atol=1e-5)


def test_paged_attention_reads_the_pool_in_place_as_decode_attention_reads_a_cache() -> None:
    """The serving engine's pool: keys scattered over (R, D) rows, heads outermost; rows (B, KH, S) says where."""
    torch.manual_seed(0)
    B, H, KH, D, S, R = 3, 6, 2, 32, 40, 500
    q, k_pool, v_pool = torch.randn(B, H, D), torch.randn(R, D), torch.randn(R, D)
    rows = torch.randperm(R)[: B * KH * S].view(B, KH, S).contiguous()  # no two keys share a row
    mask = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        mask[b, : 40 - 7 * b] = True  # rows of different lengths, as a batch of requests has
    gathered_k, gathered_v = k_pool[rows], v_pool[rows]  # (B, KH, S, D): the layout decode_attention reads
    expected = torch.ops.plainlm.decode_attention(q, gathered_k, gathered_v, mask, 0.2)
    y = torch.ops.plainlm.paged_attention(q, k_pool, v_pool, rows, mask, 0.2)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)  # the same arithmetic on the same numbers


@pytest.mark.parametrize(
    ("T", "H", "KH"),
    [(2, 6, 3), (5, 6, 2), (23, 9, 3), (150, 4, 4), (33, 8, 1)],
    ids=["two_tokens_few_queries", "tile_of_ten", "burst_chunk", "two_tiles_mha", "three_tiles_mqa"],
)
def test_paged_attention_of_many_new_tokens_matches_sdpa(T: int, H: int, KH: int) -> None:
    """A prompt chunk: T new tokens a sequence, each query with its own mask row (causal after a cached prefix,
    a sliding window, padding rows that repeat the last), against SDPA in float64 on the gathered keys."""
    torch.manual_seed(1)
    B, D, R = 3, 64, 4000
    cached = [17, 0, 40]  # each sequence's keys before this chunk
    S = max(cached) + T
    q, k_pool, v_pool = torch.randn(B * T, H, D), torch.randn(R, D), torch.randn(R, D)
    rows = torch.randperm(R)[: B * KH * S].view(B, KH, S).contiguous()
    mask = torch.zeros(B, T, S, dtype=torch.bool)
    for b, before in enumerate(cached):
        for t in range(T):
            mask[b, t, : before + t + 1] = True
    mask[1, :, :] &= torch.arange(S) > torch.arange(T)[:, None] - 6  # sequence 1: a window of 6 keys
    mask[2, T // 2 :, :] = mask[2, T // 2]  # sequence 2: padding tokens past T // 2, as the engine pads a row
    mask[0, 0, :] = False  # a query that sees nothing gets zeros (SDPA would give NaN)
    mask = mask.reshape(B * T, S).contiguous()
    y = torch.ops.plainlm.paged_attention(q, k_pool, v_pool, rows, mask, 0.125)
    keys, values = k_pool[rows].double(), v_pool[rows].double()  # (B, KH, S, D)
    queries = q.view(B, T, H, D).transpose(1, 2).double()
    seen = mask.view(B, 1, T, S).clone()
    seen[0, 0, 0, 0] = True  # SDPA needs one key a row; the kernel's zeros row is checked on its own
    expected = F.scaled_dot_product_attention(queries, keys, values, attn_mask=seen, scale=0.125, enable_gqa=True)
    expected = expected.transpose(1, 2).reshape(B * T, H, D)
    assert torch.equal(y[0], torch.zeros(H, D))
    torch.testing.assert_close(y[1:].double(), expected[1:], rtol=1e-5, atol=1e-5)


def without_decode_kernel(model: GPT) -> None:
    for block in model.blocks:
        block.attn.decode_kernel = False


@pytest.mark.parametrize(
    "config",
    [Config(**TINY), Config(**TINY, sliding_window=6, sliding_window_pattern=2)],
    ids=["llama_gqa", "sliding_window"],
)
def test_decoding_with_the_attention_kernel_gives_sdpas_tokens(config: Config) -> None:
    model = use_cpu_kernels(tiny_gpt(config, std=0.3).eval())
    prompts = [[5, 17, 33, 2, 9], [40, 41], [7] * 9]  # left-padded batch: per-row masks
    assert isinstance(model.blocks[0].attn, KernelAttention) and model.blocks[0].attn.decode_kernel
    with torch.profiler.profile() as profile:
        ours = generate(model, prompts, max_new_tokens=20)
    assert {event.key for event in profile.key_averages()} >= {"plainlm::decode_attention"}
    without_decode_kernel(model)
    assert generate(model, prompts, max_new_tokens=20) == ours


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compiled_quantized_decoding_runs_plainlms_kernels(mode: str) -> None:
    """The kernels inside a torch.compile graph (through their registered shapes): the same tokens as eager."""
    model = quantize_model(tiny_gpt(Config(**TINY), std=0.3).eval(), mode)
    layers = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    assert len(layers) == 15 and all(m.kernel == "plainlm" for m in layers)
    prompts = [[5, 17, 33, 2, 9]]
    eager = generate(model, prompts, max_new_tokens=12)
    with torch.profiler.profile() as profile:
        assert generate(model, prompts, max_new_tokens=12, compile=True) == eager
    called = {event.key: event.count for event in profile.key_averages()}
    assert called.get(f"plainlm::{mode}_matmul", 0) > 0 and called.get("plainlm::decode_attention", 0) > 0, called


def test_reduce_overhead_decoding_calls_the_kernels_from_cpp() -> None:
    """compile="reduce-overhead" on the CPU: inductor's C++ wrapper calls plainlm's kernels through the
    dispatcher (the list-taking int4_matmuls too), and a padded batch decodes eager's tokens."""
    model = quantize_model(tiny_gpt(Config(**TINY), std=0.3).eval(), "int4")
    prompts = [[5, 17, 33, 2, 9], [40, 41]]
    eager = generate(model, prompts, max_new_tokens=12)
    with torch.profiler.profile() as profile:
        assert generate(model, prompts, max_new_tokens=12, compile="reduce-overhead") == eager
    called = {event.key: event.count for event in profile.key_averages()}
    assert called.get("plainlm::int4_matmuls", 0) > 0 and called.get("plainlm::decode_attention", 0) > 0, called
    with pytest.raises(ValueError, match="compile must be True, False or one of default, reduce-overhead"):
        generate(model, prompts, max_new_tokens=2, compile="max-autotune")


def test_the_kernels_are_built_when_missing_or_older_than_a_source(tmp_path: Path) -> None:
    """needs_build decides whether kernels_loaded announces a build ("compiling plainlm's CPU kernels")."""
    assert needs_build(tmp_path)  # nothing built yet
    library = tmp_path / f"{NAME}.so"
    library.touch()
    assert not needs_build(tmp_path)  # built after every source: loaded from the cache, silently
    newest = max(path.stat().st_mtime for path in SOURCES + HEADERS)
    os.utime(library, (newest - 1, newest - 1))
    assert needs_build(tmp_path)  # a source changed since: ninja rebuilds
