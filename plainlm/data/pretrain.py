"""Pretraining data: text files -> memory-mapped token shards -> fixed-length blocks of tokens.

`prepare_token_shards` tokenizes a folder of `.txt` (one document per file) and `.jsonl` (one document per line,
under "text") files once, in parallel, into raw `uint16` / `uint32` shard files plus an `index.json`; a re-run on
unchanged files reuses them. `PretrainLoader` cuts the token stream into blocks and serves them in a seeded random
order, forever, with an exact resume position, data-parallel ranks and held-out validation blocks.
Instruction and chat data live in sft.py; named public datasets in sources.py.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import sys
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from tqdm import tqdm

from plainlm.checkpoint import atomic_write_text
from plainlm.errors import InvalidInput, MissingInput
from plainlm.tokenizer import TOKENIZER_FILES, Tokenizer

INDEX_FILE = "index.json"
INDEX_FORMAT = "plainlm-token-shards/1"
DOCUMENT_SUFFIXES = (".txt", ".jsonl")
ENCODE_BATCH = 256  # documents per encode_batch call: enough to keep the tokenizers library's threads busy
REPORTED_PROBLEMS = 20  # malformed lines quoted on stderr; the rest are only counted


# --- preparation ---
def prepare_token_shards(
    source: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    shard_tokens: int = 2**26,
    workers: int | None = None,
    strict: bool = False,
) -> Path:
    """Tokenize every .txt / .jsonl file under `source` into token shards in `out_dir`; returns `out_dir`.

    A document becomes its token ids (with BOS if the tokenizer adds one) followed by EOS. Files are read in path
    order and each file's documents in line order, so the shards are the same for any number of `workers`. A
    malformed JSONL line is reported as "file:line: reason" and skipped, or raises with `strict=True`. When the
    source files (names, sizes, mtimes) and the tokenizer files are unchanged since the last run, the shards are reused.
    """
    source, tokenizer_dir, out_dir = Path(source), Path(tokenizer_dir), Path(out_dir)
    files = _source_files(source)
    fingerprint = _fingerprint(source, files, tokenizer_dir)
    if _is_current(out_dir, fingerprint, strict):
        return out_dir
    tokenizer = Tokenizer(tokenizer_dir)
    if tokenizer.eos_id is None:
        raise InvalidInput(f"The tokenizer in {tokenizer_dir} has no EOS token to separate documents with")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    workers = max(1, min(workers or os.cpu_count() or 1, len(files)))

    out_dir.mkdir(parents=True, exist_ok=True)
    # The index marks a finished set of shards: remove it first, so an interrupted rebuild leaves nothing usable.
    (out_dir / INDEX_FILE).unlink(missing_ok=True)
    tasks = [(path, out_dir / f".part-{i:06d}.partial", dtype.name, strict) for i, path in enumerate(files)]
    writer = _ShardWriter(out_dir, dtype, shard_tokens)
    documents, skipped, problems = 0, 0, []
    progress = tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, desc="tokenizing")
    results = _tokenize_all(tasks, tokenizer_dir, tokenizer, workers)
    try:
        for (path, part, _, _), result in zip(tasks, results, strict=True):
            writer.write(part)
            part.unlink()
            documents, skipped = documents + result.documents, skipped + result.skipped
            problems += result.problems[: REPORTED_PROBLEMS - len(problems)]
            progress.update(path.stat().st_size)
        if documents == 0:
            reason = f"{skipped} malformed lines, the first: {problems[0]}" if skipped else "only empty documents"
            raise InvalidInput(f"No text in {source}: its {len(files)} .txt / .jsonl files hold {reason}")
        shards = writer.finish()
    finally:
        results.close()  # stops the worker processes, should an error leave them running
        progress.close()
        writer.close()
        for leftover in out_dir.glob(".*.partial"):
            leftover.unlink()
    for problem in problems:  # each one line, file:line first, as SFT data reports them
        print(problem, file=sys.stderr)
    if skipped:
        shown = f" (the first {len(problems)} above)" if skipped > len(problems) else " (above)"
        advice = "--data.strict true stops at the first"
        print(f"skipped {skipped} malformed lines in {source}{shown}; {advice}", file=sys.stderr)
    index = {
        "format": INDEX_FORMAT,
        "dtype": dtype.name,
        "tokens": sum(shard["tokens"] for shard in shards),
        "documents": documents,
        "skipped_lines": skipped,
        "shards": shards,
        "tokenizer": {
            "name": tokenizer_dir.resolve().name,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
        },
        "source": {"path": str(source.resolve()), "files": len(files), "fingerprint": fingerprint},
    }
    atomic_write_text(out_dir / INDEX_FILE, json.dumps(index, indent=2))
    # Shards of an earlier, larger build that the new index no longer names.
    for stale in set(out_dir.glob("shard-*.bin")) - {out_dir / shard["file"] for shard in shards}:
        stale.unlink()
    return out_dir


def load_token_index(shards_dir: str | Path) -> dict[str, Any]:
    """The `index.json` that `prepare_token_shards` wrote in `shards_dir`."""
    path = Path(shards_dir) / INDEX_FILE
    if not path.is_file():
        raise MissingInput(
            f"No {INDEX_FILE} in {shards_dir}: tokenize a text folder into it first with "
            f"prepare_token_shards(source, tokenizer_dir, {str(shards_dir)!r})"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _source_files(source: Path) -> list[Path]:
    if not source.is_dir():
        raise MissingInput(f"{source} is not a folder: pass a folder of .txt and .jsonl files")
    files = [p for p in source.rglob("*") if p.suffix in DOCUMENT_SUFFIXES and p.is_file()]
    if not files:
        raise MissingInput(
            f"No .txt or .jsonl files in {source}: put one document in each .txt file, or one JSON object "
            'with a "text" key on each line of a .jsonl file'
        )
    return sorted(files, key=lambda p: p.relative_to(source).as_posix())


def _fingerprint(source: Path, files: list[Path], tokenizer_dir: Path) -> str:
    """Changes when a source file is added, removed or touched, or the tokenizer changes."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(source).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            digest.update(name.encode() + (tokenizer_dir / name).read_bytes())
    return digest.hexdigest()


