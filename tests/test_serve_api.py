"""The HTTP surface of `plainlm serve` (plainlm/serve/app.py), as OpenAI's own client and curl see it.

A real server process (`plainlm serve` on a free localhost port) answers the official `openai` client:
models, chat plain and streamed, completions with echo + logprobs, several choices, stop strings, usage,
and shuts down cleanly on SIGTERM and SIGINT. Bad input is checked in-process (the same app, through
Starlette's TestClient): each case gets OpenAI's error body and its status, never a 500. The served
answers are compared with `LLM` generating alone (the reference), and logprobs with a plain forward pass.
The engine's own exactness (batching, prefix cache, load) is tested in the engine's tests.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from importlib import resources
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import REPO, ServerProcess, plainlm_serve, run_cli
from safetensors.torch import load_file, save_file

from plainlm.api import LLM
from plainlm.lora import load_peft_adapter, merge_lora
from plainlm.sampling import SamplingParams
from plainlm.serve.app import create_app
from plainlm.serve.engine import BLOCK_SIZE, Engine, Request

CONTEXT = 256  # --max_seq_length of the served tiny model
SERVE_OPTIONS = ["--served_model_name", "tiny", "--max_seq_length", str(CONTEXT), "--kv_cache_gb", "0.01"]
HELLO = [{"role": "user", "content": "Say hello to the quick brown fox."}]


# --- a real server process ---
@pytest.fixture(scope="module")
def server(tiny_hf_dir: Path, tiny_adapter_dir: Path) -> Iterator[ServerProcess]:
    with plainlm_serve(tiny_hf_dir, *SERVE_OPTIONS, "--lora", f"poet={tiny_adapter_dir}") as running:
        yield running


@pytest.fixture(scope="module")
def llm(tiny_hf_dir: Path) -> LLM:
    """The served model, loaded alone: the reference the served answers are compared with."""
    return LLM.load(tiny_hf_dir)


# --- the same app in-process ---
def make_engine(llm: LLM, **options: object) -> Engine:
    return Engine(llm, max_batch_size=4, max_seq_length=CONTEXT, kv_cache_gb=0.01, **options)


@pytest.fixture(scope="module")
def client(llm: LLM) -> Iterator[TestClient]:
    app = create_app(make_engine(llm), served_model_name="tiny", max_body_bytes=20_000)
    with TestClient(app) as test_client:  # runs the lifespan: the engine's thread starts and stops
        yield test_client


# --- the openai client against a real server ---
def test_serve_prints_the_engine_and_its_address(server: ServerProcess) -> None:
    assert server.stdout[-1].startswith("plainlm serve: tiny at http://127.0.0.1:")  # localhost unless told
    assert len(server.stdout) == 2  # the engine's describe() line, then the address


def test_models_lists_the_base_and_its_adapters(server: ServerProcess) -> None:
    models = server.client().models.list().data
    assert [m.id for m in models] == ["tiny", "poet"]
    assert [m.model_extra["parent"] for m in models] == [None, "tiny"]
    assert models[0].model_extra["max_model_len"] == CONTEXT


def test_chat_greedy_equals_the_model_alone(server: ServerProcess, llm: LLM) -> None:
    reply = server.client().chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=12, temperature=0, logprobs=True
    )
    choice = reply.choices[0]
    assert choice.message.content == llm.chat(HELLO, max_new_tokens=12, temperature=0.0)
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    prompt_tokens = len(llm.tokenizer.encode(llm.tokenizer.apply_chat_template(HELLO), bos=False))
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens
    if choice.finish_reason == "length":  # (an end-of-sequence token counts, but is not in the text or logprobs)
        assert reply.usage.completion_tokens == len(choice.logprobs.content) == 12


def test_chat_stream_joins_to_the_plain_answer(server: ServerProcess) -> None:
    client = server.client()
    plain = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=HELLO,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == [plain.choices[0].finish_reason]
    streamed = chunks[-1].usage  # include_usage: the last chunk, with no choices
    assert chunks[-1].choices == []
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(streamed, c) for c in counts] == [getattr(plain.usage, c) for c in counts]
    # The same prompt again: its full blocks come from the prefix cache, and usage says so.
    assert streamed.prompt_tokens_details.cached_tokens == plain.usage.prompt_tokens // BLOCK_SIZE * BLOCK_SIZE


def test_raw_stream_ends_with_done(server: ServerProcess) -> None:
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all("choices" in json.loads(e.removeprefix("data: ")) for e in events[:-1])


def test_completion_echo_logprobs_match_a_forward_pass(server: ServerProcess, llm: LLM) -> None:
    prompt = llm.tokenizer.encode("The quick brown fox jumps")
    reply = server.client().completions.create(
        model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    choice, logprobs = reply.choices[0], reply.choices[0].logprobs
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 3

    generated: list[int] = []  # greedy by full forward passes, then every position's log-probabilities
    with torch.no_grad():
        for _ in range(3):
            generated.append(int(llm.model(torch.tensor([prompt + generated]))[0, -1].argmax()))
        expected = torch.log_softmax(llm.model(torch.tensor([prompt + generated]))[0].float(), dim=-1)
    sequence = prompt + generated
    assert len(logprobs.tokens) == len(sequence)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # no context before it
    for position in range(1, len(sequence)):
        want = float(expected[position - 1, sequence[position]])
        assert logprobs.token_logprobs[position] == pytest.approx(want, abs=1e-4)
        best = float(expected[position - 1].max())
        assert max(logprobs.top_logprobs[position].values()) == pytest.approx(best, abs=1e-4)
        assert len(logprobs.top_logprobs[position]) in (2, 3)  # the top 2, and the chosen token when not among them
    assert logprobs.tokens == [llm.tokenizer.decode([t]) for t in sequence]
    assert choice.text == llm.tokenizer.decode(prompt) + llm.tokenizer.decode(generated, skip_special_tokens=True)
    offsets = [0]
    for token in logprobs.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs.text_offset == offsets


def test_completion_stream_with_echo_joins_to_the_plain_answer(client: TestClient) -> None:
    body = {"prompt": "The quick brown", "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 1}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    pieces = [chunk["choices"][0] for chunk in chunks]
    assert "".join(p["text"] for p in pieces) == plain["text"]
    assert [t for p in pieces for t in p["logprobs"]["tokens"]] == plain["logprobs"]["tokens"]
    assert [t for p in pieces for t in p["logprobs"]["token_logprobs"]] == plain["logprobs"]["token_logprobs"]
    assert [p["finish_reason"] for p in pieces] == [None] * (len(pieces) - 1) + [plain["finish_reason"]]
    # Offsets run on across pieces, from the echoed prompt's start, as in the one unstreamed answer.
    assert [t for p in pieces for t in p["logprobs"]["text_offset"]] == plain["logprobs"]["text_offset"]
    unechoed = {**body, "echo": False}
    plain = client.post("/v1/completions", json=unechoed).json()["choices"][0]
    with client.stream("POST", "/v1/completions", json={**unechoed, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    offsets = [t for chunk in chunks for t in chunk["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == plain["logprobs"]["text_offset"] and offsets[0] == len("The quick brown")


def test_completion_of_a_batch_of_prompts(server: ServerProcess, llm: LLM) -> None:
    prompts = ["The quick brown fox", "Once upon a time"]
    reply = server.client().completions.create(model="tiny", prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1]
    for choice, prompt in zip(reply.choices, prompts, strict=True):
        assert choice.text == llm.generate(prompt, max_new_tokens=5, temperature=0.0)
    assert reply.usage.prompt_tokens == sum(len(llm.tokenizer.encode(p)) for p in prompts)


def test_several_choices_with_a_seed_are_reproducible(server: ServerProcess) -> None:
    client = server.client()
    ask = dict(model="tiny", messages=HELLO, max_tokens=8, temperature=1.0, n=3, seed=7)
    first, again = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in first.choices}) > 1  # seeds 7, 8, 9: different draws
    counted = client.chat.completions.create(**ask, logprobs=True)
    new_tokens = sum(len(c.logprobs.content) for c in counted.choices)  # one logprob per token of text
    stopped = sum(c.finish_reason == "stop" for c in counted.choices)  # ... and maybe one end-of-sequence token
    assert new_tokens <= counted.usage.completion_tokens <= new_tokens + stopped
    assert counted.usage.prompt_tokens == first.usage.prompt_tokens  # the prompt counts once, not n times


def test_stop_string_ends_the_answer_before_it(server: ServerProcess) -> None:
    client = server.client()
    full = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0)
    text = full.choices[0].text
    # Three plain characters from the second half (the tiny model's text also holds stray bytes and controls).
    words = [i for i in range(len(text) // 2, len(text) - 3) if text[i : i + 3].isascii() and text[i : i + 3].isalpha()]
    stop = text[words[0] : words[0] + 3]
    cut = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_unknown_model_is_404_through_the_client(server: ServerProcess) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        server.client().chat.completions.create(model="gpt-4", messages=HELLO, max_tokens=2)
    assert "gpt-4" in caught.value.body["message"] and "tiny" in caught.value.body["message"]


def test_a_client_that_leaves_mid_stream_is_cancelled(server: ServerProcess) -> None:
    """Its request stops at once and its blocks return to the pool. Measured by the prefix cache, which keeps
    each request's full blocks when it ends: a request run to the end adds one per 16 tokens."""

    def health() -> dict:
        return httpx.get(f"{server.url}/health").json()

    new_tokens = CONTEXT - 32  # room for the prompts
    full_run = health()["kv_blocks_cached"]
    body = {"model": "tiny", "prompt": "A request that runs to its end", "max_tokens": new_tokens, "temperature": 0}
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
    full_run = health()["kv_blocks_cached"] - full_run
    assert full_run >= new_tokens // 16 - 1  # the measure tells a whole run from a cut one

    before = health()["kv_blocks_cached"]
    body = {**body, "prompt": "A request whose client leaves early", "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
    deadline = time.monotonic() + 10
    while (after := health())["kv_blocks_used"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after["kv_blocks_used"] == 0
    assert after["kv_blocks_cached"] - before < full_run // 2  # it stopped well before its end
    assert server.client().completions.create(model="tiny", prompt="Hi", max_tokens=2).choices  # still serving


# --- lm-eval scores a served model ---
def test_lm_eval_local_completions_scores_as_a_forward_pass(
    server: ServerProcess, llm: LLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lm-eval's `local-completions` backend (echo + logprobs, and the server's /tokenize as its tokenizer) on the
    shipped plainlm_mc task gets each choice's log-likelihood within 1e-4 of the model's own forward pass, and of
    plainlm's own lm-eval model (plainlm evaluate) on the same requests."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval[api] scores served models: pip install 'lm-eval[api]'")
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from plainlm.harness import PlainlmLM

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{server.url}/v1/completions", "model": "tiny", "max_retries": 1},
        tasks=["plainlm_mc"],
        task_manager=TaskManager(include_path=str(REPO / "data" / "eval")),
        log_samples=True,
        limit=6,
    )
    encode = partial(llm.tokenizer.encode, bos=False)  # lm-eval's remote tokenizer: /tokenize, no special tokens
    native = PlainlmLM(llm)
    for sample in results["samples"]["plainlm_mc"]:
        context = f"Question: {sample['doc']['question']}\nAnswer:"
        pairs = [(context, f" {choice}") for choice in sample["doc"]["choices"]]
        ours = native.loglikelihood([Instance("loglikelihood", {}, pair, 0) for pair in pairs])
        for (_, continuation), [(loglikelihood, _)], (plainlm_loglikelihood, _) in zip(
            pairs, sample["resps"], ours, strict=True
        ):
            context_ids = encode(context)  # as lm-eval splits a pair: the whole, then the context's length
            ids = context_ids + encode(context + continuation)[len(context_ids) :]
            with torch.no_grad():
                logprobs = torch.log_softmax(llm.model(torch.tensor([ids]))[0].float(), dim=-1)
            expected = sum(float(logprobs[i - 1, ids[i]]) for i in range(len(context_ids), len(ids)))
            assert loglikelihood == pytest.approx(expected, abs=1e-4)
            assert plainlm_loglikelihood == pytest.approx(loglikelihood, abs=1e-4)


# --- adapters by name ---
def merged_llm(tiny_hf_dir: Path, tiny_adapter_dir: Path) -> LLM:
    """The tiny model with the adapter folded into its weights: what a request for the adapter must equal."""
    merged = LLM.load(tiny_hf_dir)
    load_peft_adapter(merged.model, tiny_adapter_dir)
    merge_lora(merged.model)
    return merged


def test_an_adapter_by_name_answers_as_the_merged_model(
    server: ServerProcess, llm: LLM, tiny_hf_dir: Path, tiny_adapter_dir: Path
) -> None:
    client = server.client()
    adapted = client.chat.completions.create(model="poet", messages=HELLO, max_tokens=10, temperature=0)
    expected = merged_llm(tiny_hf_dir, tiny_adapter_dir).chat(HELLO, max_new_tokens=10, temperature=0.0)
    assert adapted.choices[0].message.content == expected
    assert adapted.model == "poet"
    assert expected != llm.chat(HELLO, max_new_tokens=10, temperature=0.0)  # the adapter does change the answer


def test_load_and_unload_an_adapter_at_run_time(server: ServerProcess, tiny_adapter_dir: Path) -> None:
    client, url = server.client(), server.url
    loaded = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "verse", "lora_path": str(tiny_adapter_dir)})
    assert loaded.status_code == 200, loaded.text
    assert "verse" in [m.id for m in client.models.list().data]
    ask = dict(messages=HELLO, max_tokens=6, temperature=0)
    same = client.chat.completions.create(model="verse", **ask).choices[0].message.content
    assert same == client.chat.completions.create(model="poet", **ask).choices[0].message.content
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "verse"}).status_code == 200
    assert "verse" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="verse", **ask)
    again = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "verse"})
    assert again.status_code == 404 and "verse" in again.json()["error"]["message"]


