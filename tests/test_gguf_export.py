"""GGUF export (plainlm/convert/gguf_export.py): real and tiny models, read back by transformers and by our importer.

Real models: the two packaged GGUF files (SmolLM2-135M-Instruct, architecture llama; Gemma 3 270M, gemma3) are
imported and exported again (q8_0; SmolLM2 also f16). The exported file must hold the tensors (names, shapes) and
hyperparameters of the file llama.cpp wrote; transformers' own GGUF loader must give logits close to the checkpoint's
(quantization error only: REAL_TOLERANCE) and equal to our re-import's (float32 arithmetic only: ATOL / RTOL), and
SmolLM2's tokenizer must come back with the same ids.

Tiny models: one per architecture, built in transformers and converted from Hugging Face, exported in f32 and q8_0
(llama also f16 and bf16). transformers' GGUF loader reads back only part of the metadata, so those models keep the
switches it reads; every switch plainlm knows (biases, Llama 3 RoPE, linear RoPE, softcaps, sliding windows, Qwen3's
head_dim) is checked by re-importing the tiny models of tests/helpers_gguf.py, tensor for tensor."""

from __future__ import annotations

import dataclasses
import gc
import shutil
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType
from helpers import run_cli, tiny_hf_model
from helpers_gguf import REAL_PROMPTS, TINY_MODELS, make_tiny_model, round_trip

from plainlm.checkpoint import TensorSource, load_checkpoint, save_checkpoint
from plainlm.config import Config
from plainlm.convert.gguf import convert_from_gguf, load_gguf_model
from plainlm.convert.gguf_export import convert_to_gguf
from plainlm.convert.gguf_names import IMPORT_ONLY_ARCHITECTURES
from plainlm.convert.gguf_reader import GGUFFile, read_gguf
from plainlm.convert.hf import convert_from_hf
from plainlm.errors import CheckpointError, PackagedModelMissing
from plainlm.model import GPT
from plainlm.packaged_models import gemma3_gguf, smollm2_gguf
from plainlm.tokenizer import Tokenizer

ATOL = RTOL = 1e-5  # float32 arithmetic: our model against transformers on the same weights
# Real models against the checkpoint they were exported from: the largest logit difference as a fraction of the
# largest logit (~35), and the share of positions whose top token agrees. Measured: f16 (SmolLM2) 0.0013, top-1 1.0;
# q8_0 0.051 (SmolLM2) and 0.076 (Gemma 3), top-1 1.0 and 0.96. llama.cpp itself, running the same files, differs
# from our float32 logits by as much (0.05), as it does on the q4 files it wrote.
REAL_TOLERANCE = {"f16": 0.01, "q8_0": 0.1}
REAL_TOP1 = {"f16": 0.95, "q8_0": 0.9}
REAL_DTYPES = {"smollm2": ("q8_0", "f16"), "gemma3": ("q8_0",)}
# Only SmolLM2's q8_0 export carries a tokenizer: transformers reads a file's whole vocabulary, twice, taking seconds
# (~10 s for Gemma's 262,144 tokens), and test_gguf_tokenizer.py checks that vocabulary's export. Gemma's checkpoint
# is bfloat16, as most are: its norm weights must go +1 in float32.
GEMMA_DTYPE = torch.bfloat16
PROMPTS = REAL_PROMPTS  # the prompts of tests/helpers_gguf.py
# fmt: off
TEXTS = [
    "", " ", "Hello", "Hello, world!", "  two leading spaces", "line one\nline two\n\nline four", "tabs\tinside",
    "The quick brown fox jumps over the lazy dog.", "CamelCaseIdentifier", "it's don't won't I'LL", "1234567890",
    "3.14159 -42 1,000,000", "def f(x):\n    return x * 2\n", "x = {'a': [1, 2, 3], \"b\": None}", "<div>hi</div>",
    "https://example.com/a?b=c", "Café naïve résumé", "Straße", "Привет, мир!", "你好，世界！", "日本語のテキスト",
    "한국어", "مرحبا", "😀👍🏽🇫🇷", "∑ ∫ √ ≤ π ∞", "\u00a0non-breaking", "a\u0301 combining", "▁ a▁b", "?!?!...---",
    "<|im_start|>user\nHi<|im_end|>\n", "<start_of_turn>user\nHi<end_of_turn>\n", "<bos><eos><pad>", "<s> </s>",
    "<|endoftext|>", "   \n\n\t  ", "aaaaaaaaaaaaaaaaaaaaaaaaaaaa", "word" + " " * 7 + "word",
]
# fmt: on


