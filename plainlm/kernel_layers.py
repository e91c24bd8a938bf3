"""Model parts that call plainlm's CPU kernels (kernels/), swapped in for model.py's plain ones.

    use_cpu_kernels(model)   # in place; quantize_model, quantized checkpoints and LLM.load call it

KernelAttention  Attention whose steps over model.KVCache (CPU, fp32, no gradient: decode steps,
                 speculative verifications, prompts) run kernels/decode_attention.cpp, which
                 visits only the cache slots the mask allows (SDPA computes all of them); over
                 the serving engine's paged pool, decode steps and prompt chunks alike read it
                 in place (reads_paged_pool); and whose q, k and v projections, when they are plainlm's int8/int4 layers
                 (quantize.py), run in one kernel call.
KernelMLP        MLP whose gate and up projections run in one kernel call likewise.
KernelLinear     nn.Linear whose float32 product over a few rows (a decode step, a speculative
                 verification; no gradient) runs kernels/rows_matmul.cpp, which reads the weights
                 once at memory speed, and gives each row the same bits however many rows run.
KernelExperts    a mixture of experts' Experts whose few-row products (decode steps; no gradient) run
                 rows_matmul.cpp on each chosen expert's weight: torch._grouped_mm on the CPU calls
                 a matmul for every expert, empty ones too, and its one-row products read weights at
                 a third of the memory speed (a DeepSeek-V3-shaped decode step spent half its time there).

Each overrides one or two of model.py's small methods (`project_qkv`, `attend`, `project_gate_up`, `project`)
and falls back to them wherever a kernel cannot run, so results never depend on the swap; only the
speed does. model.py itself stays plain PyTorch and knows nothing of this file. The int8/int4 layers'
own single-layer kernel calls live with them in quantize.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from plainlm.grouped_mm import expert_loop
from plainlm.kernels import (
    decode_attention_fits,
    decode_attention_takes,
    fp32_kernels_loaded,
    kernel_input,
    kernels_loaded,
    rows_matmul_takes,
)
from plainlm.model import GPT, MLP, Attention, Experts, KVCache


class KernelAttention(Attention):
    # Set by use_cpu_kernels: this model's heads fit the decode-attention kernel and no logit softcap
    # (Gemma 2) or sinks (gpt-oss) ask for the manual path. A plain attribute, read without a call: dynamo
    # compiles it away.
    decode_kernel: bool = False

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = project_together(x, (self.q_proj, self.k_proj, self.v_proj))
        return q, k, v

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None
    ) -> torch.Tensor:
        if k.dim() == 2:  # the serving engine's paged pool, read in place (serve/kv_pool.py: PagedStep.in_place)
            # Each of the T new tokens of a row is a query of its own over the row's keys (its mask row says
            # which it sees); the kernel takes them sequence-major, (B * T, H, D).
            B, H, T, D = q.shape
            queries = q.transpose(1, 2).reshape(B * T, H, D).contiguous()
            mask = mask.expand(B, 1, T, mask.shape[-1]).reshape(B * T, -1).contiguous()
            y = torch.ops.plainlm.paged_attention(queries, k, v, cache.step.read_index, mask, self.scale)
            return y.view(B, T, H, D).transpose(1, 2)
        over_cache = cache is not None and not torch.is_grad_enabled()
        if not (over_cache and self.decode_kernel and decode_attention_takes(k)):
            return super().attend(q, k, v, mask, cache)
        # New tokens over model.KVCache: a decode step (T = 1), a speculative verification or a prompt. SDPA
        # would compute every slot of the preallocated cache; the kernel visits the ones the mask allows.
        B, H, T, D = q.shape
        queries = q.transpose(1, 2).reshape(B * T, H, D).contiguous()
        mask = mask.reshape(-1, mask.shape[-1]).contiguous()  # (T or B * T, S): a cache always comes with a mask
        y = torch.ops.plainlm.decode_attention(queries, k, v, mask, self.scale)
        return y.view(B, T, H, D).transpose(1, 2)


class KernelMLP(MLP):
    def project_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = project_together(x, (self.gate_proj, self.up_proj))
        return gate, up


class KernelLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not rows_matmul_takes(x, self.weight):
            return super().forward(x)
        y = torch.ops.plainlm_fp32.rows_matmul(x.reshape(-1, self.in_features).contiguous(), self.weight)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class KernelExperts(Experts):
    def project(self, name: str, rows: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        weight = getattr(self, name)
        if torch.is_grad_enabled() or not rows_matmul_takes(rows, weight):
            return super().project(name, rows, ends)
        if torch.compiler.is_compiling():  # the loop reads `ends` on the host: one opaque call for the compiler
            return torch.ops.plainlm.expert_rows_matmul(rows, weight, ends)
        return expert_rows_matmul(rows, weight, ends)


def expert_rows_matmul(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """grouped_mm.expert_loop with each expert's rows (sorted by expert) through rows_matmul. (M, out)."""
    return expert_loop(x, weight, ends, lambda rows, w: torch.ops.plainlm_fp32.rows_matmul(rows.contiguous(), w))


