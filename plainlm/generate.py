"""Token generation: KV-cache decoding, batched prompts and streaming.

Token ids in, token ids out. What a request asks for (max_new_tokens, temperature, top-k/p, stop ids,
seed) is a `SamplingParams`, and `sample` picks each token: both live in `sampling.py`; SamplingParams'
fields also work as keywords, `generate(model, prompts, max_new_tokens=50, temperature=0.8)`.
Tokenizers, chat templates and strings live in `tokenizer.py` and `api.py`; the model and its KV cache
live in `model.py`; with `draft=...`, one prompt's tokens come from speculative decoding (`speculative.py`).

    decoder = tokenizer.stream_decoder()
    for step in generate_tokens(model, [prompt], SamplingParams(max_new_tokens=50, temperature=0.8, top_p=0.95)):
        print(decoder.push(step[0]), end="", flush=True)

Timing is left to the caller: count the yielded steps and divide by the wall-clock time
of the loop to get tokens per second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from plainlm.compiled_step import DYNAMO_SETTINGS, check_compile, compile_decode_step
from plainlm.errors import InvalidInput
from plainlm.model import GPT
from plainlm.sampling import SamplingParams, sample, sampling_params
from plainlm.speculative import Draft, make_draft, speculative_tokens

# Compiled decoding rounds the KV cache length up to a multiple of this, so that prompts of other
# lengths reuse the compiled step instead of compiling it again (the cache shape is part of the graph).
COMPILED_CACHE_MULTIPLE = 256


@torch.inference_mode()
def generate_tokens(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    *,
    generator: torch.Generator | None = None,
    truncate_prompt: bool = False,
    compile: bool | str = False,
    draft: Draft | GPT | str | None = None,
    draft_tokens: int | None = None,
    **options: Any,
) -> Iterator[list[int | None]]:
    """Stream new tokens for a batch of prompts, one decoding step at a time.

    `params` says how tokens are picked and when to stop; `options` (SamplingParams' fields as
    keywords) change it. `generator` draws the samples (default: one seeded with `params.seed`).
    Each step yields a list with one entry per prompt: the token that row produced, or None
    once the row has stopped. A row stops after it emits one of `params.stop_ids` (that token is
    still yielded, so callers see why it ended); generation ends when every row has stopped
    or after `max_new_tokens` steps. The prompt and the new tokens must fit in the model's
    context (`config.block_size`): `max_new_tokens` is cut to the room left (said on stderr),
    and a prompt that leaves no room for even one new token raises InvalidInput, or with
    `truncate_prompt=True` keeps its last `block_size - 1` tokens (also said on stderr).

    Prompts of different lengths are left-padded: every row's last prompt token sits in the
    same cache slot, so one forward pass prefills them all and each step decodes one token
    per row. Pads are hidden by an attention mask and every row's positions start at 0.

    `compile=True` runs the decode step through `torch.compile`: the first call compiles
    (tens of seconds on a small CPU) and, on the CPU, saves the step for later processes, which
    load it in a second or two (compiled_step.py); later steps lose most of Python's per-op overhead;
    `compile="reduce-overhead"` cuts it further and compiles longer (COMPILE_MODES). The
    cache is then rounded up to a multiple of COMPILED_CACHE_MULTIPLE slots (the unused slots
    are masked), so later calls with other prompt lengths reuse the compiled step, and the cache
    stays on the model after the call, for the next one (`model.clear_kv_cache()` frees it; a forward
    without `input_pos` ignores it).

    `draft` turns on speculative decoding (speculative.py) for one prompt: another model with the same
    vocabulary, a speculative.Draft, or "ngram", "int8", "int4" (the model's own weights quantized, made
    anew on each call: pass `speculative.quantized_draft(model, "int4")` to keep one). The tokens are the
    model's, as without a draft; `draft_tokens` proposals are checked per forward pass (None: adaptive).
    The draft's `stats` tell how many it got right.
    """
    params = sampling_params(params, **options)
    compile_mode = check_compile(compile)
    if draft is not None and len(prompts) != 1:
        raise InvalidInput(
            f"speculative decoding (a draft) takes one prompt at a time, not {len(prompts)}: "
            "generate() decodes several one after another"
        )
    prompts = _fit_prompts(prompts, model.config.block_size, truncate_prompt)
    lengths = [len(p) for p in prompts]
    prompt_len = max(lengths)
    max_new_tokens = _fit_new_tokens(lengths, model.config.block_size, params.max_new_tokens)
    device = model.embed.weight.device
    if generator is None:
        generator = params.generator(device)
    cache_length = prompt_len + max_new_tokens
    if compile_mode:
        rounded = -(-cache_length // COMPILED_CACHE_MULTIPLE) * COMPILED_CACHE_MULTIPLE
        cache_length = min(rounded, model.config.block_size)
    if draft is not None:
        tokens = speculative_tokens(
            model,
            prompts[0],
            dataclasses.replace(params, max_new_tokens=max_new_tokens),
            make_draft(model, draft),
            cache_length=cache_length,
            draft_tokens=draft_tokens,
            generator=generator,
            compile_mode=compile_mode,
        )
        yield from ([token] for token in tokens)
        return
    idx = torch.tensor([[0] * (prompt_len - len(p)) + list(p) for p in prompts], device=device)
    slots = torch.arange(cache_length, device=device)
    padded = min(lengths) != prompt_len
    if padded:
        pad = torch.tensor([prompt_len - n for n in lengths], device=device)[:, None]  # (B, 1)
        prefill_positions = (slots[:prompt_len] - pad).clamp(min=0)
        prefill_mask, decode_mask = _padding_masks(pad, prompt_len, slots)
        position = prefill_positions[:, -1:]  # (B, 1)
    else:  # equal lengths: positions are the cache slots and the model's causal mask is all we need
        prefill_positions = prefill_mask = decode_mask = position = None

    stop = set(params.stop_ids)
    done = [False] * len(prompts)
    decode = model  # compiled at the first decode step, so that all compiling happens between tokens 1 and 2
    model.set_kv_cache(len(prompts), cache_length)
    try:
        last = torch.full((len(prompts), 1), prompt_len - 1, device=device)  # left-padded: every row ends there
        logits = model(
            idx,
            input_pos=slots[:prompt_len],
            position_ids=prefill_positions,
            attention_mask=prefill_mask,
            logit_positions=last,
        )
        token = sample(logits[:, -1], params, generator)
        for step in range(max_new_tokens):
            new = token.tolist()
            yield [None if d else t for t, d in zip(new, done, strict=True)]
            done = [d or t in stop for t, d in zip(new, done, strict=True)]
            if all(done) or step == max_new_tokens - 1:
                break
            # Finished rows keep decoding (their outputs are ignored) so the batch keeps its shape.
            if position is not None:
                position = position + 1
            slot = slots[prompt_len + step : prompt_len + step + 1]
            compiles_here = compile_mode and step == 0  # later steps reuse what the first one found or compiled
            if compiles_here:  # torch.compile's own imports take seconds: they belong to the compile time too
                example = dict(input_pos=slot, position_ids=position, attention_mask=decode_mask)
                decode = compile_decode_step(model, compile_mode, token[:, None], **example)
            with torch._dynamo.config.patch(DYNAMO_SETTINGS) if compiles_here else contextlib.nullcontext():
                logits = decode(token[:, None], input_pos=slot, position_ids=position, attention_mask=decode_mask)
            token = sample(logits[:, -1], params, generator)
    finally:
        if not compile_mode:  # a compiled step keeps its cache for the next call (set_kv_cache reuses it)
            model.clear_kv_cache()


def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    *,
    generator: torch.Generator | None = None,
    truncate_prompt: bool = False,
    compile: bool | str = False,
    draft: Draft | GPT | str | None = None,
    draft_tokens: int | None = None,
    **options: Any,
) -> list[list[int]]:
    """The new tokens of every prompt, up to but excluding the stop id that ended it.

    Arguments as for `generate_tokens`, which this collects; with a draft, the prompts are decoded one
    after another (speculative decoding pays at batch 1), and a named draft is made once for all of them.
    """
    params = sampling_params(params, **options)
    stop = set(params.stop_ids)
    if draft is None:
        batches = [list(prompts)]
    else:
        draft = make_draft(model, draft)
        batches = [[prompt] for prompt in prompts]
    outputs: list[list[int]] = []
    for batch in batches:
        rows: list[list[int]] = [[] for _ in batch]
        steps = generate_tokens(
            model,
            batch,
            params,
            generator=generator,
            truncate_prompt=truncate_prompt,
            compile=compile,
            draft=draft,
            draft_tokens=draft_tokens,
        )
        for step in steps:
            for out, token in zip(rows, step, strict=True):
                if token is not None and token not in stop:
                    out.append(token)
        outputs += rows
    return outputs


def _fit_prompts(prompts: Sequence[Sequence[int]], block_size: int, truncate: bool) -> list[Sequence[int]]:
    """Check that every prompt is non-empty and leaves room for one new token, or cut it to do so."""
    if not prompts:
        raise InvalidInput("no prompts given: pass a list of token id lists, e.g. [[1, 2, 3]]")
    if isinstance(prompts[0], int):
        raise InvalidInput("prompts must be a list of token id lists; wrap a single prompt as [prompt]")
    fitted = []
    for i, prompt in enumerate(prompts):
        name = _prompt_name(i, len(prompts))
        if len(prompt) == 0:
            raise InvalidInput(f"{name} is empty: generation needs at least one prompt token")
        if len(prompt) + 1 > block_size:
            if not truncate:
                raise InvalidInput(
                    f"{name} has {len(prompt)} tokens, but the model's context is {block_size} tokens: "
                    f"prompt + 1 new token = {len(prompt) + 1} > {block_size}. Shorten the prompt, or pass "
                    f"--truncate_prompt true to keep its last {block_size - 1} tokens."
                )
            print(
                f"note: {name} has {len(prompt)} tokens and the model's context is {block_size}: "
                f"its first {len(prompt) - block_size + 1} tokens are dropped (--truncate_prompt true)",
                file=sys.stderr,
            )
            prompt = prompt[len(prompt) - (block_size - 1) :]
        fitted.append(prompt)
    return fitted


def _fit_new_tokens(lengths: list[int], block_size: int, asked: int) -> int:
    """How many new tokens fit after the longest prompt (at least one), saying so on stderr when fewer than asked."""
    room = block_size - max(lengths)
    if room < asked:
        name = _prompt_name(lengths.index(max(lengths)), len(lengths))
        print(
            f"note: {name} has {max(lengths)} tokens and the model's context is {block_size}: "
            f"room for {room} new token{'s' if room != 1 else ''}, not the {asked} asked for (--max_new_tokens)",
            file=sys.stderr,
        )
    return min(asked, room)


def _prompt_name(index: int, count: int) -> str:
    return "the prompt" if count == 1 else f"prompt {index}"


def _padding_masks(pad: torch.Tensor, prompt_len: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention masks (B, 1, T, S) for left-padded rows: the prefill's and one reused by every decode step.

    A query may see every real (non-pad) key; the model adds causality and sliding windows.
    A pad query sees only itself: some SDPA kernels turn a row with no visible key into NaN,
    which would reach real tokens through the pads' keys and values (0 * NaN = NaN).
    """
    real_key = slots[None, :] >= pad  # (B, S)
    itself = slots[:prompt_len, None] == slots[None, :]  # (T, S)
    prefill_mask = real_key[:, None, None, :] | itself
    return prefill_mask, real_key[:, None, None, :]
