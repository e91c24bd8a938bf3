"""serve/adapters.py: many LoRA / DoRA adapters over one base, each batch row applying only its own.

The reference for a row with adapter X is that row alone through a copy of the base with X merged into it
(lora.merge_lora), or through `peft` for adapters peft made. Tolerance: fp32 logits within 1e-5 (absolute
and relative): the served path adds x A^T (s B)^T to the base output where the merged one multiplies by
W + s B A, so the two round differently. Base rows must equal the plain model's bit for bit.
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
import torch.nn as nn
from helpers import make_adapter, make_tiny_hf_model, merged, tiny_gpt

from plainlm.convert.hf import load_hf_model
from plainlm.errors import CheckpointError, InvalidInput, NotFound
from plainlm.kernels import kernels_loaded
from plainlm.lora import LoRAConfig, load_peft_adapter
from plainlm.model import GPT
from plainlm.quantize import quantize_model
from plainlm.serve.adapters import AdapterSet, MultiLoRALinear

ATOL = RTOL = 1e-5
VOCAB = 64


def base_model(**fields: object) -> GPT:
    return tiny_gpt(std=0.2, **fields).eval()  # peaked logits: a wrong row or layer cannot hide


def ids(rows: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, 7), generator=torch.Generator().manual_seed(seed))


def structure(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in model.named_modules()]


@pytest.fixture
def adapters(tmp_path: Path) -> dict[str, Path]:
    """Two LoRA adapters with different ranks and targets (lm_head included), and a DoRA one."""
    base = base_model()
    return {
        "a": make_adapter(base, tmp_path / "a", LoRAConfig(r=4, alpha=8, targets=["q", "v", "lm_head"]), seed=1),
        "b": make_adapter(base, tmp_path / "b", LoRAConfig(r=2, alpha=6, targets=["k", "o", "gate", "down"]), seed=2),
        "d": make_adapter(base, tmp_path / "d", LoRAConfig(r=3, alpha=3, targets=["q", "up", "down"], dora=True), 3),
    }


def test_each_row_of_a_mixed_batch_equals_its_adapter_merged(adapters: dict[str, Path]) -> None:
    base = base_model()
    served = copy.deepcopy(base)
    adapter_set = AdapterSet(served)
    for name, path in adapters.items():
        adapter_set.load(name, path)
    assert adapter_set.names == ["a", "b", "d"]
    rows = ["a", None, "b", "a", "d", None]
    idx = ids(len(rows))
    adapter_set.select(rows)
    with torch.no_grad():
        logits = served(idx)
        plain = base(idx)
        for i, name in enumerate(rows):
            if name is None:  # the same batch through the model that never saw an adapter
                assert torch.equal(logits[i], plain[i]), f"base row {i} changed"
            else:
                alone = merged(base, adapters[name])(idx[i : i + 1])[0]
                torch.testing.assert_close(logits[i], alone, atol=ATOL, rtol=RTOL, msg=f"row {i} ({name})")
                assert not torch.allclose(logits[i], plain[i], atol=1e-3), f"adapter {name} changed nothing"


def test_decode_steps_with_the_kv_cache(adapters: dict[str, Path]) -> None:
    """The engine's way: a prefill, then one token per row per step through the KV cache; each step's logits
    equal the whole sequence through that row's merged model."""
    base = base_model()
    served = copy.deepcopy(base)
    adapter_set = AdapterSet(served)
    for name in ("b", "d"):
        adapter_set.load(name, adapters[name])
    rows = ["d", None, "b"]
    references = [base if name is None else merged(base, adapters[name]) for name in rows]
    sequences = ids(len(rows), seed=5)
    served.set_kv_cache(len(rows), 16)
    adapter_set.select(rows)
    with torch.no_grad():
        prompt = 4
        logits = served(sequences[:, :prompt], input_pos=torch.arange(prompt))[:, -1]
        for position in range(prompt, sequences.shape[1] + 1):
            for i, reference in enumerate(references):
                expected = reference(sequences[i : i + 1, :position])[0, -1]
                torch.testing.assert_close(logits[i], expected, atol=ATOL, rtol=RTOL, msg=f"row {i}, {position}")
            if position < sequences.shape[1]:
                step = sequences[:, position : position + 1]
                logits = served(step, input_pos=torch.tensor([position]))[:, -1]