# --- real models ---
@dataclass
class RealExport:
    name: str
    original: GGUFFile  # the file llama.cpp wrote
    exported: GGUFFile  # the q8_0 export
    checkpoint: Path  # converted from the original: the source of the exports
    files: dict[str, Path]  # dtype -> the exported file
    source_logits: torch.Tensor
    transformers_logits: dict[str, torch.Tensor]  # dtype -> transformers' load of the exported file
    reimport_logits: torch.Tensor  # our load_gguf_model of the q8_0 file
    reimport_weights: dict[str, torch.Tensor]  # its first block
    tokenizer_dir: Path | None  # the q8_0 file's tokenizer, rebuilt by load_gguf_model


@pytest.fixture(scope="module", params=list(REAL_DTYPES))
def real(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> RealExport:
    """Everything slow, once per model; logits are kept, not models."""
    name = request.param
    try:
        original = {"smollm2": smollm2_gguf, "gemma3": gemma3_gguf}[name]()
    except PackagedModelMissing as e:
        pytest.skip(str(e))
    tmp = tmp_path_factory.mktemp(f"export-{name}")
    row = [t for prompt in PROMPTS[name] for t in prompt]
    ids = torch.tensor([row, row[::-1]])
    with torch.no_grad():
        if name == "smollm2":
            checkpoint = convert_from_gguf(original, tmp / "checkpoint")
        else:
            checkpoint = save_checkpoint(load_gguf_model(original, dtype=GEMMA_DTYPE), tmp / "checkpoint")
        source_logits = load_checkpoint(checkpoint, dtype=torch.float32)(ids)
        files, transformers_logits = {}, {}
        for dtype in REAL_DTYPES[name]:
            source = checkpoint if dtype == "q8_0" else weights_only(checkpoint, tmp / f"{dtype}-weights")
            files[dtype] = convert_to_gguf(source, tmp / f"{name}-{dtype}.gguf", dtype)
            theirs = transformers.AutoModelForCausalLM.from_pretrained(
                tmp, gguf_file=files[dtype].name, dtype=torch.float32
            )
            transformers_logits[dtype] = theirs.eval()(ids).logits
            del theirs
        tokenizer_dir = tmp / "tokenizer" if (checkpoint / "tokenizer.json").is_file() else None
        ours = load_gguf_model(files["q8_0"], tokenizer_dir=tokenizer_dir)
        reimport_logits = ours(ids)
        readers = (read_gguf(original), read_gguf(files["q8_0"]))
    weights = {k: v for k, v in ours.state_dict().items() if k.startswith("blocks.0.")}
    del ours
    gc.collect()
    yield RealExport(
        name, *readers, checkpoint, files, source_logits, transformers_logits, reimport_logits, weights, tokenizer_dir
    )
    shutil.rmtree(tmp)  # 1-2 GB of checkpoints and exports


def weights_only(checkpoint: Path, directory: Path) -> Path:
    """The checkpoint without its tokenizer files."""
    directory.mkdir()
    for name in ("model.safetensors", "config.yaml"):
        (directory / name).symlink_to(checkpoint / name)
    return directory


@pytest.mark.slow
def test_real_export_has_llama_cpp_tensors_and_metadata(real: RealExport) -> None:
    """Same tensor names and shapes as the file llama.cpp wrote, the same hyperparameters; norms F32, weights Q8_0."""
    original, exported = real.original, real.exported
    arch = original.fields["general.architecture"].value
    assert exported.fields["general.architecture"].value == arch
    assert exported.fields["general.file_type"].value == gguf.LlamaFileType.MOSTLY_Q8_0
    shapes = {t.name: t.shape for t in exported.tensors}
    assert shapes == {t.name: t.shape for t in original.tensors}
    for t in exported.tensors:
        expected = GGMLQuantizationType.F32 if len(t.shape) == 1 else GGMLQuantizationType.Q8_0
        assert t.tensor_type == expected, t.name
    keys = {
        k for k in original.fields if k.startswith(f"{arch}.") or (real.tokenizer_dir and k.startswith("tokenizer."))
    }
    # Flags llama.cpp wrote at their defaults, which the export leaves out (as test_gguf_tokenizer.py checks).
    assert keys - exported.fields.keys() <= {"tokenizer.ggml.add_space_prefix", "tokenizer.ggml.add_sep_token"}
    for key in keys & exported.fields.keys():
        assert exported.fields[key].value == original.fields[key].value, key


@pytest.mark.slow
def test_real_export_logits_close_to_source(real: RealExport) -> None:
    """transformers' load of each exported file against the checkpoint's logits: quantization error only."""
    ours = real.source_logits
    for dtype, theirs in real.transformers_logits.items():
        assert (theirs - ours).abs().max() <= REAL_TOLERANCE[dtype] * ours.abs().max(), dtype
        assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= REAL_TOP1[dtype], dtype


@pytest.mark.slow
def test_real_export_reimports_as_transformers_reads_it(real: RealExport) -> None:
    """Our importer and transformers' read the exported file alike; its weights are the checkpoint's, quantized."""
    torch.testing.assert_close(real.reimport_logits, real.transformers_logits["q8_0"], atol=ATOL, rtol=RTOL)
    source = TensorSource(real.checkpoint)
    for name, tensor in real.reimport_weights.items():
        expected = source.get(name).float().numpy()
        if tensor.ndim == 2:
            expected = round_trip(expected, GGMLQuantizationType.Q8_0)
        # float32 rounding only: Gemma's norm weights are stored plus one
        torch.testing.assert_close(tensor, torch.from_numpy(expected), atol=1.2e-7, rtol=1.2e-7, msg=name)


@pytest.mark.slow
def test_real_export_tokenizer_round_trips(real: RealExport) -> None:
    """The exported file's tokenizer, rebuilt from its metadata, gives the checkpoint's ids and chat prompts."""
    if real.tokenizer_dir is None:
        pytest.skip(f"{real.name}'s checkpoint has no tokenizer files (test_gguf_tokenizer.py exports its vocabulary)")
    source, exported = Tokenizer(real.checkpoint), Tokenizer(real.tokenizer_dir)
    for text in TEXTS:
        assert exported.encode(text) == source.encode(text), repr(text)
    assert (exported.bos_id, exported.eos_id, exported.stop_ids) == (source.bos_id, source.eos_id, source.stop_ids)
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    assert exported.apply_chat_template(messages) == source.apply_chat_template(messages)


# --- tiny models ---
BASE = dict(TINY_MODELS["qwen2"][2])  # 64 wide, 2 layers, 4 heads of 16, 2 KV heads, vocab 160
# One per architecture, within what transformers' GGUF loader reads back: it has no key for llama's attention
# biases, RoPE scaling, Phi-3's window, Gemma's softcaps or query scale (256), nor Qwen3's head_dim (128), so
# those stay at transformers' defaults here; the round-trip tests below cover them.
FOR_TRANSFORMERS = {
    "llama": ("LlamaConfig", dict(BASE, intermediate_size=80)),  # ffn_down rows of 80: q8_0 falls back to f16
    "qwen2": ("Qwen2Config", BASE),
    # transformers reads no expert sizes from GGUF, so they are its defaults (1408, 5632) here
    "qwen2moe": ("Qwen2MoeConfig", dict(BASE, num_experts=4, num_experts_per_tok=2)),
    "qwen3": ("Qwen3Config", dict(BASE, head_dim=128, tie_word_embeddings=True)),
    "phi3": ("Phi3Config", dict(BASE, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gemma2": (
        "Gemma2Config",
        dict(BASE, num_hidden_layers=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=5),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(BASE, num_hidden_layers=6, head_dim=256, query_pre_attn_scalar=256, sliding_window=5),
    ),
}


OUR_ROUTERS = ("mlp.router.weight", "mlp.shared_expert_gate.weight")


def tiny_checkpoint(model: transformers.PreTrainedModel, directory: Path) -> Path:
    model.save_pretrained(directory / "hf")
    return convert_from_hf(directory / "hf", directory / "checkpoint")


def as_exported(model: GPT, dtype: str) -> GPT:
    """`model` with its 2-D and 3-D weights as an exported file of `dtype` holds them (q8_0: f16 where rows don't
    fit; MoE routers stay float32)."""
    qtype = GGMLQuantizationType[dtype.upper()]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and qtype != GGMLQuantizationType.F32 and not name.endswith(OUR_ROUTERS):
                fits = p.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0
                p.copy_(torch.from_numpy(round_trip(p.numpy(), qtype if fits else GGMLQuantizationType.F16)))
    return model


@pytest.mark.parametrize(
    ("arch", "dtype"),
    [(a, d) for a in FOR_TRANSFORMERS for d in ("f32", "q8_0")] + [("llama", "f16"), ("llama", "bf16")],
)
def test_tiny_export_loads_in_transformers(arch: str, dtype: str, tmp_path: Path) -> None:
    config_class, kwargs = FOR_TRANSFORMERS[arch]
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**kwargs))
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.3)
    checkpoint = tiny_checkpoint(reference, tmp_path)
    file = convert_to_gguf(checkpoint, tmp_path / "tiny.gguf", dtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=file.name, dtype=torch.float32)
    ours = as_exported(load_checkpoint(checkpoint), dtype)
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # 12 tokens: past the sliding window of 5 where the architecture has one
        torch.testing.assert_close(theirs.eval()(ids).logits, ours(ids), atol=ATOL, rtol=RTOL)
    if arch == "llama" and dtype == "q8_0":
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(file).tensors}
        assert types["blk.0.ffn_down.weight"] == GGMLQuantizationType.F16
        assert types["blk.0.ffn_up.weight"] == GGMLQuantizationType.Q8_0
        assert gguf.GGUFReader(file).fields["tokenizer.ggml.model"].contents() == "none"  # no tokenizer files


