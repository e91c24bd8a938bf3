"""GPTQ and AWQ checkpoints of the Hugging Face hub, read onto plainlm's int4 and int8 layers.

    model = load_hf_model("Qwen2.5-0.5B-Instruct-GPTQ-Int4")   # hf.py finds `quantization_config` and comes here

A directory whose config.json has a `quantization_config` of `quant_method` "gptq" or "awq" stores each
quantized Linear `P` as packed integers instead of `P.weight`. The layouts, with K inputs, N outputs,
groups of G inputs (G = K when the config says -1), q and z in 0..2^bits - 1 and f = 32 / bits values per
int32 word, lowest bits first:

GPTQ, 4 or 8 bits (AutoGPTQ / gptqmodel; the hub's checkpoints are `checkpoint_format` "gptq", the v1 format):
    P.qweight  (K / f, N) int32     input k of output n: word k // f of column n
    P.qzeros   (K / G, N / f) int32 the zero point of each group and output, packed along the outputs;
                                     v1 stores z - 1, "gptq_v2" stores z
    P.scales   (K / G, N) fp16
    P.g_idx    (K,) int32           the group of each input: k // G, or any order with act order (desc_act)
    w[n, k] = scales[g, n] * (q[k, n] - z[g, n]),  g = g_idx[k]
AWQ, GEMM version, 4 bits only (AutoAWQ's WQLinear_GEMM and llm-awq define no other width):
    P.qweight  (K, N / 8) int32     packed along the outputs, each word's 8 values in the order 0 2 4 6 1 3 5 7
    P.qzeros   (K / G, N / 8) int32 the same packing; z as it is
    P.scales   (K / G, N) fp16
    w[n, k] = scales[k // G, n] * (q[k, n] - z[k // G, n])

gptqmodel and transformers compute that product in fp16. plainlm keeps the integers, less their midpoint c
(8 for 4 bits, in quantize.Int4Linear's nibbles; 128 for 8 bits, as quantize.GroupedInt8Linear's int8), and
turns each group's (scale, zero point) into the layer's float32 pair, w = (q - c) * scale + zero with
zero = (c - z) * scale (quantize.zero_point_pairs): both terms are exact in float32, so the dequantized weight
is the exact product, and rounded to fp16 it is the reference's fp16 weight bit for bit. Act-order inputs are
sorted by group once here (`input_order`), so the kernel reads contiguous groups and each call gathers its
input once. The embedding, the norms and (as these tools leave it) the head stay in float.

MXFP4 (gpt-oss's experts on the hub) is no packed layer of plainlm's: hf.py dequantizes it as it reads the
weights (convert/mxfp4.py), and `read_packed_format` lets it through as a float model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from plainlm.checkpoint import TensorSource
from plainlm.convert.hf_weights import Rule
from plainlm.errors import CheckpointError
from plainlm.model import GPT
from plainlm.quantize import (
    GroupedInt8Linear,
    Int4Linear,
    pack_nibbles,
    set_module,
    unpack_nibbles,
    zero_point_linear,
    zero_point_midpoint,
    zero_point_pairs,
)

METHODS = {"gptq": (4, 8), "awq": (4,)}  # quant_method -> the bit widths plainlm loads
# quant_method whose weights hf.py dequantizes as it reads them (convert/mxfp4.py): no packed layers
DEQUANTIZED_METHODS = ("mxfp4",)
PACKED_SUFFIXES = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales")}
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output column each nibble of an AWQ word holds, lowest first


@dataclass(frozen=True)
class PackedFormat:
    """What a config.json's `quantization_config` says about its packed layers."""

    method: str  # "gptq" or "awq"
    bits: int
    group_size: int  # -1: one group over all inputs
    zero_offset: int  # added to a stored zero point: 1 for GPTQ's v1 format, else 0

    @property
    def suffixes(self) -> tuple[str, ...]:
        return PACKED_SUFFIXES[self.method]

    @property
    def mode(self) -> str:
        """The plainlm quantization its layers have: "int4" or "int8"."""
        return f"int{self.bits}"


def quant_method(hf: dict) -> str | None:
    """A config.json's `quantization_config.quant_method`, lower case; None for a float model."""
    quantization = hf.get("quantization_config")
    return None if quantization is None else str(quantization.get("quant_method", "")).lower()


