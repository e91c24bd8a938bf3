"""LoRA DPO speed and memory, side by side: `plainlm finetune --loss dpo` against trl's DPOTrainer + peft.

    python benchmarks/preference.py [--steps 12] [--threads 2] [--micro_batch_size 4] [--global_batch_size 8]

Both train SmolLM2-135M-Instruct from one Hugging Face directory (the packaged GGUF converted with `plainlm
convert from-gguf` + `to-hf`, and transformers' own reading of the file's tokenizer; loading the GGUF itself
would charge plainlm the dequantization's heap, not the training's memory) with LoRA r 8 on every linear layer,
on the shipped pirate pairs (data/preference), DPO beta 0.1, max length 256, fp32, AdamW lr 5e-4, the same
batch sizes and thread count, the reference being the base with the adapters off in both. Each runs in a
process of its own (peak RSS is the process's high-water mark, VmHWM), the two alternating. Speed: pairs per
second over the steps after the first two (warm-up), times the mean tokens of a pair (prompt + chosen + prompt
+ rejected, as both tokenize them), so both count the same tokens. Prints a markdown table and the issue-15
targets (>= 1.5x tokens/s, <= 0.8x peak memory), met or not, and
writes benchmarks/results/preference-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
PAIRS = REPO / "data" / "preference" / "pirate_pairs.jsonl"
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_LENGTH = 256
SPEED_TARGET, MEMORY_TARGET = 1.5, 0.8


def peak_rss() -> int:
    """This process's high-water mark of resident memory, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_plainlm(args: argparse.Namespace, out: Path, hf_dir: Path) -> dict:
    import csv

    from plainlm.data.sft import SFTDataConfig
    from plainlm.finetune import finetune
    from plainlm.lora import LoRAConfig
    from plainlm.objectives import PreferenceArgs
    from plainlm.train import TrainArgs

    def optimizer(params):
        import torch

        return torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0, fused=True)

    finetune(
        hf_dir,
        out_dir=out,
        method="lora",
        loss="dpo",
        preference=PreferenceArgs(beta=0.1),
        data=SFTDataConfig(path=str(PAIRS), val_fraction=0.05, max_seq_length=MAX_LENGTH),
        lora=LoRAConfig(r=8, alpha=16, dropout=0.0, targets=TARGETS),
        train=TrainArgs(
            max_steps=args.steps,
            global_batch_size=args.global_batch_size,
            micro_batch_size=args.micro_batch_size,
            warmup_steps=1,
            eval_interval=10**6,
            save_interval=None,
            precision="32-true",
            tensorboard=False,
            peak_flops=1e11,
        ),  # fmt: skip
        optimizer=optimizer,
    )
    with (out / "metrics.csv").open() as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    # The last step's window also holds the validation at max_steps (the loop always validates at the end).
    timed = seconds[2:-1]
    return {"seconds_per_step": sum(timed) / len(timed), "peak_rss": peak_rss()}


def run_trl(args: argparse.Namespace, out: Path, hf_dir: Path) -> dict:
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    records = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    times: list[float] = []

    class StepTimes(transformers.TrainerCallback):
        def on_step_end(self, *_, **__) -> None:
            times.append(time.perf_counter())

    config = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.global_batch_size // args.micro_batch_size, max_steps=args.steps,
        learning_rate=5e-4, lr_scheduler_type="cosine", warmup_steps=1, weight_decay=0.0, beta=0.1,
        max_length=MAX_LENGTH, logging_steps=1, report_to=[], save_strategy="no", bf16=False, fp16=False,
        use_cpu=True, dataloader_num_workers=0, seed=1337,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype="float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=HF_TARGETS, task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(records), processing_class=tokenizer, peft_config=lora
    )
    trainer.add_callback(StepTimes())
    trainer.train()
    gaps = [b - a for a, b in zip(times[1:], times[2:], strict=False)]  # steps 3.. (after two warm-up steps)
    return {"seconds_per_step": sum(gaps) / len(gaps), "peak_rss": peak_rss()}


