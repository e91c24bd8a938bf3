"""`plainlm finetune`: a recipe in, a finetuned checkpoint out.

    load the model (plainlm, Hugging Face or GGUF) -> prepare it for the method -> read the data
    -> train.fit -> out_dir/final/ (a normal plainlm checkpoint) + out_dir/final/adapter/ (PEFT layout)

The method decides only how the model is prepared:
    full   every weight trains
    lora   low-rank adapters on `lora.targets`; the base is frozen
    dora   LoRA plus a learned magnitude per output row
    qlora  the frozen base quantized (`quantize`: nf4, fp4 or int4), LoRA adapters on top

The loss decides only what a batch holds and what is minimised (objectives.py):
    sft                      instruction or chat records, next-token loss on the responses
    dpo, ipo, hinge          preference pairs against a reference model: the base with the adapters off
                             (lora, dora, qlora), or log-probabilities computed once before training (full)
    simpo, orpo              preference pairs, no reference
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import torch

from plainlm.api import LLM
from plainlm.checkpoint import save_checkpoint
from plainlm.data.preference import PreferenceLoader, load_preference_data
from plainlm.data.sft import SFTDataConfig, SFTLoader, load_sft_data
from plainlm.device import move_to
from plainlm.distributed import Strategy, World, inside_launcher
from plainlm.errors import InvalidInput
from plainlm.evaluate import EvalArgs, evaluate_after_training
from plainlm.lora import LoRAConfig, inject_lora, lora_for_method, merge_lora, save_peft_adapter
from plainlm.objectives import (
    Loss,
    PreferenceArgs,
    PreferenceObjective,
    WithReference,
    reference_fingerprint,
    reference_table,
)
from plainlm.quantize import dequantize_model, quantize_model
from plainlm.train import (
    OptimizerFactory,
    SchedulerFactory,
    TrainArgs,
    resolve_precision,
    sample_text,
    training_autocast,
)
from plainlm.train_state import REFERENCE_FILE
from plainlm.training_run import Prepared, run_training

Method = Literal["full", "lora", "dora", "qlora"]


def prepare_model(
    llm: LLM, method: Method, lora: LoRAConfig, quantize: str, device: torch.device | None = None
) -> LoRAConfig | None:
    """Set which parameters train; returns the LoRA config the model now carries (None for full). device: where
    qlora quantizes each layer, which then stays there (default: where the model is)."""
    model = llm.model
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return None
    if method == "qlora" and model.quantization is None:  # a GPTQ, AWQ or quantized base stays as it was saved
        quantize_model(model, quantize, device=device)
    adapters = lora_for_method(lora, method)
    inject_lora(model, adapters)
    return adapters


def finetune(
    checkpoint_dir: Path,
    out_dir: Path = Path("out/finetune"),
    method: Method = "lora",
    loss: Loss = "sft",
    preference: PreferenceArgs = PreferenceArgs(),
    data: SFTDataConfig = SFTDataConfig(),
    lora: LoRAConfig = LoRAConfig(),
    eval: EvalArgs = EvalArgs(),
    train: TrainArgs = TrainArgs(),
    optimizer: OptimizerFactory | None = None,
    scheduler: SchedulerFactory | None = None,
    quantize: Literal["nf4", "fp4", "int4"] = "nf4",
    resume: bool | Literal["auto"] | Path = False,
    overwrite: bool = False,
    device: str | None = None,
    strategy: Strategy = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    rdzv_endpoint: str | None = None,
    recipe: str | None = None,
) -> Path:
    """Finetune a model on instruction or chat data; returns out_dir/final.

    Args:
        checkpoint_dir: The model to start from: a plainlm checkpoint, a Hugging Face model directory or a .gguf file.
        out_dir: Where step checkpoints, metrics.csv, TensorBoard events, loss.png and final/ go.
        method: full, lora, dora or qlora (LoRA on a base quantized to `quantize`).
        loss: sft (instruction or chat data), or a preference objective on prompt/chosen/rejected pairs: dpo, ipo,
            hinge (against a reference: the base with the adapters off; for full, computed once before training),
            simpo or orpo (no reference).
        preference: beta, label_smoothing (dpo), gamma (simpo) of a preference loss.
        data: The instruction, chat or preference data and how it becomes batches.
        lora: Adapter rank, alpha, dropout and target layers (lora, dora, qlora).
        eval: lm-eval tasks to run on final/ when training ends (results in out_dir/eval/).
        train: Steps, batch sizes, schedule, precision, intervals.
        optimizer: class_path + init_args of a torch optimizer (default AdamW, lr 2e-4).
        scheduler: class_path + init_args of a torch lr scheduler (default: warm-up then cosine).
        quantize: How qlora stores the frozen base: nf4 or fp4 (bitsandbytes) or int4. A base saved quantized
            (GPTQ, AWQ, a plainlm int8/int4 checkpoint) is kept as it is; the merged model is then its
            dequantized weights plus the adapter.
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
    objective = PreferenceObjective(loss, preference) if loss != "sft" else None  # a bad beta fails here, at once

    def prepare(world: World) -> Prepared:
        # bf16-mixed keeps float32 weights (and optimizer state) and computes in bf16, on a GPU too.
        dtype = "bfloat16" if train.precision == "bf16-true" else "float32"
        full_reference = method == "full" and objective is not None and objective.needs_reference
        staged = loads_on_cpu(world, method, full_reference)
        llm = LLM.load(checkpoint_dir, device="cpu" if staged else world.device, dtype=dtype, cpu_kernels=not staged)
        model, tokenizer = llm.model, llm.tokenizer
        lora_used = prepare_model(llm, method, lora, quantize, world.device)
        if world.strategy != "fsdp":
            move_to(model, world.device)  # what waited on the CPU; FSDP moves each part as it shards it
        if train.activation_checkpointing:
            model.activation_checkpointing = True

        n_params = sum(p.numel() for p in model.parameters())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        identity = {
            "model": model.config.name,
            "n_params": n_params,
            "method": method,
            "lora": dataclasses.asdict(lora_used) if lora_used else None,
        }
        pad_id = tokenizer.eos_id or 0
        if objective is None:
            train_examples, val_examples = load_sft_data(data, tokenizer)
            loader = SFTLoader(
                train_examples,
                train.micro_batch_size,
                seed=train.seed,
                pad_id=pad_id,
                packing=data.packing,
                max_seq_length=data.max_seq_length,
                rank=world.rank,
                world_size=world.size,
                val_examples=val_examples,
            )
            what = f"{len(train_examples)} examples"
        else:
            identity["loss"] = loss
            train_pairs, val_pairs = load_preference_data(data, tokenizer)
            loader = PreferenceLoader(
                train_pairs, train.micro_batch_size, train.seed, pad_id, world.rank, world.size, val_pairs
            )
            if objective.needs_reference and lora_used is None:  # full: no adapters to switch off
                splits = {"train": train_pairs, "val": val_pairs}
                autocast = training_autocast(resolve_precision(train.precision, world.device), world)
                tables = reference_table(
                    model, splits, train.micro_batch_size, pad_id, out_dir / REFERENCE_FILE,
                    reference_fingerprint(identity, splits), write=world.is_main, autocast=autocast,
                )  # fmt: skip
                loader = WithReference(loader, tables)
            what = f"{len(train_pairs)} preference pairs ({loss})"

        def sample(m: torch.nn.Module) -> str | None:
            if not train.sample_prompt:
                return None
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": train.sample_prompt}])
            return sample_text(m, tokenizer, tokenizer.encode(prompt, bos=False), train.sample_tokens)

        def export(final: Path, trained: dict[str, torch.Tensor] | None) -> None:
            export_final(llm, checkpoint_dir, method, lora_used, final, trained, dtype)

        return Prepared(
            model=model,
            loader=loader,
            identity=identity,
            headline=f"{method}: training {n_trainable:,} of {n_params:,} parameters on {what}",
            method=method,
            seq_length=data.max_seq_length,
            export=export,
            sample=sample,
            lora=lora_used,
            quantize=quantize,
            packed=data.packing,
            objective=objective,
        )

    final = run_training(finetune, arguments, prepare)
    # Once, in the process that started the run: not in each worker (under torchrun, evaluate final/ afterwards).
    if eval.tasks is not None and not inside_launcher():
        evaluate_after_training(final, eval, out_dir)
    return final


