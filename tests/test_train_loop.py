"""The training loop's own guarantees, in process on a tiny model: accumulation equals one big batch,
a non-finite loss stops the run before it reaches the weights, a full disk keeps the last checkpoint."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from helpers import ToyLoader, tiny_gpt

import plainlm.objectives as objectives
import plainlm.train_state as train_state
from plainlm.data import IGNORE_INDEX
from plainlm.errors import CheckpointError, TrainingDiverged
from plainlm.model import GPT, GatedActivation, activate
from plainlm.train import TrainArgs, fit, warmup_cosine
from plainlm.train_state import latest_checkpoint, load_training_checkpoint


def run(out: Path, steps: int = 4, **kwargs) -> tuple[GPT, dict]:
    model = tiny_gpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = TrainArgs(
        max_steps=steps,
        global_batch_size=4,
        micro_batch_size=2,
        save_interval=2,
        eval_interval=100,
        tensorboard=False,
        peak_flops=1e11,
        warmup_steps=1,
        precision="32-true",  # exact comparisons below (auto would be bf16-mixed on an AMX CPU)
        **kwargs,
    )
    metrics = fit(model, ToyLoader(), ToyLoader(), opt, warmup_cosine(opt, args), args, out, {"model": "tiny"})
    return model, metrics


def test_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    accumulated, _ = run(tmp_path / "a", steps=1)
    model = tiny_gpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = ToyLoader()
    batches = [next(loader), next(loader)]
    big = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    tokens = int((big["targets"] != IGNORE_INDEX).sum())
    (objectives.token_loss_sum(model, big) / tokens).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    for (name, a), b in zip(accumulated.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)


def test_non_finite_loss_stops_before_the_weights_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = objectives.token_loss_sum

    def poisoned(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] > 5 else loss  # steps 1-2 fine (2 micro-batches each)

    monkeypatch.setattr(objectives, "token_loss_sum", poisoned)
    with pytest.raises(TrainingDiverged, match="nan at step 3.*step-000002"):
        run(tmp_path)
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert not (tmp_path / "step-000003").exists()


def test_full_disk_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = torch.save
    saves = {"n": 0}

    def save_until_full(obj, path, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] > 3:  # the first checkpoint (optimizer, scheduler, rng) fits, the second does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(train_state.torch, "save", save_until_full)
    with pytest.raises(CheckpointError, match="step 4.*No space left.*step-000002, is intact"):
        run(tmp_path)
    monkeypatch.setattr(train_state.torch, "save", real_save)
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert not list(tmp_path.glob(".step-*"))  # no half-written folder left behind
    model = tiny_gpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = load_training_checkpoint(
        tmp_path / "step-000002", model, opt, warmup_cosine(opt, TrainArgs()), {"model": "tiny"}
    )
    assert state["step"] == 2 and state["loader"] == {"position": 4}


def test_bad_batch_sizes_suggest_valid_ones() -> None:
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size 4; use 8 or 12"):
        TrainArgs(global_batch_size=10, micro_batch_size=4)


@pytest.mark.slow
def test_compiled_training_gives_the_eager_losses_and_weights(tmp_path: Path) -> None:
    eager, eager_metrics = run(tmp_path / "eager", steps=3)
    compiled, compiled_metrics = run(tmp_path / "compiled", steps=3, compile=True)
    assert compiled_metrics["loss"] == pytest.approx(eager_metrics["loss"], rel=1e-5)
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_activation_keeps_less_and_gives_autograds_gradients(name: str, dtype: torch.dtype) -> None:
    """The gated MLP's activate(gate) * up keeps gate and up for the backward, not activate(gate) too; its
    gradients are autograd's own, bit for bit."""
    g = torch.Generator().manual_seed(0)
    gate, up, weight = (torch.randn(3, 7, 16, generator=g, dtype=dtype) for _ in range(3))
    gate.requires_grad_(), up.requires_grad_()
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = GatedActivation.apply(gate, up, name)
    assert len(kept) == 2 and kept[0] is gate and kept[1] is up
    (out * weight).sum().backward()
    ours = gate.grad.clone(), up.grad.clone()
    gate.grad = up.grad = None
    (activate(gate, name) * up * weight).sum().backward()
    assert torch.equal(ours[0], gate.grad) and torch.equal(ours[1], up.grad)