@pytest.mark.parametrize(
    "name", [name for name, entry in TINY_MODELS.items() if entry[0] not in IMPORT_ONLY_ARCHITECTURES]
)
def test_tiny_export_round_trips_every_switch(name: str, tmp_path: Path) -> None:
    """Re-imported, the exported file is the checkpoint's model: its config, and each tensor (2-D ones quantized)."""
    checkpoint = tiny_checkpoint(make_tiny_model(name), tmp_path)
    ids = torch.randint(0, 160, (2, 12), generator=torch.Generator().manual_seed(1))
    for dtype in ("f32", "q8_0"):
        reimported = load_gguf_model(convert_to_gguf(checkpoint, tmp_path / f"{dtype}.gguf", dtype))
        expected = as_exported(load_checkpoint(checkpoint), dtype)
        assert reimported.config.hf_model_type == expected.config.hf_model_type
        assert reimported.config.rope_scaling == expected.config.rope_scaling
        for key, tensor in reimported.state_dict().items():
            # 1.2e-7: Gemma's norms are stored plus one, in float32
            torch.testing.assert_close(tensor, expected.state_dict()[key], atol=1.2e-7, rtol=0, msg=key)
        with torch.no_grad():
            torch.testing.assert_close(reimported(ids), expected(ids), atol=ATOL, rtol=RTOL)


