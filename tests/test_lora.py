"""LoRA and DoRA against `peft`: our adapters load in peft with the same logits, peft's load in ours.

Tolerance: fp32 logits within 1e-5 (absolute and relative). Adapter weights are randomised
(B is zero at initialisation, which would hide a wrong mapping).
"""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import transformers
from helpers import randomise_adapters

from plainlm.convert.hf import load_hf_model
from plainlm.lora import (
    LoRAConfig,
    LoRALinear,
    inject_lora,
    load_peft_adapter,
    merge_lora,
    save_peft_adapter,
)

ATOL = RTOL = 1e-5
ALL_TARGETS = ["q", "k", "v", "o", "gate", "up", "down", "lm_head"]
HF_TARGETS = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
    "lm_head": "lm_head",
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 (q/k/v biases, untied head) with randomised weights."""
    config = transformers.Qwen2Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    directory = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(directory)
    return directory


def hf_model(directory: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("targets", [["q", "v"], ALL_TARGETS], ids=["qv", "all"])
def test_our_adapter_loads_in_peft(hf_dir: Path, tmp_path: Path, dora: bool, targets: list[str]) -> None:
    ours = load_hf_model(hf_dir).eval()
    lora = LoRAConfig(r=4, alpha=8, targets=targets, dora=dora)
    inject_lora(ours, lora)
    randomise_adapters(ours)
    save_peft_adapter(ours, lora, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()), theirs(ids()).logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_adapter_loads_in_ours(hf_dir: Path, tmp_path: Path, dora: bool) -> None:
    config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=[HF_TARGETS[t] for t in ALL_TARGETS],
        use_dora=dora,
        init_lora_weights=False,  # random A and B, so the adapter changes the output
    )
    theirs = peft.get_peft_model(hf_model(hf_dir), config).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_hf_model(hf_dir).eval()
    lora = load_peft_adapter(ours, tmp_path / "adapter")
    assert lora.dora == dora and lora.r == 4 and lora.scaling == 4.0
    assert sorted(lora.targets) == sorted(ALL_TARGETS)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()), theirs(ids()).logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_equals_unmerged(hf_dir: Path, dora: bool) -> None:
    model = load_hf_model(hf_dir).eval()
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets=ALL_TARGETS, dora=dora))
    randomise_adapters(model)
    with torch.no_grad():
        before = model(ids())
        merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        torch.testing.assert_close(model(ids()), before, atol=ATOL, rtol=RTOL)


def test_only_adapters_train_and_start_is_exact(hf_dir: Path) -> None:
    model = load_hf_model(hf_dir).eval()
    with torch.no_grad():
        base = model(ids())
    inject_lora(model, LoRAConfig(r=2, alpha=4, targets=["q", "v", "down"], dropout=0.1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in trainable)
    assert len(trainable) == 2 * 3 * model.config.n_layer
    with torch.no_grad():
        torch.testing.assert_close(model(ids()), base, atol=0, rtol=0)  # B starts at zero
    model.train()
    model(ids()).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_bad_targets_and_foreign_adapter(hf_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        LoRAConfig(targets=["qkv"])
    model = load_hf_model(hf_dir)
    with pytest.raises(Exception, match="adapter_config.json"):
        load_peft_adapter(model, tmp_path)
