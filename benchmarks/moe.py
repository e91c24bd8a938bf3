"""Mixture-of-experts speed, side by side with transformers: same weights, same batches, same threads, one process.

    python benchmarks/moe.py [--shapes qwen3-moe,deepseek-v3] [--steps 4] [--new_tokens 48] [--rounds 2]
                             [--threads 2] [--precision fp32|bf16-mixed|bf16-true]

For each small model shape (random weights drawn by transformers and saved once, loaded by both):
  - training: tokens/s of a plain step (forward, summed token cross entropy over the batch, backward, fused AdamW)
    on the same random batches, every weight trained; transformers runs its default experts kernel
    (`experts_implementation="grouped_mm"` where it can dispatch, as it picks by itself) and sdpa attention;
    plainlm runs eager and under `torch.compile` (the whole model, one graph); `--precision` picks fp32,
    bf16-mixed (float32 weights, bf16 autocast) or bf16-true (both models' weights cast to bfloat16);
  - decoding: batch-1 greedy tokens/s after a short prompt, plainlm `generate` (on the model as `LLM.load`
    gives it, with its CPU kernels for float32 linears) eager and with `compile=True`, against transformers
    `generate` (its default dynamic cache); the tokens must agree;
  - for MLA shapes, the KV cache's bytes per token against a full-attention cache of the same heads.
Sides alternate inside a round and the order flips every round, so that a shared machine's noise hits both;
the best round counts. Prints a markdown table with the issue-18 target (>= 1.3x transformers on training
and on decoding) and writes benchmarks/results/moe-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from plainlm.convert.hf import load_hf_model
from plainlm.generate import generate
from plainlm.kernel_layers import use_cpu_kernels

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 1.3

# Small shapes of the released architectures: a few layers at the width where experts dominate the weights.
SHAPES: dict[str, tuple[str, dict]] = {
    # Qwen3-MoE: 8 experts, top-2, about 100M parameters (75M of them in experts)
    "qwen3-moe": (
        "Qwen3MoeConfig",
        dict(
            vocab_size=16000,
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            intermediate_size=1536,
            moe_intermediate_size=768,
            num_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
        ),
    ),
    # DeepSeek-V3: MLA (q and kv low rank, decoupled RoPE), 16 routed experts top-4 in 4 groups (2 chosen)
    # with sigmoid scores and the correction bias, one shared expert, the first layer dense
    "deepseek-v3": (
        "DeepseekV3Config",
        dict(
            vocab_size=16000,
            hidden_size=512,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=8,
            q_lora_rank=192,
            kv_lora_rank=128,
            qk_nope_head_dim=64,
            qk_rope_head_dim=32,
            v_head_dim=64,
            intermediate_size=1536,
            moe_intermediate_size=384,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
        ),
    ),
}


def make_model_dir(shape: str, directory: Path) -> None:
    class_name, kwargs = SHAPES[shape]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, class_name)(**kwargs))
    with torch.no_grad():  # wide enough that greedy decoding does not repeat one token, so the check means something
        for name, p in model.named_parameters():
            p.normal_(0, 0.06) if p.dim() > 1 else p.fill_(1.0 if "norm" in name else 0.0)
    model.save_pretrained(directory)


def best_of(times: list[float]) -> float:
    return min(times)


class Side:
    """One implementation's model and optimizer, and how it makes logits."""

    def __init__(self, name: str, model: torch.nn.Module, logits: Callable) -> None:
        self.name, self.model, self.logits = name, model, logits
        # fused AdamW: plainlm's default_optimizer, and transformers' Trainer default (adamw_torch_fused)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def train_step(self, ids: torch.Tensor, dtype: torch.dtype) -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = self.logits(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum") / ids[:, 1:].numel()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_training(side: Side, batches: list[torch.Tensor], dtype: torch.dtype) -> float:
    side.model.train()
    side.train_step(batches[0], dtype)  # warm-up
    start = time.perf_counter()
    for ids in batches[1:]:
        side.train_step(ids, dtype)
    tokens = sum(ids[:, :-1].numel() for ids in batches[1:])
    return tokens / (time.perf_counter() - start)


def decode_ours(
    model: torch.nn.Module, prompt: list[int], new_tokens: int, compile: bool = False
) -> tuple[list[int], float]:
    start = time.perf_counter()
    out = generate(model, [prompt], max_new_tokens=new_tokens, temperature=0.0, compile=compile)[0]
    return out, time.perf_counter() - start


