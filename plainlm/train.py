"""The one training loop: pretraining and every finetuning method, in plain PyTorch.

A method (full, LoRA, DoRA, QLoRA) only decides how the model is prepared and which parameters
have requires_grad; this loop trains whatever is trainable, on one process or on several (each rank
reads its own micro-batches; distributed.py wraps the model in DDP or shards it with FSDP):

    for each step:
        read this rank's micro-batches, count what the loss averages over (target tokens; preference pairs)
            in the whole step, over all ranks
        forward + backward each micro-batch, its summed loss divided by the step's count
            (so accumulating micro-batches, on one rank or many, equals one big batch exactly);
            gradients are reduced over ranks only in the last micro-batch's backward
        stop on a non-finite loss (the newest checkpoint stays the newest good one)
        clip gradients, optimizer step, scheduler step
        log loss, learning rate, tokens/s, MFU; evaluate and save at intervals (rank 0 writes the logs)

What the loss is comes from an objective (objectives.py): next-token cross-entropy, or a preference loss
(DPO and kin) over paired batches, which adds its rewards and accuracy to what is logged.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from plainlm.distributed import World, clip_grad_norm_, gradient_sync, unwrap
from plainlm.errors import InvalidInput, TrainingDiverged
from plainlm.generate import generate
from plainlm.metrics import MetricsLogger, flops_per_token, matmul_dtype, measure_peak_flops, plot_loss
from plainlm.objectives import TokenLoss
from plainlm.train_state import latest_checkpoint, load_training_checkpoint, prune_checkpoints, save_training_checkpoint

Precision = Literal["auto", "32-true", "bf16-mixed", "bf16-true"]


@dataclass
class TrainArgs:
    """How to train. Batch sizes count sequences; one step is one optimizer update.

    Args:
        max_steps: Optimizer steps to run.
        global_batch_size: Sequences per optimizer step, over all processes (accumulated over micro-batches).
        micro_batch_size: Sequences per forward/backward pass on each process.
        warmup_steps: Linear warm-up of the learning rate (default scheduler).
        min_lr_ratio: The cosine schedule decays to this fraction of the peak learning rate.
        max_norm: Clip the gradient norm to this (None: no clipping).
        log_interval: Log metrics every this many steps.
        eval_interval: Validate every this many steps (and at the end).
        eval_max_batches: Validate on at most this many batches, over all processes (None: the whole split).
        save_interval: Save a resumable checkpoint every this many steps (None: only at the end).
        keep_checkpoints: Keep this many of the newest step checkpoints (0: all).
        precision: 32-true, bf16-mixed, bf16-true; auto is bf16-mixed on a GPU with bf16 or a CPU with AMX,
            else 32-true.
        activation_checkpointing: Recompute each block's activations in the backward pass (less memory).
        compile: torch.compile the forward pass and the loss together for training.
        seed: Seeds weights of new layers, dropout and data order.
        sample_prompt: Text to continue greedily at every validation, to watch the model learn.
        sample_tokens: Length of that sample.
        tensorboard: Also write TensorBoard events.
        peak_flops: The device's peak FLOP/s for MFU; default: measured with a matmul at start.
    """

    max_steps: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_norm: float | None = 1.0
    log_interval: int = 1
    eval_interval: int = 50
    eval_max_batches: int | None = 20
    save_interval: int | None = 50
    keep_checkpoints: int = 2
    precision: Precision = "auto"
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 1337
    sample_prompt: str | None = None
    sample_tokens: int = 30
    tensorboard: bool = True
    peak_flops: float | None = None

    def __post_init__(self) -> None:
        if self.global_batch_size % self.micro_batch_size:
            low = self.global_batch_size // self.micro_batch_size * self.micro_batch_size
            raise InvalidInput(
                f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size}; use {low or self.micro_batch_size} or {low + self.micro_batch_size}"
            )

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per step on one process; see `micro_batches_per_rank` for several."""
        return self.global_batch_size // self.micro_batch_size


