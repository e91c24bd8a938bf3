"""Training checkpoints: everything a run needs to continue exactly, written atomically.

    out_dir/step-000100/
        model.safetensors     the trainable weights (all of them for full training, the adapters for LoRA)
        optimizer.pt          optimizer state, keyed by parameter name (read back with weights_only=True)
        scheduler.pt          scheduler state
        rng.pt                torch (and CUDA) random state (rng-rank1.pt ... for the other ranks)
        trainer_state.json    step, tokens seen, the data loader's position, what run this is
        recipe.yaml           the resolved recipe of the run

A run on several processes writes the weights and optimizer state with torch.distributed.checkpoint (DCP)
instead: `.metadata` plus one `__RANK_0.distcp` file per rank, each holding that rank's shards. Either
kind resumes on any number of processes: whole tensors are cut to this run's shards, DCP reshards.

A checkpoint is written into a hidden temporary folder and renamed into place once every rank has
finished, so a crash or a full disk mid-save never leaves a broken newest checkpoint: the previous
one stays the newest.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from plainlm.checkpoint import save_tensors
from plainlm.distributed import World, unwrap
from plainlm.errors import CheckpointError, InvalidInput, ResumeError

STATE_FILE = "trainer_state.json"
RECIPE_FILE = "recipe.yaml"  # the resolved recipe of the run, copied next to every checkpoint
DCP_METADATA = ".metadata"  # present when several processes wrote the weights (DCP)


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in unwrap(model).named_parameters() if p.requires_grad}


def trained_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The trainable weights and the optimizer state keyed by parameter name (not position), as this run
    holds them: whole tensors, or this rank's shards (DTensors) under FSDP."""
    weights, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    names = trainable_names(model)  # frozen quantized weights are buffers: not saved either
    return {k: v for k, v in weights.items() if k in names}, optimizer_state


def rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def save_training_checkpoint(
    out_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    world: World | None = None,
) -> Path:
    """Write step-NNNNNN/ atomically; `state` (json) holds the loader position and the run identity.

    Every rank calls this: each writes its shards and random state, rank 0 the rest and the rename.
    """
    world = world or World()
    final = out_dir / step_dir_name(step)
    partial = out_dir / f".{final.name}.partial"
    if world.is_main:
        shutil.rmtree(partial, ignore_errors=True)
    world.barrier()  # no rank writes into the folder before rank 0 has cleared it
    failure: Exception | None = None
    try:
        partial.mkdir(parents=True, exist_ok=True)
        weights, optimizer_state = trained_state(model, optimizer)
        if not world.grouped:  # one plain process: whole tensors, readable without torch.distributed
            save_tensors(weights.items(), partial)
            torch.save(optimizer_state, partial / "optimizer.pt")
        else:  # every rank writes its own shards: no rank ever holds the whole state
            dcp.save({"model": weights, "optimizer": optimizer_state}, checkpoint_id=partial)
        torch.save(rng_state(), partial / rng_file(world.rank))
        if world.is_main:
            torch.save(scheduler.state_dict(), partial / "scheduler.pt")
            (partial / STATE_FILE).write_text(json.dumps({"step": step, "world_size": world.size, **state}, indent=2))
            if (out_dir / RECIPE_FILE).exists():
                shutil.copyfile(out_dir / RECIPE_FILE, partial / RECIPE_FILE)
        _fsync_dir_files(partial)
    except (OSError, CheckpointException) as e:
        failure = e
    if not world.all_true(failure is None):  # one rank's failure stops every rank, with the same error
        if world.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        previous = latest_checkpoint(out_dir)
        keep = f"the newest complete checkpoint, {previous}, is intact" if previous else "no earlier checkpoint exists"
        reason = failure or "on another rank"
        raise CheckpointError(f"could not save the checkpoint of step {step} in {out_dir} ({reason}); {keep}") from None
    if world.is_main:
        _rename_into_place(partial, final)
    world.barrier()  # the checkpoint exists for every rank once this returns
    return final


