"""benchmarks/gpu_check.py, the one prepared GPU check, kept from rotting between GPU loans: its --tiny mode runs
every section on tiny shapes on the CPU (the same code, with the GPU's kernels left to the run on a GPU), and
without CUDA its default says so in one line and exits 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_every_section_runs_on_tiny_shapes_and_every_claim_holds(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--device", "cpu", "--tiny", "--budget", "900"],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = {s["name"]: s for s in report["sections"]}
    assert list(sections) == ["device", "correctness", "sdpa", "fsdp", "inference", "training"]
    failed = {name: s["error"][-1500:] for name, s in sections.items() if s["status"] != "ok"}
    assert not failed, failed
    rows = [row for s in report["sections"] for row in s["rows"]]
    assert [row["check"] for row in rows if row["ok"] is False] == [], done.stderr[-3000:]
    assert not [row for row in rows if row["result"].startswith("skipped")]
    checks = " ".join(row["check"] for row in rows)
    for claim in ("fp32 logits", "bf16 logits", "KV-cache", "DoRA", "SDPA", "resume", "int4", "serve engine"):
        assert claim in checks
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| ") == len(rows) + len(sections) + 1  # a line a check, a time a section, the header


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA runs the check itself")
def test_without_cuda_it_says_so_and_exits_0(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0 and done.stdout.strip().splitlines() == [
        "gpu_check: no CUDA device here; nothing to check (--device cpu --tiny runs the CPU version)"
    ]
