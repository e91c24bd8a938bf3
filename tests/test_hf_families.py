"""Every supported family against `transformers`: forward logits, reverse conversion, bit-exact round trip.

For each family a tiny model is built with `transformers` from a config of that architecture,
with every parameter (norm weights included) randomised so that a wrong mapping cannot hide
behind constant initialisations. Tolerance: fp32 logits within 1e-5 (absolute and relative).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from helpers import reference_greedy
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from plainlm.checkpoint import load_checkpoint
from plainlm.config import Config
from plainlm.convert.hf import convert_from_hf, convert_to_hf, load_hf_model
from plainlm.convert.hf_config import config_from_hf, config_to_hf
from plainlm.convert.mxfp4 import dequantize_mxfp4
from plainlm.errors import CheckpointError, InvalidInput, UnsupportedModelError
from plainlm.generate import generate
from plainlm.kernel_layers import use_cpu_kernels
from plainlm.model import LatentAttention, LatentKVCache
from plainlm.named_configs import HF_CONFIG_JSON

ATOL = RTOL = 1e-5
VOCAB = 160
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
LLAMA = dict(BASE, num_key_value_heads=2)
SMOLLM3_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # its defaults lie past the tiny vocabulary

# DeepSeek-V3's multi-head latent attention (yarn with mscale_all_dim, which scales q.k) and grouped sigmoid routing
DEEPSEEK_V3 = dict(
    BASE,
    num_key_value_heads=4,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=12,
    n_routed_experts=8,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=3,
    moe_intermediate_size=16,
    n_shared_experts=2,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
        "beta_fast": 32,
        "beta_slow": 1,
    },
)


# family name -> (transformers config class, kwargs). Each entry carries the switches that make
# the family what it is; sizes are tiny so the whole file runs in about a minute.
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama2": ("LlamaConfig", dict(BASE, rms_norm_eps=1e-5)),
    "llama3": ("LlamaConfig", dict(LLAMA, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "llama3.1": (
        "LlamaConfig",
        dict(
            LLAMA,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "llama3.2": (
        "LlamaConfig",
        dict(
            LLAMA,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "codellama": ("LlamaConfig", dict(BASE, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "llama-linear-rope": (
        "LlamaConfig",
        dict(LLAMA, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    ),
    "tinyllama": ("LlamaConfig", dict(BASE, num_key_value_heads=1)),
    "smollm2": (
        "LlamaConfig",
        dict(LLAMA, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    ),
    "falcon3": (
        "LlamaConfig",
        dict(LLAMA, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1000042.0}),
    ),
    "llama-head-dim-bias": ("LlamaConfig", dict(LLAMA, head_dim=8, attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", dict(LLAMA, sliding_window=5)),
    "mistral-nowindow": ("MistralConfig", dict(LLAMA, sliding_window=None, head_dim=24)),
    "mixtral": ("MixtralConfig", dict(LLAMA, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", dict(LLAMA, tie_word_embeddings=True)),
    "qwen2.5-yarn": (
        "Qwen2Config",
        dict(
            LLAMA,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "qwen3": ("Qwen3Config", dict(LLAMA, head_dim=24)),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        dict(LLAMA, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    ),
    "qwen3-moe-unnormalized": (
        "Qwen3MoeConfig",
        dict(LLAMA, num_experts=4, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=False),
    ),
    "qwen2-moe": (
        "Qwen2MoeConfig",
        dict(
            LLAMA,
            num_hidden_layers=3,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            mlp_only_layers=[1],
        ),
    ),
    "qwen2-moe-sparse-step": (
        "Qwen2MoeConfig",
        dict(
            LLAMA,
            num_hidden_layers=4,
            num_experts=4,
            num_experts_per_tok=3,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            decoder_sparse_step=2,
            norm_topk_prob=True,
            tie_word_embeddings=True,
        ),
    ),
    # router_jitter_noise 0.3: near ties (logits within 60% of the best) share the softmax, as the masks allow
    "phimoe": (
        "PhimoeConfig",
        dict(LLAMA, num_local_experts=4, attention_bias=True, lm_head_bias=True, router_jitter_noise=0.3),
    ),
    "phimoe-sliding": ("PhimoeConfig", dict(LLAMA, num_local_experts=4, sliding_window=5)),
    "gemma": ("GemmaConfig", dict(LLAMA, head_dim=32)),
    "gemma-legacy-gelu": ("GemmaConfig", dict(LLAMA, head_dim=32, hidden_act="gelu")),
    "gemma2": (
        "Gemma2Config",
        dict(
            LLAMA,
            num_hidden_layers=4,
            head_dim=16,
            sliding_window=5,
            query_pre_attn_scalar=32,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            LLAMA,
            num_hidden_layers=3,
            head_dim=16,
            sliding_window=5,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
    ),
    "phi-1.5": ("PhiConfig", dict(BASE, partial_rotary_factor=0.5)),
    "phi-2": ("PhiConfig", dict(BASE, partial_rotary_factor=0.4)),
    "phi-3": ("Phi3Config", dict(LLAMA, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "phi-4-mini": (
        "Phi3Config",
        dict(
            LLAMA, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, partial_rotary_factor=0.75
        ),
    ),
    "pythia": ("GPTNeoXConfig", dict(BASE, partial_rotary_factor=0.25)),
    "gpt-neox-sequential": ("GPTNeoXConfig", dict(BASE, use_parallel_residual=False, partial_rotary_factor=0.5)),
    "stablelm": ("StableLmConfig", dict(LLAMA, partial_rotary_factor=0.25)),
    "stablelm2": (
        "StableLmConfig",
        dict(BASE, num_key_value_heads=4, partial_rotary_factor=0.25, use_qkv_bias=True, use_parallel_residual=True),
    ),
    "falcon-7b": (
        "FalconConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            multi_query=True,
            parallel_attn=True,
            bias=False,
        ),
    ),
    "falcon-40b": (
        "FalconConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            new_decoder_architecture=True,
            num_kv_heads=2,
            parallel_attn=True,
            bias=False,
        ),
    ),
    "falcon-11b": (
        "FalconConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            new_decoder_architecture=True,
            num_kv_heads=2,
            num_ln_in_parallel_attn=1,
        ),
    ),
    "falcon-sequential-mha": (
        "FalconConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            multi_query=False,
            parallel_attn=False,
            bias=True,
        ),
    ),
    "olmo": ("OlmoConfig", dict(LLAMA, clip_qkv=0.5)),
    "olmo2": ("Olmo2Config", dict(LLAMA)),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4)),
    # Three sliding layers with interleaved RoPE, then a global one without; 13 tokens pass the window of 5
    "cohere2": (
        "Cohere2Config",
        dict(LLAMA, num_hidden_layers=4, sliding_window=5, logit_scale=0.25, tie_word_embeddings=True),
    ),
    "cohere2-untied-bias-pattern2": (
        "Cohere2Config",
        dict(
            LLAMA,
            num_hidden_layers=4,
            sliding_window=5,
            attention_bias=True,
            tie_word_embeddings=False,
            layer_types=["sliding_attention", "full_attention"] * 2,
            rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        ),
    ),
    "exaone4": (
        "Exaone4Config",
        dict(
            LLAMA,
            num_hidden_layers=4,
            head_dim=24,
            sliding_window=5,
            layer_types=["sliding_attention"] * 3 + ["full_attention"],
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 1000000.0,
                "factor": 16.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    # EXAONE 4.0 1.2B: no sliding window, so every layer rotates
    "exaone4-1.2b": (
        "Exaone4Config",
        dict(LLAMA, sliding_window=None, layer_types=["full_attention"] * 2, tie_word_embeddings=True),
    ),
    # every second layer without RoPE (1 in no_rope_layers means the layer rotates)
    "smollm3": ("SmolLM3Config", dict(LLAMA, **SMOLLM3_TOKENS, num_hidden_layers=4, no_rope_layer_interval=2)),
    "smollm3-list": ("SmolLM3Config", dict(LLAMA, **SMOLLM3_TOKENS, num_hidden_layers=3, no_rope_layers=[0, 1, 1])),
    # sliding layers with their own unscaled RoPE beside YaRN-scaled global ones
    "olmo3": (
        "Olmo3Config",
        dict(
            LLAMA,
            num_hidden_layers=4,
            sliding_window=5,
            rope_parameters={
                "full_attention": {
                    "rope_type": "yarn",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "original_max_position_embeddings": 8,
                    "attention_factor": 1.2,
                    "beta_fast": 32.0,
                    "beta_slow": 1.0,
                },
                "sliding_attention": {"rope_type": "default", "rope_theta": 500000.0},
            },
        ),
    ),
    "olmo3-global": ("Olmo3Config", dict(LLAMA, layer_types=["full_attention", "full_attention"])),
    "granite": (
        "GraniteConfig",
        dict(
            LLAMA,
            tie_word_embeddings=True,
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.0625,
            logits_scaling=8.0,
        ),
    ),
    "seed-oss": ("SeedOssConfig", dict(LLAMA, head_dim=24)),
    "ernie4.5": ("Ernie4_5Config", dict(LLAMA, head_dim=16)),
    "ernie4.5-bias": ("Ernie4_5Config", dict(LLAMA, head_dim=16, use_bias=True, tie_word_embeddings=False)),
    # sinks, biases, sliding/full layers, YaRN (truncate false), router bias, top-k then softmax, expert biases,
    # clamped SwiGLU (a small limit, so that the clamps bite)
    "gpt-oss": (
        "GptOssConfig",
        dict(
            LLAMA,
            num_hidden_layers=4,
            head_dim=16,
            sliding_window=5,
            num_local_experts=4,
            num_experts_per_tok=2,
            swiglu_limit=0.3,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    # Llama 4 Maverick's layout (dense and MoE layers alternate) with Scout's rope scaling and q/k norm; chunks of
    # 4 and a temperature floor of 3 so that 13 tokens cross chunks and the NoPE layer's temperature changes
    "llama4": (
        "Llama4TextConfig",
        dict(
            LLAMA,
            head_dim=16,
            intermediate_size=32,
            intermediate_size_mlp=96,
            num_hidden_layers=4,
            num_local_experts=4,
            num_experts_per_tok=2,
            interleave_moe_layer_step=2,
            attention_chunk_size=4,
            floor_scale=3,
            attn_scale=0.5,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 16.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 1.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "deepseek-v3": ("DeepseekV3Config", DEEPSEEK_V3),
    "deepseek-v3-plain-q": (
        "DeepseekV3Config",
        dict(
            DEEPSEEK_V3,
            q_lora_rank=None,
            rope_interleave=False,
            attention_bias=True,
            norm_topk_prob=False,
            n_shared_experts=1,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    "glm4-moe": (
        "Glm4MoeConfig",
        dict(
            LLAMA,
            num_hidden_layers=3,
            head_dim=24,
            partial_rotary_factor=0.5,
            attention_bias=True,
            use_qk_norm=True,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            routed_scaling_factor=1.5,
        ),
    ),
    "glm4-moe-air": (  # GLM-4.5-Air: no q/k norm, the default partial rotary factor
        "Glm4MoeConfig",
        dict(LLAMA, attention_bias=True, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    ),
}


def make_hf_model(family: str) -> transformers.PreTrainedModel:
    config_class, kwargs = FAMILIES[family]
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms and biases: random, so a swapped or missing one shows
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name and "gemma" not in family else 0.0))
            else:
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3 / GLM-4.5's routing bias is a buffer
                b.normal_(0, 0.1)
    return model


def random_ids(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 13), generator=g)


def hf_logits(model: transformers.PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformers(family: str, tmp_path: Path) -> None:
    hf_model = make_hf_model(family)
    hf_dir = tmp_path / "hf"
    hf_model.save_pretrained(hf_dir)
    ids = random_ids()
    expected = hf_logits(hf_model, ids)

    # forward: Hugging Face weights into our model give their logits
    ours = load_hf_model(hf_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), expected, atol=ATOL, rtol=RTOL)

    # through a native checkpoint on disk
    native = convert_from_hf(hf_dir, tmp_path / "native")
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(native)(ids), expected, atol=ATOL, rtol=RTOL)

    # reverse: our export loads in transformers as it is and gives the same logits
    exported = convert_to_hf(native, tmp_path / "exported")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager").eval()
    torch.testing.assert_close(hf_logits(reloaded, ids), expected, atol=ATOL, rtol=RTOL)

    # round trip: key for key, bit for bit
    before, after = tensors_of(hf_dir), tensors_of(exported)
    assert sorted(before) == sorted(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_sharded_export_loads_in_transformers(tmp_path: Path) -> None:
    hf_model = make_hf_model("llama3")
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    native = convert_from_hf(tmp_path / "hf", tmp_path / "native")
    exported = convert_to_hf(native, tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager").eval()
    ids = random_ids()
    torch.testing.assert_close(hf_logits(reloaded, ids), hf_logits(hf_model, ids), atol=0, rtol=0)


def test_pytorch_bin_checkpoint(tmp_path: Path) -> None:
    """Older hub models ship pytorch_model.bin (transformers 5 only writes safetensors, so write it here)."""
    hf_model = make_hf_model("qwen2")
    hf_model.save_pretrained(tmp_path)
    safetensors_file = tmp_path / "model.safetensors"
    torch.save(tensors_of(tmp_path), tmp_path / "pytorch_model.bin")
    safetensors_file.unlink()
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(load_hf_model(tmp_path)(ids), hf_logits(hf_model, ids), atol=ATOL, rtol=RTOL)


def test_legacy_config_json_keys(tmp_path: Path) -> None:
    """Configs on the hub use rope_theta / rope_scaling rather than transformers 5's rope_parameters."""
    hf_model = make_hf_model("llama3.1")
    hf_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = params
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = random_ids()
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(load_hf_model(tmp_path)(ids), hf_logits(reference, ids), atol=ATOL, rtol=RTOL)


