"""The saved compiled decode step (compiled_step.py): where it goes, what it holds, when it is not reused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY, tiny_gpt

from plainlm import compiled_step
from plainlm.config import Config
from plainlm.generate import generate
from plainlm.model import GPT

PROMPT = [5, 9, 2, 7]


def forget_loaded_steps() -> None:
    """What a new process starts with: no step loaded and nothing in dynamo's memory; the disk as it was."""
    compiled_step._loaded.clear()
    torch._dynamo.reset()


def saved_path(model: GPT) -> Path:
    """The file a greedy generate(PROMPT, compile=True) on `model` saves its step in (a 256-slot cache)."""
    model.set_kv_cache(1, 256)
    token, slot = torch.tensor([[1]]), torch.tensor([len(PROMPT)])
    example = dict(input_pos=slot, position_ids=None, attention_mask=None)
    path = compiled_step.saved_step_path(model, "default", (token,), example)
    model.clear_kv_cache()
    return path


@pytest.mark.slow
def test_a_saved_step_is_loaded_by_the_next_process_and_runs_other_weights_of_the_same_structure() -> None:
    """The step is saved on first use and loaded, not traced, after; weights are inputs, not baked in."""
    from torch._dynamo.utils import counters

    config = Config(**{**TINY, "block_size": 512})
    first, second = tiny_gpt(config, seed=0, std=0.2).eval(), tiny_gpt(config, seed=1, std=0.2).eval()
    path = saved_path(first)
    assert path == saved_path(second)  # same structure, other weights: the same file
    path.unlink(missing_ok=True)
    forget_loaded_steps()

    eager = {model: generate(model, [PROMPT], max_new_tokens=6) for model in (first, second)}
    assert eager[first] != eager[second]  # so a step that kept the first model's weights would show
    assert generate(first, [PROMPT], max_new_tokens=6, compile=True) == eager[first]
    assert path.exists()
    traced = counters["stats"]["calls_captured"]

    forget_loaded_steps()
    assert generate(second, [PROMPT], max_new_tokens=6, compile=True) == eager[second]
    assert counters["stats"]["calls_captured"] == traced  # loaded: dynamo traced nothing
    assert generate(first, [PROMPT], max_new_tokens=6, compile=True) == eager[first]


def test_the_saved_step_file_changes_with_what_its_guards_cannot_see() -> None:
    """Another KV cache size, dtype, quantized or swapped module, or call shape is another file."""
    config = Config(**{**TINY, "block_size": 512})
    model = tiny_gpt(config).eval()
    token, slot = torch.tensor([[1]]), torch.tensor([4])
    example = dict(input_pos=slot, position_ids=None, attention_mask=None)

    def path(batch: int = 1, length: int = 256, mode: str = "default", **changes: object) -> Path:
        model.set_kv_cache(batch, length)
        return compiled_step.saved_step_path(model, mode, (token.expand(batch, 1),), {**example, **changes})

    base = path()
    assert path() == base
    others = [
        path(length=512),
        path(batch=2),
        path(mode="reduce-overhead"),
        path(position_ids=torch.tensor([[4]]), attention_mask=torch.ones(1, 1, 1, 256, dtype=torch.bool)),
        compiled_step.saved_step_path(tiny_gpt(config).eval().double(), "default", (token,), example),
    ]
    assert len({base, *others}) == 1 + len(others)
    assert base.parent.name == "plainlm"


@pytest.mark.slow
def test_a_mixture_of_experts_step_is_saved_whole_too() -> None:
    """Its routing is one graph (grouped_mm.py), so its step is saved and loaded like any other."""
    model = tiny_gpt(Config(**{**TINY, "block_size": 512}, n_expert=4, n_expert_per_token=2), std=0.2).eval()
    path = saved_path(model)
    path.unlink(missing_ok=True)
    forget_loaded_steps()
    assert generate(model, [PROMPT], max_new_tokens=4, compile=True) == generate(model, [PROMPT], max_new_tokens=4)
    assert path.exists()
    forget_loaded_steps()  # a new process loads the saved step
    assert generate(model, [PROMPT], max_new_tokens=4, compile=True) == generate(model, [PROMPT], max_new_tokens=4)
