"""Shared fixtures: a tiny Hugging Face model with a real (tiny) tokenizer, as the hub lays it out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers_tokenizers import make_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]


def make_tiny_hf_model(directory: Path, vocab_size: int, seed: int = 0) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-architecture model directory with a BPE tokenizer, ChatML template and stop ids."""
    directory = tmp_path_factory.mktemp("tiny-hf")
    make_bpe_tokenizer(directory)
    vocab_size = len(json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]) + 16
    model = make_tiny_hf_model(directory, vocab_size)
    eos = transformers.AutoTokenizer.from_pretrained(directory).eos_token_id
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": None, "eos_token_id": eos}))
    config = json.loads((directory / "config.json").read_text())
    config["eos_token_id"] = eos
    (directory / "config.json").write_text(json.dumps(config))
    del model
    return directory


def run_cli(
    *args: str, stdin: str | None = None, timeout: float = 120, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`plainlm ARGS` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "plainlm.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
