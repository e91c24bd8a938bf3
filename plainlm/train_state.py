"""Training checkpoints: everything a run needs to continue exactly, written atomically.

    out_dir/step-000100/
        model.safetensors     the trainable weights (all of them for full training, the adapters for LoRA)
        optimizer.pt          optimizer state     (tensors only: read back with weights_only=True)
        scheduler.pt          scheduler state
        rng.pt                torch (and CUDA) random state
        trainer_state.json    step, tokens seen, the data loader's position, what run this is
        recipe.yaml           the resolved recipe of the run

A checkpoint is written into a hidden temporary folder and renamed into place, so a crash or a
full disk mid-save never leaves a broken newest checkpoint: the previous one stays the newest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from plainlm.checkpoint import CheckpointError, save_tensors

STATE_FILE = "trainer_state.json"
RECIPE_FILE = "recipe.yaml"  # the resolved recipe of the run, copied next to every checkpoint


class ResumeError(RuntimeError):
    pass


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_training_checkpoint(
    out_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
) -> Path:
    """Write step-NNNNNN/ atomically; `state` (json) holds the loader position and the run identity."""
    final = out_dir / step_dir_name(step)
    partial = out_dir / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        save_tensors(trainable_tensors(model).items(), partial)
        torch.save(optimizer.state_dict(), partial / "optimizer.pt")
        torch.save(scheduler.state_dict(), partial / "scheduler.pt")
        torch.save(rng_state(), partial / "rng.pt")
        (partial / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
        if (out_dir / RECIPE_FILE).exists():
            shutil.copyfile(out_dir / RECIPE_FILE, partial / RECIPE_FILE)
        _fsync_dir_files(partial)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        previous = latest_checkpoint(out_dir)
        keep = f"the newest complete checkpoint, {previous}, is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not save the checkpoint of step {step} in {out_dir} ({e}); {keep}") from None
    if final.exists():  # the same step saved again after a resume: swap, never delete the good one first
        stale = out_dir / f".{final.name}.stale"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(partial, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(partial, final)
    return final


def _fsync_dir_files(directory: Path) -> None:
    for path in directory.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete step-NNNNNN/ folder, or None."""
    steps = sorted(p for p in out_dir.glob("step-*") if p.is_dir() and (p / STATE_FILE).exists())
    return steps[-1] if steps else None


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    steps = sorted(p for p in out_dir.glob("step-*") if p.is_dir() and (p / STATE_FILE).exists())
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_training_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    identity: dict[str, Any],
) -> dict[str, Any]:
    """Restore model weights, optimizer, scheduler and RNG from `path`; returns trainer_state.json.

    Refuses a checkpoint of another run: a different model, method or adapter shape.
    """
    state = json.loads((path / STATE_FILE).read_text())
    saved = state.get("identity", {})
    different = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v}
    if different:
        details = "; ".join(f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in different.items())
        raise ResumeError(f"{path} belongs to a different run ({details}). Use another out_dir, or resume false")
    weights = load_file(str(path / "model.safetensors"))
    params = dict(model.named_parameters())
    mismatch = sorted(set(weights) ^ {n for n, p in params.items() if p.requires_grad})
    if mismatch:
        raise ResumeError(f"{path}: its trainable weights do not match this model ({mismatch[:3]} ...)")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return state


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
