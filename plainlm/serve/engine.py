"""The serving engine: one scheduler loop that runs batched model steps for many requests at once.

    engine = Engine(llm, max_batch_size=16)
    results = engine.generate([Request(prompt=ids, params=SamplingParams(max_new_tokens=50))])
    for event in engine.stream(requests):  # events of many requests, interleaved, as they happen
        print(event.request_id, event.text, end="")

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

With a draft (speculative.py), a request alone in the engine (no other running or waiting) decodes
speculatively: the draft proposes up to k tokens, and one forward pass over the request's last token and
the proposals checks them all, keeping the tokens plain decoding would give (greedy) or a draw from the
same distribution (sampling). The refused proposals' keys and values sit in the request's blocks past
its computed tokens, where no query reads them, until later tokens overwrite them. Two or more requests
decode one token a step as without a draft: they already share each read of the weights, and a draft's
steps (and its own pass over a new request's tokens) would delay the others' prompts (with 4 clients, SmolLM2
fp32 + an int8 draft: 28 against 41 tokens/s, first tokens 4.5 s against 1.6 s, when a request decoding
beside others still prefilling speculated).
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from plainlm.errors import InvalidInput, NotFound, QueueFull
from plainlm.kernel_layers import reads_paged_pool
from plainlm.sampling import SamplingParams, sample
from plainlm.serve.kv_pool import BlockPool, PagedKVCache
from plainlm.speculative import Draft, ProposalLength, SpeculativeStats, check_draft_tokens, verify

if TYPE_CHECKING:
    from plainlm.api import LLM

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
        cached_tokens says how many of them came from the prefix cache). completion_tokens counts a final stop
        token too, which has no text, no entry in token_ids and no logprob.
    accepted_draft_tokens / rejected_draft_tokens: with a draft, its proposals kept and refused so far.
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
    accepted_draft_tokens: int = 0
    rejected_draft_tokens: int = 0


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
    accepted_draft_tokens: int = 0
    rejected_draft_tokens: int = 0
    error: str | None = None

    @classmethod
    def join(cls, events: list[Event]) -> Result:
        """One request's events, the last of which finished it, as one Result."""
        last = events[-1]
        logprobs = [e.logprobs for e in events if e.logprobs is not None]
        return cls(
            request_id=last.request_id,
            token_ids=[t for e in events for t in e.token_ids],
            text="".join(e.text for e in events),
            finish_reason=last.finish_reason,
            logprobs=[t for part in logprobs for t in part] if logprobs else None,
            prompt_logprobs=next((e.prompt_logprobs for e in events if e.prompt_logprobs is not None), None),
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            cached_tokens=last.cached_tokens,
            accepted_draft_tokens=last.accepted_draft_tokens,
            rejected_draft_tokens=last.rejected_draft_tokens,
            error=last.error,
        )


BLOCK_SIZE = 16  # tokens per KV block: small enough that a prefix is shared to within 16 tokens
# Prompt chunks of at most this many tokens and of alike length run as one padded forward (_prefill_groups).
GROUPED_CHUNK_TOKENS = 32
DEFAULT_MEMORY_SHARE = 0.25  # without --kv_cache_gb the pool takes at most this share of the free memory


class Sequence:
    """A request while the engine works on it: its tokens, blocks, and what has been reported of it."""

    def __init__(self, request: Request, tokenizer: Any, device: torch.device) -> None:
        self.request = request
        self.tokens = list(request.prompt)  # the prompt, then every generated token that continues it
        self.blocks: list[int] = []
        self.hashes: list[Any] = []  # prefix hashes of the blocks registered in the prefix cache so far
        self.computed = 0  # tokens whose keys and values are in the pool: tokens[computed:] still run
        self.cached_tokens = 0
        self.generated = 0  # completion tokens, a final stop token included
        self.accepted_draft = self.rejected_draft = 0  # a draft's proposals kept and refused
        self.generator = request.params.generator(device)
        self.stop_ids = set(tokenizer.stop_ids) | set(request.params.stop_ids)
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.text = ""  # the decoded output so far
        self.sent = 0  # characters of `text` reported
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.first_event = True
        self.salt = ""  # the prefix cache's salt: the base's, or the adapter's (Engine._salts)

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.computed