def _is_current(out_dir: Path, fingerprint: str, strict: bool) -> bool:
    """Whether `out_dir` holds complete shards made from exactly this input."""
    if not (out_dir / INDEX_FILE).is_file():
        return False
    index = load_token_index(out_dir)
    if index.get("format") != INDEX_FORMAT or index["source"]["fingerprint"] != fingerprint:
        return False
    if strict and index["skipped_lines"]:
        return False  # rebuild, so that the first malformed line raises
    itemsize = np.dtype(index["dtype"]).itemsize
    return all(
        (out_dir / s["file"]).is_file() and (out_dir / s["file"]).stat().st_size == s["tokens"] * itemsize
        for s in index["shards"]
    )


@dataclass
class _Tokenized:
    """What became of one source file; its tokens are in the task's part file."""

    documents: int
    skipped: int
    problems: list[str]  # the first few "file:line: reason" messages


def _tokenize_all(tasks: list[tuple], tokenizer_dir: Path, tokenizer: Tokenizer, workers: int) -> Iterator[_Tokenized]:
    """The tasks' results in task order; with several workers each runs in its own process."""
    if workers == 1:
        yield from (_tokenize_file(*task, tokenizer) for task in tasks)
        return
    # "spawn": forking a process whose tokenizer and torch thread pools are running can deadlock the child.
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer_dir,)) as pool:
        yield from pool.imap(_tokenize_in_worker, tasks)


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: Path) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism; threads would oversubscribe
    _worker_tokenizer = Tokenizer(tokenizer_dir)


def _tokenize_in_worker(task: tuple) -> _Tokenized:
    return _tokenize_file(*task, _worker_tokenizer)