def test_an_adapter_that_does_not_fit_is_400_and_the_server_goes_on(
    server: ServerProcess, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    misfit = tmp_path / "misfit"
    misfit.mkdir()
    (misfit / "adapter_config.json").write_text((tiny_adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(tiny_adapter_dir / "adapter_model.safetensors")
    # lora_A of another model's width: its rank fits, its input size does not
    save_file(
        {k: v[:, :-8].contiguous() if "lora_A" in k else v for k, v in tensors.items()},
        misfit / "adapter_model.safetensors",
    )
    url = server.url
    for path, says in ((misfit, "has shape"), (tmp_path / "nothing-here", "no adapter_config.json")):
        response = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "misfit", "lora_path": str(path)})
        assert response.status_code == 400, response.text
        assert str(path) in response.json()["error"]["message"] and says in response.json()["error"]["message"]
    taken = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "tiny", "lora_path": str(tiny_adapter_dir)})
    assert taken.status_code == 400  # the base model's name
    assert "misfit" not in [m.id for m in server.client().models.list().data]
    assert server.client().chat.completions.create(model="poet", messages=HELLO, max_tokens=2).choices


# --- structured output ---
COLOR_SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "bright": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["color", "bright", "tags"],
    "additionalProperties": False,
}


def test_response_format_json_schema_validates(server: ServerProcess) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "color", "schema": COLOR_SCHEMA}}
    reply = server.client().chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=60, temperature=1.0, n=4, seed=3, response_format=response_format
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), COLOR_SCHEMA)