class Engine:
    """The scheduler loop over one model (see the module docstring): submit, cancel, generate, stream."""

    def __init__(
        self,
        llm: LLM,
        *,
        max_batch_size: int = 16,
        max_seq_length: int | None = None,
        kv_cache_gb: float | None = None,
        prefill_chunk: int = 256,
        max_queue: int = 256,
        adapters: Any = None,
        structured: Any = None,
        draft: Draft | None = None,
        draft_tokens: int | None = None,
    ) -> None:
        """The engine over `llm`'s model and tokenizer.

        max_batch_size: requests decoding together. max_seq_length: the context a request's prompt and
        new tokens must fit (default the model's). kv_cache_gb: the pool's size in GiB (default: room for
        max_batch_size full contexts, at most a quarter of the free memory). prefill_chunk: prompt tokens
        computed per loop iteration. max_queue: waiting requests before submit raises QueueFull.
        adapters: a serve.adapters.AdapterSet over the model; structured: a serve.structured.StructuredOutput.
        draft: speculative decoding for a request alone in the engine (LLM.draft_for makes one; make a model
        draft before the AdapterSet, so that it is not a copy of adapted layers). draft_tokens: the
        proposals a verification checks (default: adaptive, speculative.ProposalLength).
        """
        config = llm.model.config
        if max_batch_size < 1 or prefill_chunk < 1 or max_queue < 1:
            raise InvalidInput("max_batch_size, prefill_chunk and max_queue must be at least 1")
        self.max_seq_length = max_seq_length or config.block_size
        if not 1 < self.max_seq_length <= config.block_size:
            raise InvalidInput(
                f"--max_seq_length {self.max_seq_length} must be in [2, {config.block_size}], the model's context"
            )
        self.llm, self.model, self.tokenizer = llm, llm.model, llm.tokenizer
        self.model.grow_rope_tables(self.max_seq_length)  # before any step: a compiled one reads them unchecked
        self.device = self.model.embed.weight.device
        self.max_batch_size, self.prefill_chunk, self.max_queue = max_batch_size, prefill_chunk, max_queue
        self.adapters, self.structured = adapters, structured
        check_draft_tokens(draft_tokens, has_draft=draft is not None)
        if draft is not None:  # a draft whose context is too short fails now, not per request
            draft.check_fits(self.model, self.max_seq_length)
        self.draft, self.draft_tokens = draft, draft_tokens
        self.speculation = SpeculativeStats()  # every request's verifications, summed
        self._drafting: Sequence | None = None  # the sequence the draft's state is about
        self._proposal_length = ProposalLength(draft_tokens)

        dtype = getattr(self.model.embed, "dtype", self.model.embed.weight.dtype)
        self.bytes_per_token = config.n_layer * config.kv_cache_width * dtype.itemsize
        wanted = max_batch_size * self.max_seq_length * self.bytes_per_token
        if kv_cache_gb is not None:
            if kv_cache_gb <= 0:
                raise InvalidInput(f"--kv_cache_gb {kv_cache_gb} must be more than 0")
            pool_bytes, self.pool_origin = kv_cache_gb * 2**30, "--kv_cache_gb"
        elif wanted <= DEFAULT_MEMORY_SHARE * free_memory(self.device):
            pool_bytes, self.pool_origin = wanted, "max_batch_size full contexts"
        else:
            pool_bytes, self.pool_origin = DEFAULT_MEMORY_SHARE * free_memory(self.device), "a quarter of free memory"
        num_blocks = int(pool_bytes // (self.bytes_per_token * BLOCK_SIZE))
        if num_blocks < 1:
            raise InvalidInput(f"--kv_cache_gb {kv_cache_gb} holds no block of {BLOCK_SIZE} tokens: give more")
        self.pool = BlockPool(num_blocks, BLOCK_SIZE)
        self.step_tables = PagedKVCache.install(self.model, self.pool, dtype)
        self.reads_pool_in_place = reads_paged_pool(self.model, dtype)

        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted: they hold blocks; in the order they were admitted
        self._lock = threading.Condition()
        self._cancelled: set[int] = set()
        self._tasks: deque[tuple[Callable[[], Any], Future]] = deque()  # work for the loop's thread, between steps
        # An adapter computes other keys and values for the same prefix: each load gets a salt of its own,
        # so blocks cached under an unloaded adapter are never found by one loaded later under its name.
        self._salts = {name: f"{name}@0" for name in (adapters.names if adapters is not None else [])}
        self._loads = 0
        self._next_id = 0
        self._thread: threading.Thread | None = None
        self._stopping = False

    def describe(self) -> str:
        tokens = self.pool.num_blocks * BLOCK_SIZE
        gib = tokens * self.bytes_per_token / 2**30
        line = (
            f"KV cache: {self.pool.num_blocks} blocks of {BLOCK_SIZE} tokens = {tokens} tokens, {gib:.2f} GiB "
            f"({self.pool_origin}); up to {self.max_batch_size} requests a batch, context {self.max_seq_length}, "
            f"prompts computed {self.prefill_chunk} tokens a step"
        )
        if self.draft is not None:
            k = self.draft_tokens or "1 to 8 (adaptive)"
            line += f"; a request alone checks {k} draft tokens a step"
        return line

    # --- requests in ---
    def submit(self, request: Request) -> int:
        """Queue `request`; its on_event gets its events. Returns its id. QueueFull when the queue is full."""
        return self._enqueue(request, bounded=True)

    def cancel(self, request_id: int) -> None:
        """End a request (waiting or running) with finish_reason "abort"; its blocks return at the next step."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify()

    def generate(self, requests: list[Request]) -> list[Result]:
        """Run `requests` to the end and return their results, in order (the engine's Python API)."""
        parts: dict[int, list[Event]] = {}
        ids = []
        for event in self.stream(requests, ids):
            parts.setdefault(event.request_id, []).append(event)
        return [Result.join(parts[i]) for i in ids]

    def stream(self, requests: list[Request], ids: list[int] | None = None) -> Iterator[Event]:
        """Run `requests` and yield their events as they happen, interleaved, until every one has finished
        (each request's own on_event, if any, still gets them too). Without a running loop (start) the
        calling thread drives the steps; with one, this waits for its events. `ids`, when given, receives
        the requests' ids in order."""
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        for request in requests:
            request.on_event = _also_to(events, request.on_event)
            request_id = self._enqueue(request, bounded=False)
            if ids is not None:
                ids.append(request_id)
        remaining = len(requests)
        while remaining:
            if self._thread is None:
                while events.empty():
                    self.step()
            event = events.get()
            remaining -= event.finish_reason is not None
            yield event

    def load_adapter(self, name: str, path: str) -> None:
        """Serve the LoRA adapter at `path` as `name` (AdapterSet.load's errors), between two steps."""
        if self.adapters is None:
            raise InvalidInput("this engine was made without an AdapterSet: it serves no adapters")

        def load() -> None:
            self.adapters.load(name, path)
            self._loads += 1
            self._salts[name] = f"{name}@{self._loads}"

        self._between_steps(load)

    def unload_adapter(self, name: str) -> None:
        """Stop serving adapter `name`, between two steps; refused while requests for it wait or run."""
        if self.adapters is None or name not in self.adapters.names:
            raise NotFound(f"no adapter named {name!r} is loaded")

        def unload() -> None:
            with self._lock:  # no request for it may be queued between the count and the unload
                users = sum(seq.request.adapter == name for seq in [*self.running, *self.waiting])
                if users:
                    raise InvalidInput(f"adapter {name!r} is in use by {users} requests: unload it once they end")
                self.adapters.unload(name)
                del self._salts[name]

        self._between_steps(unload)

    def _between_steps(self, work: Callable[[], Any]) -> Any:
        """Run `work` on the loop's thread between two steps (the model must not change during one) and
        return its result or raise its error; at once when no loop runs."""
        if self._thread is None or threading.current_thread() is self._thread:
            return work()
        future: Future = Future()
        with self._lock:
            self._tasks.append((work, future))
            self._lock.notify()
        return future.result()

    def _run_tasks(self) -> None:
        while self._tasks:
            with self._lock:
                work, future = self._tasks.popleft()
            try:
                future.set_result(work())
            except Exception as error:  # noqa: BLE001 - handed to the caller, who reports it
                future.set_exception(error)

    def _enqueue(self, request: Request, bounded: bool) -> int:
        with self._lock:  # under the lock: the adapter must stay loaded between this check and the queue
            self._check(request)
            if bounded and len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue} requests waiting): retry later")
            request.request_id = self._next_id
            self._next_id += 1
            seq = Sequence(request, self.tokenizer, self.device)
            seq.salt = self._salts[request.adapter] if request.adapter is not None else ""
            self.waiting.append(seq)
            self._lock.notify()
        return request.request_id

    def _check(self, request: Request) -> None:
        n, context = len(request.prompt), self.max_seq_length
        if n == 0:
            raise InvalidInput("the prompt is empty: generation needs at least one prompt token")
        if n + 1 > context:
            raise InvalidInput(
                f"the prompt has {n} tokens, but the context is {context} tokens: "
                f"prompt + 1 new token = {n + 1} > {context}. Shorten the prompt."
            )
        wanted = request.params.max_new_tokens
        if n + wanted > context:
            raise InvalidInput(
                f"the prompt has {n} tokens and {wanted} new tokens were asked for, but the context is {context} "
                f"tokens: ask for at most {context - n}"
            )
        if self.pool.blocks_for(n + wanted) > self.pool.num_blocks:
            raise InvalidInput(
                f"{n + wanted} tokens need {self.pool.blocks_for(n + wanted)} KV blocks, but the pool holds "
                f"{self.pool.num_blocks}: ask for fewer tokens, or serve with a larger --kv_cache_gb"
            )
        if request.adapter is not None and (self.adapters is None or request.adapter not in self.adapters.names):
            raise NotFound(f"no adapter named {request.adapter!r} is loaded")
        if request.logprobs is not None and not 0 <= request.logprobs <= self.model.config.vocab_size:
            raise InvalidInput(f"logprobs {request.logprobs} must be between 0 and the vocabulary's size")
        if any(stop == "" for stop in request.stop):
            raise InvalidInput("a stop string is empty: every stop string needs at least one character")

    # --- the loop ---
    def start(self) -> None:
        """Run the loop in a background thread until stop()."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="plainlm-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the loop: every waiting and running request ends with finish_reason "abort"."""
        if self._thread is not None:
            with self._lock:
                self._stopping = True
                self._lock.notify()
            self._thread.join()
            self._thread = None
        for seq in [*self.running, *self.waiting]:
            self._finish(seq, "abort")
        self.waiting.clear()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self.waiting or self.running or self._cancelled or self._tasks):
                    self._lock.wait()
                if self._stopping:
                    return
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        """One loop iteration: cancel, admit, compute up to prefill_chunk prompt tokens, decode every
        running request by one token (or, through the draft, a request alone in the engine by one or more),
        report, release the finished."""
        self._run_tasks()
        self._apply_cancels()
        self._admit()
        decoding = [seq for seq in self.running if seq.pending == 1]
        budget, chunks = self.prefill_chunk, []
        for seq in [seq for seq in self.running if seq.pending > 1]:
            if budget <= 0:
                break
            chunk = min(budget, seq.pending)  # a chunk that ends the prompt samples the first token at once
            budget -= chunk
            chunks.append((seq, chunk))
        for group in _prefill_groups(chunks):
            self._run_or_fail([seq for seq, _ in group], [chunk for _, chunk in group])
        if decoding:
            self._make_room(decoding)
            decoding = [seq for seq in decoding if seq in self.running]  # some may have been preempted
            alone = len(self.running) == 1 and not self.waiting  # nothing else to compute or admit
            speculated = alone and len(decoding) == 1 and self._speculate(decoding[0])
            if decoding and not speculated:
                self._run_or_fail(decoding, [1] * len(decoding))

    def _apply_cancels(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            waiting = [seq for seq in self.waiting if seq.request.request_id in cancelled]
            for seq in waiting:
                self.waiting.remove(seq)
        for seq in waiting + [seq for seq in self.running if seq.request.request_id in cancelled]:
            self._finish(seq, "abort")

    def _admit(self) -> None:
        """Move waiting requests into the batch while there is room in it and blocks for their tokens.
        A block per running request stays in reserve, for their next tokens."""
        with self._lock:
            while self.waiting and len(self.running) < self.max_batch_size:
                seq = self.waiting[0]
                share = not (seq.request.prompt_logprobs and seq.prompt_logprobs is None)  # cached: no logits
                if not self.pool.can_allocate(seq.tokens, seq.salt, share, reserve=len(self.running)):
                    break
                self.waiting.popleft()
                seq.blocks, seq.hashes = self.pool.allocate(seq.tokens, seq.salt, share)
                seq.computed = len(seq.hashes) * BLOCK_SIZE
                if seq.first_event:
                    seq.cached_tokens = seq.computed
                self.running.append(seq)

    def _make_room(self, decoding: list[Sequence]) -> None:
        """A block for every decoding row that crosses into a new one; when the pool runs out, the newest
        running request goes back to the front of the queue (its tokens so far become its prompt, mostly
        found again in the prefix cache), until the rest fit."""
        for seq in decoding:
            while seq in self.running and not self.pool.grow(seq.blocks, len(seq.tokens)):
                victim = self.running[-1]
                self.running.remove(victim)
                self._release(victim)
                victim.computed = 0
                if not victim.generated:  # its prompt's logprobs are computed again, whole
                    victim.prompt_logprobs = None
                with self._lock:
                    self.waiting.appendleft(victim)

    def _run_or_fail(self, rows: list[Sequence], counts: list[int]) -> None:
        """Compute the next counts[i] pending tokens of each row i (and sample where that ends its pending
        tokens). A forward pass that fails is retried row by row, so that only the request that fails ends,
        with "error"."""
        try:
            logits = self._forward(rows, counts)
        except Exception as error:  # noqa: BLE001 - one request's failure must not end the others
            if len(rows) > 1:
                for seq, count in zip(rows, counts, strict=True):
                    if seq in self.running:
                        self._run_or_fail([seq], [count])
            else:
                self._fail(rows[0], error)
            return
        every_position = _scores_prompt(rows)
        for row, (seq, count) in enumerate(zip(rows, counts, strict=True)):
            if every_position:
                self._record_prompt_logprobs(seq, logits[row, :count], seq.computed, count)
            seq.computed += count
            self._register_blocks(seq)
        sampling = [row for row, seq in enumerate(rows) if seq.pending == 0]
        if sampling:
            last = [counts[r] - 1 if every_position else 0 for r in sampling]
            self._sample([rows[r] for r in sampling], logits[sampling, last])

    def _forward(self, rows: list[Sequence], counts: list[int], proposals: list[int] | None = None) -> torch.Tensor:
        """Logits of the next counts[i] pending tokens of each row i, their keys and values written: (B, T, V),
        T = max(counts), where a row still records its prompt's logprobs; else (B, 1, V), each row's last
        token's only. A shorter row is padded with copies of its last token at its last position, whose
        keys and values go to the pool's scratch slot and whose logits are ignored. `proposals`, for one
        row (_speculate): a draft's tokens, fed after the row's pending one; every position's logits return."""
        T = max(counts)
        starts = [seq.computed for seq in rows]
        tokens, positions = [], []
        for seq, start, count in zip(rows, starts, counts, strict=True):
            pad = T - count
            fed = seq.tokens + proposals if proposals is not None else seq.tokens
            tokens.append(fed[start : start + count] + fed[start + count - 1 : start + count] * pad)
            positions.append(list(range(start, start + count)) + [start + count - 1] * pad)
        self.step_tables.attach(self.model)
        self.step_tables.apply(
            [(seq.blocks, s, s + n) for seq, s, n in zip(rows, starts, counts, strict=True)], width=T
        )
        self.step_tables.in_place = self.reads_pool_in_place
        if self.adapters is not None:
            self.adapters.select([seq.request.adapter for seq in rows])
        positions = torch.tensor(positions, device=self.device)
        every_position = proposals is not None or _scores_prompt(rows)
        last = None if every_position else torch.tensor(counts, device=self.device)[:, None] - 1
        return self.model(
            torch.tensor(tokens, device=self.device),
            input_pos=positions[0],
            position_ids=positions,
            logit_positions=last,
        )

    def _record_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, start: int, count: int) -> None:
        """The log-probabilities of the prompt tokens that these `count` positions predict."""
        if seq.generated or not seq.request.prompt_logprobs:
            return
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [TokenLogprob(seq.tokens[0], math.nan)]  # nothing predicts the first token
        end = min(start + count, len(seq.request.prompt) - 1)  # positions whose next token is a prompt token
        if end <= start:
            return
        logprobs = logits[: end - start].float().log_softmax(dim=-1)
        targets = torch.tensor(seq.tokens[start + 1 : end + 1], device=logprobs.device)
        chosen = logprobs.gather(-1, targets[:, None])[:, 0].tolist()
        top = _top(logprobs, seq.request.logprobs or 0)
        for target, logprob, alternatives in zip(targets.tolist(), chosen, top, strict=True):
            seq.prompt_logprobs.append(TokenLogprob(target, logprob, alternatives))

    def _register_blocks(self, seq: Sequence, tokens: list[int] | None = None) -> None:
        """Put the sequence's newly completed blocks into the prefix cache. `tokens`: the sequence's tokens,
        when its computed ones run past seq.tokens (a verification's kept proposals, not yet taken)."""
        tokens = tokens if tokens is not None else seq.tokens
        while (len(seq.hashes) + 1) * BLOCK_SIZE <= seq.computed:
            i = len(seq.hashes)
            previous = seq.hashes[-1] if seq.hashes else seq.salt
            block_hash = BlockPool.next_hash(previous, tokens[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])
            self.pool.register(seq.blocks[i], block_hash)
            seq.hashes.append(block_hash)

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """Pick and take one token per row, each with its own parameters, generator and constraint (and
        its logprob when asked for). Greedy rows without a constraint share one argmax. A row whose
        sampling fails (its constraint, say) ends alone, with "error"."""
        greedy = [i for i, seq in enumerate(rows) if seq.request.params.temperature == 0 and not seq.request.constraint]
        tokens = dict(zip(greedy, logits[greedy].max(dim=-1).indices.tolist(), strict=True)) if greedy else {}
        for i, seq in enumerate(rows):
            try:
                if i not in tokens:
                    row = logits[i : i + 1]
                    if seq.request.constraint is not None:
                        row = row.clone()
                        seq.request.constraint.mask(row[0])
                    tokens[i] = int(sample(row, seq.request.params, seq.generator)[0])
                self._advance(seq, tokens[i], _logprob(seq.request, logits[i], tokens[i]))
            except Exception as error:  # noqa: BLE001 - one request's failure must not end the others
                self._fail(seq, error)

    def _speculate(self, seq: Sequence) -> bool:
        """Decode `seq`, the one request in the engine, through the draft: its proposals and the request's
        last token in one forward pass, then the tokens `verify` keeps. False (nothing done) where it does not
        apply: no draft, a structured-output constraint (which masks each step by the tokens before it), no
        room for two more tokens, or a pool without blocks for the proposals."""
        request = seq.request
        if self.draft is None or request.constraint is not None:
            return False
        room = min(request.params.max_new_tokens - seq.generated, self.max_seq_length - len(seq.tokens))
        asked = min(self._proposal_length.k, room - 1)  # a verification emits up to asked + 1 tokens
        if asked < 1 or not self.pool.grow(seq.blocks, len(seq.tokens) + asked):
            return False
        try:
            if self._drafting is not seq:  # the draft's state (its own cache, its n-gram index) follows one request
                if self._drafting is not None:
                    self.draft.finish()
                self._drafting, self._proposal_length = seq, ProposalLength(self.draft_tokens)
                self.draft.start(self.model, request.prompt, len(request.prompt) + request.params.max_new_tokens, None)
            proposals, drawn_from = self.draft.propose(seq.tokens, asked, request.params, seq.generator)
            logits = self._forward([seq], [1 + len(proposals)], proposals)[0]
            new = verify(logits, proposals, drawn_from, request.params, seq.generator)
        except Exception as error:  # noqa: BLE001 - one request's failure must not end the others
            self._fail(seq, error)
            return True
        kept = len(new) - 1
        self.speculation.count(len(proposals), len(new))
        self.draft.accepted(kept)
        self._proposal_length.update(len(proposals), kept)
        seq.accepted_draft += kept
        seq.rejected_draft += len(proposals) - kept
        seq.computed += 1 + kept  # the last token's and the kept proposals' keys and values are in the pool
        self._register_blocks(seq, seq.tokens + proposals[:kept])
        for position, token in enumerate(new):
            self._advance(seq, token, _logprob(request, logits[position], token))
            if seq not in self.running:  # a stop id, a stop string or the length ended it
                break
        return True

    def _advance(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        """Take a sampled token: stop, or append it and report the text it adds."""
        seq.generated += 1
        request = seq.request
        if request.constraint is not None:
            request.constraint.accept(token)
        if token in seq.stop_ids:
            seq.text += seq.decoder.flush()  # a character the stop token leaves incomplete still counts
            self._finish(seq, "stop")
            return
        seq.tokens.append(token)
        seq.text += seq.decoder.push(token)
        finish: FinishReason | None = None
        if request.constraint is not None and request.constraint.done:
            finish = "stop"
        elif seq.generated >= request.params.max_new_tokens or len(seq.tokens) >= self.max_seq_length:
            finish = "length"
        if finish is not None:
            seq.text += seq.decoder.flush()
        text, stopped = self._new_text(seq, final=finish is not None)
        event = self._event(seq, [token], text, [logprob] if logprob is not None else None)
        if stopped or finish is not None:
            self._finish(seq, "stop" if stopped else finish, event=event)
        else:
            self._emit(seq, event)

    def _new_text(self, seq: Sequence, final: bool) -> tuple[str, bool]:
        """The output text to report now, and whether a stop string ended it. Text that may be the start
        of a stop string is held back until the next tokens show whether it is one (or the request ends)."""
        stops = seq.request.stop
        found = [i for i in (seq.text.find(stop, seq.sent) for stop in stops) if i >= 0]
        if found:
            end, stopped = min(found), True
            seq.text = seq.text[:end]
        else:
            held = 0 if final else _held_back(seq.text, stops)
            end, stopped = len(seq.text) - held, False
        text = seq.text[seq.sent : end]
        seq.sent = end
        return text, stopped

    # --- events out ---
    def _event(self, seq: Sequence, token_ids: list[int], text: str, logprobs: list[TokenLogprob] | None) -> Event:
        first = seq.first_event
        seq.first_event = False
        return Event(
            request_id=seq.request.request_id,
            token_ids=token_ids,
            text=text,
            logprobs=logprobs if seq.request.logprobs is not None else None,
            prompt_logprobs=seq.prompt_logprobs if first else None,
            prompt_tokens=len(seq.request.prompt),
            completion_tokens=seq.generated,
            cached_tokens=seq.cached_tokens,
            accepted_draft_tokens=seq.accepted_draft,
            rejected_draft_tokens=seq.rejected_draft,
        )

    def _emit(self, seq: Sequence, event: Event) -> None:
        if seq.request.on_event is None:
            return
        try:
            seq.request.on_event(event)
        except Exception:  # noqa: BLE001 - a failing listener must not stop the engine
            traceback.print_exc(file=sys.stderr)

    def _finish(
        self, seq: Sequence, reason: FinishReason, event: Event | None = None, error: str | None = None
    ) -> None:
        """End a request: its blocks go back to the pool, and its last event says why it ended."""
        if seq in self.running:
            self.running.remove(seq)
        self._release(seq)
        if event is None:
            text, _ = self._new_text(seq, final=True) if reason == "stop" else ("", False)
            event = self._event(seq, [], text, [] if seq.request.logprobs is not None else None)
        event.finish_reason, event.error = reason, error
        self._emit(seq, event)

    def _fail(self, seq: Sequence, error: Exception) -> None:
        traceback.print_exc(file=sys.stderr)  # a bug or a broken request: the server's log keeps the trace
        self._finish(seq, "error", error=f"{type(error).__name__}: {error}")

    def _release(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.hashes = []


def _prefill_groups(chunks: list[tuple[Sequence, int]]) -> list[list[tuple[Sequence, int]]]:
    """The iteration's prompt chunks, (sequence, token count), grouped into forward passes: short chunks (at
    most GROUPED_CHUNK_TOKENS) of alike length run as one padded batch, as long as padding at most doubles a
    group's tokens, so a burst of short prompts behind a cached system prompt costs one forward, not one
    each. Longer chunks run alone: batched with padding, 16 mixed prompts of 90-400 tokens reached their
    first tokens later (TTFT median 3.5-4.0 s against 2.2-2.3 s, int4 SmolLM2)."""
    groups: list[list[tuple[Sequence, int]]] = []
    for seq, count in sorted(chunks, key=lambda chunk: chunk[1]):
        group = groups[-1] if groups else None
        short = count <= GROUPED_CHUNK_TOKENS
        if short and group is not None and count * (len(group) + 1) <= 2 * (sum(n for _, n in group) + count):
            group.append((seq, count))
        else:
            groups.append([(seq, count)])
    return groups


def _scores_prompt(rows: list[Sequence]) -> bool:
    """Whether a forward over these rows needs every position's logits: one still records its prompt's logprobs."""
    return any(seq.request.prompt_logprobs and not seq.generated for seq in rows)


def _logprob(request: Request, logits: torch.Tensor, token: int) -> TokenLogprob | None:
    """The chosen token's log-probability under one position's `logits` (V,), and the top alternatives,
    when the request asked for logprobs."""
    if request.logprobs is None:
        return None
    logprobs = logits.float().log_softmax(dim=-1)
    return TokenLogprob(token, float(logprobs[token]), _top(logprobs[None], request.logprobs)[0])


def _top(logprobs: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """The k most likely tokens of each row of `logprobs` (N, V), best first."""
    if k <= 0:
        return [[] for _ in range(logprobs.shape[0])]
    values, ids = logprobs.topk(k, dim=-1)
    return [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that begins some stop string (and so may become one)."""
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:n]):
                held = n
                break
    return held


def _also_to(events: queue.SimpleQueue[Event], listener: Callable[[Event], None] | None) -> Callable[[Event], None]:
    """An on_event that puts each event into `events` and passes it on to `listener`."""

    def put(event: Event) -> None:
        events.put(event)
        if listener is not None:
            listener(event)

    return put


def free_memory(device: torch.device) -> int:
    """Bytes of memory free for the KV pool on `device`: the GPU's free memory, or the system's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
