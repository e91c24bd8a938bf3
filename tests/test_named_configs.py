"""Named configs against the published model sizes and against transformers' reading of the same config.json.

Every model is built on the meta device, so the 70B entries cost no memory. Parameter counts come
from `Module.parameters()`, which yields a tied embedding once.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import transformers

from plainlm.config import Config
from plainlm.convert.hf_config import SUPPORTED_MODEL_TYPES, config_from_hf, config_to_hf
from plainlm.model import GPT, activate
from plainlm.named_configs import HF_CONFIG_JSON, NAMED_CONFIGS, config_for_name

NAMES = list(NAMED_CONFIGS)

# Sizes in billions as the model cards and papers give them (rounded there, hence the tolerance).
PUBLISHED_BILLIONS = {
    "Llama-2-7b-hf": 6.74,
    "Llama-2-13b-hf": 13.02,
    "Llama-2-70b-hf": 68.98,
    "CodeLlama-7b-hf": 6.74,
    "TinyLlama-1.1B-Chat-v1.0": 1.1,
    "Meta-Llama-3-8B": 8.03,
    "Llama-3.1-70B": 70.55,
    "Llama-3.2-1B": 1.24,
    "Llama-3.2-3B": 3.21,
    # Llama 4: the published totals include the vision encoder (about 1B), which plainlm does not build
    "Llama-4-Scout-17B-16E-Instruct": 109,
    "Llama-4-Maverick-17B-128E-Instruct": 400,
    "SmolLM2-135M": 0.135,
    "SmolLM2-360M": 0.362,
    "SmolLM2-1.7B": 1.71,
    "Mistral-7B-v0.1": 7.24,
    "Mixtral-8x7B-v0.1": 46.7,
    "Qwen2-7B": 7.62,
    "Qwen2.5-0.5B": 0.49,
    "Qwen2.5-1.5B": 1.54,
    "Qwen1.5-MoE-A2.7B": 14.3,
    "Qwen2-57B-A14B": 57.41,
    "Qwen3-0.6B": 0.6,
    "Qwen3-8B": 8.19,
    "Qwen3-30B-A3B": 30.5,
    "gemma-2b": 2.51,
    "gemma-7b": 8.54,
    "gemma-2-2b": 2.61,
    "gemma-2-9b": 9.24,
    "gemma-2-27b": 27.2,
    "gemma-3-270m": 0.268,
    "gemma-3-1b-pt": 1.0,
    "phi-1_5": 1.42,
    "phi-2": 2.78,
    "Phi-3-mini-4k-instruct": 3.82,
    "phi-4": 14.7,
    "pythia-70m": 0.0704,
    "pythia-160m": 0.162,
    "pythia-1.4b": 1.41,
    "pythia-12b": 11.85,
    "stablelm-2-1_6b": 1.64,
    "Falcon3-7B-Base": 7.46,
    "OLMo-1B-hf": 1.18,
    "OLMo-2-1124-7B": 7.3,
    "c4ai-command-r7b-12-2024": 8.03,
    "c4ai-command-a-03-2025": 111.0,
    "EXAONE-4.0-1.2B": 1.28,  # the model card: 1.07B without embeddings
    "EXAONE-4.0-32B": 32.0,  # the model card: 30.95B without embeddings
    "SmolLM3-3B": 3.08,
    "Olmo-3-1025-7B": 7.3,
    "Olmo-3-1125-32B": 32.2,
    "granite-3.3-2b-instruct": 2.53,
    "granite-3.3-8b-instruct": 8.17,
    "Seed-OSS-36B-Instruct": 36.15,
    "ERNIE-4.5-0.3B-PT": 0.36,
    "DeepSeek-V3": 671,  # without the multi-token-prediction layer (685B with it)
    "DeepSeek-R1": 671,
    "Kimi-K2-Instruct": 1040,
    "GLM-4.5": 355,
    "GLM-4.5-Air": 106,
    "gpt2": 0.124,
    "gpt2-medium": 0.355,
    "gpt2-large": 0.774,
    "gpt2-xl": 1.56,
    "gpt-oss-20b": 20.91,  # the gpt-oss model card's totals, experts included
    "gpt-oss-120b": 116.83,
}

# config.json keys that do not describe the network transformers builds.
NOT_ARCHITECTURAL = {
    "model_type",
    # Phi-3 reads it only for LongRoPE scaling, which none of these configs use.
    "original_max_position_embeddings",
}
# Attributes transformers derives from several keys (RoPE, layer pattern, head size): compared always.
DERIVED = ("rope_parameters", "layer_types", "head_dim")


def repo_of(name: str) -> str:
    return NAMED_CONFIGS[name].hf_repo


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.cache
def our_param_count(name: str) -> int:
    config = NAMED_CONFIGS[name]
    if config.position_embedding == "rope":  # RoPE tables of Llama 4 Scout's 10M positions would take 10 GB
        config = dataclasses.replace(config, block_size=min(config.block_size, 131072))
    with torch.device("meta"):
        return param_count(GPT(config))


def hf_config(hf: dict[str, Any]) -> transformers.PretrainedConfig:
    return transformers.AutoConfig.for_model(**hf)


def read(config: transformers.PretrainedConfig, key: str) -> Any:
    """An attribute as the model uses it; an unset head_dim means hidden_size // num_attention_heads."""
    value = getattr(config, key, None)
    if key == "head_dim" and value is None:
        return config.hidden_size // config.num_attention_heads
    return value


