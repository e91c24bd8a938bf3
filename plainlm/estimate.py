"""`plainlm estimate`: the memory a finetune or pretrain recipe needs per device, read the way the run reads it.

    plainlm estimate --config recipes/finetune/smollm2-135m-instruct/lora.yaml --train.micro_batch_size 4
    plainlm estimate --config recipes/finetune/llama-3.1-8b/full.yaml --target a100-80gb --devices 8

The recipe is parsed by the training command's own parser (same keys, checks and overrides) and not
run; the model is only its Config (config.yaml, config.json or a GGUF file's metadata, or the named
config a missing checkpoint's folder is called after). The memory model itself is memory.py; this
file turns a recipe into its arguments, prints the table and, when the run does not fit, what to change.
`--target NAME` plans for one of gpus.py's cards instead of this machine's device: CUDA, bf16 where the
recipe says auto, and that card's memory. A recipe names the hardware it is written for in a comment
line `# target: NAME x N` (N processes, one per GPU), which the training commands do not read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml

from plainlm.checkpoint import CONFIG_FILE, detect_format
from plainlm.config import Config
from plainlm.convert.gguf_names import read_config
from plainlm.convert.gguf_reader import read_gguf
from plainlm.convert.hf import read_hf_config
from plainlm.device import resolve_device
from plainlm.distributed import check_process_counts, resolve_strategy
from plainlm.errors import InvalidInput, MissingInput, RecipeError
from plainlm.finetune import finetune
from plainlm.gpus import GPUS, GPUSpec, gpu_spec
from plainlm.lora import LoRAConfig
from plainlm.memory import PAIRS_NOTE, MemoryEstimate, available_bytes, estimate_memory, format_bytes
from plainlm.named_configs import NAMED_CONFIGS, config_for_name
from plainlm.pretrain import model_config_for, pretrain
from plainlm.recipe import config_paths, parse_recipe
from plainlm.tokenizer import Tokenizer
from plainlm.train import micro_batches_per_rank, resolve_precision


def read_model_config(checkpoint_dir: str | Path) -> tuple[Config, str | None]:
    """The Config of a plainlm checkpoint, Hugging Face directory or GGUF file, and a note when a
    missing checkpoint was replaced by the named config its folder is called after."""
    path = Path(checkpoint_dir)
    if not path.exists():
        if path.name in NAMED_CONFIGS:
            return config_for_name(path.name), f"{path} does not exist; using the named config {path.name!r}"
        raise MissingInput(
            f"{path}: no config.yaml, config.json or .gguf file, and {path.name!r} is no named config; "
            f"download the model first (plainlm download ORG/NAME) or point --checkpoint_dir to it"
        )
    kind = detect_format(path)
    if kind == "plainlm":
        return Config.from_file(path / CONFIG_FILE), None
    if kind == "hf":
        return read_hf_config(path), None
    return read_config(read_gguf(path), path), None


def suggestions(estimate: MemoryEstimate, micro_batch_size: int, rerun: Any) -> list[str]:
    """What would make a run that does not fit smaller, each with its new peak. micro_batch_size: the recipe's
    (pairs, for a preference loss; the estimate counts their rows)."""
    tries = []
    if micro_batch_size > 1:
        tries.append(("halve train.micro_batch_size", {"micro_batch_size": micro_batch_size // 2}))
    if not estimate.activation_checkpointing:
        tries.append(("set train.activation_checkpointing true", {"activation_checkpointing": True}))
    if estimate.method in ("full", "pretrain") and estimate.world_size > 1 and estimate.strategy != "fsdp":
        tries.append(("use strategy fsdp", {"strategy": "fsdp"}))
    if estimate.method in ("full", "lora", "dora"):
        tries.append(("use method qlora", {"method": "qlora"}))
    return [f"{what}: peak {format_bytes(rerun(**change).peak)}" for what, change in tries]


# --- plainlm estimate ---
def estimate_command(argv: list[str]) -> str:
    """`plainlm estimate --config RECIPE.yaml [--target GPU] [overrides]`: the estimate for a finetune or pretrain
    recipe, whether it fits the device the run will use (or the --target card), and what to change when it does not."""
    argv, target = target_option(argv)
    cfg, kind = parse_training_recipe(argv)
    estimate, device = estimate_from_recipe(cfg, kind, target)
    available = available_bytes(device, target)
    lines = [target_line(target, estimate.world_size)] if target else []
    lines.append(estimate.format(available, f"on one {target.name}" if target else "available"))
    if estimate.peak * estimate.processes_per_memory > available:
        rerun = lambda **change: estimate_from_recipe(cfg, kind, target, **change)[0]  # noqa: E731
        lines += [f"  try: {s}" for s in suggestions(estimate, cfg.train.micro_batch_size, rerun)]
    stated = [t for path in config_paths(argv) if (t := recipe_target(path))]
    if stated and target is None:
        name, n = stated[-1]
        lines.append(f"the recipe is written for {n} x {name}: --target {name} plans for that card here")
    return "\n".join(lines)


def estimate_command_result(argv: list[str]) -> MemoryEstimate:
    """The estimate `plainlm estimate ARGV` prints, as a MemoryEstimate."""
    argv, target = target_option(argv)
    return estimate_from_recipe(*parse_training_recipe(argv), target)[0]


def target_option(argv: list[str]) -> tuple[list[str], GPUSpec | None]:
    """`argv` without its --target NAME (estimate's own option, not the recipe's), and that card."""
    rest, name = [], None
    args = iter(argv)
    for arg in args:
        if arg == "--target":
            name = next(args, None)
            if name is None or name.startswith("--"):
                raise InvalidInput(f"--target needs a GPU name; known: {', '.join(GPUS)}")
        elif arg.startswith("--target="):
            name = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return rest, gpu_spec(name) if name is not None else None


def target_line(target: GPUSpec, processes: int) -> str:
    return (
        f"target: {processes} x {target.name} ({target.product}: {format_bytes(target.memory_bytes)}, "
        f"{target.bf16_flops / 1e12:.0f} TFLOP/s dense bf16, {target.memory_bandwidth / 1e12:.2f} TB/s), "
        "planned without one: cuda, bf16 where the recipe says auto"
    )


TARGET_LINE = re.compile(r"#\s*target:\s*(\S+)\s+x\s+(\d+)\s*")


def recipe_target(path: Path) -> tuple[str, int] | None:
    """The (GPU name, processes) a recipe's leading comments say it is written for (`# target: a100-80gb x 8`),
    or None. The training commands ignore the comment; `plainlm estimate --target` and the tests read it."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            return None  # the leading comment block only
        if match := TARGET_LINE.fullmatch(line.strip()):
            return match[1], int(match[2])
    return None