def decode_theirs(model: transformers.PreTrainedModel, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    out = model.generate(
        ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    return out[0, len(prompt) :].tolist(), time.perf_counter() - start


def mla_cache_bytes(config: dict, bytes_per_value: int) -> tuple[int, int]:
    """Bytes per token of the whole model's KV cache: MLA's latent + rope key, and full keys and values."""
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    latent = layers * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * bytes_per_value
    key_dim = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    full = layers * heads * (key_dim + config["v_head_dim"]) * bytes_per_value
    return latent, full


def run_shape(shape: str, args: argparse.Namespace, workdir: Path) -> dict:
    directory = workdir / shape
    make_model_dir(shape, directory)
    autocast = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa")
    experts_impl = theirs.config._experts_implementation
    generator = torch.Generator().manual_seed(0)
    vocab = SHAPES[shape][1]["vocab_size"]
    prompt = torch.randint(0, vocab, (32,), generator=generator).tolist()

    # decoding first, on the weights as saved: ours as LLM.load gives it, with its CPU kernels swapped in
    ours, ours_compiled = (use_cpu_kernels(load_hf_model(directory).eval()) for _ in range(2))
    decoders: dict[str, Callable] = {
        "plainlm": lambda n: decode_ours(ours, prompt, n),
        "plainlm compiled": lambda n: decode_ours(ours_compiled, prompt, n, compile=True),
        "transformers": lambda n: decode_theirs(theirs.eval(), prompt, n),
    }
    decode: dict[str, list[float]] = {name: [] for name in decoders}
    tokens: dict[str, list[int]] = {}
    with torch.no_grad():
        for round_index in range(args.rounds):
            for name in decoders if round_index % 2 == 0 else list(decoders)[::-1]:
                decoders[name](4)  # warm-up (and, compiled, the compile)
                tokens[name], seconds = decoders[name](args.new_tokens)
                decode[name].append(len(tokens[name]) / seconds)
                print(f"  {shape} round {round_index} {name}: decode {decode[name][-1]:.1f} tok/s", flush=True)

    ours, ours_compiled = load_hf_model(directory), load_hf_model(directory)
    if args.precision == "bf16-true":
        for model in (ours, ours_compiled, theirs):
            model.to(torch.bfloat16)
    compiled = torch.compile(ours_compiled)
    shape_ = (args.batch, args.seq_len + 1)
    batches = [torch.randint(0, vocab, shape_, generator=generator) for _ in range(args.steps + 1)]
    sides = [
        Side("plainlm", ours, lambda ids: ours(ids)),
        Side("plainlm compiled", ours_compiled, lambda ids: compiled(ids)),
        Side("transformers", theirs, lambda ids: theirs(ids).logits),
    ]
    time_training(sides[1], batches[:2], autocast)  # compiles forward and backward before any timing
    train: dict[str, list[float]] = {s.name: [] for s in sides}
    for round_index in range(args.rounds):
        for side in sides if round_index % 2 == 0 else sides[::-1]:
            train[side.name].append(time_training(side, batches, autocast))
            print(f"  {shape} round {round_index} {side.name}: train {train[side.name][-1]:.0f} tok/s", flush=True)
    n_params = sum(p.numel() for p in ours.parameters())
    result = {
        "shape": shape,
        "parameters": n_params,
        "transformers_experts_implementation": experts_impl,
        "train_tokens_per_s": {k: max(v) for k, v in train.items()},
        "decode_tokens_per_s": {k: max(v) for k, v in decode.items()},
        "same_tokens": len({tuple(t) for t in tokens.values()}) == 1,
    }
    if "kv_lora_rank" in SHAPES[shape][1]:
        latent, full = mla_cache_bytes(SHAPES[shape][1], 4)  # the decoders' float32 caches
        result["kv_cache_bytes_per_token"] = {"mla_latent": latent, "full_attention": full}
    return result


def table(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"MoE, training in {args.precision}, decoding in fp32, {args.threads} threads; training: batch {args.batch} "
        f"x {args.seq_len} tokens, AdamW, best of {args.rounds} rounds of {args.steps} steps; decoding: batch 1, "
        f"greedy, {args.new_tokens} new tokens after 32",
        "",
        "| shape | params | work | plainlm | plainlm compiled | transformers | ratio (eager, compiled) "
        "| target >= 1.3x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for work, key in (("train tok/s", "train_tokens_per_s"), ("decode tok/s", "decode_tokens_per_s")):
            v = r[key]
            eager, compiled = v["plainlm"] / v["transformers"], v["plainlm compiled"] / v["transformers"]
            met = "met" if max(eager, compiled) >= TARGET else "missed"
            lines.append(
                f"| {r['shape']} | {r['parameters'] / 1e6:.0f}M | {work} | {v['plainlm']:.1f} "
                f"| {v['plainlm compiled']:.1f} | {v['transformers']:.1f} | {eager:.2f}x, {compiled:.2f}x | {met} |"
            )
        lines.append(
            f"\n{r['shape']}: transformers' experts kernel {r['transformers_experts_implementation']}; "
            f"the three decoders gave the same tokens: {r['same_tokens']}"
        )
    for r in results:
        if "kv_cache_bytes_per_token" in r:
            c = r["kv_cache_bytes_per_token"]
            lines.append(
                f"\n{r['shape']} KV cache per token: MLA latent {c['mla_latent']} bytes, full attention "
                f"{c['full_attention']} bytes ({c['full_attention'] / c['mla_latent']:.1f}x smaller)"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--new_tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16-mixed", "bf16-true"], default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for shape in args.shapes.split(","):
            results.append(run_shape(shape, args, Path(workdir)))
    text = table(results, args)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"moe-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
