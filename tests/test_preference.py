"""Preference tuning in the one loop: a LoRA DPO step against peft + trl on the same model and batch, the
objectives through the loop (accumulation equals one big batch), and `plainlm finetune --loss dpo` end to end:
metrics, the full-finetuning reference table, resume and its refusals.

Tolerances: 1e-5 absolute on the loss and on every adapter gradient (float32; trl's fused LM head computes the
log-probabilities in its own tiles)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from helpers import REPO, randomise_adapters, run_cli

from plainlm import LLM
from plainlm.data.preference import PreferencePair, collate_pairs
from plainlm.errors import InvalidInput, PackagedModelMissing
from plainlm.lora import LoRAConfig, adapters_disabled, inject_lora, save_peft_adapter
from plainlm.losses import orpo_loss, sequence_logps, simpo_loss
from plainlm.objectives import PreferenceArgs, PreferenceObjective
from plainlm.packaged_models import smollm2_gguf

peft = pytest.importorskip("peft")
pytest.importorskip("trl")
from helpers_trl import TrlDPO  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

ATOL = 1e-5
PAIRS = REPO / "data" / "preference" / "pirate_pairs.jsonl"
HELD_OUT = REPO / "data" / "preference" / "pirate_pairs_heldout.jsonl"


def random_pairs(vocab: int, count: int = 4, seed: int = 0) -> list[PreferencePair]:
    g = torch.Generator().manual_seed(seed)

    def ids(low: int, high: int) -> torch.Tensor:
        return torch.randint(1, vocab, (int(torch.randint(low, high, (), generator=g)),), generator=g)

    return [PreferencePair(ids(3, 7), ids(2, 9), ids(2, 9), index=i) for i in range(count)]


def trl_batch(pairs: list[PreferencePair]) -> dict[str, torch.Tensor]:
    """The pairs as trl's own collator lays them out: whole sequences a row each, attention and completion masks."""
    examples = [
        {
            "prompt_ids": p.prompt_ids.tolist(),
            "chosen_ids": p.chosen_ids.tolist(),
            "rejected_ids": p.rejected_ids.tolist(),
        }
        for p in pairs
    ]
    return DataCollatorForPreference(pad_token_id=0)(examples)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge"])
