"""Finetuning end to end through the real command: every method, exact resume after SIGKILL,
bad input, and outputs that the rest of plainlm and peft accept."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import peft
import pytest
import torch
import transformers
from helpers import REPO, reference_greedy, run_cli

from plainlm import LLM
from plainlm.generate import generate

FAST = [
    "--data.max_seq_length",
    "128",
    "--train.global_batch_size",
    "4",
    "--train.micro_batch_size",
    "2",
    "--train.eval_interval",
    "3",
    "--train.eval_max_batches",
    "1",
    "--train.tensorboard",
    "false",
    "--train.warmup_steps",
    "2",
    "--train.peak_flops",
    "1e11",
    "--lora.r",
    "4",
    "--lora.dropout",
    "0.1",
    "--optimizer.class_path",
    "torch.optim.AdamW",
    "--optimizer.init_args.lr",
    "0.003",
]


def finetune_args(model: Path, out: Path, method: str, steps: int, *extra: str) -> list[str]:
    return [
        "finetune",
        "--checkpoint_dir",
        str(model),
        "--out_dir",
        str(out),
        "--method",
        method,
        "--train.max_steps",
        str(steps),
        *FAST,
        *extra,
    ]


def losses(out: Path) -> dict[int, str]:
    with (out / "metrics.csv").open() as f:
        return {int(r["step"]): r["loss"] for r in csv.DictReader(f)}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_after_sigkill_gives_the_same_losses(tiny_hf_dir: Path, tmp_path: Path, method: str) -> None:
    steps = 8
    reference = run_cli(*finetune_args(tiny_hf_dir, tmp_path / "a", method, steps, "--train.save_interval", "2"))
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = losses(tmp_path / "a")
    assert sorted(expected) == list(range(1, steps + 1))

    out = tmp_path / "b"
    args = finetune_args(tiny_hf_dir, out, method, steps, "--train.save_interval", "2")
    process = subprocess.Popen(
        [sys.executable, "-m", "plainlm.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while not (out / "step-000004").exists():  # killed part-way: after a checkpoint, before the end
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert not (out / "final").exists()

    resumed = run_cli(*args, "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resumed from" in resumed.stdout
    assert losses(out) == expected  # bit for bit, as text


@pytest.mark.slow
def test_lora_output_is_a_checkpoint_and_a_peft_adapter(tiny_hf_dir: Path, tmp_path: Path) -> None:
    evaluation = ["--eval.tasks", "plainlm_mc", "--eval.include_path", str(REPO / "data" / "eval"), "--eval.limit", "4"]
    result = run_cli(*finetune_args(tiny_hf_dir, tmp_path, "lora", 3, "--train.save_interval", "3", *evaluation))
    assert result.returncode == 0, result.stderr[-2000:]
    # --eval.tasks: lm-eval's table on final/, printed and written beside loss.png
    assert "plainlm_mc" in result.stdout and "acc" in (tmp_path / "eval" / "results.md").read_text()
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["results"]["plainlm_mc"]["acc,none"] >= 0
    final = tmp_path / "final"
    for name in ("model.safetensors", "config.yaml", "tokenizer.json", "recipe.yaml", "adapter/adapter_config.json"):
        assert (final / name).exists(), name
    assert (tmp_path / "step-000003" / "recipe.yaml").exists() and (tmp_path / "loss.png").exists()
    merged = LLM.load(final)
    ids = merged.tokenizer.encode("Hello")  # the loaded checkpoint decodes (KV cache) as its own logits say
    assert generate(merged.model, [ids], max_new_tokens=3) == [reference_greedy(merged.model, ids, 3)]
    # peft puts our adapter on the transformers base and agrees with our merged model
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(base, final / "adapter").eval()
    ids = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)
    # merge-lora gives the same model from base + adapter
    merged_again = run_cli("merge-lora", str(tiny_hf_dir), str(final / "adapter"), str(tmp_path / "merged"))
    assert merged_again.returncode == 0, merged_again.stderr
    with torch.no_grad():
        torch.testing.assert_close(LLM.load(tmp_path / "merged").model(ids), merged.model(ids), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_resume_refuses_another_method(tiny_hf_dir: Path, tmp_path: Path) -> None:
    assert run_cli(*finetune_args(tiny_hf_dir, tmp_path, "lora", 2, "--train.save_interval", "2")).returncode == 0
    result = run_cli(*finetune_args(tiny_hf_dir, tmp_path, "full", 4, "--resume", "true"))
    assert result.returncode == 2
    assert "different run" in result.stderr and "method" in result.stderr and "Traceback" not in result.stderr


def test_recipe_key_typo_names_the_closest_key(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("checkpoint_dir: x\ntrain:\n  max_stepz: 3\n")
    result = run_cli("finetune", "--config", str(recipe))
    assert result.returncode == 2
    assert "'train.max_stepz' does not exist" in result.stderr and "'train.max_steps'" in result.stderr


def test_every_shipped_recipe_parses() -> None:
    from plainlm.recipe import check_recipe_keys, parser_for

    recipes = sorted((REPO / "recipes").rglob("*.yaml"))
    assert recipes
    for recipe in recipes:
        command = recipe.relative_to(REPO / "recipes").parts[0]
        module = __import__(f"plainlm.{command}", fromlist=[command])
        parser = parser_for(getattr(module, command), f"plainlm {command}")
        check_recipe_keys(recipe, parser)
        cfg = parser.parse_args(["--config", str(recipe)])
        assert cfg.train.max_steps > 0, recipe


@pytest.mark.slow
def test_real_model_lora_run(tmp_path: Path) -> None:
    """A short LoRA run on the real SmolLM2-135M-Instruct (from its packaged GGUF), as `make demo` does: the
    loss falls, and the pirate voice of the shipped data ("Arr, matey!") starts to show in the answers to the
    training examples' own prompts, where the model did not talk like a pirate before."""
    from plainlm.data.sft import SFTDataConfig
    from plainlm.finetune import finetune
    from plainlm.lora import LoRAConfig
    from plainlm.packaged_models import smollm2_gguf
    from plainlm.train import TrainArgs

    records = tmp_path / "pirate.jsonl"
    lines = (REPO / "data" / "finetune" / "pirate_train.jsonl").read_text().splitlines()[:8]
    records.write_text("\n".join(lines) + "\n")
    prompts = [json.loads(line)["instruction"] for line in lines]
    assert all(json.loads(line)["output"].startswith("Arr") for line in lines)

    def pirate_answers(checkpoint: Path) -> int:
        llm = LLM.load(checkpoint)
        return sum("arr" in llm.generate(p, max_new_tokens=8, temperature=0.0, chat=True).lower() for p in prompts)

    before = pirate_answers(smollm2_gguf())
    final = finetune(
        smollm2_gguf(),
        out_dir=tmp_path / "run",
        method="lora",
        data=SFTDataConfig(path=str(records), val_path=str(records), max_seq_length=96),
        lora=LoRAConfig(r=8, alpha=16, targets=["q", "v", "o", "down"]),
        train=TrainArgs(
            max_steps=6,
            global_batch_size=8,
            micro_batch_size=8,
            warmup_steps=1,
            eval_interval=6,
            eval_max_batches=1,
            save_interval=None,
            tensorboard=False,
            peak_flops=1e11,
        ),
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
    )
    steps = losses(tmp_path / "run")
    assert float(steps[6]) < 0.8 * float(steps[1]), steps
    assert (final / "adapter" / "adapter_model.safetensors").exists()
    after = pirate_answers(final)
    assert before == 0 and after >= len(prompts) // 2, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "quantize"), [("dora", "nf4"), ("qlora", "nf4"), ("qlora", "fp4"), ("qlora", "int4")]
)
def test_dora_and_qlora_train_and_export(tiny_hf_dir: Path, tmp_path: Path, method: str, quantize: str) -> None:
    extra = ("--train.save_interval", "2", "--quantize", quantize)
    result = run_cli(*finetune_args(tiny_hf_dir, tmp_path, method, 2, *extra))
    assert result.returncode == 0, result.stderr[-2000:]
    steps = losses(tmp_path)
    assert sorted(steps) == [1, 2] and all(float(v) > 0 for v in steps.values())
    adapter = tmp_path / "final" / "adapter"
    assert (adapter / "adapter_model.safetensors").exists()
    merged = LLM.load(tmp_path / "final")  # a plain full-precision checkpoint, adapter folded in
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_gpu_run_loads_on_the_cpu_where_the_float_model_would_not_fit_its_gpu() -> None:
    from plainlm.distributed import World
    from plainlm.finetune import loads_on_cpu

    gpu = torch.device("cuda", 0)  # only a device object: nothing runs on it

    def loads(device: torch.device, strategy: str, method: str, full_reference: bool = False) -> bool:
        return loads_on_cpu(World(device=device, strategy=strategy), method, full_reference)

    assert loads(gpu, "none", "qlora") and loads(gpu, "ddp", "qlora")  # quantized a layer at a time on the GPU
    assert loads(gpu, "fsdp", "lora") and loads(gpu, "fsdp", "full")  # sharded a block at a time
    assert not loads(gpu, "none", "lora") and not loads(gpu, "ddp", "full")  # loaded on the GPU, as it fits there
    assert not loads(gpu, "fsdp", "full", full_reference=True)  # a full DPO run's reference pass needs it whole
    assert not any(loads(torch.device("cpu"), s, m) for s in ("none", "fsdp") for m in ("qlora", "full"))