def test_a_batch_of_one_adapter_and_a_batch_of_base_rows(adapters: dict[str, Path]) -> None:
    """The two shortcuts: every row one adapter's (no index_select), and no adapter row (the plain layers)."""
    base = base_model()
    served = copy.deepcopy(base)
    adapter_set = AdapterSet(served)
    adapter_set.load("d", adapters["d"])
    idx = ids(3)
    with torch.no_grad():
        adapter_set.select(["d"] * 3)
        torch.testing.assert_close(served(idx), merged(base, adapters["d"])(idx), atol=ATOL, rtol=RTOL)
        adapter_set.select([None] * 3)
        assert torch.equal(served(idx), base(idx))


def test_layers_are_swapped_only_where_an_adapter_needs_them(adapters: dict[str, Path]) -> None:
    base = base_model(tie_embeddings=True)
    served = copy.deepcopy(base)
    adapter_set = AdapterSet(served)
    assert structure(served) == structure(base)
    adapter_set.load("a", adapters["a"])
    swapped = {name for name, module in served.named_modules() if isinstance(module, MultiLoRALinear)}
    assert swapped == {"lm_head"} | {f"blocks.{i}.attn.{p}_proj" for i in range(2) for p in "qv"}
    assert served.lm_head.base.weight is served.embed.weight  # the tied head still shares the embedding


