"""Inference speed, side by side with transformers: same config, same weights, same threads, one run.

    python benchmarks/inference.py [--model SmolLM2-135M] [--new_tokens 128] [--rounds 3]

Measures this machine's memory read bandwidth, then for a model of the named shape (random
weights, made by transformers and converted): the forward pass (prefill) and greedy KV-cache
generation at batch 1 in fp32. Prints a markdown table of tokens/s, ratios and model bandwidth
utilisation (weight bytes read per token x tokens/s / measured bandwidth). Ours and theirs
alternate round by round so that noise from a shared machine hits both alike; the best round counts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from plainlm.convert.hf import load_hf_model
from plainlm.convert.hf_config import config_to_hf
from plainlm.generate import generate
from plainlm.kernel_layers import use_cpu_kernels
from plainlm.named_configs import config_for_name


def memory_bandwidth_gbs(size_mb: int = 1024, repeats: int = 10) -> float:
    """Best read bandwidth of a sum over a buffer far larger than the caches."""
    buffer = torch.ones(size_mb * 1024 * 1024 // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best / 1e9


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def make_models(name: str, directory: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    config = config_for_name(name)
    hf_config = transformers.AutoConfig.for_model(**config_to_hf(config))
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)
    theirs.save_pretrained(directory)
    ours = use_cpu_kernels(load_hf_model(directory).eval())  # as LLM.load does
    return ours, theirs.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="SmolLM2-135M")
    parser.add_argument("--prompt_tokens", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--prefill_tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time plainlm's decode step under torch.compile",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bandwidth = memory_bandwidth_gbs()
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = make_models(args.model, Path(tmp))
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    vocab = ours.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    prefill = torch.randint(0, vocab, (1, args.prefill_tokens), generator=torch.Generator().manual_seed(1))

    # Same greedy tokens first: the comparison is only fair if both do the same work.
    with torch.inference_mode():
        expected = theirs.generate(prompt, max_new_tokens=16, do_sample=False)[0, args.prompt_tokens :].tolist()
    assert generate(ours, [prompt[0].tolist()], max_new_tokens=16) == [expected], "greedy outputs differ"

    def our_generate() -> None:
        generate(ours, [prompt[0].tolist()], max_new_tokens=args.new_tokens)

    def our_compiled_generate() -> None:
        generate(ours, [prompt[0].tolist()], max_new_tokens=args.new_tokens, compile=True)

    def their_generate() -> None:
        with torch.inference_mode():
            theirs.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    def our_forward() -> None:
        with torch.inference_mode():
            ours(prefill)

    def their_forward() -> None:
        with torch.inference_mode():
            theirs(prefill)

    compile_seconds = best_time(our_compiled_generate, 1) if args.compile else 0.0  # the first call compiles
    timings: dict[str, list[float]] = {k: [] for k in ("our_gen", "our_compiled", "their_gen", "our_fwd", "their_fwd")}
    for _ in range(args.rounds):
        timings["our_gen"].append(best_time(our_generate, 1))
        if args.compile:
            timings["our_compiled"].append(best_time(our_compiled_generate, 1))
        timings["their_gen"].append(best_time(their_generate, 1))
        timings["our_fwd"].append(best_time(our_forward, 2))
        timings["their_fwd"].append(best_time(their_forward, 2))

    our_tps = args.new_tokens / min(timings["our_gen"])
    their_tps = args.new_tokens / min(timings["their_gen"])
    our_fwd = args.prefill_tokens / min(timings["our_fwd"])
    their_fwd = args.prefill_tokens / min(timings["their_fwd"])
    mbu = lambda tps: weight_bytes * tps / (bandwidth * 1e9)  # noqa: E731

    print(
        f"\n{args.model} shape, fp32, batch 1, {args.threads} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    print(
        f"weights: {weight_bytes / 1e6:.0f} MB; measured memory read bandwidth: {bandwidth:.1f} GB/s; "
        f"best of {args.rounds} alternating rounds (median ratio in brackets)\n"
    )
    print("| measurement | plainlm | transformers | ratio |")
    print("|---|---|---|---|")
    gen_ratio = statistics.median(t / o for o, t in zip(timings["our_gen"], timings["their_gen"], strict=True))
    fwd_ratio = statistics.median(t / o for o, t in zip(timings["our_fwd"], timings["their_fwd"], strict=True))
    print(
        f"| KV-cache generation, {args.prompt_tokens}-token prompt + {args.new_tokens} new (tokens/s) "
        f"| {our_tps:.1f} | {their_tps:.1f} | {our_tps / their_tps:.2f}x ({gen_ratio:.2f}x) |"
    )
    print(f"| model bandwidth utilisation of generation | {mbu(our_tps):.0%} | {mbu(their_tps):.0%} | |")
    if args.compile:
        compiled_tps = args.new_tokens / min(timings["our_compiled"])
        print(
            f"| same, plainlm decode step under torch.compile (tokens/s; compiling took {compile_seconds:.0f} s) "
            f"| {compiled_tps:.1f} | {their_tps:.1f} | {compiled_tps / their_tps:.2f}x |"
        )
        print(f"| model bandwidth utilisation, compiled | {mbu(compiled_tps):.0%} | | |")
    print(
        f"| forward pass, {args.prefill_tokens} tokens (tokens/s) | {our_fwd:.0f} | {their_fwd:.0f} "
        f"| {our_fwd / their_fwd:.2f}x ({fwd_ratio:.2f}x) |"
    )


if __name__ == "__main__":
    main()