@pytest.mark.parametrize(
    ("method", "precision"), [pytest.param("qlora", "32-true", marks=pytest.mark.slow), ("lora", "bf16-mixed")]
)
def test_a_model_loaded_on_the_cpu_first_trains_and_exports_as_one_loaded_in_place(
    tiny_hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, precision: str
) -> None:
    """The path a qlora or FSDP run takes on a GPU (loads_on_cpu), taken on the CPU, where only the device it moves
    to differs; and the dtype finetune loads in: float32 for bf16-mixed too (a GPU's default would be bf16)."""
    import plainlm.finetune as finetune_module
    from plainlm.data.sft import SFTDataConfig
    from plainlm.lora import LoRAConfig
    from plainlm.train import TrainArgs

    loads, real_load = [], LLM.load
    monkeypatch.setattr(finetune_module, "loads_on_cpu", lambda *args: True)
    monkeypatch.setattr(
        finetune_module.LLM, "load", lambda path, **kwargs: loads.append(kwargs) or real_load(path, **kwargs)
    )
    records = tmp_path / "records.jsonl"
    records.write_text("\n".join((REPO / "data" / "finetune" / "pirate_train.jsonl").read_text().splitlines()[:8]))
    final = finetune_module.finetune(
        tiny_hf_dir,
        out_dir=tmp_path / "run",
        method=method,
        data=SFTDataConfig(path=str(records), val_path=str(records), max_seq_length=64),
        lora=LoRAConfig(r=4, alpha=8, targets=["q", "v", "down"]),
        train=TrainArgs(
            max_steps=2,
            global_batch_size=4,
            micro_batch_size=4,
            warmup_steps=1,
            eval_interval=2,
            eval_max_batches=1,
            save_interval=None,
            tensorboard=False,
            peak_flops=1e11,
            precision=precision,
        ),
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-2),
    )
    assert loads[0] == {"device": "cpu", "dtype": "float32", "cpu_kernels": False}
    steps = losses(tmp_path / "run")
    assert sorted(steps) == [1, 2] and float(steps[2]) < float(steps[1]), steps
    merged = LLM.load(final)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(base, final / "adapter").eval()
    ids = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)
