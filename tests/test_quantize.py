"""Weight-only quantization: each mode's layer against the math of what it stored, the model
against fp32, the integer kernels really in use, memory, exact save/load, generation, LLM and CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import run_cli, tiny_gpt
from safetensors.torch import load_file

from plainlm import quantize
from plainlm.api import LLM
from plainlm.checkpoint import QUANTIZATION_FILE, load_checkpoint, save_checkpoint
from plainlm.config import Config
from plainlm.errors import CheckpointError
from plainlm.generate import generate
from plainlm.kernels import kernels_loaded
from plainlm.model import GPT
from plainlm.named_configs import config_for_name
from plainlm.quantize import (
    Int4Embedding,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    quantize_model,
    weight_bytes,
)

bnb = pytest.importorskip("bitsandbytes")

MODES = ["int8", "int4", "nf4", "fp4"]
# vocab 250: not a multiple of 16, so the int4 head takes the padded path.
TINY = dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128, vocab_size=250, block_size=128)


def tiny_model(tie: bool = True, bias: bool = False, seed: int = 0) -> GPT:
    config = Config(**TINY, tie_embeddings=tie, qkv_bias=bias, lm_head_bias=bias and not tie)
    return tiny_gpt(config, seed=seed, std=0.2).eval()  # peaked logits, so top-1 agreement means something


def linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(in_features, out_features, bias=bias).eval()


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> bool:
    return (actual - expected).abs().max().item() <= rel * expected.abs().max().item()


# --- one layer against the math of what it stored ---
# (plainlm's own int4 kernel against its exact math: tests/test_kernels.py)
# 40 rows: PyTorch's int4 kernel pads them to 48 (plainlm's need a multiple of 16, so they leave them to PyTorch's)
@pytest.mark.parametrize(
    ("mode", "out_features"),
    [
        ("int8 aten", 96),
        ("int8 aten", 40),
        ("int8 plainlm", 96),
        ("int4 aten", 96),
        ("int4 aten", 40),
        ("int4 plainlm", 96),
    ],
)
def test_int8_and_int4_linear_compute_what_they_store(mode: str, out_features: int) -> None:
    mode, _, kernel = mode.partition(" ")
    if kernel == "plainlm" and not kernels_loaded():
        pytest.skip("plainlm's kernels need AVX512-VNNI and a C++ compiler")
    fp = linear(128, out_features)
    x = torch.randn(3, 5, 128)
    layer = quantize._quantize_linear(fp, mode, quantize.DEFAULT_GROUP_SIZE[mode])
    w = layer.dequantized_weight()
    if mode == "int8":  # int8 rounds each weight to the nearest step of its row
        assert ((w - fp.weight).abs() <= layer.scales.float()[:, None] / 2 * 1.01).all()
    layer.pack(kernel)
    # PyTorch's kernels read bf16 activations, plainlm's round them to int8 per group of 64
    # (0.4% of the group's largest); both stay within 1% of the largest output.
    reference = F.linear(x, w, fp.bias)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (3, 5, out_features) and y.dtype == torch.float32
    assert close(y, reference, 1e-2), mode


def test_int4_groups_span_their_weights() -> None:
    fp = linear(128, 64, bias=False)
    layer = quantize._quantize_linear(fp, "int4", 32)
    scales = layer.scales_and_zeros[..., 0].float().T.repeat_interleave(32, dim=1)  # (N, K)
    error = (layer.dequantized_weight() - fp.weight).abs()
    assert (error <= scales / 2 * 1.05).all()  # every weight within half a step of its group's grid


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nf4_and_fp4_linear_match_bitsandbytes_dequantized_weight(quant_type: str) -> None:
    fp = linear(128, 64)
    layer = quantize.nf4_linear(fp, 64, quant_type)
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_type == quant_type
    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert 0 < (w - fp.weight).abs().max() < 0.2 * fp.weight.abs().max()
    x = torch.randn(4, 128)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, w, fp.bias), rtol=1e-5, atol=1e-5)


def test_nf4_trains_on_the_cpu() -> None:
    """QLoRA's path: gradients flow through the frozen 4-bit weight to the input and to an adapter."""
    layer = quantize.nf4_linear(linear(64, 32), 64).train()
    lora_a = nn.Parameter(torch.randn(4, 64) * 0.1)
    x = torch.randn(3, 64, requires_grad=True)
    (layer(x) + x @ lora_a.T @ torch.ones(4, 32)).sum().backward()
    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(x.grad, (torch.ones(3, 32) @ w + torch.ones(3, 32) @ torch.ones(32, 4) @ lora_a))
    assert lora_a.grad is not None and lora_a.grad.abs().sum() > 0
    assert layer.weight.grad is None


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_int8_and_int4_pass_gradients_to_the_input(mode: str) -> None:
    """QLoRA on an int4 (or int8) base: the kernels have no backward of their own; ours goes through the
    dequantized weight. The kernels read bf16 activations, so the forward matches to bf16 rounding."""
    fp = linear(64, 48)
    layer = quantize._quantize_linear(fp, mode, quantize.DEFAULT_GROUP_SIZE[mode])
    x = torch.randn(3, 64, requires_grad=True)
    grad_out = torch.randn(3, 48)
    (layer(x) * grad_out).sum().backward()
    w = layer.dequantized_weight()
    torch.testing.assert_close(x.grad, grad_out @ w, rtol=1e-5, atol=1e-5)
    assert all(not t.requires_grad for t in layer.buffers())


