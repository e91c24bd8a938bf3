"""`grouped_mm`: one matmul per expert over the rows routed to it, for mixture-of-experts layers.

Rows arrive sorted by expert; `ends` (E,) int32 says where each expert's rows end, so nothing here reads a
count on the host in the model's code: the MoE layer compiles to one graph with `fullgraph=True`.

PyTorch's `torch._grouped_mm` does the work where it can: on the CPU in every float dtype, and on CUDA in
bfloat16 (compute capability 8.0 and up), where torch.compile lowers it itself. torch.compile accepts it only
in bfloat16, so everywhere else it runs inside the custom op `plainlm::grouped_mm`, which the compiler sees
as one opaque call with a known output shape; where `torch._grouped_mm` has no kernel (CUDA float32, older
GPUs) the op loops over the experts, reading the counts on the host inside the op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x (M, in) rows sorted by expert @ weight[e].T for weight (E, out, in): (M, out).

    ends (E,) int32: the cumulative row counts (expert e's rows are ends[e-1]:ends[e])."""
    if x.is_cuda and x.dtype == weight.dtype == torch.bfloat16 and _cuda_kernel(x.device):
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=ends)
    if _eager_inference(x, weight) and x.device.type == "cpu" and x.dtype == weight.dtype and _aligned(x, weight):
        # the custom op's dispatch costs about 0.2 ms a call, a tenth of a small MoE's decode step
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=ends)
    return torch.ops.plainlm.grouped_mm(x, weight, ends)


def _eager_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Neither compiling (which needs the op) nor recording a backward (which torch._grouped_mm's own
    derivative does not compute for every row layout on the CPU)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return not needs_grad and not torch.compiler.is_compiling()


def _cuda_kernel(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)


@torch.library.custom_op("plainlm::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and x.dtype == weight.dtype and _aligned(x, weight):
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=ends)
    return expert_loop(x, weight, ends)


def _aligned(*tensors: torch.Tensor) -> bool:
    """The CPU kernel's demand: every tensor starts, and steps between rows, at a multiple of 16 bytes."""
    return all(
        t.data_ptr() % 16 == 0 and all(stride * t.element_size() % 16 == 0 for stride in t.stride() if stride != 1)
        for t in tensors
    )


def expert_loop(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor, linear: Callable = F.linear) -> torch.Tensor:
    """What `torch._grouped_mm` computes, one `linear(rows, weight[e])` per expert that has rows: where it has
    no kernel, and (kernel_layers.KernelExperts) where a few rows go faster through another product."""
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for expert, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = linear(x[start:end], weight[expert])
        start = end
    return out


@_grouped_mm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("plainlm::grouped_weight_grad", mutates_args=())
def _weight_grad_op(grad: torch.Tensor, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """(E, out, in): expert e's grad[rows].T @ x[rows], zero for an expert that got no rows."""
    if x.device.type == "cpu" and x.dtype == grad.dtype and _aligned(grad, x):
        return torch._grouped_mm(grad.t(), x, offs=ends)
    out = grad.new_zeros(ends.shape[0], grad.shape[1], x.shape[1])
    start = 0
    for expert, end in enumerate(ends.tolist()):
        out[expert] = grad[start:end].t() @ x[start:end]
        start = end
    return out


@_weight_grad_op.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return grad.new_empty(ends.shape[0], grad.shape[1], x.shape[1])


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, ends = inputs
    ctx.save_for_backward(x, weight, ends)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
    x, weight, ends = ctx.saved_tensors
    grad_x = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.plainlm.grouped_mm(grad, weight.transpose(1, 2), ends)
    if ctx.needs_input_grad[1]:
        grad_weight = torch.ops.plainlm.grouped_weight_grad(grad, x, ends)
    return grad_x, grad_weight, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)
