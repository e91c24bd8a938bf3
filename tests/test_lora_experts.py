"""LoRA on a mixture of experts' stacked weights against `peft`'s `target_parameters`: our adapters load in
peft with the same logits and peft's load in ours (Qwen3-MoE and Mixtral, whose checkpoints hold the experts
per expert, and gpt-oss, whose fused experts alternate gate and up outputs); the update runs through grouped
matmuls, merges exactly, and only the adapters train.
Tolerance: fp32 logits within 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from helpers import randomise_adapters, run_cli, tiny_hf_model
from helpers_tokenizers import make_bpe_tokenizer

from plainlm import LLM
from plainlm.convert.hf import load_hf_model
from plainlm.errors import CheckpointError, InvalidInput
from plainlm.lora import LoRAConfig, LoRAExperts, inject_lora, load_peft_adapter, merge_lora, save_peft_adapter
from plainlm.model import Experts

ATOL = RTOL = 1e-5
VOCAB = 96
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(SIZES, intermediate_size=48, moe_intermediate_size=24, num_experts=4)),
    "mixtral": ("MixtralConfig", dict(SIZES, intermediate_size=24, num_local_experts=4)),
    # experts stored (E, in, out) with gate and up outputs alternating, and biases (which LoRA leaves alone)
    "gpt_oss": ("GptOssConfig", dict(SIZES, intermediate_size=24, num_local_experts=4, head_dim=8)),
}
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def hf_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    class_name, kwargs = FAMILIES[request.param]
    config = getattr(transformers, class_name)(**kwargs, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return directory


def hf_model(directory: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))


def test_our_expert_adapter_loads_in_peft(hf_dir: Path, tmp_path: Path) -> None:
    ours = load_hf_model(hf_dir).eval()
    lora = LoRAConfig(r=3, alpha=6, targets=["q", "v", "experts"])
    inject_lora(ours, lora)
    randomise_adapters(ours)
    save_peft_adapter(ours, lora, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["target_parameters"] == sorted(EXPERT_PARAMETERS)
    theirs = peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()), theirs(ids()).logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("parameters", [EXPERT_PARAMETERS, EXPERT_PARAMETERS[1:]], ids=["both", "down-only"])
def test_peft_expert_adapter_loads_in_ours(hf_dir: Path, tmp_path: Path, parameters: list[str]) -> None:
    config = peft.LoraConfig(
        r=3,
        lora_alpha=12,
        target_modules=["q_proj", "o_proj"],
        target_parameters=parameters,
        init_lora_weights=False,  # random A and B, so the adapter changes the output
    )
    theirs = peft.get_peft_model(hf_model(hf_dir), config).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_hf_model(hf_dir).eval()
    with torch.no_grad():
        base = ours(ids())
    lora = load_peft_adapter(ours, tmp_path / "adapter")
    assert sorted(lora.targets) == ["experts", "o", "q"] and lora.scaling == 4.0
    with torch.no_grad():
        adapted = ours(ids())
        torch.testing.assert_close(adapted, theirs(ids()).logits, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(adapted, base, atol=1e-3)  # the expert update is really there


def test_expert_adapter_merges_exactly_and_alone_trains(hf_dir: Path) -> None:
    model = load_hf_model(hf_dir).eval()
    with torch.no_grad():
        base = model(ids())
    inject_lora(model, LoRAConfig(r=2, alpha=4, targets=["experts"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 2 * model.config.n_layer  # A and B of gate_up_proj and down_proj per layer
    with torch.no_grad():
        torch.testing.assert_close(model(ids()), base, atol=0, rtol=0)  # B starts at zero
    model.train()
    model(ids()).logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n in trainable}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    randomise_adapters(model)
    model.eval()
    with torch.no_grad():
        adapted = model(ids())
        merge_lora(model)
        assert not any(isinstance(m, LoRAExperts) for m in model.modules())
        assert sum(isinstance(m, Experts) for m in model.modules()) == model.config.n_layer
        torch.testing.assert_close(model(ids()), adapted, atol=ATOL, rtol=RTOL)


def test_expert_adapter_bad_input(hf_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no dropout and no DoRA"):
        LoRAConfig(targets=["experts"], dropout=0.1)
    # an adapter of another rank's shapes than its config says: named with both shapes
    model = load_hf_model(hf_dir).eval()
    lora = LoRAConfig(r=2, alpha=4, targets=["experts"])
    save_peft_adapter(inject_lora(model, lora), lora, tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "r": 3}))
    with pytest.raises(CheckpointError, match=r"mlp\.experts.*needs"):
        load_peft_adapter(load_hf_model(hf_dir), tmp_path / "adapter")


@pytest.mark.slow
def test_finetune_adapts_the_experts_and_peft_agrees(tmp_path: Path) -> None:
    """`plainlm finetune --lora.targets [q, v, experts]` on a tiny Qwen3-MoE: final/ (adapter merged) and
    peft with final/adapter on the transformers base give the same logits."""
    base_dir = tmp_path / "base"
    make_bpe_tokenizer(base_dir)
    vocab_size = len(json.loads((base_dir / "tokenizer.json").read_text())["model"]["vocab"]) + 16
    class_name, kwargs = FAMILIES["qwen3_moe"]
    sizes = {**kwargs, "vocab_size": vocab_size, "max_position_embeddings": 256}
    config = getattr(transformers, class_name)(**sizes, num_experts_per_tok=2)
    tiny_hf_model(config, std=0.1).save_pretrained(base_dir)
    out = tmp_path / "run"
    result = run_cli(
        "finetune",
        *("--checkpoint_dir", str(base_dir), "--out_dir", str(out), "--method", "lora"),
        *("--lora.targets", "[q, v, experts]", "--lora.r", "2", "--train.max_steps", "2"),
        *("--data.max_seq_length", "128", "--train.global_batch_size", "2", "--train.micro_batch_size", "2"),
        *("--train.tensorboard", "false", "--train.peak_flops", "1e11", "--train.eval_interval", "2"),
        *("--train.eval_max_batches", "1", "--optimizer.class_path", "torch.optim.AdamW"),
        *("--optimizer.init_args.lr", "0.01"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    adapter = out / "final" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["target_parameters"] == sorted(EXPERT_PARAMETERS)
    merged = LLM.load(out / "final").model
    theirs = peft.PeftModel.from_pretrained(hf_model(base_dir), adapter).eval()
    ids = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(ids), hf_model(base_dir)(ids).logits, atol=1e-4)  # training moved it
