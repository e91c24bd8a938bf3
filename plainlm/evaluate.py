"""`plainlm evaluate`: lm-evaluation-harness tasks on a plainlm model, or the perplexity of text files.

    plainlm evaluate out/final --tasks plainlm_mc,plainlm_qa --include_path data/eval --out_dir out/eval
    plainlm evaluate model.gguf --tasks hellaswag --limit 200 --quantize int8
    plainlm evaluate model.gguf --perplexity notes.txt --stride 256

The tasks run through harness.PlainlmLM, lm-eval's model interface over plainlm's own model, so whatever
LLM.load reads (a checkpoint, a Hugging Face directory, a GGUF file, a finetune run's directory) is evaluated
as it loads, quantized too. Prints lm-eval's results table; with --out_dir, writes results.json (lm-eval's
results, as its own command writes them), results.md (the table) and, with --log_samples, samples_<task>.jsonl.
--perplexity scores files without lm-eval's tasks (perplexity.py). A finetune recipe's `eval:` section
(EvalArgs) runs the same on the run's final/ when it ends.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from plainlm.errors import InvalidInput, MissingInput


@dataclass
class EvalArgs:
    """lm-eval tasks to run on final/ when a finetune ends: the `eval:` section of a finetune recipe.

    Args:
        tasks: Comma-separated task, group or tag names (none: no evaluation), e.g. plainlm_local.
        include_path: A folder of task YAML files to add to lm-eval's, e.g. data/eval.
        num_fewshot: Examples put before each question (default: each task's own).
        limit: Only the first N documents of each task; a number below 1 is a fraction of them.
        batch_size: Requests a forward pass scores: a whole number, or auto.
    """

    tasks: str | None = None
    include_path: Path | None = None
    num_fewshot: int | None = None
    limit: float | None = None
    batch_size: str = "auto"


def evaluate_after_training(final: Path, args: EvalArgs, out_dir: Path) -> None:
    """The finetune's `eval:` tasks on its final/ checkpoint; the table goes to out_dir/eval/ beside loss.png."""
    print(f"evaluating {final} on {args.tasks}")
    evaluate(final, args.tasks, args.num_fewshot, args.limit, args.batch_size, args.include_path, out_dir / "eval")


def evaluate(
    model: Path,
    tasks: str | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: str = "auto",
    include_path: Path | None = None,
    out_dir: Path | None = None,
    log_samples: bool = False,
    seed: int | None = None,
    perplexity: Path | None = None,
    stride: int | None = None,
    max_length: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
) -> dict[str, Any]:
    """Evaluate a model on lm-evaluation-harness tasks (or the perplexity of a file); prints the results table.

    Args:
        model: A plainlm checkpoint, a Hugging Face model directory, a .gguf file, or a finetune run's
            out_dir (its final/).
        tasks: Comma-separated task, group or tag names: lm-eval's own (hellaswag, arc_easy, mmlu, ... when
            their datasets are reachable) or those under --include_path.
        num_fewshot: Examples put before each question (default: each task's own).
        limit: Only the first N documents of each task; a number below 1 is a fraction of them.
        batch_size: Requests a forward pass scores: a whole number, or auto (as many as 4,096 tokens hold).
        include_path: A folder of task YAML files to add to lm-eval's, e.g. data/eval.
        out_dir: Where results.json, results.md (the table) and the samples go.
        log_samples: Also write each document's requests and answers, samples_<task>.jsonl in --out_dir.
        seed: One seed for lm-eval's random, numpy, torch and few-shot sampling (default: lm-eval's 0 and 1234s).
        perplexity: Score this .txt file (one document) or .jsonl file (each line's "text") instead of tasks.
        stride: With --perplexity: tokens a window advances (default: the context, disjoint windows).
        max_length: The context in tokens (default: the model's).
        device: cpu, cuda, cuda:1, ... (default: cuda when available).
        dtype: float32, bfloat16 or float16 (default: float32 on the CPU, bfloat16 on a GPU).
        quantize: Quantize the weights as they load: int8 or int4 (CPU kernels), nf4 or fp4 (bitsandbytes).
    """
    if (tasks is None) == (perplexity is None):
        raise InvalidInput("give --tasks (lm-eval tasks) or --perplexity FILE (a text file to score), one of them")
    if limit is not None and limit <= 0:
        raise InvalidInput(f"--limit {limit:g}: give a number of documents (1 or more) or a fraction in (0, 1)")
    if log_samples and out_dir is None:
        raise InvalidInput("--log_samples writes samples_<task>.jsonl into --out_dir: give --out_dir too")
    names = [name.strip() for name in (tasks or "").split(",") if name.strip()]
    if tasks is not None and not names:
        raise InvalidInput(f"--tasks {tasks!r} names no task; e.g. --tasks plainlm_mc --include_path data/eval")
    manager = _task_manager(include_path, names) if tasks is not None else None

    from plainlm.api import LLM
    from plainlm.harness import resolve_checkpoint

    llm = LLM.load(resolve_checkpoint(model), device=device, dtype=dtype, quantize=quantize)
    if perplexity is not None:
        from plainlm.perplexity import perplexity as score_file

        batch = None if batch_size == "auto" else _whole_batch(batch_size)
        result = score_file(llm, perplexity, stride=stride, max_length=max_length, batch_size=batch)
        print(result.summary())
        report = {"perplexity": {"file": str(perplexity), **vars(result)}}
    else:
        report = _run_tasks(llm, manager, names, num_fewshot, limit, batch_size, max_length, log_samples, seed)
    if out_dir is not None:
        write_report(report, Path(out_dir))
    return report


def _whole_batch(batch_size: str) -> int:
    if not batch_size.isdigit() or int(batch_size) < 1:
        raise InvalidInput(f"--batch_size {batch_size}: give a whole number of at least 1, or auto")
    return int(batch_size)


def _task_manager(include_path: Path | None, names: list[str]) -> Any:
    """lm-eval's TaskManager over its tasks and include_path's, once every name is known and every YAML file
    under include_path parses (lm-eval would skip a broken one and then call its task unknown)."""
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise MissingInput(f"--include_path {include_path}: no such folder of task YAML files")
        for path in sorted(Path(include_path).rglob("*.yaml")):
            check_task_yaml(path)
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise MissingInput("--tasks runs lm-evaluation-harness: pip install 'plainlm[eval]' (or lm-eval)") from e

    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    for name in names:
        if not manager.match_tasks([name]):
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else ""
            where = "" if include_path is not None else " (local tasks need --include_path, e.g. data/eval)"
            raise InvalidInput(f"--tasks: no task, group or tag named {name!r}{hint}{where}")
    return manager


class _TaskYamlLoader(yaml.SafeLoader):
    """YAML as lm-eval writes tasks: its tags (!function module.name) read as plain text, for the syntax check."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node))


def check_task_yaml(path: Path) -> None:
    """A task file that does not parse fails here with its file and line."""
    try:
        yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise InvalidInput(f"{where}: the task file is not valid YAML ({problem})") from e


def _run_tasks(
    llm: Any,
    manager: Any,
    names: list[str],
    num_fewshot: int | None,
    limit: float | None,
    batch_size: str,
    max_length: int | None,
    log_samples: bool,
    seed: int | None,
) -> dict[str, Any]:
    import lm_eval
    from lm_eval.utils import make_table

    from plainlm.harness import PlainlmLM

    lm = PlainlmLM(llm, batch_size=batch_size, max_length=max_length)
    seeds = {} if seed is None else dict.fromkeys(("random", "numpy_random", "torch_random", "fewshot_random"), seed)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=num_fewshot,
        limit=int(limit) if limit is not None and limit >= 1 else limit,
        task_manager=manager,
        log_samples=log_samples,
        **{f"{name}_seed": value for name, value in seeds.items()},
    )
    table = make_table(results) + (make_table(results, "groups") if results.get("groups") else "")
    print(table)
    if lm.truncated:
        print(f"{lm.truncated} request(s) were longer than the context of {lm.max_length} tokens and were cut on the "
              "left, as lm-eval's hf model cuts them")  # fmt: skip
    results["plainlm"] = {"model": llm.name, "truncated_requests": lm.truncated, "table": table}
    return results


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """results.json (everything but the samples), and samples_<task>.jsonl for each task's samples."""
    from lm_eval.utils import handle_non_serializable

    from plainlm.checkpoint import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    samples = report.get("samples") or {}
    summary = {key: value for key, value in report.items() if key != "samples"}
    text = json.dumps(summary, indent=2, default=handle_non_serializable, ensure_ascii=False)
    atomic_write_text(out_dir / "results.json", text)
    if "table" in report.get("plainlm", {}):
        atomic_write_text(out_dir / "results.md", report["plainlm"]["table"])
    for task, task_samples in samples.items():
        lines = "".join(json.dumps(s, default=handle_non_serializable, ensure_ascii=False) + "\n" for s in task_samples)
        atomic_write_text(out_dir / f"samples_{task}.jsonl", lines)
    print(f"wrote {out_dir / 'results.json'}")