def test_response_format_json_object_parses(server: ServerProcess) -> None:
    reply = server.client().chat.completions.create(
        model="poet", messages=HELLO, max_tokens=60, temperature=0, response_format={"type": "json_object"}
    )
    if reply.choices[0].finish_reason == "stop":  # a free-form object may run past max_tokens
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:
        assert reply.choices[0].message.content.lstrip().startswith("{")


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}},
        {"type": "json_schema"},
        {"type": "yaml"},
    ],
    ids=["invalid schema", "no schema", "unknown type"],
)
def test_a_bad_response_format_is_400(client: TestClient, response_format: dict) -> None:
    response = client.post("/v1/chat/completions", json=chat(response_format=response_format))
    assert response.status_code == 400, response.text
    assert "response_format" in response.json()["error"]["message"]


@pytest.mark.slow
def test_bad_serve_options_fail_before_the_model_loads(tiny_hf_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = [
            (["--lora", "pirate"], "--lora pirate: write it as NAME=PATH"),
            (["--lora", "a=x", "--lora", "a=y"], "the name 'a' is given twice"),  # --lora repeats
            (["--port", port], f"cannot listen on 127.0.0.1:{port}"),
        ]
        for options, says in cases:
            result = run_cli("serve", str(tiny_hf_dir), *options, timeout=60)
            assert result.returncode == 2 and says in result.stderr, result.stderr
            assert "KV cache" not in result.stdout  # the engine was never made


# --- shutdown ---
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_open_streams_and_the_server_cleanly(tiny_hf_dir: Path, sig: signal.Signals) -> None:
    with plainlm_serve(tiny_hf_dir, *SERVE_OPTIONS) as running:
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            running.process.send_signal(sig)
            rest = [line for line in lines if line]
        returncode = running.process.wait(timeout=30)
        stderr = running.stderr()
    assert rest[-1] == "data: [DONE]"  # the stream ended (finish_reason abort), it was not cut
    assert "Traceback" not in stderr, stderr
    # SIGTERM: killed by the signal, re-raised after the graceful shutdown; SIGINT: the CLI's Ctrl-C exit
    assert returncode == (-signal.SIGTERM if sig == signal.SIGTERM else 130)


# --- bad input, in-process ---
def chat(**fields: object) -> dict:
    return {"model": "tiny", "messages": HELLO, "max_tokens": 4, **fields}


BAD_CHAT_BODIES = [
    (chat(temperature=-0.5), 400, "temperature"),
    (chat(temperature="hot"), 400, "temperature"),
    (chat(top_p=0), 400, "top_p"),
    (chat(top_p=1.5), 400, "top_p"),
    (chat(max_tokens=0), 400, "max_tokens"),
    (chat(max_tokens=CONTEXT), 400, f"context {CONTEXT}"),
    (chat(max_completion_tokens=-3), 400, "max_completion_tokens"),
    (chat(n=17), 400, "n"),
    (chat(n=0), 400, "n"),
    (chat(top_logprobs=21, logprobs=True), 400, "top_logprobs"),
    (chat(top_logprobs=2), 400, "logprobs"),
    (chat(stop=[""]), 400, "stop"),
    (chat(stop=3), 400, "stop"),
    (chat(messages=[]), 400, "messages"),
    (chat(messages="hello"), 400, "messages"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "messages"),
    (chat(messages=[{"role": "user", "content": "word " * 300}]), 400, f"context is {CONTEXT} tokens"),
    (chat(model="gpt-4"), 404, "gpt-4"),
    (chat(seed=1.5), 400, "seed"),
]


@pytest.mark.parametrize(("body", "status", "says"), BAD_CHAT_BODIES, ids=[c[2] for c in BAD_CHAT_BODIES])
def test_bad_chat_bodies_get_an_openai_error(client: TestClient, body: dict, status: int, says: str) -> None:
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["code"] == status
    assert says in error["message"]


def test_a_prompt_too_long_names_both_lengths(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"prompt": list(range(1, 301)), "max_tokens": 1})
    assert response.status_code == 400
    assert "300 tokens" in response.json()["error"]["message"]
    assert f"{CONTEXT} tokens" in response.json()["error"]["message"]


