"""The local lm-eval tasks in data/eval: with the network off and from another working directory they load their
own data, every item is well formed (four choices and a valid answer; a non-empty target), each builds the request
type its metrics need, plainlm_qa builds two-shot prompts from its few-shot split, and one run of lm-eval's dummy
model over all three reports every metric as a finite number.
"""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Iterator

import pytest
from helpers import REPO

lm_eval = pytest.importorskip("lm_eval", reason="the local eval tasks are lm-eval tasks: pip install 'lm-eval[api]'")
from lm_eval.api.task import Task  # noqa: E402  (after the importorskip above)
from lm_eval.models.dummy import DummyLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

EVAL_DIR = REPO / "data" / "eval"
REQUEST_TYPES = {
    "plainlm_mc": "multiple_choice",
    "plainlm_ppl": "loglikelihood_rolling",
    "plainlm_qa": "generate_until",
}
DOC_COUNTS = {"plainlm_mc": 36, "plainlm_ppl": 34, "plainlm_qa": 32}
METRICS = {
    "plainlm_mc": ["acc", "acc_norm"],
    "plainlm_ppl": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
    "plainlm_qa": ["exact_match"],
}


@pytest.fixture(scope="module")
def offline_elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No network and a working directory outside the repo; fails at teardown if anything tried to go online.

    The two switches alone do not prove it: huggingface_hub and datasets read them once, at import, and conftest.py
    has imported them already. So name lookups and connects are refused as well, and each try is recorded.
    """
    tries: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        tries.append(repr(args[:2]))
        raise OSError("network is off in test_eval_tasks.py")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(socket, "getaddrinfo", refuse)
        patch.setattr(socket.socket, "connect", refuse)
        patch.chdir(tmp_path_factory.mktemp("elsewhere"))
        yield
    assert not tries, f"the eval tasks tried the network: {tries}"


@pytest.fixture(scope="module")
def tasks(offline_elsewhere: None) -> dict[str, Task]:
    manager = TaskManager(include_path=str(EVAL_DIR), include_defaults=False)
    return manager.load(["plainlm_local"])["tasks"]


def read_questions(name: str) -> set[str]:
    return {json.loads(line)["question"] for line in (EVAL_DIR / name).read_text().splitlines()}


def test_tag_loads_all_three_tasks_with_their_docs_and_request_types(tasks: dict[str, Task]) -> None:
    assert sorted(tasks) == sorted(REQUEST_TYPES)
    for name, task in tasks.items():
        assert REQUEST_TYPES[name] == task.OUTPUT_TYPE, name
        assert len(task.eval_docs) == DOC_COUNTS[name], name


def test_multiple_choice_docs_have_four_choices_and_a_valid_answer(tasks: dict[str, Task]) -> None:
    task = tasks["plainlm_mc"]
    for doc in task.eval_docs:
        choices = task.doc_to_choice(doc)
        assert len(choices) == 4 and len(set(choices)) == 4, doc
        assert task.doc_to_target(doc) in range(4), doc


def test_every_perplexity_and_generation_doc_has_a_target(tasks: dict[str, Task]) -> None:
    for name in ["plainlm_ppl", "plainlm_qa"]:
        for doc in tasks[name].eval_docs:
            assert tasks[name].doc_to_target(doc).strip(), (name, doc)


def test_requests_are_one_per_choice_paragraph_and_question(tasks: dict[str, Task]) -> None:
    for task in tasks.values():
        task.build_all_requests(limit=None, rank=0, world_size=1)
    assert len(tasks["plainlm_mc"].instances) == 4 * DOC_COUNTS["plainlm_mc"]
    assert [r.arguments for r in tasks["plainlm_ppl"].instances] == [
        (doc["text"],) for doc in tasks["plainlm_ppl"].eval_docs
    ]
    questions = tasks["plainlm_qa"].instances
    assert len(questions) == DOC_COUNTS["plainlm_qa"]
    context, generation = questions[0].arguments
    assert context == "Q: What is 2 plus 3?\nA:"
    assert generation["until"] == ["\n"] and generation["max_gen_toks"] == 16


def test_qa_two_shot_prompt_draws_its_examples_from_the_fewshot_split(tasks: dict[str, Task]) -> None:
    task = tasks["plainlm_qa"]
    task.set_fewshot_seed(1234)
    doc = task.eval_docs[0]
    prompt = task.fewshot_context(doc, num_fewshot=2)
    *examples, asked = prompt.split("\n\n")
    assert asked == f"Q: {doc['question']}\nA:"
    assert len(examples) == 2
    fewshot_questions = read_questions("plainlm_qa_fewshot.jsonl")
    for example in examples:
        question, answer = example.removeprefix("Q: ").split("\nA: ")
        assert question in fewshot_questions and answer, example
    assert not fewshot_questions & read_questions("plainlm_qa.jsonl")


def test_qa_exact_match_ignores_case_punctuation_and_surrounding_spaces(tasks: dict[str, Task]) -> None:
    task = tasks["plainlm_qa"]
    doc = next(doc for doc in task.eval_docs if doc["answer"] == "spring")
    assert task.process_results(doc, [" Spring."])["exact_match"] == 1.0
    assert task.process_results(doc, [" summer"])["exact_match"] == 0.0


def test_dummy_model_run_reports_every_metric_as_a_finite_number(offline_elsewhere: None) -> None:
    # lm-eval's CLI hands --model_args to the tasks as metadata, and so on to the data loader: it must ignore them.
    manager = TaskManager(include_path=str(EVAL_DIR), include_defaults=False, metadata={"pretrained": "some/model"})
    # lm-eval's dummy model answers every request with random numbers; its `tokenizer` would fetch a real one from
    # the hub when lm-eval adds tokenizer details to the results, so the instance goes without.
    model = DummyLM()
    model.tokenizer = None
    out = lm_eval.simple_evaluate(
        model=model, tasks=["plainlm_local"], task_manager=manager, limit=5, num_fewshot=2, bootstrap_iters=0
    )
    assert out["n-shot"] == {"plainlm_mc": 2, "plainlm_ppl": 0, "plainlm_qa": 2}
    for name, metrics in METRICS.items():
        results = out["results"][name]
        assert results["sample_len"] == 5
        for metric in metrics:
            assert math.isfinite(float(results[f"{metric},none"])), (name, metric, results)
