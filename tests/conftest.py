"""Shared fixtures (and only fixtures: shared plain code is in helpers.py): a tiny Hugging Face model with a
real (tiny) tokenizer, as the hub lays it out, and a LoRA adapter for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from helpers import make_tiny_hf_model
from helpers_tokenizers import make_bpe_tokenizer

from plainlm.convert.hf import load_hf_model
from plainlm.lora import LoRAConfig, inject_lora, lora_state, save_peft_adapter


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


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter (PEFT layout) for tiny_hf_dir's model, with weights large enough to change its answers."""
    model = load_hf_model(tiny_hf_dir).eval()
    lora = LoRAConfig(r=4, alpha=8, targets=["q", "v", "down"])
    inject_lora(model, lora)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for weight in lora_state(model).values():
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    return save_peft_adapter(model, lora, tmp_path_factory.mktemp("adapter"))
