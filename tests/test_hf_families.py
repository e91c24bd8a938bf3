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
from safetensors.torch import save_file

from plainlm.checkpoint import load_checkpoint
from plainlm.convert.hf import convert_from_hf, convert_to_hf, load_hf_model
from plainlm.convert.hf_config import config_from_hf
from plainlm.errors import CheckpointError, UnsupportedModelError
from plainlm.generate import generate
from plainlm.model import LatentKVCache
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


def test_latent_attention_caches_the_latent_and_decodes_as_a_full_forward(tmp_path: Path) -> None:
    """DeepSeek-V3's KV cache holds kv_lora_rank + qk_rope_head_dim values per token and layer, no more, and
    decoding through it (prefill, one-token steps, several rows from one prefix, speculative rollback) gives
    the logits and tokens of the cacheless forward, which matches transformers (test above)."""
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