def test_lora_step_equals_peft_and_trl(tiny_hf_dir: Path, tmp_path: Path, loss: str) -> None:
    """Same weights, same adapters (randomised, so that the policy differs from its reference), same batch: the
    loss and every adapter gradient equal trl's DPOTrainer on peft's model, reference = adapters off in both."""
    llm = LLM.load(tiny_hf_dir)
    lora = LoRAConfig(r=4, alpha=8, targets=["q", "v", "gate"])
    inject_lora(llm.model, lora)
    randomise_adapters(llm.model, seed=3)
    save_peft_adapter(llm.model, lora, tmp_path / "adapter")
    pairs = random_pairs(llm.model.config.vocab_size)
    batch = collate_pairs(pairs, pad_id=0)

    objective = PreferenceObjective(loss, PreferenceArgs(beta=0.2))
    parts, _ = objective.parts(llm.model, batch)
    ours = parts["pairs"] / len(batch["pair_ids"])
    ours.backward()

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
    add_fused_lm_head(theirs.get_base_model(), outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    trl = TrlDPO(theirs, {"dpo": "sigmoid"}.get(loss, loss), beta=0.2, peft=True)
    expected, *_ = trl.loss(trl_batch(pairs))
    expected.backward()
    assert ours.item() == pytest.approx(expected.item(), abs=ATOL)

    ours_grads = {n: p.grad for n, p in llm.model.named_parameters() if p.requires_grad}
    their_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(ours_grads) == len(their_grads) == 2 * 3 * llm.model.config.n_layer
    for layer in range(llm.model.config.n_layer):
        for ours_name, their_name in (("attn.q_proj", "self_attn.q_proj"), ("attn.v_proj", "self_attn.v_proj"),
                                      ("mlp.gate_proj", "mlp.gate_proj")):  # fmt: skip
            for matrix in ("A", "B"):
                mine = ours_grads[f"blocks.{layer}.{ours_name}.lora_{matrix}"]
                other = their_grads[f"base_model.model.model.layers.{layer}.{their_name}.lora_{matrix}.default.weight"]
                torch.testing.assert_close(mine, other, atol=ATOL, rtol=0)


def test_adapters_disabled_is_the_base(tiny_hf_dir: Path) -> None:
    llm = LLM.load(tiny_hf_dir)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        base = llm.model(ids)
        inject_lora(llm.model, LoRAConfig(r=4, targets=["q", "v"]))
        randomise_adapters(llm.model)
        adapted = llm.model(ids)
        with adapters_disabled(llm.model):
            torch.testing.assert_close(llm.model(ids), base, atol=0, rtol=0)
        torch.testing.assert_close(llm.model(ids), adapted, atol=0, rtol=0)  # switched back on
    assert (adapted - base).abs().max() > 1e-3


def test_a_full_model_without_reference_table_is_refused(tiny_hf_dir: Path) -> None:
    llm = LLM.load(tiny_hf_dir)
    batch = collate_pairs(random_pairs(llm.model.config.vocab_size), pad_id=0)
    with pytest.raises(InvalidInput, match="no adapters to switch off"):
        PreferenceObjective("dpo", PreferenceArgs()).parts(llm.model, batch)
    parts, stats = PreferenceObjective("simpo", PreferenceArgs()).parts(llm.model, batch)  # needs no reference
    assert torch.isfinite(parts["pairs"])
    assert set(stats) == {"rewards_chosen", "rewards_rejected", "margins", "accuracy"}


@pytest.mark.parametrize("loss", ["dpo", "orpo"])
def test_accumulated_micro_batches_equal_one_big_batch(tiny_hf_dir: Path, loss: str) -> None:
    """What the loop does with an objective (sums per unit over the step's totals) equals one big batch."""
    llm = LLM.load(tiny_hf_dir)
    inject_lora(llm.model, LoRAConfig(r=4, targets=["q", "v"]))
    randomise_adapters(llm.model)
    pairs = random_pairs(llm.model.config.vocab_size, count=6, seed=2)
    objective = PreferenceObjective(loss, PreferenceArgs(beta=0.3))

    def loss_of(batches: list[dict]) -> torch.Tensor:
        totals = {u: sum(objective.counts(b)[u] for b in batches) for u in objective.counts(batches[0])}
        total = torch.zeros(())
        for b in batches:
            parts, _ = objective.parts(llm.model, b)
            total = total + sum(part / totals[unit] for unit, part in parts.items())
        return total

    whole = loss_of([collate_pairs(pairs, pad_id=0)])
    split = loss_of([collate_pairs(pairs[:2], pad_id=0), collate_pairs(pairs[2:], pad_id=0)])
    assert split.item() == pytest.approx(whole.item(), abs=1e-6)
    if loss == "orpo":
        assert set(objective.counts(collate_pairs(pairs, 0))) == {"pairs", "chosen_tokens"}


def test_bad_preference_settings_are_one_error(tiny_hf_dir: Path, tmp_path: Path) -> None:
    bad_beta = ("--loss", "dpo", "--preference.beta", "0")
    result = run_cli(*preference_args(tiny_hf_dir, tmp_path / "a", "lora", 2, *bad_beta))
    assert result.returncode != 0 and "error: loss dpo needs beta > 0, got 0.0" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "a").exists()


def preference_args(model: Path, out: Path, method: str, steps: int, *extra: str) -> list[str]:
    return [
        "finetune", "--checkpoint_dir", str(model), "--out_dir", str(out), "--method", method,
        "--data.path", str(PAIRS), "--data.val_path", str(HELD_OUT), "--data.max_seq_length", "96",
        "--train.max_steps", str(steps), "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
        "--train.eval_interval", "2", "--train.eval_max_batches", "2", "--train.tensorboard", "false",
        "--train.warmup_steps", "1", "--train.peak_flops", "1e11", "--lora.r", "4",
        "--optimizer.class_path", "torch.optim.AdamW", "--optimizer.init_args.lr", "0.003", *extra,
    ]  # fmt: skip


