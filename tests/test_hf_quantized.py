"""GPTQ and AWQ checkpoints (convert/hf_quantized.py): written here by each format's definition, loaded onto
plainlm's int4 and int8 layers, and checked against that definition's dequantization bit for bit, and against
transformers running the dequantized weights.

The packing below is the formats' own (AutoGPTQ / gptqmodel's v1 and v2, AutoAWQ's GEMM), written from their
definitions independently of plainlm's reader; gptqmodel itself needs a newer torch than plainlm pins.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from plainlm.api import LLM
from plainlm.checkpoint import load_checkpoint, save_checkpoint
from plainlm.convert.hf import convert_from_hf, convert_to_hf, load_hf_model
from plainlm.errors import CheckpointError
from plainlm.kernel_layers import project_together
from plainlm.kernels import kernels_loaded
from plainlm.quantize import GroupedInt8Linear, Int4Linear, dequantize_model, quantize_model, zero_point_pairs
from tests.helpers import run_cli, tiny_hf_model

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Scheme:
    method: str  # "gptq" or "awq"
    group_size: int = 32
    sym: bool = False
    act_order: bool = False
    checkpoint_format: str = "gptq"  # GPTQ: "gptq" (v1, zero points stored minus one) or "gptq_v2"
    bits: int = 4

    def __str__(self) -> str:
        return f"{self.method}{self.bits}-g{self.group_size}{'-sym' if self.sym else ''}" + (
            f"{'-act' if self.act_order else ''}{'-v2' if self.checkpoint_format == 'gptq_v2' else ''}"
        )


SCHEMES = [
    Scheme("gptq", 32),
    Scheme("gptq", 128, sym=True),
    Scheme("gptq", -1),
    Scheme("gptq", 32, act_order=True),
    Scheme("gptq", 64, sym=True, act_order=True, checkpoint_format="gptq_v2"),
    Scheme("awq", 32),
    Scheme("awq", 128),
    Scheme("gptq", 32, bits=8),
    Scheme("gptq", 128, sym=True, bits=8),
    Scheme("gptq", -1, bits=8),
    Scheme("gptq", 32, act_order=True, bits=8),
    Scheme("gptq", 128, act_order=True, checkpoint_format="gptq_v2", bits=8),
    Scheme("gptq", -1, sym=True, checkpoint_format="gptq_v2", bits=8),
]
GPTQ8 = Scheme("gptq", 32, act_order=True, bits=8)


def words(values: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """(..., f * W) values 0..2^bits - 1 -> (..., W) int32 with f = 32 / bits values each, value i of each f in
    bits i * bits .. (i + 1) * bits - 1."""
    per_word = 32 // bits
    grouped = values.long().reshape(*values.shape[:-1], -1, per_word)
    packed = sum(grouped[..., i] << (bits * i) for i in range(per_word))
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the same 32 bits, signed


@dataclass
class PackedLinear:
    """One quantized layer by its format's definition: integers q (K, N), zero points z (groups, N), fp16
    scales (groups, N) and each input's group g_idx (K,)."""

    q: torch.Tensor
    z: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor

    def reference_fp16(self) -> torch.Tensor:
        """gptqmodel's and AutoAWQ's dequantization, in fp16: scales[g] * (q - z[g]), as (N, K)."""
        g = self.g_idx.long()
        return (self.scales[g] * (self.q - self.z[g]).half()).T

    def exact(self) -> torch.Tensor:
        g = self.g_idx.long()
        return (self.scales[g].double() * (self.q - self.z[g]).double()).T.float()

    def tensors(self, scheme: Scheme) -> dict[str, torch.Tensor]:
        if scheme.method == "awq":  # packed along the outputs, in AWQ's order within a word

            def awq(values: torch.Tensor) -> torch.Tensor:
                return words(values.reshape(values.shape[0], -1, 8)[..., AWQ_ORDER].flatten(-2))

            return {"qweight": awq(self.q), "qzeros": awq(self.z), "scales": self.scales}
        stored = self.z - 1 if scheme.checkpoint_format == "gptq" else self.z
        return {
            "qweight": words(self.q.T, scheme.bits).T.contiguous(),  # packed along the inputs
            "qzeros": words(stored, scheme.bits),
            "scales": self.scales,
            "g_idx": self.g_idx,
        }


