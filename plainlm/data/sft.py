"""Finetuning data: instruction and chat records -> token ids with loss masks -> padded or packed batches.

Reading: `.json` (a list) or `.jsonl` files, or a folder of them, holding instruction records (`instruction`,
optional `input`, `output`) or chat records (`messages`: a list of {"role", "content"}), mixed as you like.
Tokenizing: the model's chat template renders each conversation (or the classic Alpaca prompt, for base models);
the loss falls on the assistant turns alone, found by rendering prefixes of the conversation, so any template works.
Batching: `SFTLoader`, a fresh seeded shuffle per epoch, right-padded or packed rows, exact resume.
Named public datasets live in `sources.py`; the batch every loader yields is described in `__init__.py`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from plainlm.data import IGNORE_INDEX
from plainlm.data.sources import resolve_data_path
from plainlm.errors import InvalidInput, MissingInput
from plainlm.tokenizer import Tokenizer

PromptStyle = Literal["chat_template", "alpaca"]
ROLES = ("system", "user", "assistant")
# The Stanford Alpaca prompt, for base models that have no chat template.
ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
MAX_REPORTED = 10  # problems printed one by one; the summary counts them all


@dataclass
class SFTDataConfig:
    """Where finetuning data comes from and how it becomes batches: the `data:` section of a finetune recipe.
    A preference loss (dpo, ...) reads prompt/chosen/rejected pairs (data/preference.py) from the same fields;
    prompt_style, mask_prompt and packing are for SFT records only.

    Args:
        path: A .json or .jsonl file, a folder of them, or a dataset name from sources.py (alpaca, dolly, ...);
            with a preference loss, pairs (data/preference.py).
        val_path: Held-out records; without it, val_fraction of path is held out.
        val_fraction: The fraction of path's records held out for validation when there is no val_path.
        prompt_style: chat_template (the model's own), or alpaca: the classic prompt text, for base models.
        mask_prompt: Take the loss on assistant turns only; false trains on every token.
        max_seq_length: Longer examples are cut (and counted); also the length of a packed row.
        packing: Put several examples in one row, unable to see each other.
        strict: Fail on a malformed record instead of skipping it.
        seed: Seed of the train/validation split.
    """

    path: str = "data/finetune/pirate_train.jsonl"
    val_path: str | None = None
    val_fraction: float = 0.05
    prompt_style: PromptStyle = "chat_template"
    mask_prompt: bool = True
    max_seq_length: int = 1024
    packing: bool = False
    strict: bool = False
    seed: int = 0


@dataclass
class Record:
    data: dict[str, Any]
    source: str  # "file:line" (.jsonl) or "file: record N" (.json), for messages


@dataclass
class Example:
    input_ids: torch.Tensor  # (T,) int64
    targets: torch.Tensor  # (T,) int64: the next token, IGNORE_INDEX where no loss is taken
    source: str = ""
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


# --- reading ---
def data_files(path: str | Path) -> list[Path]:
    """The .json / .jsonl files at `path`: the file itself, or those in the folder (sorted, subfolders too)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file())
        if not files:
            raise MissingInput(f"{path}: no .json or .jsonl files in this folder")
        return files
    if not path.is_file():
        raise MissingInput(f"{path}: no such file or folder")
    if path.suffix not in (".json", ".jsonl"):
        raise InvalidInput(f"{path}: expected a .json file (one list of records) or a .jsonl file (a record a line)")
    return [path]