def hf_activation(model: nn.Module) -> nn.Module:
    """The MLP's activation module (the only activation these models have)."""
    for module in model.modules():
        if type(module).__module__ == "transformers.activations" or isinstance(module, (nn.SiLU, nn.GELU, nn.ReLU)):
            return module
    raise AssertionError(f"no activation module in {type(model).__name__}")


def architecture(config: Config) -> dict[str, Any]:
    fields = dataclasses.asdict(config)
    for key in ("name", "hf_repo", "hf_extra"):
        del fields[key]
    return fields


def test_every_entry_names_its_repo() -> None:
    for name, config in NAMED_CONFIGS.items():
        assert config.name == name
        assert config.hf_repo in HF_CONFIG_JSON and config.hf_repo.endswith("/" + name)


@pytest.mark.parametrize("name", list(PUBLISHED_BILLIONS))
def test_size_matches_the_published_one(name: str) -> None:
    billions = our_param_count(name) / 1e9
    assert billions == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.03)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_transformers_builds_the_same_model_from_our_export(name: str) -> None:
    config = NAMED_CONFIGS[name]
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config(config_to_hf(config)))
    assert param_count(hf_model) == our_param_count(name)
    if config.mlp_activation == "clamped_swiglu":  # gpt-oss's experts compute it inline: see its logits' test
        return
    # An activation swap (exact vs tanh GELU) keeps every shape, so compare the functions themselves.
    x = torch.linspace(-5, 5, 201)
    torch.testing.assert_close(activate(x, config.mlp_activation), hf_activation(hf_model)(x))


@pytest.mark.parametrize("name", NAMES)
def test_transformers_reads_our_export_as_the_hub_config(name: str) -> None:
    """Every key the hub's config.json sets means the same to transformers in the config.json we write."""
    hub_json = HF_CONFIG_JSON[repo_of(name)]
    hub, ours = hf_config(hub_json), hf_config(config_to_hf(NAMED_CONFIGS[name]))
    keys = sorted((set(hub_json) - NOT_ARCHITECTURAL) | set(DERIVED))
    differences = {key: (read(hub, key), read(ours, key)) for key in keys if read(hub, key) != read(ours, key)}
    assert not differences, f"{name}: (hub, ours) differ for {differences}"


@pytest.mark.parametrize("name", NAMES)
def test_export_reads_back_to_the_same_config(name: str) -> None:
    config = NAMED_CONFIGS[name]
    back = config_from_hf(config_to_hf(config))
    assert architecture(back) == architecture(config)
    assert back.hf_extra == config.hf_extra


@pytest.mark.parametrize(
    "name",
    ["Llama-3.2-1B", "gemma-3-1b-it", "Qwen3-30B-A3B", "Llama-4-Maverick-17B-128E-Instruct", "falcon-40b", "gpt2"],
)
def test_saved_named_config_loads_back(name: str, tmp_path: Path) -> None:
    config = NAMED_CONFIGS[name]
    config.save(tmp_path / "config.yaml")
    assert Config.from_file(tmp_path / "config.yaml") == config


def test_config_for_name_returns_the_entry_with_overrides() -> None:
    config = config_for_name("Llama-3.2-1B", n_layer=2)
    assert config.n_layer == 2 and config.hf_repo == "meta-llama/Llama-3.2-1B"
    assert NAMED_CONFIGS["Llama-3.2-1B"].n_layer == 16


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="Unknown model name 'nope'") as error:
        config_for_name("nope")
    assert "Llama-3.2-1B" in str(error.value) and "gpt2-xl" in str(error.value)


def test_unsupported_model_type_names_the_supported_ones() -> None:
    with pytest.raises(ValueError, match="unsupported model_type 'bert'") as error:
        config_from_hf({"model_type": "bert", "hidden_size": 768})
    assert all(model_type in str(error.value) for model_type in SUPPORTED_MODEL_TYPES)
