"""`plainlm quantize`: a model's Linear layers to 4 or 8 bits by GPTQ, AWQ or round-to-nearest, written as a
Hugging Face GPTQ (AWQ) directory that plainlm (convert/hf_quantized.py) and transformers' integrations load.

    plainlm quantize SmolLM2-135M-Instruct.gguf out/smollm2-gptq --method gptq --group_size 128 \\
        --calibration data/pretrain/stories-1.txt
    llm = LLM.load("out/smollm2-gptq")                  # the integers, on plainlm's int4 kernel (int8: --bits 8)

Every method stores what GPTQ's format holds: per group of G inputs and output row an fp16 scale and a whole
zero point, w = scale * (q - z), q in 0..maxq (15 for 4 bits, 255 for 8). The grid is GPTQ's own (its
`Quantizer`): the group's range widened to include 0, scale = (max - min) / maxq and z = round(-min / scale)
(asymmetric), or z = (maxq + 1) / 2 and a range symmetric about 0 (`--sym`). Scales are rounded to fp16
before any weight is rounded against them, so the stored weights are exactly the ones the error compensation
saw. 8 bits change only the grid; the layers load as plainlm's int8 in groups (quantize.GroupedInt8Linear).

rtn   each weight to its nearest grid point.
gptq  Frantar et al. (2022): the columns of W (N, K) are rounded one at a time, and each one's rounding
      error is spread over the columns not yet rounded, in proportion to the inverse Hessian of the layer's
      squared output error, H = 2 X X^T over the calibration inputs X (K, tokens). H is dampened (1% of its
      mean diagonal added to the diagonal), inverted through its Cholesky factor, and the upper Cholesky
      factor of the inverse drives the updates, 128 columns a block with the error carried to the rest in
      one product. `--act_order` takes the columns in decreasing order of H's diagonal (the inputs with the
      largest activations first); the groups are then formed in that order, and g_idx records it.
awq   AWQ's activation-aware scales (awq.py) searched and folded into the layers before them, each group's
      clipping bound searched, then round-to-nearest; written in AWQ's GEMM layout, which is 4-bit only.

The model goes through the calibration text block by block: the inputs of one transformer block for every
sample are kept (samples x length x width floats), its Linear layers' Hessians gathered in one pass (layers
that read the same input, q/k/v and gate/up, share one), its layers quantized, and the block run again with
the quantized weights to give the next block its inputs. Peak memory is the float model plus one block's
Hessians and those inputs. The embedding and the head stay in float, as GPTQ's tools leave them.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from plainlm import awq
from plainlm.errors import InvalidInput
from plainlm.model import GPT
from plainlm.perplexity import read_documents
from plainlm.quantize import (
    GroupedInt8Linear,
    Int4Linear,
    finish_loading,
    pack_nibbles,
    set_module,
    zero_point_linear,
    zero_point_midpoint,
    zero_point_pairs,
)
from plainlm.tokenizer import Tokenizer

METHODS = ("rtn", "gptq", "awq")
BITS = {"rtn": (4, 8), "gptq": (4, 8), "awq": (4,)}  # the widths each method writes (AWQ's GEMM layout: 4 only)
BLOCK_COLUMNS = 128  # GPTQ's lazy batch: columns rounded before their error is carried to the rest at once


@dataclass
class QuantizedLayer:
    """One layer's result: `bits`-bit integers q (N, K) with the inputs in `order` (all of them in their own
    order when None), and per group of G of those inputs an fp16 scale and a zero point (groups, N)."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    order: torch.Tensor | None
    bits: int = 4

    def dequantized(self) -> torch.Tensor:
        """The float weights (N, K), in the inputs' own order."""
        group_size = self.q.shape[1] // self.scales.shape[0]
        scales = self.scales.float().repeat_interleave(group_size, dim=0).T
        zeros = self.zeros.repeat_interleave(group_size, dim=0).T
        w = (self.q - zeros).float() * scales
        return w if self.order is None else torch.empty_like(w).index_copy_(1, self.order, w)

    def linear(self, bias: torch.Tensor | None) -> Int4Linear | GroupedInt8Linear:
        """plainlm's int4 or int8 layer holding these integers (float32 pairs: the fp16 scales and zeros
        exactly), as a GPTQ checkpoint of this width loads."""
        N, K = self.q.shape
        layer = zero_point_linear(self.bits, K, N, bias is not None, K // self.scales.shape[0], self.order is not None)
        if self.bits == 8:
            layer.weight = (self.q - zero_point_midpoint(8)).to(torch.int8)
        else:
            layer.weight = pack_nibbles(self.q.to(torch.uint8))
        layer.scales_and_zeros = zero_point_pairs(self.scales, self.zeros, self.bits)
        if self.order is not None:
            layer.input_order = self.order
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        layer.pack()
        return layer


def grid(w: torch.Tensor, sym: bool, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's `bits`-bit grid for each row of a group of columns w (N, G): fp16 scales (N,) and zero points
    (N,)."""
    max_q = 2**bits - 1
    low, high = w.min(dim=1).values.clamp(max=0), w.max(dim=1).values.clamp(min=0)
    if sym:
        high = torch.maximum(low.abs(), high)
        low = torch.where(low < 0, -high, low)
    flat = low == high  # all zeros: any grid holds them
    low, high = torch.where(flat, -1.0, low), torch.where(flat, 1.0, high)
    scales = ((high - low) / max_q).half()
    zeros = torch.full_like(low, zero_point_midpoint(bits)) if sym else (-low / scales.float()).round()
    return scales, zeros.long()


def round_to_grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Columns w (N, ...) rounded to integers 0..2^bits - 1 of their rows' grid."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    return ((w / scales.float().view(shape)).round() + zeros.view(shape)).clamp(0, 2**bits - 1).long()


def rtn(weight: torch.Tensor, group_size: int, sym: bool, bits: int = 4) -> QuantizedLayer:
    """Each weight to its nearest point of its group's grid."""
    N, K = weight.shape
    groups = weight.float().reshape(N, K // group_size, group_size)
    scales, zeros = grid(groups.transpose(0, 1).reshape(-1, group_size), sym, bits)  # (groups * N,), group-major
    scales, zeros = scales.view(K // group_size, N), zeros.view(K // group_size, N)
    q = torch.stack([round_to_grid(groups[:, g], scales[g], zeros[g], bits) for g in range(K // group_size)], dim=1)
    return QuantizedLayer(q.reshape(N, K), scales, zeros, None, bits)


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    sym: bool,
    act_order: bool,
    damp: float = 0.01,
    bits: int = 4,
) -> QuantizedLayer:
    """GPTQ's rounding of one layer's weight (N, K) to `bits` bits given its inputs' Hessian (K, K) (see the
    docstring)."""
    W = weight.detach().float().clone()
    H = hessian.clone()
    N, K = W.shape
    dead = H.diagonal() == 0  # an input that never fired: its weights do not matter, and H needs a diagonal
    H[dead, dead] = 1
    W[:, dead] = 0
    order = torch.argsort(H.diagonal(), descending=True) if act_order else None
    if order is not None:
        W, H = W[:, order], H[order][:, order]
    H.diagonal().add_(damp * H.diagonal().mean())
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(H))
        U = torch.linalg.cholesky(inverse, upper=True)  # rows of U drive the updates
    except torch.linalg.LinAlgError:
        raise InvalidInput(
            "the calibration inputs' Hessian of a layer is not positive definite even after dampening; "
            "pass more or more varied --calibration text, or a larger --damp"
        ) from None
    Q = torch.zeros(N, K, dtype=torch.long)
    scales = torch.empty(K // group_size, N, dtype=torch.float16)
    zeros = torch.empty(K // group_size, N, dtype=torch.long)
    step = BLOCK_COLUMNS if BLOCK_COLUMNS % group_size == 0 else group_size  # groups start inside a block's columns
    for start in range(0, K, step):
        end = min(start + step, K)
        block, errors = W[:, start:end].clone(), torch.zeros(N, end - start)
        for i in range(end - start):
            column = start + i
            if column % group_size == 0:  # the group's grid from its weights as they are now, updates included
                g = column // group_size
                scales[g], zeros[g] = grid(block[:, i : i + group_size], sym, bits)
            g = column // group_size
            q = round_to_grid(block[:, i], scales[g], zeros[g], bits)
            Q[:, column] = q
            error = (block[:, i] - (q - zeros[g]).float() * scales[g].float()) / U[column, column]
            block[:, i:] -= error[:, None] * U[column, column:end][None, :]
            errors[:, i] = error
        W[:, end:] -= errors @ U[start:end, end:]
    return QuantizedLayer(Q, scales, zeros, order, bits)


# --- a whole model, block by block ---
class HessianSums:
    """2 X X^T of each Linear's inputs in a block, gathered by forward hooks over calibration batches; layers
    that read the very same input tensor in a pass (q, k, v; gate, up) share one sum."""

    def __init__(self, layers: dict[str, nn.Linear]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.shared: dict[str, str] = {}  # layer -> the layer whose sum it reads
        self._this_pass: dict[int, tuple[torch.Tensor, str]] = {}  # id(input) -> (input, first reader)
        self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name: str):  # noqa: ANN202 (a forward hook)
        def gather(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0]
            seen = self._this_pass.get(id(x))
            if seen is not None and seen[0] is x:  # the input is held until the pass ends: its id is its own
                self.shared[name] = seen[1]
                return
            self._this_pass[id(x)] = (x, name)
            rows = x.reshape(-1, x.shape[-1]).float()
            if name not in self.sums:
                self.sums[name] = torch.zeros(rows.shape[1], rows.shape[1])
                self.counts[name] = 0
            self.sums[name].addmm_(rows.T, rows)
            self.counts[name] += rows.shape[0]

        return gather

    def end_pass(self) -> None:
        self._this_pass.clear()

    def hessian(self, name: str) -> torch.Tensor:
        owner = self.shared.get(name, name)
        return self.sums[owner] * (2 / self.counts[owner])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def block_arguments(model: GPT, ids: torch.Tensor) -> list[tuple]:
    """Every block's arguments besides its input (RoPE, masks, positions) for ids (B, T), from a forward pass of
    the model that stops at the last block (its head, for a large vocabulary, would cost the most): with every
    calibration sample of one length, they serve every batch."""
    arguments: list[tuple] = [()] * len(model.blocks)

    def record(index: int):  # noqa: ANN202 (a forward pre-hook)
        def hook(module: nn.Module, args: tuple) -> None:
            arguments[index] = args[1:]
            if index == len(model.blocks) - 1:
                raise _StopForward

        return hook

    _forward_until_stopped(
        model, ids, [block.register_forward_pre_hook(record(i)) for i, block in enumerate(model.blocks)]
    )
    return arguments


def first_block_input(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """The hidden states the first block receives for ids (B, T): the model's own embedding, stopped there."""
    seen: list[torch.Tensor] = []

    def stop(module: nn.Module, args: tuple) -> None:
        seen.append(args[0])
        raise _StopForward

    _forward_until_stopped(model, ids, [model.blocks[0].register_forward_pre_hook(stop)])
    return seen[0]


class _StopForward(Exception):
    pass


def _forward_until_stopped(model: GPT, ids: torch.Tensor, handles: list) -> None:
    """model(ids) until a hook raises _StopForward; the hooks are removed either way."""
    try:
        model(ids)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


def quantize_blocks(
    model: GPT,
    method: str,
    group_size: int,
    sym: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    calibration: torch.Tensor | None = None,
    batch_size: int = 8,
    log: callable = print,
    bits: int = 4,
) -> GPT:
    """Quantize every Linear in `model`'s blocks with `method` ("rtn", or "gptq" and "awq", which need
    `calibration` ids (samples, length)) to `bits` bits, in place, block by block; they become int4 or int8
    layers in GPTQ's layout (float32 pairs, an input order with act_order). group_size -1: one group a row."""
    if model.config.n_expert:
        raise InvalidInput("plainlm quantize does not handle mixture-of-experts models yet; use --quantize int4")
    check_bits(method, bits)
    batches = [] if calibration is None else list(calibration.split(batch_size))
    calibrated = method in ("gptq", "awq")
    with torch.no_grad():
        arguments = block_arguments(model, batches[0]) if calibrated else []
        inputs = [first_block_input(model, batch) for batch in batches] if calibrated else []
        for index, block in enumerate(model.blocks):
            started = time.perf_counter()
            layers = {
                name: module
                for name, module in block.named_modules()
                if isinstance(module, nn.Linear) and not name.endswith("router")
            }
            for name, linear in layers.items():
                if group_size != -1 and linear.in_features % group_size:
                    raise InvalidInput(
                        f"--group_size {group_size} does not divide the {linear.in_features} inputs of "
                        f"blocks.{index}.{name}; pass one that does (32, 64 and 128 divide most models), or -1"
                    )
            sums = HessianSums(layers) if method == "gptq" else None
            samples = awq.InputSamples(block, len(inputs)) if method == "awq" else None
            for x in inputs:
                block(x, *arguments[index])
                if sums is not None:
                    sums.end_pass()
            if samples is not None:
                awq.scale_block(
                    block, samples.remove(), group_size, sym, _rounded, not model.config.shared_attention_norm
                )
                samples = awq.InputSamples(block, len(inputs))  # the inputs again, as the scaled block sees them
                for x in inputs:
                    block(x, *arguments[index])
                awq.clip_block(block, samples.remove(), group_size, sym, _rounded)
            results = {}
            for name, linear in layers.items():
                G = linear.in_features if group_size == -1 else group_size
                if method == "gptq":
                    results[name] = gptq(linear.weight, sums.hessian(name), G, sym, act_order, damp, bits)
                else:
                    results[name] = rtn(linear.weight, G, sym, bits)
                linear.weight.copy_(results[name].dequantized().to(linear.weight.dtype))
            if sums is not None:
                sums.remove()
            inputs = [block(x, *arguments[index]) for x in inputs]  # the next block sees the quantized weights
            for name, result in results.items():
                set_module(block, name, result.linear(layers[name].bias))
            log(f"block {index}: {len(layers)} layers, {time.perf_counter() - started:.1f} s")
    packed = "awq" if method == "awq" else "gptq"
    model.quantization = {"mode": f"int{bits}", "group_size": group_size, "packed": packed}
    return finish_loading(model)  # as a loaded one: q, k and v of one act order share it and one kernel call


def check_bits(method: str, bits: int) -> None:
    """One error naming the widths `method` writes, unless it writes `bits`."""
    if bits not in BITS.get(method, ()):
        why = " (AWQ's GEMM layout is 4-bit only; --method gptq and rtn write 8)" if method == "awq" else ""
        written = "/".join(map(str, BITS.get(method, ())))
        raise InvalidInput(f"--bits {bits} is not supported by --method {method}, which writes {written} bits{why}")


def _rounded(weight: torch.Tensor, group_size: int, sym: bool) -> torch.Tensor:
    """A weight rounded to nearest on GPTQ's grid, as floats (AWQ's search rounds its candidates so)."""
    return rtn(weight, weight.shape[1] if group_size == -1 else group_size, sym).dequantized()


# --- the command ---
def calibration_ids(tokenizer: Tokenizer, path: Path, samples: int, length: int) -> torch.Tensor:
    """`samples` windows of `length` tokens (samples, length), spread evenly over the text of a .txt or .jsonl
    file (its documents' tokens one after another), or one error saying how many tokens are needed."""
    tokens = [t for document in read_documents(path, "--calibration") for t in tokenizer.encode(document)]
    if len(tokens) < samples * length:
        raise InvalidInput(
            f"--calibration {path}: {len(tokens)} tokens, but --samples {samples} of --length {length} need "
            f"{samples * length}; pass a longer file, or fewer or shorter samples"
        )
    starts = torch.linspace(0, len(tokens) - length, samples).long().tolist()
    return torch.tensor([tokens[start : start + length] for start in starts])


def quantize(
    model: Path,
    out_dir: Path,
    method: str = "gptq",
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    sym: bool = False,
    calibration: Path | None = None,
    samples: int = 128,
    length: int = 512,
    damp: float = 0.01,
) -> None:
    """Quantize a model's Linear layers to 4 or 8 bits and write a Hugging Face GPTQ (or AWQ) directory.

    Args:
        model: A plainlm checkpoint, a Hugging Face model directory or a .gguf file, in float.
        out_dir: The GPTQ (AWQ) directory to write (config.json with its quantization_config, safetensors,
            tokenizer); `LLM.load` and transformers' GPTQ integration load it.
        method: gptq (error-compensated rounding from calibration text), awq (activation-aware scales
            from calibration text, then round to nearest) or rtn (round to nearest).
        bits: Bits a weight: 4, or 8 (gptq and rtn; AWQ's format is 4-bit only).
        group_size: Inputs sharing one scale and zero point; -1 for one group a row.
        act_order: gptq: round the inputs with the largest activations first (desc_act).
        sym: A grid symmetric about 0 (zero point 8, or 128 for 8 bits) instead of one fitted to each group's
            range.
        calibration: gptq, awq: a .txt file, or .jsonl with a "text" field a line, of text like the model's use.
        samples: gptq, awq: windows of calibration text.
        length: gptq, awq: tokens a window.
        damp: gptq: added to the Hessian's diagonal, as a fraction of its mean.
    """
    from plainlm.api import LLM  # on use: the command loads a model, the module's functions do not
    from plainlm.checkpoint import check_output_path, save_checkpoint
    from plainlm.convert.hf import convert_to_hf

    if method not in METHODS:
        raise InvalidInput(f"--method {method!r} is not one of {', '.join(METHODS)}")
    check_bits(method, bits)
    if group_size != -1 and group_size < 1:
        raise InvalidInput(f"--group_size {group_size} is not a size; pass a positive size, or -1 for whole rows")
    if method != "rtn" and calibration is None:
        raise InvalidInput(f"--method {method} needs --calibration FILE (.txt or .jsonl) of text like the model's use")
    if samples < 1 or length < 2 or damp < 0:
        raise InvalidInput("--samples must be >= 1, --length >= 2 and --damp >= 0")
    out = check_output_path(out_dir, "out_dir")
    llm = LLM.load(model, dtype="float32")
    if llm.model.quantization is not None:
        raise InvalidInput(f"{model} is already quantized ({llm.model.quantization['mode']}); quantize a float model")
    ids = calibration_ids(llm.tokenizer, calibration, samples, length) if method != "rtn" else None
    started = time.perf_counter()
    quantize_blocks(llm.model, method, group_size, sym, act_order, damp, ids, bits=bits)
    with tempfile.TemporaryDirectory(prefix="plainlm-quantize-") as scratch:
        save_checkpoint(llm.model, scratch)
        llm.tokenizer.save(scratch)
        convert_to_hf(scratch, out)
    print(f"{method} in {time.perf_counter() - started:.1f} s: {out}")
