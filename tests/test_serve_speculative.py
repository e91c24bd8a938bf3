"""Speculative decoding in the serving engine (serve/engine.py's _speculate): a request alone in the engine gets
the tokens plain decoding gives (greedy) for every draft kind, also when others come and go beside it;
sampled tokens follow the model's distribution (a chi-square test); logprobs, stop ids, stop strings,
the prefix cache and the pool's counters behave as without a draft; `plainlm serve --draft` reports the
draft's work in usage and /health. The draft's own rules are tested in test_speculative.py."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import httpx
import pytest
import torch
from helpers import chi_square_p_value, greedy_margins, joint_distribution, plainlm_serve, tiny_gpt

from plainlm.api import LLM
from plainlm.errors import InvalidInput
from plainlm.generate import generate
from plainlm.sampling import SamplingParams
from plainlm.serve.engine import BLOCK_SIZE, Engine, Request
from plainlm.speculative import ModelDraft, NgramDraft

LOGPROB_TOLERANCE = 1e-4  # fp32: a verification's forward and a plain one differ by summation order only
DRAFT_KINDS = ("ngram", "int8", "int4", "other", "ngram+int8")


@pytest.fixture(scope="module")
def llm(tiny_hf_dir: Path) -> LLM:
    return LLM.load(tiny_hf_dir)


def make_draft(llm: LLM, kind: str):
    """A fresh draft of `kind`: n-gram lookup, the model quantized, another (one-layer) model, or lookup first."""
    if kind == "other":
        return ModelDraft(tiny_gpt(dataclasses.replace(llm.model.config, n_layer=1), seed=1).eval())
    return NgramDraft() if kind == "ngram" else llm.draft_for(kind)


def some_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    randoms = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (4, 21, 40)]
    repetitive = (torch.randint(3, vocab, (6,), generator=generator).tolist() * 5)[:29]  # n-gram lookup hits
    return [*randoms, repetitive]


def alone(llm: LLM, prompt: list[int], params: SamplingParams) -> list[int]:
    """The reference: plain KV-cache decoding of the request alone, without a draft."""
    return generate(llm.model, [prompt], params, stop_ids=(*llm.tokenizer.stop_ids, *params.stop_ids))[0]


@pytest.mark.parametrize("draft_tokens", [None, 2])
@pytest.mark.parametrize("kind", DRAFT_KINDS)
def test_a_request_decoding_alone_gets_the_plain_greedy_tokens(llm, kind, draft_tokens):
    engine = Engine(llm, kv_cache_gb=0.01, draft=make_draft(llm, kind), draft_tokens=draft_tokens)
    params = SamplingParams(max_new_tokens=24)
    for prompt in some_prompts(llm.model.config.vocab_size):
        result = engine.generate([Request(prompt=prompt, params=params)])[0]
        assert result.token_ids == alone(llm, prompt, params)
        # Every verification's proposals are accounted for, per request and in the engine's sum.
        assert result.accepted_draft_tokens + result.rejected_draft_tokens > 0
    stats = engine.speculation
    assert stats.verifications > 0 and stats.accepted > 0
    assert stats.tokens == stats.accepted + stats.verifications
    assert engine.pool.used_blocks == 0


def test_requests_that_come_and_go_beside_a_speculating_one_change_nothing(llm):
    """A runs alone (speculating), B arrives (both decode one token a step), A ends and B runs alone
    (the draft restarts on B): both get their plain tokens, and both were drafted for."""
    vocab = llm.model.config.vocab_size
    first, second = some_prompts(vocab, seed=1)[1:3]
    engine = Engine(llm, kv_cache_gb=0.01, draft=make_draft(llm, "int8"))
    short, long = SamplingParams(max_new_tokens=20), SamplingParams(max_new_tokens=40)
    results: dict[int, list] = {}

    def collect(event):
        results.setdefault(event.request_id, []).append(event)

    a = engine.submit(Request(prompt=first, params=short, on_event=collect))
    for _ in range(3):
        engine.step()
    b = engine.submit(Request(prompt=second, params=long, on_event=collect))
    while engine.running or engine.waiting:
        engine.step()
    tokens = {i: [t for e in events for t in e.token_ids] for i, events in results.items()}
    assert tokens[a] == alone(llm, first, short)
    assert tokens[b] == alone(llm, second, long)
    for request_id in (a, b):
        last = results[request_id][-1]
        assert last.accepted_draft_tokens > 0
    assert engine.pool.used_blocks == 0


def test_logprobs_of_verified_tokens_equal_a_plain_forward_pass(llm):
    prompt = some_prompts(llm.model.config.vocab_size)[3]
    engine = Engine(llm, kv_cache_gb=0.01, draft=NgramDraft())
    request = Request(prompt=prompt, params=SamplingParams(max_new_tokens=16), logprobs=3)
    result = engine.generate([request])[0]
    assert result.accepted_draft_tokens > 0
    sequence = prompt + result.token_ids
    with torch.no_grad():
        reference = llm.model(torch.tensor([sequence]))[0].float().log_softmax(dim=-1)
    assert [t.token_id for t in result.logprobs] == result.token_ids
    for i, token in enumerate(result.logprobs):
        position = len(prompt) - 1 + i
        assert token.logprob == pytest.approx(reference[position, token.token_id].item(), abs=LOGPROB_TOLERANCE)
        top_values, top_ids = reference[position].topk(3)
        assert [t for t, _ in token.top] == top_ids.tolist()
        assert [v for _, v in token.top] == pytest.approx(top_values.tolist(), abs=LOGPROB_TOLERANCE)


def test_a_stop_id_or_stop_string_inside_an_accepted_run_ends_the_request_there(llm):
    prompt = some_prompts(llm.model.config.vocab_size)[2]
    engine = Engine(llm, kv_cache_gb=0.01, draft=make_draft(llm, "int8"), draft_tokens=6)
    free = engine.generate([Request(prompt=prompt, params=SamplingParams(max_new_tokens=30))])[0]
    # A token that first appears mid-output: a verification's, often inside a run of kept proposals.
    position = next(i for i in range(3, len(free.token_ids)) if free.token_ids[i] not in free.token_ids[:i])
    stop_id = free.token_ids[position]
    stopped = engine.generate([Request(prompt=prompt, params=SamplingParams(max_new_tokens=30, stop_ids=(stop_id,)))])[
        0
    ]
    assert stopped.token_ids == free.token_ids[:position]
    assert stopped.finish_reason == "stop" and stopped.completion_tokens == position + 1
    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = engine.generate([Request(prompt=prompt, params=SamplingParams(max_new_tokens=30), stop=(stop,))])[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.find(stop)]
    assert engine.pool.used_blocks == 0


def test_kept_proposals_enter_the_prefix_cache(llm):
    """A follow-up whose prompt is the first request's prompt and answer finds every full block of it cached:
    the blocks a verification completed were registered with the tokens it kept."""
    prompt = some_prompts(llm.model.config.vocab_size)[3]
    engine = Engine(llm, kv_cache_gb=0.01, draft=make_draft(llm, "int8"))
    params = SamplingParams(max_new_tokens=40)
    first = engine.generate([Request(prompt=prompt, params=params)])[0]
    follow_up = prompt + first.token_ids + [prompt[0]]
    second = engine.generate([Request(prompt=follow_up, params=SamplingParams(max_new_tokens=4))])[0]
    computed = len(prompt) + len(first.token_ids) - 1  # the first request's last token was never fed
    assert second.cached_tokens == computed // BLOCK_SIZE * BLOCK_SIZE > 0
    assert second.token_ids == alone(llm, follow_up, SamplingParams(max_new_tokens=4))


def test_structured_requests_and_a_full_context_decode_without_the_draft(llm):
    """No room for a proposal (one token left) means a plain step: the request still ends at its length."""
    prompt = some_prompts(llm.model.config.vocab_size)[1]
    engine = Engine(llm, kv_cache_gb=0.01, max_seq_length=len(prompt) + 1, draft=NgramDraft())
    result = engine.generate([Request(prompt=prompt, params=SamplingParams(max_new_tokens=1))])[0]
    assert result.finish_reason == "length" and len(result.token_ids) == 1
    assert engine.speculation.verifications == 0


@pytest.mark.slow  # about 20 s: 2,000 requests
def test_sampled_tokens_follow_the_models_distribution(llm):
    """Chi-square test at significance 0.001 (fixed seeds) of the first three sampled tokens' joint
    distribution against the model's own, each request alone in the engine, with a one-layer draft model
    whose distribution is far from the model's (total variation above 0.3, checked). Tokens 2 and 3 come
    from one verification of two proposals: kept, refused and residual draws all occur, hundreds of times."""
    config = dataclasses.replace(llm.model.config, vocab_size=8, n_layer=1, block_size=32)
    model = tiny_gpt(config, std=0.7).eval()
    draft = ModelDraft(tiny_gpt(config, seed=3, std=0.7).eval())
    tokenizer = copy.copy(llm.tokenizer)
    tokenizer.stop_ids = []  # every id is an ordinary token, so no draw ends before its third token
    small = LLM(model, tokenizer)
    engine = Engine(small, kv_cache_gb=0.001, draft=draft, draft_tokens=2)
    prompt = [1, 2, 3, 1, 2]
    sampling = SamplingParams(temperature=0.9, top_k=6)
    expected = joint_distribution(model, prompt, sampling, 3)
    assert (expected - joint_distribution(draft.model, prompt, sampling, 3)).abs().sum() / 2 > 0.3
    draws = 2000
    counts = torch.zeros_like(expected)
    for seed in range(draws):
        params = SamplingParams(max_new_tokens=4, temperature=0.9, top_k=6, seed=seed)
        tokens = engine.generate([Request(prompt=prompt, params=params)])[0].token_ids
        counts[tuple(tokens[:3])] += 1
    stats = engine.speculation
    assert min(stats.accepted, stats.proposed - stats.accepted) >= 300
    assert chi_square_p_value(counts.flatten(), expected.flatten() * draws) > 0.001


@pytest.mark.slow  # the packaged SmolLM2, two drafts, two prompts
def test_the_real_model_served_with_a_draft_gives_its_plain_greedy_tokens():
    """Token for token up to the first float-rounding tie of plain decoding's path (a lead under 1e-3 of a
    logit), which must come late: at least 90% of the tokens are compared."""
    from plainlm.packaged_models import smollm2_gguf

    llm = LLM.load(smollm2_gguf())
    texts = [
        "Why is the sky blue?",
        "Rewrite in plain words: The committee convened on Tuesday to review the proposal for the new library. "
        "After a lengthy discussion, the members agreed that the library would open in the spring.",
    ]
    prompts = [llm.encode_prompt(text, chat=True) for text in texts]
    plain = [alone(llm, prompt, SamplingParams(max_new_tokens=40)) for prompt in prompts]
    compared = 0
    for kind in ("ngram", "int8"):
        engine = Engine(llm, kv_cache_gb=0.05, draft=llm.draft_for(kind))
        for prompt, expected in zip(prompts, plain, strict=True):
            got = engine.generate([Request(prompt=prompt, params=SamplingParams(max_new_tokens=40))])[0]
            margins = greedy_margins(llm.model, prompt, expected)
            sure = next((i for i, margin in enumerate(margins) if margin < 1e-3), len(expected))
            assert got.token_ids[:sure] == expected[:sure], kind
            compared += sure
        assert engine.speculation.accepted > 0
    assert compared >= 0.9 * 2 * sum(map(len, plain)) > 0


def test_engine_refusals(llm):
    with pytest.raises(InvalidInput, match="--draft_tokens needs --draft"):
        Engine(llm, kv_cache_gb=0.01, draft_tokens=3)
    with pytest.raises(InvalidInput, match="at least 1 token"):
        Engine(llm, kv_cache_gb=0.01, draft=NgramDraft(), draft_tokens=0)
    config = llm.model.config
    short = ModelDraft(tiny_gpt(dataclasses.replace(config, n_layer=1, block_size=64)).eval())
    with pytest.raises(InvalidInput, match="context of 64 tokens is shorter"):
        Engine(llm, kv_cache_gb=0.01, max_seq_length=128, draft=short)
    other_vocab = ModelDraft(tiny_gpt(dataclasses.replace(config, n_layer=1, vocab_size=50)).eval())
    with pytest.raises(InvalidInput, match=f"50 tokens and the model's {config.vocab_size}"):
        Engine(llm, kv_cache_gb=0.01, draft=other_vocab)


def test_plainlm_serve_with_a_draft_reports_it(tiny_hf_dir: Path, llm: LLM):
    """The served text is the plain greedy text; usage and /health count the same kept proposals."""
    prompt = some_prompts(llm.model.config.vocab_size)[3]
    params = SamplingParams(max_new_tokens=20)
    options = ["--served_model_name", "tiny", "--max_seq_length", "256", "--kv_cache_gb", "0.01", "--draft", "ngram"]
    with plainlm_serve(tiny_hf_dir, *options) as server:
        assert "draft tokens a step" in "".join(server.stdout)
        reply = server.client().completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
        speculative = httpx.get(f"{server.url}/health").json()["speculative"]
    expected = alone(llm, prompt, params)
    assert reply.choices[0].text == llm.tokenizer.decode(expected, skip_special_tokens=True)
    details = reply.usage.completion_tokens_details
    assert details.accepted_prediction_tokens == speculative["accepted_tokens"] > 0
    assert details.accepted_prediction_tokens + details.rejected_prediction_tokens == speculative["proposed_tokens"]
    assert 0 < speculative["acceptance_rate"] <= 1 and speculative["tokens_per_verification"] > 1
