"""`plainlm pretrain`: train a model from scratch (or continue pretraining one) on a folder of text.

    text / JSONL files -> token shards (tokenized once, data/pretrain.py) -> train.fit -> out_dir/final/

The model is a named config (`model_name`, e.g. "SmolLM2-135M") with `model_config` overrides, or
`model_config` alone; `initial_checkpoint` continues from trained weights instead of a fresh start.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, pre_tokenizers, trainers
from tokenizers.models import BPE

from plainlm.checkpoint import load_checkpoint, save_checkpoint
from plainlm.config import Config
from plainlm.data.pretrain import PretrainLoader, prepare_token_shards
from plainlm.distributed import Strategy, World
from plainlm.errors import InvalidInput, MissingInput
from plainlm.model import GPT
from plainlm.named_configs import config_for_name
from plainlm.tokenizer import Tokenizer, copy_tokenizer_files
from plainlm.train import OptimizerFactory, SchedulerFactory, TrainArgs, sample_text
from plainlm.training_run import Prepared, run_training


@dataclass
class PretrainDataConfig:
    """Where pretraining text comes from: the `data:` section of a pretrain recipe.

    Args:
        source: A folder of .txt (one document per file) and .jsonl ({"text": ...} per line) files.
        shards_dir: Where the token shards go (default: out_dir/tokens); reused while the source is unchanged.
        seq_length: Tokens per training sequence.
        val_fraction: The tail of the token stream held out for validation.
        workers: Processes that tokenize (default: one per core).
        strict: Fail on a malformed JSONL line instead of skipping it.
    """

    source: str = "data/pretrain"
    shards_dir: str | None = None
    seq_length: int = 256
    val_fraction: float = 0.05
    workers: int | None = None
    strict: bool = False


def train_bpe_tokenizer(source: str | Path, out_dir: str | Path, vocab_size: int = 2048) -> Path:
    """A byte-level BPE tokenizer learned from the .txt files under `source`, for from-scratch models.

    "<|endoftext|>" ends every document (EOS); the files written are those `Tokenizer` reads.
    """
    files = sorted(str(p) for p in Path(source).rglob("*.txt"))
    if not files:
        raise MissingInput(f"{source}: no .txt files to learn a tokenizer from")
    tokenizer = HFTokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train(files, trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": None}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def init_weights(model: GPT) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases, residual outputs scaled by 1/sqrt(2 n_layer)."""
    residual_std = 0.02 / math.sqrt(2 * model.config.n_layer)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = residual_std if name.endswith(("o_proj", "down_proj")) else 0.02
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, 0.02)


def model_config_for(model_name: str | None, model_config: dict[str, Any], tokenizer_vocab: int) -> Config:
    """The architecture a pretrain recipe asks for: model_name with model_config overrides, or model_config alone."""
    overrides = dict(model_config)
    overrides.setdefault("vocab_size", math.ceil(tokenizer_vocab / 64) * 64)  # a multiple of 64 runs faster
    config = config_for_name(model_name, **overrides) if model_name else Config(**overrides)
    if config.vocab_size < tokenizer_vocab:
        raise InvalidInput(f"vocab_size {config.vocab_size} is smaller than the tokenizer's {tokenizer_vocab}")
    return config


def build_model(model_name: str | None, model_config: dict[str, Any], tokenizer: Tokenizer) -> GPT:
    model = GPT(model_config_for(model_name, model_config, tokenizer.vocab_size))
    init_weights(model)
    return model