def _tokenize_file(path: Path, part: Path, dtype: str, strict: bool, tokenizer: Tokenizer) -> _Tokenized:
    """Write the tokens of every document in `path` to `part`, each document ending in EOS."""
    result = _Tokenized(documents=0, skipped=0, problems=[])
    with open(part, "wb") as out:
        documents = _documents(path, strict, result)
        while texts := list(itertools.islice(documents, ENCODE_BATCH)):
            ids = tokenizer.encode_batch(texts, eos=True)
            out.write(np.fromiter(itertools.chain.from_iterable(ids), dtype).tobytes())
            result.documents += len(texts)
    return result


def _documents(path: Path, strict: bool, result: _Tokenized) -> Iterator[str]:
    """The non-empty documents of one file; malformed ones are counted in `result` (or raise when `strict`)."""

    def malformed(where: str, reason: str) -> None:
        if strict:
            raise InvalidInput(f"{where}: {reason}")
        result.skipped += 1
        if len(result.problems) < REPORTED_PROBLEMS:
            result.problems.append(f"{where}: {reason}")

    if path.suffix == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            malformed(str(path), f"not UTF-8 text ({e})")
            return
        if text.strip():
            yield text
        return
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
                malformed(f"{path}:{number}", f"not a JSON line ({e})")
                continue
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                malformed(f"{path}:{number}", f'expected an object with a "text" string, got {line[:60]!r}')
            elif text.strip():
                yield text