HYBRID = dict(LLAMA, num_hidden_layers=4, sliding_window=5)
IRREGULAR = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]


@pytest.mark.parametrize(
    ("hf", "message"),
    [
        (dict(HYBRID, model_type="cohere2", rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "'dynamic'"),
        (dict(HYBRID, model_type="cohere2", hidden_act="tanh"), "activation 'tanh'"),
        (dict(HYBRID, model_type="cohere2", layer_types=IRREGULAR), "layer_types .* repeating"),
        (dict(HYBRID, model_type="exaone4", layer_types=IRREGULAR[:3] + ["chunked_attention"]), "chunked_attention"),
        (dict(HYBRID, model_type="exaone4", sliding_window_pattern=None), "sliding_window_pattern None"),
        # "LLG" over 4 layers: EXAONE makes the last layer global too, which no repeating pattern gives
        (dict(HYBRID, model_type="exaone4", sliding_window_pattern="LLG"), "layer_types .* repeating"),
    ],
)
def test_hybrid_attention_configs_we_cannot_run_are_refused(hf: dict, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        config_from_hf(hf)


def test_layers_without_rope_that_config_json_cannot_say_are_refused() -> None:
    """Cohere 2 and EXAONE 4 derive their NoPE layers from layer_types: any other nope_layers has no config.json."""
    config = config_from_hf(dict(HYBRID, model_type="exaone4"))
    assert config.nope_layers == [3] and config.rope_interleaved is False
    config.nope_layers = [1, 3]
    with pytest.raises(UnsupportedModelError, match=r"nope_layers=\[1, 3\]"):
        config_to_hf(config)


@pytest.mark.parametrize("family", ["cohere2", "exaone4"])
def test_hybrid_attention_decodes_as_transformers(family: str, tmp_path: Path) -> None:
    """Through the KV cache too, past the window of 5, a left-padded batch: the RoPE-less global layers read keys
    cached without rotation and the sliding ones rotated ones, as transformers' hybrid cache holds them."""
    hf_model = make_hf_model(family)
    hf_model.save_pretrained(tmp_path)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
    ours = generate(load_hf_model(tmp_path).eval(), prompts, max_new_tokens=12)
    for prompt, tokens in zip(prompts, ours, strict=True):
        theirs = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        assert tokens == theirs[0, len(prompt) :].tolist()


# config.json features of the 2025 dense families that plainlm does not run: refused, naming the field and value.
REFUSED: dict[str, tuple[str, dict, str]] = {
    "smollm3-sliding": (
        "smollm3",
        dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=8),
        r"smollm3 with sliding-window layers \(use_sliding_window=True",
    ),
    "smollm3-short-no-rope-list": ("smollm3", dict(no_rope_layers=[1]), r"no_rope_layers \[1\] has fewer entries"),
    "olmo3-irregular-layers": (
        "olmo3",
        dict(
            num_hidden_layers=4,
            layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        ),
        "layer_types .* do not follow a repeating sliding/global pattern",
    ),
    "olmo3-scaled-sliding-rope": (
        "olmo3",
        dict(
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 500000.0},
                "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0},
            }
        ),
        "rope_parameters.sliding_attention.rope_type 'linear' is not supported",
    ),
    "olmo3-no-window": (
        "olmo3",
        dict(sliding_window=None),
        "olmo3 with sliding_attention layers and sliding_window=null",
    ),
    "granite-dynamic-rope": ("granite", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "'dynamic'"),
    "seed-oss-activation": ("seed_oss", dict(hidden_act="sigmoid"), "unsupported activation 'sigmoid'"),
    "ernie4.5-longrope": ("ernie4_5", dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "'longrope'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_family_feature_is_refused(case: str) -> None:
    model_type, changes, message = REFUSED[case]
    with pytest.raises(UnsupportedModelError, match=message):
        config_from_hf(dict(LLAMA, model_type=model_type, **changes))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(logits_scaling=0.0), "logits_scaling must be a positive number, not 0.0"),
        (
            dict(embedding_multiplier=2.0, scale_embeddings=True),
            "embedding_multiplier != 1 together with scale_embeddings",
        ),
        (
            dict(residual_multiplier=0.5, parallel_residual=True),
            "residual_multiplier != 1 together with parallel_residual",
        ),
        (dict(logits_scaling=2.0, final_logit_softcap=30.0), "logits_scaling != 1 together with final_logit_softcap"),
    ],
)
def test_granite_multipliers_that_make_no_sense_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        Config(**changes)