def read_packed_format(hf: dict, origin: object) -> PackedFormat | None:
    """The packed format a config.json (as a dict) declares, None for a float model or one dequantized as it is
    read (MXFP4), or one error naming what is not supported and what is."""
    method = quant_method(hf)
    if method is None or method in DEQUANTIZED_METHODS:
        return None
    quantization = hf["quantization_config"]
    supported = "; ".join(f"{name} with {'/'.join(map(str, bits))} bits" for name, bits in METHODS.items())
    supported += "; mxfp4, dequantized to bfloat16 as it is read"
    if method not in METHODS:
        raise CheckpointError(
            f"{origin}: quantization_config.quant_method {method!r} is not one plainlm loads ({supported}); "
            "load a float copy of the model, or a GGUF file"
        )
    bits = quantization.get("bits", quantization.get("w_bit"))
    group_size = quantization.get("group_size", quantization.get("q_group_size", 128))
    if bits not in METHODS[method]:
        why = " (AWQ's GEMM layout is 4-bit only)" if method == "awq" else ""
        raise CheckpointError(f"{origin}: {method} with {bits} bits is not supported{why}; plainlm loads {supported}")
    if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise CheckpointError(f"{origin}: quantization_config.group_size {group_size!r} is not a size or -1")
    if method == "awq":
        version = str(quantization.get("version", "gemm")).lower()
        if version != "gemm":
            raise CheckpointError(f"{origin}: AWQ version {version!r} is not supported; plainlm loads the GEMM layout")
        if quantization.get("zero_point", True) is False:
            raise CheckpointError(f"{origin}: AWQ without zero points is not supported; plainlm loads zero_point: true")
        return PackedFormat(method, bits, group_size, zero_offset=0)
    checkpoint_format = str(quantization.get("checkpoint_format", quantization.get("format", "gptq"))).lower()
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise CheckpointError(
            f"{origin}: GPTQ checkpoint_format {checkpoint_format!r} is not supported; plainlm loads gptq and gptq_v2"
        )
    return PackedFormat(method, bits, group_size, zero_offset=1 if checkpoint_format == "gptq" else 0)


