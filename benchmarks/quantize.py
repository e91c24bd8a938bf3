"""Quantized inference on the real SmolLM2-135M-Instruct, side by side with transformers and llama.cpp.

    python benchmarks/quantize.py [--threads 1] [--new_tokens 64] [--rounds 3] [--compile] [--llama-cpp]

Loads the packaged GGUF (Q4_1) dequantized to fp32 and times greedy batch-1 generation for our
fp32, bf16, int8, int4 and nf4; transformers fp32 from the same file (its own GGUF loader); and,
with --llama-cpp, llama.cpp on the file itself (llama-cpp-python, run in its own venv: --lcpp_venv,
created and installed into when missing; the column is skipped if that fails). Decode tokens/s
counts the steps after the first new token, so the prompt's prefill is excluded everywhere (it
is reported separately; llama.cpp feeds its prompt one token at a time). Modes alternate round
by round; the best round counts. Also prints the resident weight bytes, model bandwidth
utilisation (against the read bandwidth measured as benchmarks/inference.py does, at the same
thread count), agreement with our fp32 over the AGREE_PROMPTS, and the issue-3 targets, met or not.
`--compile` adds fp32, int8 and int4 with the decode step under torch.compile (`generate(compile=True)`),
and int8 and int4 with `compile="reduce-overhead"` (the first run of those compiles for minutes).
`--gptq` adds int4 made by `plainlm quantize`'s methods in GPTQ's layout at group size 64: round-to-nearest
on GPTQ's grid, GPTQ with act order and AWQ (both calibrated on 32 windows of 256 tokens of
data/pretrain/stories-1.txt), with the seconds each took, and a held-out perplexity table (data/pretrain/
tales.txt, never calibrated on) with the share of the round-to-nearest gap to fp32 each closes.

Agreement is measured two ways. Free-running: each side generates greedily and positions are
compared one by one, so one early flip between two near-equal logits fails every later position.
Teacher-forced: each side reads the prompt plus our fp32's greedy continuation and predicts every
next token; the share of positions whose argmax equals fp32's token (one flip costs one position).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from inference import memory_bandwidth_gbs  # benchmarks/inference.py, beside this file

from plainlm.convert.gguf import load_gguf_model
from plainlm.convert.gguf_reader import read_gguf
from plainlm.generate import generate, generate_tokens
from plainlm.gptq import calibration_ids, quantize_blocks
from plainlm.kernel_layers import use_cpu_kernels
from plainlm.packaged_models import smollm2_gguf
from plainlm.quantize import Int4Linear, quantize_model, weight_bytes
from plainlm.tokenizer import Tokenizer

PROMPTS = [
    "What food do llamas eat?",
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about the sea.",
    "List three uses of a hash table in programming.",
]
AGREE_TOKENS = 30
DATA = Path(__file__).resolve().parents[1] / "data" / "pretrain"
AGREE_PROMPTS = PROMPTS + [
    "What is the capital of France?",
    "How do I reverse a list in Python?",
    "Give me three tips for sleeping better.",
    "Why do leaves change colour in autumn?",
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "What is 17 times 23?",
    "Translate 'good morning' into Spanish.",
    "What are the benefits of regular exercise?",
    "Describe a cat to someone who has never seen one.",
    "How does a refrigerator keep food cold?",
    "Write a haiku about winter.",
    "What is the difference between weather and climate?",
]

# Run by the llama-cpp-python venv's python: one JSON request per line in, one JSON reply per line out.
LLAMA_CPP_CHILD = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=int(sys.argv[2]), n_threads_batch=int(sys.argv[2]), n_ctx=512,
            verbose=False)
def greedy():  # temperature 0 / top_k 1: the argmax of the last position's logits
    return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())
print(json.dumps({"version": __import__("llama_cpp").__version__}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    llm.reset()
    start = time.perf_counter()
    for token in req["ids"]:  # one at a time: multi-token batches crash some CPU builds of llama-cpp-python
        llm.eval([token])
    if req.get("forced"):  # teacher-forced: the argmax after every token of prompt + continuation
        tokens = [greedy()]
        for token in req["forced"][:-1]:
            llm.eval([token])
            tokens.append(greedy())
        print(json.dumps({"tokens": tokens}), flush=True)
        continue
    tokens = [greedy()]
    first = time.perf_counter()
    for _ in range(req["n"] - 1):
        llm.eval([tokens[-1]])
        tokens.append(greedy())
    end = time.perf_counter()
    print(json.dumps({"prefill": first - start, "decode": end - first, "tokens": tokens}), flush=True)
"""