# --- whole models ---
# Random weights leave near-ties among 250 logits, so 4-bit modes flip some top-1 choices (0.56-0.95
# over five seeds); int8 stays within rounding (cosine 0.9999, top-1 0.95-0.99).
@pytest.mark.parametrize(
    ("mode", "min_cosine", "min_top1"),
    [("int8", 0.9995, 0.9), ("int4", 0.975, 0.5), ("nf4", 0.975, 0.5), ("fp4", 0.97, 0.5)],
)
@pytest.mark.parametrize("tie", [True, False])
def test_logits_stay_close_to_fp32(mode: str, min_cosine: float, min_top1: float, tie: bool) -> None:
    model = tiny_model(tie=tie, bias=True)
    idx = torch.randint(0, TINY["vocab_size"], (2, 40))
    with torch.no_grad():
        expected = model(idx)
        quantize_model(model, mode)
        logits = model(idx)
    cosine = F.cosine_similarity(logits.flatten(), expected.flatten(), dim=0).item()
    top1 = (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert cosine > min_cosine and top1 >= min_top1, (cosine, top1)
    assert model.quantization == {"mode": mode, "group_size": quantize.DEFAULT_GROUP_SIZE[mode]}
    if mode not in quantize.BITSANDBYTES_MODES and tie:  # one quantized matrix serves the lookup and the head
        assert model.lm_head.weight is model.embed.weight


def test_every_layer_is_quantized_and_no_float_weight_is_left() -> None:
    for mode, kinds in (("int8", (Int8Linear, Int8Embedding)), ("int4", (Int4Linear, Int4Embedding))):
        model = quantize_model(tiny_model(), mode)
        assert not [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
        assert isinstance(model.lm_head, kinds[0]) and isinstance(model.embed, kinds[1])
        float_matrices = [n for n, t in model.state_dict().items() if t.is_floating_point() and t.dim() == 2]
        assert float_matrices == [], mode  # only norms, biases and per-row/group scales are float


def test_the_integer_kernels_do_the_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every quantized layer calls an integer kernel: plainlm's where it fits (the blocks, on a CPU with
    AVX512-VNNI) and PyTorch's elsewhere (the 250-row head)."""
    kernels = {
        "_weight_int8pack_mm": torch.ops.aten,
        "_weight_int4pack_mm_for_cpu": torch.ops.aten,
        "int8_matmul": torch.ops.plainlm,
        "int4_matmul": torch.ops.plainlm,
        "int8_matmuls": torch.ops.plainlm,
        "int4_matmuls": torch.ops.plainlm,
    }
    calls = dict.fromkeys(kernels, 0)
    kernels_loaded()  # plainlm's operators exist once the kernels load: before that, none could be counted
    for name, namespace in kernels.items():
        if not hasattr(namespace, name):
            continue  # plainlm's kernels did not build here

        def counted(*args: object, _kernel: object = getattr(namespace, name), _name: str = name) -> torch.Tensor:
            calls[_name] += 1
            return _kernel(*args)

        monkeypatch.setattr(namespace, name, counted)
    idx = torch.randint(0, TINY["vocab_size"], (1, 8))
    # Per block: q, k and v in one call, gate and up in another (kernel_layers.project_together), o and down one each.
    n = 2 * TINY["n_layer"]
    expected = {
        "int8": {"int8_matmuls": n, "int8_matmul": n, "_weight_int8pack_mm": 1},
        "int4": {"int4_matmuls": n, "int4_matmul": n, "_weight_int4pack_mm_for_cpu": 1},
    }
    if not kernels_loaded():
        expected = {"int8": {"_weight_int8pack_mm": 15}, "int4": {"_weight_int4pack_mm_for_cpu": 15}}
    for mode, counts in expected.items():
        model = quantize_model(tiny_model(), mode)
        with torch.no_grad():
            model(idx)
        assert {k: v for k, v in calls.items() if v} == counts, mode
        for name in calls:
            calls[name] = 0


def test_int8_weights_take_a_quarter_of_fp32_for_smollm2_135m() -> None:
    with torch.device("meta"):  # shapes and dtypes only: no memory, no time
        model = GPT(config_for_name("SmolLM2-135M"))
    fp32 = weight_bytes(model)
    assert fp32 == pytest.approx(4 * 134.5e6, rel=0.01)  # the tied head counts once
    quantize_model(model, "int8")
    assert weight_bytes(model) <= 0.3 * fp32, weight_bytes(model) / fp32
    assert model.lm_head.weight is model.embed.weight


# --- saving and loading ---
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_are_exact_and_never_requantize(
    mode: str, tie: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = quantize_model(tiny_model(tie=tie, bias=True), mode)
    save_checkpoint(model, tmp_path)
    assert json.loads((tmp_path / QUANTIZATION_FILE).read_text())["mode"] == mode

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("loading a quantized checkpoint quantized again")

    for name in ("quantize_int8", "quantize_int4", "quantize_model", "nf4_linear"):
        monkeypatch.setattr(quantize, name, refuse)
    monkeypatch.setattr(bnb.functional, "quantize_4bit", refuse)
    loaded = load_checkpoint(tmp_path).eval()

    saved, again = model.state_dict(), loaded.state_dict()
    assert saved.keys() == again.keys()
    for key in saved:
        assert saved[key].dtype == again[key].dtype and torch.equal(saved[key], again[key]), key
    idx = torch.randint(0, TINY["vocab_size"], (2, 10))
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))
    assert loaded.quantization == model.quantization
    if tie and mode not in quantize.BITSANDBYTES_MODES:
        assert loaded.lm_head.weight is loaded.embed.weight


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_tiles_stay_in_memory_and_rows_go_everywhere_else(mode: str, tmp_path: Path) -> None:
    """plainlm's kernels read the matrices tiled in place: the tied embedding's lookups, state dicts,
    checkpoints and load_state_dict still see rows, as quantize_int8/int4 made them."""
    if not kernels_loaded():
        pytest.skip("plainlm's kernels need AVX512-VNNI and a C++ compiler")
    torch.manual_seed(0)
    model = GPT(Config(**{**TINY, "vocab_size": 256}, tie_embeddings=True)).eval()  # 256 rows: the head tiles
    float_head = model.lm_head.weight.detach().clone()
    quantize_model(model, mode)
    head, embed = model.lm_head, model.embed
    assert head.kernel == "plainlm" and head.weight.dim() == 3 and embed.weight is head.weight
    rows = quantize.quantize_int8(float_head)[0] if mode == "int8" else quantize.quantize_int4(float_head, 64)[0]
    state = model.state_dict()
    assert torch.equal(state["embed.weight"], rows) and torch.equal(state["lm_head.weight"], rows)
    idx = torch.tensor([[0, 17, 255], [31, 16, 15]])
    torch.testing.assert_close(embed(idx), head.dequantized_weight()[idx], rtol=0, atol=0)

    save_checkpoint(model, tmp_path)
    assert torch.equal(load_file(tmp_path / "model.safetensors")["embed.weight"], rows)
    loaded = load_checkpoint(tmp_path).eval()
    assert loaded.lm_head.weight.dim() == 3 and loaded.embed.weight is loaded.lm_head.weight
    with torch.no_grad():
        expected = model(idx)
        assert torch.equal(loaded(idx), expected)
        other = quantize_model(GPT(Config(**{**TINY, "vocab_size": 256}, tie_embeddings=True)).eval(), mode)
        other.load_state_dict(state)  # into layers already tiled: the rows go in, and are tiled again
        assert other.lm_head.weight.dim() == 3 and torch.equal(other(idx), expected)


