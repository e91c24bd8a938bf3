"""Preference data: (prompt, chosen, rejected) records -> token ids as trl's DPOTrainer makes them -> paired batches.

Reading: `.json` / `.jsonl` files or a folder of them (sft.py finds and parses them) in trl's preference formats:
an explicit prompt ({"prompt", "chosen", "rejected"}: three strings, or three lists of messages) or an implicit one
({"chosen", "rejected"}: two whole conversations or two strings, whose shared start is the prompt, as trl's
`extract_prompt` finds it). Tokenizing: as trl 1.16's DPOTrainer does, so a record gives trl's ids: conversations
through the model's chat template, strings as raw text with EOS appended to the completions. A pair too long for
max_seq_length loses the start of its prompt first, then the ends of its completions.
Batching: `PreferenceLoader`, SFTLoader's seeded shuffles, rank sharding and exact resume over pairs; a pair is
one row, its prompt computed once and its two completions side by side behind an attention mask (collate_pairs),
with `pair_ids` naming the pairs. The losses are not here; the batch contract is in `__init__.py`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plainlm.data import IGNORE_INDEX
from plainlm.data.sft import (
    MAX_REPORTED,
    ROLES,
    Record,
    SFTDataConfig,
    SFTLoader,
    common_prefix,
    hold_out,
    read_records,
)
from plainlm.errors import InvalidInput
from plainlm.tokenizer import Tokenizer

FORMATS = (
    "a preference record is {'prompt', 'chosen', 'rejected'} (strings, or lists of messages), "
    "or {'chosen', 'rejected'} (two whole conversations or two texts that start with the same prompt)"
)


@dataclass
class PreferencePair:
    prompt_ids: torch.Tensor  # (P,) int64
    chosen_ids: torch.Tensor  # (C,) int64: the completion that should win
    rejected_ids: torch.Tensor  # (R,) int64
    source: str = ""  # "file:line", for messages
    index: int = 0  # position in its split (train or validation): the key of its cached reference log-probs
    truncated: bool = False

    def __len__(self) -> int:
        """Tokens of the longer of its two sequences, prompt included."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


# --- reading ---
def _messages_problem(value: Any, key: str) -> str | None:
    if not value:
        return f"{key!r} is empty"
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"{key}[{i}] must be {{'role': one of {', '.join(ROLES)}, 'content': a string}}"
    return None


def extract_prompt(chosen: str | list, rejected: str | list) -> tuple[str | list, str | list, str | list]:
    """(prompt, chosen, rejected) of an implicit-prompt pair: trl's `extract_prompt` rule.

    The prompt is everything (characters, or whole messages) the two share before they first differ, less a space
    that ends it; if one is the start of the other, all but its last item. One difference from trl: a pair that
    differs at its first item has an empty prompt here, where trl would take all but the last character of chosen
    when chosen ends with a space.
    """
    n = min(len(chosen), len(rejected))
    end = n - 1  # where trl's loop ends when it finds no difference
    for i in range(n):
        if chosen[i] != rejected[i]:
            end = i - 1 if i > 0 and chosen[i - 1] == " " else i
            break
    return chosen[:end], chosen[end:], rejected[end:]


