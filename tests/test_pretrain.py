"""Pretraining through the real command: a tiny model from scratch, exact resume after SIGKILL,
and a final checkpoint that generate / LLM.load / to-hf accept."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from helpers import REPO, reference_greedy, run_cli

from plainlm import LLM
from plainlm.generate import generate

RECIPE = REPO / "recipes" / "pretrain" / "tiny-stories.yaml"
SMALL = [
    "--config",
    str(RECIPE),
    "--model_config",
    '{"name": "t", "n_layer": 2, "n_embd": 32, "n_head": 4, "n_kv_head": 2,'
    ' "intermediate_size": 64, "block_size": 64, "tie_embeddings": true}',
    "--data.seq_length",
    "32",
    "--train.global_batch_size",
    "4",
    "--train.micro_batch_size",
    "2",
    "--train.eval_interval",
    "4",
    "--train.eval_max_batches",
    "1",
    "--train.tensorboard",
    "false",
    "--train.log_interval",
    "1",
    "--train.peak_flops",
    "1e11",
    "--train.save_interval",
    "2",
    "--data.workers",
    "1",
]


def losses(out: Path) -> dict[int, str]:
    with (out / "metrics.csv").open() as f:
        return {int(r["step"]): r["loss"] for r in csv.DictReader(f)}


@pytest.mark.slow
def test_pretrain_resumes_exactly_after_sigkill(tmp_path: Path) -> None:
    shards = ["--data.shards_dir", str(tmp_path / "tokens")]
    reference = run_cli("pretrain", *SMALL, *shards, "--out_dir", str(tmp_path / "a"), "--train.max_steps", "10")
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = losses(tmp_path / "a")
    assert sorted(expected) == list(range(1, 11))
    assert float(expected[10]) < float(expected[1])

    out = tmp_path / "b"
    args = ["pretrain", *SMALL, *shards, "--out_dir", str(out), "--train.max_steps", "10"]
    process = subprocess.Popen(
        [sys.executable, "-m", "plainlm.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while not (out / "step-000004").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    resumed = run_cli(*args, "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(out) == expected

    final = out / "final"
    llm = LLM.load(final)
    ids = llm.tokenizer.encode("Once upon a time")  # final/ decodes (KV cache) as its own logits say
    assert generate(llm.model, [ids], max_new_tokens=5) == [reference_greedy(llm.model, ids, 5)]
    assert run_cli("convert", "to-hf", str(final), str(tmp_path / "hf")).returncode == 0
    reference_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(reference_model(ids).logits, llm.model(ids), atol=1e-5, rtol=1e-5)