def test_inexpressible_model_is_refused_before_writing(tmp_path: Path) -> None:
    """A llama with a sliding window (Mistral 7B v0.1): llama.cpp's "llama" has none, so there is no faithful file."""
    config = Config(name="windowed", n_layer=1, n_embd=32, n_head=2, vocab_size=64, sliding_window=16)
    save_checkpoint(GPT(config), tmp_path / "checkpoint")
    with pytest.raises(CheckpointError, match="sliding_window is 16, the file would give None"):
        convert_to_gguf(tmp_path / "checkpoint", tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists() and not (tmp_path / ".out.gguf.partial").exists()


def test_cohere2_pattern_llama_cpp_would_not_assume_is_written(tmp_path: Path) -> None:
    """llama.cpp takes every 4th Cohere 2 layer as global unless the file says otherwise: ours says so always."""
    layer_types = ["sliding_attention", "full_attention"] * 2
    config = transformers.Cohere2Config(**dict(BASE, num_hidden_layers=4, sliding_window=5, layer_types=layer_types))
    reference = tiny_hf_model(config)
    reimported = load_gguf_model(convert_to_gguf(tiny_checkpoint(reference, tmp_path), tmp_path / "c.gguf", "f32"))
    assert reimported.config.nope_layers == [1, 3]
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reimported(ids), reference(ids).logits, atol=ATOL, rtol=RTOL)


def test_untied_cohere2_is_refused(tmp_path: Path) -> None:
    """llama.cpp's cohere2 reads its output projection from token_embd: an untied head has nowhere to go."""
    config = transformers.Cohere2Config(**dict(BASE, num_hidden_layers=4, tie_word_embeddings=False))
    checkpoint = tiny_checkpoint(tiny_hf_model(config), tmp_path)
    with pytest.raises(CheckpointError, match="only a tied head"):
        convert_to_gguf(checkpoint, tmp_path / "out.gguf")