def _rename_into_place(partial: Path, final: Path) -> None:
    if final.exists():  # the same step saved again after a resume: swap, never delete the good one first
        stale = final.parent / f".{final.name}.stale"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(partial, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(partial, final)


def _fsync_dir_files(directory: Path) -> None:
    for path in directory.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete step-NNNNNN/ folder, or None."""
    steps = sorted(p for p in out_dir.glob("step-*") if p.is_dir() and (p / STATE_FILE).exists())
    return steps[-1] if steps else None


# What a run writes into out_dir (token shards, a cache reused while the source is unchanged, are not a run).
REFERENCE_FILE = "reference_logps.safetensors"  # full-finetuning preference runs: objectives.reference_table
RUN_FILES = ("metrics.csv", "final", "loss.png", "tensorboard", RECIPE_FILE, REFERENCE_FILE)


def run_files(out_dir: Path) -> list[Path]:
    """What a run left in out_dir: step checkpoints (partial ones too), final/, metrics, plots, the recipe."""
    if not out_dir.is_dir():
        return []
    steps = sorted(out_dir.glob("step-*")) + sorted(out_dir.glob(".step-*"))
    return steps + [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]


def holds_run(out_dir: Path) -> bool:
    """Whether out_dir shows a run that trained: a checkpoint, final/ or metrics (a recipe alone is a failed start)."""
    return latest_checkpoint(out_dir) is not None or any((out_dir / n).exists() for n in ("final", "metrics.csv"))


def checkpoint_to_resume(out_dir: Path, resume: bool | str | Path, overwrite: bool) -> Path | None:
    """The checkpoint a run into out_dir continues from, or None for a fresh start; refuses to mix two runs.

    resume false: a fresh start, refused when out_dir already holds a run (unless overwrite).
    resume true: the newest checkpoint in out_dir, which must exist. resume auto: the newest checkpoint
    if there is one, else a fresh start. resume PATH: that step checkpoint. `overwrite` does not delete
    anything here: `clear_run` does, on one process.
    """
    if overwrite and resume is not False:
        raise InvalidInput("--overwrite true starts afresh and --resume continues: pass one of them")
    if isinstance(resume, str) and resume not in ("auto", "true", "false"):
        resume = Path(resume)
    if isinstance(resume, Path):
        if not (resume / STATE_FILE).exists():
            raise ResumeError(
                f"--resume {resume}: not a step checkpoint (no {STATE_FILE}); "
                f"name a step-NNNNNN folder, or use --resume auto"
            )
        return resume
    if resume in (True, "true", "auto"):
        checkpoint = latest_checkpoint(out_dir)
        if checkpoint is None and resume != "auto":
            raise ResumeError(
                f"--resume true: {out_dir} holds no checkpoint to resume; "
                "use --resume auto to start fresh when there is none"
            )
        return checkpoint
    if holds_run(out_dir) and not overwrite:
        found = ", ".join(p.name for p in run_files(out_dir)[:3])
        raise InvalidInput(
            f"--out_dir {out_dir} already holds a run ({found}); continue it with --resume true "
            "(or --resume auto), replace it with --overwrite true, or choose another --out_dir"
        )
    return None


def clear_run(out_dir: Path) -> None:
    """Delete what an earlier run wrote into out_dir (--overwrite true); anything else there stays."""
    for path in run_files(out_dir):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


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
    world: World | None = None,
) -> dict[str, Any]:
    """Restore model weights, optimizer, scheduler and RNG from `path`; returns trainer_state.json.

    Refuses a checkpoint of another run: a different model, method or adapter shape. Every rank calls this.
    """
    world = world or World()
    state = json.loads((path / STATE_FILE).read_text())
    saved = state.get("identity", {})
    different = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v}
    if different:
        details = "; ".join(f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in different.items())
        raise ResumeError(
            f"{path} belongs to a different run ({details}); use another --out_dir, or replace it with --overwrite true"
        )
    sharded = (path / DCP_METADATA).exists()
    mismatch = sorted(saved_weight_names(path, sharded) ^ trainable_names(model))
    if mismatch:
        raise ResumeError(f"{path}: its trainable weights do not match this model ({mismatch[:3]} ...)")
    if sharded:  # DCP reads every rank's shards into this run's layout, whatever the number of processes
        checkpoint = dict(zip(("model", "optimizer"), trained_state(model, optimizer), strict=True))
        dcp.load(checkpoint, storage_reader=SafeReader(path), planner=SafeLoadPlanner())
        weights, optimizer_state = checkpoint["model"], checkpoint["optimizer"]
    else:
        weights = load_file(str(path / "model.safetensors"))
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    # Whole tensors saved by one process are cut into this rank's shards as they load into an FSDP model.
    whole_into_shards = not sharded and world.strategy == "fsdp"
    options = StateDictOptions(full_state_dict=whole_into_shards, strict=False, ignore_frozen_params=True)
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state, options=options)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    own = path / rng_file(world.rank)  # resumed on more ranks than saved it: the others start from rank 0's
    set_rng_state(torch.load(own if own.exists() else path / rng_file(0), weights_only=True))
    return state


def saved_weight_names(path: Path, sharded: bool) -> set[str]:
    if sharded:
        names = SafeReader(path).read_metadata().state_dict_metadata
        return {k.removeprefix("model.") for k in names if k.startswith("model.")}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


# DCP reads its .metadata with pickle.load and every non-tensor value (the optimizer's lr, betas, ...) with
# torch.load(weights_only=False): a crafted checkpoint could run code on resume. These two check the same bytes
# with unpicklers that allow only data first, then let DCP read them.
DCP_METADATA_GLOBALS = {
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedReader, checkpoint: Path) -> None:
        super().__init__(file)
        self.checkpoint = checkpoint

    def find_class(self, module: str, name: str) -> Any:
        known = (module, name) in DCP_METADATA_GLOBALS or module == "torch.distributed.checkpoint.metadata"
        if not (known or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))):
            raise CheckpointError(
                f"{self.checkpoint}: .metadata refers to {module}.{name}, which DCP metadata "
                "never holds; refusing to read it (it could run code). Resume from a checkpoint you trust"
            )
        return super().find_class(module, name)


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader, refusing a .metadata that holds anything but DCP's own metadata classes."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.checkpoint_path = Path(path)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        with (self.checkpoint_path / DCP_METADATA).open("rb") as f:
            _MetadataUnpickler(f, self.checkpoint_path).load()
        return super().read_metadata(*args, **kwargs)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, reading non-tensor values only if torch's weights-only unpickler accepts them."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        data = value.read()
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"a checkpoint value holds more than data ({e}); refusing to read it") from None
        super().load_bytes(read_item, io.BytesIO(data))


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