# The same under torch.compile, as one opaque op (called directly in eager: an op's dispatch costs ~30 us)
_expert_rows_matmul_op = torch.library.custom_op("plainlm::expert_rows_matmul", mutates_args=())(expert_rows_matmul)


@_expert_rows_matmul_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[1])


def use_cpu_kernels(model: GPT) -> GPT:
    """Swap `model`'s attention, MLP and linear modules for the kernel-calling ones above, in place, where
    plainlm's kernels run (a CPU model on a CPU where they built); elsewhere the model stays as it is.
    Returns it."""
    if model.embed.weight.device.type != "cpu":
        return model
    vnni, fp32 = kernels_loaded(), fp32_kernels_loaded()
    c = model.config  # the decode kernel has no logit softcap (Gemma 2) nor sinks (gpt-oss)
    decode_kernel = decode_attention_fits(c.head_dim) and c.attention_logit_softcap is None and not c.attention_sinks
    for module in model.modules():
        # The class changes, nothing else: the same parameters, buffers and state-dict keys
        # (torch.nn.utils.parametrize swaps classes the same way).
        if type(module) is Attention and vnni:
            module.__class__ = KernelAttention
            module.decode_kernel = decode_kernel
        elif type(module) is MLP and vnni:
            module.__class__ = KernelMLP
        elif type(module) is nn.Linear and fp32:
            module.__class__ = KernelLinear
        elif type(module) is Experts and fp32:
            module.__class__ = KernelExperts
    return model


def reads_paged_pool(model: GPT, dtype: torch.dtype) -> bool:
    """Whether `model`'s forward passes (decode steps and prompt chunks) can read a paged KV pool of `dtype` in
    place, through the paged attention kernel: every attention layer is a KernelAttention that takes it."""
    kernel_ready = all(getattr(block.attn, "decode_kernel", False) for block in model.blocks)
    return kernel_ready and dtype == torch.float32 and model.embed.weight.device.type == "cpu"


def project_together(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
    """x through layers that all read it (q, k, v; gate, up). When they are plainlm's int8 or int4 layers
    of one kind running its kernel, with one group size, and no gradient flows, one call of int8_matmuls /
    int8_group_matmuls / int4_matmuls computes them all: a small quantized model's decode step spends much of
    its time in per-call overhead. Otherwise one call each. The outputs are the same either way.

    A served model's adapted layer (serve/adapters.py's MultiLoRALinear, which has `add_adapters`) takes
    part through its base layer, and adds its batch rows' adapter updates to that output after."""
    bases = [layer.base if hasattr(layer, "add_adapters") else layer for layer in layers]
    outputs = _project_bases_together(x, bases)
    return [
        layer.add_adapters(x, out) if hasattr(layer, "add_adapters") else out
        for out, layer in zip(outputs, layers, strict=True)
    ]


def _project_bases_together(x: torch.Tensor, layers: Sequence[nn.Module]) -> Sequence[torch.Tensor]:
    first = layers[0]
    kernel = getattr(first, "kernel", None)  # quantize's int8/int4 layers say which kernel they run
    group_size = getattr(first, "group_size", None)  # None: plainlm's int8, one scale a row
    shared = (
        kernel == "plainlm"
        and all(
            type(layer) is type(first)
            and layer.kernel == "plainlm"
            and getattr(layer, "group_size", None) == group_size
            and layer.input_order is first.input_order  # GPTQ act order: one tensor where the layers' orders agree
            for layer in layers[1:]
        )
    )
    if not shared or (torch.is_grad_enabled() and x.requires_grad):
        return [layer(x) for layer in layers]
    if first.input_order is not None:
        x = x.index_select(-1, first.input_order)
    x2 = kernel_input(x, first.in_features)
    tiles = [layer.weight for layer in layers]
    if first.weight.dtype == torch.uint8:  # int4: two weights per byte
        y = torch.ops.plainlm.int4_matmuls(x2, tiles, [layer.scales_and_zeros for layer in layers], group_size)
    elif group_size is not None:  # int8 in groups with (scale, zero) pairs: an 8-bit GPTQ checkpoint's
        y = torch.ops.plainlm.int8_group_matmuls(x2, tiles, [layer.scales_and_zeros for layer in layers], group_size)
    else:
        y = torch.ops.plainlm.int8_matmuls(x2, tiles, [layer.scales for layer in layers])
    y = y.to(x.dtype).view(*x.shape[:-1], -1)  # the layers' outputs side by side
    outputs = y.split([layer.out_features for layer in layers], dim=-1)
    return [out if layer.bias is None else out + layer.bias for out, layer in zip(outputs, layers, strict=True)]