def test_moe_llama_cpp_would_run_otherwise_is_refused(tmp_path: Path) -> None:
    """llama.cpp's qwen2moe never renormalises the top-k weights and has experts in every layer."""
    config = Config(
        name="moe",
        hf_model_type="qwen2_moe",
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        qkv_bias=True,
        n_expert=4,
        n_expert_per_token=2,
        moe_intermediate_size=32,
        moe_normalize_topk=True,
        moe_shared_intermediate_size=32,
        moe_shared_gate=True,
        moe_dense_layers=[1],
    )
    save_checkpoint(GPT(config), tmp_path / "checkpoint")
    with pytest.raises(
        CheckpointError, match=r"moe_normalize_topk is True, the file would give False; moe_dense_layers"
    ):
        convert_to_gguf(tmp_path / "checkpoint", tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_crash_while_writing_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = tiny_checkpoint(make_tiny_model("qwen2"), tmp_path)
    quantize, calls = gguf.quants.quantize, []

    def failing(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
        calls.append(qtype)
        if len(calls) == 5:
            raise MemoryError("simulated crash")
        return quantize(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", failing)
    with pytest.raises(MemoryError):
        convert_to_gguf(checkpoint, tmp_path / "out.gguf", "q8_0")
    assert not (tmp_path / "out.gguf").exists() and not (tmp_path / ".out.gguf.partial").exists()


# --- command line ---
def test_to_gguf_command(tiny_hf_dir: Path, tmp_path: Path) -> None:
    """`plainlm convert to-gguf` end to end on a model whose tokenizer has 16 tokens fewer than its embeddings."""
    checkpoint = convert_from_hf(tiny_hf_dir, tmp_path / "checkpoint")
    result = run_cli("convert", "to-gguf", str(checkpoint), str(tmp_path / "out" / "tiny.gguf"), "--dtype", "q8_0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "out" / "tiny.gguf")
    vocab_size = Config.from_file(checkpoint / "config.yaml").vocab_size
    reader = gguf.GGUFReader(tmp_path / "out" / "tiny.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == vocab_size and tokens[-1] == f"[PAD{vocab_size - 1}]"  # llama.cpp: a token per row
    load_gguf_model(tmp_path / "out" / "tiny.gguf", tokenizer_dir=tmp_path / "tokenizer")
    source, exported = Tokenizer(checkpoint), Tokenizer(tmp_path / "tokenizer")
    for text in TEXTS:
        assert exported.encode(text) == source.encode(text), repr(text)


def test_to_gguf_command_bad_input(tmp_path: Path) -> None:
    neox = Config(name="tiny-neox", hf_model_type="gpt_neox", n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    save_checkpoint(GPT(neox), tmp_path / "neox")
    save_checkpoint(GPT(dataclasses.replace(neox, name="tiny-gpt-oss", hf_model_type="gpt_oss")), tmp_path / "oss")
    cases = {
        str(tmp_path / "missing"): "no config.yaml",
        str(tmp_path / "neox"): "'gpt_neox' model cannot be exported to GGUF; supported model types: llama",
        # read from GGUF, not written (its gate and up experts are two GGUF tensors of one of ours)
        str(tmp_path / "oss"): "'gpt_oss' model cannot be exported to GGUF; supported model types: llama",
    }
    for src, message in cases.items():
        result = run_cli("convert", "to-gguf", src, str(tmp_path / "out.gguf"))
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
        assert message in result.stderr
    with pytest.raises(ValueError, match="choose one of f16, q8_0, f32, bf16"):
        convert_to_gguf(tmp_path / "neox", tmp_path / "out.gguf", "q4_0")
    assert not (tmp_path / "out.gguf").exists()


def test_smollm3_nope_layers_llama_cpp_cannot_place_are_refused(tmp_path: Path) -> None:
    """llama.cpp fixes SmolLM3's NoPE layers at every fourth (no key in the file): other ones have no faithful file."""
    config = Config(
        name="nope", hf_model_type="smollm3", n_layer=4, n_embd=32, n_head=2, vocab_size=64, nope_layers=[1]
    )
    save_checkpoint(GPT(config), tmp_path / "checkpoint")
    with pytest.raises(CheckpointError, match=r"nope_layers is \[1\], the file would give \[3\]"):
        convert_to_gguf(tmp_path / "checkpoint", tmp_path / "out.gguf")
