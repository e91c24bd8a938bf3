"""GGUF import (plainlm/convert/gguf.py): real GGUF models against transformers, tiny models of every architecture.

Real models: SmolLM2-135M-Instruct (architecture llama, Q4_1 and Q8_0 tensors) and Gemma 3 270M (gemma3; Q4_K, Q5_0,
Q6_K and Q8_0) that pip packages ship. The reference is transformers' own GGUF loader,
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`, which dequantizes with the same gguf package: float32
logits agree within ATOL / RTOL and greedy decoding gives the same 30 token ids.

Tiny models: one transformers model per supported architecture, written to GGUF as llama.cpp writes it
(tests/helpers_gguf.py) in f32, f16, bf16, q8_0 and q4_0. The reference is that transformers model with its 2-D weights
round-tripped through the same quantization, so the tolerance stays that of float32 arithmetic.
"""

from __future__ import annotations

import copy
import gc
import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType
from helpers import run_cli
from helpers_gguf import REAL_PROMPTS, TINY_MODELS, make_tiny_model, model_arch, quantized_reference, write_gguf

from plainlm.checkpoint import load_checkpoint, save_checkpoint
from plainlm.convert.gguf import dequantize, load_gguf_model
from plainlm.convert.gguf_names import read_config, tensor_rules
from plainlm.convert.gguf_reader import read_gguf
from plainlm.convert.hf import convert_to_hf
from plainlm.convert.hf_config import config_from_hf
from plainlm.convert.hf_weights import weight_rules
from plainlm.errors import CheckpointError, PackagedModelMissing
from plainlm.generate import generate
from plainlm.model import GPT
from plainlm.packaged_models import gemma3_gguf, smollm2_gguf
from plainlm.quantize import quantize_model

# float32 logits (up to ~37 in size). Measured: both real models bit-identical to transformers (same
# dequantization, same float32 arithmetic), the tiny ones too; the tolerance leaves room for kernel changes.
ATOL = RTOL = 1e-5

PROMPTS = REAL_PROMPTS  # the prompts of tests/helpers_gguf.py


@dataclass
class RealModel:
    name: str
    path: Path
    ours: GPT
    theirs: transformers.PreTrainedModel
    prompts: list[list[int]]


@pytest.fixture(scope="session", params=["smollm2", "gemma3"])
def real(request: pytest.FixtureRequest) -> RealModel:
    """Both loads of one real model, once per session (transformers takes 10-30 s for each)."""
    try:
        path = {"smollm2": smollm2_gguf, "gemma3": gemma3_gguf}[request.param]()
    except PackagedModelMissing as e:
        pytest.skip(str(e))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model = RealModel(request.param, path, load_gguf_model(path), theirs.eval(), PROMPTS[request.param])
    yield model
    del model
    gc.collect()


@pytest.mark.slow
def test_real_model_weights_equal_transformers(real: RealModel) -> None:
    """Dequantized, un-permuted, norm-shifted: every tensor equals transformers' own, bit for bit."""
    theirs = real.theirs.state_dict()
    ours = real.ours.state_dict()
    for rule in weight_rules(real.ours.config):
        assert torch.equal(ours[rule.ours[0]], theirs[rule.hf]), rule.hf


@pytest.mark.slow
def test_real_model_logits_match_transformers(real: RealModel) -> None:
    # Two rows of real text long enough for several prompts' worth of context each.
    row = [t for p in real.prompts for t in p]
    batch = torch.tensor([row, row[::-1]])
    with torch.no_grad():
        ours, theirs = real.ours(batch), real.theirs(batch).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_real_model_greedy_generation_matches_transformers(real: RealModel) -> None:
    eos = real.theirs.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    ours = generate(real.ours, real.prompts, max_new_tokens=30, stop_ids=eos)
    # transformers decodes the same left-padded batch; it keeps the stop token and pads finished rows after it.
    width = max(map(len, real.prompts))
    ids = torch.tensor([[eos[0]] * (width - len(p)) + p for p in real.prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in real.prompts])
    out = real.theirs.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=eos[0])
    for our_ids, row in zip(ours, out[:, width:].tolist(), strict=True):
        stops = [i for i, t in enumerate(row) if t in eos]
        assert our_ids == row[: stops[0] if stops else None]