def json_items(file: Path) -> Iterator[tuple[str, Any, str | None]]:
    """(where, record, problem) for each record of `file`; a malformed .jsonl line gives a problem, not an error."""
    if file.suffix == ".json":
        try:
            items = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InvalidInput(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(items, list):
            raise InvalidInput(f"{file}: expected a list of records, got {type(items).__name__} (one a line: .jsonl)")
        for i, item in enumerate(items):
            yield f"{file}: record {i}", item, None
        return
    with file.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{file}:{n}", None, f"invalid JSON ({e.msg} at column {e.colno})"
                continue
            yield f"{file}:{n}", item, None


def record_problem(data: Any) -> str | None:
    """What is wrong with a record, or None if it is a valid instruction or chat record."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    if "messages" in data:
        messages = data["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return f"messages[{i}] must be {{'role': one of {', '.join(ROLES)}, 'content': a string}}"
        if not any(m["role"] == "assistant" for m in messages):
            return "no assistant message, so nothing to learn"
        return None
    for key in ("instruction", "output"):
        if not isinstance(data.get(key), str):
            wrong = "missing" if key not in data else "not a string"
            return f"{key!r} is {wrong} (an instruction record has 'instruction', 'output'; a chat record 'messages')"
    if data.get("input") is not None and not isinstance(data["input"], str):
        return "'input' must be a string"
    return None


def read_records(
    path: str | Path, strict: bool = False, check: Callable[[Any], str | None] = record_problem
) -> list[Record]:
    """The valid records at `path`; bad ones are reported as "file:line: what is wrong" and skipped (or raise).
    `check` says what is wrong with a record: SFT records by default, preference pairs (preference.py) too."""
    files, records, problems = data_files(path), [], []
    for file in files:
        for source, data, problem in json_items(file):
            problem = problem or check(data)
            if problem is None:
                records.append(Record(data, source))
            elif strict:
                raise InvalidInput(f"{source}: {problem}")
            else:
                problems.append(f"{source}: {problem}")
    for line in problems[:MAX_REPORTED]:
        print(line, file=sys.stderr)
    if problems:
        shown = f" (the first {MAX_REPORTED} above)" if len(problems) > MAX_REPORTED else " (above)"
        total = len(problems) + len(records)
        advice = "--data.strict true stops at the first"
        print(f"skipped {len(problems)} of {total} records in {path}{shown}; {advice}", file=sys.stderr)
    if not records:
        raise InvalidInput(f"no usable records in {', '.join(map(str, files))}")
    return records


# --- tokenizing ---
def to_messages(data: dict[str, Any], prompt_style: PromptStyle = "chat_template") -> list[dict[str, str]]:
    """A record as a conversation: chat records as they are, instruction records as one user/assistant exchange."""
    if "messages" in data:
        return [{"role": m["role"], "content": m["content"]} for m in data["messages"]]
    instruction, input_, output = data["instruction"], data.get("input") or "", data["output"]
    if prompt_style == "alpaca":  # the classic prompt gives the input its own section and header
        system = [{"role": "system", "content": ALPACA_HEADER_WITH_INPUT if input_ else ALPACA_HEADER}]
        user = f"{instruction}\n\n### Input:\n{input_}" if input_ else instruction
    else:
        system, user = [], f"{instruction}\n\n{input_}" if input_ else instruction
    return [*system, {"role": "user", "content": user}, {"role": "assistant", "content": output}]


def render_alpaca(messages: list[dict[str, str]], add_generation_prompt: bool, eos_token: str) -> str:
    """The Alpaca prompt; a system message replaces its header, and further turns repeat its sections."""
    header = messages[0]["content"] if messages and messages[0]["role"] == "system" else ALPACA_HEADER
    parts = [header + "\n\n"]
    for m in messages:
        if m["role"] == "user":
            parts.append(f"### Instruction:\n{m['content']}\n\n")
        elif m["role"] == "assistant":
            parts.append(f"### Response:\n{m['content']}{eos_token}\n\n")
    if add_generation_prompt:
        parts.append("### Response:\n")
    return "".join(parts)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_messages(
    messages: list[dict[str, str]],
    tokenizer: Tokenizer,
    prompt_style: PromptStyle = "chat_template",
    mask_prompt: bool = True,
) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation, and for each whether the model learns it (assistant turns; all if not masking).

    Assistant turn i is what rendering messages[:i+1] adds to messages[:i] plus the generation prompt, up to and
    including the template's end-of-turn (stop) token; what the template writes after that is prompt again.
    """
    if prompt_style == "alpaca" and tokenizer.eos_token is None:
        raise InvalidInput(f"the tokenizer in {tokenizer.checkpoint_dir} has no EOS token to end Alpaca responses")
    # render(messages, add_generation_prompt) -> text. A chat template writes its own BOS; with the Alpaca prompt
    # the tokenizer adds its usual one, if any.
    if prompt_style == "alpaca":
        render, bos = partial(render_alpaca, eos_token=tokenizer.eos_token), None
    else:
        render, bos = tokenizer.apply_chat_template, False
    full = render(messages, False)
    spans = []  # (start, end) characters of each assistant turn in `full`
    for i, m in enumerate(messages if mask_prompt else []):
        if m["role"] != "assistant":
            continue
        before, after = render(messages[:i], True), render(messages[: i + 1], False)
        if not (after.startswith(before) and full.startswith(after)):
            raise InvalidInput(
                f"the chat template ({tokenizer.chat_template_source}) renders a shorter conversation as something "
                f"other than the start of the whole one, so assistant message {i} cannot be located; "
                "use mask_prompt=False or prompt_style='alpaca'"
            )
        spans.append((len(before), len(after)))
    # Token boundaries: where the ids of a prefix stop agreeing with the ids of the whole (a token that straddles a
    # boundary falls on the side after it).
    ids, *prefixes = tokenizer.encode_batch([full] + [full[:c] for span in spans for c in span], bos=bos)
    is_target = [not mask_prompt] * len(ids)
    stop_ids = set(tokenizer.stop_ids)
    for k in range(len(spans)):
        start, end = common_prefix(ids, prefixes[2 * k]), common_prefix(ids, prefixes[2 * k + 1])
        stops = [j for j in range(start, end) if ids[j] in stop_ids]
        end = stops[-1] + 1 if stops else end
        is_target[start:end] = [True] * (end - start)
    return ids, is_target


def tokenize_record(
    record: Record, tokenizer: Tokenizer, prompt_style: PromptStyle, mask_prompt: bool, max_seq_length: int
) -> Example:
    """One example: input_ids and next-token targets, cut to `max_seq_length` tokens."""
    try:
        ids, is_target = tokenize_messages(to_messages(record.data, prompt_style), tokenizer, prompt_style, mask_prompt)
    except ValueError as e:
        raise InvalidInput(f"{record.source}: {e}") from None
    truncated = len(ids) > max_seq_length + 1
    ids, is_target = ids[: max_seq_length + 1], is_target[: max_seq_length + 1]
    targets = [token if learn else IGNORE_INDEX for token, learn in zip(ids[1:], is_target[1:], strict=True)]
    return Example(torch.tensor(ids[:-1]), torch.tensor(targets, dtype=torch.long), record.source, truncated)


def tokenize_records(
    records: list[Record],
    tokenizer: Tokenizer,
    prompt_style: PromptStyle = "chat_template",
    mask_prompt: bool = True,
    max_seq_length: int = 1024,
) -> list[Example]:
    """Examples of `records`; truncations are counted, and examples left with nothing to learn are dropped."""
    examples = [tokenize_record(r, tokenizer, prompt_style, mask_prompt, max_seq_length) for r in records]
    kept = [e for e in examples if (e.targets != IGNORE_INDEX).any()]
    truncated = sum(e.truncated for e in examples)
    if truncated:
        dropped = len(examples) - len(kept)
        print(
            f"truncated {truncated} of {len(examples)} examples to max_seq_length={max_seq_length} tokens"
            + (f"; dropped {dropped} with no response tokens left" if dropped else ""),
            file=sys.stderr,
        )
    return kept


def hold_out(records: list[Record], fraction: float, seed: int, path: Path) -> tuple[list[Record], list[Record]]:
    """(training, validation) records: a seeded `fraction` of them held out, the rest in their order."""
    n_val = max(1, round(len(records) * fraction))
    if n_val >= len(records):
        raise InvalidInput(
            f"{path}: {len(records)} records are too few to hold out val_fraction={fraction}; "
            "add records, pass val_path, or set val_fraction=0"
        )
    is_val = np.zeros(len(records), dtype=bool)
    is_val[np.random.default_rng(seed).permutation(len(records))[:n_val]] = True
    train = [r for r, v in zip(records, is_val, strict=True) if not v]
    return train, [r for r, v in zip(records, is_val, strict=True) if v]


def load_sft_data(config: SFTDataConfig, tokenizer: Tokenizer) -> tuple[list[Example], list[Example]]:
    """Training and validation examples; validation is `val_path`, else a seeded `val_fraction` of the records."""
    path = resolve_data_path(config.path)
    records = read_records(path, config.strict)
    if config.val_path is not None:
        val_records = read_records(resolve_data_path(config.val_path, flag="--data.val_path"), config.strict)
    elif config.val_fraction > 0:
        records, val_records = hold_out(records, config.val_fraction, config.seed, path)
    else:
        val_records = []
    splits = []
    for split, split_records, where in (("training", records, path), ("validation", val_records, config.val_path)):
        examples = tokenize_records(
            split_records, tokenizer, config.prompt_style, config.mask_prompt, config.max_seq_length
        )
        if split_records and not examples:
            raise InvalidInput(
                f"no {split} examples left in {where or path}: every one lost its response to truncation"
            )
        splits.append(examples)
    return splits[0], splits[1]


# --- batching ---
def collate(
    rows: list[list[Example]], pad_id: int, max_seq_length: int | None = None, packed: bool = False
) -> dict[str, torch.Tensor]:
    """A batch by the contract in `__init__.py`: one example per row, right-padded, or several per row, packed.

    Packed rows are `max_seq_length` long; positions restart at 0 for each example and the attention mask is
    block-diagonal, so examples cannot see each other; each padding position sees only itself (no empty rows).
    An empty row is all padding (a rank with no validation examples left still runs the step).
    """
    T = max_seq_length if packed else max([1] + [sum(map(len, row)) for row in rows])
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), T), dtype=torch.long)
    segments = -1 - torch.arange(T).repeat(len(rows), 1)  # padding: a segment per position
    for b, row in enumerate(rows):
        start = 0
        for k, example in enumerate(row):
            n = len(example)
            input_ids[b, start : start + n] = example.input_ids[:n]
            targets[b, start : start + n] = example.targets[:n]
            position_ids[b, start : start + n] = torch.arange(n)
            segments[b, start : start + n] = k
            start += n
    batch = {"input_ids": input_ids, "targets": targets}
    if packed:
        batch["position_ids"] = position_ids
        batch["attention_mask"] = (segments[:, :, None] == segments[:, None, :]).unsqueeze(1)
    return batch