def test_granite_multipliers_do_not_export_as_another_family() -> None:
    with pytest.raises(UnsupportedModelError, match="llama has no embedding_multiplier"):
        config_to_hf(Config(hf_model_type="llama", embedding_multiplier=12.0))
    config = config_from_hf(dict(LLAMA, model_type="granite", residual_multiplier=0.22))
    assert config_to_hf(config)["residual_multiplier"] == 0.22


# Phi-3.5-MoE-instruct's released RoPE: LongRoPE, whose factors switch with the sequence's length.
_PHIMOE_LONGROPE = {
    "type": "longrope",
    "short_factor": [1.0] * 64,
    "long_factor": [1.1] * 64,
    "short_mscale": 1.243163121016122,
    "long_mscale": 1.243163121016122,
    "original_max_position_embeddings": 4096,
}


@pytest.mark.parametrize(
    ("model_type", "changes", "message"),
    [
        ("phimoe", {"rope_scaling": _PHIMOE_LONGROPE}, "unsupported rope scaling 'longrope'"),
        ("phimoe", {"num_experts_per_tok": 4}, "phimoe with num_experts_per_tok=4 is not supported"),
        ("qwen2_moe", {"use_sliding_window": True}, "qwen2_moe with use_sliding_window=true is not supported"),
        ("qwen2_moe", {"decoder_sparse_step": 0}, "qwen2_moe with decoder_sparse_step=0 is not supported"),
    ],
)
def test_unsupported_moe_options_are_refused(model_type: str, changes: dict, message: str) -> None:
    hub = dict(LLAMA, model_type=model_type, rope_theta=10000.0, **changes)
    with pytest.raises(UnsupportedModelError, match=message):
        config_from_hf(hub)


