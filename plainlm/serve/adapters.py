"""Many LoRA adapters over one base model, each batch row applying only its own (no merged copies).

    adapters = AdapterSet(model)
    adapters.load("sql", "out/sql-adapter")     # PEFT layout: from `plainlm finetune` or from `peft`
    adapters.select(["sql", None, "chat"])      # before each forward: row i's adapter, None for the base
    logits = model(idx)                         # idx (3, T): row 0 through sql, row 1 the base, row 2 chat
    adapters.unload("chat")

An adapted layer becomes a MultiLoRALinear: its base layer (nn.Linear, or quantize.py's int8/int4 layers,
untouched) plus the adapters that target it. Its forward runs the base on the whole batch, then, for each
adapter present in the batch, takes that adapter's rows of the input (one index_select), computes their
low-rank update (two small matmuls) and adds it to those rows of the output (one index_add_). Rows of the
base, and rows whose adapter does not touch this layer, keep the base's output bit for bit; a batch with
no adapter rows costs the plain layer. This is the grouped form of punica / S-LoRA's per-row kernels: a
loop over the adapters in the batch (a few), not over its rows (up to the batch size).

DoRA adapters are served: their per-row magnitude rescaling (lora.LoRALinear's forward in eval mode) is
one scale per output feature, computed once at load from the dequantized base weight.

Layers are swapped lazily, when the first adapter that needs one loads, and back when the last one that
needs it unloads, so a layer no adapter touches runs as before. kernel_layers' project_together (q, k
and v, or gate and up, in one int8/int4 kernel call) runs an adapted layer's base in its shared call and
then asks the layer to add its rows' updates (`add_adapters`), so adapters cost that fusion nothing.

load, unload and select change the model's modules: call them between forward passes, never during one
(the serving engine does, from its loop's thread).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from plainlm.errors import CheckpointError, InvalidInput, NotFound
from plainlm.lora import LayerAdapter, LoRAConfig, base_weight, read_peft_adapter
from plainlm.model import GPT


@dataclass
class ServedLayerAdapter:
    """One adapter on one layer, ready to apply: update = (x @ lora_A^T) @ scaled_B^T, with the LoRA scaling
    alpha / r folded into scaled_B; for DoRA, dora_scale = magnitude / ||W + scaling * B A|| per output row."""

    lora_A: torch.Tensor  # (r, in)
    scaled_B: torch.Tensor  # (out, r)
    dora_scale: torch.Tensor | None  # (out,), DoRA only

    @classmethod
    def build(
        cls, stored: LayerAdapter, lora: LoRAConfig, base: nn.Module, dtype: torch.dtype, device: torch.device
    ) -> ServedLayerAdapter:
        A, B = stored.lora_A.to(device, torch.float32), stored.lora_B.to(device, torch.float32)
        dora_scale = None
        if stored.magnitude is not None:  # as LoRALinear: the norm of the merged weight, in fp32
            norm = (base_weight(base).float() + (B @ A) * lora.scaling).norm(p=2, dim=1)  # quantized: dequantized
            dora_scale = (stored.magnitude.to(device, torch.float32) / norm).to(dtype)
        return cls(A.to(dtype), (B * lora.scaling).to(dtype), dora_scale)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.scaled_B.to(x.dtype))

    def adapted(self, x: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The output of base + this adapter for input rows `x` whose base output is `out`."""
        if self.dora_scale is None:
            return out + self.update(x)
        scale = self.dora_scale.to(x.dtype)
        plain = out - bias if bias is not None else out
        return out + (scale - 1) * plain + scale * self.update(x)


class MultiLoRALinear(nn.Module):
    """A base layer plus named adapters; in each forward, the rows `select` gave an adapter get its update.

    active: set by AdapterSet.select for the next forward: (adapter, rows) for each adapter of this layer
    present in the batch, rows the batch indices (a tensor), or None when every row of the batch is that
    adapter's (then no index_select is needed). Empty: the base alone.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.adapters: dict[str, ServedLayerAdapter] = {}
        self.active: list[tuple[ServedLayerAdapter, torch.Tensor | None]] = []
        self.batch_rows = 0  # the batch size `active` was selected for

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_adapters(x, self.base(x))

    def add_adapters(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out`, the base layer's output for `x`, with each selected row's adapter update added (kernel_layers'
        project_together calls this after running the base in one kernel call with its neighbours)."""
        if not self.active:
            return out
        if x.shape[0] != self.batch_rows:
            raise InvalidInput(
                f"AdapterSet.select was given {self.batch_rows} rows, but this forward's batch has {x.shape[0]}: "
                "call select with one entry per batch row before each forward"
            )
        bias = getattr(self.base, "bias", None)
        for adapter, rows in self.active:
            if rows is None:
                out = adapter.adapted(x, out, bias)
            elif adapter.dora_scale is None:  # in place: the other rows stay the base's, bit for bit
                out.index_add_(0, rows, adapter.update(x.index_select(0, rows)))
            else:
                out.index_copy_(0, rows, adapter.adapted(x.index_select(0, rows), out.index_select(0, rows), bias))
        return out

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}"


