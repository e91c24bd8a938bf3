"""Distributed (DCP) training checkpoints are read without unpickling anything but data."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from plainlm.errors import CheckpointError
from plainlm.train_state import SafeLoadPlanner, SafeReader


class RunsCode:
    """Unpickling this runs a shell command: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def save_small_checkpoint(directory: Path) -> dict:
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "optimizer": {"lr": 0.5, "betas": (0.9, 0.95)}}
    dcp.save(state, checkpoint_id=directory)
    return state


def test_a_dcp_checkpoint_loads_through_the_safe_reader(tmp_path: Path) -> None:
    saved = save_small_checkpoint(tmp_path / "ckpt")
    target = {"model": {"w": torch.zeros(2, 3)}, "optimizer": {"lr": 0.0, "betas": (0.0, 0.0)}}
    dcp.load(target, storage_reader=SafeReader(tmp_path / "ckpt"), planner=SafeLoadPlanner())
    assert torch.equal(target["model"]["w"], saved["model"]["w"])
    assert target["optimizer"] == {"lr": 0.5, "betas": (0.9, 0.95)}


def test_a_crafted_dcp_metadata_is_refused_without_running_it(tmp_path: Path) -> None:
    save_small_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "ran"
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(CheckpointError, match=r"posix\.system|os\.system"):
        SafeReader(tmp_path / "ckpt").read_metadata()
    assert not marker.exists()


def test_a_crafted_non_tensor_value_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    planner = SafeLoadPlanner()
    with pytest.raises(CheckpointError, match="more than data"):
        planner.load_bytes(None, io.BytesIO(pickle.dumps(RunsCode(marker))))
    assert not marker.exists()
