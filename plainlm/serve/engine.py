"""The serving engine: one scheduler loop that runs batched model steps for many requests at once.

    engine = Engine(llm, max_batch_size=16)
    results = engine.generate([Request(prompt=ids, params=SamplingParams(max_new_tokens=50))])

    engine.start()                         # the loop in a background thread (the HTTP server's way)
    engine.submit(Request(prompt=ids, params=..., on_event=callback))   # callback(Event) per step, from that thread
    engine.cancel(request_id)              # a disconnected client: its blocks are freed at once
    engine.stop()                          # running requests end with finish_reason "abort"

A request's life: it waits in a bounded queue; when the pool (kv_pool.py) has blocks for it, it is
admitted, its prompt's already-computed prefix blocks are shared from the prefix cache, and the rest is
prefilled in chunks of `prefill_chunk` tokens, one chunk per loop iteration, so a long prompt never
stalls the others' decoding; it then decodes one token per iteration in a batch with every other running
request, each row sampled with its own parameters, adapter and constraint; when it stops (a stop id,
a stop string, max_new_tokens, the context's end, a cancel) its blocks return to the pool at once, the
full ones staying in the prefix cache for the next request with the same prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from plainlm.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class TokenLogprob:
    """One generated (or prompt) token with its log-probability under the model (log_softmax of the raw
    logits, before temperature and the other sampling cuts, as vLLM and OpenAI report them), and the
    `top` most likely alternatives at that position, best first (empty unless asked for)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Request:
    """One generation request, as the engine sees it (the HTTP layer builds these from OpenAI bodies).

    prompt: token ids, already templated; must leave room for one new token in the context.
    params: sampling and length (SamplingParams). The tokenizer's end-of-sequence ids always stop it too.
    stop: stop strings, matched on the decoded text across token boundaries; the text from the stop
        string on is never reported (Event.text holds back what may be the start of one).
    adapter: the name of a loaded LoRA adapter (serve/adapters.py), or None for the base model.
    logprobs: None for none; 0 for the chosen tokens' log-probabilities; k for those plus the top k.
    prompt_logprobs: also report the prompt tokens' log-probabilities (the first prompt token has none:
        TokenLogprob with logprob nan), as `echo` + `logprobs` in /v1/completions need. Such a request
        computes its whole prompt (no prefix cache hit) since cached blocks hold no logits.
    constraint: a structured-output constraint (serve/structured.py) masking each step's logits.
    on_event: called with each Event of this request, from the engine's thread; None in `generate`.
    """

    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    adapter: str | None = None
    logprobs: int | None = None
    prompt_logprobs: bool = False
    constraint: Any = None
    on_event: Callable[[Event], None] | None = None
    request_id: int = -1  # set by submit / generate


@dataclass
class Event:
    """What one loop iteration produced for one request.

    token_ids: the new tokens (one per decode step; none while the prompt is being prefilled in chunks).
    text: the new text, decoded incrementally with special tokens skipped; text that may begin a stop
        string is held back until it is known not to.
    logprobs: one TokenLogprob per token in token_ids, when the request asked for logprobs.
    prompt_logprobs: in the request's first event with tokens, when it asked for them.
    finish_reason: None while running; then "stop" (a stop id or stop string), "length" (max_new_tokens or
        the end of the context), "abort" (cancelled, or the engine stopped), "error" (see `error`).
    prompt_tokens / completion_tokens: the usage so far (prompt_tokens counts the whole prompt, cached or not;
        cached_tokens says how many of them came from the prefix cache).
    """

    request_id: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class Result:
    """A finished request, as `Engine.generate` returns it: every event's tokens, text and logprobs joined."""

    request_id: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
