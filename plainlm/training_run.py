"""What `plainlm finetune` and `plainlm pretrain` share around the one loop: one skeleton, two preparations.

    launch the workers (devices > 1) -> join the process group -> the command prepares its model and data
    -> wrap (DDP / FSDP) -> optimizer + scheduler -> print the plan -> train.fit -> export out_dir/final/

A command only supplies `prepare(world) -> Prepared`: the model with its trainable parameters set,
the loader, what the run is (for --resume), what to print, and how to write final/. Everything else
(the order of these steps, the recipe written next to the checkpoints, which rank writes) is here once.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plainlm import distributed
from plainlm.checkpoint import check_output_path
from plainlm.distributed import Strategy, World
from plainlm.lora import LoRAConfig
from plainlm.memory import training_plan
from plainlm.model import GPT
from plainlm.train import (
    OptimizerFactory,
    SchedulerFactory,
    TrainArgs,
    default_optimizer,
    fit,
    micro_batches_per_rank,
    resolve_precision,
    warmup_cosine,
)
from plainlm.train_state import RECIPE_FILE, checkpoint_to_resume, clear_run, holds_run


@dataclass
class Prepared:
    """A command's model and data, ready for the loop.

    model: the plain model on the world's device, its trainable parameters set (not yet wrapped).
    loader: train and validation batches (plainlm/data's contract).
    identity: what run this is; --resume refuses a checkpoint whose identity differs.
    headline: the first line the run prints (what trains, on what data).
    method, seq_length, lora, quantize, packed: what the memory plan needs.
    sample: a short greedy continuation at each validation, or None.
    objective: what the loss is (objectives.py); None: next-token cross-entropy.
    export: writes final/ from the trained model (given the whole weights when FSDP holds only shards).
    """

    model: GPT
    loader: Any
    identity: dict[str, Any]
    headline: str
    method: str
    seq_length: int
    export: Callable[[Path, dict[str, torch.Tensor] | None], None]
    sample: Callable[[torch.nn.Module], str | None] | None = None
    lora: LoRAConfig | None = None
    quantize: str = "nf4"
    packed: bool = False
    objective: Any = None


def run_training(command: Callable[..., Path], arguments: dict[str, Any], prepare: Callable[[World], Prepared]) -> Path:
    """Run `command` (called with `arguments`) to its out_dir/final: in worker processes when devices or
    nodes ask for several, else here with the model and data `prepare` gives. Returns out_dir/final.

    Before anything starts, out_dir is checked (train_state.checkpoint_to_resume): a run never lands
    in a folder that holds another unless --resume or --overwrite says so. A start that fails leaves
    no folder behind that it created.

    `arguments` are the command's own (its parameters, as it was called): the skeleton reads out_dir,
    train, optimizer, scheduler, resume, overwrite, device, strategy, devices, num_nodes, rdzv_endpoint
    and recipe from them, and workers are started with them.
    """
    out_dir, train, resume, overwrite = (arguments[k] for k in ("out_dir", "train", "resume", "overwrite"))
    devices, num_nodes, rdzv_endpoint = (arguments[k] for k in ("devices", "num_nodes", "rdzv_endpoint"))
    optimizer, scheduler, device, strategy, recipe = (
        arguments[k] for k in ("optimizer", "scheduler", "device", "strategy", "recipe")
    )
    check_output_path(out_dir, "--out_dir")
    distributed.check_process_counts(devices, num_nodes)
    created = not out_dir.exists()
    try:
        checkpoint = checkpoint_to_resume(out_dir, resume, overwrite)
        if overwrite and int(os.environ.get("RANK", 0)) == 0:  # one process deletes, before any process starts
            clear_run(out_dir)
        if distributed.must_launch(devices, num_nodes):
            micro_batches_per_rank(train, devices * num_nodes)  # a bad batch size fails here, before any process
            # The workers start from what was decided here: out_dir is already cleared, the checkpoint chosen.
            resolved = dict(arguments, resume=checkpoint or False, overwrite=False)
            return distributed.launch(command, resolved, devices, num_nodes, rdzv_endpoint)
        return _train_here(prepare, out_dir, train, optimizer, scheduler, checkpoint, device, strategy, recipe)
    except BaseException:
        if created and not holds_run(out_dir) and int(os.environ.get("RANK", 0)) == 0:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _train_here(
    prepare: Callable[[World], Prepared],
    out_dir: Path,
    train: TrainArgs,
    optimizer: OptimizerFactory | None,
    scheduler: SchedulerFactory | None,
    checkpoint: Path | None,
    device: str | None,
    strategy: Strategy,
    recipe: str | None,
) -> Path:
    """This process's part of the run (all of it, or one rank's)."""
    with distributed.joined(strategy, device) as world:
        torch.manual_seed(train.seed)  # every rank starts from the same weights
        run = prepare(world)
        wrapped = distributed.wrap(run.model, world, resolve_precision(train.precision, world.device))
        params = [p for p in wrapped.parameters() if p.requires_grad]  # after wrapping: FSDP's shards
        opt = (optimizer or default_optimizer)(params)
        sched = scheduler(opt) if scheduler is not None else warmup_cosine(opt, train)
        if world.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            if recipe is not None:
                (out_dir / RECIPE_FILE).write_text(recipe)
            processes = f" on {world.size} processes ({world.strategy})" if world.size > 1 else ""
            print(run.headline + processes)
            sequences = getattr(run.objective, "sequences_per_example", 1)
            plan = training_plan(
                run.model.config, run.method, train, run.seq_length, world, opt, run.lora, run.quantize, run.packed,
                sequences,
            )  # fmt: skip
            print(plan)
        resume = checkpoint if checkpoint is not None else False
        fit(
            wrapped, run.loader, run.loader, opt, sched, train, out_dir, run.identity, resume, run.sample, world,
            run.objective,
        )  # fmt: skip
        trained = distributed.full_state_dict(wrapped) if world.strategy == "fsdp" else None  # every rank gathers
        final = out_dir / "final"
        if world.is_main:
            run.export(final, trained)
            if (out_dir / RECIPE_FILE).exists():
                shutil.copyfile(out_dir / RECIPE_FILE, final / RECIPE_FILE)
        world.barrier()  # final/ is complete when any rank returns
        return final
