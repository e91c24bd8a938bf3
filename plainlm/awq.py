"""AWQ's activation-aware scales (Lin et al. 2023), for `plainlm quantize --method awq` (gptq.py runs it).

Rounding hurts most on the input channels whose activations are large. AWQ multiplies those columns of a
layer's weight by s > 1 before rounding to the grid and divides the layer's input by s, which leaves the
float product unchanged but rounds the important weights on a finer relative grid. The division is folded
into whatever produces the input, so it costs nothing at run time:

    q, k, v      read attn_norm's output: its RMSNorm weight is divided by s
    gate, up     read mlp_norm's output: likewise
    o_proj       reads the attention's output, whose channels are v_proj's rows (when there is one key/value
                 head a query head; with grouped heads the rows repeat, and this pair is left unscaled)
    down_proj    reads act(gate) * up: up_proj's rows are divided by s

Multi-head latent attention (DeepSeek-V3, Kimi K2) has no v_proj: q_a_proj (or q_proj) and kv_a_proj read
attn_norm's output, and q_b_proj and kv_b_proj read the latents' own norms, each folded the same way; its
o_proj reads heads expanded from the latent and is left unscaled.

s = mean|x|^alpha per input channel (normalised by the square root of its largest times its smallest), alpha
searched over 0, 1/20, ..., 19/20 for the smallest squared error of the layers' outputs on the calibration
inputs, every candidate rounded by round-to-nearest on GPTQ's grid (gptq.rtn).

Then AWQ's second search (clip_block), on the scaled weights: for each group of each output row, the largest
|w| kept, tried at 1, 0.95, ..., 0.55 of the group's own, for the smallest squared error of that group's
share of the output on the calibration inputs. A group's grid spans its largest weight; a rare outlier
clipped to a smaller bound costs less than the coarser steps it forces on every other weight. q_proj and
k_proj are not clipped (their error shows through the attention scores, which this error does not see).
"""

from __future__ import annotations

import torch
import torch.nn as nn

GRID = 20  # alphas tried: 0, 1/20, ..., 19/20
SEARCH_ROWS = 4096  # calibration rows a search multiplies (a random subset of more)
CLIP_STEPS = 10  # bounds tried: 1, 0.95, ..., 0.55 of a group's largest |w| (AutoAWQ's grid and reach)
CLIP_ROWS = 512  # calibration rows a clip search multiplies


def search_scales(
    x: torch.Tensor, layers: list[nn.Linear], group_size: int, sym: bool, rounding: callable
) -> torch.Tensor:
    """The per-input-channel scales s (K,) for `layers`, which all read inputs x (rows, K), that minimise the
    squared error of their rounded outputs; `rounding(weight, group_size, sym)` gives a weight's rounded float."""
    if x.shape[0] > SEARCH_ROWS:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:SEARCH_ROWS]]
    weights = [layer.weight.detach().float() for layer in layers]
    expected = [x @ w.T for w in weights]
    magnitude = x.abs().mean(dim=0)
    best, best_error = torch.ones_like(magnitude), float("inf")
    for step in range(GRID):
        scales = magnitude.pow(step / GRID).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        error = 0.0
        for w, y in zip(weights, expected, strict=True):
            rounded = rounding(w * scales, group_size, sym) / scales
            error += ((x @ rounded.T - y) ** 2).mean().item()
        if error < best_error:
            best, best_error = scales, error
    return best


def divide_norm(norm: nn.Module, scales: torch.Tensor) -> None:
    """Fold 1/s into an RMSNorm's weight (Gemma's stores weight - 1)."""
    if norm.unit_offset:
        norm.weight.copy_((1 + norm.weight.float()) / scales - 1)
    else:
        norm.weight.div_(scales.to(norm.weight.dtype))