def metrics(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_lora_dpo_through_finetune_logs_rewards_and_writes_an_adapter(tiny_hf_dir: Path, tmp_path: Path) -> None:
    result = run_cli(*preference_args(tiny_hf_dir, tmp_path, "lora", 4, "--loss", "dpo"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "preference pairs (dpo)" in result.stdout and "val accuracy" in result.stdout
    assert "micro batch 4 x 96 tokens" in result.stdout and "2N sequences" in result.stdout  # 2 pairs, 4 rows
    rows = metrics(tmp_path)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    first = rows[0]
    # The adapters start at zero: the policy is its reference, every reward 0, the loss log 2.
    assert float(first["loss"]) == pytest.approx(0.6931, abs=1e-3) and float(first["rewards_chosen"]) == 0
    assert rows[-1]["val_accuracy"] != "" and rows[-1]["val_ppl"] == ""
    assert (tmp_path / "final" / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "reference_logps.safetensors").exists()  # LoRA: the reference is the base itself


@pytest.mark.slow
def test_full_dpo_computes_its_reference_once_and_refuses_another_datasets(tiny_hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = preference_args(tiny_hf_dir, out, "full", 4, "--loss", "dpo", "--train.save_interval", "2")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    table = out / "reference_logps.safetensors"
    assert table.exists()
    assert float(metrics(out)[0]["loss"]) == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1

    # Resuming with other pairs: the table no longer describes this run's data.
    other = tmp_path / "other.jsonl"
    shutil.copyfile(PAIRS, other)
    with other.open("a") as f:
        f.write(json.dumps({"prompt": "Hi?", "chosen": "Arr, ahoy!", "rejected": "Hello."}) + "\n")
    moved = [a if a != str(PAIRS) else str(other) for a in args]
    refused = run_cli(*moved, "--train.max_steps", "6", "--resume", "true")
    assert refused.returncode != 0 and "holds reference log-probabilities of another model or dataset" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.slow
def test_the_dpo_recipe_teaches_smollm2_the_shipped_preference(tmp_path: Path) -> None:
    """The real model on the shipped pirate pairs: held-out reward accuracy above 0.8 within a few steps."""
    try:
        model = smollm2_gguf()
    except PackagedModelMissing as e:
        pytest.skip(str(e))
    recipe = REPO / "recipes" / "finetune" / "smollm2-135m-instruct" / "dpo.yaml"
    short = ["--train.max_steps", "4", "--train.eval_interval", "4", "--train.save_interval", "4"]
    result = run_cli("finetune", "--config", str(recipe), "--checkpoint_dir", str(model), "--out_dir", str(tmp_path),
                     *short, "--train.tensorboard", "false", timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    last = metrics(tmp_path)[-1]
    assert float(last["val_accuracy"]) > 0.8 and float(last["val_margins"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_after_sigkill_gives_the_same_losses(tiny_hf_dir: Path, tmp_path: Path, method: str) -> None:
    """Killed after a checkpoint and resumed: the per-step losses and rewards equal an uninterrupted run's, bit for
    bit; for full finetuning the reference table computed before the kill is read again, not recomputed."""
    args = ("--loss", "dpo", "--train.save_interval", "2")
    reference = run_cli(*preference_args(tiny_hf_dir, tmp_path / "a", method, 6, *args))
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "b"
    command = preference_args(tiny_hf_dir, out, method, 6, *args)
    process = subprocess.Popen(
        [sys.executable, "-m", "plainlm.cli", *command], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while not (out / "step-000002").exists():  # killed part-way: after a checkpoint, before the end
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert not (out / "final").exists()
    table = out / "reference_logps.safetensors"
    written = table.stat().st_mtime_ns if method == "full" else None

    resumed = run_cli(*command, "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resumed from" in resumed.stdout
    columns = ("step", "loss", "rewards_chosen", "rewards_rejected", "accuracy", "val_loss", "val_accuracy")
    assert [[r[c] for c in columns] for r in metrics(out)] == [[r[c] for c in columns] for r in metrics(tmp_path / "a")]
    if method == "full":
        assert table.stat().st_mtime_ns == written  # reused, not written again


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_a_pair_in_one_row_scores_as_two_rows_of_their_own(tiny_hf_dir: Path, loss: str) -> None:
    """The objective runs a pair as one row (the prompt once, the completions side by side) and asks for logits at
    the scored positions only; the same loss as from each sequence in a row of its own, every position's logits,
    through losses.py directly (and trl's formulas: tests/test_losses.py)."""
    llm = LLM.load(tiny_hf_dir)
    pairs = random_pairs(llm.model.config.vocab_size, count=5, seed=4)
    parts, _ = PreferenceObjective(loss, PreferenceArgs(beta=0.4, gamma=0.3)).parts(llm.model, collate_pairs(pairs, 0))

    def alone(prompt: torch.Tensor, completion: torch.Tensor, whole: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.cat([prompt, completion])
        targets = ids[1:].clone()
        if not whole:
            targets[: len(prompt) - 1] = -100
        with torch.no_grad():
            logps, tokens = sequence_logps(llm.model(ids[None, :-1]), targets[None])
        return logps[0], tokens[0]

    chosen = torch.stack([torch.stack(alone(p.prompt_ids, p.chosen_ids, whole=False)) for p in pairs])
    rejected = torch.stack([torch.stack(alone(p.prompt_ids, p.rejected_ids, whole=False)) for p in pairs])
    chosen_average, rejected_average = chosen[:, 0] / chosen[:, 1], rejected[:, 0] / rejected[:, 1]
    if loss == "simpo":
        expected = simpo_loss(chosen_average, rejected_average, beta=0.4, gamma=0.3).losses.sum()
        assert parts["pairs"].item() == pytest.approx(expected.item(), abs=1e-5)
        return
    whole = torch.stack([torch.stack(alone(p.prompt_ids, p.chosen_ids, whole=True)) for p in pairs])
    nll = -whole[:, 0].sum() / whole[:, 1].sum()
    expected = orpo_loss(chosen_average, rejected_average, nll, beta=0.4).losses.sum()
    got = parts["pairs"] + parts["chosen_tokens"] / whole[:, 1].sum() * len(pairs)
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge", "simpo", "orpo"])
def test_a_rank_without_pairs_adds_nothing(tiny_hf_dir: Path, loss: str) -> None:
    """A rank out of validation pairs runs one padding pair (pair_id -1): every sum it adds is 0, not NaN."""
    llm = LLM.load(tiny_hf_dir)
    inject_lora(llm.model, LoRAConfig(r=4, targets=["q", "v"]))
    batch = collate_pairs([], pad_id=0)
    assert batch["pair_ids"].tolist() == [-1]
    objective = PreferenceObjective(loss, PreferenceArgs())
    parts, stats = objective.parts(llm.model, batch)
    assert all(value.item() == 0 for value in [*parts.values(), *stats.values()]), (parts, stats)
    assert objective.counts(batch)["pairs"] == 0


def test_the_memory_plan_counts_both_sequences_of_a_pair(tiny_hf_dir: Path) -> None:
    """`plainlm estimate` of a preference recipe: 4 pairs a micro-batch cost what 8 SFT sequences cost."""
    from plainlm.estimate import estimate_command_result

    recipe = str(REPO / "recipes" / "finetune" / "smollm2-135m-instruct" / "dpo.yaml")
    common = ["--config", recipe, "--checkpoint_dir", str(tiny_hf_dir), "--train.micro_batch_size", "4"]
    pairs = estimate_command_result([*common, "--loss", "dpo"])
    sft_of_eight = estimate_command_result([*common, "--loss", "sft", "--train.micro_batch_size", "8"])
    assert pairs.micro_batch_size == 8 and pairs.activations_full == sft_of_eight.activations_full
    assert any("2N sequences" in note for note in pairs.notes)
    assert not any("2N sequences" in note for note in sft_of_eight.notes)


def test_a_preference_run_that_does_not_fit_is_told_to_halve_its_pairs(tiny_hf_dir: Path) -> None:
    """The suggestion halves the recipe's micro-batch of pairs, and its peak is that of half the pairs."""
    from plainlm.estimate import estimate_command, estimate_command_result
    from plainlm.memory import format_bytes

    recipe = str(REPO / "recipes" / "finetune" / "smollm2-135m-instruct" / "dpo.yaml")
    common = ["--config", recipe, "--checkpoint_dir", str(tiny_hf_dir), "--train.global_batch_size", "200000"]
    text = estimate_command([*common, "--train.micro_batch_size", "200000"])
    half = estimate_command_result([*common, "--train.micro_batch_size", "100000"])
    assert half.micro_batch_size == 200000  # rows: 100000 pairs
    assert f"try: halve train.micro_batch_size: peak {format_bytes(half.peak)}" in text