class AdapterSet:
    """The adapters served over one base model; swaps the targeted Linear layers of `model` for MultiLoRALinear
    in place (lazily, when the first adapter needing a layer loads; the base output stays bit-identical for
    base rows). LoRA and DoRA adapters in the PEFT layout; not rank_pattern / alpha_pattern / rsLoRA, nor
    adapters on MoE experts (those layers see tokens, not batch rows)."""

    def __init__(self, model: GPT) -> None:
        self.model = model
        self.configs: dict[str, LoRAConfig] = {}  # name -> its config, in load order
        self.layers: dict[str, MultiLoRALinear] = {}  # module path -> the swapped layer

    @property
    def names(self) -> list[str]:
        return list(self.configs)

    def load(self, name: str, path: str | Path) -> None:
        """Serve the adapter in directory `path` as `name`. Everything is read and checked before the model
        changes, so a failed load (InvalidInput, CheckpointError) leaves the model exactly as it was."""
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"an adapter needs a non-empty name, got {name!r}")
        if name in self.configs:
            raise InvalidInput(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
        adapter = read_peft_adapter(self.model, path)
        if adapter.experts:
            raise CheckpointError(
                f"{path}: adapts MoE experts ({next(iter(adapter.experts))}, ...), which are not served per row; "
                "serve a merged model instead (plainlm merge-lora)"
            )
        dtype, device = self._activations()
        served = {
            layer: ServedLayerAdapter.build(stored, adapter.lora, self._base(layer), dtype, device)
            for layer, stored in adapter.layers.items()
        }
        for layer, weights in served.items():  # nothing below can fail
            if layer not in self.layers:
                self.layers[layer] = MultiLoRALinear(self.model.get_submodule(layer))
                self._set_module(layer, self.layers[layer])
            self.layers[layer].adapters[name] = weights
        self.configs[name] = adapter.lora

    def unload(self, name: str) -> None:
        """Stop serving `name`; layers no other adapter needs become their plain base layer again."""
        if name not in self.configs:
            raise NotFound(f"no adapter named {name!r} is loaded (loaded: {', '.join(self.names) or 'none'})")
        del self.configs[name]
        for path, layer in list(self.layers.items()):
            layer.adapters.pop(name, None)
            layer.active = []  # a selection naming the unloaded adapter is void: select again
            if not layer.adapters:
                self._set_module(path, layer.base)
                del self.layers[path]

    def select(self, rows: Sequence[str | None]) -> None:
        """Set which adapter each row of the next forward's batch uses: rows[i] a loaded name, or None for the
        base. NotFound for a name that is not loaded."""
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(rows):
            if name is not None:
                groups.setdefault(name, []).append(i)
        unknown = sorted(set(groups) - set(self.configs))
        if unknown:
            raise NotFound(f"no adapter named {unknown[0]!r} is loaded (loaded: {', '.join(self.names) or 'none'})")
        device = self.model.embed.weight.device
        indices = {
            name: None if len(batch_rows) == len(rows) else torch.tensor(batch_rows, device=device)
            for name, batch_rows in groups.items()
        }
        for layer in self.layers.values():
            layer.active = [(layer.adapters[name], index) for name, index in indices.items() if name in layer.adapters]
            layer.batch_rows = len(rows)

    def _activations(self) -> tuple[torch.dtype, torch.device]:
        # quantize.py's int8/int4 embeddings hold integers and say the activations' dtype themselves
        embed = self.model.embed
        return getattr(embed, "dtype", embed.weight.dtype), embed.weight.device

    def _base(self, path: str) -> nn.Module:
        module = self.model.get_submodule(path)
        return module.base if isinstance(module, MultiLoRALinear) else module

    def _set_module(self, path: str, module: nn.Module) -> None:
        parent_name, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, module)
