"""Perplexity of text files, without lm-eval: `plainlm evaluate MODEL --perplexity FILE`.

    perplexity(llm, Path("notes.txt"), stride=512)  # -> Perplexity(tokens=..., token_perplexity=..., ...)

A .txt file is one document; a .jsonl file is one document per line, its "text" field. Each document is
scored on its own, every token once: after the prefix token (BOS, or EOS where there is none), windows of
the model's context advance by `stride` tokens, each predicting the tokens the one before did not, with the
rest of its window as context (stride = the context: disjoint windows, lm-eval's rolling log-likelihood;
a smaller stride gives each prediction more context and costs more passes). Token perplexity is
exp(-log-likelihood / tokens); word perplexity the same per whitespace-separated word, and bits per byte
per UTF-8 byte, as lm-eval reports them, so tokenizers of different sizes compare.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from plainlm.api import LLM
from plainlm.errors import InvalidInput, MissingInput
from plainlm.scoring import loglikelihoods


@dataclass
class Perplexity:
    documents: int
    tokens: int
    words: int
    bytes: int
    loglikelihood: float
    token_perplexity: float
    word_perplexity: float
    bits_per_byte: float

    def summary(self) -> str:
        return (
            f"{self.documents} document(s), {self.tokens} tokens, {self.words} words: token perplexity "
            f"{self.token_perplexity:.4f}, word perplexity {self.word_perplexity:.4f}, bits per byte "
            f"{self.bits_per_byte:.4f}"
        )


def read_documents(path: Path, flag: str = "--perplexity") -> list[str]:
    """The documents of a .txt file (one) or a .jsonl file (each line's "text"); `flag` names it in errors."""
    if not path.is_file():
        raise MissingInput(f"{flag} {path}: no such file")
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    documents = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"{path}:{number}: not JSON ({e.msg}); each line must be an object with a text") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InvalidInput(f'{path}:{number}: each line must be an object with a "text" string')
        documents.append(record["text"])
    return documents


def windows(tokens: list[int], prefix_token: int, max_length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that predict every token of `tokens` once (see the module docstring)."""
    sequence = [prefix_token, *tokens]
    pairs = []
    scored = 0
    while scored < len(tokens):
        end = min(scored + stride, len(tokens))
        start = max(0, end - max_length)  # the window's first input, an index into sequence
        pairs.append((sequence[start : scored + 1], tokens[scored:end]))
        scored = end
    return pairs


def perplexity(
    llm: LLM, path: Path, stride: int | None = None, max_length: int | None = None, batch_size: int | None = None
) -> Perplexity:
    """The perplexity of the documents in `path` under `llm` (stride and max_length default to the context)."""
    max_length = max_length or llm.model.config.block_size
    stride = stride or max_length
    if not 1 <= stride <= max_length:
        raise InvalidInput(f"--stride {stride} must be in [1, {max_length}], the context it slides over")
    tokenizer = llm.tokenizer
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    documents = [d for d in read_documents(path) if d.strip()]
    if not documents:
        raise InvalidInput(f"--perplexity {path}: no text to score")
    pairs, tokens = [], 0
    for document in documents:
        ids = tokenizer.encode(document, bos=False)
        tokens += len(ids)
        pairs.extend(windows(ids, prefix, max_length, stride))
    total = sum(logprob for logprob, _ in loglikelihoods(llm.model, pairs, max_length, batch_size, progress=True))
    words = sum(len(re.split(r"\s+", d.strip())) for d in documents)
    size = sum(len(d.encode("utf-8")) for d in documents)
    return Perplexity(
        documents=len(documents),
        tokens=tokens,
        words=words,
        bytes=size,
        loglikelihood=total,
        token_perplexity=math.exp(-total / tokens),
        word_perplexity=math.exp(-total / words),
        bits_per_byte=-total / size / math.log(2),
    )