def parse_training_recipe(argv: list[str]) -> tuple[Any, str]:
    """The recipe read with the training command's own parser (same keys, checks and overrides), not instantiated."""
    kind = recipe_kind(argv)
    command = finetune if kind == "finetune" else pretrain
    return parse_recipe(command, f"plainlm estimate ({kind} recipe)", argv)[1], kind


def recipe_kind(argv: list[str]) -> str:
    """finetune or pretrain, by the recipe's keys: checkpoint_dir or tokenizer_dir."""
    keys = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    for path in config_paths(argv):
        if not path.exists():
            raise RecipeError(f"{path}: no such recipe file")
        data = yaml.safe_load(path.read_text()) or {}
        keys |= set(data) if isinstance(data, dict) else set()
    if "checkpoint_dir" in keys:
        return "finetune"
    if "tokenizer_dir" in keys:
        return "pretrain"
    raise RecipeError(
        "plainlm estimate reads a finetune recipe (with checkpoint_dir) or a pretrain recipe "
        "(with tokenizer_dir); pass --config RECIPE.yaml"
    )


def estimate_from_recipe(
    cfg: Any, kind: str, target: GPUSpec | None = None, **change: Any
) -> tuple[MemoryEstimate, str]:
    """The estimate for a parsed (not instantiated) recipe, on this machine's device or a `target` card;
    `change` overrides estimate_memory's arguments (its micro_batch_size counts examples or pairs, as the
    recipe's does)."""
    check_process_counts(cfg.devices, cfg.num_nodes)
    # A target card is CUDA without this machine having one (resolve_device would refuse it), with bf16 units:
    # every card in gpus.GPUS has them.
    device = torch.device("cuda") if target else resolve_device(cfg.device)
    train, note = cfg.train, None
    if kind == "finetune":
        config, note = read_model_config(cfg.checkpoint_dir)
        method, seq, packed = cfg.method, cfg.data.max_seq_length, cfg.data.packing
        lora = LoRAConfig(**{k: v for k, v in vars(cfg.lora).items() if not k.startswith("__")})
        tokenizer_vocab = None
    else:
        config = pretrain_config(cfg)
        method, seq, packed, lora, tokenizer_vocab = "pretrain", cfg.data.seq_length, False, None, None
    world_size = cfg.devices * cfg.num_nodes
    strategy = resolve_strategy(cfg.strategy, world_size)
    # Parsed, not instantiated: the optimizer is still its class_path (a Namespace, or a dict from a recipe).
    optimizer = cfg.optimizer or {}
    optimizer = optimizer.get("class_path") if isinstance(optimizer, dict) else getattr(optimizer, "class_path", None)
    args = dict(
        method=method,
        lora=lora,
        quantize=getattr(cfg, "quantize", "nf4"),
        precision=resolve_precision(train.precision, device, cuda_bf16=True if target else None),
        micro_batch_size=train.micro_batch_size,
        seq_length=seq,
        strategy=strategy,
        world_size=world_size,
        activation_checkpointing=train.activation_checkpointing,
        accumulation_steps=micro_batches_per_rank(train, world_size),
        optimizer=(optimizer or "torch.optim.AdamW").rsplit(".", 1)[-1],
        device=device.type,
        packed=packed,
        tokenizer_vocab=tokenizer_vocab,
    )
    args.update(change)
    pairs = kind == "finetune" and getattr(cfg, "loss", "sft") != "sft"
    if pairs:
        args["micro_batch_size"] *= 2  # a pair's chosen and rejected sequences
    estimate = estimate_memory(config, **args)
    if note:
        estimate.notes.append(note)
    if pairs:
        estimate.notes.append(PAIRS_NOTE)
    if kind == "finetune" and not packed:
        estimate.notes.append("finetune rows are padded to their batch's longest example: max_seq_length is the most")
    return estimate, str(device)


def pretrain_config(cfg: Any) -> Config:
    """The pretrain recipe's model, as pretrain builds it: from initial_checkpoint, or model_name and model_config."""
    if cfg.initial_checkpoint is not None:
        return read_model_config(cfg.initial_checkpoint)[0]
    return model_config_for(cfg.model_name, cfg.model_config or {}, Tokenizer(cfg.tokenizer_dir).vocab_size)