BAD_COMPLETION_BODIES = [
    ({"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "hi", "logprobs": True}, 400, "logprobs"),
    ({"prompt": [1, "two"]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [10**9]}, 400, "vocabulary"),
    ({"prompt": [-1]}, 400, "vocabulary"),
    ({"prompt": "hi", "echo": "yes"}, 400, "echo"),
    ({}, 400, "prompt"),
]


@pytest.mark.parametrize(
    ("body", "status", "says"), BAD_COMPLETION_BODIES, ids=[str(c[0]) for c in BAD_COMPLETION_BODIES]
)
def test_bad_completion_bodies_get_an_openai_error(client: TestClient, body: dict, status: int, says: str) -> None:
    response = client.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"]


def test_malformed_json_is_400_not_422(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


def test_a_body_over_the_limit_is_413(client: TestClient) -> None:
    big = chat(messages=[{"role": "user", "content": "x" * 30_000}])
    assert client.post("/v1/chat/completions", json=big).status_code == 413  # said by Content-Length

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield json.dumps(big).encode()

    response = client.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "20000 bytes" in response.json()["error"]["message"]


def test_unknown_route_and_method_get_openai_errors(client: TestClient) -> None:
    assert client.get("/v1/nothing").json()["error"]["code"] == 404
    assert client.get("/v1/chat/completions").json()["error"]["code"] == 405


def test_the_server_still_answers_after_bad_input(client: TestClient) -> None:
    for body, _, _ in BAD_CHAT_BODIES:
        client.post("/v1/chat/completions", json=body)
    response = client.post("/v1/chat/completions", json=chat(temperature=0))
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] is not None


def test_a_request_the_engine_fails_is_a_500_alone(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward pass that raises for one request's tokens (a bug, say): that request gets OpenAI's error body
    with 500 (a streamed one, an error chunk and [DONE]); a request in the same batch and later ones are
    answered as usual."""
    poison = 13
    engine = make_engine(llm)
    forward = engine._forward

    def forward_or_fail(rows: list, counts: list[int]) -> torch.Tensor:
        if any(poison in seq.tokens for seq in rows):
            raise RuntimeError("a poisoned prompt")
        return forward(rows, counts)

    monkeypatch.setattr(engine, "_forward", forward_or_fail)
    good = {"prompt": [5, 6, 7, 8], "max_tokens": 5, "temperature": 0}
    bad = {**good, "prompt": [5, poison, 7, 8]}
    with TestClient(create_app(engine, served_model_name="tiny")) as client:
        expected = client.post("/v1/completions", json=good).json()["choices"][0]["text"]
        with ThreadPoolExecutor(2) as pool:  # the two arrive together and share the engine's batches
            failed, answered = pool.map(lambda body: client.post("/v1/completions", json=body), [bad, good])
        assert failed.status_code == 500
        error = failed.json()["error"]
        assert error["type"] == "server_error" and "a poisoned prompt" in error["message"]
        assert answered.status_code == 200 and answered.json()["choices"][0]["text"] == expected
        with client.stream("POST", "/v1/completions", json={**bad, "stream": True}) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert json.loads(lines[0][6:])["error"]["code"] == 500 and lines[-1] == "data: [DONE]"
        assert client.post("/v1/completions", json=good).json()["choices"][0]["text"] == expected
    assert engine.pool.used_blocks == 0


def test_api_key_is_required_when_set(llm: LLM) -> None:
    app = create_app(make_engine(llm), served_model_name="tiny", api_key="sesame")
    with TestClient(app) as test_client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            response = test_client.post("/v1/chat/completions", json=chat(), headers=headers)
            assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        assert test_client.get("/v1/models").status_code == 401
        assert test_client.get("/health").status_code == 200  # a load balancer's probe needs no key
        assert test_client.get("/").status_code != 401  # nor the chat page, which asks for the key itself
        right = test_client.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer sesame"})
        assert right.status_code == 200


def test_a_full_queue_is_429(llm: LLM) -> None:
    engine = make_engine(llm, max_queue=2)
    app = create_app(engine, served_model_name="tiny")
    test_client = TestClient(app)  # no lifespan: the engine's loop never starts, so the queue stays full
    for _ in range(2):
        engine.submit(Request(prompt=[1, 2, 3], params=SamplingParams(max_new_tokens=1)))
    response = test_client.post("/v1/chat/completions", json=chat())
    assert response.status_code == 429
    assert response.json()["error"]["type"] == "rate_limit_error"


# --- tokens ---
def test_tokenize_and_detokenize_round_trip(client: TestClient, llm: LLM) -> None:
    tokens = client.post("/tokenize", json={"prompt": "The quick brown fox"}).json()
    assert tokens["tokens"] == llm.tokenizer.encode("The quick brown fox")
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == CONTEXT
    assert client.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == "The quick brown fox"
    chat_tokens = client.post("/tokenize", json={"messages": HELLO}).json()["tokens"]
    assert chat_tokens == llm.tokenizer.encode(llm.tokenizer.apply_chat_template(HELLO), bos=False)


# --- the chat page ---
def test_the_chat_page_is_served_at_the_root(client: TestClient) -> None:
    page = resources.files("plainlm.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert response.text == page


# --- the real model's chat template ---
@pytest.mark.slow
def test_smollm2_chat_through_its_own_template() -> None:
    from plainlm.packaged_models import smollm2_gguf

    smollm2 = LLM.load(smollm2_gguf())
    app = create_app(Engine(smollm2, max_batch_size=2, max_seq_length=512), served_model_name="smollm2")
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "What is 2+2?"}]
    with TestClient(app) as test_client:
        reply = test_client.post(
            "/v1/chat/completions", json={"model": "smollm2", "messages": messages, "max_tokens": 8, "temperature": 0}
        ).json()
    assert reply["choices"][0]["message"]["content"] == smollm2.chat(messages, max_new_tokens=8, temperature=0.0)
    prompt = smollm2.tokenizer.apply_chat_template(messages)
    assert prompt.startswith("<|im_start|>system\nYou are brief.<|im_end|>")  # SmolLM2's own ChatML
    assert reply["usage"]["prompt_tokens"] == len(smollm2.tokenizer.encode(prompt, bos=False))
