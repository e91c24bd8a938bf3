"""plainlm evaluate: plainlm's lm-eval model (harness.PlainlmLM) against lm-eval's own Hugging Face backend
(`hf`, HFLM) on the same weights, and the command around it.

Equivalence, on tiny random models of two families (Llama with a tokenizer that adds no BOS; Gemma 2, softcaps
and sliding windows, with one that does): per-request log-likelihoods within 1e-4 and identical greedy flags
(contexts empty, ending in a space, longer than the context), whole-document rolling log-likelihoods within
1e-4, identical greedy generations. The command: results.json, the perplexity of files against a plain
forward pass, and each kind of bad input as one clear error.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from helpers import REPO, run_cli, tiny_hf_model
from helpers_tokenizers import make_bpe_tokenizer

lm_eval = pytest.importorskip("lm_eval", reason="plainlm evaluate runs lm-evaluation-harness: pip install lm-eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from plainlm import scoring  # noqa: E402
from plainlm.api import LLM  # noqa: E402
from plainlm.convert.gguf import convert_from_gguf  # noqa: E402
from plainlm.convert.hf import convert_to_hf  # noqa: E402
from plainlm.errors import InvalidInput, PackagedModelMissing  # noqa: E402
from plainlm.harness import PlainlmLM  # noqa: E402
from plainlm.packaged_models import gemma3_gguf, smollm2_gguf  # noqa: E402
from plainlm.perplexity import perplexity, windows  # noqa: E402

CONTEXT = 96  # max_position_embeddings of the tiny models: short, so that long requests get cut
LOGLIKELIHOOD_ATOL = 1e-4
BASE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {
    "llama": ("LlamaConfig", dict(BASE, num_hidden_layers=2, tie_word_embeddings=True), False),
    "gemma2": (
        "Gemma2Config",
        dict(BASE, num_hidden_layers=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
             attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
        True,  # its tokenizer adds a BOS, as Gemma's does
    ),
}  # fmt: skip
STORY = "Once upon a time, in a small village by the sea, the fishermen went out. What happened next?"
PAIRS = [
    ("The quick brown fox", " jumps over the lazy dog"),
    ("The quick brown fox", " sleeps"),
    ("Question: what is two plus two?\nAnswer:", " four"),
    ("Question: what is two plus two?\nAnswer:", " five"),
    ("A context that ends in a space ", "and a continuation"),
    ("", "A whole text with no context at all"),
    ("the river and the mill " * 30, " and the wheel"),  # longer than CONTEXT: cut on the left, as HFLM cuts it
    *((STORY, choice) for choice in (" nothing at all", " a storm", " the fishermen came home early")),
]
DOCUMENTS = ["One short document about a garden.", "A longer one about the river and the mill. " * 25]


def make_model_dir(directory: Path, family: str) -> Path:
    config_class, fields, bos = FAMILIES[family]
    make_bpe_tokenizer(directory, bos_via_post_processor=bos)
    vocab = len(json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]) + 16
    config = getattr(transformers, config_class)(vocab_size=vocab, max_position_embeddings=CONTEXT, **fields)
    tiny_hf_model(config, seed=3, std=0.2).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=list(FAMILIES))
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def both(model_dir: Path) -> tuple[HFLM, PlainlmLM]:
    """lm-eval's hf model and plainlm's over the same directory, fp32 on the CPU."""
    reference = HFLM(pretrained=str(model_dir), batch_size=3, device="cpu", dtype="float32")
    return reference, PlainlmLM(str(model_dir), batch_size="auto")


def instances(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


def test_loglikelihoods_equal_lm_evals_hf_backend(both: tuple[HFLM, PlainlmLM]) -> None:
    reference, ours = both
    expected, got = (
        reference.loglikelihood(instances("loglikelihood", PAIRS)),
        ours.loglikelihood(instances("loglikelihood", PAIRS)),
    )
    for (want, want_greedy), (have, have_greedy) in zip(expected, got, strict=True):
        assert have == pytest.approx(want, abs=LOGLIKELIHOOD_ATOL)
        assert have_greedy == want_greedy
    assert ours.truncated == 1  # the long pair, counted for the report


def test_batch_sizes_and_packing_change_nothing(both: tuple[HFLM, PlainlmLM], monkeypatch: pytest.MonkeyPatch) -> None:
    """One request a pass, three, or packed passes (shared contexts once, several requests a row, small passes
    or large): the same numbers."""
    _, ours = both
    answers = []
    for batch_size, slots in ((1, None), (3, None), ("auto", 40), ("auto", scoring.AUTO_TOKENS_PER_FORWARD)):
        if slots is not None:
            monkeypatch.setattr(scoring, "AUTO_TOKENS_PER_FORWARD", slots)
        answers.append(PlainlmLM(ours.llm, batch_size=batch_size).loglikelihood(instances("loglikelihood", PAIRS)))
    for one, *others in zip(*answers, strict=True):
        for other in others:
            assert other[0] == pytest.approx(one[0], abs=1e-5) and other[1] == one[1]


def test_packing_shares_contexts_and_fills_rows() -> None:
    """Choices behind one context share it in one segment, unless their branches would outgrow it; a pass's
    rows are as wide as its longest segment, and shorter segments fill them first fit."""
    rows = [scoring._row(i, [1, 2, 3, 4, 5, 6], [7 + i], 64) for i in range(4)]  # prefix 1..5, inputs [6]
    rows += [scoring._row(4 + i, [9, 9], [8, 8 + i], 64) for i in range(2)]  # prefix (9,), inputs [9, 8]
    by_prefix: dict[tuple[int, ...], list] = {}
    for row in rows:
        by_prefix.setdefault(row.prefix, []).append(row)
    segments = [s for prefix, members in by_prefix.items() for s in scoring._segments(prefix, members, None, None)]
    assert [(len(s.prefix), len(s.branches)) for s in segments] == [(5, 4), (1, 1), (1, 1)]
    (only_pass,) = scoring._passes(sorted(segments, key=len, reverse=True), None)
    assert [[len(s) for s in row] for row in only_pass] == [[9], [3, 3]]
    assert [len(p) for p in scoring._passes(segments, 2)] == [1, 2]  # two requests a pass at most: 4, then 1 + 1
    window = scoring._segments(segments[0].prefix, segments[0].branches, None, 7)  # a sliding window of 7 slots
    assert [len(s.branches) for s in window] == [2, 2]


def test_rolling_loglikelihoods_equal_lm_evals_hf_backend(both: tuple[HFLM, PlainlmLM]) -> None:
    reference, ours = both
    requests = [(d,) for d in DOCUMENTS]  # the second spans several windows of the context
    expected = reference.loglikelihood_rolling(instances("loglikelihood_rolling", requests))
    got = ours.loglikelihood_rolling(instances("loglikelihood_rolling", requests))
    assert got == pytest.approx(expected, abs=LOGLIKELIHOOD_ATOL)


def test_greedy_generations_equal_lm_evals_hf_backend(both: tuple[HFLM, PlainlmLM]) -> None:
    reference, ours = both
    requests = [
        ("The quick brown", {"until": ["\n", "."], "max_gen_toks": 12, "do_sample": False}),
        ("Once upon a time", {"until": ["mill"], "max_gen_toks": 20}),
        ("the river " * 40, {"until": [], "max_gen_toks": 6}),  # cut on the left to CONTEXT - max_gen_toks
    ]
    expected = [reference.generate_until(instances("generate_until", [r]))[0] for r in requests]  # one at a time
    assert ours.generate_until(instances("generate_until", requests)) == expected


# --- the shipped tasks (data/eval), whole ---
SHIPPED = REPO / "data" / "eval"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def assert_same_answers(expected: dict, got: dict, tasks: tuple[str, ...]) -> None:
    """Two lm-eval runs' samples and metrics: log-likelihoods within 1e-4, greedy flags and generations identical,
    and so every metric (acc, acc_norm, exact_match identical; perplexities within the log-likelihoods' tolerance)."""
    for task in tasks:
        for want, have in zip(expected["samples"][task], got["samples"][task], strict=True):
            for want_answer, have_answer in zip(want["resps"], have["resps"], strict=True):
                if isinstance(want_answer[0], str):  # a generation
                    assert have_answer == want_answer
                elif isinstance(want_answer[0], float):  # a rolling log-likelihood
                    assert have_answer[0] == pytest.approx(want_answer[0], abs=LOGLIKELIHOOD_ATOL)
                else:  # (log-likelihood, greedy)
                    assert have_answer[0][0] == pytest.approx(want_answer[0][0], abs=LOGLIKELIHOOD_ATOL)
                    assert have_answer[0][1] == want_answer[0][1]
        for metric, value in expected["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert got["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)


def run_shipped(lm: object, limit: int) -> dict:
    manager = TaskManager(include_path=str(SHIPPED))
    return lm_eval.simple_evaluate(
        model=lm, tasks=["plainlm_local"], task_manager=manager, log_samples=True, limit=limit
    )


def test_shipped_tasks_give_lm_evals_hf_numbers(both: tuple[HFLM, PlainlmLM], offline: None) -> None:
    """plainlm_mc, plainlm_ppl and plainlm_qa through lm-eval's evaluator, plainlm's model against its hf model."""
    reference, ours = both
    assert_same_answers(run_shipped(reference, 12), run_shipped(ours, 12), ("plainlm_mc", "plainlm_ppl", "plainlm_qa"))


@pytest.mark.slow  # two real models, each through both backends
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_models_give_lm_evals_hf_numbers(name: str, tmp_path: Path, offline: None) -> None:
    """The packaged GGUF file through plainlm, against lm-eval's hf model on the same weights converted to a
    Hugging Face directory (with transformers' own reading of the file's tokenizer where plainlm writes none)."""
    try:
        path = {"smollm2": smollm2_gguf, "gemma3": gemma3_gguf}[name]()
    except PackagedModelMissing as e:
        pytest.skip(str(e))
    hf_dir = convert_to_hf(convert_from_gguf(path, tmp_path / "native"), tmp_path / "hf")
    if not (hf_dir / "tokenizer_config.json").exists():
        transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(hf_dir)
    reference = HFLM(pretrained=str(hf_dir), batch_size=8, device="cpu", dtype="float32")
    tasks = ("plainlm_mc", "plainlm_ppl", "plainlm_qa")
    assert_same_answers(run_shipped(reference, 4), run_shipped(PlainlmLM(path), 4), tasks)


def test_evaluate_command_writes_results_and_samples(tiny_hf_dir: Path, tmp_path: Path, offline: None) -> None:
    out = tmp_path / "eval"
    result = run_cli("evaluate", str(tiny_hf_dir), "--tasks", "plainlm_mc,plainlm_qa", "--include_path", str(SHIPPED),
                     "--limit", "5", "--num_fewshot", "1", "--out_dir", str(out), "--log_samples", "true",
                     timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "plainlm_mc" in result.stdout and "exact_match" in result.stdout  # lm-eval's table
    report = json.loads((out / "results.json").read_text())
    assert set(report["results"]) == {"plainlm_mc", "plainlm_qa"} and report["plainlm"]["truncated_requests"] == 0
    assert report["n-shot"] == {"plainlm_mc": 1, "plainlm_qa": 1}
    for task in ("plainlm_mc", "plainlm_qa"):
        assert len((out / f"samples_{task}.jsonl").read_text().splitlines()) == 5


def test_a_quantized_model_evaluates(tiny_hf_dir: Path, offline: None) -> None:
    llm = LLM.load(tiny_hf_dir, quantize="int8")
    results = lm_eval.simple_evaluate(
        model=PlainlmLM(llm), tasks=["plainlm_mc"], task_manager=TaskManager(include_path=str(SHIPPED)), limit=8
    )
    assert 0 <= results["results"]["plainlm_mc"]["acc,none"] <= 1


def test_perplexity_of_a_file_is_a_forward_passs(tiny_hf_dir: Path, tmp_path: Path) -> None:
    """A document shorter than the context: exp of the mean negative log-likelihood of one forward pass over
    the prefix token and the text; a longer one with a stride gives each token more context and stays close."""
    llm = LLM.load(tiny_hf_dir)
    text = "The river bends around the old mill, and the wheel turns slowly."
    (tmp_path / "short.txt").write_text(text)
    ids = llm.tokenizer.encode(text, bos=False)
    prefix = llm.tokenizer.bos_id if llm.tokenizer.bos_id is not None else llm.tokenizer.eos_id
    with torch.no_grad():
        logprobs = llm.model(torch.tensor([[prefix, *ids]]))[0, :-1].float().log_softmax(-1)
    total = float(logprobs.gather(-1, torch.tensor(ids)[:, None]).sum())
    result = perplexity(llm, tmp_path / "short.txt")
    assert result.tokens == len(ids) and result.words == len(text.split())
    assert result.token_perplexity == pytest.approx(math.exp(-total / len(ids)), rel=1e-5)
    assert result.word_perplexity == pytest.approx(math.exp(-total / result.words), rel=1e-5)
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": text * k}) for k in (1, 12)))
    disjoint = perplexity(llm, tmp_path / "docs.jsonl", max_length=64)
    strided = perplexity(llm, tmp_path / "docs.jsonl", max_length=64, stride=16)
    assert disjoint.documents == strided.documents == 2 and disjoint.tokens == strided.tokens
    assert strided.token_perplexity == pytest.approx(disjoint.token_perplexity, rel=0.2)


def test_windows_predict_every_token_once_within_the_context() -> None:
    tokens = list(range(100, 137))
    for max_length, stride in ((8, 8), (8, 3), (40, 40), (5, 1)):
        pairs = windows(tokens, 0, max_length, stride)
        assert [t for _, continuation in pairs for t in continuation] == tokens
        for context, continuation in pairs:
            assert len(context) + len(continuation) - 1 <= max_length and context


def test_bad_evaluate_input_is_one_clear_error(tiny_hf_dir: Path, tmp_path: Path, offline: None) -> None:
    tasks = tmp_path / "tasks"
    shutil.copytree(SHIPPED, tasks)
    (tasks / "broken.yaml").write_text("task: broken\ndataset_path: json\n  output_type: [oops\n")
    cases = [
        (["--tasks", "plainlm_mc", "--include_path", str(tasks)], "broken.yaml:3"),
        (["--tasks", "plainlm_mc"], "no task, group or tag named 'plainlm_mc'"),  # without --include_path
        (["--tasks", "plainlm_mc", "--include_path", str(SHIPPED), "--limit", "0"], "--limit 0"),
        (["--perplexity", str(tmp_path / "missing.txt")], "missing.txt: no such file"),
        ([], "give --tasks"),
    ]
    for options, says in cases:
        result = run_cli("evaluate", str(tiny_hf_dir), *options, timeout=300)
        assert result.returncode != 0 and says in result.stderr, (options, result.stderr[-1500:])
        assert "Traceback" not in result.stderr
    result = run_cli("evaluate", str(tiny_hf_dir), "--tasks", "plainlm_mcq", "--include_path", str(SHIPPED))
    assert "close names: plainlm_mc" in result.stderr
    result = run_cli("evaluate", str(tmp_path / "no-model"), "--tasks", "plainlm_mc", "--include_path", str(SHIPPED))
    assert result.returncode != 0 and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_bad_batch_size_is_refused(tiny_hf_dir: Path) -> None:
    with pytest.raises(InvalidInput, match="batch_size"):
        PlainlmLM(str(tiny_hf_dir), batch_size="many")
