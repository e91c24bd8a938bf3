"""The memory model: how much memory a training run needs per device, from its config alone.

No weight is read: the model is a `Config`, its parameters are counted on the meta device, and the
activations are what autograd saves for the backward pass, traced on fake tensors (shapes without
data) through the real `GPT` and loss. The terms, and why each is what it is, are in docs/memory.md.
`estimate_memory` is the pure function; `training_plan` is what the training commands print at their
start. Reading recipes and printing for `plainlm estimate` is the command's, in estimate.py.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from plainlm.config import Config
from plainlm.distributed import Wrapping
from plainlm.gpus import GPUSpec
from plainlm.lora import LoRAConfig, inject_lora, lora_for_method
from plainlm.metrics import flops_per_token
from plainlm.model import GPT
from plainlm.objectives import token_loss_sum
from plainlm.quantize import quantized_linear_names
from plainlm.train import micro_batches_per_rank, resolve_precision

MiB, GiB = 1024**2, 1024**3
Method = Literal["full", "lora", "dora", "qlora", "pretrain"]

# What a training process holds before its model: Python, torch, plainlm and what they import
# (jsonargparse, tokenizers, the optimizer's and TensorBoard's modules, matplotlib for loss.png),
# the tokenizer and the data. Measured on torch 2.13 (CPU build) as the peak RSS of the real
# commands with a model of 0.1M parameters (benchmarks/memory.py); the tokenizer adds its own.
CPU_RUNTIME_BYTES = 365 * MiB
TOKENIZER_BYTES_PER_TOKEN = 600  # the Rust tokenizer's vocabulary and merges: 27 MiB for SmolLM2's 49k tokens
# A CUDA context with lazily loaded kernels (CUDA 12), plus cuBLAS's workspace: outside torch's allocator.
CUDA_CONTEXT_BYTES = 600 * MiB
# glibc malloc (CPU) keeps freed memory in the process. Once the first frees raise its mmap
# threshold (up to 32 MiB), a step's tensors come from the heap, and the heap only shrinks from its
# top: the holes that gradients, optimizer state and temporaries leave between each other stay
# resident. Measured, the heap keeps about this fraction of what the blocks' forward allocates
# (every new tensor, temporaries included) on top of the live peak; with checkpointing the
# recomputation allocates one block at a time, into the backward's holes (docs/memory.md). Since the
# gated MLP recomputes its activation (model.GatedActivation), a checkpointed pretrain of 28M, 16 x 256,
# measured 1658-1973 MiB over three runs of one machine: 0.16 puts the prediction (1776) in their middle.
GLIBC_RETAINED = {False: 0.22, True: 0.16}
# The CUDA caching allocator rounds blocks up and keeps freed ones cached for reuse: reserved memory
# runs a few percent above the bytes of live tensors at the peak.
CUDA_FRAGMENTATION = 0.05
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, an 8-bit absmax per 64, fp32 per 256 absmax
# Nibbles and a bf16 (scale, zero) per group of 64, read as stored by plainlm's int4 kernel (PyTorch's
# kernel, used where plainlm's cannot run, adds a packed copy: 0.5 more).
INT4_BYTES_PER_PARAM = 0.5 + 4 / 64
OPTIMIZER_STATES = {"AdamW": 2, "Adam": 2, "RMSprop": 1, "Adagrad": 1, "Adafactor": 1, "Lion": 1, "SGD": 0}


@dataclass
class MemoryEstimate:
    """Bytes per device of one training run, term by term; `peak` is what the device must hold."""

    model: str
    method: str
    precision: str
    device: str  # "cpu" or "cuda"
    micro_batch_size: int
    seq_length: int
    strategy: str
    world_size: int
    activation_checkpointing: bool
    n_params: int
    n_trainable: int
    flops_per_token: float
    weights: int
    gradients: int
    optimizer: int
    activations_full: int  # saved for backward + the loss's transient, without checkpointing
    activations_checkpointed: int  # block inputs + one block recomputed + the loss's transient
    beside_activations: int  # gradients already held when the activations peak: the head's, or all when accumulating
    buckets: int  # DDP's gradient buckets: a flat second copy of every gradient
    optimizer_step: int  # the optimizer step's temporaries (foreach AdamW on CUDA: one state-sized list)
    allocator: int  # glibc's retained heap (CPU) or the caching allocator's slack (CUDA)
    runtime: int  # the process itself (CPU) or the CUDA context
    export: int  # the final export's merged copies and serialization, beside weights and optimizer state
    kv_cache: int  # for generation, batch 1 at kv_length; not part of training
    kv_length: int
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def activations(self) -> int:
        return self.activations_checkpointed if self.activation_checkpointing else self.activations_full

    @property
    def step_peak(self) -> int:
        """The training step: weights and optimizer state throughout, then activations or gradients."""
        live = max(self.activations + self.beside_activations, self.gradients + self.optimizer_step)
        return self.runtime + self.weights + self.optimizer + self.buckets + live + self.allocator

    @property
    def export_peak(self) -> int:
        return self.runtime + self.weights + self.optimizer + self.export

    @property
    def peak(self) -> int:
        return max(self.step_peak, self.export_peak)

    def format(self, available: int | None = None, where: str = "available") -> str:
        """A table of the terms, the peak and, given the available bytes, whether it fits (`where`: whose bytes)."""
        ac = "with activation checkpointing" if self.activation_checkpointing else "without activation checkpointing"
        other = self.activations_full if self.activation_checkpointing else self.activations_checkpointed
        lines = [
            f"{self.model}: {self.n_params:,} parameters, {self.n_trainable:,} trainable ({self.method})",
            f"training FLOPs per token: {self.flops_per_token / 1e9:.3g} GFLOP at {self.seq_length} tokens",
            f"memory per device ({self.device}, {self.precision}, micro batch {self.micro_batch_size} x "
            f"{self.seq_length} tokens, {self.strategy}, {self.world_size} process(es)):",
            _row("weights", self.weights),
            _row("gradients", self.gradients, "replace the activations freed in the backward"),
            _row("optimizer state", self.optimizer),
            _row("activations", self.activations, f"{ac} (the run's setting); the other way: {format_bytes(other)}"),
        ]
        if self.beside_activations:
            lines.append(_row("gradients at that peak", self.beside_activations, "head / accumulated gradients"))
        if self.buckets:
            lines.append(_row("DDP buckets", self.buckets))
        if self.optimizer_step:
            lines.append(_row("optimizer step", self.optimizer_step, "foreach temporaries"))
        allocator = "glibc heap kept after frees" if self.device == "cpu" else "CUDA caching allocator slack"
        runtime = "python + torch + plainlm, tokenizer, data" if self.device == "cpu" else "CUDA context"
        lines += [
            _row("allocator", self.allocator, allocator),
            _row("runtime", self.runtime, runtime),
            _row("peak, training step", self.step_peak),
        ]
        if self.export:
            lines.append(_row("peak, final export", self.export_peak, "merged weights + serialization"))
        lines.append(_row("peak", self.peak))
        lines.append(f"KV cache for generation: {format_bytes(self.kv_cache)} at {self.kv_length} tokens, batch 1")
        lines += [f"note: {n}" for n in self.notes]
        if available is not None:
            lines.append(fit_line(self.peak, self.processes_per_memory, available, where))
        return "\n".join(lines)

    @property
    def processes_per_memory(self) -> int:
        """CPU processes of one node share its RAM; every GPU has its own memory."""
        return self.world_size if self.device == "cpu" else 1


def format_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def _row(name: str, n: int, why: str = "") -> str:
    return f"  {name:22s}{format_bytes(n):>12s}" + (f"   {why}" if why else "")


def fit_line(peak: int, processes: int, available: int, where: str = "available") -> str:
    needed = peak * processes
    what = format_bytes(needed)
    if processes > 1:
        what += f" ({processes} processes x {format_bytes(peak)})"
    if needed <= available:
        return f"fits: {what} of {format_bytes(available)} {where}"
    return f"does not fit: needs {what}, {format_bytes(available)} {where}"


# --- the model, without its weights ---
def build_prepared_model(config: Config, method: str, lora: LoRAConfig) -> GPT:
    """The model as the run prepares it, in training mode: every parameter's shape and requires_grad.

    On whatever device and in whatever tensor mode is current: the meta device to count parameters,
    fake tensors to trace activations. qlora's 4-bit base saves for backward what a frozen Linear does.
    """
    model = GPT(config)
    adapters = lora_for_method(lora, method)
    if adapters is not None:
        inject_lora(model, adapters)
    return model.train()


def weight_bytes(model: nn.Module, method: str, quantize: str, param_bytes: int) -> int:
    """Bytes of every parameter (tied ones once): adapters in fp32, qlora's base layers at their packed size."""
    quantized: set[str] = set()
    if method == "qlora":
        quantized = {f"{name}.weight" for name in quantized_linear_names(model, quantize)}
        if quantize == "int4":  # int4 packs the embedding too (a tied head shares it)
            quantized.add("embed.weight")
    per_param = NF4_BYTES_PER_PARAM if quantize in ("nf4", "fp4") else INT4_BYTES_PER_PARAM
    adapters = method in ("lora", "dora", "qlora")
    total = 0.0
    for name, p in model.named_parameters():  # a tied head is listed once
        if name in quantized:
            total += p.numel() * per_param
        else:
            total += p.numel() * (4 if adapters and p.requires_grad else param_bytes)
    return int(total)


