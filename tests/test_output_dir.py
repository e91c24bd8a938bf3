"""A training run's out_dir: never two runs mixed in one folder, --resume true/auto/PATH, --overwrite,
no folder left behind by a start that fails, and process counts that cannot run refused up front."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from helpers import REPO, run_cli

from plainlm.errors import InvalidInput, ResumeError
from plainlm.train_state import STATE_FILE, checkpoint_to_resume, clear_run

TINY_PRETRAIN = [
    "pretrain",
    "--config",
    str(REPO / "recipes" / "pretrain" / "tiny-stories.yaml"),
    "--model_config",
    '{"name": "t", "n_layer": 1, "n_embd": 32, "n_head": 4, "intermediate_size": 64, "block_size": 64}',
    "--data.seq_length",
    "32",
    "--data.workers",
    "1",
    "--train.global_batch_size",
    "2",
    "--train.micro_batch_size",
    "2",
    "--train.eval_interval",
    "100",
    "--train.eval_max_batches",
    "1",
    "--train.save_interval",
    "2",
    "--train.tensorboard",
    "false",
    "--train.peak_flops",
    "1e11",
    "--train.log_interval",
    "1",
]


def fake_run(out_dir: Path, steps: tuple[int, ...]) -> None:
    """What a run leaves behind, as far as choosing where to start is concerned."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.csv").write_text("step,loss\n")
    for step in steps:
        (out_dir / f"step-{step:06d}").mkdir()
        (out_dir / f"step-{step:06d}" / STATE_FILE).write_text("{}")


def test_a_folder_with_a_run_is_refused_without_resume_or_overwrite(tmp_path: Path) -> None:
    fake_run(tmp_path, (2, 4))
    with pytest.raises(InvalidInput, match="already holds a run") as caught:
        checkpoint_to_resume(tmp_path, False, overwrite=False)
    message = str(caught.value)
    assert "--resume true" in message and "--overwrite true" in message and "\n" not in message
    assert checkpoint_to_resume(tmp_path, False, overwrite=True) is None  # a fresh start, once cleared
    with pytest.raises(InvalidInput, match="pass one of them"):
        checkpoint_to_resume(tmp_path, True, overwrite=True)


def test_resume_true_auto_and_path(tmp_path: Path) -> None:
    fake_run(tmp_path / "run", (2, 4))
    assert checkpoint_to_resume(tmp_path / "run", True, overwrite=False) == tmp_path / "run" / "step-000004"
    assert checkpoint_to_resume(tmp_path / "run", "auto", overwrite=False) == tmp_path / "run" / "step-000004"
    older = tmp_path / "run" / "step-000002"
    assert checkpoint_to_resume(tmp_path / "run", older, overwrite=False) == older
    assert checkpoint_to_resume(tmp_path / "new", "auto", overwrite=False) is None
    assert checkpoint_to_resume(tmp_path / "new", False, overwrite=False) is None
    with pytest.raises(ResumeError, match="--resume true: .* holds no checkpoint"):
        checkpoint_to_resume(tmp_path / "new", True, overwrite=False)
    with pytest.raises(ResumeError, match="not a step checkpoint"):
        checkpoint_to_resume(tmp_path / "run", tmp_path / "run", overwrite=False)


def test_overwrite_clears_only_what_a_run_wrote(tmp_path: Path) -> None:
    fake_run(tmp_path, (2,))
    (tmp_path / "final").mkdir()
    (tmp_path / "tokens").mkdir()  # token shards: a cache reused while the source is unchanged
    (tmp_path / "notes.txt").write_text("mine")
    clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "tokens"]


def steps_logged(out_dir: Path) -> list[int]:
    with (out_dir / "metrics.csv").open() as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


@pytest.mark.slow  # a fresh process per run: `make test` runs it, `make test-fast` does not
def test_rerun_resume_and_overwrite_through_the_command(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [*TINY_PRETRAIN, "--out_dir", str(out), "--data.shards_dir", str(tmp_path / "tokens")]
    first = run_cli(*args, "--train.max_steps", "2", "--resume", "auto")  # nothing to resume: starts fresh
    assert first.returncode == 0, first.stderr[-2000:]
    assert "Resumed" not in first.stdout and steps_logged(out) == [1, 2]

    again = run_cli(*args, "--train.max_steps", "2")
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr[-2000:]
    assert again.stderr.startswith("error: --out_dir") and "--resume" in again.stderr and "--overwrite" in again.stderr

    resumed = run_cli(*args, "--train.max_steps", "4", "--resume", str(out / "step-000002"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resumed from {out / 'step-000002'} at step 2" in resumed.stdout and steps_logged(out) == [1, 2, 3, 4]

    replaced = run_cli(*args, "--train.max_steps", "2", "--overwrite", "true")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert steps_logged(out) == [1, 2] and not (out / "step-000004").exists()


@pytest.mark.slow  # a fresh process per run: `make test` runs it, `make test-fast` does not
def test_a_failed_start_leaves_no_folder(tmp_path: Path) -> None:
    empty = tmp_path / "no-text"
    empty.mkdir()
    out = tmp_path / "run"
    # The token shards would go into out_dir: the start fails after creating it.
    failed = run_cli(*TINY_PRETRAIN, "--out_dir", str(out), "--data.source", str(empty), "--train.max_steps", "2")
    assert failed.returncode == 2 and failed.stderr.startswith("error:"), failed.stderr[-2000:]
    assert not out.exists()
    nothing = run_cli(*TINY_PRETRAIN, "--out_dir", str(out), "--resume", "true")
    assert nothing.returncode == 2 and "holds no checkpoint" in nothing.stderr and not out.exists()


@pytest.mark.slow  # a fresh process per run: `make test` runs it, `make test-fast` does not
@pytest.mark.parametrize("devices", ["0", "-1"])
def test_devices_below_one_is_one_error_line(tmp_path: Path, devices: str) -> None:
    finetune_recipe = REPO / "recipes" / "finetune" / "smollm2-135m-instruct" / "lora.yaml"
    commands = {
        "finetune": ["finetune", "--config", str(finetune_recipe), "--out_dir", str(tmp_path / "f")],
        "pretrain": [*TINY_PRETRAIN, "--out_dir", str(tmp_path / "p")],
        "estimate": ["estimate", "--config", str(finetune_recipe)],
    }
    for name, args in commands.items():
        result = run_cli(*args, "--devices", devices)
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert result.stderr == f"error: --devices {devices}: must be 1 or more " + (
            "(--devices: processes per machine, one per GPU)\n"
        ), name
    assert not (tmp_path / "f").exists() and not (tmp_path / "p").exists()
