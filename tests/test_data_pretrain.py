"""plainlm/data/pretrain.py: token shards equal a direct tokenization; the loader's order, resume, ranks, validation.

Loader tests read hand-made shards holding 0, 1, 2, ... so that every token names its own position in the stream.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_tokenizers import make_bpe_tokenizer

from plainlm.data import pretrain
from plainlm.data.pretrain import PretrainLoader, load_token_index, prepare_token_shards
from plainlm.tokenizer import Tokenizer

DOCUMENTS = {
    "b/story.txt": "Once upon a time, a small fox found a red ball.\n\nShe kept it under the old oak tree.",
    "a.txt": "Café, naïve, résumé. Numbers: 3.14159 and 42.\nA second line, then the end.",
    "c.jsonl": [
        "The quick brown fox jumps over the lazy dog.",
        "def forward(self, x):\n    return self.proj(x)",
        "你好，世界！今天天气很好。",
    ],
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


def write_corpus(source: Path, documents: dict = DOCUMENTS) -> Path:
    for name, content in documents.items():
        path = source / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".jsonl"):
            content = "\n".join(json.dumps({"text": text, "id": i}) for i, text in enumerate(content)) + "\n"
        path.write_text(content, encoding="utf-8")
    return source


def expected_tokens(tokenizer: Tokenizer, documents: dict = DOCUMENTS) -> list[int]:
    """Each document's ids plus EOS, in path order (a.txt, b/story.txt, c.jsonl) and line order."""
    ids = []
    for name in sorted(documents):
        texts = documents[name] if name.endswith(".jsonl") else [documents[name]]
        for text in texts:
            ids += tokenizer.encode(text) + [tokenizer.eos_id]
    return ids


def read_shards(shards_dir: Path) -> np.ndarray:
    index = load_token_index(shards_dir)
    return np.concatenate([np.fromfile(shards_dir / s["file"], index["dtype"]) for s in index["shards"]])