def explicit_pair(data: dict[str, Any]) -> dict[str, Any]:
    """A valid record as {"prompt", "chosen", "rejected"}: as it is, or with its implicit prompt extracted."""
    if "prompt" in data:
        return {k: data[k] for k in ("prompt", "chosen", "rejected")}
    prompt, chosen, rejected = extract_prompt(data["chosen"], data["rejected"])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def pair_problem(data: Any) -> str | None:
    """What is wrong with a preference record, or None if it is one of trl's formats (see `FORMATS`).

    A record whose chosen and rejected are the same is not malformed (None): `read_pairs` counts and skips it.
    """
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    keys = ("prompt", "chosen", "rejected") if "prompt" in data else ("chosen", "rejected")
    for key in keys:
        if key not in data:
            return f"{key!r} is missing ({FORMATS})"
        if not isinstance(data[key], str | list):
            return f"{key!r} must be a string or a list of messages, not {type(data[key]).__name__}"
    conversational = isinstance(data["chosen"], list)
    if any(isinstance(data[key], list) != conversational for key in keys):
        return f"{', '.join(map(repr, keys))} must all be strings or all lists of messages"
    for key in keys if conversational else ():
        if problem := _messages_problem(data[key], key):
            return problem
    if data["chosen"] == data["rejected"]:
        return None
    if "prompt" not in data and (not data["chosen"] or not data["rejected"]):
        return "'chosen' or 'rejected' is empty, so there is no shared prompt to find"
    pair = explicit_pair(data)
    if "prompt" not in data and not pair["prompt"]:
        return "'chosen' and 'rejected' differ from their start, so there is no prompt: give it as 'prompt'"
    if not conversational:
        return None
    if pair["prompt"][-1]["role"] != "user":
        where = "" if "prompt" in data else " (the messages chosen and rejected share)"
        return f"the prompt{where} must end with a user message, as trl renders it with the generation prompt"
    for key in ("chosen", "rejected"):
        if not pair[key] or pair[key][0]["role"] != "assistant":
            after = "" if "prompt" in data else " after the messages both share"
            return f"{key!r} must start with an assistant message{after}"
    return None


def read_pairs(path: str | Path, strict: bool = False) -> list[Record]:
    """The valid pairs at `path`, each as {"prompt", "chosen", "rejected"}; malformed records are reported as
    "file:line: what is wrong" and skipped (or raise, with `strict`); pairs whose chosen and rejected are the same
    teach nothing, and are counted and skipped."""
    records, pairs, same = read_records(path, strict, check=pair_problem), [], []
    for record in records:
        if record.data["chosen"] == record.data["rejected"]:
            same.append(record.source)
        else:
            pairs.append(Record(explicit_pair(record.data), record.source))
    if same:
        listed = ", ".join(same[:MAX_REPORTED]) + (", ..." if len(same) > MAX_REPORTED else "")
        message = f"skipped {len(same)} of {len(records)} pairs whose chosen and rejected are the same: {listed}"
        print(message, file=sys.stderr)
    if not pairs:
        raise InvalidInput(f"no usable pairs in {path}: every pair's chosen and rejected are the same")
    return pairs


