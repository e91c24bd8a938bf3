"""Log-likelihoods of continuations, many at once: what evaluation scores (harness.py's lm-eval model,
perplexity.py).

    loglikelihoods(model, [(context_ids, continuation_ids), ...], max_length=2048)
    -> [(log-probability of the continuation, whether greedy decoding gives it), ...]

Each request's input is (context + continuation)[-(max_length + 1):][:-1], as lm-eval's Hugging Face backend
cuts it, and its continuation is predicted by the input's last len(continuation) positions. The input's part
before those is a prefix. Requests are packed, not padded: a segment is one prefix followed by the inputs of
every request that shares it (the choices of a multiple-choice question), each branch seeing the prefix and
itself but not its siblings, at the positions it would have alone; segments are laid end to end in the rows
of a pass, and an attention mask keeps them apart. So a shared context is computed once, a pass holds real
tokens instead of padding, and only the continuations' positions go through the vocabulary projection.

    row:  [ prefix A | choice A1 | choice A2 | prefix B | choice B1 | pad ]
    positions  0..P-1   P..       P..         0..Q-1     Q..
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from plainlm.errors import InvalidInput
from plainlm.model import GPT

# batch_size None ("auto"): rows in a pass until the pass holds this many slots. On a CPU the arithmetic runs
# as fast at a few thousand tokens a pass as at more, and memory stays small.
AUTO_TOKENS_PER_FORWARD = 4096


@dataclass
class _Row:
    """One request as it runs: the prefix it shares, and the continuation's inputs and tokens."""

    index: int
    prefix: tuple[int, ...]
    inputs: list[int]
    targets: list[int]


@dataclass
class _Segment:
    """A prefix and the requests after it, side by side (branches), each at positions len(prefix) on."""

    prefix: tuple[int, ...]
    branches: list[_Row] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prefix) + sum(len(r.inputs) for r in self.branches)