# --- gpt-oss: the hub's MXFP4 checkpoints, and what its config.json may ask that plainlm does not do ---
def test_mxfp4_dequantization_is_transformers_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 255, (3, 10, 4), generator=g, dtype=torch.uint8)  # 255 is e8m0's NaN
    scales[0, 0] = torch.tensor([0, 1, 127, 254])  # the smallest scales (subnormal in float32) and the largest
    for dtype, bits in ((torch.bfloat16, torch.int16), (torch.float32, torch.int32)):
        expected = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        assert torch.equal(dequantize_mxfp4(blocks, scales, dtype).view(bits), expected.view(bits)), dtype


def write_mxfp4_gpt_oss(directory: Path) -> None:
    """The tiny gpt-oss with its experts as the hub stores them: MXFP4 blocks and scales (random), and
    quantization_config {"quant_method": "mxfp4"}."""
    make_hf_model("gpt-oss").save_pretrained(directory)
    state = load_file(directory / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for key in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        E, K, N = state.pop(key).shape
        state[f"{key}_blocks"] = torch.randint(0, 256, (E, N, K // 32, 16), generator=g, dtype=torch.uint8)
        state[f"{key}_scales"] = torch.randint(120, 126, (E, N, K // 32), generator=g, dtype=torch.uint8)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.slow
def test_gpt_oss_mxfp4_checkpoint_loads_dequantized_like_transformers(tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    write_mxfp4_gpt_oss(hf_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    ids = random_ids()
    expected = hf_logits(reference, ids)
    ours = load_hf_model(hf_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), expected, atol=ATOL, rtol=RTOL)
    # to-hf writes the dequantized float weights: transformers' own, bit for bit, and its logits
    exported = convert_to_hf(convert_from_hf(hf_dir, tmp_path / "native"), tmp_path / "exported")
    assert "quantization_config" not in json.loads((exported / "config.json").read_text())
    written, theirs = tensors_of(exported), reference.state_dict()
    assert sorted(written) == sorted(theirs)
    for key, tensor in written.items():
        assert torch.equal(tensor, theirs[key]), key
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager").eval()
    torch.testing.assert_close(hf_logits(reloaded, ids), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "unsupported rope scaling 'longrope'"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types .* do not follow"),
    ],
)
def test_gpt_oss_config_plainlm_cannot_run_is_refused(change: dict, message: str) -> None:
    hf = {"model_type": "gpt_oss", "num_hidden_layers": 2, **change}
    with pytest.raises(UnsupportedModelError, match=message):
        config_from_hf(hf)


def test_mxfp4_blocks_and_scales_that_do_not_pair_up_are_named(tmp_path: Path) -> None:
    write_mxfp4_gpt_oss(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    key = "model.layers.1.mlp.experts.down_proj_scales"
    state[key] = state[key][:, :, :1].contiguous()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for load in (load_hf_model, lambda src: convert_from_hf(src, tmp_path / "native")):
        with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.down_proj: blocks of shape"):
            load(tmp_path)
    assert not (tmp_path / "native").exists()  # refused before anything is written


def test_llama4_chunks_and_temperature_count_positions_under_a_kv_cache(tmp_path: Path) -> None:
    """Llama 4's attention chunks and NoPE temperature depend on each token's position: decoding token by token
    through the KV cache, a left-padded row included (its positions trail its cache slots by the padding), gives
    transformers' whole-sequence logits of the unpadded rows."""
    hf_model = make_hf_model("llama4")
    hf_model.save_pretrained(tmp_path)
    ids = random_ids()
    expected = hf_logits(hf_model, ids)
    model = load_hf_model(tmp_path).eval()
    T = ids.shape[1]
    pad = torch.tensor([[0], [3]])  # row 1: three pad slots, then its first T - 3 tokens
    idx = torch.cat((ids[:1], torch.cat((torch.zeros(1, 3, dtype=ids.dtype), ids[1:, : T - 3]), dim=1)))
    slots = torch.arange(T)
    position_ids = (slots - pad).clamp(min=0)
    mask = ((slots >= pad)[:, None, :] | torch.eye(T, dtype=torch.bool))[:, None]  # (2, 1, T, S); a pad sees itself
    model.set_kv_cache(2, T)
    steps = [(0, 5)] + [(t, t + 1) for t in range(5, T)]  # a prefill across chunks, then one token at a time
    with torch.no_grad():
        logits = torch.cat(
            [
                model(
                    idx[:, a:b],
                    input_pos=slots[a:b],
                    position_ids=position_ids[:, a:b],
                    attention_mask=mask[..., a:b, :],
                )
                for a, b in steps
            ],
            dim=1,
        )
    torch.testing.assert_close(logits[0], expected[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logits[1, 3:], expected[1, : T - 3], atol=ATOL, rtol=RTOL)


def llama4_config_json(**changes: object) -> dict:
    return {**transformers.Llama4TextConfig(**FAMILIES["llama4"][1]).to_dict(), **changes}


def test_llama4_multimodal_config_reads_as_its_text_model() -> None:
    """The hub's Llama 4 repos hold a multimodal config.json (model_type llama4) around the text model's."""
    multimodal = {"model_type": "llama4", "text_config": llama4_config_json(), "vision_config": {"hidden_size": 32}}
    assert config_from_hf(multimodal, name="l4") == config_from_hf(llama4_config_json(), name="l4")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # chunked attention on the NoPE layer too: the layer pattern plainlm's masks do not follow
        (dict(layer_types=["chunked_attention"] * 4), "llama4_text layer_types .* RoPE layers"),
        (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 5e5, "factor": 2.0}), "rope scaling 'dynamic'"),
        (dict(hidden_act="quick_gelu"), "unsupported activation 'quick_gelu'"),
        (dict(no_rope_layers=[1, 1]), "no_rope_layers has 2 entries for 4 layers"),
    ],
)
def test_llama4_config_we_cannot_run_is_refused(changes: dict, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        config_from_hf(llama4_config_json(**changes))


def test_llama4_multimodal_checkpoint_loads_its_text_model(tmp_path: Path) -> None:
    """The hub's Llama 4 checkpoints are Llama4ForConditionalGeneration: the text model under "language_model.",
    beside the vision model, which plainlm leaves out. Text-only logits are transformers' own."""
    text = dict(FAMILIES["llama4"][1], num_hidden_layers=2)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28)
    vision.update(patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64)
    torch.manual_seed(0)
    hf_model = transformers.Llama4ForConditionalGeneration(
        transformers.Llama4Config(text_config=text, vision_config=vision)
    ).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.normal_(0, 0.1)
    hf_model.save_pretrained(tmp_path)
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(load_hf_model(tmp_path)(ids), hf_logits(hf_model, ids), atol=ATOL, rtol=RTOL)


def test_latent_attention_caches_the_latent_and_decodes_as_a_full_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeepSeek-V3's KV cache holds kv_lora_rank + qk_rope_head_dim values per token and layer, no more, and
    decoding through it (prefill, one-token steps, several rows from one prefix, speculative rollback) gives
    the logits and tokens of the cacheless forward, which matches transformers (test above); with the CPU
    kernels swapped in (kv_b_proj a KernelLinear), decode steps still attend over the latents themselves."""
    make_hf_model("deepseek-v3").save_pretrained(tmp_path)
    model = load_hf_model(tmp_path).eval()
    c = model.config
    model.set_kv_cache(2, 20)
    for block in model.blocks:
        cache = block.attn.kv_cache
        assert isinstance(cache, LatentKVCache)
        assert cache.k.shape == (2, 1, 20, c.kv_lora_rank) and cache.v.shape == (2, 1, 20, c.qk_rope_head_dim)
        assert sum(t.numel() for t in cache.buffers()) == 2 * 20 * (16 + 8)

    ids = random_ids()
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :5], input_pos=torch.arange(5))]
        steps += [model(ids[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(5, ids.shape[1])]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=RTOL)

        model.set_kv_cache(1, 20)  # one prefix for two rows
        model(ids[:1, :5], input_pos=torch.arange(5))
        model.repeat_kv_cache(2)
        shared = torch.stack([ids[0, :5]] * 2)
        rows = torch.cat((shared, ids[:, 5:7]), dim=1)
        torch.testing.assert_close(
            model(ids[:, 5:7], input_pos=torch.arange(5, 7)), model(rows)[:, 5:], atol=ATOL, rtol=RTOL
        )
    model.clear_kv_cache()

    prompt = ids[0, :6].tolist() * 2  # a repeat, so that the n-gram draft proposes (and gets some wrong)
    expected = reference_greedy(model, prompt, 12)
    assert generate(model, [prompt], max_new_tokens=12) == [expected]
    assert generate(model, [prompt], max_new_tokens=12, draft="ngram") == [expected]

    absorbed = []
    attend_latent = LatentAttention.attend_latent
    monkeypatch.setattr(LatentAttention, "attend_latent", lambda *a: absorbed.append(1) or attend_latent(*a))
    kernels = use_cpu_kernels(load_hf_model(tmp_path).eval())
    assert generate(kernels, [prompt], max_new_tokens=12) == [expected] and absorbed


@pytest.mark.parametrize(
    ("repo", "change", "message"),
    [
        ("deepseek-ai/DeepSeek-V3", {"topk_method": "group_limited_greedy"}, "topk_method='group_limited_greedy'"),
        ("deepseek-ai/DeepSeek-V3", {"scoring_func": "softmax"}, "scoring_func='softmax'"),
        ("deepseek-ai/DeepSeek-V3", {"moe_layer_freq": 2}, "moe_layer_freq=2"),
        (
            "deepseek-ai/DeepSeek-V3",
            {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
            "rope scaling 'dynamic'",
        ),
        ("zai-org/GLM-4.5", {"hidden_act": "sigmoid"}, "activation 'sigmoid'"),
    ],
)
def test_deepseek_and_glm_features_we_lack_are_refused(repo: str, change: dict, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=re.escape(message)):
        config_from_hf({**HF_CONFIG_JSON[repo], **change})


def test_kimi_k2_config_reads_as_deepseek_v3() -> None:
    """Kimi K2's config.json names model_type "kimi_k2" (DeepSeek-V3's remote code); we read and write deepseek_v3."""
    config = config_from_hf({**HF_CONFIG_JSON["moonshotai/Kimi-K2-Instruct"], "model_type": "kimi_k2"})
    assert config.hf_model_type == "deepseek_v3" and config.n_expert == 384 and config.kv_lora_rank == 512


def test_multi_token_prediction_layers_in_the_checkpoint_are_skipped(tmp_path: Path) -> None:
    """DeepSeek-V3 and GLM-4.5 checkpoints carry their multi-token-prediction module as layer n_layer, which
    next-token decoding does not run (transformers skips it too); any other stray tensor is still refused."""
    hf_model = make_hf_model("glm4-moe")
    hf_model.save_pretrained(tmp_path)
    tensors = tensors_of(tmp_path)
    n_layer = hf_model.config.num_hidden_layers
    save_file({**tensors, f"model.layers.{n_layer}.eh_proj.weight": torch.ones(4, 8)}, tmp_path / "model.safetensors")
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(load_hf_model(tmp_path)(ids), hf_logits(hf_model, ids), atol=ATOL, rtol=RTOL)
    save_file(
        {**tensors, f"model.layers.{n_layer + 1}.eh_proj.weight": torch.ones(4, 8)}, tmp_path / "model.safetensors"
    )
    with pytest.raises(CheckpointError, match="have no place"):
        load_hf_model(tmp_path)