def test_shards_equal_direct_tokenization_with_one_or_two_workers(tokenizer_dir: Path, tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "text")
    one = prepare_token_shards(source, tokenizer_dir, tmp_path / "one", shard_tokens=50, workers=1)
    two = prepare_token_shards(source, tokenizer_dir, tmp_path / "two", shard_tokens=50, workers=2)
    tokenizer = Tokenizer(tokenizer_dir)
    expected = expected_tokens(tokenizer)
    assert read_shards(one).tolist() == expected
    assert read_shards(two).tolist() == expected
    assert sorted(os.listdir(one)) == sorted(os.listdir(two))  # no temporary files left behind
    index = load_token_index(one)
    assert index["dtype"] == "uint16" and index["tokens"] == len(expected) and index["documents"] == 5
    assert [s["tokens"] for s in index["shards"]] == [50] * (len(expected) // 50) + [len(expected) % 50]
    assert index["tokenizer"]["vocab_size"] == tokenizer.vocab_size
    assert (read_shards(one) == tokenizer.eos_id).sum() == 5


def test_documents_begin_with_bos_when_the_tokenizer_adds_one(tmp_path: Path) -> None:
    tokenizer_dir = make_bpe_tokenizer(tmp_path / "tok", bos_via_post_processor=True)
    tokenizer = Tokenizer(tokenizer_dir)
    out = prepare_token_shards(write_corpus(tmp_path / "text"), tokenizer_dir, tmp_path / "shards", workers=1)
    tokens = read_shards(out).tolist()
    assert tokens == expected_tokens(tokenizer)
    starts = [0] + [i + 1 for i, t in enumerate(tokens[:-1]) if t == tokenizer.eos_id]
    assert len(starts) == 5 and all(tokens[i] == tokenizer.bos_id for i in starts)


def test_unchanged_input_reuses_shards_and_changed_input_rebuilds(
    tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_corpus(tmp_path / "text")
    out = prepare_token_shards(source, tokenizer_dir, tmp_path / "shards", shard_tokens=40, workers=1)
    n_shards = len(load_token_index(out)["shards"])

    def fail(*args: object) -> None:
        raise AssertionError("tokenized again although nothing changed")

    with monkeypatch.context() as patch:
        patch.setattr(pretrain, "_tokenize_file", fail)
        assert prepare_token_shards(source, tokenizer_dir, out, shard_tokens=40, workers=1) == out
        stat = (source / "c.jsonl").stat()
        os.utime(source / "c.jsonl", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
        with pytest.raises(AssertionError, match="tokenized again"):
            prepare_token_shards(source, tokenizer_dir, out, shard_tokens=40, workers=1)

    changed = {**DOCUMENTS, "a.txt": "Short now."}
    (source / "a.txt").write_text(changed["a.txt"], encoding="utf-8")
    prepare_token_shards(source, tokenizer_dir, out, shard_tokens=40, workers=1)
    assert read_shards(out).tolist() == expected_tokens(Tokenizer(tokenizer_dir), changed)
    index = load_token_index(out)
    assert len(index["shards"]) < n_shards  # the shards of the longer, older build are gone
    assert sorted(p.name for p in out.iterdir()) == ["index.json"] + [s["file"] for s in index["shards"]]


def test_malformed_jsonl_lines_are_reported_and_skipped_or_raise_when_strict(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = tmp_path / "text"
    source.mkdir()
    lines = ['{"text": "first"}', "{not json", '{"title": "no text"}', "", '["a list"]', '{"text": "last"}']
    (source / "bad.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = prepare_token_shards(source, tokenizer_dir, tmp_path / "shards", workers=1)
    reported = capsys.readouterr().err.splitlines()
    # One line per problem, file:line first, then one summary line: no Python warning with a source path.
    problems = [line for line in reported if "bad.jsonl:" in line]
    assert [line.split(": ")[0].rsplit(":", 1)[1] for line in problems] == ["2", "3", "5"]
    assert any(line.startswith("skipped 3 malformed lines") and "--data.strict true" in line for line in reported)
    tokenizer = Tokenizer(tokenizer_dir)
    assert read_shards(out).tolist() == expected_tokens(tokenizer, {"x.jsonl": ["first", "last"]})
    assert load_token_index(out)["skipped_lines"] == 3
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a JSON line"):
        prepare_token_shards(source, tokenizer_dir, tmp_path / "strict", workers=1, strict=True)
    # Reusing shards built with skipped lines would hide them from a strict run.
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        prepare_token_shards(source, tokenizer_dir, out, workers=1, strict=True)


def test_empty_source_folder_is_an_error_naming_it(tokenizer_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty-corpus"
    empty.mkdir()
    (empty / "notes.md").write_text("not a document")
    with pytest.raises(FileNotFoundError, match="No .txt or .jsonl files in .*empty-corpus"):
        prepare_token_shards(empty, tokenizer_dir, tmp_path / "shards")
    (empty / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="No text in .*empty-corpus"):
        prepare_token_shards(empty, tokenizer_dir, tmp_path / "shards")
    assert not (tmp_path / "shards" / "index.json").exists()


# --- the loader ---
def write_counting_shards(directory: Path, n_tokens: int, shard_tokens: int = 97) -> Path:
    """Shards in prepare_token_shards' format holding 0, 1, ..., n_tokens - 1."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens, shards = np.arange(n_tokens, dtype=np.uint16), []
    for i, start in enumerate(range(0, n_tokens, shard_tokens)):
        tokens[start : start + shard_tokens].tofile(directory / f"shard-{i:05d}.bin")
        shards.append({"file": f"shard-{i:05d}.bin", "tokens": len(tokens[start : start + shard_tokens])})
    index = {"format": pretrain.INDEX_FORMAT, "dtype": "uint16", "tokens": n_tokens, "shards": shards}
    (directory / "index.json").write_text(json.dumps(index))
    return directory


def take(loader: PretrainLoader, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def starts(batches: list[dict[str, torch.Tensor]]) -> list[int]:
    return [int(row[0]) for batch in batches for row in batch["input_ids"]]


def test_batches_follow_the_contract_on_real_shards(tokenizer_dir: Path, tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "text")
    out = prepare_token_shards(source, tokenizer_dir, tmp_path / "shards", shard_tokens=30, workers=1)
    stream = torch.tensor(read_shards(out).astype(np.int64))
    loader = PretrainLoader(out, batch_size=2, block_size=8)
    for batch in take(loader, 3 * loader.batches_per_epoch):
        assert set(batch) == {"input_ids", "targets"}
        for name in ("input_ids", "targets"):
            assert batch[name].shape == (2, 8) and batch[name].dtype == torch.int64 and batch[name].is_contiguous()
        for inputs, targets in zip(batch["input_ids"], batch["targets"], strict=True):
            start = next(s for s in range(0, len(stream), 9) if torch.equal(stream[s : s + 8], inputs))
            assert torch.equal(targets, stream[start + 1 : start + 9])  # the inputs shifted by one


def test_each_epoch_is_a_seeded_permutation_of_non_overlapping_blocks(tmp_path: Path) -> None:
    data = write_counting_shards(tmp_path / "shards", 16 * 11 + 5)  # 16 blocks of 10 + 1 tokens, 5 left over
    loader = PretrainLoader(data, batch_size=4, block_size=10, seed=3)
    assert len(loader.train_blocks) == 16 and loader.batches_per_epoch == 4
    epochs = [starts(take(loader, 4)) for _ in range(3)]
    assert all(sorted(epoch) == list(range(0, 176, 11)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert starts(take(PretrainLoader(data, batch_size=4, block_size=10, seed=3), 4)) == epochs[0]
    assert starts(take(PretrainLoader(data, batch_size=4, block_size=10, seed=4), 4)) != epochs[0]
    batch = next(PretrainLoader(data, batch_size=4, block_size=10))
    for inputs, targets in zip(batch["input_ids"], batch["targets"], strict=True):  # rows cross shards of 97
        assert inputs.tolist() == list(range(int(inputs[0]), int(inputs[0]) + 10))
        assert targets.tolist() == (inputs + 1).tolist()


def test_restored_loader_continues_with_exactly_the_same_batches(tmp_path: Path) -> None:
    data = write_counting_shards(tmp_path / "shards", 500)
    loader = PretrainLoader(data, batch_size=3, block_size=16, seed=7)  # 29 blocks: 9 batches an epoch
    take(loader, 8)
    state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint stores it
    expected = take(loader, 15)  # across the end of the epoch
    restored = PretrainLoader(data, batch_size=3, block_size=16, seed=0)
    restored.load_state_dict(state)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(take(restored, 15), expected, strict=True))
    with pytest.raises(ValueError, match="block_size 16"):
        PretrainLoader(data, batch_size=3, block_size=8).load_state_dict(state)


def test_two_ranks_together_take_the_batches_of_one_rank(tmp_path: Path) -> None:
    data = write_counting_shards(tmp_path / "shards", 1000)
    single = starts(take(PretrainLoader(data, batch_size=4, block_size=10, seed=1), 12))  # 90 blocks, 22 batches
    ranks = [PretrainLoader(data, batch_size=4, block_size=10, seed=1, rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == 11
    per_rank = [take(rank, 6) for rank in ranks]
    interleaved = [batch for pair in zip(*per_rank, strict=True) for batch in pair]
    assert starts(interleaved) == single
    assert not set(starts(per_rank[0])) & set(starts(per_rank[1]))
    assert ranks[0].state_dict() == ranks[1].state_dict()


def test_validation_blocks_are_spread_ordered_repeatable_and_disjoint_from_training(tmp_path: Path) -> None:
    data = write_counting_shards(tmp_path / "shards", 1000)  # 90 blocks of 11 tokens
    loader = PretrainLoader(data, batch_size=4, block_size=10, val_fraction=0.2)
    assert loader.val_blocks.tolist() == list(range(4, 90, 5))  # every 5th block
    val = list(loader.val_batches())
    assert [b["input_ids"].shape[0] for b in val] == [4, 4, 4, 4, 2]
    assert starts(val) == [11 * block for block in range(4, 90, 5)]
    assert all(torch.equal(a["targets"], b["targets"]) for a, b in zip(val, loader.val_batches(), strict=True))

    def tokens(batches: list[dict[str, torch.Tensor]]) -> set[int]:
        return {int(t) for b in batches for name in ("input_ids", "targets") for t in b[name].flatten()}

    train = take(loader, loader.batches_per_epoch)  # one epoch: all 72 training blocks
    assert not tokens(train) & tokens(val)
    assert tokens(train) | tokens(val) == set(range(990))
    ranks = [PretrainLoader(data, 4, 10, rank=r, world_size=2, val_fraction=0.2) for r in (0, 1)]
    assert sorted(starts(list(ranks[0].val_batches())) + starts(list(ranks[1].val_batches()))) == starts(val)


def test_too_little_data_says_how_much_there_is_and_what_is_needed(tmp_path: Path) -> None:
    data = write_counting_shards(tmp_path / "shards", 100)
    with pytest.raises(ValueError, match=r"100 tokens\. A block of block_size 128 needs 129 tokens"):
        PretrainLoader(data, batch_size=1, block_size=128)
    with pytest.raises(ValueError, match=r"batch_size x world_size = 8 blocks"):
        PretrainLoader(data, batch_size=4, block_size=16, world_size=2)
    with pytest.raises(ValueError, match="raise val_fraction"):
        PretrainLoader(data, batch_size=1, block_size=16, val_fraction=0.1)
    with pytest.raises(FileNotFoundError, match="prepare_token_shards"):
        PretrainLoader(tmp_path, batch_size=1, block_size=16)