def random_packed(K: int, N: int, scheme: Scheme, generator: torch.Generator) -> PackedLinear:
    G = K if scheme.group_size == -1 else scheme.group_size
    if scheme.act_order:  # the inputs in a random order, G of them a group in that order
        g_idx = (torch.randperm(K, generator=generator).argsort() // G).to(torch.int32)
    else:
        g_idx = (torch.arange(K) // G).to(torch.int32)
    top = 2**scheme.bits  # q and z below it
    q = torch.randint(0, top, (K, N), generator=generator)
    low = 1 if scheme.method == "gptq" and scheme.checkpoint_format == "gptq" else 0  # v1 stores z - 1 >= 0
    z = torch.full((K // G, N), top // 2) if scheme.sym else torch.randint(low, top, (K // G, N), generator=generator)
    # Steps of a 4-bit grid over weights of about +-0.2, and 17 times finer ones at 8 bits over the same range.
    scales = ((torch.rand(K // G, N, generator=generator) * 0.03 + 0.005) * 15 / (top - 1)).half()
    return PackedLinear(q, z, scales, g_idx)


def quantization_config(scheme: Scheme) -> dict:
    if scheme.method == "awq":
        return {
            "quant_method": "awq",
            "bits": scheme.bits,
            "group_size": scheme.group_size,
            "zero_point": True,
            "version": "gemm",
        }
    return {
        "quant_method": "gptq",
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "desc_act": scheme.act_order,
        "sym": scheme.sym,
        "checkpoint_format": scheme.checkpoint_format,
    }


def write_packed_model(directory: Path, scheme: Scheme) -> tuple[transformers.PreTrainedModel, dict[str, PackedLinear]]:
    """A tiny Llama whose projections are packed in `scheme`; returns transformers' model holding the exact
    dequantized weights, and the packed layers by Hugging Face prefix."""
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    reference = tiny_hf_model(config, seed=0, std=0.1)
    reference.save_pretrained(directory)
    return reference, pack_directory(directory, scheme, reference)


def pack_directory(
    directory: Path, scheme: Scheme, reference: transformers.PreTrainedModel | None = None
) -> dict[str, PackedLinear]:
    """Replace the projections of the model saved in `directory` by random packed layers in `scheme` (and
    `reference`'s weights by their exact dequantization); returns them by Hugging Face prefix."""
    state = load_file(directory / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    layers = {}
    for prefix in [k.removesuffix(".weight") for k in state if k.split(".")[-2] in PROJECTIONS]:
        N, K = state.pop(f"{prefix}.weight").shape
        layers[prefix] = random_packed(K, N, scheme, generator)
        state.update({f"{prefix}.{name}": t for name, t in layers[prefix].tensors(scheme).items()})
        if reference is not None:
            reference.get_submodule(prefix).weight.data = layers[prefix].exact()
    save_file(state, directory / "model.safetensors")
    hf = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**hf, "quantization_config": quantization_config(scheme)}))
    return layers


def plainlm_layer(model: torch.nn.Module, prefix: str) -> Int4Linear | GroupedInt8Linear:
    _, layer, kind, projection = prefix.split(".")[1:]
    return model.get_submodule(f"blocks.{layer}.{'attn' if kind == 'self_attn' else 'mlp'}.{projection}")


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_dequantized_weights_are_the_formats_bit_for_bit(scheme: Scheme, tmp_path: Path) -> None:
    reference, layers = write_packed_model(tmp_path, scheme)
    model = load_hf_model(tmp_path)
    mode = f"int{scheme.bits}"
    assert model.quantization == {"mode": mode, "group_size": scheme.group_size, "packed": scheme.method}
    for prefix, packed in layers.items():
        layer = plainlm_layer(model, prefix)
        assert isinstance(layer, Int4Linear if scheme.bits == 4 else GroupedInt8Linear), prefix
        assert layer.scales_and_zeros.dtype == torch.float32
        several_groups = layer.in_features > layer.group_size  # one group has no order to keep
        assert (layer.input_order is not None) == (scheme.act_order and several_groups), prefix
        weight = layer.dequantized_weight()
        # float32 holds (q - z) * scale exactly; rounded once to fp16 it is the reference's fp16 product
        assert torch.equal(weight, packed.exact()), prefix
        assert torch.equal(weight.half(), packed.reference_fp16()), prefix


@pytest.mark.parametrize("scheme", [SCHEMES[0], SCHEMES[3], SCHEMES[5], GPTQ8, SCHEMES[-1]], ids=str)
def test_logits_equal_transformers_on_the_dequantized_weights(scheme: Scheme, tmp_path: Path) -> None:
    reference, _ = write_packed_model(tmp_path, scheme)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(ids).logits
        model = load_hf_model(tmp_path).eval()
        quantized = model(ids)
        floating = dequantize_model(model)(ids)
    torch.testing.assert_close(floating, expected, rtol=1e-4, atol=1e-4)
    # The kernel path rounds activations to int8 per group (kernels/int4_matmul.cpp, int8_matmul.cpp), or
    # to bf16 in PyTorch's kernels: within 2% of the logits' scale through two layers, as plainlm's own
    # int4 is.
    assert (quantized - expected).norm() / expected.norm() < 0.02


@pytest.mark.skipif(not kernels_loaded(), reason="plainlm's kernels need AVX512-VNNI and a C++ compiler")
@pytest.mark.parametrize("bits", [4, 8])
def test_act_order_layers_that_read_one_input_share_one_order_and_one_kernel_call(
    bits: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPTQ quantizes q, k and v from the same inputs, so their act orders agree: one tensor, one kernel call."""
    directory = tmp_path / "model"
    _, layers = write_packed_model(directory, Scheme("gptq", 32, act_order=True, bits=bits))
    state = load_file(directory / "model.safetensors")
    for layer in (0, 1):  # the same g_idx for q, k and v of each block
        for projection in ("k_proj", "v_proj"):
            state[f"model.layers.{layer}.self_attn.{projection}.g_idx"] = state[
                f"model.layers.{layer}.self_attn.q_proj.g_idx"
            ].clone()
    save_file(state, directory / "model.safetensors")
    model = load_hf_model(directory)
    attn = model.blocks[0].attn
    assert attn.q_proj.input_order is attn.k_proj.input_order is attn.v_proj.input_order
    assert attn.q_proj.input_order is not model.blocks[1].attn.q_proj.input_order
    assert attn.q_proj.kernel == "plainlm"
    x = torch.randn(3, 128)
    calls = []
    name = "int4_matmuls" if bits == 4 else "int8_group_matmuls"
    shared = getattr(torch.ops.plainlm, name)
    monkeypatch.setattr(torch.ops.plainlm, name, lambda *args: calls.append(1) or shared(*args))
    with torch.no_grad():
        together = project_together(x, [attn.q_proj, attn.k_proj, attn.v_proj])
        assert len(calls) == 1
        for y, layer in zip(together, (attn.q_proj, attn.k_proj, attn.v_proj), strict=True):
            torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
            exact = x @ layer.dequantized_weight().T
            assert (y - exact).norm() / exact.norm() < 0.01


# (int8_group_matmul against its exact math, activations rounded as it rounds them: tests/test_kernels.py)
@pytest.mark.parametrize("kernel", ["aten", "plainlm", "cuda"])
@pytest.mark.parametrize(
    ("M", "N", "K", "G"),
    [(1, 48, 256, 32), (17, 16, 256, 64), (3, 32, 256, 128), (2, 48, 192, 192), (1, 40, 128, 32), (17, 40, 96, 96)],
)
def test_an_int8_layer_in_groups_runs_its_integers_within_the_kernels_tolerance(
    kernel: str, M: int, N: int, K: int, G: int
) -> None:
    """8-bit GPTQ's layer (q 0..255, whole zero points, fp16 scales) on either kernel: plainlm's rounds the
    activations to int8 per 64 inputs (per G below 64), PyTorch's (run once per group) to bf16; both stay
    within 1% of the product with the dequantized float weight, which is the format's exactly."""
    if kernel == "plainlm" and not (kernels_loaded() and N % 16 == 0):
        pytest.skip("plainlm's kernels need AVX512-VNNI, a C++ compiler and a multiple of 16 rows")
    generator = torch.Generator().manual_seed(K + G)
    q = torch.randint(0, 256, (N, K), generator=generator)
    z = torch.randint(0, 256, (K // G, N), generator=generator)
    scales = (torch.rand(K // G, N, generator=generator) * 0.01 + 0.001).half()
    layer = GroupedInt8Linear(K, N, True, G, "meta")
    layer.weight, layer.scales_and_zeros = (q - 128).to(torch.int8), zero_point_pairs(scales, z, bits=8)
    layer.bias = torch.nn.Parameter(torch.randn(N, generator=generator), requires_grad=False)
    layer.pack(kernel)
    exact = (scales.double().repeat_interleave(G, 0).T * (q - z.repeat_interleave(G, 0).T)).float()
    assert torch.equal(layer.dequantized_weight(), exact)
    x = torch.randn(M, K, generator=generator) * torch.linspace(0.1, 3, K)  # groups of different ranges
    with torch.no_grad():
        # "cuda": the GPU path's own call, here on PyTorch's CPU int8 kernel (float32 inputs, as the GPU's reads)
        y = layer.matmul_cuda(x) + layer.bias if kernel == "cuda" else layer(x)
    reference = x @ exact.T + layer.bias
    assert y.shape == (M, N) and (y - reference).norm() / reference.norm() < 0.01
    assert layer.weight.dtype == torch.int8 and (layer.packed is None or layer.packed.dtype == torch.int8)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_layer_passes_gradients_in_the_inputs_own_order(bits: int, tmp_path: Path) -> None:
    write_packed_model(tmp_path, Scheme("gptq", 32, act_order=True, bits=bits))
    layer = plainlm_layer(load_hf_model(tmp_path), "model.layers.0.self_attn.q_proj")
    x = torch.randn(2, 128, requires_grad=True)
    grad_out = torch.randn(2, layer.out_features)
    layer(x).backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ layer.dequantized_weight(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_convert_keeps_the_integers_or_dequantizes_with_a_dtype(bits: int, tmp_path: Path) -> None:
    write_packed_model(tmp_path / "gptq", Scheme("gptq", 32, act_order=True, bits=bits))
    loaded = load_hf_model(tmp_path / "gptq").eval()
    kept = load_checkpoint(convert_from_hf(tmp_path / "gptq", tmp_path / "kept")).eval()
    saved = json.loads((tmp_path / "kept" / "quantization.json").read_text())
    assert saved == {"mode": f"int{bits}", "group_size": 32, "packed": "gptq"}
    assert type(kept.blocks[0].attn.q_proj) is type(loaded.blocks[0].attn.q_proj)
    assert {k: v.dtype for k, v in kept.state_dict().items()} == {k: v.dtype for k, v in loaded.state_dict().items()}
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(kept.state_dict()[name], tensor), name
    assert kept.blocks[0].attn.q_proj.input_order is not None
    assert kept.blocks[0].attn.q_proj.kernel == loaded.blocks[0].attn.q_proj.kernel
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(kept(ids), loaded(ids), rtol=0, atol=0)
        floating = load_checkpoint(convert_from_hf(tmp_path / "gptq", tmp_path / "float", dtype=torch.float32))
        assert not (tmp_path / "float" / "quantization.json").exists()
    dequantized = dequantize_model(loaded).state_dict()
    assert floating.state_dict().keys() == dequantized.keys()
    for name, tensor in floating.state_dict().items():
        assert torch.equal(tensor, dequantized[name]), name


def unpacked(words_: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """(..., W) int32 -> (..., f * W) values with f = 32 / bits, bits i * bits .. (i + 1) * bits - 1 of each
    word as value i."""
    shifts = bits * torch.arange(32 // bits, dtype=torch.int32)
    return ((words_[..., None] >> shifts) & (2**bits - 1)).flatten(-2).long()


def awq_unpacked(words_: torch.Tensor) -> torch.Tensor:
    """AWQ's words (R, W) -> (R, 8 * W) values in column order: nibble i of a word is column AWQ_ORDER[i]."""
    nibbles = unpacked(words_)
    return nibbles.view(nibbles.shape[0], -1, 8)[..., torch.tensor(AWQ_ORDER).argsort()].flatten(-2)


@pytest.mark.parametrize(
    "scheme",
    [Scheme("gptq", 32, act_order=True), Scheme("awq", 32), Scheme("gptq", -1), GPTQ8, Scheme("gptq", -1, bits=8)],
    ids=str,
)
def test_to_hf_writes_the_same_weights_back_in_their_format(scheme: Scheme, tmp_path: Path) -> None:
    _, layers = write_packed_model(tmp_path / "in", scheme)
    convert_from_hf(tmp_path / "in", tmp_path / "plainlm")
    convert_to_hf(tmp_path / "plainlm", tmp_path / "out")
    quantization = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    if scheme.method == "awq":
        assert quantization == {
            "quant_method": "awq",
            "bits": 4,
            "group_size": 32,
            "zero_point": True,
            "version": "gemm",
        }
    else:  # written as v2: zero points as they are
        assert quantization == {
            "quant_method": "gptq",
            "bits": scheme.bits,
            "group_size": scheme.group_size,
            "desc_act": scheme.act_order,
            "sym": False,
            "checkpoint_format": "gptq_v2",
        }
    state = load_file(tmp_path / "out" / "model.safetensors")
    for prefix, packed in layers.items():  # read back by the format's definition, not by plainlm's reader
        if scheme.method == "awq":
            q, zeros = awq_unpacked(state[f"{prefix}.qweight"]), awq_unpacked(state[f"{prefix}.qzeros"])
            g_idx = torch.arange(q.shape[0]) // scheme.group_size
        else:
            bits = scheme.bits
            q, zeros = unpacked(state[f"{prefix}.qweight"].T, bits).T, unpacked(state[f"{prefix}.qzeros"], bits)
            g_idx = state[f"{prefix}.g_idx"]
        written = PackedLinear(q, zeros, state[f"{prefix}.scales"], g_idx)
        assert torch.equal(written.exact(), packed.exact()), prefix
    again = load_hf_model(tmp_path / "out")
    for name, tensor in load_hf_model(tmp_path / "in").state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_to_hf_refuses_plainlms_own_int4(tiny_hf_dir: Path, tmp_path: Path) -> None:
    model = load_hf_model(tiny_hf_dir)
    save_checkpoint(quantize_model(model, "int4", 32), tmp_path / "int4")
    with pytest.raises(CheckpointError, match="quantized as plainlm's int4, which Hugging Face has no format for"):
        convert_to_hf(tmp_path / "int4", tmp_path / "out")


@pytest.mark.parametrize("bits", [4, 8])
def test_llm_load_and_the_command_line_take_a_gptq_directory(bits: int, tiny_hf_dir: Path, tmp_path: Path) -> None:
    directory = tmp_path / "gptq"
    shutil.copytree(tiny_hf_dir, directory)
    pack_directory(directory, Scheme("gptq", 32, act_order=True, bits=bits))
    llm = LLM.load(directory)
    assert isinstance(llm.model.blocks[0].mlp.down_proj, Int4Linear if bits == 4 else GroupedInt8Linear)
    assert llm.model.quantization == {"mode": f"int{bits}", "group_size": 32, "packed": "gptq"}
    text = llm.generate("Hello", max_new_tokens=8, temperature=0.0)
    result = run_cli("generate", "--checkpoint_dir", str(directory), "--prompt", "Hello", "--max_new_tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == text.strip()


# --- bad input ---
def rewrite_config(directory: Path, **quantization: object) -> None:
    hf = json.loads((directory / "config.json").read_text())
    hf["quantization_config"] = {**hf["quantization_config"], **quantization}
    (directory / "config.json").write_text(json.dumps(hf))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"quant_method": "bitnet"}, "quant_method 'bitnet' is not one plainlm loads (gptq with 4/8 bits; awq with 4"),
        ({"bits": 3}, "gptq with 3 bits is not supported; plainlm loads gptq with 4/8 bits; awq with 4 bits"),
        (
            {"quant_method": "awq", "bits": 8},
            "awq with 8 bits is not supported (AWQ's GEMM layout is 4-bit only); plainlm loads gptq with 4/8 bits",
        ),
        ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
        (
            {"group_size": 64},
            "model.layers.0.self_attn.q_proj.qzeros has shape (4, 16), but gptq with 4 bits in "
            "groups of 64 needs (2, 16)",
        ),
    ],
)
def test_an_unsupported_or_inconsistent_config_is_refused_naming_what_is_supported(
    change: dict, message: str, tmp_path: Path
) -> None:
    write_packed_model(tmp_path, Scheme("gptq", 32))
    rewrite_config(tmp_path, **change)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_hf_model(tmp_path)


@pytest.mark.parametrize("missing", ["qzeros", "scales", "g_idx"])
def test_a_missing_packed_tensor_is_named(missing: str, tmp_path: Path) -> None:
    write_packed_model(tmp_path, Scheme("gptq", 32))
    state = load_file(tmp_path / "model.safetensors")
    del state[f"model.layers.1.mlp.down_proj.{missing}"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"'model.layers.1.mlp.down_proj' has no '{missing}' tensor"):
        load_hf_model(tmp_path)


def test_a_packed_tensor_of_the_wrong_shape_is_named_with_both_shapes(tmp_path: Path) -> None:
    write_packed_model(tmp_path, Scheme("awq", 32))
    state = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.qweight"
    state[key] = state[key][:, :16].contiguous()
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{key} has shape \(128, 16\), but awq .* needs \(128, 32\)"):
        load_hf_model(tmp_path)


def test_a_v1_zero_point_of_two_to_the_bits_loads_and_to_hf_refuses_it(tmp_path: Path) -> None:
    """v1 stores z - 1, so its largest stored value means z = 2^bits (AutoGPTQ's reader adds one, unmasked):
    loaded exactly, but v2, which to-hf writes, cannot hold it."""
    _, layers = write_packed_model(tmp_path / "in", Scheme("gptq", 32, bits=8))
    prefix = "model.layers.0.self_attn.q_proj"
    state = load_file(tmp_path / "in" / "model.safetensors")
    layers[prefix].z[0, :4] = 256
    state[f"{prefix}.qzeros"] = words(layers[prefix].z - 1, 8)
    save_file(state, tmp_path / "in" / "model.safetensors")
    layer = plainlm_layer(load_hf_model(tmp_path / "in"), prefix)
    assert torch.equal(layer.dequantized_weight(), layers[prefix].exact())
    convert_from_hf(tmp_path / "in", tmp_path / "plainlm")
    with pytest.raises(CheckpointError, match=r"blocks.0.attn.q_proj: a zero point is \d+ or 256, outside the 8-bit"):
        convert_to_hf(tmp_path / "plainlm", tmp_path / "out")


def test_a_packed_model_on_a_device_without_int4_kernels_is_refused_before_loading(tmp_path: Path) -> None:
    write_packed_model(tmp_path, Scheme("gptq", 32))
    with pytest.raises(NotImplementedError, match=r"int4 runs on the CPU .* and on CUDA .*; not on mps"):
        load_hf_model(tmp_path, device="mps")
