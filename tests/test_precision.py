"""The bf16 training paths, in process on tiny models: bf16-mixed computes in bf16 over fp32 weights,
bf16-true trains bf16 weights and saves them as bf16 (full and LoRA, finetune and pretrain), and
auto picks 32-true on a CPU."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from helpers import REPO, ToyLoader, reference_greedy, tiny_gpt
from safetensors import safe_open

import plainlm.finetune as finetune_module
import plainlm.pretrain as pretrain_module
import plainlm.train as train_module
import plainlm.training_run as training_run_module
from plainlm import LLM
from plainlm.data.sft import SFTDataConfig
from plainlm.generate import generate
from plainlm.lora import LoRAConfig, inject_lora
from plainlm.metrics import flops_per_token
from plainlm.model import GPT
from plainlm.pretrain import PretrainDataConfig
from plainlm.train import TrainArgs, fit, resolve_precision, warmup_cosine

VOCAB, SEQ = 64, 16
# bf16 keeps 8 significant bits: one rounding step is 2^-8 of a value. The step-1 loss of bf16-mixed must
# agree with fp32's to within one such step of the loss itself (measured: 1e-5 relative on the tiny model).
BF16_LOSS_RTOL = 2**-8


def counting_loader() -> ToyLoader:
    return ToyLoader(batch_size=4, length=SEQ, vocab_size=VOCAB, counting=True)


def tiny_model(lora: bool) -> GPT:
    model = tiny_gpt(vocab_size=VOCAB)
    if lora:
        inject_lora(model, LoRAConfig(r=4, alpha=8, targets=["q", "k", "v", "o", "gate", "up", "down"]))
    return model


def fast_args(steps: int, precision: str, **kwargs) -> TrainArgs:
    defaults = dict(
        global_batch_size=4,
        micro_batch_size=4,
        warmup_steps=1,
        eval_interval=100,
        eval_max_batches=1,
        save_interval=None,
        tensorboard=False,
        peak_flops=1e11,
    )
    return TrainArgs(max_steps=steps, precision=precision, **{**defaults, **kwargs})


def logged_losses(out: Path) -> list[float]:
    with (out / "metrics.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def train_tiny(out: Path, precision: str, lora: bool, steps: int = 8) -> tuple[GPT, list[float], set[torch.dtype]]:
    """fit() on the counting task; returns the model, the loss of every step and the dtypes the head produced."""
    model = tiny_model(lora)
    head_dtypes: set[torch.dtype] = set()
    model.lm_head.register_forward_hook(
        lambda module, args, out: head_dtypes.add(out.dtype) if module.training else None
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-2)
    args = fast_args(steps, precision)
    fit(model, counting_loader(), counting_loader(), opt, warmup_cosine(opt, args), args, out, {"model": "tiny"})
    return model, logged_losses(out), head_dtypes


def safetensors_dtypes(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.mark.parametrize(("amx", "expected"), [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_is_bf16_mixed_only_on_a_cpu_with_amx(monkeypatch: pytest.MonkeyPatch, amx: bool, expected: str) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == expected
    for explicit in ("32-true", "bf16-mixed", "bf16-true"):
        assert resolve_precision(explicit, cpu) == explicit


@pytest.mark.parametrize("method", ["full", "lora"])
def test_bf16_mixed_computes_in_bf16_over_fp32_weights(tmp_path: Path, method: str) -> None:
    lora = method == "lora"
    _, fp32_losses, fp32_heads = train_tiny(tmp_path / "fp32", "32-true", lora)
    model, losses, heads = train_tiny(tmp_path / "bf16", "bf16-mixed", lora)
    assert fp32_heads == {torch.float32} and heads == {torch.bfloat16}  # autocast was on in training
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the weights and their updates stay fp32
    assert losses[0] == pytest.approx(fp32_losses[0], rel=BF16_LOSS_RTOL)
    assert losses[-1] < 0.85 * losses[0], losses
    assert losses[-1] == pytest.approx(fp32_losses[-1], rel=0.05)  # and it learns what fp32 learns


def tiny_records(tmp_path: Path) -> Path:
    records = tmp_path / "records.jsonl"
    lines = (REPO / "data" / "finetune" / "pirate_train.jsonl").read_text().splitlines()[:8]
    records.write_text("\n".join(lines) + "\n")
    return records


@pytest.mark.parametrize("method", ["full", "lora"])
def test_bf16_true_finetune_trains_bf16_weights_and_saves_them(
    tiny_hf_dir: Path, tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, object] = {}
    real_fit = training_run_module.fit  # the loop that finetune runs through the shared skeleton

    def recording_fit(model, *args, **kwargs):
        seen["trainable"] = {p.dtype for p in model.parameters() if p.requires_grad}
        seen["frozen"] = {p.dtype for p in model.parameters() if not p.requires_grad}
        result = real_fit(model, *args, **kwargs)
        with torch.no_grad():
            seen["logits"] = model.eval()(torch.arange(12)[None])
        return result

    monkeypatch.setattr(training_run_module, "fit", recording_fit)
    records = tiny_records(tmp_path)
    out = tmp_path / "run"
    final = finetune_module.finetune(
        tiny_hf_dir,
        out_dir=out,
        method=method,
        data=SFTDataConfig(path=str(records), val_path=str(records), max_seq_length=128),
        lora=LoRAConfig(r=4, alpha=8, targets=["q", "k", "v", "o", "gate", "up", "down"]),
        train=fast_args(6, "bf16-true", save_interval=3, eval_interval=6),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2 if method == "full" else 3e-2),
    )
    if method == "full":
        assert seen["trainable"] == {torch.bfloat16} and seen["frozen"] == set()
    else:  # the frozen base is bf16; adapters are created in fp32 and cast to bf16 in the forward pass
        assert seen["frozen"] == {torch.bfloat16} and seen["trainable"] == {torch.float32}
    losses = logged_losses(out)  # 32-true ends at 0.79 (full) and 0.89 (lora) of its first loss here
    assert len(losses) == 6 and losses[-1] < 0.92 * losses[0], losses

    # the resumable checkpoint holds what trained, in its own dtype; final/ is the merged model in bf16
    step_dtype = "BF16" if method == "full" else "F32"
    assert safetensors_dtypes(out / "step-000006" / "model.safetensors") == {step_dtype}
    assert safetensors_dtypes(final / "model.safetensors") == {"BF16"}
    loaded = LLM.load(final, dtype="bfloat16").model
    with torch.no_grad():
        logits = loaded(torch.arange(12)[None])
    assert logits.dtype == torch.bfloat16
    if method == "full":  # the same bf16 weights give the same logits
        torch.testing.assert_close(logits, seen["logits"], atol=0, rtol=0)
    else:  # merging (in fp32, then rounding the sum to bf16) differs from base + adapter in bf16 by bf16 rounding
        torch.testing.assert_close(logits.float(), seen["logits"].float(), atol=0.1, rtol=0.05)


def test_bf16_true_pretrain_trains_bf16_weights_and_saves_them(tmp_path: Path) -> None:
    source = tmp_path / "text"
    source.mkdir()
    (source / "stories.txt").write_text((REPO / "data" / "pretrain" / "everyday-things.txt").read_text()[:20_000])
    out = tmp_path / "run"
    final = pretrain_module.pretrain(
        REPO / "data" / "tokenizers" / "stories-2k",
        out_dir=out,
        model_config=dict(name="t", n_layer=2, n_embd=32, n_head=4, n_kv_head=2, intermediate_size=64, block_size=64),
        data=PretrainDataConfig(source=str(source), seq_length=32, workers=1),
        train=fast_args(8, "bf16-true", eval_interval=8),
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-2),
    )
    losses = logged_losses(out)  # fp32 goes from 7.63 to 6.34 here, bf16-true to 6.33
    assert len(losses) == 8 and losses[-1] < 0.9 * losses[0], losses
    assert safetensors_dtypes(out / "step-000008" / "model.safetensors") == {"BF16"}
    assert safetensors_dtypes(final / "model.safetensors") == {"BF16"}
    llm = LLM.load(final)  # the bf16 checkpoint loads and decodes (KV cache) as its own logits say
    ids = llm.tokenizer.encode("Once")
    assert generate(llm.model, [ids], max_new_tokens=3) == [reference_greedy(llm.model, ids, 3)]


@pytest.mark.parametrize(("precision", "dtype"), [("32-true", torch.float32), ("bf16-mixed", torch.bfloat16)])
def test_mfu_is_against_the_peak_of_the_dtype_the_matmuls_run_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str, dtype: torch.dtype
) -> None:
    # A bf16 run measured against the fp32 peak would claim 5-12x its real utilisation on an AMX CPU.
    measured: list[torch.dtype] = []

    def peak(device: torch.device, dtype: torch.dtype) -> float:
        measured.append(dtype)
        return 2e11

    monkeypatch.setattr(train_module, "measure_peak_flops", peak)
    model = tiny_model(lora=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    args = fast_args(2, precision, peak_flops=None)
    loader = counting_loader()
    fit(model, loader, loader, opt, warmup_cosine(opt, args), args, tmp_path, {"model": "tiny"})
    assert measured == [dtype]
    with (tmp_path / "metrics.csv").open() as f:
        row = next(csv.DictReader(f))
    flops = flops_per_token(model.config, sum(p.numel() for p in model.parameters()), SEQ)
    assert float(row["mfu"]) == pytest.approx(float(row["tokens_per_second"]) * flops / 2e11, rel=1e-6)
