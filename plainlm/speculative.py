"""Speculative decoding: a cheap draft proposes the next few tokens and the model checks them all in one
forward pass, so one read of the model's weights yields between one and k+1 tokens instead of one.

    draft = ModelDraft(small_model)           # or quantized_draft(model, "int4"), NgramDraft(),
                                              # or LookupFirstDraft(quantized_draft(model, "int8"))
    for token in speculative_tokens(model, prompt_ids, params, draft, cache_length=len(prompt_ids) + 100):
        ...
    draft.stats.acceptance_rate, draft.stats.tokens_per_verification

generate.py's `generate(..., draft=...)` calls this; the drafts live here too.

The tokens are the model's own, not the draft's:
- Greedy (temperature 0): a proposal is kept while it is the model's argmax at its position; the first one
  that is not is replaced by the model's argmax, and when all k are kept the model's next argmax comes free.
  These are the tokens plain greedy decoding picks. (The verification multiplies k+1 positions in one
  matrix product, whose sums round differently from a one-position product's, about 1e-5 of a logit in
  float32: where two tokens tie that closely, either may win, as in any batched decoding.)
- Sampling: the rejection scheme of Leviathan et al. and Chen et al. (2023). A proposal x, drawn from the
  draft's distribution q, is kept with probability min(1, p(x) / q(x)), p being the model's distribution
  after temperature, top-k, top-p and min-p (sampling.distribution); the first one refused is replaced by a
  draw from max(0, p - q), normalised; when all are kept, one more token is drawn from p. Every token then
  follows p exactly. A draft that picks its tokens without sampling (n-gram lookup, a greedy draft) has
  q = 1 at its token, and the rule reduces to: keep x with probability p(x), else draw from p without x.

The KV caches are never cut back or restored. Attention spans a cache's whole preallocated length and a
query sees only the slots up to its own (model.GPT._attention_masks), so slots past the accepted tokens,
which hold refused proposals, are invisible until the next verification overwrites them: rolling back is
moving the next write position. That keeps every shape fixed, so a compiled verification step serves
every call: it always takes `width` tokens, and the unused ones go to the cache's last slot, which no real
token reaches (a request's last token is never fed back). A step with nothing to check (the n-gram draft
found no match) runs a compiled one-token step instead.

The serving engine (serve/engine.py) verifies proposals in its paged cache with the same `verify`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from plainlm.compiled_step import compile_decode_step
from plainlm.errors import InvalidInput
from plainlm.model import GPT, KVCache
from plainlm.quantize import quantize_model
from plainlm.sampling import SamplingParams, distribution, sample

# Adaptive proposal length: start here, grow by 2 after a verification that kept every proposal, shrink by 1
# after one that did not (transformers' "heuristic" schedule), within [1, MAX_DRAFT_TOKENS].
FIRST_DRAFT_TOKENS = 4
MAX_DRAFT_TOKENS = 8
DRAFT_KINDS = ("ngram", "int8", "int4", "ngram+int8", "ngram+int4")  # besides a model: what `draft=` takes as a name
LOOKUP_FIRST = "ngram+"  # "ngram+int8", "ngram+PATH": n-gram lookup, and where it finds nothing that model draft
LOOKUP_FIRST_NGRAM = 3  # the match LookupFirstDraft's lookup needs before it proposes (see there)


@dataclass
class SpeculativeStats:
    """What speculative decoding did for one sequence.

    verifications: forward passes of the model over proposals (after the prompt's).
    proposed / accepted: draft tokens offered / kept.
    tokens: tokens the verifications emitted (the kept proposals and the model's own one after them).
    compile_seconds: compiling or loading the compiled steps (compile=...), not counted elsewhere.
    """

    verifications: int = 0
    proposed: int = 0
    accepted: int = 0
    tokens: int = 0
    compile_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_verification(self) -> float:
        return self.tokens / self.verifications if self.verifications else 0.0

    def count(self, proposed: int, emitted: int) -> None:
        """One verification that checked `proposed` draft tokens and emitted `emitted` (the kept ones and one more)."""
        self.verifications += 1
        self.proposed += proposed
        self.accepted += emitted - 1
        self.tokens += emitted

    def add(self, other: SpeculativeStats) -> None:
        self.verifications += other.verifications
        self.proposed += other.proposed
        self.accepted += other.accepted
        self.tokens += other.tokens
        self.compile_seconds += other.compile_seconds

    def line(self) -> str:
        """`draft: 62% of 120 proposed tokens accepted, 2.9 tokens per verification`"""
        return (
            f"draft: {self.acceptance_rate:.0%} of {self.proposed} proposed tokens accepted, "
            f"{self.tokens_per_verification:.1f} tokens per verification"
        )


def check_draft_tokens(draft_tokens: int | None, has_draft: bool = True) -> None:
    """Refuse a number of proposals a verification checks that no draft can use: one given without a draft
    (`has_draft` False), or below 1."""
    if draft_tokens is None:
        return
    if not has_draft:
        raise InvalidInput("--draft_tokens needs --draft: ngram, int8, int4 or a smaller model's path")
    if draft_tokens < 1:
        raise InvalidInput(f"--draft_tokens {draft_tokens} is not allowed: a draft proposes at least 1 token")


class ProposalLength:
    """How many tokens the next verification asks the draft for: `fixed` every time, or, when None, the
    adaptive schedule (FIRST_DRAFT_TOKENS, up by 2 after a clean sweep, down by 1 after a refusal)."""

    def __init__(self, fixed: int | None = None) -> None:
        check_draft_tokens(fixed)
        self.fixed = fixed
        self.k = fixed or FIRST_DRAFT_TOKENS

    def update(self, proposed: int, kept: int) -> None:
        if self.fixed is None and proposed:
            self.k = min(self.k + 2, MAX_DRAFT_TOKENS) if kept == proposed else max(self.k - 1, 1)


# --- drafts ---
class Draft:
    """What speculative decoding asks of a draft: `start` a sequence, then `propose` tokens to follow it.

    `propose` returns up to k tokens and the distributions they were drawn from, (k, vocab) float32, or None
    when the draft picked them without sampling (then q is 1 at each token). `sequence` only ever grows
    by the tokens the model accepted, so a draft that keeps state can tell what is new.
    """

    stats: SpeculativeStats

    def start(self, model: GPT, prompt: Sequence[int], cache_length: int, compile_mode: str | None) -> None:
        self.stats = SpeculativeStats()

    def propose(
        self, sequence: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]:
        raise NotImplementedError

    def accepted(self, kept: int) -> None:
        """The last verification kept the first `kept` proposals (and added a token of the model's own)."""

    def finish(self) -> None:
        """The sequence is over: free what start() allocated."""

    def check_fits(self, model: GPT, cache_length: int) -> None:
        """Refuse (InvalidInput) to draft for `model` over sequences of up to `cache_length` tokens where this
        draft cannot; a draft without a model of its own always can."""


class ModelDraft(Draft):
    """A smaller model with the same vocabulary, or the model itself quantized (quantized_draft), proposing
    with its own KV cache: the tokens of the sequence it has not seen yet go in as one forward pass, then
    each proposal is one decode step.

    A draft of the model's own structure (`reads_model_cache`: quantized_draft's) skips that pass: the
    model has already computed those tokens' keys and values, in full precision, so the draft copies them
    from the model's cache (a few kilobytes a token) and feeds only the sequence's last token, which the
    model has not. On SmolLM2 that spares the draft its own prompt pass (170 ms for 100 tokens, as long as
    the model's) and a multi-token pass after every verification. Where the model's cache is not a
    model.KVCache (the serving engine's paged pool), it feeds the tokens as any draft does."""

    def __init__(self, model: GPT, reads_model_cache: bool = False) -> None:
        self.model = model
        self.reads_model_cache = reads_model_cache
        self.stats = SpeculativeStats()
        self._fed = 0  # tokens of the sequence in the draft's cache, at slots 0.._fed-1
        self._fed_proposals = 0  # proposals of the last call in the cache, after the sequence
        self._copied = 0  # slots 0.._copied-1 hold the model's own keys and values
        self._target: GPT | None = None  # the model whose cache this draft reads, for this sequence
        self._step: Callable[..., torch.Tensor] | None = None
        self._compile_mode: str | None = None

    def start(self, model: GPT, prompt: Sequence[int], cache_length: int, compile_mode: str | None) -> None:
        super().start(model, prompt, cache_length, compile_mode)
        self.check_fits(model, cache_length)
        self.model.set_kv_cache(1, cache_length)
        self._fed, self._fed_proposals, self._copied, self._step, self._compile_mode = 0, 0, 0, None, compile_mode
        self._target = model if self.reads_model_cache and _same_caches(model, self.model) else None

    def propose(
        self, sequence: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]:
        device = self.model.embed.weight.device
        if self._target is not None and len(sequence) - 1 > self._copied:
            # The model's cache holds every token but the last (its own pick, not yet fed): copy what is new,
            # over the draft's own keys and values of the proposals it kept.
            _copy_slots(self._target, self.model, self._copied, len(sequence) - 1)
            self._copied = self._fed = len(sequence) - 1
        new = sequence[self._fed :]
        slots = torch.arange(self._fed, len(sequence), device=device)
        if len(new) == 1:
            logits = self._decode(torch.tensor([new], device=device), slots)[:, -1]
        else:  # the unseen tokens (the whole prompt at first, then the two of a clean sweep) in one pass
            last = torch.tensor([[len(new) - 1]], device=device)
            logits = self.model(torch.tensor([new], device=device), input_pos=slots, logit_positions=last)[:, -1]
        self._fed = len(sequence)
        proposals: list[int] = []
        drawn_from: list[torch.Tensor] = []
        while True:
            if params.temperature == 0:
                token = int(logits.max(dim=-1).indices)
            else:
                probs = distribution(logits, params)
                token = int(torch.multinomial(probs, num_samples=1, generator=generator))
                drawn_from.append(probs[0])
            proposals.append(token)
            if len(proposals) == k:
                break
            # Fed at the slot after the sequence's end: a proposal the model refuses is overwritten there later.
            slot = torch.tensor([len(sequence) + len(proposals) - 1], device=device)
            logits = self._decode(torch.tensor([[token]], device=device), slot)[:, -1]
        self._fed_proposals = len(proposals) - 1  # the last one is not in the cache
        return proposals, torch.stack(drawn_from) if drawn_from else None

    def accepted(self, kept: int) -> None:
        # The kept proposals the draft fed stay valid in its cache; the next call feeds the rest.
        self._fed += min(kept, self._fed_proposals)

    def _decode(self, token: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        if self._compile_mode is None:
            return self.model(token, input_pos=slot)
        self._step, logits = compiled_call(self._step, self.model, self._compile_mode, self.stats, token, slot)
        return logits

    def finish(self) -> None:
        if self._compile_mode is None:  # a compiled step keeps its cache for the next call (generate.py)
            self.model.clear_kv_cache()

    def check_fits(self, model: GPT, cache_length: int) -> None:
        check_draft_model(model, self.model, cache_length)


class NgramDraft(Draft):
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's last
    `max_ngram` tokens (or, failing that, of fewer, down to `min_ngram`). No model: it costs nothing, and it
    wins where the output copies its input (rewriting, summarising, code edits)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise InvalidInput(f"n-gram lookup needs 1 <= min_ngram <= max_ngram; got {min_ngram} and {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.stats = SpeculativeStats()
        self._ends: dict[tuple[int, ...], list[int]] = {}  # n-gram -> the positions just after its occurrences
        self._indexed = 0  # n-grams ending before this position are in _ends

    def start(self, model: GPT, prompt: Sequence[int], cache_length: int, compile_mode: str | None) -> None:
        super().start(model, prompt, cache_length, compile_mode)
        self._ends, self._indexed = {}, 0

    def propose(
        self, sequence: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]:
        for end in range(self._indexed + 1, len(sequence) + 1):
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self._ends.setdefault(tuple(sequence[end - n : end]), []).append(end)
        self._indexed = len(sequence)
        for n in range(min(self.max_ngram, len(sequence) - 1), self.min_ngram - 1, -1):
            ends = self._ends.get(tuple(sequence[-n:]), [])
            if len(ends) > 1:  # the last occurrence is the sequence's own end; the one before it has a sequel
                follow = ends[-2]
                return sequence[follow : follow + k], None
        return [], None


def _same_caches(model: GPT, draft: GPT) -> bool:
    """Whether every layer of both has a model.KVCache of one shape, so that slots copy across."""
    if len(model.blocks) != len(draft.blocks):
        return False
    pairs = [(a.attn.kv_cache, b.attn.kv_cache) for a, b in zip(model.blocks, draft.blocks, strict=True)]
    return all(
        isinstance(a, KVCache) and isinstance(b, KVCache) and a.k.shape == b.k.shape and a.k.dtype == b.k.dtype
        for a, b in pairs
    )


def _copy_slots(model: GPT, draft: GPT, start: int, end: int) -> None:
    """The keys and values of slots start..end-1, from the model's cache into the draft's."""
    for ours, theirs in zip(model.blocks, draft.blocks, strict=True):
        source, target = ours.attn.kv_cache, theirs.attn.kv_cache
        target.k[:, :, start:end] = source.k[:, :, start:end]
        target.v[:, :, start:end] = source.v[:, :, start:end]


class LookupFirstDraft(Draft):
    """N-gram lookup where it finds a match, and a model draft where it finds none ("ngram+int8", "ngram+PATH").

    Lookup costs nothing and proposes long runs where the output copies its input; the model proposes the
    rest, where lookup would leave the verification with nothing to check. The model draft catches up on
    the tokens lookup's proposals added when it is next asked (ModelDraft.propose feeds whatever it has not
    seen in one pass, or a quantized copy copies their keys and values from the model's cache), so each
    keeps its state whichever proposed last.

    Lookup here proposes only after a match of LOOKUP_FIRST_NGRAM tokens: a match of one or two is a weaker
    guess than the model draft's. On SmolLM2 with its int8 copy behind (compiled, two rounds in one process),
    asking for 3 instead of 1 raised the share of proposals kept from 63% to 82% on the grounded prompts of
    benchmarks/speculative.py (64% to 77% on its chat prompts), and tokens/s by 1.11-1.18x (1.01-1.29x)."""

    def __init__(self, model_draft: ModelDraft, lookup: NgramDraft | None = None) -> None:
        self.model_draft = model_draft
        self.lookup = lookup or NgramDraft(max_ngram=LOOKUP_FIRST_NGRAM, min_ngram=LOOKUP_FIRST_NGRAM)
        self.stats = SpeculativeStats()
        self._proposer: Draft = self.lookup  # the draft that made the last proposals

    def start(self, model: GPT, prompt: Sequence[int], cache_length: int, compile_mode: str | None) -> None:
        super().start(model, prompt, cache_length, compile_mode)
        self.lookup.start(model, prompt, cache_length, compile_mode)
        self.model_draft.start(model, prompt, cache_length, compile_mode)
        self.model_draft.stats = self.stats  # its compile time counts with the rest of this sequence's
        self._proposer = self.lookup

    def propose(
        self, sequence: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]:
        proposals, drawn_from = self.lookup.propose(sequence, k, params, generator)
        self._proposer = self.lookup if proposals else self.model_draft
        return (proposals, drawn_from) if proposals else self.model_draft.propose(sequence, k, params, generator)

    def accepted(self, kept: int) -> None:
        self._proposer.accepted(kept)

    def finish(self) -> None:
        self.lookup.finish()
        self.model_draft.finish()

    def check_fits(self, model: GPT, cache_length: int) -> None:
        self.model_draft.check_fits(model, cache_length)


def quantized_draft(model: GPT, mode: str) -> ModelDraft:
    """The model itself, its copy's weights quantized to `mode` (int8, int4: quantize.py's CPU kernels),
    as a draft. It shares the tokenizer by construction and agrees with the model on most tokens; the copy
    holds a quarter (int8) or an eighth (int4) of the float weights' memory beside them."""
    if mode not in ("int8", "int4"):
        raise InvalidInput(f"a quantized draft is int8 or int4, not {mode!r}")
    if model.quantization is not None:
        raise InvalidInput(
            f"the model is already quantized ({model.quantization['mode']}): a quantized copy of it would read "
            "no fewer bytes a token; load the model in full precision to draft with its quantized copy"
        )
    cache = [block.attn.kv_cache for block in model.blocks]
    model.clear_kv_cache()  # not copied: the draft makes its own
    try:
        twin = copy.deepcopy(model)
    finally:
        for block, kept in zip(model.blocks, cache, strict=True):
            block.attn.kv_cache = kept
    return ModelDraft(quantize_model(twin, mode).eval(), reads_model_cache=True)


def check_draft_model(model: GPT, draft: GPT, cache_length: int) -> None:
    """Refuse a draft model that cannot propose this model's tokens for a sequence of `cache_length`."""
    if draft.config.vocab_size != model.config.vocab_size:
        raise InvalidInput(
            f"the draft's vocabulary has {draft.config.vocab_size} tokens and the model's {model.config.vocab_size}: "
            "a draft must share the model's tokenizer (use a smaller model of the same family, int8, int4 or ngram)"
        )
    if draft.config.block_size < cache_length:
        raise InvalidInput(
            f"the draft's context of {draft.config.block_size} tokens is shorter than this request's "
            f"{cache_length} (prompt and new tokens): shorten the request, or use a draft with a longer context"
        )
    if draft.embed.weight.device != model.embed.weight.device:
        raise InvalidInput(
            f"the draft is on {draft.embed.weight.device} and the model on {model.embed.weight.device}: "
            "load both on one device"
        )


# --- decoding ---
@torch.inference_mode()
def speculative_tokens(
    model: GPT,
    prompt: Sequence[int],
    params: SamplingParams,
    draft: Draft,
    *,
    cache_length: int,
    draft_tokens: int | None = None,
    generator: torch.Generator | None = None,
    compile_mode: str | None = None,
) -> Iterator[int]:
    """Yield the new tokens of one prompt, one at a time, checking the draft's proposals in batches.

    The prompt and `params.max_new_tokens` must already fit the model's context (generate.py sees to it), and
    `cache_length` hold both. `draft_tokens` is the number of proposals a verification checks, or None for
    the adaptive schedule (FIRST_DRAFT_TOKENS, then up after a clean sweep, down after a refusal).
    `compile_mode` compiles the verification (and a model draft's decode step) as generate.py's compile does.
    Stops after a stop id (yielded) or max_new_tokens; `draft.stats` says how it went.
    """
    proposal_length = ProposalLength(draft_tokens)
    device = model.embed.weight.device
    stop, max_new_tokens = set(params.stop_ids), params.max_new_tokens
    width = (draft_tokens or MAX_DRAFT_TOKENS) + 1  # tokens a verification feeds: the last one and k proposals
    scratch = cache_length - 1  # never a real token's slot: the request's last token is never fed
    model.set_kv_cache(1, cache_length)
    draft.start(model, prompt, cache_length, compile_mode)
    verify_step: Callable[..., torch.Tensor] | None = None
    decode_step: Callable[..., torch.Tensor] | None = None
    try:
        P = len(prompt)
        logits = model(
            torch.tensor([list(prompt)], device=device),
            input_pos=torch.arange(P, device=device),
            logit_positions=torch.tensor([[P - 1]], device=device),
        )
        token = int(sample(logits[:, -1], params, generator))  # as plain decoding picks the first token
        sequence = [*prompt, token]
        yield token
        emitted = 1
        while token not in stop and emitted < max_new_tokens:
            room = max_new_tokens - emitted  # a verification emits up to k+1 tokens
            asked = min(proposal_length.k, room - 1)
            proposals, drawn_from = draft.propose(sequence, asked, params, generator) if asked else ([], None)
            fed = [sequence[-1], *proposals]
            slots = list(range(len(sequence) - 1, len(sequence) + len(proposals)))
            if compile_mode is not None and proposals:  # one shape for every call: spare places write the scratch slot
                fed, slots = fed + [fed[-1]] * (width - len(fed)), slots + [scratch] * (width - len(slots))
            tokens, input_pos = torch.tensor([fed], device=device), torch.tensor(slots, device=device)
            if compile_mode is None:
                logits = model(tokens, input_pos=input_pos)
            elif proposals:
                verify_step, logits = compiled_call(verify_step, model, compile_mode, draft.stats, tokens, input_pos)
            else:  # nothing proposed (an n-gram miss): a one-token step, compiled once too, not `width` tokens
                decode_step, logits = compiled_call(decode_step, model, compile_mode, draft.stats, tokens, input_pos)
            new = verify(logits[0, : len(proposals) + 1], proposals, drawn_from, params, generator)
            draft.stats.count(len(proposals), len(new))
            draft.accepted(len(new) - 1)
            proposal_length.update(len(proposals), len(new) - 1)
            for token in new:
                sequence.append(token)
                yield token
                emitted += 1
                if token in stop or emitted == max_new_tokens:
                    break
    finally:
        draft.finish()
        if compile_mode is None:
            model.clear_kv_cache()


def compiled_call(
    step: Callable[..., torch.Tensor] | None,
    model: GPT,
    mode: str,
    stats: SpeculativeStats,
    tokens: torch.Tensor,
    input_pos: torch.Tensor,
) -> tuple[Callable[..., torch.Tensor], torch.Tensor]:
    """`step`(tokens, input_pos=input_pos), and the step: on the first call (step None) compiled from `model`
    first, the compile (and the first call, which finishes it) counted in stats.compile_seconds."""
    if step is not None:
        return step, step(tokens, input_pos=input_pos)
    started = time.perf_counter()
    step = compile_decode_step(model, mode, tokens, input_pos=input_pos)
    logits = step(tokens, input_pos=input_pos)
    stats.compile_seconds += time.perf_counter() - started
    return step, logits


def verify(
    logits: torch.Tensor,
    proposals: list[int],
    drawn_from: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The tokens one verification emits: the proposals the model keeps, then one token of the model's own.

    logits (k+1, vocab): the model's, at the last accepted token and at each of the k proposals.
    drawn_from (k, vocab): the distributions the draft drew the proposals from; None when it picked them
    without sampling. The rules are in this file's docstring.
    """
    k = len(proposals)
    if params.temperature == 0:
        best = logits.max(dim=-1).indices.tolist()  # max's indices: the first maximum, as sample() picks
        kept = 0
        while kept < k and best[kept] == proposals[kept]:
            kept += 1
        return [*proposals[:kept], best[kept]]
    p = distribution(logits, params)  # (k+1, V)
    for i, x in enumerate(proposals):
        q_x = 1.0 if drawn_from is None else float(drawn_from[i, x])
        # Keep x with probability min(1, p(x) / q(x)): u < p/q, written without dividing by q.
        if float(torch.rand((), generator=generator, device=p.device)) * q_x < float(p[i, x]):
            continue
        if drawn_from is None:
            residual = p[i].clone()
            residual[x] = 0
        else:
            residual = (p[i] - drawn_from[i]).clamp(min=0)
        if float(residual.sum()) <= 0:  # p <= q everywhere only when p == q (up to rounding): x would be kept
            residual = p[i]
        return [*proposals[:i], int(torch.multinomial(residual, num_samples=1, generator=generator))]
    return [*proposals, int(torch.multinomial(p[k], num_samples=1, generator=generator))]


def make_draft(model: GPT, draft: Draft | GPT | str) -> Draft:
    """The Draft `draft` names for `model`: a Draft as it is, another GPT as a ModelDraft, or one of
    DRAFT_KINDS ("ngram", "int8", "int4": the model quantized, "ngram+int8", "ngram+int4": lookup first,
    then the quantized model). A checkpoint's path is LLM's to load (api.py)."""
    if isinstance(draft, Draft):
        return draft
    if isinstance(draft, GPT):
        return ModelDraft(draft)
    if draft == "ngram":
        return NgramDraft()
    if draft in ("int8", "int4"):
        return quantized_draft(model, draft)
    if draft in (LOOKUP_FIRST + "int8", LOOKUP_FIRST + "int4"):
        return LookupFirstDraft(quantized_draft(model, draft.removeprefix(LOOKUP_FIRST)))
    raise InvalidInput(
        f"unknown draft {draft!r}: pass a model, a Draft, or one of {', '.join(DRAFT_KINDS)} "
        "(LLM and the command line also take a checkpoint's path)"
    )
