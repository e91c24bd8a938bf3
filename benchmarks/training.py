"""Training speed and memory, side by side with transformers + peft: same weights, data, batches, threads.

    python benchmarks/training.py [--model SmolLM2-135M] [--micro_batch 1] [--global_batch 2] [--seq_len 256]
                                  [--warmup 2] [--steps 5] [--rounds 2] [--threads 2] [--compile]
                                  [--precision 32-true|bf16-mixed]

For a model of the named shape (random weights, made once by transformers and saved), trains (a) every
weight and (b) LoRA adapters (r=8, alpha=16, dropout 0, on q,k,v,o,gate,up,down) in fp32 on the same
random token batches (`--precision bf16-mixed`: both sides under bf16 autocast). Ours runs through
plainlm's one training loop, `plainlm.train.fit`, and its tokens/s are the ones fit logs; theirs is a
transformers (+ peft) model under a plain PyTorch loop that does the same step (AdamW, each side's
default kernel for it: fused for plainlm, foreach for a plain loop; the same schedule, gradient
accumulation, clipping, and summed token cross-entropy divided by the step's token count), timed the
same way. `--compile` adds ours under fit's `compile=True`. Each run is a child process of its own
(this script with --child), so that its peak resident memory (ru_maxrss) is its own; ours and theirs
alternate and the order flips every round, so that noise from a shared machine hits both alike.
Warm-up steps are excluded; a run counts its median step; the table shows the best round and, in
brackets, the median.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from plainlm.convert.hf import load_hf_model
from plainlm.convert.hf_config import config_to_hf
from plainlm.data import IGNORE_INDEX
from plainlm.lora import LoRAConfig, inject_lora
from plainlm.metrics import matmul_dtype, measure_peak_flops
from plainlm.named_configs import config_for_name
from plainlm.train import TrainArgs, fit, warmup_cosine

LORA_TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]
HF_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_mb(model: torch.nn.Module) -> float:
    """Resident memory now (VmRSS), in MB, with every weight read once: both sides map the safetensors
    file and read a weight only when it is first used."""
    for p in model.parameters():
        p.detach().sum()
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024  # kB


class RandomBatches:
    """The same random micro-batches on both sides, behind plainlm/data's loader contract."""

    def __init__(self, vocab_size: int, count: int, batch_size: int, seq_len: int) -> None:
        tokens = torch.randint(
            0, vocab_size, (count, batch_size, seq_len + 1), generator=torch.Generator().manual_seed(0)
        )
        self.batches = [{"input_ids": t[:, :-1].contiguous(), "targets": t[:, 1:].contiguous()} for t in tokens]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches)

    def val_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches[:1])

    def state_dict(self) -> dict:
        return {}


def make_optimizer(
    model: torch.nn.Module, args: argparse.Namespace, train: TrainArgs, fused: bool
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW as each side builds it by default: plainlm's default_optimizer is the fused kernel, a plain
    PyTorch loop gets torch's default (foreach)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95), fused=fused or None)
    return optimizer, warmup_cosine(optimizer, train)


def train_ours(method: str, data: RandomBatches, train: TrainArgs, args: argparse.Namespace) -> dict:
    """plainlm's real loop; steps, losses and MFU are read back from the metrics.csv that fit writes."""
    model = load_hf_model(args.model_dir)
    baseline = rss_mb(model)
    if method == "lora":
        inject_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.0, targets=LORA_TARGETS))
    optimizer, scheduler = make_optimizer(model, args, train, fused=True)
    with tempfile.TemporaryDirectory() as out:
        fit(model, data, data, optimizer, scheduler, train, Path(out), identity={"method": method})
        with (Path(out) / "metrics.csv").open() as f:
            rows = list(csv.DictReader(f))[: train.max_steps - 1]  # the last step also validates
    return {
        "baseline": baseline,
        "seconds": [float(r["seconds"]) for r in rows],
        "losses": [float(r["loss"]) for r in rows],
        "mfu_per_token_per_second": float(rows[0]["mfu"]) / float(rows[0]["tokens_per_second"]),
    }


def train_theirs(method: str, data: RandomBatches, train: TrainArgs, args: argparse.Namespace) -> dict:
    """A plain PyTorch loop doing what fit does in a step, timed from the end of one step to the next."""
    import transformers

    if method == "lora":
        import peft  # before the baseline: importing it (bitsandbytes, accelerate) is part of LoRA's cost here

    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model_dir, attn_implementation="sdpa", dtype=torch.float32
    )
    baseline = rss_mb(model)
    if method == "lora":
        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=HF_LORA_TARGETS)
        model = peft.get_peft_model(model, config)
    optimizer, scheduler = make_optimizer(model, args, train, fused=False)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=train.precision == "bf16-mixed")
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    batches = iter(data)
    seconds, losses = [], []
    start = time.perf_counter()
    for _ in range(train.max_steps - 1):
        micro_batches = [next(batches) for _ in range(train.accumulation_steps)]
        step_tokens = sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in micro_batches)
        loss = torch.zeros(())
        for batch in micro_batches:
            with autocast:
                logits = model(input_ids=batch["input_ids"], use_cache=False).logits
                micro_loss = (
                    F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), reduction="sum")
                    / step_tokens
                )
            micro_loss.backward()
            loss += micro_loss.detach()
        torch.nn.utils.clip_grad_norm_(params, train.max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.item())
        seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
    return {"baseline": baseline, "seconds": seconds, "losses": losses}