class PackedLayers:
    """A packed checkpoint's quantized layers: made empty (meta device) in a meta-device model in place of its
    Linears, so that the checked loading (checkpoint.load_state) fills them like any other module; then
    `tensors(rule.hf, read)` gives each one's tensors in plainlm's names, for hf.hf_to_plainlm_tensors."""

    def __init__(self, model: GPT, rules: list[Rule], source: TensorSource, packed: PackedFormat) -> None:
        self.source, self.format = source, packed
        self.layers: dict[str, tuple[str, str, Int4Linear | GroupedInt8Linear]] = {}  # rule.hf -> (prefix, ours, layer)
        for rule in rules:
            prefix = rule.hf.removesuffix(".weight")
            key = _packed_key(source, prefix, "qweight")
            if not rule.hf.endswith(".weight") or key is None:
                continue
            if len(rule.ours) != 1 or rule.parts:
                raise CheckpointError(
                    f"{source.directory}: {key!r} packs {', '.join(rule.ours)} together; plainlm loads packed "
                    "layers that are one projection each, not fused ones: load a float copy of this model"
                )
            name = rule.ours[0].removesuffix(".weight")
            layer = self._empty_layer(model.get_submodule(name), prefix)
            set_module(model, name, layer)
            self.layers[rule.hf] = (prefix, name, layer)
        if not self.layers:
            raise CheckpointError(
                f"{source.directory}: config.json declares {packed.method} quantization, but no tensor ends in "
                "'.qweight'; the weights are not a packed checkpoint"
            )

    def _empty_layer(self, linear: torch.nn.Module, prefix: str) -> Int4Linear | GroupedInt8Linear:
        K, N = linear.in_features, linear.out_features
        group_size = K if self.format.group_size == -1 else self.format.group_size
        if K % group_size:
            raise CheckpointError(
                f"{self.source.directory}: {prefix} has {K} inputs, which groups of {group_size} "
                "(quantization_config.group_size) do not divide; the config and the weights disagree"
            )
        key = _packed_key(self.source, prefix, "g_idx") if self.format.method == "gptq" else None
        g_idx = self.source.get(key).long() if key is not None else None
        ordered = g_idx is not None and g_idx.shape == (K,) and not torch.equal(g_idx, torch.arange(K) // group_size)
        return zero_point_linear(self.format.bits, K, N, linear.bias is not None, group_size, ordered)

    def __contains__(self, hf_name: str) -> bool:
        return hf_name in self.layers

    def source_keys(self, hf_name: str) -> list[str]:
        prefix = self.layers[hf_name][0]
        return [key for suffix in self.format.suffixes if (key := _packed_key(self.source, prefix, suffix))]

    def tensors(self, hf_name: str, read: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        prefix, name, layer = self.layers[hf_name]
        return packed_layer_tensors(prefix, layer, name, self.source, self.format, read)

    def finish(self, model: GPT) -> GPT:
        """After loading: the model says how it is quantized (quantization.json, when it is saved)."""
        packed = self.format
        model.quantization = {"mode": packed.mode, "group_size": packed.group_size, "packed": packed.method}
        return model


def _packed_key(source: TensorSource, prefix: str, suffix: str) -> str | None:
    for candidate in (prefix, prefix.removeprefix("model."), f"model.{prefix}"):
        if f"{candidate}.{suffix}" in source:
            return f"{candidate}.{suffix}"
    return None


def packed_layer_tensors(
    prefix: str,
    layer: Int4Linear | GroupedInt8Linear,
    ours: str,
    source: TensorSource,
    packed: PackedFormat,
    read: Callable[[str], torch.Tensor],
) -> Iterator[tuple[str, torch.Tensor]]:
    """One packed layer's tensors (Hugging Face prefix `prefix`) as plainlm's int4 or int8 `layer` (named `ours`)
    holds them: its `weight` (nibbles, or int8 q - 128), `scales_and_zeros`, and `input_order` for act order.
    Every packed shape is checked against the layer's first."""
    keys = {}
    for suffix in packed.suffixes:
        key = _packed_key(source, prefix, suffix)
        if key is None:
            raise CheckpointError(
                f"{source.directory}: the {packed.method} layer {prefix!r} has no {suffix!r} tensor "
                f"({', '.join(packed.suffixes)} are all needed); the checkpoint is incomplete"
            )
        keys[suffix] = key
    tensors = {suffix: read(key) for suffix, key in keys.items()}
    K, N, G, per_word = layer.in_features, layer.out_features, layer.group_size, 32 // packed.bits
    expected = {"scales": (K // G, N), "qzeros": (K // G, N // per_word), "g_idx": (K,)}
    expected["qweight"] = (K // per_word, N) if packed.method == "gptq" else (K, N // per_word)
    for suffix, tensor in tensors.items():
        if tuple(tensor.shape) != expected[suffix] or N % per_word:
            raise CheckpointError(
                f"{source.directory}: {keys[suffix]} has shape {tuple(tensor.shape)}, but {packed.method} with "
                f"{packed.bits} bits in groups of {G} needs {expected[suffix]} for this layer's {K} inputs and "
                f"{N} outputs; the packed tensors and config.json disagree"
            )
    q, zeros, g_idx = unpack(packed, tensors, G)
    order = input_order(g_idx, K // G, f"{source.directory}: {keys.get('g_idx')}")
    if (order is not None) != (layer.input_order is not None):
        raise CheckpointError(f"{source.directory}: {keys['g_idx']} changed while it was read")
    rows = (q if order is None else q[order]).T.contiguous()  # (N, K), the inputs in group order
    if packed.bits == 8:
        yield f"{ours}.weight", (rows - zero_point_midpoint(8)).to(torch.int8)
    else:
        yield f"{ours}.weight", pack_nibbles(rows.to(torch.uint8))
    yield f"{ours}.scales_and_zeros", zero_point_pairs(tensors["scales"], zeros, packed.bits)
    if order is not None:
        yield f"{ours}.input_order", order


def unpack(
    packed: PackedFormat, tensors: dict[str, torch.Tensor], group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A packed layer's integers q (K, N), zero points z (groups, N) and each input's group (K,), from its
    tensors (shapes already checked)."""
    if packed.method == "gptq":
        q = _unpack_words(tensors["qweight"].T, packed.bits).T  # packed along the inputs
        zeros = _unpack_words(tensors["qzeros"], packed.bits)
        g_idx = tensors["g_idx"].long()
    else:
        reorder = torch.tensor(AWQ_ORDER).argsort()  # column c of a word is the nibble at reorder[c]
        q = _unpack_words(tensors["qweight"], packed.bits, reorder)
        zeros = _unpack_words(tensors["qzeros"], packed.bits, reorder)
        g_idx = torch.arange(q.shape[0]) // group_size
    return q, zeros + packed.zero_offset, g_idx


def _unpack_words(words: torch.Tensor, bits: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """(R, C) int32 words -> (R, C * 32 / bits) values, each word's lowest bits first (or in `order`)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    values = (words[..., None] >> shifts) & ((1 << bits) - 1)  # an arithmetic shift: the mask clears the sign
    if order is not None:
        values = values[..., order]
    return values.flatten(-2)


def input_order(g_idx: torch.Tensor, groups: int, origin: str) -> torch.Tensor | None:
    """None when each input's group is k // G; else the inputs sorted by group (act order), after checking
    that every group holds the same number of them."""
    size = g_idx.numel() // groups
    if torch.equal(g_idx, torch.arange(g_idx.numel()) // size):
        return None
    if not torch.equal(torch.bincount(g_idx, minlength=groups), torch.full((groups,), size)):
        raise CheckpointError(f"{origin}: the groups of g_idx are not all {size} inputs; the tensor is damaged")
    return torch.argsort(g_idx, stable=True)


# --- writing GPTQ and AWQ (convert to-hf of a model loaded from them or made by `plainlm quantize`) ---
def packed_tensors(
    method: str, weight: torch.Tensor, scales_and_zeros: torch.Tensor, order: torch.Tensor | None, where: str
) -> dict[str, torch.Tensor]:
    """A packed layer's saved tensors (int4's nibble rows (N, K/2) or int8 rows (N, K), float32 pairs, input
    order or None) as a GPTQ layer's (qweight, qzeros with the zero points as they are (v2), fp16 scales, g_idx)
    or, for "awq" (int4 only), an AWQ GEMM layer's (qweight, qzeros, scales): the same weights."""
    bits = 8 if weight.dtype == torch.int8 else 4
    midpoint = zero_point_midpoint(bits)
    q = (weight.long() + midpoint) if bits == 8 else unpack_nibbles(weight).long()  # (N, K), in group order
    if order is not None:
        q = torch.empty_like(q).index_copy_(1, order, q)
    scale, zero = scales_and_zeros.unbind(-1)
    zeros = midpoint - zero / scale
    if not (torch.equal(scale.half().float(), scale) and torch.equal(zeros, zeros.round())):
        raise CheckpointError(
            f"{where}: its scales are not fp16 with whole zero points, so {method} cannot hold them; write this "
            "model as a float checkpoint (convert from-hf --dtype) or quantize it with `plainlm quantize`"
        )
    if zeros.min() < 0 or zeros.max() >= 2**bits:
        raise CheckpointError(
            f"{where}: a zero point is {int(zeros.min())} or {int(zeros.max())}, outside the {bits}-bit range "
            f"0..{2**bits - 1} that {method}'s qzeros hold (a v1 checkpoint stores z - 1, so it can hold {2**bits}); "
            "write this model as a float checkpoint (convert from-hf --dtype)"
        )
    if method == "awq":  # packed along the outputs, in AWQ's order within each word
        return {
            "qweight": pack_words(q.T[..., _awq_columns(q.shape[0])], 4),
            "qzeros": pack_words(zeros.long()[..., _awq_columns(q.shape[0])], 4),
            "scales": scale.half(),
        }
    K, groups = q.shape[1], scale.shape[0]
    sorted_groups = torch.arange(K) // (K // groups)
    g_idx = sorted_groups if order is None else torch.empty_like(sorted_groups).index_copy_(0, order, sorted_groups)
    return {
        "qweight": pack_words(q, bits).T.contiguous(),  # (K / f, N): packed along the inputs
        "qzeros": pack_words(zeros.long(), bits),
        "scales": scale.half(),
        "g_idx": g_idx.to(torch.int32),
    }


def _awq_columns(outputs: int) -> torch.Tensor:
    """The column order that packs into AWQ's words: each eight in the order 0 2 4 6 1 3 5 7."""
    return (torch.arange(outputs).view(-1, 8)[:, list(AWQ_ORDER)]).flatten()


def pack_words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C) values -> (R, C * bits / 32) int32 words, lowest bits first: _unpack_words's inverse."""
    grouped = values.reshape(values.shape[0], -1, 32 // bits).long()
    words = (grouped << torch.arange(0, 32, bits)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, signed


def packed_config(quantization: dict, ordered: bool) -> dict:
    """The quantization_config of a GPTQ or AWQ directory written from a packed checkpoint's quantization.json
    (an AWQ one stays AWQ unless an input order asks for GPTQ's g_idx)."""
    bits = 8 if quantization["mode"] == "int8" else 4
    if quantization.get("packed") == "awq" and not ordered and bits == 4:
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": quantization["group_size"],
            "zero_point": True,
            "version": "gemm",
        }
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": quantization["group_size"],
        "desc_act": ordered,
        "sym": False,
        "checkpoint_format": "gptq_v2",
    }