@pytest.mark.slow
def test_real_model_int8_predicts_fp32s_greedy_tokens(real: RealModel) -> None:
    """Issue 3's int8 accuracy target, on both real models: reading fp32's greedy continuation of each prompt
    (teacher-forced), int8's argmax is fp32's token at >= 90% of the 30 positions. Measured: 83 of 90 on both
    models, the same with exact float activations, so the per-row weight rounding is what costs. Free-running
    agreement, where one flip between near-equal logits fails every later position, is in docs/benchmarks.md."""
    reference = generate(real.ours, real.prompts, max_new_tokens=30)
    int8 = quantize_model(copy.deepcopy(real.ours), "int8")
    hits = positions = 0
    for prompt, continuation in zip(real.prompts, reference, strict=True):
        with torch.no_grad():
            logits = int8(torch.tensor([prompt + continuation[:-1]]))[0, len(prompt) - 1 :]
        hits += sum(a == b for a, b in zip(logits.argmax(-1).tolist(), continuation, strict=True))
        positions += len(continuation)
    assert hits / positions >= 0.9, f"{hits} of {positions}"


@pytest.mark.slow
def test_real_model_config_matches_transformers(real: RealModel) -> None:
    ours, theirs = real.ours.config, real.theirs.config
    assert (ours.n_layer, ours.n_embd, ours.n_head, ours.n_kv_head, ours.head_dim) == (
        theirs.num_hidden_layers,
        theirs.hidden_size,
        theirs.num_attention_heads,
        theirs.num_key_value_heads,
        theirs.head_dim,
    )
    assert (ours.vocab_size, ours.block_size, ours.tie_embeddings) == (
        theirs.vocab_size,
        theirs.max_position_embeddings,
        theirs.tie_word_embeddings,
    )
    assert ours.norm_eps == theirs.rms_norm_eps
    if real.name == "gemma3":
        assert ours.sliding_window == theirs.sliding_window
        assert [ours.is_sliding(i) for i in range(ours.n_layer)] == [
            t == "sliding_attention" for t in theirs.layer_types
        ]


@pytest.mark.slow
def test_llm_load_gguf_file() -> None:
    """LLM.load of a .gguf file: tokenizer files from its metadata (in a temporary directory), weights in memory."""
    pytest.importorskip("plainlm.convert.gguf_tokenizer")
    from plainlm import LLM

    try:
        path = smollm2_gguf()
    except PackagedModelMissing as e:
        pytest.skip(str(e))
    llm = LLM.load(path)
    assert llm.tokenizer.encode("The capital of France is") == PROMPTS["smollm2"][0]
    assert "Paris" in llm.generate("The capital of France is", max_new_tokens=5)
    tokenizer_dir = llm.tokenizer.checkpoint_dir
    assert (tokenizer_dir / "tokenizer.json").is_file()
    del llm
    gc.collect()
    assert not tokenizer_dir.exists(), "the temporary tokenizer directory outlived the LLM"


@pytest.mark.slow
def test_convert_from_gguf_command(tmp_path: Path) -> None:
    """`plainlm convert from-gguf`: a native checkpoint whose weights are the dequantized ones, plus tokenizer files."""
    pytest.importorskip("plainlm.convert.gguf_tokenizer")
    try:
        path = smollm2_gguf()
    except PackagedModelMissing as e:
        pytest.skip(str(e))
    result = run_cli("convert", "from-gguf", str(path), str(tmp_path / "out"), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    for name in ("model.safetensors", "config.yaml", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).is_file(), name
    converted = load_checkpoint(tmp_path / "out", dtype=torch.bfloat16)
    reference = load_gguf_model(path, dtype=torch.bfloat16)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())


