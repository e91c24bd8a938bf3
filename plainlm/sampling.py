"""How the next token is picked: `SamplingParams`, the one description of a request's sampling options,
and `sample`, which applies them to a batch of logits.

`generate.py`, `LLM` (api.py), the CLI's generate and chat commands (and the coming server) all take a
`SamplingParams`, so an option is added, documented and checked here once. The checks run when the
dataclass is made, before any model loads; their messages name the command-line flags.

    params = SamplingParams(max_new_tokens=50, temperature=0.8, top_p=0.95, seed=1)
    token = sample(logits, params, generator)   # (B, V) -> (B,)
    probs = distribution(logits, params)        # what sample draws from, (B, V)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from plainlm.errors import InvalidInput


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """The options of one generation request.

    max_new_tokens: generate at most this many tokens (fewer when the model's context is full).
    temperature: 0 is greedy decoding (the other options then do nothing); higher samples more freely.
    top_k: sample only among the k most likely tokens (None: all).
    top_p: sample only within the smallest set of tokens whose probability reaches top_p (None: all).
    min_p: drop the tokens whose probability is below min_p times the most likely one's (None: keep all).
    stop_ids: token ids that end a row, besides the ones the tokenizer names (its end-of-sequence ids).
    seed: seed for sampling, for reproducible output (None: torch's global generator).
    """

    max_new_tokens: int = 100
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_ids", tuple(self.stop_ids))  # a list given is kept hashable and immutable
        if self.max_new_tokens < 1:
            _refuse("--max_new_tokens", self.max_new_tokens, "at least 1", "e.g. --max_new_tokens 100")
        if self.temperature < 0:
            _refuse("--temperature", self.temperature, "0 or more", "0 is greedy, 0.7 samples moderately")
        if self.top_k is not None and self.top_k < 1:
            _refuse("--top_k", self.top_k, "at least 1", "leave it out to consider every token")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            _refuse("--top_p", self.top_p, "in (0, 1]", "e.g. --top_p 0.9, or leave it out to consider every token")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            _refuse("--min_p", self.min_p, "in [0, 1]", "e.g. --min_p 0.05, or leave it out to keep every token")

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        """A generator seeded with `seed` on `device`, or None (torch's global one) without a seed."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


def sampling_params(params: SamplingParams | None = None, **options: Any) -> SamplingParams:
    """`params` (default: SamplingParams()) with `options` changed: what the keyword-style calls
    (`llm.generate(prompt, max_new_tokens=20, temperature=0.7)`) turn into."""
    if params is not None and not isinstance(params, SamplingParams):
        # generate(model, prompts, 20) was the call before SamplingParams: say what it is now.
        raise InvalidInput(
            f"the sampling options are a SamplingParams or keywords, not {params!r}: "
            f"pass max_new_tokens={params!r} by keyword, or SamplingParams(max_new_tokens=...)"
        )
    params = params if params is not None else SamplingParams()
    return dataclasses.replace(params, **options) if options else params  # checked again


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of `logits` (B, V), picked as `params` says.

    temperature 0 picks the argmax (greedy). Otherwise the logits are divided by the temperature and cut,
    in the order transformers applies them, to the `top_k` best, then to the nucleus (the smallest set of
    tokens whose probabilities add up to at least `top_p`), then to the tokens with at least `min_p` times
    the best one's probability; never fewer than one token. Pass a seeded `torch.Generator` for
    reproducible draws.
    """
    if params.temperature == 0:
        # max's indices are argmax's (the first maximum), at a third of its time on the CPU here (61 -> 22 us
        # over SmolLM2's 49k logits, about 1% of an int4 decode step).
        return logits.max(dim=-1).indices
    logits, candidates = _kept_logits(logits, params)
    choice = torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)  # (B, 1)
    return (choice if candidates is None else candidates.gather(-1, choice)).squeeze(-1)


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The probabilities (B, V), float32, that `sample` draws each row's token from when temperature > 0:
    what speculative decoding compares a draft's proposals against (speculative.py)."""
    kept, candidates = _kept_logits(logits, params)
    probs = kept.softmax(dim=-1)
    if candidates is None:
        return probs
    return torch.zeros(logits.shape, dtype=probs.dtype, device=probs.device).scatter_(-1, candidates, probs)


def _kept_logits(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tempered logits with the cut tokens at -inf (sample's docstring says which), and the token ids of
    their columns, best first, when a cut sorted them (None: the columns are the vocabulary)."""
    logits = logits.float() / params.temperature
    candidates = None
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        logits, candidates = logits.topk(params.top_k, dim=-1)  # sorts only k values, not the vocabulary
    if params.top_p is not None and params.top_p < 1.0:
        if candidates is None:
            logits, candidates = logits.sort(dim=-1, descending=True)
        probs = logits.softmax(dim=-1)
        # Drop a token once the better tokens before it already reach top_p; the best one always stays.
        logits = logits.masked_fill(probs.cumsum(dim=-1) - probs >= params.top_p, float("-inf"))
    if params.min_p:
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p): no softmax needed, and the best stays.
        best = logits.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(logits < best + math.log(params.min_p), float("-inf"))
    return logits, candidates


def _refuse(flag: str, value: object, allowed: str, advice: str) -> None:
    raise InvalidInput(f"{flag} {value} is not allowed: it must be {allowed} ({advice})")
