"""Speculative decoding, side by side with transformers: greedy, batch 1, fp32, same weights, same threads.

    python benchmarks/speculative.py [--model smollm2|gemma3] [--new_tokens 128] [--rounds 2] [--compile]

The packaged GGUF model (SmolLM2-135M-Instruct or Gemma 3 270M) is converted once to a Hugging Face
directory (`plainlm convert from-gguf` + `to-hf`) that both load, in float32. Two workloads, each a few
prompts in the model's chat template: chat questions, and an input-grounded task (rewrite a given paragraph
in plain words), where the answer reuses its input. Each runs as: plainlm plain, plainlm with each draft
(ngram, int8, int4: the model's own weights quantized by plainlm's kernels, ngram+int8: lookup, and the int8
copy where lookup finds nothing), transformers' plain `generate`, and transformers' assisted generation with
prompt lookup (`prompt_lookup_num_tokens`); with --compile also plainlm plain, ngram, int8 and ngram+int8 with
the steps compiled (`compile=True`, compiled in a warm-up first). Every
method must produce the same tokens as plainlm plain (checked, and printed when not). Tokens/s = all
prompts' new tokens / their total time; methods alternate within a round and the best round counts. Prints a
markdown table with acceptance rates and the issue-16 targets (best draft >= 2x transformers plain on chat,
>= 2.5x on the grounded task, ahead of assisted generation on both), and writes
benchmarks/results/speculative-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from plainlm.api import LLM
from plainlm.convert.gguf import convert_from_gguf
from plainlm.convert.hf import convert_to_hf
from plainlm.generate import generate
from plainlm.packaged_models import gemma3_gguf, smollm2_gguf
from plainlm.speculative import SpeculativeStats

RESULTS = Path(__file__).resolve().parent / "results"
CHAT = [
    "What food do llamas eat?",
    "Give me three tips for a job interview.",
    "Why is the sky blue?",
    "Write a short poem about autumn.",
]
PARAGRAPHS = [
    "The committee convened on Tuesday to review the proposal for the new library. After a lengthy discussion, "
    "the members agreed that the library would open in the spring, with extended hours on weekends and a "
    "dedicated room for children. Funding will come from the city budget and from private donations.",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into "
    "glucose and oxygen. It takes place mainly in the leaves, inside chloroplasts, which contain the pigment "
    "chlorophyll that absorbs light. The oxygen is released into the air as a by-product.",
    "The train from Lyon to Paris was delayed by two hours because of a signal failure near Dijon. Passengers "
    "received free water and snacks, and the railway company promised a partial refund for every ticket. "
    "Service returned to normal the following morning.",
]
GROUNDED = [f"Rewrite this paragraph in plain words, keeping all its facts:\n\n{p}" for p in PARAGRAPHS]
SPEED_TARGETS = {"chat": 2.0, "grounded": 2.5}
PLAINLM_DRAFTS = ("ngram", "int8", "int4", "ngram+int8")


def hf_directory(gguf_file: Path, scratch: Path) -> Path:
    """The GGUF model as a Hugging Face directory, with transformers' own reading of its tokenizer."""
    hf_dir = convert_to_hf(convert_from_gguf(gguf_file, scratch / "native"), scratch / "hf")
    transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).save_pretrained(hf_dir)
    return hf_dir


