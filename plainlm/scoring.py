"""Log-likelihoods of continuations, many at once: what evaluation scores (harness.py's lm-eval model,
perplexity.py).

    loglikelihoods(model, [(context_ids, continuation_ids), ...], max_length=2048)
    -> [(log-probability of the continuation, whether greedy decoding gives it), ...]

Each request's input is (context + continuation)[-(max_length + 1):][:-1], as lm-eval's Hugging Face backend
cuts it, and its continuation is predicted by the input's last len(continuation) positions. The input's part
before those is a prefix: requests with the same prefix (the choices of a few-shot multiple-choice question)
compute it once, in one row of the KV cache that their rows then share, where that saves at least
SHARED_PREFIX_TOKENS tokens; the others run whole, many to a forward pass (a pass per prefix would cost more
than it saves). Either way only the continuations' positions go through the vocabulary projection.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from plainlm.errors import InvalidInput
from plainlm.model import GPT

# batch_size None ("auto"): continuation rows per forward pass until prefix and rows reach this many tokens.
# On a CPU the arithmetic runs as fast at a few thousand tokens a pass as at more, and memory stays small.
AUTO_TOKENS_PER_FORWARD = 4096
# A prefix runs once for its requests when that saves this many tokens: below it, the pass of its own costs
# more than the tokens it saves (SmolLM2 fp32 on 2 threads: about 0.7 ms a token, 15-30 ms a pass).
SHARED_PREFIX_TOKENS = 64


@dataclass
class _Row:
    """One request as it runs: the prefix its cache row holds, and the continuation's inputs and tokens."""

    index: int
    prefix: tuple[int, ...]
    inputs: list[int]
    targets: list[int]


def loglikelihoods(
    model: GPT,
    requests: Sequence[tuple[list[int], list[int]]],
    max_length: int,
    batch_size: int | None = None,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """(log-probability, greedy) of each (context, continuation), in order; batch_size rows a pass, or None for
    AUTO_TOKENS_PER_FORWARD tokens a pass. A context may be empty only if the continuation's first token then
    needs no prediction, as lm-eval's rolling windows arrange (a context is at least one token in practice)."""
    rows = [_row(i, context, continuation, max_length) for i, (context, continuation) in enumerate(requests)]
    by_prefix: dict[tuple[int, ...], list[_Row]] = defaultdict(list)
    for row in rows:
        by_prefix[row.prefix].append(row)
    groups: dict[tuple[int, ...], list[_Row]] = defaultdict(list)  # those worth sharing, and () for the rest
    for prefix, members in by_prefix.items():
        if (len(members) - 1) * len(prefix) >= SHARED_PREFIX_TOKENS:
            groups[prefix] = members
        else:
            groups[()] += [_Row(r.index, (), [*r.prefix, *r.inputs], r.targets) for r in members]
    # Longest first, as lm-eval orders its batches: a pass too large for memory fails at once, not at the end.
    ordered = sorted(groups.items(), key=lambda group: -(len(group[0]) + max(len(r.inputs) for r in group[1])))
    answers: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    with tqdm(total=len(rows), disable=not progress, desc="loglikelihood requests") as bar:
        for prefix, members in ordered:
            members.sort(key=lambda r: -len(r.inputs))
            for batch in _batches(prefix, members, batch_size):
                for row, answer in zip(batch, _score(model, prefix, batch), strict=True):
                    answers[row.index] = answer
                bar.update(len(batch))
    return answers


def _row(index: int, context: list[int], continuation: list[int], max_length: int) -> _Row:
    if not continuation:
        raise InvalidInput("a loglikelihood request with an empty continuation has nothing to score")
    if len(continuation) > max_length:
        raise InvalidInput(f"a continuation of {len(continuation)} tokens is longer than the context of {max_length}")
    inputs = (context + continuation)[-(max_length + 1) :][:-1]
    cut = len(inputs) - len(continuation)
    return _Row(index, tuple(inputs[:cut]), inputs[cut:], continuation)


def _batches(prefix: tuple[int, ...], members: list[_Row], batch_size: int | None) -> list[list[_Row]]:
    if batch_size is not None:
        return [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    batches: list[list[_Row]] = []
    for row in members:  # longest first: a batch's first row sets its padded length
        batch = batches[-1] if batches else None
        if batch is not None and (len(batch) + 1) * (len(prefix) + len(batch[0].inputs)) <= AUTO_TOKENS_PER_FORWARD:
            batch.append(row)
        else:
            batches.append([row])
    return batches


@torch.inference_mode()
def _score(model: GPT, prefix: tuple[int, ...], batch: list[_Row]) -> list[tuple[float, bool]]:
    """The prefix once, in one cache row copied to every row, then each row's inputs after it; or, without a
    prefix, each row's whole input, causal, no cache. Logits only at each row's continuation positions."""
    device = model.embed.weight.device
    P, T = len(prefix), max(len(row.inputs) for row in batch)
    # Rows are padded on the right: a causal model's real positions never see the padding.
    tokens = torch.tensor([row.inputs + [0] * (T - len(row.inputs)) for row in batch], device=device)
    width = max(len(row.targets) for row in batch)  # a row with fewer targets repeats its last position
    positions = [[min(len(r.inputs) - len(r.targets) + j, len(r.inputs) - 1) for j in range(width)] for r in batch]
    logit_positions = torch.tensor(positions, device=device)
    if not P:
        logits = model(tokens, logit_positions=logit_positions)
    else:
        try:
            model.set_kv_cache(1, P + T)  # the prefix's logits are not needed: one position's, the least
            first = torch.zeros(1, 1, dtype=torch.long, device=device)
            model(
                torch.tensor([prefix], device=device), input_pos=torch.arange(P, device=device), logit_positions=first
            )
            if len(batch) > 1:
                model.repeat_kv_cache(len(batch))
            logits = model(tokens, input_pos=torch.arange(P, P + T, device=device), logit_positions=logit_positions)
        finally:
            model.clear_kv_cache()
    answers = []
    for i, row in enumerate(batch):
        row_logits = logits[i, : len(row.targets)].float()
        targets = torch.tensor(row.targets, device=device)
        logprob = row_logits.log_softmax(dim=-1).gather(-1, targets[:, None]).sum()
        answers.append((float(logprob), bool((row_logits.argmax(dim=-1) == targets).all())))
    return answers