def divide_rows(layer: nn.Linear, scales: torch.Tensor) -> None:
    """Fold 1/s into the layer whose outputs are the next layer's inputs: its rows (and bias) divided."""
    layer.weight.div_(scales[:, None].to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.div_(scales.to(layer.bias.dtype))


def scale_block(
    block: nn.Module,
    inputs: dict[str, torch.Tensor],
    group_size: int,
    sym: bool,
    rounding: callable,
    separate_norms: bool = True,
) -> list[str]:
    """Search and apply AWQ's scales in one transformer block, in place: `inputs` holds the calibration inputs
    (rows, K) of the layers that InputSamples.READERS names, as the float block computed them. `separate_norms`
    False (one norm feeding attention and MLP): the norms are left as they are. Returns the layers whose inputs
    were scaled, for the log."""
    attn, mlp, scaled = block.attn, block.mlp, []
    with torch.no_grad():
        first_mlp = [mlp.gate_proj, mlp.up_proj] if mlp.gated else [mlp.up_proj]
        pairs = [(mlp.up_proj if mlp.gated else None, [mlp.down_proj], "down_proj", divide_rows)]
        latent = not hasattr(attn, "v_proj")  # multi-head latent attention
        if latent:  # readers: the layers that read attn_norm's output
            readers = [attn.q_a_proj if hasattr(attn, "q_a_proj") else attn.q_proj, attn.kv_a_proj]
            pairs.append((attn.kv_a_norm, [attn.kv_b_proj], "kv_b_proj", divide_norm))
            if hasattr(attn, "q_a_proj"):
                pairs.append((attn.q_a_norm, [attn.q_b_proj], "q_b_proj", divide_norm))
        else:
            readers = [attn.q_proj, attn.k_proj, attn.v_proj]
        if separate_norms:
            pairs += [
                (block.attn_norm, readers, "kv_a_proj" if latent else "q_proj", divide_norm),
                (block.mlp_norm, first_mlp, "gate_proj" if mlp.gated else "up_proj", divide_norm),
            ]
        if not latent and attn.v_proj.out_features == attn.o_proj.in_features:  # one key/value head a query head
            pairs.append((attn.v_proj, [attn.o_proj], "o_proj", divide_rows))
        for previous, layers, reader, fold in pairs:
            if previous is None or not hasattr(previous, "weight") or reader not in inputs:
                continue
            if fold is divide_norm and not hasattr(previous, "unit_offset"):  # a LayerNorm: not folded here
                continue
            scales = search_scales(inputs[reader], layers, group_size, sym, rounding)
            fold(previous, scales)
            for layer in layers:
                layer.weight.mul_(scales.to(layer.weight.dtype))
            scaled.append(reader)
    return scaled


def clip_block(
    block: nn.Module, inputs: dict[str, torch.Tensor], group_size: int, sym: bool, rounding: callable
) -> list[str]:
    """Clip the weights of v_proj, o_proj and the MLP's layers in one (scaled) transformer block, in place, to
    the bounds clip_search finds; `inputs` are the layers' calibration inputs as InputSamples gathered them
    after scale_block. Returns the layers clipped, for the log."""
    mlp_reader = "gate_proj" if block.mlp.gated else "up_proj"
    readers = {"attn.o_proj": "o_proj", "mlp.up_proj": mlp_reader, "mlp.down_proj": "down_proj"}
    if hasattr(block.attn, "v_proj"):  # not multi-head latent attention, whose values come from kv_b_proj
        readers["attn.v_proj"] = "q_proj"
    if block.mlp.gated:
        readers["mlp.gate_proj"] = "gate_proj"
    clipped = []
    with torch.no_grad():
        for name, reader in readers.items():
            if reader in inputs:
                layer = block.get_submodule(name)
                layer.weight.copy_(clip_search(layer.weight, inputs[reader], group_size, sym, rounding))
                clipped.append(name)
    return clipped


def clip_search(weight: torch.Tensor, x: torch.Tensor, group_size: int, sym: bool, rounding: callable) -> torch.Tensor:
    """weight (N, K) with each group of each row clipped to the bound, of CLIP_STEPS tried, whose rounded group
    gives the smallest mean squared error of its share of the output x @ w^T on inputs x (rows, K)."""
    N, K = weight.shape
    G = K if group_size == -1 else group_size
    if x.shape[0] > CLIP_ROWS:
        x = x[:: x.shape[0] // CLIP_ROWS][:CLIP_ROWS]
    xs, w = x.float().reshape(-1, K // G, G), weight.float().reshape(N, K // G, G)
    expected = torch.einsum("tgj,ogj->otg", xs, w)  # each group's share of each output, row by row
    largest = w.abs().amax(dim=-1, keepdim=True)  # (N, groups, 1)
    best, best_error = largest, torch.full_like(largest, float("inf"))
    for step in range(CLIP_STEPS):
        bound = largest * (1 - step / GRID)
        rounded = rounding(torch.maximum(torch.minimum(w, bound), -bound).reshape(N, K), group_size, sym)
        shares = torch.einsum("tgj,ogj->otg", xs, rounded.reshape(N, K // G, G))
        error = (shares - expected).pow(2).mean(dim=1).unsqueeze(-1)  # (N, groups, 1)
        better = error < best_error
        best, best_error = torch.where(better, bound, best), torch.where(better, error, best_error)
    return torch.maximum(torch.minimum(w, best), -best).reshape(N, K).to(weight.dtype)


class InputSamples:
    """Rows of the inputs that a block's layers named in READERS read over the calibration batches (forward
    hooks), at most SEARCH_ROWS of each, drawn evenly from every batch."""

    READERS = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "kv_a_proj", "q_b_proj", "kv_b_proj")

    def __init__(self, block: nn.Module, batches: int) -> None:
        self.per_batch = max(1, SEARCH_ROWS // max(batches, 1))
        self.rows: dict[str, list[torch.Tensor]] = {}
        self._handles = [
            module.register_forward_hook(self._hook(name.rpartition(".")[2]))
            for name, module in block.named_modules()
            if name.rpartition(".")[2] in self.READERS
        ]

    def _hook(self, name: str):  # noqa: ANN202 (a forward hook)
        def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            rows = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            step = max(1, rows.shape[0] // self.per_batch)
            self.rows.setdefault(name, []).append(rows[::step][: self.per_batch])

        return keep

    def remove(self) -> dict[str, torch.Tensor]:
        """Stop gathering; the rows by layer name."""
        for handle in self._handles:
            handle.remove()
        return {name: torch.cat(rows) for name, rows in self.rows.items()}