# --- activations, traced ---
@dataclass
class Trace:
    """Bytes of one micro-batch's forward: saved for the backward, and allocated in all (temporaries too)."""

    saved_per_block: int
    saved_outside: int  # embedding, final norm, head and loss
    allocated_per_block: int
    loss_transient: int  # the cross-entropy's backward: (tokens, vocab) fp32 gradients beside everything saved


def trace_activations(
    config: Config, method: str, lora: LoRAConfig, precision: str, batch: int, seq: int, packed: bool = False
) -> Trace:
    """Run the real GPT and loss on fake tensors (shapes, no data) with 1 and 2 blocks; the difference is one block.

    Saved bytes are what autograd keeps for the backward, each storage once, parameters excluded.
    """
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    runs = []
    for n_layer in (1, 2):
        small = dataclasses.replace(config, n_layer=n_layer, block_size=max(config.block_size, seq))
        with FakeTensorMode():
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)  # bf16-true: the model is bf16, as finetune/pretrain cast it
            try:
                model = build_prepared_model(small, method, lora)
            finally:
                torch.set_default_dtype(previous)
            # Fake tensors have shapes but no values, so the positions cannot be read; the trace's
            # block_size covers seq, so the check would pass for any real batch of this shape.
            model.check_positions = False
            ids = torch.zeros(batch, seq, dtype=torch.long)
            data = {"input_ids": ids, "targets": ids}
            if packed:
                data["position_ids"] = ids
                data["attention_mask"] = torch.ones(batch, 1, seq, seq, dtype=torch.bool)
            runs.append(forward_bytes(model, data, precision))
    (saved_1, allocated_1), (saved_2, allocated_2) = runs
    logits_bytes = 2 if precision != "32-true" else 4
    loss_transient = batch * seq * config.vocab_size * (2 * 4 + (logits_bytes if logits_bytes != 4 else 0))
    block = saved_2 - saved_1
    return Trace(block, saved_1 - block, allocated_2 - allocated_1, loss_transient)


