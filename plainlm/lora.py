"""LoRA and DoRA adapters: inject into chosen Linear layers, merge into the base, save and load
in the PEFT layout (so `peft`, `transformers` and serving engines read our adapters, and we read theirs).

    lora = LoRAConfig(r=8, alpha=16, targets=["q", "v"])
    inject_lora(model, lora)            # wraps the chosen layers; only adapter parameters train
    save_peft_adapter(model, lora, "out/adapter")
    merge_lora(model)                   # folds the adapters into plain Linear layers again

A LoRA layer adds scaling * B(A(dropout(x))) to the frozen base layer's output, with
scaling = alpha / r. DoRA (use `dora=True`) also learns a magnitude per output row:
output = m / ||W + scaling * B A||_row * (W x + scaling * B A x) + bias, the norm held constant
in the backward pass as in the DoRA paper and in PEFT. The target `experts` adapts a mixture of experts'
stacked weights (model.Experts: gate_up_proj and down_proj) with one A and B per expert, as peft's
`target_parameters` does, and is saved and read in its layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from plainlm.config import Config
from plainlm.convert.hf_weights import peft_experts, weight_rules
from plainlm.errors import CheckpointError, InvalidInput
from plainlm.grouped_mm import grouped_mm
from plainlm.model import Experts

# Short target names -> the suffix of the module paths they select in `GPT`.
TARGETS = {
    "q": "attn.q_proj",
    "k": "attn.k_proj",
    "v": "attn.v_proj",
    "o": "attn.o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
    "lm_head": "lm_head",
    "experts": "mlp.experts",  # both stacked weights of every expert (LoRAExperts)
}
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")  # peft nests its wrappers in this order: the first innermost
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    """Which layers get adapters, and their size: the `lora:` section of a finetune recipe.

    Args:
        r: The rank of each adapter (its two matrices are r x in and out x r).
        alpha: Scales the adapter's output by alpha / r.
        dropout: Dropout on the adapter's input while training.
        targets: The layers that get adapters: q, k, v, o (attention), gate, up, down (MLP), lm_head,
            experts (a mixture of experts' stacked weights; not with dropout or DoRA, as in peft).
        dora: DoRA: also learn a magnitude per output row (method dora sets it).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    dora: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown:
            raise InvalidInput(f"unknown LoRA targets {unknown}; choose from {', '.join(TARGETS)}")
        if self.r < 1:
            raise InvalidInput(f"LoRA rank r must be >= 1, got {self.r}")
        if "experts" in self.targets and (self.dropout or self.dora):
            # x reaches each expert as a sorted copy: peft's expert adapters have neither either
            raise InvalidInput("LoRA on experts takes no dropout and no DoRA: set dropout 0, or drop the target")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def lora_for_method(lora: LoRAConfig, method: str) -> LoRAConfig | None:
    """The adapters a training method puts on the model: none for full training or pretraining, and
    for dora the config with its learned magnitude switched on."""
    if method not in ("lora", "dora", "qlora"):
        return None
    return dataclasses.replace(lora, dora=lora.dora or method == "dora")


class LoRALinear(nn.Module):
    """A frozen base layer (nn.Linear or a quantized one) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, dora: bool) -> None:
        super().__init__()
        self.base = base
        out_features, in_features = base.out_features, base.in_features
        device = base_weight(base).device
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT: B = 0 makes the start exact
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.magnitude = nn.Parameter(self._weight_norm().detach()) if dora else None
        self.enabled = True  # off: the base layer alone (a preference loss's reference model, adapters_disabled)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def _weight_norm(self) -> torch.Tensor:
        weight = base_weight(self.base).float()
        return (weight + self.delta_weight().float()).norm(p=2, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        dropped = self.dropout(x)
        # Scale the small B (out, r) rather than the large output (batch, time, out).
        lora = F.linear(F.linear(dropped, self.lora_A.to(x.dtype)), (self.lora_B * self.scaling).to(x.dtype))
        if self.magnitude is None:
            return out + lora
        scale = (self.magnitude / self._weight_norm().detach()).to(x.dtype)
        bias = getattr(self.base, "bias", None)
        plain = out - bias if bias is not None else out
        if self.training and not isinstance(self.dropout, nn.Identity):  # PEFT scales W(dropout(x)) then
            plain = F.linear(dropped, base_weight(self.base).to(x.dtype))
        return out + (scale - 1) * plain + scale * lora

    def merged(self) -> nn.Linear:
        """A plain Linear equal to this layer (in eval mode)."""
        base = base_weight(self.base)
        weight = base.float() + self.delta_weight().float()
        if self.magnitude is not None:
            weight = weight * (self.magnitude / weight.norm(p=2, dim=1))[:, None]
        bias = getattr(self.base, "bias", None)
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device)
        linear.weight.data = weight.to(base.dtype)
        if bias is not None:
            linear.bias.data = bias.data.clone()
        return linear


class ExpertAdapter(nn.Module):
    """One stacked expert weight's adapter: lora_A (E, r, in) and lora_B (E, out, r), expert e's update
    scaling * lora_B[e] @ lora_A[e]."""

    def __init__(self, weight: torch.Tensor, r: int) -> None:
        super().__init__()
        E, out_features, in_features = weight.shape
        self.lora_A = nn.Parameter(torch.empty(E, r, in_features, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(E, out_features, r, device=weight.device))
        # as peft initialises its (E * r, in) matrix: kaiming over the stacked rows, B = 0 makes the start exact
        nn.init.kaiming_uniform_(self.lora_A.data.view(E * r, in_features), a=math.sqrt(5))


class LoRAExperts(nn.Module):
    """model.Experts with a low-rank update on each expert's gate_up_proj and down_proj. The update runs
    as two more grouped matmuls over the rows routed to each expert (never a merged (E, out, in) copy)."""

    def __init__(self, base: Experts, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict({name: ExpertAdapter(getattr(base, name), r) for name in EXPERT_WEIGHTS})
        self.scaling = alpha / r
        self.enabled = True  # as LoRALinear.enabled

    def forward(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        return self.base(x, weights, chosen, project=self.project)

    def project(self, name: str, rows: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        out = self.base.project(name, rows, ends)
        if not self.enabled:
            return out
        adapter = self.adapters[name]
        down = grouped_mm(rows, adapter.lora_A.to(rows.dtype), ends)
        return out + grouped_mm(down, (adapter.lora_B * self.scaling).to(rows.dtype), ends)

    def delta_weight(self, name: str) -> torch.Tensor:
        adapter = self.adapters[name]
        return torch.bmm(adapter.lora_B.float(), adapter.lora_A.float()) * self.scaling

    def merged(self) -> Experts:
        """The base Experts with every update folded into its weights."""
        with torch.no_grad():
            for name in EXPERT_WEIGHTS:
                weight = getattr(self.base, name)
                weight.copy_((weight.float() + self.delta_weight(name)).to(weight.dtype))
        return self.base


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run `model` as its base inside this block: every LoRA / DoRA layer adds nothing. The reference model of
    a preference loss, without a second copy of the weights."""
    layers = [m for m in model.modules() if isinstance(m, (LoRALinear, LoRAExperts))]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def base_weight(module: nn.Module) -> torch.Tensor:
    """The base layer's weight as a float matrix (quantized layers dequantize)."""
    if hasattr(module, "dequantized_weight"):  # plainlm's int8 / int4 layers
        return module.dequantized_weight()
    quant_state = getattr(module.weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes' NF4 Linear4bit (QLoRA)
        # on use: bitsandbytes is optional, for qlora only
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(module.weight.data, quant_state)
    return module.weight


def lora_module_names(model: nn.Module, targets: list[str]) -> list[str]:
    suffixes = tuple(TARGETS[t] for t in targets)
    return [
        name
        for name, module in model.named_modules()
        if name.endswith(suffixes)
        and (isinstance(module, Experts) or (not isinstance(module, LoRALinear) and hasattr(module, "in_features")))
    ]


def inject_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap every targeted layer in a LoRALinear and freeze everything else; returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = lora_module_names(model, config.targets)
    if not names:
        raise InvalidInput(f"no layer of this model matches the LoRA targets {config.targets}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if isinstance(module, Experts):
            setattr(parent, child, LoRAExperts(module, config.r, config.alpha))
            continue
        # A tied head keeps sharing its (frozen) base weight with the embedding; the adapter is the head's alone.
        setattr(parent, child, LoRALinear(module, config.r, config.alpha, config.dropout, config.dora))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by the plain Linear it equals."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (LoRALinear, LoRAExperts)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.merged())
    return model


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter parameters, under plainlm names."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "magnitude")}


# --- the PEFT layout ---
def _hf_module_names(config: Config) -> dict[str, str]:
    """plainlm module path -> Hugging Face module path, for layers stored one to one."""
    names = {}
    for rule in weight_rules(config):
        if len(rule.ours) == 1 and rule.ours[0].endswith(".weight") and rule.hf.endswith(".weight"):
            names[rule.ours[0].removesuffix(".weight")] = rule.hf.removesuffix(".weight")
    if config.tie_embeddings:
        names["lm_head"] = "lm_head"
    return names


def _hf_experts_names(config: Config) -> dict[str, tuple[str, bool] | None]:
    """plainlm path of each layer's experts -> where transformers holds them and whether their gate_up_proj
    alternates gate and up outputs (hf_weights.peft_experts; None: a layout plainlm does not map)."""
    return {f"blocks.{i}.mlp.experts": peft_experts(config, i) for i in range(config.n_layer) if config.is_moe(i)}


# peft's factors of a stacked weight: A (E * r, in), expert e's rows e*r..e*r+r-1; B (out, r * E), expert e's
# columns e, E + e, 2E + e, ... (its (out, r, E) view). Where transformers' gate_up_proj alternates gate and up
# outputs (gpt-oss), B's rows alternate too; ours come gate rows first.
def _to_peft(adapter: ExpertAdapter, alternating: bool) -> tuple[torch.Tensor, torch.Tensor]:
    E, r, in_features = adapter.lora_A.shape
    lora_B = adapter.lora_B.detach().permute(1, 2, 0).reshape(-1, r * E)
    if alternating:
        gate, up = lora_B.chunk(2)
        lora_B = torch.stack((gate, up), dim=1).flatten(0, 1)
    return adapter.lora_A.detach().reshape(E * r, in_features).contiguous(), lora_B.contiguous()


def _from_peft(lora_A: torch.Tensor, lora_B: torch.Tensor, n_expert: int, alternating: bool) -> LayerAdapter:
    if alternating:
        lora_B = torch.cat((lora_B[0::2], lora_B[1::2]))
    E, out_features = n_expert, lora_B.shape[0]
    return LayerAdapter(
        lora_A.reshape(E, -1, lora_A.shape[-1]), lora_B.reshape(out_features, -1, E).permute(2, 0, 1), None
    )


def save_peft_adapter(model: nn.Module, lora: LoRAConfig, directory: str | Path, base_model: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors with PEFT's key names."""
    config: Config = model.config
    hf_names = _hf_module_names(config)
    tensors, target_modules = {}, set()
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        if name not in hf_names:
            raise InvalidInput(
                f"{name}: Hugging Face stores this layer fused with others in {config.hf_model_type}, "
                "which the PEFT layout cannot express; merge the adapter instead (plainlm merge-lora)"
            )
        hf = PEFT_PREFIX + hf_names[name]
        tensors[f"{hf}.lora_A.weight"] = module.lora_A.detach().contiguous()
        tensors[f"{hf}.lora_B.weight"] = module.lora_B.detach().contiguous()
        if module.magnitude is not None:
            tensors[f"{hf}.lora_magnitude_vector"] = module.magnitude.detach().contiguous()
        target_modules.add(hf_names[name].rsplit(".", 1)[-1])
    target_parameters = set()
    experts_names = _hf_experts_names(config)
    for name, module in model.named_modules():
        if not isinstance(module, LoRAExperts):
            continue
        if experts_names[name] is None:
            raise InvalidInput(
                f"{name}: transformers holds {config.hf_model_type}'s experts in another layout than plainlm's, "
                "which plainlm does not write as a PEFT adapter yet; merge the adapter instead (plainlm merge-lora)"
            )
        hf, alternating = experts_names[name]
        # peft wraps the targeted weights one inside the other, the first innermost (under .base_layer)
        for depth, weight_name in enumerate(reversed(EXPERT_WEIGHTS)):
            key = PEFT_PREFIX + hf + ".base_layer" * depth
            factors = _to_peft(module.adapters[weight_name], alternating and weight_name == "gate_up_proj")
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = factors
            target_parameters.add(re.sub(r"^.*\.layers\.\d+\.", "", hf) + "." + weight_name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or config.hf_repo,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(target_modules),
        **({"target_parameters": sorted(target_parameters)} if target_parameters else {}),
        "use_dora": lora.dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
    return directory


@dataclass
class LayerAdapter:
    """One layer's adapter as stored: A (r, in), B (out, r), and DoRA's magnitude (out,) or None."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    magnitude: torch.Tensor | None


@dataclass
class PeftAdapter:
    """An adapter directory read and checked against one model: its config and its layers' tensors."""

    lora: LoRAConfig
    layers: dict[str, LayerAdapter]  # plainlm module path -> its tensors
    # plainlm path of a layer's experts -> stacked weight name -> A (E, r, in), B (E, out, r)
    experts: dict[str, dict[str, LayerAdapter]]
    weights_file: Path  # for messages


def read_peft_adapter(model: nn.Module, directory: str | Path) -> PeftAdapter:
    """Read the adapter in `directory` (saved by us or by `peft`) and check that it fits `model`: every layer
    it names exists here, with the rank its config says and the layer's input and output sizes. Touches
    nothing in `model`; raises CheckpointError saying what does not fit."""
    directory = Path(directory)
    config_file = directory / ADAPTER_CONFIG
    if not config_file.exists():
        raise CheckpointError(f"{directory}: no {ADAPTER_CONFIG}; is this a LoRA adapter directory?")
    try:
        raw = json.loads(config_file.read_text())
        r, alpha = int(raw["r"]), float(raw["lora_alpha"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{config_file}: not a PEFT LoRA config ({e!r}); it needs r and lora_alpha") from None
    if raw.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{config_file}: peft_type {raw['peft_type']!r} is not LoRA")
    if raw.get("rank_pattern") or raw.get("alpha_pattern") or raw.get("use_rslora"):
        raise CheckpointError(f"{config_file}: rank_pattern, alpha_pattern and rsLoRA are not supported")
    weights_file = directory / ADAPTER_WEIGHTS
    if not weights_file.exists() and (directory / "adapter_model.bin").exists():
        weights_file = directory / "adapter_model.bin"
    try:
        if weights_file.suffix == ".bin":
            tensors = torch.load(weights_file, map_location="cpu", weights_only=True)
        else:
            tensors = load_file(str(weights_file))
    except FileNotFoundError:
        message = f"{directory}: no {ADAPTER_WEIGHTS} (nor adapter_model.bin) next to {ADAPTER_CONFIG}"
        raise CheckpointError(message) from None
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError) as e:
        message = f"{weights_file}: cannot be read as adapter weights ({e}); save the adapter again"
        raise CheckpointError(message) from None
    ours_by_hf = {hf: ours for ours, hf in _hf_module_names(model.config).items()}
    layouts = _hf_experts_names(model.config)
    experts_by_hf = {layout[0]: ours for ours, layout in layouts.items() if layout is not None}
    model_type = model.config.hf_model_type
    hf_by_ours, expert_keys = {}, {}
    for key in tensors:
        if ".lora_" not in key:
            if ".base_layer." in key:  # peft's copy of a frozen base weight it may resize (lm_head, embeddings)
                continue
            # modules_to_save, trained biases: whole weights this reader would drop
            raise CheckpointError(f"{weights_file}: {key} is not a LoRA weight; plainlm reads LoRA and DoRA only")
        hf = key.removeprefix(PEFT_PREFIX).split(".lora_")[0]
        module, depth = hf, 0
        while module.endswith(".base_layer"):  # peft's nested wrappers of one module's weights
            module, depth = module.removesuffix(".base_layer"), depth + 1
        if module in experts_by_hf:
            expert_keys[experts_by_hf[module], depth] = hf
            continue
        if hf not in ours_by_hf:
            raise CheckpointError(f"{weights_file}: {key} names no layer of this {model_type} model")
        hf_by_ours[ours_by_hf[hf]] = hf
    dora = bool(raw.get("use_dora", False))
    layers = {}
    for ours, hf in hf_by_ours.items():
        parts = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if dora else ())
        stored = {part: tensors.get(f"{PEFT_PREFIX}{hf}.{part}") for part in parts}
        missing = [part for part, tensor in stored.items() if tensor is None]
        if missing:
            raise CheckpointError(f"{weights_file}: {hf} has no {', '.join(missing)}")
        layer = model.get_submodule(ours)
        expected = {
            "lora_A.weight": (r, layer.in_features),
            "lora_B.weight": (layer.out_features, r),
            "lora_magnitude_vector": (layer.out_features,),
        }
        for part, tensor in stored.items():
            if tuple(tensor.shape) != expected[part]:
                raise CheckpointError(
                    f"{weights_file}: {hf}.{part} has shape {tuple(tensor.shape)}, but rank {r} over this model's "
                    f"{ours} ({layer.in_features} -> {layer.out_features}) needs {expected[part]}: "
                    "was the adapter trained on another base model?"
                )
        layers[ours] = LayerAdapter(
            stored["lora_A.weight"], stored["lora_B.weight"], stored.get("lora_magnitude_vector")
        )
    targeted = raw.get("target_parameters") or []
    experts = _read_expert_adapters(model, layouts, tensors, expert_keys, targeted, r, weights_file)
    if not layers and not experts:
        raise CheckpointError(f"{weights_file}: holds no LoRA weights")
    targets = sorted({t for t, suffix in TARGETS.items() for m in [*layers, *experts] if m.endswith(suffix)})
    lora = LoRAConfig(r=r, alpha=alpha, dropout=raw.get("lora_dropout", 0.0), targets=targets, dora=dora)
    return PeftAdapter(lora, layers, experts, weights_file)


def _read_expert_adapters(
    model: nn.Module,
    layouts: dict[str, tuple[str, bool] | None],
    tensors: dict[str, torch.Tensor],
    expert_keys: dict[tuple[str, int], str],
    target_parameters: list[str],
    r: int,
    weights_file: Path,
) -> dict[str, dict[str, LayerAdapter]]:
    """The expert adapters among `tensors` (expert_keys: (plainlm experts path, wrapper depth) -> peft's
    module path), each checked against the stacked weight it adapts; layouts: _hf_experts_names."""
    # Which stacked weights the adapter targets, in peft's nesting order: the first targeted is the innermost.
    targeted = [w for w in EXPERT_WEIGHTS if any(p.endswith("." + w) for p in target_parameters)]
    experts: dict[str, dict[str, LayerAdapter]] = {}
    for (ours, depth), hf in expert_keys.items():
        if depth >= len(targeted):
            raise CheckpointError(
                f"{weights_file}: {hf} is one of more expert weights than adapter_config.json's target_parameters "
                f"({target_parameters}) name"
            )
        weight_name = targeted[len(targeted) - 1 - depth]
        lora_A, lora_B = (tensors.get(f"{PEFT_PREFIX}{hf}.lora_{part}.weight") for part in "AB")
        if lora_A is None or lora_B is None:
            raise CheckpointError(f"{weights_file}: {hf} needs both lora_A.weight and lora_B.weight")
        E, out_features, in_features = model.get_submodule(ours).get_parameter(weight_name).shape
        expected = {"lora_A": (E * r, in_features), "lora_B": (out_features, r * E)}
        for part, tensor in (("lora_A", lora_A), ("lora_B", lora_B)):
            if tuple(tensor.shape) != expected[part]:
                raise CheckpointError(
                    f"{weights_file}: {hf}.{part}.weight has shape {tuple(tensor.shape)}, but rank {r} over this "
                    f"model's {ours}.{weight_name} ({E} experts, {in_features} -> {out_features}) needs "
                    f"{expected[part]}: was the adapter trained on another base model?"
                )
        alternating = layouts[ours][1] and weight_name == "gate_up_proj"
        experts.setdefault(ours, {})[weight_name] = _from_peft(lora_A, lora_B, E, alternating)
    return experts


def load_peft_adapter(model: nn.Module, directory: str | Path) -> LoRAConfig:
    """Inject and fill the adapter in `directory` (saved by us or by `peft`); returns its LoRAConfig."""
    adapter = read_peft_adapter(model, directory)
    # inject_lora adapts every layer its targets select: the file must hold them all (PEFT's
    # layers_to_transform, which adapts only some, would leave the others at B = 0 silently).
    missing = sorted(set(lora_module_names(model, adapter.lora.targets)) - set(adapter.layers) - set(adapter.experts))
    if missing:
        raise CheckpointError(f"{adapter.weights_file}: no adapter weights for {missing[:5]}")
    inject_lora(model, adapter.lora)
    with torch.no_grad():
        for name, weights in adapter.experts.items():
            # a stacked weight the adapter does not target keeps B = 0: it adds nothing
            for weight_name, stored in weights.items():
                module = model.get_submodule(name).adapters[weight_name]
                module.lora_A.copy_(stored.lora_A)
                module.lora_B.copy_(stored.lora_B)
        for name, stored in adapter.layers.items():
            module = model.get_submodule(name)
            module.lora_A.copy_(stored.lora_A)
            module.lora_B.copy_(stored.lora_B)
            if module.magnitude is not None:
                module.magnitude.copy_(stored.magnitude)
    return adapter.lora
