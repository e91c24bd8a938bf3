"""MXFP4 checkpoints of the Hugging Face hub (gpt-oss), dequantized as they are read.

A config.json whose `quantization_config` has `quant_method` "mxfp4" stores some 3-D weights `P` (gpt-oss's
experts: gate_up_proj and down_proj) as two tensors instead:
    P_blocks  (E, N, K / 32, 16) uint8   32 fp4 (e2m1) values a block, two a byte, the low nibble first
    P_scales  (E, N, K / 32) uint8       each block's e8m0 exponent, biased by 127: the block is scaled by 2^(s - 127)
for a weight of N outputs and K inputs per expert. `Mxfp4Source` shows each pair as the float tensor `P` in
transformers' layout (E, K, N), so the family's weight rules (hf_weights.py) apply unchanged. Every fp4 value
times a power of two is exact in bfloat16 (bar overflow), so the weights are the checkpoint's, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from plainlm.checkpoint import TensorSource
from plainlm.errors import CheckpointError

# The 16 values of an e2m1 nibble: sign bit, two exponent bits, one mantissa bit.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, where: str = "MXFP4"
) -> torch.Tensor:
    """blocks (E, N, G, 16) uint8 and scales (E, N, G) uint8 -> the weight (E, G * 32, N) in `dtype`: transformers'
    layout for gpt-oss's experts (inputs before outputs). One expert at a time, to bound the temporaries."""
    check_pair(tuple(blocks.shape), tuple(scales.shape), where)
    values = torch.tensor(FP4_VALUES, dtype=torch.float32)
    E, N, G, B = blocks.shape
    out = torch.empty(E, G * B * 2, N, dtype=dtype)
    for expert in range(E):
        nibbles = torch.stack((blocks[expert] & 0x0F, blocks[expert] >> 4), dim=-1).long()  # (N, G, B, 2)
        exponents = scales[expert].int()[..., None] - 127  # (N, G, 1)
        weight = torch.ldexp(values[nibbles].view(N, G, B * 2), exponents)  # exact: fp4 times a power of two
        out[expert] = weight.view(N, G * B * 2).T.to(dtype)
    return out


def check_pair(blocks: tuple[int, ...], scales: tuple[int, ...], where: str) -> None:
    if len(blocks) != 4 or blocks[-1] != 16 or blocks[:-1] != scales:
        raise CheckpointError(
            f"{where}: blocks of shape {blocks} and scales of shape {scales} do not pair up as MXFP4's "
            "(E, N, K / 32, 16) and (E, N, K / 32); the checkpoint is damaged"
        )


class Mxfp4Source(TensorSource):
    """A checkpoint's tensors with each `P_blocks` + `P_scales` pair shown as one float tensor `P`, dequantized
    when it is read, to `dtype` (default bfloat16, the dtype of gpt-oss's other weights)."""

    def __init__(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        super().__init__(directory)
        self.dtype = dtype or torch.bfloat16
        stored = super().keys()
        self.packed = {k.removesuffix("_blocks") for k in stored if k.endswith("_blocks")}
        self.packed = {name for name in self.packed if f"{name}_scales" in stored}

    def keys(self) -> list[str]:
        hidden = {f"{name}_{part}" for name in self.packed for part in ("blocks", "scales")}
        return [k for k in super().keys() if k not in hidden] + sorted(self.packed)

    def __contains__(self, key: str) -> bool:
        return key in self.packed or super().__contains__(key)

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.packed:
            return super().shape(key)
        blocks, scales = super().shape(f"{key}_blocks"), super().shape(f"{key}_scales")
        check_pair(blocks, scales, f"{self.directory}: {key}")
        E, N, G, B = blocks
        return (E, G * B * 2, N)

    def meta(self, key: str) -> torch.Tensor:
        return torch.empty(self.shape(key), device="meta", dtype=self.dtype if key in self.packed else None)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.packed:
            return super().get(key)
        blocks, scales = super().get(f"{key}_blocks"), super().get(f"{key}_scales")
        return dequantize_mxfp4(blocks, scales, self.dtype, f"{self.directory}: {key}")
