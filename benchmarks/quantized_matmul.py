"""One quantized layer's forward at decoding and training sizes: plainlm's kernels beside PyTorch's and dense.

    python benchmarks/quantized_matmul.py [--threads 2] [--in_features 576] [--out_features 1536]

For each row count (batch x tokens), ms per call of an int4 (groups of 64) and an int8 layer through
plainlm's kernels and through PyTorch's (`layer.pack("aten")`), against a dense fp32 and bf16 matmul of
the same weight. Decoding reads one row; QLoRA on an int8/int4 base runs the frozen layer's forward at
hundreds of rows. Best of --repeats calls.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from plainlm import quantize
from plainlm.kernels import kernels_loaded

ROWS = (1, 16, 64, 256, 512)


def best_ms(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--in_features", type=int, default=576)  # SmolLM2-135M's MLP up projection
    parser.add_argument("--out_features", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels_loaded():
        raise SystemExit("plainlm's kernels did not build here (they need AVX512-VNNI and a C++ compiler)")
    torch.manual_seed(0)
    linear = torch.nn.Linear(args.in_features, args.out_features, bias=False)
    weight = linear.weight.detach()
    layers = {}
    for mode in ("int4", "int8"):
        for kernel in ("plainlm", "aten"):
            layer = quantize._quantize_linear(linear, mode, 64 if mode == "int4" else None)
            layer.pack(kernel)
            layers[f"{mode} {'plainlm' if kernel == 'plainlm' else 'PyTorch'}"] = layer
    print(f"{args.in_features} -> {args.out_features}, {args.threads} thread(s), ms per call, best of {args.repeats}")
    print("\n| rows | " + " | ".join([*layers, "fp32 dense", "bf16 dense"]) + " |")
    print("|---" * (len(layers) + 3) + "|")
    for rows in ROWS:
        times = row_times(torch.randn(rows, args.in_features), list(layers.values()), weight, args.repeats)
        print(f"| {rows} | " + " | ".join(f"{t:.3f}" for t in times) + " |")


def row_times(x: torch.Tensor, layers: list[torch.nn.Module], weight: torch.Tensor, repeats: int) -> list[float]:
    times = [best_ms(lambda layer=layer: layer.matmul(x), repeats) for layer in layers]
    times.append(best_ms(lambda: x @ weight.T, repeats))
    x16, weight16 = x.bfloat16(), weight.bfloat16()
    times.append(best_ms(lambda: x16 @ weight16.T, repeats))
    return times


if __name__ == "__main__":
    main()
