"""The memory planner against measured memory: predicted peak vs the peak RSS of real training runs.

    python benchmarks/memory.py [--steps 3] [--cases small]

Each case runs the real command (plainlm's `finetune|pretrain ...`) in a child process, which reports
its own peak resident memory as it exits (VmHWM, the kernel's high-water mark of its address space,
file-backed pages included); the prediction is `plainlm estimate` on the same arguments.
Pretraining uses the shipped stories and their 2k tokenizer; finetuning uses a random-weight
plainlm checkpoint of the case's shape, written once, and instruction records long enough that
every row is cut to data.max_seq_length (batches are then exactly micro_batch x max_seq_length).
Prints a markdown table (docs/memory.md holds one). tests/test_estimate.py runs some of the cases.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "tokenizers" / "stories-2k"
MiB = 1024**2

# Model shapes with the 2k vocabulary of the shipped tokenizer: 0.1M parameters (the process alone),
# 28M and 49M (weights and optimizer state 0.3 and 0.6 GiB, beside the process's ~0.37 GiB).
TINY = dict(name="tiny", n_layer=2, n_embd=32, n_head=4, n_kv_head=2, intermediate_size=64, block_size=512)
SMALL = dict(name="small", n_layer=8, n_embd=512, n_head=8, n_kv_head=8, intermediate_size=1536, block_size=512)
SMALL_GQA = dict(SMALL, name="small-gqa", n_layer=6, n_kv_head=2, intermediate_size=2048)
MEDIUM = dict(SMALL, name="medium", n_layer=14)  # 49M: weights + optimizer state 0.6 GiB


@dataclass
class Case:
    name: str
    kind: str  # finetune or pretrain
    model: dict
    micro_batch: int
    seq: int
    args: list[str] = field(default_factory=list)  # more recipe overrides


CASES = [
    Case("pretrain tiny (the process)", "pretrain", TINY, 4, 128),
    Case("pretrain 28M, 4 x 128", "pretrain", SMALL, 4, 128),
    Case("pretrain 28M, 16 x 256", "pretrain", SMALL, 16, 256),
    Case(
        "pretrain 28M, 16 x 256, checkpointing",
        "pretrain",
        SMALL,
        16,
        256,
        ["--train.activation_checkpointing", "true"],
    ),
    Case("finetune tiny (the process)", "finetune", TINY, 4, 128, ["--method", "full"]),
    Case("finetune full 28M, 4 x 128", "finetune", SMALL, 4, 128, ["--method", "full"]),
    Case("finetune full 49M, 4 x 128", "finetune", MEDIUM, 4, 128, ["--method", "full"]),
    Case("finetune lora 28M, 8 x 256", "finetune", SMALL, 8, 256, ["--method", "lora"]),
    Case(
        "finetune lora 28M, 8 x 256, checkpointing",
        "finetune",
        SMALL,
        8,
        256,
        ["--method", "lora", "--train.activation_checkpointing", "true"],
    ),
    Case("finetune full 31M GQA, 8 x 256", "finetune", SMALL_GQA, 8, 256, ["--method", "full"]),
]


def make_checkpoint(directory: Path, model: dict) -> Path:
    """A plainlm checkpoint of random weights with the stories-2k tokenizer (a base model: alpaca prompts)."""
    import torch

    from plainlm.checkpoint import save_checkpoint
    from plainlm.config import Config
    from plainlm.model import GPT

    if (directory / "config.yaml").exists():
        return directory
    torch.manual_seed(0)
    config = Config(**{"vocab_size": 2048, "tie_embeddings": True, **model})
    save_checkpoint(GPT(config), directory, tokenizer_dir=TOKENIZER)
    return directory


def make_sft_data(path: Path, records: int = 64, words: int = 400) -> Path:
    """Instruction records of about `words` words each: longer than any max_seq_length used here."""
    text = " ".join(["once upon a time there was a little fox who lived in the woods"] * (words // 13 + 1))
    path.write_text(
        "".join(json.dumps({"instruction": "Tell a story.", "output": text}) + "\n" for _ in range(records))
    )
    return path


def command(case: Case, work: Path, steps: int) -> list[str]:
    """The arguments after `plainlm`, shared by the run and by `plainlm estimate`."""
    common = [
        "--train.micro_batch_size",
        str(case.micro_batch),
        "--train.global_batch_size",
        str(case.micro_batch),
        "--train.max_steps",
        str(steps),
        "--train.eval_max_batches",
        "1",
        "--train.save_interval",
        str(steps),
        "--train.sample_prompt",
        "null",
        "--train.tensorboard",
        "false",
        "--train.peak_flops",
        "1e11",
        "--train.precision",
        "32-true",
        "--device",
        "cpu",
        "--out_dir",
        str(work / "out"),
    ]
    if case.kind == "pretrain":
        return [
            "pretrain",
            "--config",
            str(REPO / "recipes" / "pretrain" / "tiny-stories.yaml"),
            "--model_config",
            json.dumps({**case.model, "tie_embeddings": True}),
            "--data.seq_length",
            str(case.seq),
            "--data.workers",
            "1",
            "--data.shards_dir",
            str(work.parent / "tokens"),
            *common,
            *case.args,
        ]
    checkpoint = make_checkpoint(work.parent / f"checkpoint-{case.model['name']}", case.model)
    data = make_sft_data(work.parent / "records.jsonl")
    return [
        "finetune",
        "--config",
        str(REPO / "recipes" / "finetune" / "smollm2-135m-instruct" / "lora.yaml"),
        "--checkpoint_dir",
        str(checkpoint),
        "--data.path",
        str(data),
        "--data.val_path",
        str(data),
        "--data.prompt_style",
        "alpaca",
        "--data.max_seq_length",
        str(case.seq),
        *common,
        *case.args,
    ]


def measured_peak(args: list[str], timeout: float = 600) -> int:
    """Peak RSS in bytes of `plainlm ARGS` in a child process, as the child measures it, or an error with its output.

    Not ru_maxrss from os.wait4: Linux carries the parent's resident size at the fork across the exec into the
    child's mark, so a child of a large process (a pytest worker that has loaded a model) reads as large."""
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "output", "w+b") as output:
        peak_file = Path(tmp) / "peak"
        process = subprocess.run(
            [sys.executable, __file__, "--report-peak", str(peak_file), *args],
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
        if process.returncode != 0 or not peak_file.is_file():
            output.seek(0)
            raise RuntimeError(f"plainlm {' '.join(args)} failed:\n{output.read().decode()[-3000:]}")
        return int(peak_file.read_text())


def run_cli_reporting_peak(peak_file: str, args: list[str]) -> None:
    """`plainlm ARGS` in this process; at exit, this process's peak resident bytes (VmHWM) go to `peak_file`."""
    import atexit
    import runpy

    def report() -> None:
        with open("/proc/self/status") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        Path(peak_file).write_text(str(kib * 1024))

    atexit.register(report)
    sys.argv = ["plainlm", *args]
    runpy.run_module("plainlm.cli", run_name="__main__", alter_sys=True)


def predicted_peak(args: list[str]) -> int:
    from plainlm.estimate import estimate_command_result

    return estimate_command_result(args[1:]).peak


def run(cases: list[Case], steps: int, work: Path) -> list[tuple[Case, int, int]]:
    rows = []
    for i, case in enumerate(cases):
        case_dir = work / f"case-{i}"
        args = command(case, case_dir, steps)
        measured = measured_peak(args)
        shutil.rmtree(case_dir, ignore_errors=True)
        rows.append((case, predicted_peak(args), measured))
        print(f"{case.name}: predicted {rows[-1][1] / MiB:.0f} MiB, measured {measured / MiB:.0f} MiB", file=sys.stderr)
    return rows


def markdown(rows: list[tuple[Case, int, int]]) -> str:
    lines = [
        "| run | predicted peak | measured peak RSS | error |",
        "|---|---:|---:|---:|",
    ]
    for case, predicted, measured in rows:
        error = (predicted - measured) / measured
        lines.append(f"| {case.name} | {predicted / MiB:.0f} MiB | {measured / MiB:.0f} MiB | {error:+.1%} |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--report-peak"]:  # measured_peak's child
        return run_cli_reporting_peak(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="plainlm-memory-") as work:
        print(markdown(run(CASES, args.steps, Path(work))))


if __name__ == "__main__":
    main()