def child(run: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    side, method = run.split("-")
    train = TrainArgs(
        compile=side == "compiled",
        max_steps=args.warmup + args.steps + 1,  # + 1: fit validates and saves at its last step, not timed
        global_batch_size=args.global_batch,
        micro_batch_size=args.micro_batch,
        warmup_steps=1,
        eval_interval=10**9,
        eval_max_batches=1,
        save_interval=None,
        precision=args.precision,
        tensorboard=False,
        peak_flops=args.peak_flops,
    )
    config = config_for_name(args.model)
    data = RandomBatches(config.vocab_size, train.max_steps * train.accumulation_steps, args.micro_batch, args.seq_len)
    result = (train_theirs if side == "theirs" else train_ours)(method, data, train, args)
    result["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB
    print(json.dumps(result))


def run_child(side: str, method: str, args: argparse.Namespace, model_dir: str, peak_flops: float) -> dict:
    command = [sys.executable, __file__, *sys.argv[1:], "--child", f"{side}-{method}"]
    command += ["--model_dir", model_dir, "--peak_flops", str(peak_flops)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{side} {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def save_random_model(name: str, directory: str) -> None:
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config_to_hf(config_for_name(name)))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.save_pretrained(directory)


def report(results: dict[tuple[str, str], list[dict]], args: argparse.Namespace, peak_flops: float) -> None:
    for method in ("full", "lora"):
        ours, theirs = results["ours", method][0]["losses"], results["theirs", method][0]["losses"]
        print(f"{method}: first-step loss ours {ours[0]:.6f}, theirs {theirs[0]:.6f}")
        tolerance = 1e-4 if args.precision == "32-true" else 2e-2  # bf16 autocast: two different graphs round apart
        assert abs(ours[0] - theirs[0]) < tolerance, f"{method}: the first-step losses differ; the comparison is unfair"
    # Full finetuning starts from the same weights, so every step's loss should agree (LoRA's A starts random).
    ours, theirs = results["ours", "full"][0]["losses"], results["theirs", "full"][0]["losses"]
    gap = max(abs(o - t) for o, t in zip(ours, theirs, strict=True))
    print(f"full: largest loss difference over all {args.warmup + args.steps} steps: {gap:.1e}")
    # One run's tokens/s: its median timed step, so that a burst of load from elsewhere does not count.
    step_tokens = args.global_batch * args.seq_len
    tps = {
        k: [step_tokens / statistics.median(r["seconds"][args.warmup :]) for r in runs] for k, runs in results.items()
    }
    print(
        f"\n{args.model} shape, {args.precision}, {args.threads} threads, "
        f"micro-batch {args.micro_batch} x {args.seq_len} tokens, "
        f"{args.global_batch // args.micro_batch} micro-batches per step; median of {args.steps} timed steps after "
        f"{args.warmup} warm-up steps per run; best (median) of {args.rounds} alternating rounds; "
        f"measured {matmul_dtype(args.precision)} matmul peak {peak_flops / 1e9:.0f} GFLOP/s\n"
    )
    print("| measurement | plainlm | transformers | ratio |")
    print("|---|---|---|---|")
    for method, label in (("full", "full finetuning"), ("lora", "LoRA r=8, 7 targets")):
        theirs, their_runs = tps["theirs", method], results["theirs", method]
        for side, how in (("ours", ""), ("compiled", ", plainlm with `compile=True`")):
            if (side, method) not in tps:
                continue
            ours, our_runs = tps[side, method], results[side, method]
            ratios = [o / t for o, t in zip(ours, theirs, strict=True)]
            print(
                f"| {label}{how}: tokens/s | {max(ours):.0f} ({statistics.median(ours):.0f}) "
                f"| {max(theirs):.0f} ({statistics.median(theirs):.0f}) "
                f"| {max(ours) / max(theirs):.2f}x ({statistics.median(ratios):.2f}x) |"
            )
            mfu = our_runs[0]["mfu_per_token_per_second"]  # fit's MFU is proportional to tokens/s
            print(f"| {label}{how}: MFU, as fit logs it | {mfu * max(ours):.1%} | {mfu * max(theirs):.1%} | |")
            o, t = max(r["peak"] for r in our_runs), max(r["peak"] for r in their_runs)
            print(f"| {label}{how}: peak RSS, MB (highest run) | {o:.0f} | {t:.0f} | {o / t:.2f}x |")
        o, t = max(r["baseline"] for r in results["ours", method]), max(r["baseline"] for r in their_runs)
        print(f"| {label}: RSS after imports + model load, MB (highest run) | {o:.0f} | {t:.0f} | {o / t:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="SmolLM2-135M")
    parser.add_argument("--micro_batch", type=int, default=1)
    parser.add_argument("--global_batch", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="also train ours under fit's compile=True")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"], help="both sides")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--peak_flops", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args)

    torch.set_num_threads(args.threads)
    # MFU against the peak of the dtype the matmuls run in: bf16-mixed measured against fp32's peak overstates it 5-12x.
    peak_flops = max(measure_peak_flops(torch.device("cpu"), matmul_dtype(args.precision)) for _ in range(3))
    sides = ["ours", "theirs", "compiled"] if args.compile else ["ours", "theirs"]
    results: dict[tuple[str, str], list[dict]] = {(s, m): [] for s in sides for m in ("full", "lora")}
    with tempfile.TemporaryDirectory() as model_dir:
        save_random_model(args.model, model_dir)
        for round_ in range(args.rounds):
            order = sides if round_ % 2 == 0 else sides[::-1]  # the side that goes first alternates
            for side, method in [(s, m) for m in ("full", "lora") for s in order]:
                start = time.perf_counter()
                results[side, method].append(run_child(side, method, args, model_dir, peak_flops))
                print(f"round {round_ + 1}: {side} {method} done in {time.perf_counter() - start:.0f} s", flush=True)
    report(results, args, peak_flops)


if __name__ == "__main__":
    main()