def pretrain(
    tokenizer_dir: Path,
    out_dir: Path = Path("out/pretrain"),
    model_name: str | None = None,
    model_config: dict[str, Any] | None = None,
    initial_checkpoint: Path | None = None,
    data: PretrainDataConfig = PretrainDataConfig(),
    train: TrainArgs = TrainArgs(),
    optimizer: OptimizerFactory | None = None,
    scheduler: SchedulerFactory | None = None,
    resume: bool | Literal["auto"] | Path = False,
    overwrite: bool = False,
    device: str | None = None,
    strategy: Strategy = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    rdzv_endpoint: str | None = None,
    recipe: str | None = None,
) -> Path:
    """Pretrain a model on a folder of text; returns out_dir/final.

    Args:
        tokenizer_dir: The tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json).
        out_dir: Where token shards, step checkpoints, metrics.csv, TensorBoard events, loss.png and final/ go.
        model_name: A named config (see plainlm/named_configs.py) to start from.
        model_config: Config fields: overrides of model_name's, or the whole architecture without one.
        initial_checkpoint: Continue pretraining these weights (a plainlm checkpoint) instead of starting fresh.
        data: The text and how it becomes sequences.
        train: Steps, batch sizes, schedule, precision, intervals.
        optimizer: class_path + init_args of a torch optimizer (default AdamW, lr 2e-4).
        scheduler: class_path + init_args of a torch lr scheduler (default: warm-up then cosine).
        resume: Continue a run in out_dir: true (its newest checkpoint, which must exist), auto (the newest
            checkpoint if there is one, else start fresh) or the path of a step-NNNNNN checkpoint.
        overwrite: Replace the run out_dir already holds (without it, or --resume, such a run is refused).
        device: cpu, cuda, ... (default: cuda when available; with several processes, one GPU each).
        strategy: auto (one process: as it is; several: ddp), ddp (a replica per process) or fsdp (sharded).
        devices: Processes on this node (one per GPU); under torchrun its environment decides.
        num_nodes: Machines taking part; each runs this same command.
        rdzv_endpoint: HOST:PORT where the processes meet (needed for num_nodes > 1; default: a free local port).
        recipe: The resolved recipe text, written to out_dir/recipe.yaml (the CLI passes it).
    """
    arguments = dict(locals())

    def prepare(world: World) -> Prepared:
        tokenizer = Tokenizer(tokenizer_dir)
        if initial_checkpoint is not None:
            model = load_checkpoint(initial_checkpoint, device=world.device)
        else:
            model = build_model(model_name, model_config or {}, tokenizer).to(world.device)
        if train.precision == "bf16-true":
            model = model.to(torch.bfloat16)
        if train.activation_checkpointing:
            model.activation_checkpointing = True
        if data.seq_length > model.config.block_size:
            raise InvalidInput(
                f"data.seq_length {data.seq_length} exceeds the model's context of {model.config.block_size}"
            )

        out_dir.mkdir(parents=True, exist_ok=True)
        shards = Path(data.shards_dir or out_dir / "tokens")
        if world.is_main:  # one rank tokenizes; the others read its shards
            prepare_token_shards(data.source, tokenizer_dir, shards, workers=data.workers, strict=data.strict)
        world.barrier()
        loader = PretrainLoader(
            shards,
            train.micro_batch_size,
            data.seq_length,
            seed=train.seed,
            rank=world.rank,
            world_size=world.size,
            val_fraction=data.val_fraction,
        )
        n_params = sum(p.numel() for p in model.parameters())

        def sample(m: torch.nn.Module) -> str | None:
            if not train.sample_prompt:
                return None
            return sample_text(m, tokenizer, tokenizer.encode(train.sample_prompt), train.sample_tokens)

        def export(final: Path, trained: dict[str, torch.Tensor] | None) -> None:
            save_checkpoint(whole_model(model, trained).eval(), final)
            copy_tokenizer_files(tokenizer_dir, final)

        return Prepared(
            model=model,
            loader=loader,
            identity={"model": model.config.name, "n_params": n_params, "method": "pretrain", "lora": None},
            headline=f"pretraining {n_params:,} parameters on {loader.info['tokens']:,} tokens",
            method="pretrain",
            seq_length=data.seq_length,
            export=export,
            sample=sample,
        )

    return run_training(pretrain, arguments, prepare)


def whole_model(model: GPT, trained: dict[str, torch.Tensor] | None) -> GPT:
    """`model` itself, or, when it holds only FSDP shards, a plain copy holding `trained` (every weight, whole)."""
    if trained is None:
        return model
    with torch.device("meta"):
        copy = GPT(model.config)
    copy.load_state_dict(trained, assign=True)
    if model.config.tie_embeddings:
        copy.lm_head.weight = copy.embed.weight
    return copy