def test_checkpoint_is_a_fraction_of_fp32_on_disk(tmp_path: Path) -> None:
    model = tiny_model(tie=False)
    save_checkpoint(model, tmp_path / "fp32")
    save_checkpoint(quantize_model(model, "int8"), tmp_path / "int8")
    fp32, int8 = ((tmp_path / d / "model.safetensors").stat().st_size for d in ("fp32", "int8"))
    assert int8 < 0.3 * fp32


# --- generation ---
@pytest.mark.parametrize("mode", MODES)
def test_greedy_generation_with_the_kv_cache_and_batches(mode: str) -> None:
    model = quantize_model(tiny_model(), mode)
    prompts = [[5, 9, 3, 7, 1, 2], [8, 4]]
    batched = generate(model, prompts, max_new_tokens=8)
    alone = [generate(model, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == alone and all(len(row) == 8 for row in batched)
    # The cached decode equals recomputing the whole sequence at every step.
    ids = list(prompts[0])
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert ids[len(prompts[0]) :] == batched[0]


def test_llm_load_quantizes_and_loads_quantized(tiny_hf_dir: Path, tmp_path: Path) -> None:
    llm = LLM.load(tiny_hf_dir, device="cpu", quantize="int8")
    assert isinstance(llm.model.lm_head, Int8Linear) and llm.model.quantization["mode"] == "int8"
    text = llm.generate("hello world", max_new_tokens=6)
    assert isinstance(text, str) and text
    assert len(llm.generate(["hello", "the llama eats"], max_new_tokens=4)) == 2

    save_checkpoint(llm.model, tmp_path, tokenizer_dir=tiny_hf_dir)
    again = LLM.load(tmp_path, device="cpu")
    assert isinstance(again.model.lm_head, Int8Linear)
    assert again.generate("hello world", max_new_tokens=6) == text
    with pytest.raises(ValueError, match="saved quantized as int8"):
        LLM.load(tmp_path, device="cpu", quantize="int4")


@pytest.mark.slow  # a fresh process per run: `make test` runs it, `make test-fast` does not
def test_cli_generate_with_quantize(tiny_hf_dir: Path) -> None:
    result = run_cli("generate", "--checkpoint_dir", str(tiny_hf_dir), "--quantize", "int8", "--max_new_tokens", "5")
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stderr
    bad = run_cli("generate", "--checkpoint_dir", str(tiny_hf_dir), "--quantize", "int3")
    assert bad.returncode != 0 and "int3" in bad.stderr


# --- bad input ---
def test_bad_modes_and_devices_fail_clearly() -> None:
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        quantize_model(tiny_model(), "int3")
    with pytest.raises(ValueError, match="groups of 48 do not divide"):
        quantize_model(tiny_model(), "int4", group_size=48)
    quantize.check_mode("int8", None, torch.device("cuda"))  # PyTorch's CUDA kernels
    with pytest.raises(NotImplementedError, match="on the CPU .* and on CUDA .*; not on mps"):
        quantize.check_mode("int8", None, torch.device("mps"))
    with pytest.raises(ValueError, match="int4 on CUDA .* groups of 32/64/128/256 .* groups of 16"):
        quantize.cuda_int4_operands(torch.zeros(16, 32, dtype=torch.uint8), torch.zeros(4, 16, 2), 16)


# --- the CUDA path, run here up to PyTorch's kernel calls (benchmarks/gpu_check.py runs the kernels) ---
def tinygemm_int4_mm(x: torch.Tensor, nibbles: torch.Tensor, group_size: int, pairs: torch.Tensor) -> torch.Tensor:
    """`aten._weight_int4pack_mm` on CUDA, by its definition, over the nibbles its convert op was given (the
    even input in the high nibble): w = (q - 8) * scale + zero from bf16 pairs (groups, N, 2), bf16 in and out."""
    q = torch.stack((nibbles >> 4, nibbles & 15), dim=-1).flatten(-2).float()
    groups = q.reshape(q.shape[0], -1, group_size)
    sz = pairs.float().transpose(0, 1)  # (N, groups, 2)
    w = ((groups - 8) * sz[..., :1] + sz[..., 1:]).flatten(-2)
    return (x.float() @ w.T).to(torch.bfloat16)


@pytest.mark.parametrize(("out_features", "in_features", "group_size"), [(96, 128, 64), (40, 96, 32), (24, 256, 256)])
def test_int4_on_cuda_gives_pytorchs_kernel_the_layout_it_reads(
    monkeypatch: pytest.MonkeyPatch, out_features: int, in_features: int, group_size: int
) -> None:
    """The packing, padding and call of the CUDA path, with PyTorch's two CUDA ops replaced by their
    definitions: the product equals the layer's dequantized weights' (bf16 activations: 1% of the largest)."""
    inner_k_tiles = []
    monkeypatch.setattr(
        torch.ops.aten, "_convert_weight_to_int4pack", lambda n, tiles: inner_k_tiles.append(tiles) or n.clone()
    )
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm", tinygemm_int4_mm)
    layer = quantize._quantize_linear(linear(in_features, out_features), "int4", group_size)
    layer.pack("cuda")
    assert layer.packed.shape == (out_features + -out_features % 8, in_features // 2)  # padded to 8 rows
    assert inner_k_tiles == [next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)]
    x = torch.randn(5, in_features)
    with torch.no_grad():
        y = layer.matmul_cuda(x)
    assert y.shape == (5, out_features)
    assert close(y.float(), x @ layer.dequantized_weight().T, 1e-2)


def test_int8_on_cuda_reads_float32_for_a_few_rows_and_bf16_for_many(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step's rows go to PyTorch's CUDA int8 kernel (float32 inputs and scales, as it reads them);
    a prompt's many rows to a bf16 matmul over the matrix cast for the call."""
    calls = []

    def int8pack_mm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        calls.append((x.dtype, scales.dtype))
        return x @ (w.float() * scales[:, None]).T

    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", int8pack_mm)
    layer = quantize._quantize_linear(linear(128, 48), "int8", None)
    layer.pack("cuda")
    w = layer.dequantized_weight()
    few, many = torch.randn(quantize.CUDA_INT8_KERNEL_ROWS, 128), torch.randn(quantize.CUDA_INT8_KERNEL_ROWS + 1, 128)
    with torch.no_grad():
        assert close(layer.matmul_cuda(few), few @ w.T, 1e-5)
        assert calls == [(torch.float32, torch.float32)]
        y = layer.matmul_cuda(many)
    assert y.dtype == torch.bfloat16 and close(y.float(), many @ w.T, 1e-2) and len(calls) == 1


def test_a_quantized_model_is_not_the_float_one(tmp_path: Path) -> None:
    """Writing a float model over a quantized checkpoint removes the stale quantization.json."""
    model = tiny_model()
    save_checkpoint(quantize_model(copy.deepcopy(model), "int8"), tmp_path)
    save_checkpoint(model, tmp_path)
    assert not (tmp_path / QUANTIZATION_FILE).exists()
    assert isinstance(load_checkpoint(tmp_path).lm_head, nn.Linear)


def test_a_bad_quantization_file_names_itself(tmp_path: Path) -> None:
    save_checkpoint(quantize_model(tiny_model(), "int8"), tmp_path)
    (tmp_path / QUANTIZATION_FILE).write_text('{"mode": "int3"}')
    with pytest.raises(CheckpointError, match=r"quantization.json: unknown quantization mode 'int3'"):
        load_checkpoint(tmp_path)
