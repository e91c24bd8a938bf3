"""Scaling on this machine: training tokens/s on 1 and 2 processes, and FSDP's memory per rank.

    python benchmarks/distributed.py [--steps 12] [--warmup 3] [--n_layer 6] [--n_embd 384]

Speed: `plainlm pretrain` on the shipped corpus (data/pretrain, the stories-2k tokenizer) for a small
Llama-shaped model, run three times through the real command line: one process (all cores), then
`--devices 2` with `--strategy ddp` and with `--strategy fsdp` (the launcher gives each worker
cores / 2 threads). The same global batch every time; tokens/s is the median of the steps fit logs in
metrics.csv after the warm-up steps.

Memory: the same model trained for one step by one process, and by 2 FSDP processes (gloo, this file
with --rank), each reporting the bytes it holds in parameters and optimizer state (for a sharded
parameter its local shard, `DTensor.to_local()`) and its peak resident memory. Target of issue 5:
per-rank parameter + optimizer memory <= 0.6x the single process's on 2 ranks.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def model_config(args: argparse.Namespace) -> dict:
    return dict(
        name="bench",
        hf_model_type="llama",
        block_size=args.seq_len,
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_embd // 64,
        n_kv_head=max(1, args.n_embd // 128),
        intermediate_size=args.n_embd * 8 // 3 // 64 * 64,
        vocab_size=2048,
        tie_embeddings=False,
    )


# --- speed: the real command line ---
def pretrain_tokens_per_second(args: argparse.Namespace, out: Path, extra: list[str]) -> float:
    command = [
        sys.executable,
        "-m",
        "plainlm",
        "pretrain",
        *("--tokenizer_dir", str(REPO / "data/tokenizers/stories-2k"), "--data.source", str(REPO / "data/pretrain")),
        *("--model_config", json.dumps(model_config(args)), "--data.seq_length", str(args.seq_len)),
        *("--data.shards_dir", str(out.parent / "tokens"), "--out_dir", str(out)),
        *("--train.max_steps", str(args.warmup + args.steps), "--train.warmup_steps", "2"),
        *("--train.global_batch_size", str(args.global_batch), "--train.micro_batch_size", str(args.micro_batch)),
        *("--train.eval_interval", "100000", "--train.eval_max_batches", "1", "--train.save_interval", "null"),
        *("--train.tensorboard", "false", "--train.sample_prompt", "null", "--train.peak_flops", "1e11"),
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(extra) or 'one process'} failed:\n{done.stderr[-3000:]}")
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    timed = [float(r["tokens_per_second"]) for r in rows[args.warmup : args.warmup + args.steps - 1]]
    return statistics.median(timed)  # the last step also validates and saves: left out


# --- memory: what each rank holds ---
def local_bytes(tensor: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def memory_child(args: argparse.Namespace) -> None:
    """One process's share after one optimizer step: printed as JSON on the last line."""
    from plainlm import distributed
    from plainlm.config import Config
    from plainlm.model import GPT
    from plainlm.train import default_optimizer

    torch.manual_seed(0)
    with distributed.joined("fsdp" if args.world > 1 else "auto", "cpu") as world:
        model = distributed.wrap(GPT(Config(**model_config(args))), world, "32-true")
        optimizer = default_optimizer([p for p in model.parameters() if p.requires_grad])
        ids = torch.randint(0, 2048, (args.micro_batch, args.seq_len))
        model(ids).float().logsumexp(-1).mean().backward()
        optimizer.step()
        params = sum(local_bytes(p) for p in model.parameters())
        state = sum(local_bytes(t) for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"rank": world.rank, "params": params, "optimizer": state, "peak_rss_mb": peak}))


def memory_per_rank(args: argparse.Namespace, world: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)))
        if world > 1:
            env |= dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
            env |= dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        command = [sys.executable, __file__, *sys.argv[1:], "--rank", str(rank), "--world", str(world)]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, cwd=REPO))
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"memory run on {world} process(es) failed")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--n_embd", type=int, default=384)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--global_batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="logged steps left out at the start")
    parser.add_argument("--steps", type=int, default=12, help="steps timed after the warm-up")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        return memory_child(args)

    from plainlm.config import Config
    from plainlm.model import GPT

    n_params = sum(p.numel() for p in GPT(Config(**model_config(args))).parameters())
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "1 process": [],
            "2 processes, ddp": ["--devices", "2", "--strategy", "ddp"],
            "2 processes, fsdp": ["--devices", "2", "--strategy", "fsdp"],
        }
        tps = {
            name: pretrain_tokens_per_second(args, Path(tmp) / str(i), extra)
            for i, (name, extra) in enumerate(runs.items())
        }
    single, sharded = memory_per_rank(args, 1)[0], memory_per_rank(args, 2)

    print(
        f"\nLlama-shaped model, {n_params / 1e6:.1f}M parameters ({args.n_layer} layers x {args.n_embd}), fp32, "
        f"{cores} cores, global batch {args.global_batch} x {args.seq_len} tokens (micro-batch {args.micro_batch}), "
        f"median of {args.steps - 1} steps after {args.warmup}; load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| run | tokens/s | x one process |\n|---|---|---|")
    for name, value in tps.items():
        print(f"| {name} | {value:.0f} | {value / tps['1 process']:.2f}x |")
    print("\n| FSDP memory | params MB | optimizer MB | params + optimizer | x one process | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    whole = single["params"] + single["optimizer"]
    for label, r in [("one process", single)] + [(f"fsdp rank {r['rank']} of 2", r) for r in sharded]:
        held = r["params"] + r["optimizer"]
        print(
            f"| {label} | {r['params'] / 1e6:.1f} | {r['optimizer'] / 1e6:.1f} | {held / 1e6:.1f} "
            f"| {held / whole:.2f}x | {r['peak_rss_mb']:.0f} |"
        )
    worst = max(r["params"] + r["optimizer"] for r in sharded) / whole
    verdict = "met" if worst <= 0.6 else "not met"
    print(f"\ntarget: per-rank params + optimizer <= 0.6x one process: {worst:.2f}x, {verdict}")


if __name__ == "__main__":
    main()
