"""Weight-only quantization: small modules that take the place of Linear and Embedding layers.

    quantize_model(model, "int8")              # in place; norms and biases stay in float
    save_checkpoint(model, "out")              # writes the quantized tensors and quantization.json

int8  one scale per output row, symmetric: w = q * scale, q in -127..127.
      Forward: plainlm's own kernel (kernels/int8_matmul.cpp: int8 activations, AVX512-VNNI dot
      products), or where it cannot run PyTorch's `aten._weight_int8pack_mm` (bf16 activations).
      On a GPU: PyTorch's CUDA `_weight_int8pack_mm` for a few rows (a decode step reads the int8
      matrix once), a bf16 matmul over the matrix cast for the call for more (a prompt: compute-bound).
      An 8-bit GPTQ checkpoint's layers (GroupedInt8Linear, made by its loader and `plainlm quantize`,
      never by quantize_model) hold int8 in groups with float32 (scale, zero) pairs instead:
      w = q * scale + zero; plainlm's int8_group_matmul, or PyTorch's int8 kernel once per group.
int4  groups of `group_size` inputs (default 64), asymmetric: w = (q - 8) * scale + zero, q in 0..15,
      stored as two values per byte (low nibble first) and bf16 (scale, zero) pairs (float32 for a 4-bit
      GPTQ or AWQ checkpoint's).
      Forward: plainlm's own kernel (kernels/int4_matmul.cpp: int8 activations, AVX512-VNNI dot
      products). Where it cannot run (no VNNI, groups not a multiple of 16, rows not a multiple of
      16), `aten._weight_int4pack_mm_for_cpu` runs on a copy packed for it at load time. On a GPU,
      PyTorch's CUDA `_weight_int4pack_mm` (tinygemm: bf16 activations, groups of 32 to 256) runs on a
      copy packed for it likewise (`cuda_int4_operands`).
nf4   bitsandbytes' Linear4bit (NF4 blocks of 64, double-quantized scales): it also trains (QLoRA).
fp4   the same with bitsandbytes' FP4 values (a 4-bit float, 1 sign, 2 exponent and 1 mantissa bits)
      instead of NF4's normal quantiles.

plainlm's kernels read the same bytes in their own order, tiles of 16 rows (`tile_int8`,
`tile_nibbles`): an int8/int4 layer that runs them rearranges its matrix in place, and saves rows.

All three serve as QLoRA's frozen base: the integer kernels have no backward, so QuantizedMatmul
passes the input's gradient through the dequantized weight.

The token embedding is quantized too for int8/int4 and reads only the rows it gathers; a tied
lm_head shares the embedding's quantized matrix. Loading and saving checkpoints live in
`checkpoint.py`; this file only builds modules. A quantized model also gets kernel_layers.py's
attention and MLP (`use_cpu_kernels`), which run q, k and v (gate and up) in one kernel call.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from plainlm.errors import InvalidInput
from plainlm.kernel_layers import use_cpu_kernels
from plainlm.kernels import int4_kernel_fits, int8_kernel_fits, kernel_input
from plainlm.model import GPT

MODES = ("int8", "int4", "nf4", "fp4")
BITSANDBYTES_MODES = ("nf4", "fp4")  # bitsandbytes' Linear4bit, by its quant_type
DEFAULT_GROUP_SIZE = {"int8": None, "int4": 64, "nf4": 64, "fp4": 64}


# --- the math of what is stored ---
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values (N, K) and bf16 scales (N,), one per output row."""
    w = weight.detach().float()
    # The kernel reads bf16 scales: round them first, then quantize against the rounded value.
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).to(torch.bfloat16)
    q = (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[..., None]


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Portable nibbles (N, K/2) uint8 and bf16 scales_and_zeros (K/group_size, N, 2), the kernel's layout."""
    N, K = weight.shape
    groups = weight.detach().float().reshape(N, K // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-6).to(torch.bfloat16)
    zeros = (low + 8 * scales.float()).to(torch.bfloat16)  # w = (q - 8) * scale + zero spans [low, high]
    scale, zero = scales.float()[..., None], zeros.float()[..., None]
    q = ((groups - (zero - 8 * scale)) / scale).round().clamp(0, 15).to(torch.uint8).reshape(N, K)
    return pack_nibbles(q), torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous()


def zero_point_pairs(scales: torch.Tensor, zero_points: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """GPTQ's and AWQ's groups, w = scale * (q - z) with fp16 scales and whole zero points z (groups, N), as
    float32 (scale, zero) pairs (groups, N, 2) of the layers that store q less its midpoint c = 2^(bits - 1)
    (int4: q - 8 in 0..15's nibbles, w = (q - 8) * scale + zero; 8 bits: q - 128 as int8): zero = (c - z) * scale.
    An fp16 scale has 11 significant bits and c - z at most 9, so the product is exact in float32's 24, as is
    every weight the pair gives."""
    scale = scales.float()
    return torch.stack((scale, (zero_point_midpoint(bits) - zero_points).float() * scale), dim=-1)


def zero_point_midpoint(bits: int) -> int:
    """What a layer with zero points subtracts from its integers 0..2^bits - 1 to store them: 8 or 128."""
    return 1 << (bits - 1)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(..., K) values 0..15 -> (..., K/2) bytes, the even column in the low nibble."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def dequantize_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Float rows (..., K) from nibble rows (..., K/2) and their scales_and_zeros (K/group_size, ..., 2)."""
    return dequantize_groups(unpack_nibbles(packed).float() - 8, scales_and_zeros, group_size)


def dequantize_groups(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Float rows (..., K) = q * scale + zero from stored integers q (..., K) as floats (int4's less 8) and
    their groups' pairs scales_and_zeros (K/group_size, ..., 2)."""
    q = q.reshape(*q.shape[:-1], -1, group_size)  # (..., groups, group_size)
    sz = scales_and_zeros.float().movedim(0, -2)  # (..., groups, 2)
    return (q * sz[..., :1] + sz[..., 1:]).flatten(-2)


# --- the kernels' order of the same bytes ---
# plainlm's kernels read a matrix as tiles of 16 rows, one row's four weights per 32-bit lane (see
# kernels/int4_matmul.cpp). A layer that runs them holds its matrix that way (3-D); everything else
# (checkpoints, state dicts, dequantization, PyTorch's kernels) sees the row order (2-D).
def tile_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 rows (N, K) -> tiles (N/16, K/4, 64): byte 4r + i of tile (b, j) is row 16b + r, input 4j + i."""
    N, K = q.shape
    return q.reshape(N // 16, 16, K // 4, 4).transpose(1, 2).reshape(N // 16, K // 4, 64)


def tile_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Nibble rows (N, K/2) -> tiles (N/16, K/8, 64): byte 4r + i of tile (b, j) holds row 16b + r's
    input 8j + i in its low nibble and input 8j + 4 + i in its high one."""
    q = unpack_nibbles(packed)
    N, K = q.shape
    q = q.reshape(N // 16, 16, K // 8, 2, 4).permute(0, 2, 1, 4, 3)  # (block, j, row, i, low/high)
    return (q[..., 0] | (q[..., 1] << 4)).reshape(N // 16, K // 8, 64)


def tile_rows(tiles: torch.Tensor, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
    """Rows of a tiled matrix (any index shape), back in the row order: int8 (..., K) or nibbles (..., K/2)."""
    if not isinstance(rows, torch.Tensor):
        rows = torch.arange(tiles.shape[0] * 16, device=tiles.device)[rows]
    lanes = tiles.view(tiles.shape[0], tiles.shape[1], 16, 4)[rows // 16, :, rows % 16]  # (..., K/4 or K/8, 4)
    if tiles.dtype == torch.int8:
        return lanes.flatten(-2)
    return pack_nibbles(torch.cat((lanes & 15, lanes >> 4), dim=-1).flatten(-2))


def row_order(weight: torch.Tensor) -> torch.Tensor:
    """A quantized matrix in the row order, whether or not a layer tiled it for plainlm's kernel."""
    return tile_rows(weight) if weight.dim() == 3 else weight


def set_tiled(weight: torch.Tensor, tiled: bool) -> None:
    """Lay a quantized matrix out as tiles or as rows, in place (Tensor.set_): a tied embedding holds the
    head's very tensor, so it sees the change, and memory holds one copy."""
    if (weight.dim() == 3) != tiled:
        tiles = tile_int8 if weight.dtype == torch.int8 else tile_nibbles
        weight.set_(tiles(weight) if tiled else tile_rows(weight))


# --- PyTorch's CUDA int4 kernel (tinygemm) ---
CUDA_INT4_GROUP_SIZES = (32, 64, 128, 256)
CUDA_INT8_KERNEL_ROWS = 16  # up to this many rows (decode steps) int8 runs PyTorch's CUDA kernel; more, a matmul


def cuda_int4_operands(
    rows: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What `aten._convert_weight_to_int4pack` and `aten._weight_int4pack_mm` on CUDA take for nibble rows
    (N, K/2) and their pairs (K/group_size, N, 2): the nibbles with the even input in the HIGH nibble (the
    opposite of ours), outputs padded with zero rows to a multiple of 8, bf16 pairs padded alike, and the
    inner k-tiles (2, 4 or 8) that the inputs allow. Refuses what the kernel cannot run."""
    N, K = rows.shape[0], rows.shape[1] * 2
    if group_size not in CUDA_INT4_GROUP_SIZES or K % 32:
        raise InvalidInput(
            f"int4 on CUDA runs PyTorch's kernel, which takes groups of {'/'.join(map(str, CUDA_INT4_GROUP_SIZES))} "
            f"inputs and a multiple of 32 inputs; this layer has groups of {group_size} and {K} inputs: "
            "quantize with one of those group sizes, or use nf4 on the GPU"
        )
    inner_k_tiles = next(t for t in (8, 4, 2) if K % (16 * t) == 0)
    pad = -N % 8
    swapped = (rows >> 4) | ((rows & 15) << 4)
    nibbles = nn.functional.pad(swapped, (0, 0, 0, pad)).contiguous()
    pairs = nn.functional.pad(scales_and_zeros.to(torch.bfloat16), (0, 0, 0, pad)).contiguous()
    return nibbles, pairs, inner_k_tiles


class TiledWeight(nn.Module):
    """What the int8/int4 layers share: `weight` may be tiled in memory, and is rows everywhere else."""

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not keep_vars:  # keep_vars asks for the tensors themselves (weight_bytes counts them)
            destination[prefix + "weight"] = row_order(self.weight)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        tiled = self.weight.dim() == 3 and prefix + "weight" in state_dict
        set_tiled(self.weight, False)  # the saved rows go in as rows, then take the order they had
        super()._load_from_state_dict(state_dict, prefix, *args)
        set_tiled(self.weight, tiled)


# --- modules ---
class QuantizedMatmul(torch.autograd.Function):
    """x @ W^T through a layer's integer kernel, with a backward (the kernels have none): the input's gradient
    goes through the dequantized weight. The weight itself is frozen, as in QLoRA, so it gets no gradient."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.dequantized_weight().to(grad.dtype), None


def quantized_matmul(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return QuantizedMatmul.apply(x, layer)
    return layer.matmul(x)


class QuantizedLinear(TiledWeight):
    """What Int8Linear, Int4Linear and GroupedInt8Linear share: y = x @ W^T + bias through one of two CPU
    kernels, plainlm's own ("plainlm", on `weight` tiled by pack()) where it fits, PyTorch's ("aten") elsewhere,
    or on a GPU through PyTorch's CUDA kernels ("cuda"); an optional input order (GPTQ's act order), gathered
    once a call.

    Each subclass holds its quantized tensors and defines what differs: `kernel_fits()` (whether plainlm's
    kernel takes this layer), `matmul_plainlm(x2)`, `matmul_aten(x2)` and `matmul_cuda(x2)` (the kernel on a
    (M, K) input, returning (M, out_features)) and `dequantized_weight()`."""

    mode: str  # "int8" or "int4", for messages

    def __init__(
        self, in_features: int, out_features: int, bias: bool, device: torch.device | None, ordered_inputs: bool = False
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        self.kernel: str | None = None  # "plainlm", "aten" or "cuda", chosen by pack()
        # The inputs in the order the stored matrix reads them (a GPTQ act-order checkpoint's groups are not
        # contiguous: its loader sorts the inputs by group once), or None for their own order.
        order = torch.empty(in_features, dtype=torch.int64, device=device) if ordered_inputs else None
        self.register_buffer("input_order", order)

    def pack(self, kernel: str | None = None) -> None:
        """Choose the kernel ("plainlm" or "aten" on the CPU, default plainlm's where it fits; "cuda" on a GPU)
        and lay `weight` out for it."""
        on_gpu = self.weight.device.type == "cuda"
        fits = not on_gpu and self.kernel_fits()
        if kernel == "plainlm" and not fits:
            raise InvalidInput(f"plainlm's {self.mode} kernel cannot run this layer or this CPU: {self!r}")
        self.kernel = kernel or ("cuda" if on_gpu else "plainlm" if fits else "aten")
        set_tiled(self.weight, self.kernel == "plainlm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quantized_matmul(x, self)
        return y if self.bias is None else y + self.bias

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T, without the bias and without a backward (see QuantizedMatmul)."""
        if self.kernel is None or (self.kernel == "cuda") != (self.weight.device.type == "cuda"):
            self.pack()  # the first call, or the layer moved between the CPU and a GPU since it packed
        if self.input_order is not None:
            x = x.index_select(-1, self.input_order)
        if self.kernel == "plainlm":
            y = self.matmul_plainlm(kernel_input(x, self.in_features))
        elif self.kernel == "cuda":
            y = self.matmul_cuda(x.reshape(-1, self.in_features))
        else:  # PyTorch's kernels read bf16 activations (int8's fp32 path is ~8x slower)
            y = self.matmul_aten(x.reshape(-1, self.in_features).to(torch.bfloat16))
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def in_input_order(self, stored: torch.Tensor) -> torch.Tensor:
        """A dequantized matrix (N, K) whose columns are in the stored order, in the inputs' own order."""
        if self.input_order is None:
            return stored
        return torch.empty_like(stored).index_copy_(1, self.input_order, stored)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def check_groups(bits: int, in_features: int, group_size: int) -> None:
    if group_size < 1 or in_features % group_size:
        raise InvalidInput(
            f"int{bits} groups of {group_size} do not divide this layer's {in_features} inputs; "
            f"pass a group_size that does (32 and 64 divide most models)"
        )


class Int8Linear(QuantizedLinear):
    """int8 weights, one bf16 scale per output row: w = q * scale. plainlm's kernel
    (kernels/int8_matmul.cpp) needs AVX512-VNNI, rows a multiple of 16 and inputs of 64;
    PyTorch's `aten._weight_int8pack_mm` reads the rows as saved."""

    mode = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool, device: torch.device | None = None) -> None:
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16, device=device))

    def kernel_fits(self) -> bool:
        return int8_kernel_fits(self.out_features, self.in_features)

    def matmul_plainlm(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.plainlm.int8_matmul(x2, self.weight, self.scales)

    def matmul_aten(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)

    def matmul_cuda(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.shape[0] <= CUDA_INT8_KERNEL_ROWS:  # PyTorch's CUDA kernel reads float32 inputs and scales
            return torch.ops.aten._weight_int8pack_mm(x2.float(), self.weight, self.scales.float())
        dtype = torch.bfloat16 if x2.dtype == torch.float32 else x2.dtype
        return nn.functional.linear(x2.to(dtype), self.weight.to(dtype)) * self.scales.to(dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int8(row_order(self.weight), self.scales)


class Int4Linear(QuantizedLinear):
    """int4 weights in groups of `group_size` inputs.

    `weight` (nibble rows) and `scales_and_zeros` are what is saved: bf16 pairs for plainlm's own int4,
    float32 (`pairs_dtype`) for a GPTQ or AWQ checkpoint's, which hold its fp16 scales and zero points
    exactly (convert/hf_quantized.py); with `ordered_inputs`, also `input_order`. plainlm's own kernel
    (plainlm/kernels/int4_matmul.cpp) reads `weight` tiled in place by `pack()`; it needs AVX512-VNNI,
    groups of a multiple of 16 and a multiple of 16 output rows. Otherwise PyTorch's kernel runs on
    `packed`, its own layout for this CPU, made by `pack()` and never saved; it needs a multiple of 16
    output rows too, so other layers are padded with zero rows in the packed copy only.
    """

    mode = "int4"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        group_size: int,
        device: torch.device | None = None,
        pairs_dtype: torch.dtype = torch.bfloat16,
        ordered_inputs: bool = False,
    ) -> None:
        check_groups(4, in_features, group_size)
        super().__init__(in_features, out_features, bias, device, ordered_inputs)
        self.group_size = group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        groups = in_features // group_size
        self.register_buffer("scales_and_zeros", torch.empty(groups, out_features, 2, dtype=pairs_dtype, device=device))
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("packed_scales_and_zeros", None, persistent=False)

    def pack(self, kernel: str | None = None) -> None:
        """As QuantizedLinear.pack; for PyTorch's kernels, also make their packed copy."""
        self.packed = self.packed_scales_and_zeros = None
        super().pack(kernel)
        if self.kernel == "plainlm":
            return
        if self.kernel == "cuda":
            nibbles, self.packed_scales_and_zeros, inner_k_tiles = cuda_int4_operands(
                self.weight, self.scales_and_zeros, self.group_size
            )
            self.packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, inner_k_tiles)
            return
        pad = -self.out_features % 16
        q = unpack_nibbles(self.weight).to(torch.int32)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nn.functional.pad(q, (0, 0, 0, pad)), 8)
        sz = self.scales_and_zeros.to(torch.bfloat16)  # PyTorch's kernel reads bf16 pairs only
        if pad or sz is not self.scales_and_zeros:
            self.packed_scales_and_zeros = nn.functional.pad(sz, (0, 0, 0, pad))

    def kernel_fits(self) -> bool:
        return int4_kernel_fits(self.out_features, self.in_features, self.group_size)

    def matmul_plainlm(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.plainlm.int4_matmul(x2, self.weight, self.scales_and_zeros, self.group_size)

    def matmul_aten(self, x2: torch.Tensor) -> torch.Tensor:
        sz = self.scales_and_zeros if self.packed_scales_and_zeros is None else self.packed_scales_and_zeros
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, sz)
        return y[:, : self.out_features]  # without the padding rows

    def matmul_cuda(self, x2: torch.Tensor) -> torch.Tensor:
        x2 = x2.to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.packed_scales_and_zeros)
        return y[:, : self.out_features]

    def dequantized_weight(self) -> torch.Tensor:
        return self.in_input_order(dequantize_int4(row_order(self.weight), self.scales_and_zeros, self.group_size))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class GroupedInt8Linear(QuantizedLinear):
    """int8 weights in groups of `group_size` inputs with float32 (scale, zero) pairs: w = q * scale + zero,
    q in -128..127. An 8-bit GPTQ checkpoint's layer (convert/hf_quantized.py, gptq.py): its integers 0..255
    less 128, and its fp16 scales and whole zero points z as zero = (128 - z) * scale, both exact in float32
    (zero_point_pairs); with `ordered_inputs`, also `input_order`, as Int4Linear's.

    `weight` (int8 rows) and `scales_and_zeros` are what is saved. plainlm's kernel (int8_group_matmul in
    plainlm/kernels/int8_matmul.cpp) reads `weight` tiled in place by `pack()`; it needs AVX512-VNNI, groups
    of a multiple of 16 and a multiple of 16 output rows. Elsewhere, and on a GPU, PyTorch's int8 kernel runs
    once per group, on `packed`: the weight's groups one after another, (groups, N, group_size) int8, made by
    `pack()` and never saved (the rows themselves when one group spans them). Each group's integer product
    (bf16 activations on the CPU, float32 on a GPU, as PyTorch's kernels read them) is scaled and its zero
    term added in float32, so no call makes a float copy of the weights.
    """

    mode = "int8"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        group_size: int,
        device: torch.device | None = None,
        ordered_inputs: bool = False,
    ) -> None:
        check_groups(8, in_features, group_size)
        super().__init__(in_features, out_features, bias, device, ordered_inputs)
        self.group_size = group_size
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        groups = in_features // group_size
        self.register_buffer(
            "scales_and_zeros", torch.empty(groups, out_features, 2, dtype=torch.float32, device=device)
        )
        self.register_buffer("packed", None, persistent=False)

    def pack(self, kernel: str | None = None) -> None:
        """As QuantizedLinear.pack; for PyTorch's kernel, also lay the groups out one after another."""
        self.packed = None
        super().pack(kernel)
        if self.kernel in ("aten", "cuda"):  # one group a row: a view of the rows, no copy
            groups = self.in_features // self.group_size
            self.packed = self.weight.view(self.out_features, groups, self.group_size).transpose(0, 1).contiguous()

    def kernel_fits(self) -> bool:
        return int8_kernel_fits(self.out_features, self.in_features, self.group_size)

    def matmul_plainlm(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.plainlm.int8_group_matmul(x2, self.weight, self.scales_and_zeros, self.group_size)

    def matmul_aten(self, x2: torch.Tensor) -> torch.Tensor:
        groups = self.packed.shape[0]
        x_groups = x2.view(x2.shape[0], groups, self.group_size).transpose(0, 1).contiguous()  # (groups, M, G)
        scale, zero = self.scales_and_zeros.unbind(-1)  # (groups, N) each
        y = x_groups.float().sum(-1).T @ zero  # the zero points' term: each group's inputs summed, (M, N)
        ones = torch.ones(self.out_features, dtype=x2.dtype, device=x2.device)  # the scales come after, in fp32
        for g in range(groups):
            y += torch.ops.aten._weight_int8pack_mm(x_groups[g], self.packed[g], ones).float() * scale[g]
        return y

    def matmul_cuda(self, x2: torch.Tensor) -> torch.Tensor:
        return self.matmul_aten(x2.float())  # PyTorch's CUDA int8 kernel reads float32 inputs and scales

    def dequantized_weight(self) -> torch.Tensor:
        stored = dequantize_groups(row_order(self.weight).float(), self.scales_and_zeros, self.group_size)
        return self.in_input_order(stored)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def zero_point_linear(
    bits: int, in_features: int, out_features: int, bias: bool, group_size: int, ordered_inputs: bool
) -> Int4Linear | GroupedInt8Linear:
    """An empty (meta device) layer for a GPTQ or AWQ checkpoint's `bits`-bit groups with zero points: int4 or
    int8 integers, float32 (scale, zero) pairs (zero_point_pairs), an input order with act order."""
    if bits == 8:
        return GroupedInt8Linear(in_features, out_features, bias, group_size, "meta", ordered_inputs)
    return Int4Linear(in_features, out_features, bias, group_size, "meta", torch.float32, ordered_inputs)


class Int8Embedding(TiledWeight):
    """Token embeddings stored as int8 rows with one scale each; a lookup dequantizes only its rows.
    Tied, `weight` is the lm_head's tensor, tiled when the head runs plainlm's kernel."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype, device: torch.device | None = None):
        super().__init__()
        self.dtype = dtype  # the activations' dtype (the table itself holds integers)
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=torch.bfloat16, device=device))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = tile_rows(self.weight, idx) if self.weight.dim() == 3 else self.weight[idx]
        return dequantize_int8(rows, self.scales[idx]).to(self.dtype)


class Int4Embedding(TiledWeight):
    """Token embeddings stored as int4 groups; a lookup dequantizes only its rows.
    Tied, `weight` is the lm_head's tensor, tiled when the head runs plainlm's kernel."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        group_size: int,
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.dtype, self.group_size = dtype, group_size
        self.register_buffer(
            "weight", torch.empty(num_embeddings, embedding_dim // 2, dtype=torch.uint8, device=device)
        )
        groups = embedding_dim // group_size
        self.register_buffer(
            "scales_and_zeros", torch.empty(groups, num_embeddings, 2, dtype=torch.bfloat16, device=device)
        )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        nibbles = tile_rows(self.weight, idx) if self.weight.dim() == 3 else self.weight[idx]
        rows = dequantize_int4(nibbles, self.scales_and_zeros[:, idx], self.group_size)
        return rows.to(self.dtype)


def nf4_linear(linear: nn.Linear, blocksize: int, quant_type: str = "nf4") -> nn.Module:
    """A bitsandbytes Linear4bit holding `linear`'s weights in NF4 or FP4 (`quant_type`; double-quantized
    scales, as QLoRA)."""
    bnb = _bitsandbytes()
    weight = linear.weight.detach()
    packed, state = bnb.functional.quantize_4bit(
        weight.contiguous(), blocksize=blocksize, compress_statistics=True, quant_type=quant_type
    )
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, quant_type=quant_type, device="meta"
    )
    layer.weight = bnb.nn.Params4bit(
        packed, quant_state=state, blocksize=blocksize, quant_type=quant_type, bnb_quantized=True, module=layer
    )
    layer.quant_state = state
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return _without_cpu_repacking(layer)


def nf4_from_tensors(tensors: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A Linear4bit from its saved tensors (`weight`, `weight.absmax`, ..., optional `bias`)."""
    bnb = _bitsandbytes()
    stats = {k.removeprefix("weight."): v for k, v in tensors.items() if k.startswith("weight.")}
    weight = bnb.nn.Params4bit.from_prequantized(tensors["weight"], stats, device=device)
    out_features, in_features = weight.quant_state.shape
    quant_type = weight.quant_state.quant_type  # nf4 or fp4, as saved
    layer = bnb.nn.Linear4bit(in_features, out_features, bias="bias" in tensors, quant_type=quant_type, device="meta")
    layer.weight, layer.quant_state = weight, weight.quant_state
    weight.module = layer
    if "bias" in tensors:
        layer.bias = nn.Parameter(tensors["bias"].to(device), requires_grad=False)
    return _without_cpu_repacking(layer)


def _without_cpu_repacking(layer: nn.Module) -> nn.Module:
    # bitsandbytes 0.50 repacks 4-bit weights in place on the first no-grad CPU forward, and its
    # inverse (run when saving) returns other scales than were stored: off, so save/load stays exact.
    layer.support_avx512bf16_for_cpu = False
    return layer


def _bitsandbytes():  # noqa: ANN202 (imported on use: an optional dependency)
    try:
        # on use: bitsandbytes is optional, for nf4 and fp4 only
        import bitsandbytes
    except ImportError:
        raise ImportError("nf4 and fp4 need bitsandbytes: pip install 'plainlm[quantize]'") from None
    return bitsandbytes


# --- whole models ---
def quantized_linear_names(model: GPT, mode: str) -> list[str]:
    """The Linear layers a mode replaces: every one in the blocks, and an untied (or int8/int4) lm_head."""
    names = [
        f"blocks.{name}"
        for name, module in model.blocks.named_modules()
        # The MoE router stays in float: it is tiny, and its top-k choice is what rounding would flip.
        if isinstance(module, nn.Linear) and not name.endswith("router")
    ]
    # nf4/fp4 keep a tied head in float, tied: bitsandbytes has no 4-bit embedding that saves,
    # and QLoRA leaves the head in float anyway.
    if not (mode in BITSANDBYTES_MODES and model.config.tie_embeddings):
        names.append("lm_head")
    return names


def quantize_model(model: GPT, mode: str, group_size: int | None = None, device: torch.device | None = None) -> GPT:
    """Quantize `model`'s weights in place, one layer at a time, and return it.

    mode: "int8", "int4", "nf4" or "fp4". group_size: int4's group (default 64) or nf4/fp4's block (64).
    device: quantize each layer there, where it then stays (a float model on the CPU on its way to a GPU that
    could not hold it whole); default: where the model is.
    """
    device = device or model.embed.weight.device
    group_size = check_mode(mode, group_size, device)
    with torch.no_grad():
        for name in quantized_linear_names(model, mode):
            linear = model.get_submodule(name).to(device)
            set_module(model, name, _quantize_linear(linear, mode, group_size).train(linear.training))
        if mode not in BITSANDBYTES_MODES:
            model.embed = _quantize_embedding(model, mode, group_size)
    model.quantization = {"mode": mode, "group_size": group_size}
    # q/k/v and gate/up in one kernel call each, for a model that stays on the CPU
    return use_cpu_kernels(model) if device.type == "cpu" else model


def check_mode(mode: str, group_size: int | None, device: torch.device) -> int | None:
    """The group size to use, or an error for an unknown mode or a device without kernels."""
    if mode not in MODES:
        raise InvalidInput(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    if mode in ("int8", "int4") and device.type not in ("cpu", "cuda", "meta"):
        raise NotImplementedError(
            f"{mode} runs on the CPU (plainlm's or PyTorch's kernels) and on CUDA (PyTorch's); not on "
            f"{device.type}: use nf4 there, or the CPU"
        )
    return group_size or DEFAULT_GROUP_SIZE[mode]


def _quantize_linear(linear: nn.Linear, mode: str, group_size: int | None) -> nn.Module:
    if mode in BITSANDBYTES_MODES:
        return nf4_linear(linear, group_size, quant_type=mode)
    layer = _empty_linear(linear, mode, group_size)
    if mode == "int8":
        layer.weight, layer.scales = quantize_int8(linear.weight)
    else:
        layer.weight, layer.scales_and_zeros = quantize_int4(linear.weight, group_size)
    layer.pack()
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer


def _quantize_embedding(model: GPT, mode: str, group_size: int | None) -> nn.Module:
    """The embedding in the mode's format; a tied one shares the quantized head's tensors (one matrix)."""
    weight, head = model.embed.weight, model.lm_head
    embed = _empty_embedding(*weight.shape, mode, group_size, weight.dtype)
    tied = model.config.tie_embeddings
    if mode == "int8":
        embed.weight, embed.scales = (head.weight, head.scales) if tied else quantize_int8(weight)
    else:
        embed.weight, embed.scales_and_zeros = (
            (head.weight, head.scales_and_zeros) if tied else quantize_int4(weight, group_size)
        )
    return embed


def _empty_linear(linear: nn.Linear, mode: str, group_size: int | None) -> nn.Module:
    bias = linear.bias is not None
    if mode == "int8":
        return Int8Linear(linear.in_features, linear.out_features, bias, device="meta")
    return Int4Linear(linear.in_features, linear.out_features, bias, group_size, device="meta")


def _empty_embedding(vocab: int, dim: int, mode: str, group_size: int | None, dtype: torch.dtype) -> nn.Module:
    if mode == "int8":
        return Int8Embedding(vocab, dim, dtype, device="meta")
    return Int4Embedding(vocab, dim, group_size, dtype, device="meta")


def empty_quantized_model(model: GPT, mode: str, group_size: int | None, dtype: torch.dtype) -> GPT:
    """Swap a meta-device model's layers for empty quantized ones, ready to receive saved tensors.

    nf4 layers become placeholders: `nf4_from_tensors` builds them, since their saved shapes are
    known only from the saved tensors.
    """
    group_size = check_mode(mode, group_size, torch.device("meta"))
    for name in quantized_linear_names(model, mode):
        linear = model.get_submodule(name)
        bnb = mode in BITSANDBYTES_MODES
        set_module(model, name, nn.Identity() if bnb else _empty_linear(linear, mode, group_size))
    if mode not in BITSANDBYTES_MODES:
        model.embed = _empty_embedding(*model.embed.weight.shape, mode, group_size, dtype)
    model.quantization = {"mode": mode, "group_size": group_size}
    return model


def empty_packed_model(model: GPT, shapes: dict[str, tuple[int, ...]], quantization: dict) -> GPT:
    """Swap a meta-device model's Linears for the empty int4 or int8 layers (quantization's mode) that a GPTQ
    or AWQ checkpoint's saved tensors (their `shapes`, by name) describe: float32 pairs, an input order where
    one was saved. The other layers, the embedding among them, stay in float, as the checkpoint's tools left
    them."""
    bits = 8 if quantization["mode"] == "int8" else 4
    for key, shape in shapes.items():
        if key.endswith(".scales_and_zeros"):
            name = key.removesuffix(".scales_and_zeros")
            linear = model.get_submodule(name)
            K, N, groups = linear.in_features, linear.out_features, shape[0]
            ordered = f"{name}.input_order" in shapes
            set_module(model, name, zero_point_linear(bits, K, N, linear.bias is not None, K // groups, ordered))
    model.quantization = quantization
    return model


def finish_loading(model: GPT) -> GPT:
    """After the saved tensors are in: choose each int8/int4 layer's kernel and pack for it, let layers with
    equal input orders share one tensor, and swap in the modules that call several layers' kernels at once,
    as quantize_model does."""
    orders: dict[bytes, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.pack()
            if module.input_order is not None:  # GPTQ's q, k and v share it: then they run in one kernel call
                key = module.input_order.cpu().numpy().tobytes()
                module.input_order = orders.setdefault(key, module.input_order)
    return use_cpu_kernels(model)


def dequantize_model(model: GPT, dtype: torch.dtype = torch.float32) -> GPT:
    """Every int8/int4 layer of `model` (and a quantized embedding) back to a float nn.Linear (nn.Embedding)
    of `dtype` holding its dequantized weights, in place; returns it. What `convert --dtype` writes for a
    quantized checkpoint, and the float path its tests compare with references."""
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantizedLinear):
                linear = nn.Linear(
                    module.in_features, module.out_features, module.bias is not None, dtype=dtype,
                    device=module.weight.device,
                )  # fmt: skip
                linear.weight.copy_(module.dequantized_weight())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
                set_module(model, name, linear.requires_grad_(False).train(module.training))
        if isinstance(model.embed, (Int8Embedding, Int4Embedding)):
            rows = model.embed(torch.arange(model.config.vocab_size, device=model.embed.weight.device))
            model.embed = nn.Embedding.from_pretrained(rows.to(dtype), freeze=True)
        if model.config.tie_embeddings:
            model.lm_head.weight = model.embed.weight
    model.quantization = None
    return use_cpu_kernels(model)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights held in memory: the saved tensors plus the copies packed for PyTorch's kernels;
    shared ones count once."""
    tensors = list(model.state_dict(keep_vars=True).values())  # the tensors themselves: tied ones are one object
    for module in model.modules():
        if isinstance(module, Int4Linear):
            tensors += [t for t in (module.packed, module.packed_scales_and_zeros) if t is not None]
        grouped = isinstance(module, GroupedInt8Linear) and module.packed is not None
        if grouped and module.packed.untyped_storage().data_ptr() != module.weight.untyped_storage().data_ptr():
            tensors.append(module.packed)  # (a view of the rows, one group a row, is no copy)
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