# --- tiny models, every architecture ---
QTYPES = [GGMLQuantizationType[name] for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0")]


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tiny_model_matches_transformers(name: str, qtype: GGMLQuantizationType, tmp_path: Path) -> None:
    arch = TINY_MODELS[name][0]
    reference = make_tiny_model(name)
    path = write_gguf(reference, arch, tmp_path / "tiny.gguf", qtype)
    quantized_reference(reference, qtype)
    ours = load_gguf_model(path)
    assert ours.config.hf_model_type == reference.config.model_type
    ids = torch.randint(0, reference.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # 12 tokens: past the sliding window of 5 where the architecture has one
        torch.testing.assert_close(ours(ids), reference(ids).logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tiny_model_exports_to_hf(name: str, tmp_path: Path) -> None:
    """The config read from GGUF metadata writes a config.json transformers builds the same model from."""
    reference = make_tiny_model(name)
    path = write_gguf(reference, TINY_MODELS[name][0], tmp_path / "tiny.gguf")
    save_checkpoint(load_gguf_model(path), tmp_path / "native")
    convert_to_hf(tmp_path / "native", tmp_path / "hf")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(exported) is type(reference)
    ids = torch.randint(0, reference.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, reference(ids).logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tensor_rules_invert_and_use_llama_cpp_names(name: str, tmp_path: Path) -> None:
    """Every rule's to_gguf undoes its to_ours (GGUF export reuses them), and every name is one llama.cpp defines."""
    arch = TINY_MODELS[name][0]
    path = write_gguf(make_tiny_model(name), arch, tmp_path / "tiny.gguf")
    reader = read_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    config = read_config(reader, path)
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[model_arch(arch)]}
    for rule in tensor_rules(config):
        for name in rule.gguf_names:
            parts = name.split(".")[:-1]  # "blk.3.attn_q.weight" -> "blk.{bid}.attn_q"
            assert ".".join(["blk", "{bid}", *parts[2:]] if parts[0] == "blk" else parts) in known, name
        originals = [dequantize(tensors[name], path) for name in rule.gguf_names]
        for back, original in zip(rule.to_stored(rule.from_stored(originals)), originals, strict=True):
            torch.testing.assert_close(back, original, atol=1e-7, rtol=0)


def test_gpt_oss_mxfp4_experts_load_as_the_gguf_package_dequantizes_them(tmp_path: Path) -> None:
    """llama.cpp stores gpt-oss's experts as its MXFP4 type; the gguf package dequantizes them."""
    reference = make_tiny_model("gpt-oss")
    mxfp4 = GGMLQuantizationType.MXFP4
    path = write_gguf(reference, "gpt-oss", tmp_path / "tiny.gguf", GGMLQuantizationType.Q8_0, expert_qtype=mxfp4)
    assert {t.tensor_type for t in read_gguf(path).tensors if t.name.endswith("_exps.weight")} == {mxfp4}
    quantized_reference(reference, GGMLQuantizationType.Q8_0, expert_qtype=mxfp4)
    ids = torch.randint(0, reference.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_gguf_model(path)(ids), reference(ids).logits, atol=ATOL, rtol=RTOL)


def test_llama4_hard_coded_attention_is_the_config_json_one(tmp_path: Path) -> None:
    """llama.cpp stores none of Llama 4's attention switches (8k chunks, NoPE every 4th layer and its temperature,
    q/k norm but on the 128-expert model): what it hard-codes reads as what the model's config.json says."""
    reference = make_tiny_model("llama4")
    path = write_gguf(reference, "llama4", tmp_path / "tiny.gguf")
    ours, theirs = read_config(read_gguf(path), path), config_from_hf(reference.config.to_dict())
    assert ours.attention_chunk_size == 8192 and ours.nope_layers == [3] and ours.moe_dense_layers == [0, 2]
    assert ours.norm_eps == pytest.approx(theirs.norm_eps, rel=1e-6)  # GGUF stores it in float32
    for config in (ours, theirs):
        config.name, config.hf_extra, config.norm_eps = "tiny", {}, 1e-5
    assert ours == theirs


def test_deepseek2_with_softmax_routing_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's deepseek2 also holds DeepSeek-V2, whose experts are chosen by softmax: refused, never misread."""
    add = gguf.GGUFWriter.add_expert_gating_func
    monkeypatch.setattr(
        gguf.GGUFWriter, "add_expert_gating_func", lambda w, _: add(w, gguf.ExpertGatingFuncType.SOFTMAX)
    )
    path = write_gguf(make_tiny_model("deepseek-v3"), "deepseek2", tmp_path / "softmax.gguf")
    with pytest.raises(CheckpointError, match="deepseek2 with expert_gating_func 1"):
        load_gguf_model(path)