class _ShardWriter:
    """Copies tokens into shard files of `shard_tokens` each, under temporary names until `finish`."""

    def __init__(self, out_dir: Path, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.itemsize, self.shard_tokens = out_dir, dtype.itemsize, shard_tokens
        self.counts: list[int] = []  # tokens in each shard so far
        self._file: BinaryIO | None = None  # the shard being filled

    def write(self, part: Path) -> None:
        """Append the tokens of a part file, starting a new shard whenever one is full."""
        with open(part, "rb") as tokens:
            while chunk := tokens.read((self.shard_tokens - (self.counts[-1] if self._file else 0)) * self.itemsize):
                if self._file is None:
                    self._file = open(self._partial(len(self.counts)), "wb")  # noqa: SIM115 (closed in close())
                    self.counts.append(0)
                self._file.write(chunk)
                self.counts[-1] += len(chunk) // self.itemsize
                if self.counts[-1] == self.shard_tokens:
                    self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> list[dict[str, Any]]:
        """Rename the shards into place; returns their index entries."""
        self.close()
        for i in range(len(self.counts)):
            os.replace(self._partial(i), self.out_dir / f"shard-{i:05d}.bin")
        return [{"file": f"shard-{i:05d}.bin", "tokens": count} for i, count in enumerate(self.counts)]

    def _partial(self, i: int) -> Path:
        return self.out_dir / f".shard-{i:05d}.bin.partial"


# --- loading ---
class PretrainLoader:
    """Batches of `block_size` tokens from the shards in `shards_dir`, in a seeded random order, forever.

    The token stream (all shards in order) is cut into back-to-back blocks of `block_size + 1` tokens: `input_ids`
    are a block's first `block_size` tokens, `targets` its last `block_size`. With `val_fraction`, every
    round(1 / val_fraction)-th block is held out for `val_batches()`, so validation samples the whole corpus and
    shares no token with training. Epoch `e` visits the training blocks in a permutation seeded with (seed, e),
    `batch_size` at a time, dropping the last partial batch. Rank `r` of `world_size` takes the global batches
    r, r + world_size, ..., so ranks see disjoint data and all take the same number of steps.
    """

    def __init__(
        self,
        shards_dir: str | Path,
        batch_size: int,
        block_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        val_fraction: float = 0.0,
    ):
        if not 0 <= rank < world_size:
            raise InvalidInput(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
        if not 0.0 <= val_fraction <= 0.5:
            raise InvalidInput(f"val_fraction must be in [0, 0.5], got {val_fraction}")
        self.shards_dir, self.batch_size, self.block_size = Path(shards_dir), batch_size, block_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.info = load_token_index(shards_dir)
        shards = self.info["shards"]
        self._shards = [np.memmap(self.shards_dir / s["file"], self.info["dtype"], mode="r") for s in shards]
        self._shard_starts = np.cumsum([0] + [s["tokens"] for s in shards])[:-1].tolist()

        tokens = self.info["tokens"]
        blocks = np.arange(tokens // (block_size + 1))
        self.val_every = round(1 / val_fraction) if val_fraction else 0
        is_val = blocks % self.val_every == self.val_every - 1 if self.val_every else np.zeros(len(blocks), bool)
        self.train_blocks, self.val_blocks = blocks[~is_val], blocks[is_val]
        need = batch_size * world_size
        if len(self.train_blocks) < need:
            raise InvalidInput(
                f"Too little data in {shards_dir}: {tokens} tokens. A block of block_size {block_size} needs "
                f"{block_size + 1} tokens, and a step needs batch_size x world_size = {need} blocks "
                f"({len(self.train_blocks)} for training here). Add text, or lower block_size or batch_size."
            )
        if val_fraction and len(self.val_blocks) == 0:
            raise InvalidInput(
                f"val_fraction {val_fraction} holds out every {self.val_every}th block, but {shards_dir} "
                f"has only {len(blocks)} blocks of {block_size + 1} tokens: raise val_fraction or add text"
            )
        self.batches_per_epoch = len(self.train_blocks) // need  # for each rank
        self.epoch, self.index = 0, 0  # index: global batches of this epoch taken by all ranks together
        self._order_epoch, self._order = -1, self.train_blocks

    def __iter__(self) -> PretrainLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index >= self.batches_per_epoch * self.world_size:
            self.epoch, self.index = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            # (seed, epoch) rather than seed + epoch: runs with neighbouring seeds share no epoch orders.
            self._order = np.random.default_rng((self.seed, self.epoch)).permutation(self.train_blocks)
            self._order_epoch = self.epoch
        first = (self.index + self.rank) * self.batch_size
        self.index += self.world_size
        return self._batch(self._order[first : first + self.batch_size])

    def val_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The held-out blocks once, in stream order, `batch_size` at a time (the last batch may be smaller).

        With several ranks each takes every world_size-th batch: sum the loss over ranks for the whole set.
        Every rank gets as many batches (a rank past the end gets empty ones, of 0 rows), since a forward pass
        under FSDP needs every rank.
        """
        if len(self.val_blocks) == 0:
            raise InvalidInput("No validation data: create the PretrainLoader with val_fraction > 0")
        step = self.batch_size * self.world_size
        for start in range(0, len(self.val_blocks), step):
            first = start + self.rank * self.batch_size
            yield self._batch(self.val_blocks[first : first + self.batch_size])

    def _batch(self, blocks: np.ndarray) -> dict[str, torch.Tensor]:
        length = self.block_size + 1
        rows = [self._read(int(block) * length, length) for block in blocks]
        x = torch.from_numpy(np.stack(rows).astype(np.int64) if rows else np.zeros((0, length), np.int64))
        return {"input_ids": x[:, :-1].contiguous(), "targets": x[:, 1:].contiguous()}

    def _read(self, start: int, length: int) -> np.ndarray:
        """`length` tokens of the stream from `start`, across shard boundaries."""
        pieces = []
        shard = bisect_right(self._shard_starts, start) - 1
        while length > 0:
            offset = start - self._shard_starts[shard]
            piece = self._shards[shard][offset : offset + length]
            pieces.append(piece)
            start, length, shard = start + len(piece), length - len(piece), shard + 1
        return np.concatenate(pieces)

    def state_dict(self) -> dict[str, int]:
        """The position in the stream; the same on every rank, so rank 0 alone can save it."""
        shape = {"batch_size": self.batch_size, "block_size": self.block_size, "val_every": self.val_every}
        shape["tokens"] = self.info["tokens"]
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, **shape}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in self.state_dict().items():
            if key not in ("epoch", "index", "seed") and state.get(key, value) != value:
                raise InvalidInput(
                    f"The data position was saved with {key} {state[key]}, this loader has {value}: "
                    "resuming would not continue the same stream"
                )
        self.epoch, self.index, self.seed = state["epoch"], state["index"], state["seed"]
        self._order_epoch = -1
