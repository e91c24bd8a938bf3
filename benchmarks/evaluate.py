"""lm-evaluation-harness wall time, side by side: plainlm's model (plainlm evaluate) against lm-eval's `hf` model.

    python benchmarks/evaluate.py [--threads 2] [--batch_size 16] [--rounds 2]

Both score the shipped local tasks (data/eval) on SmolLM2-135M-Instruct in fp32, in this one process, with the
same batch size and thread count: plainlm from the packaged GGUF file, lm-eval's hf model from the same weights
converted to a Hugging Face directory (`plainlm convert from-gguf` + `to-hf`, with transformers' own reading of
the file's tokenizer if plainlm wrote none). The workloads: plainlm_mc zero-shot and five-shot (144
four-choice log-likelihood requests each, the five-shot ones about 230 tokens long) and plainlm_ppl (34
documents' rolling log-likelihoods). Each backend runs each workload `--rounds` times, alternating, and the
fastest round counts. The answers must agree (log-likelihoods within 1e-4, greedy flags and every metric
identical) or the run says so. Prints a markdown table and the issue-14 target (>= 1.5x faster), met or not,
and writes benchmarks/results/evaluate-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
TASKS = REPO / "data" / "eval"
WORKLOADS = [("plainlm_mc", 0), ("plainlm_mc", 5), ("plainlm_ppl", None)]
TARGET = 1.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import lm_eval
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from plainlm.convert.gguf import convert_from_gguf
    from plainlm.convert.hf import convert_to_hf
    from plainlm.harness import PlainlmLM
    from plainlm.packaged_models import smollm2_gguf

    torch.set_num_threads(args.threads)
    gguf_file = smollm2_gguf()
    scratch = Path(tempfile.mkdtemp(prefix="plainlm-bench-evaluate-"))
    hf_dir = convert_to_hf(convert_from_gguf(gguf_file, scratch / "native"), scratch / "hf")
    if not (hf_dir / "tokenizer_config.json").exists():
        transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).save_pretrained(hf_dir)
    backends = {
        "lm-eval hf": HFLM(pretrained=str(hf_dir), batch_size=args.batch_size, device="cpu", dtype="float32"),
        "plainlm": PlainlmLM(gguf_file, batch_size=args.batch_size),
    }
    manager = TaskManager(include_path=str(TASKS))

    rows, disagreements = [], []
    for task, shots in WORKLOADS:
        best: dict[str, float] = {}
        runs: dict[str, dict] = {}
        for _ in range(args.rounds):
            for name, lm in backends.items():
                start = time.perf_counter()
                runs[name] = lm_eval.simple_evaluate(
                    model=lm, tasks=[task], num_fewshot=shots, task_manager=manager, log_samples=True
                )
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
        disagreements += compare(runs["lm-eval hf"], runs["plainlm"], task)
        requests = sum(len(s["resps"]) for s in runs["plainlm"]["samples"][task])
        metrics = {
            k: v for k, v in runs["plainlm"]["results"][task].items() if isinstance(v, float) and "stderr" not in k
        }
        rows.append(
            {
                "workload": task + (f", {shots}-shot" if shots else ""),
                "requests": requests,
                "lm-eval hf (s)": round(best["lm-eval hf"], 2),
                "plainlm (s)": round(best["plainlm"], 2),
                "speed-up": round(best["lm-eval hf"] / best["plainlm"], 2),
                "metrics": metrics,
            }
        )
        print(f"{rows[-1]['workload']}: hf {best['lm-eval hf']:.2f} s, plainlm {best['plainlm']:.2f} s", flush=True)

    print(
        f"\nSmolLM2-135M-Instruct fp32, {args.threads} threads, batch size {args.batch_size}, best of {args.rounds}\n"
    )
    print("| workload | requests | lm-eval hf (s) | plainlm (s) | speed-up |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['workload']} | {row['requests']} | {row['lm-eval hf (s)']} | {row['plainlm (s)']} | "
              f"{row['speed-up']}x |")  # fmt: skip
    total_hf = sum(r["lm-eval hf (s)"] for r in rows)
    total_ours = sum(r["plainlm (s)"] for r in rows)
    met = total_hf / total_ours >= TARGET and not disagreements
    print(f"\nall workloads: {total_hf:.2f} s against {total_ours:.2f} s, {total_hf / total_ours:.2f}x; "
          f"target >= {TARGET}x at identical numbers: {'met' if met else 'NOT met'}")  # fmt: skip
    for line in disagreements:
        print("disagreement:", line)
    results = BENCHMARKS / "results" / f"evaluate-{time.strftime('%Y%m%d-%H%M')}.json"
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps({"args": vars(args), "rows": rows, "disagreements": disagreements}, indent=2))
    print(f"wrote {results}")
    sys.exit(0 if not disagreements else 1)


def compare(expected: dict, got: dict, task: str) -> list[str]:
    """Where two runs' answers differ beyond 1e-4 in log-likelihood, or at all in a greedy flag or a metric."""
    found = []
    for want, have in zip(expected["samples"][task], got["samples"][task], strict=True):
        for want_answer, have_answer in zip(want["resps"], have["resps"], strict=True):
            want_value, have_value = want_answer[0], have_answer[0]
            if isinstance(want_value, float):
                want_value, have_value = (want_value, None), (have_value, None)
            if abs(want_value[0] - have_value[0]) > 1e-4 or want_value[1] != have_value[1]:
                found.append(f"{task} doc {want['doc_id']}: {want_value} against {have_value}")
    for metric, value in expected["results"][task].items():
        if not isinstance(value, float) or "stderr" in metric:
            continue
        if abs(got["results"][task][metric] - value) > 1e-5 * max(1.0, abs(value)):
            found.append(f"{task} {metric}: {value} against {got['results'][task][metric]}")
    return found


if __name__ == "__main__":
    main()
