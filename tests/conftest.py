"""Shared fixtures (and only fixtures: shared plain code is in helpers.py): a tiny Hugging Face model with a
real (tiny) tokenizer, as the hub lays it out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from helpers import make_tiny_hf_model
from helpers_tokenizers import make_bpe_tokenizer


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