class SFTLoader:
    """Endless training batches: a fresh seeded shuffle each epoch, right-padded or packed rows.

    All ranks walk one stream of examples (epoch e is the permutation seeded by (seed, e)); a step takes
    batch_size * world_size rows from it and each rank keeps its own batch_size of them, so ranks never share
    an example within an epoch. The state is the position in that stream, the same on every rank: one saved
    state resumes them all, with exactly the batch an uninterrupted run would have seen next.
    """

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        seed: int = 0,
        pad_id: int = 0,
        packing: bool = False,
        max_seq_length: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        val_examples: list[Example] | None = None,
    ):
        if not examples:
            raise InvalidInput("SFTLoader needs at least one training example")
        longest = max(len(e) for e in examples + (val_examples or []))
        if packing and (max_seq_length or 0) < longest:
            raise InvalidInput(
                f"packing needs max_seq_length (a packed row's length) >= the longest example, {longest}"
            )
        if not 0 <= rank < world_size:
            raise InvalidInput(f"rank {rank} is outside world_size {world_size}")
        self.examples, self.val_examples = examples, val_examples or []
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self.packing, self.max_seq_length = packing, max_seq_length
        self.rank, self.world_size = rank, world_size
        self.position = 0  # examples taken from the stream so far
        self._order: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))  # (epoch, its permutation)

    @property
    def epoch(self) -> int:
        return self.position // len(self.examples)

    def _example_at(self, position: int) -> Example:
        epoch, i = divmod(position, len(self.examples))
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)))
        return self.examples[self._order[1][i]]

    def _rows(self, example_at: Callable[[int], Example | None], position: int) -> tuple[list[list[Example]], int]:
        """Rows for all ranks' next batches from `position` on (fewer if a finite stream ends), and the new position."""
        rows = []
        while len(rows) < self.batch_size * self.world_size and (example := example_at(position)) is not None:
            row, used, position = [example], len(example), position + 1
            while self.packing and (example := example_at(position)) is not None:
                if used + len(example) > self.max_seq_length:
                    break
                row.append(example)
                used, position = used + len(example), position + 1
            rows.append(row)
        return rows, position

    def _batch(self, rows: list[list[Example]]) -> dict[str, torch.Tensor]:
        mine = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size] or [[]]
        return collate(mine, self.pad_id, self.max_seq_length, self.packing)

    def __iter__(self) -> SFTLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows, self.position = self._rows(self._example_at, self.position)
        return self._batch(rows)

    def val_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every validation example once, in file order, batched like training; all ranks get as many batches."""
        if not self.val_examples:
            raise InvalidInput("no validation examples: pass val_examples (load_sft_data holds out val_fraction)")

        def example_at(position: int) -> Example | None:
            return self.val_examples[position] if position < len(self.val_examples) else None

        position = 0
        while position < len(self.val_examples):
            rows, position = self._rows(example_at, position)
            yield self._batch(rows)

    def state_dict(self) -> dict[str, int]:
        """The position in the example stream; the same on every rank, so rank 0 alone can save it."""
        return {"position": self.position, "num_examples": len(self.examples), "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state["num_examples"], state["seed"]) != (len(self.examples), self.seed):
            raise InvalidInput(
                f"the data position was saved for {state['num_examples']} examples shuffled with seed {state['seed']}, "
                f"but this loader has {len(self.examples)} with seed {self.seed}: resume with the same data and seed"
            )
        self.position = state["position"]