class LlamaCpp:
    def __init__(self, venv: Path, gguf: Path, threads: int) -> None:
        python = venv / "bin" / "python"
        if subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode if python.exists() else 1:
            print(f"installing llama-cpp-python into {venv} (a build from source takes minutes)", flush=True)
            subprocess.run([sys.executable, "-m", "venv", venv], check=True)
            subprocess.run([python, "-m", "pip", "install", "-q", "llama-cpp-python", "numpy"], check=True)
        cmd = [python, "-c", LLAMA_CPP_CHILD, str(gguf), str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.version = json.loads(self.proc.stdout.readline())["version"]

    def run(self, ids: list[int], n: int) -> tuple[float, float, list[int]]:
        self.proc.stdin.write(json.dumps({"ids": ids, "n": n}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return reply["prefill"], reply["decode"], reply["tokens"]

    def forced(self, ids: list[int], continuation: list[int]) -> list[int]:
        self.proc.stdin.write(json.dumps({"ids": ids, "n": 0, "forced": continuation}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["tokens"]


def run_ours(
    model: torch.nn.Module, ids: list[int], n: int, compile: bool | str = False
) -> tuple[float, float, list[int]]:
    tokens, start, first = [], time.perf_counter(), 0.0
    for step in generate_tokens(model, [ids], max_new_tokens=n, compile=compile):
        tokens.append(step[0])
        first = first or time.perf_counter()
    return first - start, time.perf_counter() - first, tokens


class Stamps(transformers.generation.streamers.BaseStreamer):
    """Times of each `put`: the first is the prompt, then one per new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_theirs(model: torch.nn.Module, ids: list[int], n: int) -> tuple[float, float, list[int]]:
    stamps, start = Stamps(), time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=stamps)
    return stamps.times[1] - start, stamps.times[-1] - stamps.times[1], out[0, len(ids) :].tolist()


def share_equal(outputs: list[list[int]], reference: list[list[int]]) -> float:
    pairs = [(a, b) for out, ref in zip(outputs, reference, strict=True) for a, b in zip(out, ref, strict=True)]
    return sum(a == b for a, b in pairs) / len(pairs)


@torch.inference_mode()
def forced_argmax(model: torch.nn.Module, ids: list[int], continuation: list[int]) -> list[int]:
    """The argmax next token at each position of `continuation`, reading prompt + continuation in one pass."""
    logits = model(torch.tensor([ids + continuation[:-1]]))
    logits = logits if isinstance(logits, torch.Tensor) else logits.logits  # transformers returns an output object
    return logits[0, len(ids) - 1 :].argmax(-1).tolist()


def heldout_perplexity(model: torch.nn.Module, ids: list[int], window: int = 512) -> float:
    """exp of the mean next-token loss over `ids` in consecutive windows (each starts afresh)."""
    losses, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start : start + window + 1]])
            logits = model(chunk[:, :-1])
            losses += torch.nn.functional.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    return math.exp(losses / count)


def read_bytes_per_token(model: torch.nn.Module) -> int:
    """Resident weight bytes less the nibble rows of int4 layers run by PyTorch's kernel (it reads `packed`);
    plainlm's int4 kernel reads its tiles, the same bytes as the rows in its own order, and there is no copy."""
    portable = {id(m.weight): m.weight for m in model.modules() if isinstance(m, Int4Linear) and m.kernel == "aten"}
    return weight_bytes(model) - sum(t.numel() * t.element_size() for t in portable.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time compiled decode steps (see above)")
    parser.add_argument("--llama-cpp", action="store_true", help="also time llama.cpp (llama-cpp-python)")
    parser.add_argument("--lcpp_venv", type=Path, default=Path("/tmp/lcpp"))
    parser.add_argument("--gptq", action="store_true", help="also plainlm quantize's rtn, gptq and awq (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gguf = smollm2_gguf()

    bandwidth = memory_bandwidth_gbs()
    with tempfile.TemporaryDirectory() as tmp:
        base = use_cpu_kernels(load_gguf_model(gguf, tokenizer_dir=tmp).eval())  # as LLM.load does
        tokenizer = Tokenizer(tmp)
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in AGREE_PROMPTS]
        prompts = [tokenizer.encode(chat, bos=False) for chat in chats]
        calibration = calibration_ids(tokenizer, DATA / "stories-1.txt", 32, 256) if args.gptq else None
        held_out = tokenizer.encode((DATA / "tales.txt").read_text(encoding="utf-8"))
    state = {k: v.clone() for k, v in base.state_dict().items()}  # quantize_model works in place

    def fresh() -> torch.nn.Module:
        model = use_cpu_kernels(load_gguf_model(gguf).eval())
        model.load_state_dict(state)
        return model

    ours = {"fp32": base, "bf16": fresh().to(torch.bfloat16)}
    ours |= {mode: quantize_model(fresh(), mode) for mode in ("int8", "int4", "nf4")}
    quantize_seconds = {}
    for method in ("rtn", "gptq", "awq") if args.gptq else ():
        started = time.perf_counter()
        ours[f"int4 {method}"] = quantize_blocks(
            fresh(), method, 64, act_order=method == "gptq", calibration=calibration, log=lambda line: None
        )
        quantize_seconds[method] = time.perf_counter() - started
    runners = {f"plainlm {k}": (lambda ids, n, m=m: run_ours(m, ids, n)) for k, m in ours.items()}
    forward = {f"plainlm {k}": m for k, m in ours.items()}
    read_bytes = {f"plainlm {k}": read_bytes_per_token(m) for k, m in ours.items()}
    resident = {f"plainlm {k}": weight_bytes(m) for k, m in ours.items()}
    # Each compiled mode decodes its own copy of the model, as a user running that mode would: an eager
    # run on the same model drops its KV cache, and the compiled step's guards, which skip modules whose
    # attribute dicts are unchanged, would then check every block again on every step.
    compiled = [("fp32", True), ("int8", True), ("int4", True)] + [(m, "reduce-overhead") for m in ("int8", "int4")]
    for mode, how in compiled if args.compile else ():
        name = f"plainlm {mode} " + ("compiled" if how is True else how)
        model = fresh() if mode == "fp32" else quantize_model(fresh(), mode)
        runners[name] = lambda ids, n, m=model, how=how: run_ours(m, ids, n, compile=how)
        forward[name], read_bytes[name], resident[name] = (
            model,
            read_bytes[f"plainlm {mode}"],
            resident[f"plainlm {mode}"],
        )

    theirs = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    runners["transformers fp32"] = lambda ids, n: run_theirs(theirs.eval(), ids, n)
    forward["transformers fp32"] = theirs.eval()
    read_bytes["transformers fp32"] = resident["transformers fp32"] = resident["plainlm fp32"]
    note, lcpp_version = "", None
    if args.llama_cpp:
        try:
            lcpp = LlamaCpp(args.lcpp_venv, gguf, args.threads)
            runners["llama.cpp Q4_1"], lcpp_version = lcpp.run, lcpp.version
            read_bytes["llama.cpp Q4_1"] = sum(int(t.n_bytes) for t in read_gguf(gguf).tensors)
            resident["llama.cpp Q4_1"] = gguf.stat().st_size
        except (OSError, subprocess.CalledProcessError, ValueError) as error:
            note = f"llama.cpp skipped: could not install or start llama-cpp-python ({error})"
    else:
        note = "llama.cpp not timed (pass --llama-cpp)"

    # Agreement with our fp32 over the first AGREE_TOKENS tokens, free-running and teacher-forced.
    reference = [generate(base, [ids], max_new_tokens=AGREE_TOKENS)[0] for ids in prompts]
    agree, forced = {}, {}
    for name, run in runners.items():
        outputs = [run(ids, AGREE_TOKENS)[2] for ids in prompts]
        agree[name] = share_equal(outputs, reference)
        predict = (
            lcpp.forced if name == "llama.cpp Q4_1" else (lambda ids, ref, m=forward[name]: forced_argmax(m, ids, ref))
        )
        predicted = [predict(ids, ref) for ids, ref in zip(prompts, reference, strict=True)]
        forced[name] = share_equal(predicted, reference)
    prompts = prompts[: len(PROMPTS)]  # the speed runs use the first prompt, as before

    decode = {name: float("inf") for name in runners}
    prefill = dict(decode)
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name, run in runners.items():
            first, rest, tokens = run(prompts[0], args.new_tokens)
            assert len(tokens) == args.new_tokens, (name, len(tokens))
            prefill[name], decode[name] = min(prefill[name], first), min(decode[name], rest)
        loads.append(os.getloadavg()[0])
    tps = {name: (args.new_tokens - 1) / seconds for name, seconds in decode.items()}

    print(
        f"\nSmolLM2-135M-Instruct ({gguf.name}, ours dequantized to fp32), batch 1, greedy, {args.threads} thread(s), "
        f"torch {torch.__version__}, transformers {transformers.__version__}, llama-cpp-python {lcpp_version}"
    )
    print(
        f"prompt: {len(prompts[0])} tokens, then {args.new_tokens} new; decode tokens/s over the "
        f"{args.new_tokens - 1} steps after the first token; best of {args.rounds} alternating rounds; "
        f"measured memory read bandwidth {bandwidth:.1f} GB/s; 1-min load average {min(loads):.1f}-{max(loads):.1f}"
    )
    if note:
        print(note)
    agreement = f"agreement, free / forced ({AGREE_TOKENS} tok x {len(AGREE_PROMPTS)})"
    print(f"\n| model | decode tokens/s | x our fp32 | prompt (ms) | weights MB | x fp32 | MBU | {agreement} |")
    print("|---|---|---|---|---|---|---|---|")
    for name in runners:
        mbu = read_bytes[name] * tps[name] / (bandwidth * 1e9)
        print(
            f"| {name} | {tps[name]:.1f} | {tps[name] / tps['plainlm fp32']:.2f}x | {prefill[name] * 1e3:.0f} "
            f"| {resident[name] / 1e6:.1f} | {resident[name] / resident['plainlm fp32']:.3f} | {mbu:.0%} "
            f"| {agree[name]:.0%} / {forced[name]:.0%} |"
        )

    if args.gptq:
        print(f"\nseconds to quantize (plainlm quantize's methods, group size 64): {quantize_seconds}")
        scores = {
            name: heldout_perplexity(ours[name], held_out)
            for name in ("fp32", "int4", *map("int4 {}".format, quantize_seconds))
        }
        gap = scores["int4 rtn"] - scores["fp32"]
        print(f"\nheld-out perplexity (tales.txt, {len(held_out)} tokens)\n")
        print("| model | perplexity | gap to round-to-nearest closed |\n|---|---|---|")
        for name, score in scores.items():
            print(f"| plainlm {name} | {score:.3f} | {(scores['int4 rtn'] - score) / gap:.0%} |")

    fp32 = tps["plainlm fp32"]
    best_quantized = max(
        tps[name] for name in tps if name.startswith("plainlm") and "fp32" not in name and "bf16" not in name
    )
    targets = [
        ("int8 >= 2x our fp32 tokens/s", tps["plainlm int8"] / fp32, 2.0, "x"),
        ("int4 >= 3x our fp32 tokens/s", tps["plainlm int4"] / fp32, 3.0, "x"),
        ("int8 weights <= 0.3x fp32 bytes", resident["plainlm int8"] / resident["plainlm fp32"], 0.3, "<="),
        ("int8 greedy agreement >= 90% (free-running)", agree["plainlm int8"], 0.9, "x"),
        ("int8 greedy agreement >= 90% (teacher-forced)", forced["plainlm int8"], 0.9, "x"),
    ]
    if args.compile:
        compiled_fp32 = tps["plainlm fp32 compiled"]
        targets.insert(2, ("int8 >= 2x fp32, both compiled", tps["plainlm int8 compiled"] / compiled_fp32, 2.0, "x"))
        targets.insert(3, ("int4 >= 3x fp32, both compiled", tps["plainlm int4 compiled"] / compiled_fp32, 3.0, "x"))
    if "llama.cpp Q4_1" in tps:
        targets.insert(2, ("best quantized >= llama.cpp tokens/s", best_quantized / tps["llama.cpp Q4_1"], 1.0, "x"))
    print("\n| target | measured | |\n|---|---|---|")
    for label, value, bound, kind in targets:
        met = value <= bound if kind == "<=" else value >= bound
        print(f"| {label} | {value:.2f} | {'met' if met else 'not met'} |")


if __name__ == "__main__":
    main()