def test_unload_falls_back_to_the_base_and_reload_works(adapters: dict[str, Path]) -> None:
    base = base_model()
    served = copy.deepcopy(base)
    adapter_set = AdapterSet(served)
    adapter_set.load("a", adapters["a"])
    adapter_set.load("b", adapters["b"])
    idx = ids(2)
    adapter_set.unload("a")
    assert adapter_set.names == ["b"]
    assert type(served.blocks[0].attn.q_proj) is nn.Linear  # only "a" adapted q: the plain layer is back
    with pytest.raises(NotFound, match="'a'"):
        adapter_set.select(["a", "b"])
    with torch.no_grad():
        adapter_set.select([None, "b"])
        logits = served(idx)
        assert torch.equal(logits[0], base(idx)[0])
        torch.testing.assert_close(logits[1], merged(base, adapters["b"])(idx[1:])[0], atol=ATOL, rtol=RTOL)
        adapter_set.load("a", adapters["a"])  # the same name again, after its unload
        adapter_set.select(["a", "b"])
        logits = served(idx)
        torch.testing.assert_close(logits[0], merged(base, adapters["a"])(idx[:1])[0], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(logits[1], merged(base, adapters["b"])(idx[1:])[0], atol=ATOL, rtol=RTOL)
    adapter_set.unload("a")
    adapter_set.unload("b")
    assert adapter_set.names == []
    assert structure(served) == structure(base)
    assert served.state_dict().keys() == base.state_dict().keys()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_adapters_made_by_peft_match_peft(tmp_path: Path, dora: bool) -> None:
    """Two peft adapters (one on attention, one on the MLP and the head) in one batch, each row against
    peft's own model with that adapter."""
    hf_base = make_tiny_hf_model(tmp_path / "base", vocab_size=VOCAB)
    targets = {
        "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "mlp": ["gate_proj", "up_proj", "down_proj", "lm_head"],
    }
    references = {}
    for i, (name, modules) in enumerate(targets.items()):
        torch.manual_seed(i)
        config = peft.LoraConfig(r=2 + i, lora_alpha=8, target_modules=modules, use_dora=dora, init_lora_weights=False)
        theirs = peft.get_peft_model(copy.deepcopy(hf_base), config).eval()
        theirs.save_pretrained(tmp_path / name)
        references[name] = theirs
    served = load_hf_model(tmp_path / "base").eval()
    adapter_set = AdapterSet(served)
    for name in targets:
        adapter_set.load(name, tmp_path / name)
    rows = ["mlp", "attn", None]
    idx = ids(len(rows))
    adapter_set.select(rows)
    with torch.no_grad():
        logits = served(idx)
        for i, name in enumerate(rows):
            reference = hf_base if name is None else references[name]
            expected = reference(idx[i : i + 1]).logits[0]
            torch.testing.assert_close(logits[i], expected, atol=ATOL, rtol=RTOL, msg=f"row {i} ({name})")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_adapters_over_a_quantized_base_with_the_cpu_kernels(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over int8/int4 layers, each row equals that adapter as a LoRALinear over the same quantized layers, and
    base rows equal the quantized model's bit for bit. The layers are wide enough for plainlm's kernels: where
    they built, adapted q/k/v and gate/up still run their bases in one fused call per block
    (kernel_layers.project_together), which the count of those calls checks."""
    float_base = base_model(n_embd=64, intermediate_size=128)
    adapters = {
        "kv": make_adapter(float_base, tmp_path / "kv", LoRAConfig(r=4, alpha=8, targets=["k", "v", "up"]), seed=1),
        "dora": make_adapter(float_base, tmp_path / "dora", LoRAConfig(r=2, targets=["q", "gate"], dora=True), seed=2),
    }
    base = quantize_model(float_base, mode)  # with kernel_layers' attention and MLP swapped in
    served = copy.deepcopy(base)
    adapter_set = AdapterSet(served)
    for name, path in adapters.items():
        adapter_set.load(name, path)
    rows = ["dora", None, "kv"]
    idx = ids(len(rows))
    adapter_set.select(rows)
    fused_calls = []
    if kernels_loaded():
        fused = getattr(torch.ops.plainlm, f"{mode}_matmuls")
        monkeypatch.setattr(torch.ops.plainlm, f"{mode}_matmuls", lambda *a: fused_calls.append(1) or fused(*a))
    with torch.no_grad():
        logits = served(idx)
        assert len(fused_calls) == (2 * served.config.n_layer if kernels_loaded() else 0)
        assert torch.equal(logits[1], base(idx)[1])
        for i in (0, 2):
            reference = copy.deepcopy(base)
            load_peft_adapter(reference, adapters[rows[i]])  # unmerged: the same quantized base under it
            torch.testing.assert_close(logits[i], reference(idx[i : i + 1])[0], atol=ATOL, rtol=RTOL)


def test_bad_adapters_and_names_leave_the_model_as_it_was(adapters: dict[str, Path], tmp_path: Path) -> None:
    base = base_model()
    served = copy.deepcopy(base)
    adapter_set = AdapterSet(served)
    adapter_set.load("a", adapters["a"])
    before = structure(served)
    other_width = make_adapter(base_model(n_embd=64), tmp_path / "wide", LoRAConfig(targets=["q", "v"]), seed=4)
    deeper = make_adapter(base_model(n_layer=3), tmp_path / "deep", LoRAConfig(targets=["q"]), seed=5)
    (tmp_path / "empty").mkdir()
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for file, size in (("adapter_config.json", None), ("adapter_model.safetensors", 100)):
        (truncated / file).write_bytes((adapters["b"] / file).read_bytes()[:size])
    failures = [
        ("x", tmp_path / "empty", CheckpointError, "no adapter_config.json; is this a LoRA adapter directory"),
        ("x", truncated, CheckpointError, "adapter_model.safetensors: cannot be read as adapter weights"),
        ("x", other_width, CheckpointError, r"has shape \(8, 64\), but rank 8 .* needs \(8, 32\)"),
        ("x", deeper, CheckpointError, "model.layers.2.self_attn.q_proj.lora_A.weight names no layer"),
        ("a", adapters["b"], InvalidInput, "'a' is already loaded"),
        ("", adapters["b"], InvalidInput, "non-empty name"),
    ]
    for name, path, error, message in failures:
        with pytest.raises(error, match=message):
            adapter_set.load(name, path)
        assert adapter_set.names == ["a"] and structure(served) == before
    with pytest.raises(NotFound, match="no adapter named 'b' is loaded"):
        adapter_set.unload("b")
    with pytest.raises(NotFound, match="no adapter named 'c' is loaded"):
        adapter_set.select(["a", "c"])
    adapter_set.select(["a", None])
    with pytest.raises(InvalidInput, match="given 2 rows, but this forward's batch has 3"):
        served(ids(3))