def micro_batches_per_rank(args: TrainArgs, world_size: int) -> int:
    """How many micro-batches each of `world_size` processes runs per step: global_batch_size is split over all."""
    per_pass = args.micro_batch_size * world_size
    if args.global_batch_size % per_pass:
        low = args.global_batch_size // per_pass * per_pass
        nearest = f"{low} or {low + per_pass}" if low else str(per_pass)
        raise InvalidInput(
            f"global_batch_size {args.global_batch_size} is not a multiple of micro_batch_size x processes = "
            f"{args.micro_batch_size} x {world_size} = {per_pass}; use global_batch_size {nearest}, "
            "or another micro_batch_size or number of processes"
        )
    return args.global_batch_size // per_pass


def resolve_precision(precision: Precision, device: torch.device, cuda_bf16: bool | None = None) -> str:
    """auto -> bf16-mixed where the device has bf16 units, else 32-true. cuda_bf16: whether the GPU has them;
    None asks this machine's (`plainlm estimate --target` plans for a GPU it does not have)."""
    if precision != "auto":
        return precision
    if cuda_bf16 is None:
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if device.type == "cuda" and cuda_bf16:
        return "bf16-mixed"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16-mixed"
    return "32-true"  # CPUs without bf16 units run bf16 matmuls slower than fp32


def training_autocast(precision: str, world: World) -> contextlib.AbstractContextManager:
    """What the forward passes of training run under: bf16 autocast for bf16-mixed, except under FSDP, which
    casts the weights itself (distributed.shard gives it bf16-mixed as a MixedPrecisionPolicy)."""
    if precision == "bf16-mixed" and world.strategy != "fsdp":
        return torch.autocast(world.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_native_bf16() -> bool:
    """AMX tiles (recent Xeons), enabled by the OS: bf16 matmuls measured ~12x faster than fp32 on such a CPU."""
    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, but the check torch's own kernels use
    return bool(is_amx and is_amx())


# An optimizer or scheduler is given as `class_path` + `init_args` in a recipe; jsonargparse turns that into
# a function of the parameters (or the optimizer) that builds it, e.g.
#     optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 0.0002, betas: [0.9, 0.95]}}
OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def default_optimizer(params: Iterable) -> torch.optim.Optimizer:
    # fused: one kernel updates every parameter (measured 1.13x faster full finetuning on the CPU than foreach)
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, betas=(0.9, 0.95), fused=True)


def warmup_cosine(optimizer: torch.optim.Optimizer, args: TrainArgs) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the optimizer's lr, then cosine decay to min_lr_ratio of it at max_steps."""

    def factor(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    max_batches: int | None,
    device,
    world: World | None = None,
    objective: Any = None,
) -> dict[str, float]:
    """The objective's mean loss (and its statistics) over the validation batches of every rank: {"loss": ...}.
    Loaders give all ranks as many batches: under FSDP each forward pass is collective."""
    world, objective = world or World(), objective or TokenLoss()
    was_training = model.training
    model.eval()
    sums: dict[str, dict[str, torch.Tensor]] = {"parts": {}, "stats": {}, "counts": {}}  # kind -> name -> sum
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        batch = to_device(batch, device)
        parts, stats = objective.parts(model, batch)
        counts = {name: torch.tensor(n, device=device) for name, n in objective.counts(batch).items()}
        for kind, values in (("parts", parts), ("stats", stats), ("counts", counts)):
            for name, value in values.items():
                sums[kind][name] = sums[kind].get(name, 0) + value.detach().double()
    model.train(was_training)
    keys = [(kind, name) for kind in sums for name in sorted(sums[kind])]  # one all-reduce for all of them
    summed = world.sum(torch.stack([sums[kind][name] for kind, name in keys])).tolist() if keys else []
    totals: dict[str, dict[str, float]] = {kind: {} for kind in sums}
    for (kind, name), value in zip(keys, summed, strict=True):
        totals[kind][name] = value
    counts = totals["counts"]
    if not counts.get(objective.unit):
        raise InvalidInput(
            f"the validation split has no {objective.unit} to score: give it examples, or set eval_interval "
            "past max_steps"
        )
    loss = sum(value / counts[unit] for unit, value in totals["parts"].items())
    return {"loss": loss, **{name: totals["stats"][name] / counts[objective.unit] for name in objective.stats}}


