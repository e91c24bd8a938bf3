"""Which device and dtype a command runs on: the one place that turns `--device` and `--dtype` into torch's.

resolve_device(None)      -> cuda when available, else cpu
resolve_device("cuda:1")  -> that GPU, or one error line when it is not there
resolve_dtype("bf16", d)  -> torch.bfloat16; None: float32 on the CPU, bfloat16 on a GPU that has it
move_to(module, d)        -> what of a module is not on d yet, moved there (a model that loads piece by piece)
"""

from __future__ import annotations

import torch

from plainlm.errors import InvalidInput

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch.device that exists here; None picks cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        return device
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InvalidInput(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidInput(f"--device {device}: this machine has no CUDA device (or torch is a CPU build)")
        if resolved.index is not None and resolved.index >= count:
            raise InvalidInput(f"--device {device}: there are {count} CUDA devices, cuda:0 to cuda:{count - 1}")
    elif resolved.type != "cpu":
        raise InvalidInput(f"--device {device}: plainlm runs on cpu or cuda")
    return resolved


def move_to(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move the parameters and buffers of `module` that are not on `device` yet, in place; what is already there
    is left untouched (bitsandbytes' 4-bit weights, quantized on the device, keep their quantization state)."""

    def moved(t: torch.Tensor) -> torch.Tensor:
        return t if t.device == device else t.to(device)

    return module._apply(moved)  # nn.Module.to's own walk (parameters kept as the same objects where torch can)


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """`dtype` by name; None: float32 on the CPU (batch-1 decoding is memory-bound there, bf16 measured no
    faster), bfloat16 on a GPU that has it."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise InvalidInput(f"--dtype {dtype}: unknown; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