def mean_pair_tokens() -> float:
    """Tokens a pair feeds the model (prompt + chosen, prompt + rejected), as plainlm (= trl) tokenizes it."""
    from plainlm.api import LLM
    from plainlm.data.preference import read_pairs, tokenize_pairs
    from plainlm.packaged_models import smollm2_gguf

    tokenizer = LLM.load(smollm2_gguf()).tokenizer
    pairs = tokenize_pairs(read_pairs(PAIRS), tokenizer, MAX_LENGTH)
    return sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) / len(pairs)


def child(args: argparse.Namespace) -> None:
    """One side's run in this process; prints its result as the last line (JSON)."""
    import torch

    torch.set_num_threads(args.threads)
    out = Path(tempfile.mkdtemp(prefix=f"plainlm-bench-preference-{args.side}-"))
    run = run_plainlm if args.side == "plainlm" else run_trl
    result = run(args, out, Path(args.hf_dir))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--micro_batch_size", type=int, default=4, help="pairs per forward pass")
    parser.add_argument("--global_batch_size", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each side, alternating; the best counts")
    parser.add_argument("--side", choices=["plainlm", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--hf_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(args)

    import transformers

    from plainlm.convert.gguf import convert_from_gguf
    from plainlm.convert.hf import convert_to_hf
    from plainlm.packaged_models import smollm2_gguf

    gguf_file = smollm2_gguf()
    scratch = Path(tempfile.mkdtemp(prefix="plainlm-bench-preference-"))
    hf_dir = convert_to_hf(convert_from_gguf(gguf_file, scratch / "native"), scratch / "hf")
    if not (hf_dir / "tokenizer_config.json").exists():
        transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).save_pretrained(hf_dir)
    tokens_per_pair = mean_pair_tokens()

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    common = ["--steps", str(args.steps), "--threads", str(args.threads), "--hf_dir", str(hf_dir),
              "--micro_batch_size", str(args.micro_batch_size),
              "--global_batch_size", str(args.global_batch_size)]  # fmt: skip
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for side in ("trl", "plainlm"):
            command = [sys.executable, __file__, "--side", side, *common]
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
            if done.returncode:
                sys.exit(f"the {side} run failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if side not in best or result["seconds_per_step"] < best[side]["seconds_per_step"]:
                best[side] = {**result, "peak_rss": min(result["peak_rss"], best.get(side, result)["peak_rss"])}
            print(f"{side}: {result['seconds_per_step']:.2f} s/step, peak RSS {result['peak_rss'] / 2**30:.2f} GiB")

    rows = {}
    for side, result in best.items():
        pairs_per_second = args.global_batch_size / result["seconds_per_step"]
        rows[side] = {
            "seconds_per_step": round(result["seconds_per_step"], 3),
            "tokens_per_second": round(pairs_per_second * tokens_per_pair, 1),
            "peak_rss_gib": round(result["peak_rss"] / 2**30, 3),
        }
    speed = rows["plainlm"]["tokens_per_second"] / rows["trl"]["tokens_per_second"]
    memory = rows["plainlm"]["peak_rss_gib"] / rows["trl"]["peak_rss_gib"]
    print(f"\nLoRA DPO, SmolLM2-135M-Instruct fp32, {args.threads} threads, {args.global_batch_size} pairs a step "
          f"({args.micro_batch_size} a pass), {tokens_per_pair:.0f} tokens a pair, {args.steps} steps\n")  # fmt: skip
    print("| | s/step | tokens/s | peak RSS (GiB) |")
    print("|---|---|---|---|")
    for side in ("trl", "plainlm"):
        row = rows[side]
        print(f"| {side} | {row['seconds_per_step']} | {row['tokens_per_second']} | {row['peak_rss_gib']} |")
    speed_met = "met" if speed >= SPEED_TARGET else "NOT met"
    memory_met = "met" if memory <= MEMORY_TARGET else "NOT met"
    print(
        f"\ntokens/s {speed:.2f}x trl's (target >= {SPEED_TARGET}x: {speed_met}); "
        f"peak memory {memory:.2f}x (target <= {MEMORY_TARGET}x: {memory_met})"
    )
    results = BENCHMARKS / "results" / f"preference-{time.strftime('%Y%m%d-%H%M')}.json"
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps({"args": vars(args), "tokens_per_pair": tokens_per_pair, "rows": rows}, indent=2))
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