class _AllocatedBytes(TorchDispatchMode):
    """Sums the bytes of every new tensor an op returns (views share their base's memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t._is_view():
                self.total += t.untyped_storage().nbytes()
        return out


def forward_bytes(model: nn.Module, batch: dict[str, torch.Tensor], precision: str) -> tuple[int, int]:
    """(saved for backward, allocated) bytes of token_loss_sum(model, batch)."""
    params = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast, _AllocatedBytes() as allocated:
        token_loss_sum(model, batch)
    return sum(saved.values()), allocated.total


# A preference run's micro-batch, as the estimate counts it.
PAIRS_NOTE = (
    "preference pairs: a micro-batch of N pairs is counted as 2N sequences (chosen and rejected), an upper bound: "
    "a pair's row holds its prompt once; the loss takes logits at the completions only, so its term is an upper "
    "bound too, as is the allocator's on a CPU (the objective gives freed heap pages back around each pass); with "
    "LoRA the reference (adapters off) is one more forward pass, without saved activations"
)


# --- the whole estimate ---
def estimate_memory(
    config: Config,
    method: Method = "full",
    lora: LoRAConfig | None = None,
    quantize: str = "nf4",
    precision: str = "32-true",
    micro_batch_size: int = 1,
    seq_length: int = 1024,
    strategy: Wrapping = "none",
    world_size: int = 1,
    activation_checkpointing: bool = False,
    accumulation_steps: int = 1,
    optimizer: str = "AdamW",
    device: str = "cpu",
    packed: bool = False,
    tokenizer_vocab: int | None = None,
    kv_length: int | None = None,
) -> MemoryEstimate:
    """Per-device memory of a training run, from the model's config alone.

    method: full / lora / dora / qlora (finetune) or pretrain (every weight trains, like full).
    precision: 32-true, bf16-mixed (fp32 weights, bf16 compute) or bf16-true. strategy: none,
    ddp (everything replicated, plus gradient buckets) or fsdp (weights, gradients and optimizer
    state sharded over world_size, plus one all-gathered block). optimizer: the class name (its
    states per trainable parameter). device: "cpu" (glibc heap, process baseline) or "cuda".
    """
    lora = lora or LoRAConfig()
    precision = resolve_precision(precision, torch.device(device))
    param_bytes = 2 if precision == "bf16-true" else 4
    with torch.device("meta"):
        model = build_prepared_model(config, method, lora)
    params = {id(p): p for p in model.parameters()}.values()
    n_params = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    weights = weight_bytes(model, method, quantize, param_bytes)
    # Gradients and optimizer state take the trainable parameters' dtype: fp32 adapters, or the model's.
    train_bytes = 4 if method in ("lora", "dora", "qlora") else param_bytes
    grad_bytes = trainable * train_bytes
    states = OPTIMIZER_STATES.get(optimizer, 2)
    optimizer_bytes = trainable * states * train_bytes

    trace = trace_activations(config, method, lora, precision, micro_batch_size, seq_length, packed)
    block, outside = trace.saved_per_block, trace.saved_outside
    full = config.n_layer * block + outside + trace.loss_transient
    residual = micro_batch_size * seq_length * config.n_embd * param_bytes  # each block's input, kept
    checkpointed = config.n_layer * residual + block + outside + trace.loss_transient

    # The backward starts at the head: its gradient is allocated while every activation is still saved.
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith(("lm_head", "embed")))
    beside = grad_bytes if accumulation_steps > 1 else head * train_bytes
    buckets, optimizer_step, notes = 0, 0, []
    if strategy == "fsdp" and world_size > 1:
        largest_block = sum(p.numel() for p in model.blocks[0].parameters()) * param_bytes
        weights = weights // world_size + 2 * largest_block  # the shard, plus the gathered unit and the next one
        grad_bytes, optimizer_bytes = grad_bytes // world_size, optimizer_bytes // world_size
        beside = beside // world_size
        notes.append("fsdp: two blocks are gathered at a time (the one computing and the one prefetched)")
    elif strategy == "ddp" and world_size > 1:
        buckets = grad_bytes
    if device == "cuda" and states:
        optimizer_step = optimizer_bytes // states

    activations = checkpointed if activation_checkpointing else full
    live = weights + optimizer_bytes + buckets + max(activations + beside, grad_bytes + optimizer_step)
    if device == "cpu":
        runtime = CPU_RUNTIME_BYTES + (tokenizer_vocab or config.vocab_size) * TOKENIZER_BYTES_PER_TOKEN
        retained = GLIBC_RETAINED[activation_checkpointing]
        allocator = int(retained * config.n_layer * trace.allocated_per_block)
    else:
        runtime = CUDA_CONTEXT_BYTES
        allocator = int(CUDA_FRAGMENTATION * live)
    sharded = strategy == "fsdp" and world_size > 1
    fresh_base = method == "qlora" or (sharded and method in ("lora", "dora"))
    export = export_bytes(model, method, param_bytes, activations + allocator, device, fresh_base)
    if device != "cpu" and method != "pretrain":  # finetune's loading and export (pretrain builds its model)
        staged = method == "qlora" or strategy == "fsdp"
        notes += host_memory_notes(n_params * param_bytes, method, world_size, staged, fresh_base or sharded)
    kv_length = kv_length or config.block_size
    kv_cache = config.n_layer * kv_length * config.kv_cache_width * param_bytes
    return MemoryEstimate(
        model=config.name,
        method=method,
        precision=precision,
        device=device,
        micro_batch_size=micro_batch_size,
        seq_length=seq_length,
        strategy=strategy if world_size > 1 else "none",
        world_size=world_size,
        activation_checkpointing=activation_checkpointing,
        n_params=n_params,
        n_trainable=trainable,
        flops_per_token=flops_per_token(config, n_params, seq_length, trainable / n_params),
        weights=weights,
        gradients=grad_bytes,
        optimizer=optimizer_bytes,
        activations_full=full,
        activations_checkpointed=checkpointed,
        beside_activations=beside,
        buckets=buckets,
        optimizer_step=optimizer_step,
        allocator=allocator,
        runtime=runtime,
        export=export,
        kv_cache=kv_cache,
        kv_length=kv_length,
        notes=notes,
    )


def export_bytes(model: nn.Module, method: str, param_bytes: int, freed: int, device: str, fresh_base: bool) -> int:
    """What writing out_dir/final/ needs on the device beside weights and optimizer state.

    Adapters are merged into new float weights, one layer at a time. A qlora or FSDP-sharded model is not what
    gets merged (`fresh_base`): finetune.export_final merges into a fresh float base loaded on the CPU, which a
    GPU run pays in host memory, not on the device. On the CPU the allocations first take the heap memory the
    training step freed (`freed`). On a GPU each merged layer replaces its LoRA layer, whose freed memory the
    caching allocator keeps for the next layer of that shape: one block's merged layers is what the reserve
    grows by. safetensors writes tensors from their own memory, without a copy.
    """
    if method not in ("lora", "dora", "qlora"):
        return 0
    # (LoRA on experts, lora.LoRAExperts, merges into the experts' own weights: nothing new to hold)
    if device != "cpu":
        adapted = (m for m in model.blocks[0].modules() if hasattr(m, "lora_A") and hasattr(m, "base"))
        return 0 if fresh_base else sum(m.base.weight.numel() for m in adapted) * param_bytes
    merged = sum(m.base.weight.numel() for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base"))
    merged *= param_bytes
    if method == "qlora":
        merged += sum(p.numel() for p in model.parameters() if not p.requires_grad) * param_bytes
    return max(0, merged - freed)


def training_plan(
    config: Config,
    method: Method,
    train: Any,
    seq_length: int,
    world: Any,
    optimizer: torch.optim.Optimizer,
    lora: LoRAConfig | None = None,
    quantize: str = "nf4",
    packed: bool = False,
    sequences_per_example: int = 1,
) -> str:
    """What a training run prints at its start: the estimate for its TrainArgs and World, and whether it fits.
    sequences_per_example: 2 for preference pairs, whose chosen and rejected sequences share a row."""
    plan = estimate_memory(
        config,
        method,
        lora,
        quantize,
        precision=resolve_precision(train.precision, world.device),
        micro_batch_size=train.micro_batch_size * sequences_per_example,
        seq_length=seq_length,
        strategy=world.strategy,
        world_size=world.size,
        activation_checkpointing=train.activation_checkpointing,
        accumulation_steps=micro_batches_per_rank(train, world.size),
        optimizer=type(optimizer).__name__,
        device=world.device.type,
        packed=packed,
    )
    if sequences_per_example > 1:
        plan.notes.append(PAIRS_NOTE)
    return plan.format(available_bytes(world.device.type))


def host_memory_notes(float_bytes: int, method: str, world_size: int, staged: bool, export_on_host: bool) -> list[str]:
    """What a GPU run holds in the machine's memory (RAM), not the GPU's: the float model while a qlora or FSDP run
    loads it on the CPU first (finetune.loads_on_cpu) and, for a qlora or sharded run, the float model the final
    export merges into."""
    processes = f"each of the {world_size} processes" if world_size > 1 else "the process"
    notes = []
    if staged:
        notes.append(
            f"host memory while loading: {processes} reads the float model ({format_bytes(float_bytes)}) on the "
            "CPU, shared when the checkpoint's files hold the run's dtype (memory-mapped), and moves it to the GPU "
            + ("a layer at a time, quantizing each" if method == "qlora" else "a block at a time, sharding each")
        )
    if export_on_host:
        gathered = f", beside the trained weights gathered there ({format_bytes(float_bytes)})"
        gathered = gathered if method == "full" else ""
        notes.append(
            f"host memory at the final export: rank 0 writes final/ from a fresh float model it loads on the CPU "
            f"({format_bytes(float_bytes)}){gathered}"
        )
    return notes


# --- what the device has ---
def available_bytes(device: str, target: GPUSpec | None = None) -> int:
    """Free memory of the device the run will use: CUDA's free memory, or the RAM Linux can hand out; for a GPU
    planned for without having it (`plainlm estimate --target`), that card's memory."""
    if target is not None:
        return target.memory_bytes
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
