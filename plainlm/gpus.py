"""The common training GPUs: memory, dense bf16 peak and memory bandwidth, by a short name.

    gpu_spec("a100-80gb").memory_bytes                  # what `plainlm estimate --target a100-80gb` plans with
    spec_for_device_name(torch.cuda.get_device_name())  # the card this process runs on, or None

The figures are the vendors' datasheets and architecture whitepapers (NVIDIA, AMD), with two choices:
- bf16_flops is the dense tensor-core peak with fp32 accumulation, the way PyTorch's bf16 matmuls run.
  Datasheets print the 2:4 sparse figure, twice as high, as the headline; GeForce cards accumulate in
  fp32 at half their fp16-accumulate rate, and the figure here is that half.
- memory_bytes is the total the driver reports (nvidia-smi's FB total in MiB, rocm-smi's VRAM total),
  which is a little under the datasheet's round GB on cards with ECC or reserved memory: it is what a
  run can have. A run also spends some of it on the CUDA context, which the memory plan counts itself.
The SXM (HGX) part is the default where a card comes in several forms. Nothing here talks to a GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from plainlm.errors import InvalidInput

MiB, TB = 1024**2, 1e12


@dataclass(frozen=True)
class GPUSpec:
    """One card: what `--target` plans with and what MFU is measured against."""

    name: str  # the --target name
    product: str  # as the vendor names it
    memory_bytes: int  # the total the driver reports
    bf16_flops: float  # dense bf16 tensor peak, FLOP/s
    memory_bandwidth: float  # bytes/s
    device_name: str  # a regular expression that torch.cuda.get_device_name() matches whole for this card


GPUS: dict[str, GPUSpec] = {
    spec.name: spec
    for spec in [
        # GA102 whitepaper: 71 TFLOPS bf16 with fp32 accumulate; 24 GB GDDR6X
        GPUSpec("rtx-3090", "NVIDIA GeForce RTX 3090", 24576 * MiB, 71e12, 936e9, r"NVIDIA GeForce RTX 3090"),
        # Ada whitepaper: 165.2 TFLOPS bf16 with fp32 accumulate; 24 GB GDDR6X
        GPUSpec("rtx-4090", "NVIDIA GeForce RTX 4090", 24564 * MiB, 165.2e12, 1008e9, r"NVIDIA GeForce RTX 4090"),
        # 242 TFLOPS bf16 with sparsity; 24 GB GDDR6 with ECC
        GPUSpec("l4", "NVIDIA L4", 23034 * MiB, 121e12, 300e9, r"NVIDIA L4"),
        # AWS's variant of the A10 (G5 instances): NVIDIA publishes no datasheet for it; 70 TFLOPS is the
        # figure AWS and its users quote (the A10's datasheet says 125). 24 GB GDDR6 with ECC.
        GPUSpec("a10g", "NVIDIA A10G", 23028 * MiB, 70e12, 600e9, r"NVIDIA A10G"),
        # 362.05 TFLOPS bf16 dense (733 sparse); 48 GB GDDR6 with ECC
        GPUSpec("l40s", "NVIDIA L40S", 46068 * MiB, 362.05e12, 864e9, r"NVIDIA L40S"),
        # 312 TFLOPS bf16 dense (624 sparse); 40 GB HBM2, 1555 GB/s
        GPUSpec("a100-40gb", "NVIDIA A100 40GB", 40960 * MiB, 312e12, 1555e9, r"NVIDIA A100-(SXM4|PCIE)-40GB"),
        # 80 GB HBM2e: 2039 GB/s on SXM4 (the PCIe card: 1935 GB/s, the same peak and memory)
        GPUSpec("a100-80gb", "NVIDIA A100 80GB", 81920 * MiB, 312e12, 2039e9, r"NVIDIA A100(-SXM4-80GB| 80GB PCIe)"),
        # 1979 TFLOPS bf16 with sparsity; 80 GB HBM3, 3.35 TB/s
        GPUSpec("h100-80gb", "NVIDIA H100 SXM 80GB", 81559 * MiB, 989.4e12, 3.35 * TB, r"NVIDIA H100 80GB HBM3"),
        # 1513 TFLOPS bf16 with sparsity; 80 GB HBM2e, 2.0 TB/s
        GPUSpec("h100-pcie", "NVIDIA H100 PCIe", 81559 * MiB, 756e12, 2.0 * TB, r"NVIDIA H100 PCIe"),
        # The H100's compute with 141 GB HBM3e at 4.8 TB/s (the H200 NVL, a PCIe card, peaks lower: not this entry)
        GPUSpec("h200", "NVIDIA H200 SXM", 143771 * MiB, 989.4e12, 4.8 * TB, r"NVIDIA H200"),
        # HGX B200: 4.5 PFLOPS bf16 with sparsity; 180 GB HBM3e, 7.7 TB/s
        GPUSpec("b200", "NVIDIA B200 (HGX)", 183359 * MiB, 2.25e15, 7.7 * TB, r"NVIDIA B200"),
        # 1307.4 TFLOPS bf16 dense (2614.9 sparse); 192 GB HBM3, 5.3 TB/s
        GPUSpec("mi300x", "AMD Instinct MI300X", 205822885888, 1307.4e12, 5.3 * TB, r"AMD Instinct MI300X( VF)?"),
    ]
}


def gpu_spec(name: str) -> GPUSpec:
    """The card called `name` in GPUS, or one error listing every name."""
    if name not in GPUS:
        raise InvalidInput(f"--target {name}: unknown GPU; known: {', '.join(GPUS)}")
    return GPUS[name]


def spec_for_device_name(device_name: str) -> GPUSpec | None:
    """The entry of the card torch.cuda.get_device_name() names ("NVIDIA H200", "NVIDIA A100-SXM4-80GB"), or None
    for a card the table does not hold (another form of it included: its peak or memory differ)."""
    for spec in GPUS.values():
        if re.fullmatch(spec.device_name, device_name.strip(), flags=re.IGNORECASE):
            return spec
    return None