def timed(fn: Callable[[list[list[int]]], list[list[int]]], prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    tokens = fn(prompts)
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--lookup_tokens", type=int, default=10, help="transformers' prompt_lookup_num_tokens")
    parser.add_argument("--compile", action="store_true", help="also plainlm plain, ngram and int8 compiled")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    gguf_file = smollm2_gguf() if args.model == "smollm2" else gemma3_gguf()
    with tempfile.TemporaryDirectory() as scratch:
        hf_dir = hf_directory(gguf_file, Path(scratch))
        llm = LLM.load(hf_dir, dtype="float32")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    stop = set(llm.tokenizer.stop_ids)
    workloads = {
        "chat": [llm.encode_prompt(text, chat=True) for text in CHAT],
        "grounded": [llm.encode_prompt(text, chat=True) for text in GROUNDED],
    }
    drafts = {name: llm.draft_for(name) for name in PLAINLM_DRAFTS}  # made once, as LLM keeps them
    totals: dict[str, SpeculativeStats] = {}  # each drafted method's stats, over every prompt

    def ours(prompts: list[list[int]], draft: str | None, compile: bool = False) -> list[list[int]]:
        outputs = []
        for prompt in prompts:
            kwargs = {"draft": drafts[draft]} if draft else {}
            outputs += generate(
                llm.model, [prompt], max_new_tokens=args.new_tokens, stop_ids=stop, compile=compile, **kwargs
            )
            if draft:
                totals.setdefault(f"{draft}{compile}", SpeculativeStats()).add(drafts[draft].stats)
        return outputs

    def transformers_generate(prompts: list[list[int]], **assist: object) -> list[list[int]]:
        outputs = []
        for prompt in prompts:
            with torch.inference_mode():
                ids = theirs.generate(
                    torch.tensor([prompt]),
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    max_new_tokens=args.new_tokens,
                    do_sample=False,
                    eos_token_id=sorted(stop),
                    pad_token_id=sorted(stop)[0],
                    **assist,
                )[0, len(prompt) :].tolist()
            outputs.append([t for t in ids if t not in stop][: args.new_tokens])
        return outputs

    methods: dict[str, Callable[[list[list[int]]], list[list[int]]]] = {
        "plainlm plain": lambda prompts: ours(prompts, None),
        **{f"plainlm --draft {name}": (lambda prompts, name=name: ours(prompts, name)) for name in PLAINLM_DRAFTS},
        **(
            {
                "plainlm plain --compile": lambda prompts: ours(prompts, None, compile=True),
                **{
                    f"plainlm --draft {name} --compile": (lambda prompts, name=name: ours(prompts, name, compile=True))
                    for name in ("ngram", "int8", "ngram+int8")
                },
            }
            if args.compile
            else {}
        ),
        "transformers generate": lambda prompts: transformers_generate(prompts),
        f"transformers prompt lookup ({args.lookup_tokens})": lambda prompts: transformers_generate(
            prompts, prompt_lookup_num_tokens=args.lookup_tokens
        ),
    }
    results: dict[str, dict[str, dict]] = {}
    for workload, prompts in workloads.items():
        ours(prompts[:1], None)  # warm-up: first-call allocations, the kernels' load
        for name, method in methods.items():
            if name.endswith("--compile"):  # compiled (or loaded from inductor's cache) before the clock runs
                method(prompts[:1])
        transformers_generate(prompts[:1])
        best: dict[str, float] = {}
        tokens: dict[str, list[list[int]]] = {}
        acceptance: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, method in methods.items():
                seconds, out = timed(method, prompts)
                best[name] = min(best.get(name, float("inf")), seconds)
                tokens[name] = out
        for key, stats in totals.items():
            draft, compiled = key.removesuffix("True").removesuffix("False"), key.endswith("True")
            acceptance[f"plainlm --draft {draft}{' --compile' if compiled else ''}"] = stats.acceptance_rate
        totals.clear()
        reference = tokens["plainlm plain"]
        count = sum(map(len, reference))
        results[workload] = {
            name: {
                "tokens_per_second": count / best[name],
                "identical": tokens[name] == reference,
                "acceptance_rate": acceptance.get(name),
            }
            for name in methods
        }

    print(
        f"\n{args.model} (packaged GGUF as float32), greedy, batch 1, {args.threads} threads, {args.new_tokens} new "
        f"tokens at most a prompt, torch {torch.__version__}, transformers {transformers.__version__}, best of "
        f"{args.rounds} rounds\n"
    )
    for workload, rows in results.items():
        base = rows["transformers generate"]["tokens_per_second"]
        print(f"### {workload} ({len(workloads[workload])} prompts)\n")
        print("| method | tokens/s | vs transformers generate | same tokens as plainlm plain | draft acceptance |")
        print("|---|---|---|---|---|")
        for name, row in rows.items():
            rate = "" if row["acceptance_rate"] is None else f"{row['acceptance_rate']:.0%}"
            print(
                f"| {name} | {row['tokens_per_second']:.1f} | {row['tokens_per_second'] / base:.2f}x "
                f"| {'yes' if row['identical'] else 'NO'} | {rate} |"
            )
        best_ours = max(
            (row["tokens_per_second"], name) for name, row in rows.items() if name.startswith("plainlm --draft")
        )
        assisted = max(row["tokens_per_second"] for name, row in rows.items() if name.startswith("transformers prompt"))
        ratio = best_ours[0] / base
        print(
            f"\ntarget: best draft ({best_ours[1]}) >= {SPEED_TARGETS[workload]}x transformers generate: "
            f"{ratio:.2f}x, {'met' if ratio >= SPEED_TARGETS[workload] else 'NOT met'}; ahead of assisted "
            f"generation: {best_ours[0] / assisted:.2f}x, {'met' if best_ours[0] > assisted else 'NOT met'}\n"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"speculative-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