def loglikelihoods(
    model: GPT,
    requests: Sequence[tuple[list[int], list[int]]],
    max_length: int,
    batch_size: int | None = None,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """(log-probability, greedy) of each (context, continuation), in order; batch_size requests a pass, or None
    for AUTO_TOKENS_PER_FORWARD slots a pass. A context may be empty only if the continuation's first token then
    needs no prediction, as lm-eval's rolling windows arrange (a context is at least one token in practice)."""
    rows = [_row(i, context, continuation, max_length) for i, (context, continuation) in enumerate(requests)]
    by_prefix: dict[tuple[int, ...], list[_Row]] = defaultdict(list)
    for row in rows:
        by_prefix[row.prefix].append(row)
    window = model.config.sliding_window
    segments = [s for prefix, members in by_prefix.items() for s in _segments(prefix, members, batch_size, window)]
    # Longest first, as lm-eval orders its batches: a pass too large for memory fails at once, not at the end.
    segments.sort(key=len, reverse=True)
    answers: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    with tqdm(total=len(rows), disable=not progress, desc="loglikelihood requests") as bar:
        for batch in _passes(segments, batch_size):
            scored = _score(model, batch)
            for index, answer in scored:
                answers[index] = answer
            bar.update(len(scored))
    return answers


def _row(index: int, context: list[int], continuation: list[int], max_length: int) -> _Row:
    if not continuation:
        raise InvalidInput("a loglikelihood request with an empty continuation has nothing to score")
    if len(continuation) > max_length:
        raise InvalidInput(f"a continuation of {len(continuation)} tokens is longer than the context of {max_length}")
    inputs = (context + continuation)[-(max_length + 1) :][:-1]
    cut = len(inputs) - len(continuation)
    return _Row(index, tuple(inputs[:cut]), inputs[cut:], continuation)


def _segments(
    prefix: tuple[int, ...], members: list[_Row], batch_size: int | None, window: int | None
) -> list[_Segment]:
    """The requests behind one prefix, as few segments as keep each one's branches no longer than its prefix
    (or one request), at most batch_size requests, and, on a model with a sliding window, the whole segment
    within the window: the window is measured in slots, and a later branch's slots lie further from the
    prefix than its positions do (a single branch's do not, so a longer request runs alone)."""
    members = sorted(members, key=lambda r: -len(r.inputs))
    branch_room = max(len(prefix), len(members[0].inputs))
    segments = [_Segment(prefix)]
    for row in members:
        segment = segments[-1]
        fits = (
            not segment.branches
            or (len(segment) - len(prefix) + len(row.inputs) <= branch_room)
            and (batch_size is None or len(segment.branches) < batch_size)
            and (window is None or len(segment) + len(row.inputs) <= window)
        )
        if not fits:
            segment = _Segment(prefix)
            segments.append(segment)
        segment.branches.append(row)
    return segments


def _passes(segments: list[_Segment], batch_size: int | None) -> list[list[list[_Segment]]]:
    """Segments (longest first) into passes of rows: a pass's rows are as long as its first segment, and the
    segments after it go into the first row with room (first fit), or a new row while the pass has room for
    one (batch_size requests, or AUTO_TOKENS_PER_FORWARD slots)."""
    passes: list[list[list[_Segment]]] = []
    for segment in segments:
        rows = passes[-1] if passes else None
        if rows is not None and (
            batch_size is None or sum(len(s.branches) for r in rows for s in r) + len(segment.branches) <= batch_size
        ):
            width = len(rows[0][0])
            row = next((r for r in rows if sum(len(s) for s in r) + len(segment) <= width), None)
            if row is not None:
                row.append(segment)
                continue
            if batch_size is not None or (len(rows) + 1) * width <= AUTO_TOKENS_PER_FORWARD:
                rows.append([segment])
                continue
        passes.append([[segment]])
    return passes


@torch.inference_mode()
def _score(model: GPT, rows: list[list[_Segment]]) -> list[tuple[int, tuple[float, bool]]]:
    """One forward pass over packed rows; (request index, answer) for every request in them. Logits only at
    the positions that predict a continuation's tokens."""
    device = model.embed.weight.device
    width = max(sum(len(s) for s in row) for row in rows)
    tokens, positions, segment_ids, branch_ids, predicting = [], [], [], [], []
    scored: list[tuple[int, int, int, _Row]] = []  # (row, first logit position, last + 1, request)
    for r, row in enumerate(rows):
        row_tokens: list[int] = []
        row_positions: list[int] = []
        row_segments: list[int] = []
        row_branches: list[int] = []
        row_predicting: list[int] = []
        for s, segment in enumerate(row):
            P = len(segment.prefix)
            row_tokens += segment.prefix
            row_positions += range(P)
            row_segments += [s] * P
            row_branches += [0] * P
            for b, request in enumerate(segment.branches, start=1):
                start, n, m = len(row_tokens), len(request.inputs), len(request.targets)
                row_tokens += request.inputs
                row_positions += range(P, P + n)
                row_segments += [s] * n
                row_branches += [b] * n
                # The inputs' last m positions predict the m targets (inputs shorter than their targets, a
                # context-free rolling window's first, repeat their last position; lm-eval scores it so).
                scored.append((r, len(row_predicting), len(row_predicting) + m, request))
                row_predicting += [start + min(n - m + j, n - 1) for j in range(m)]
        pad = width - len(row_tokens)
        tokens.append(row_tokens + [0] * pad)
        positions.append(row_positions + [0] * pad)
        # Padding is a segment per slot: a padded query sees only itself, and no real query sees padding.
        segment_ids.append(row_segments + list(range(-1, -1 - pad, -1)))
        branch_ids.append(row_branches + [0] * pad)
        predicting.append(row_predicting)
    most = max(len(p) for p in predicting)
    logit_positions = torch.tensor([p + [p[-1]] * (most - len(p)) for p in predicting], device=device)
    tokens_t = torch.tensor(tokens, device=device)
    if all(len(row) == 1 and len(row[0].branches) == 1 for row in rows):
        # One request a row: plain causal attention over right padding, which no real position sees.
        logits = model(tokens_t, logit_positions=logit_positions)
    else:
        segments_t, branches_t = torch.tensor(segment_ids, device=device), torch.tensor(branch_ids, device=device)
        same_segment = segments_t[:, :, None] == segments_t[:, None, :]  # (B, query, key)
        visible_branch = (branches_t[:, None, :] == 0) | (branches_t[:, None, :] == branches_t[:, :, None])
        logits = model(
            tokens_t,
            position_ids=torch.tensor(positions, device=device),
            attention_mask=(same_segment & visible_branch)[:, None],
            logit_positions=logit_positions,
        )
    answers = []
    for r, first, last, request in scored:
        request_logits = logits[r, first:last].float()
        targets = torch.tensor(request.targets, device=device)
        logprob = request_logits.log_softmax(dim=-1).gather(-1, targets[:, None]).sum()
        answers.append((request.index, (float(logprob), bool((request_logits.argmax(dim=-1) == targets).all()))))
    return answers