def sample_text(model: torch.nn.Module, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int) -> str:
    """A greedy continuation of `prompt_ids`, to watch the model learn at each validation."""
    was_training = model.training
    model.eval()
    ids = generate(model, [prompt_ids], max_new_tokens=max_new_tokens, stop_ids=tokenizer.stop_ids)[0]
    model.train(was_training)
    return tokenizer.decode(ids, skip_special_tokens=True)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def fit(
    model: torch.nn.Module,
    train_loader: Any,
    val_loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    args: TrainArgs,
    out_dir: Path,
    identity: dict[str, Any],
    resume: bool | Path = False,
    sample: Any = None,
    world: World | None = None,
    objective: Any = None,
) -> dict[str, float]:
    """Train `model` for args.max_steps; returns the final metrics (rank 0 logs them; other ranks get {}).

    train_loader / val_loader follow plainlm/data's contract; `identity` names the run (model,
    method, adapter) so that --resume refuses another run's checkpoint; `resume` is True (the newest
    checkpoint in out_dir, if any) or the checkpoint to continue from; `sample(model) -> str`
    is called at each validation when given. On several processes every rank calls this with its
    `world` and its model as `distributed.wrap` returned it. `objective` (objectives.py) says what the loss
    is: by default next-token cross-entropy over the target tokens.
    """
    world = world or World(device=next(model.parameters()).device)
    device, plain = world.device, unwrap(model)  # plain: no DDP wrapper, for evaluation, sampling, the config
    accumulation = micro_batches_per_rank(args, world.size)
    # Each rank validates on its share: the ranks together read the batches one process would.
    eval_batches = None if args.eval_max_batches is None else math.ceil(args.eval_max_batches / world.size)
    precision = resolve_precision(args.precision, device)
    autocast = training_autocast(precision, world)
    out_dir.mkdir(parents=True, exist_ok=True)
    step, tokens_seen = 0, 0
    if isinstance(resume, Path):  # a checkpoint named by --resume PATH
        checkpoint = resume
    else:
        checkpoint = latest_checkpoint(out_dir) if resume else None
    if checkpoint is not None:
        state = load_training_checkpoint(checkpoint, model, optimizer, scheduler, identity, world)
        step, tokens_seen = state["step"], state["tokens"]
        train_loader.load_state_dict(state["loader"])
        if world.is_main:
            print(f"Resumed from {checkpoint} at step {step}")
    objective = objective or TokenLoss(compile=args.compile)
    if world.is_main:  # only rank 0 writes metrics.csv, TensorBoard events and loss.png
        extra = (*objective.stats, *(f"val_{name}" for name in objective.stats))
        logger = MetricsLogger(out_dir, resume=checkpoint is not None, tensorboard=args.tensorboard, extra=extra)
        if checkpoint is not None:
            logger.truncate_after(step)
        peak = (args.peak_flops or measure_peak_flops(device, matmul_dtype(precision))) * world.size

    n_params = sum(p.numel() for p in model.parameters())  # a sharded parameter counts whole
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batches = iter(train_loader)
    model.train()
    progress = tqdm(total=args.max_steps, initial=step, desc="training", dynamic_ncols=True, disable=not world.is_main)
    metrics: dict[str, float] = {}
    window_start, window_tokens = time.perf_counter(), 0
    while step < args.max_steps:
        micro_batches = [to_device(next(batches), device) for _ in range(accumulation)]
        per_batch = [objective.counts(b) for b in micro_batches]
        units = sorted(per_batch[0])
        counts = [sum(c[u] for c in per_batch) for u in units] + [sum(b["input_ids"].numel() for b in micro_batches)]
        *unit_totals, step_inputs = world.sum(torch.tensor(counts, device=device)).tolist()  # over every rank
        totals = dict(zip(units, unit_totals, strict=True))
        if totals[objective.unit] == 0:
            raise InvalidInput(
                f"step {step + 1} has no {objective.unit} to learn from: every example's response was masked or cut"
            )
        loss = torch.zeros((), device=device)
        stats = torch.zeros(len(objective.stats), device=device)
        for i, batch in enumerate(micro_batches):
            with gradient_sync(model, enabled=i == len(micro_batches) - 1):
                with autocast:
                    parts, batch_stats = objective.parts(model, batch)
                    micro_loss = sum(part / totals[unit] for unit, part in parts.items())
                # DDP and FSDP average gradients over ranks; the loss is already divided by the counts of all
                # ranks, so scaling by the world size turns that average into the sum one big batch would give.
                (micro_loss * world.size).backward()
            loss += micro_loss.detach()
            if batch_stats:
                stats += torch.stack([batch_stats[name].detach().float() for name in objective.stats])
        world.sum(loss)
        step_stats = dict(zip(objective.stats, (world.sum(stats) / totals[objective.unit]).tolist(), strict=True))
        if not torch.isfinite(loss):
            last = latest_checkpoint(out_dir)
            raise TrainingDiverged(
                f"the loss became {loss.item()} at step {step + 1}; stopping before it reaches the weights. "
                f"The newest good checkpoint is {last or '(none saved yet)'}: lower the learning rate or check the data"
            )
        if args.max_norm is not None:
            clip_grad_norm_(list(model.parameters()), args.max_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        tokens_seen += step_inputs
        window_tokens += step_inputs
        progress.update(1)

        val_loss, val = None, {}
        if step % args.eval_interval == 0 or step == args.max_steps:
            val = evaluate(plain, val_loader.val_batches(), eval_batches, device, world, objective)
            val_loss = val.pop("loss")
            # Every rank generates: under FSDP each forward pass gathers weights from all ranks.
            text = sample(plain) if sample is not None else None
            if world.is_main:
                shown = [f"val loss {val_loss:.4f}"]
                if objective.perplexity:
                    shown.append(f"val ppl {math.exp(min(val_loss, 50)):.2f}")
                shown += [f"val {name.replace('_', ' ')} {value:.4f}" for name, value in val.items()]
                tqdm.write(f"step {step}: " + ", ".join(shown))
                if text is not None:
                    tqdm.write(f"  sample: {text!r}")
        if world.is_main and (step % args.log_interval == 0 or val_loss is not None):
            seconds = time.perf_counter() - window_start
            seq_len = micro_batches[0]["input_ids"].shape[1]
            tps = window_tokens / seconds
            mfu = tps * flops_per_token(plain.config, n_params, seq_len, trainable / n_params) / peak
            metrics = dict(tokens=tokens_seen, loss=loss.item(), lr=lr, tokens_per_second=tps, mfu=mfu, seconds=seconds)
            metrics.update(step_stats)
            if val_loss is not None:
                metrics.update(val_loss=val_loss, **{f"val_{name}": value for name, value in val.items()})
                if objective.perplexity:
                    metrics.update(val_ppl=math.exp(min(val_loss, 50)))
            logger.log(step, **metrics)
            shown = {name.removeprefix("rewards_"): f"{value:.3f}" for name, value in step_stats.items()}
            progress.set_postfix(
                loss=f"{loss.item():.4f}", **shown, lr=f"{lr:.2e}", tok_s=f"{tps:.0f}", mfu=f"{mfu:.1%}"
            )
            window_start, window_tokens = time.perf_counter(), 0
        if (args.save_interval and step % args.save_interval == 0) or step == args.max_steps:
            state = {"tokens": tokens_seen, "loader": train_loader.state_dict(), "identity": identity}
            save_training_checkpoint(out_dir, step, model, optimizer, scheduler, state, world)
            if world.is_main:
                prune_checkpoints(out_dir, args.keep_checkpoints)
    progress.close()
    if world.is_main:
        logger.close()
        plot_loss(logger.path, out_dir / "loss.png")
    return metrics