def loads_on_cpu(world: World, method: str, full_reference: bool) -> bool:
    """Whether a GPU run loads its model on the CPU first (memory-mapped where the files hold the run's dtype),
    so that the float model never stands whole on a GPU: qlora quantizes each layer on the GPU as it goes, FSDP
    moves each block to the GPU as it shards it (distributed.shard); a 70B model is 141 GB in bf16. Not a full
    preference run under FSDP (`full_reference`): it computes its reference log-probabilities whole, before
    training, on the GPU."""
    if world.device.type == "cpu":
        return False
    return method == "qlora" or (world.strategy == "fsdp" and not full_reference)


def export_final(
    llm: LLM,
    checkpoint_dir: Path,
    method: Method,
    lora: LoRAConfig | None,
    final: Path,
    trained: dict[str, torch.Tensor] | None = None,
    dtype: str | None = None,
) -> Path:
    """out_dir/final: the merged model as a plainlm checkpoint, and the adapter in the PEFT layout.

    `trained` holds the trained weights whole when the model itself holds only shards (FSDP). A quantized
    (qlora) or sharded model is not what gets merged: a fresh full-precision base gets the trained weights.
    """
    model = llm.model
    if method == "qlora" or trained is not None or model.quantization is not None:
        if trained is None:
            trained = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
        model = LLM.load(checkpoint_dir, device="cpu", dtype=dtype).model
        if model.quantization is not None:  # a GPTQ or AWQ base: the merge goes into its dequantized weights
            dequantize_model(model, model.embed.weight.dtype)
        if lora is not None:
            inject_lora(model, lora)
        unexpected = model.load_state_dict(trained, strict=False).unexpected_keys
        if unexpected:
            raise InvalidInput(f"the trained weights {unexpected[:3]} are not in the model from {checkpoint_dir}")
    model.eval()
    if lora is not None:
        save_peft_adapter(model, lora, final / "adapter")
        merge_lora(model)
    save_checkpoint(model, final)
    llm.tokenizer.save(final)
    return final