# --- tokenizing ---
def tokenize_pair(pair: dict[str, Any], tokenizer: Tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Prompt, chosen and rejected ids of an explicit pair, as trl 1.16's DPOTrainer tokenizes it.

    Conversations: the prompt rendered with the generation prompt, and each completion after it, each whole
    conversation rendered and encoded as the template writes it (its BOS included, no other). Strings: raw text,
    the tokenizer's own BOS (if it adds one), EOS appended to each completion that does not end with it. Either
    way a completion is what its whole sequence's ids add to the ids the prompt shares with both (templates and
    merges across the seam can make the prompt alone end differently).
    """
    prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
    if isinstance(prompt, list):
        render = tokenizer.apply_chat_template
        texts = [render(prompt, True), render(prompt + chosen, False), render(prompt + rejected, False)]
        bos = False
    else:
        eos = tokenizer.eos_token
        if eos is None:
            raise InvalidInput(f"the tokenizer in {tokenizer.checkpoint_dir} has no EOS token to end completions")
        chosen, rejected = (c if c.endswith(eos) else c + eos for c in (chosen, rejected))
        texts, bos = [prompt, prompt + chosen, prompt + rejected], None
    prompt_ids, with_chosen, with_rejected = tokenizer.encode_batch(texts, bos=bos)
    n = min(common_prefix(prompt_ids, with_chosen), common_prefix(prompt_ids, with_rejected))
    return prompt_ids[:n], with_chosen[n:], with_rejected[n:]


def truncate_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], max_seq_length: int
) -> tuple[list[int], list[int], list[int]]:
    """Cut a pair to at most `max_seq_length` tokens of prompt plus its longer completion.

    The prompt loses its start first (its end holds the question), down to min(its length, max_seq_length // 2)
    tokens; then the completions lose their ends. The caller skips pairs whose prompt alone is too long.
    """
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer <= max_seq_length:
        return prompt, chosen, rejected
    keep = max(min(len(prompt), max_seq_length // 2), max_seq_length - longer)
    room = max_seq_length - keep
    return prompt[len(prompt) - keep :], chosen[:room], rejected[:room]


def tokenize_pairs(records: list[Record], tokenizer: Tokenizer, max_seq_length: int = 1024) -> list[PreferencePair]:
    """Pairs of `records`, numbered in order; too-long pairs are cut and counted, pairs whose prompt alone is longer
    than `max_seq_length` are skipped and reported with their file:line."""
    pairs, too_long, prompts_cut, completions_cut = [], [], 0, 0
    for record in records:
        try:
            prompt, chosen, rejected = tokenize_pair(record.data, tokenizer)
        except ValueError as e:
            raise InvalidInput(f"{record.source}: {e}") from None
        if len(prompt) > max_seq_length:
            too_long.append(
                f"{record.source}: prompt of {len(prompt)} tokens is longer than max_seq_length {max_seq_length}: "
                "raise max_seq_length or shorten it"
            )
            continue
        cut = truncate_pair(prompt, chosen, rejected, max_seq_length)
        prompts_cut += len(cut[0]) < len(prompt)
        completions_cut += (len(cut[1]), len(cut[2])) != (len(chosen), len(rejected))
        ids = [torch.tensor(part, dtype=torch.long) for part in cut]
        truncated = sum(map(len, cut)) < len(prompt) + len(chosen) + len(rejected)
        pairs.append(PreferencePair(*ids, source=record.source, index=len(pairs), truncated=truncated))
    for line in too_long[:MAX_REPORTED]:
        print(line, file=sys.stderr)
    if too_long:
        shown = f" (the first {MAX_REPORTED} above)" if len(too_long) > MAX_REPORTED else " (above)"
        print(
            f"skipped {len(too_long)} of {len(records)} pairs whose prompt alone is longer than "
            f"max_seq_length={max_seq_length}{shown}",
            file=sys.stderr,
        )
    truncated = sum(p.truncated for p in pairs)
    if truncated:
        print(
            f"truncated {truncated} of {len(pairs)} pairs to max_seq_length={max_seq_length} tokens: "
            f"{prompts_cut} prompts lost their start, {completions_cut} pairs their completions' ends",
            file=sys.stderr,
        )
    return pairs


def load_preference_data(
    config: SFTDataConfig, tokenizer: Tokenizer
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Training and validation pairs, each split numbered from 0; validation is `val_path`, else a seeded
    `val_fraction` of the pairs. The `data:` section is SFT's: path, val_path, val_fraction, max_seq_length
    (a prompt plus its longer completion), strict and seed mean the same for pairs; packing does not apply."""
    if config.packing:
        raise InvalidInput("data.packing is for SFT examples; preference pairs run as pairs: set data.packing false")
    path = Path(config.path)
    records = read_pairs(path, config.strict)
    if config.val_path is not None:
        val_records = read_pairs(config.val_path, config.strict)
    elif config.val_fraction > 0:
        records, val_records = hold_out(records, config.val_fraction, config.seed, path)
    else:
        val_records = []
    splits = []
    for split, split_records, where in (("training", records, path), ("validation", val_records, config.val_path)):
        pairs = tokenize_pairs(split_records, tokenizer, config.max_seq_length)
        if split_records and not pairs:
            raise InvalidInput(
                f"no {split} pairs left in {where or path}: every prompt is longer than "
                f"max_seq_length={config.max_seq_length}; raise max_seq_length or shorten the prompts"
            )
        splits.append(pairs)
    return splits[0], splits[1]


# --- batching ---
def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of P pairs, one row each: the prompt once, then the chosen and the rejected completion side by side.

        row:        [ prompt[:-1] | prompt[-1] chosen[:-1] | prompt[-1] rejected[:-1] | padding ]
        positions     0 .. p-2      p-1 ..                  p-1 ..
        sees          itself        the prompt and itself   the prompt and itself

    Each branch reads the prompt's last token and its completion but its last token at the positions it would
    have alone, so each of its columns predicts one completion token: `targets` holds them (IGNORE_INDEX on the
    prompt and padding), and the rejected branch starts at column `rejected_from` (P,). The attention mask keeps
    the branches apart (the model adds causality); no real column sees padding. So the prompt is computed once per
    pair, and each of a pair's two sequences is exactly what it would be in a row of its own (trl's layout), which
    tests/test_preference_data.py checks. `pair_ids` (P,) holds each pair's `index`. No pairs (a rank past the
    end of the validation pairs) give one padding pair with pair_id -1 and no targets, so that rank still runs.
    """
    if not pairs:
        empty = torch.empty(0, dtype=torch.long)
        pairs = [PreferencePair(empty, empty, empty, index=-1)]
    rows = []
    for pair in pairs:
        prompt = pair.prompt_ids.tolist()
        prefix, seam = prompt[:-1], prompt[-1:]  # an empty prompt: each branch predicts its completion from [1:]
        rows.append((prefix, (seam + pair.chosen_ids.tolist())[:-1], (seam + pair.rejected_ids.tolist())[:-1]))
    T = max([1] + [len(p) + len(c) + len(r) for p, c, r in rows])
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), T), dtype=torch.long)
    branches = -1 - torch.arange(T).repeat(len(rows), 1)  # 0 the prompt, 1 chosen, 2 rejected; padding its own
    rejected_from = torch.zeros(len(rows), dtype=torch.long)
    for b, ((prefix, chosen, rejected), pair) in enumerate(zip(rows, pairs, strict=True)):
        n, start = len(prefix), 0
        for branch, inputs, completion in (
            (0, prefix, None),
            (1, chosen, pair.chosen_ids),
            (2, rejected, pair.rejected_ids),
        ):
            m = len(inputs)
            input_ids[b, start : start + m] = torch.tensor(inputs, dtype=torch.long)
            position_ids[b, start : start + m] = torch.arange(m) + (n if branch else 0)
            branches[b, start : start + m] = branch
            if completion is not None:  # a branch's columns predict its completion's last m tokens (all of them
                targets[b, start : start + m] = completion[len(completion) - m :]  # unless the prompt is empty)
            start += m
        rejected_from[b] = n + len(chosen)
    visible = (branches[:, None, :] == 0) | (branches[:, None, :] == branches[:, :, None])  # (B, query, key)
    return {
        "input_ids": input_ids,
        "targets": targets,
        "position_ids": position_ids,
        "attention_mask": visible[:, None],
        "rejected_from": rejected_from,
        "pair_ids": torch.tensor([p.index for p in pairs]),
    }


def completion_targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected): a batch's targets split into its chosen and its rejected branches, (P, T) each."""
    targets = batch["targets"]
    rejected = torch.arange(targets.shape[1], device=targets.device) >= batch["rejected_from"][:, None]
    return targets.masked_fill(rejected, IGNORE_INDEX), targets.masked_fill(~rejected, IGNORE_INDEX)


class PreferenceLoader(SFTLoader):
    """Endless training batches of pairs: SFTLoader's seeded per-epoch shuffle, rank sharding and exact resume,
    with pairs in place of examples (batch_size counts pairs, a row each: see collate_pairs)."""

    def __init__(
        self,
        pairs: list[PreferencePair],
        batch_size: int,
        seed: int = 0,
        pad_id: int = 0,
        rank: int = 0,
        world_size: int = 1,
        val_pairs: list[PreferencePair] | None = None,
    ):
        if not pairs:
            raise InvalidInput("PreferenceLoader needs at least one training pair")
        super().__init__(pairs, batch_size, seed, pad_id, rank=rank, world_size=world_size, val_examples=val_pairs)

    def _batch(self, rows: list[list[PreferencePair]]) -> dict[str, torch.Tensor]:
        mine = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return collate_pairs([pair for row in mine for pair in row], self.pad_id)

    def val_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every validation pair once, in file order, batched like training; all ranks get as many batches."""
        if not self.val_examples:
            raise InvalidInput("no validation pairs: pass val_pairs (load_preference_data holds out val_fraction)")
        yield from super().val_batches()
