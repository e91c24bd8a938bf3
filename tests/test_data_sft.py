"""Finetuning data: template-based loss masks, bad records, truncation, loader resume and sharding, packing.

The key claim: a packed batch (block-diagonal attention, positions restarting per example) gives the same loss
as the same examples padded one per row, on a real (tiny, random) GPT.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers_tokenizers import TRAINING_LINES, make_bpe_tokenizer

from plainlm.config import Config
from plainlm.data import IGNORE_INDEX
from plainlm.data.sft import (
    Example,
    Record,
    SFTDataConfig,
    SFTLoader,
    collate,
    load_sft_data,
    read_records,
    tokenize_messages,
    tokenize_record,
    tokenize_records,
)
from plainlm.data.sources import SOURCES, convert_records, prepare_source, read_raw, resolve_data_path
from plainlm.errors import MissingInput
from plainlm.model import GPT
from plainlm.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = TRAINING_LINES[0].split()  # "The quick brown fox ... five dozen liquor jugs."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(make_bpe_tokenizer(tmp_path_factory.mktemp("bpe")))


def learned_text(tokenizer: Tokenizer, example: Example) -> str:
    return tokenizer.decode(example.targets[example.targets != IGNORE_INDEX])


def chat(*turns: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]
    return {"messages": messages}


def sentence(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n)) + "."


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def make_examples(tokenizer: Tokenizer, n: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        lengths = torch.randint(2, 8, (4,), generator=g).tolist()
        turns = [sentence(i + k, length) for k, length in enumerate(lengths)]
        records.append(Record(chat(*turns[: 2 + 2 * (i % 2)]), f"made:{i}"))
    return tokenize_records(records, tokenizer, max_seq_length=200)


# --- masking ---
def test_single_turn_learns_the_reply_and_end_of_turn(tokenizer: Tokenizer) -> None:
    example = tokenize_record(
        Record(chat("Hi there, fox?", "Hello! The fox sleeps."), "t"), tokenizer, "chat_template", True, 512
    )
    assert learned_text(tokenizer, example) == "Hello! The fox sleeps.<|im_end|>"
    # input_ids and targets are the same tokens shifted by one, wherever a target is taken.
    ids = torch.cat([example.input_ids, example.targets[-1:]])
    learned = example.targets != IGNORE_INDEX
    assert torch.equal(example.targets[learned], ids[1:][learned])


def test_multi_turn_learns_every_assistant_turn_and_no_prompt(tokenizer: Tokenizer) -> None:
    record = chat("Q one?", "Answer one.", "Q two?", "Answer two, longer.", "Q three?", system="Be brief.")
    ids, is_target = tokenize_messages(record["messages"], tokenizer)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(record["messages"], add_generation_prompt=False)
    example = tokenize_record(Record(record, "t"), tokenizer, "chat_template", True, 512)
    assert learned_text(tokenizer, example) == "Answer one.<|im_end|>Answer two, longer.<|im_end|>"
    assert "Q two" not in learned_text(tokenizer, example) and sum(is_target) == int((example.targets >= 0).sum())


def test_instruction_record_with_input(tokenizer: Tokenizer) -> None:
    record = Record({"instruction": "Sum these.", "input": "2 and 3", "output": "5"}, "t")
    example = tokenize_record(record, tokenizer, "chat_template", True, 512)
    prompt = tokenizer.decode(example.input_ids)
    assert "Sum these.\n\n2 and 3<|im_end|>" in prompt
    assert learned_text(tokenizer, example) == "5<|im_end|>"


def test_alpaca_prompt_style(tokenizer: Tokenizer) -> None:
    record = Record({"instruction": "Sum these.", "input": "2 and 3", "output": "5"}, "t")
    example = tokenize_record(record, tokenizer, "alpaca", True, 512)
    prompt = tokenizer.decode(example.input_ids)
    assert prompt.startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Instruction:\nSum these.\n\n### Input:\n2 and 3\n\n### Response:\n5" in prompt
    assert learned_text(tokenizer, example) == "5<|im_end|>"


def test_mask_prompt_false_trains_on_everything(tokenizer: Tokenizer) -> None:
    record = Record(chat("Q one?", "Answer one.", "Q two?", "Answer two."), "t")
    example = tokenize_record(record, tokenizer, "chat_template", False, 512)
    assert (example.targets != IGNORE_INDEX).all()
    full = tokenizer.apply_chat_template(record.data["messages"], add_generation_prompt=False)
    assert tokenizer.decode(torch.cat([example.input_ids[:1], example.targets])) == full


def test_truncation_is_counted_and_cut(tokenizer: Tokenizer, capsys: pytest.CaptureFixture) -> None:
    records = [Record(chat("Hi?", sentence(i, 3 + 40 * (i % 2))), f"t:{i}") for i in range(6)]
    examples = tokenize_records(records, tokenizer, max_seq_length=80)
    assert [e.truncated for e in examples] == [False, True] * 3
    assert all(len(e) <= 80 for e in examples) and len(examples[1]) == 80
    assert "truncated 3 of 6 examples to max_seq_length=80" in capsys.readouterr().err
    # An example left with no response tokens teaches nothing: dropped, and said so.
    assert tokenize_records(records[:1], tokenizer, max_seq_length=8) == []
    assert "dropped 1 with no response tokens left" in capsys.readouterr().err


# --- reading ---
def test_malformed_lines_are_reported_and_skipped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = {"instruction": "Say hi.", "output": "Hi."}
    path = write_jsonl(tmp_path / "d.jsonl", [good, '{"instruction": "broken', good, {"instruction": "x"}, chat("hi")])
    records = read_records(path)
    assert [r.source for r in records] == [f"{path}:1", f"{path}:3"]
    err = capsys.readouterr().err
    assert f"{path}:2: invalid JSON" in err
    assert f"{path}:4: 'output' is missing" in err
    assert f"{path}:5: no assistant message" in err
    assert "skipped 3 of 5 records" in err
    with pytest.raises(ValueError, match=f"{path}:2: invalid JSON"):
        read_records(path, strict=True)


def test_json_list_and_folder(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "a", "output": "b"}, chat("c", "d")]))
    write_jsonl(tmp_path / "b.jsonl", [{"instruction": "e", "input": "f", "output": "g"}])
    records = read_records(tmp_path)
    assert [r.source for r in records] == [
        f"{tmp_path / 'a.json'}: record 0",
        f"{tmp_path / 'a.json'}: record 1",
        f"{tmp_path / 'b.jsonl'}:1",
    ]


def test_empty_data_errors_name_the_file(tmp_path: Path, tokenizer: Tokenizer) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no usable records in .*empty.jsonl"):
        read_records(empty)
    with pytest.raises(FileNotFoundError, match="no such file or folder, and not a named dataset"):
        resolve_data_path(tmp_path / "missing.jsonl")
    # A validation file whose every example is truncated away is an empty split: an error naming the file.
    train = write_jsonl(tmp_path / "train.jsonl", [chat("Hi?", "Hello.")])
    val = write_jsonl(tmp_path / "val.jsonl", [chat(sentence(1, 60), "Hello.")])
    config = SFTDataConfig(path=str(train), val_path=str(val), max_seq_length=64)
    with pytest.raises(ValueError, match="no validation examples left in .*val.jsonl"):
        load_sft_data(config, tokenizer)


def test_load_sft_data_holds_out_a_seeded_fraction(tmp_path: Path, tokenizer: Tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [chat(f"Q{i}?", f"A{i}.") for i in range(20)])
    train, val = load_sft_data(SFTDataConfig(path=str(path), val_fraction=0.2, seed=3), tokenizer)
    again = load_sft_data(SFTDataConfig(path=str(path), val_fraction=0.2, seed=3), tokenizer)
    assert (len(train), len(val)) == (16, 4)
    assert [e.source for e in val] == [e.source for e in again[1]]
    assert not {e.source for e in train} & {e.source for e in val}


def test_shipped_finetune_data_reads_cleanly(tokenizer: Tokenizer) -> None:
    for name, (low, high) in {"pirate_train.jsonl": (300, 500), "pirate_heldout.jsonl": (8, 20)}.items():
        records = read_records(REPO / "data" / "finetune" / name, strict=True)
        assert low <= len(records) <= high
        assert all(r.data["output"].startswith("Arr") for r in records)
    train = {r.data["instruction"] for r in read_records(REPO / "data/finetune/pirate_train.jsonl")}
    assert not train & {r.data["instruction"] for r in read_records(REPO / "data/finetune/pirate_heldout.jsonl")}


# --- batching ---
def test_loader_resumes_exactly(tokenizer: Tokenizer) -> None:
    examples = make_examples(tokenizer, 11)
    for packing in (False, True):
        loader = SFTLoader(examples, batch_size=3, seed=1, pad_id=0, packing=packing, max_seq_length=256)
        for _ in range(5):  # past the end of the first epoch
            next(loader)
        state = loader.state_dict()
        expected = [next(loader) for _ in range(4)]
        resumed = SFTLoader(examples, batch_size=3, seed=1, pad_id=0, packing=packing, max_seq_length=256)
        resumed.load_state_dict(state)
        for want, got in zip(expected, [next(resumed) for _ in range(4)], strict=True):
            assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(ValueError, match="resume with the same data and seed"):
        SFTLoader(examples[:10], batch_size=3, seed=1).load_state_dict(state)


def test_epochs_reshuffle_and_cover_every_example(tokenizer: Tokenizer) -> None:
    examples = make_examples(tokenizer, 8)
    loader = SFTLoader(examples, batch_size=4, seed=0)
    epochs = [[tuple(row.tolist()) for _ in range(2) for row in next(loader)["input_ids"]] for _ in range(2)]
    everything = sorted(tuple(e.input_ids.tolist()) for e in examples)
    strip = [[tuple(t for t in row if t != 0) for row in epoch] for epoch in epochs]  # right padding with pad_id 0
    assert sorted(strip[0]) == sorted(strip[1]) == everything and strip[0] != strip[1]


def test_ranks_get_disjoint_examples() -> None:
    examples = [Example(torch.tensor([i]), torch.tensor([i])) for i in range(24)]  # one token: its own index
    seen = []
    for rank in range(3):
        loader = SFTLoader(examples, batch_size=2, seed=5, rank=rank, world_size=3)
        seen.append([int(t) for _ in range(4) for t in next(loader)["targets"].flatten()])
    assert len(set(sum(seen, []))) == 24  # 4 steps x 3 ranks x 2 = one epoch, each example once
    assert all(len(s) == 8 for s in seen)


def test_val_batches_are_deterministic_and_even_across_ranks(tokenizer: Tokenizer) -> None:
    train, val = make_examples(tokenizer, 4), make_examples(tokenizer, 5, seed=1)
    per_rank = [list(SFTLoader(train, 2, rank=r, world_size=2, val_examples=val).val_batches()) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2  # 5 examples: rank 1 has none left for step 2, so one padding row
    assert (per_rank[1][1]["targets"] == IGNORE_INDEX).all()
    targets = sum(int((b["targets"] != IGNORE_INDEX).sum()) for batches in per_rank for b in batches)
    assert targets == sum(int((e.targets != IGNORE_INDEX).sum()) for e in val)
    again = list(SFTLoader(train, 2, rank=0, world_size=2, val_examples=val).val_batches())
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(per_rank[0], again, strict=True))


def test_packed_rows_are_block_diagonal(tokenizer: Tokenizer) -> None:
    a, b = make_examples(tokenizer, 2)
    batch = collate([[a, b]], pad_id=0, max_seq_length=len(a) + len(b) + 3, packed=True)
    n, m = len(a), len(b)
    assert batch["position_ids"][0].tolist() == list(range(n)) + list(range(m)) + [0, 0, 0]
    mask = batch["attention_mask"][0, 0]
    assert mask[:n, :n].all() and mask[n : n + m, n : n + m].all()
    assert not mask[:n, n:].any() and not mask[n : n + m, :n].any()
    assert torch.equal(mask[n + m :, n + m :], torch.eye(3, dtype=torch.bool))  # padding sees only itself
    assert (batch["targets"][0, n + m :] == IGNORE_INDEX).all()


def batch_loss(model: GPT, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(
        batch["input_ids"], position_ids=batch.get("position_ids"), attention_mask=batch.get("attention_mask")
    )
    loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / (batch["targets"] != IGNORE_INDEX).sum()


@pytest.mark.parametrize("position_embedding", ["rope", "learned"])
def test_packed_batch_has_the_loss_of_the_same_examples_unpacked(tokenizer: Tokenizer, position_embedding: str) -> None:
    """RoPE only sees relative positions, so restarting them matters only with learned (GPT-2) positions."""
    examples = make_examples(tokenizer, 12)
    torch.manual_seed(0)
    config = Config(n_layer=2, n_embd=64, n_head=4, vocab_size=tokenizer.vocab_size, block_size=256)
    model = GPT(replace(config, position_embedding=position_embedding)).eval()
    packed_loader = SFTLoader(examples, batch_size=2, seed=4, pad_id=0, packing=True, max_seq_length=256)
    packed = next(packed_loader)
    taken = packed_loader.position
    assert taken > 2  # several examples share a row
    unpacked = next(SFTLoader(examples, batch_size=taken, seed=4, pad_id=0))  # the same examples, one per row
    assert int((packed["targets"] != IGNORE_INDEX).sum()) == int((unpacked["targets"] != IGNORE_INDEX).sum())
    with torch.no_grad():
        loss = batch_loss(model, packed)
        torch.testing.assert_close(loss, batch_loss(model, unpacked), atol=1e-5, rtol=0)
        # The equality is no accident: examples that can see each other give a different loss.
        unmasked = {k: v for k, v in packed.items() if k != "attention_mask"}
        assert abs(batch_loss(model, unmasked) - loss) > 1e-4


# --- named sources (no network: the conversions only) ---
def test_source_conversions(tmp_path: Path) -> None:
    alpaca = [{"instruction": "Add.", "input": "1, 2", "output": "3"}, {"instruction": "x", "input": "", "output": ""}]
    assert list(convert_records("alpaca", iter(alpaca))) == [alpaca[0]]
    dolly = {"instruction": "Who?", "context": "Ann met Bo.", "response": "Ann.", "category": "closed_qa"}
    assert list(convert_records("dolly", iter([dolly]))) == [
        {"instruction": "Who?", "input": "Ann met Bo.", "output": "Ann."}
    ]
    lima = [{"conversations": ["Hi", "Hello", "Bye", "Bye!"], "source": "x"}, {"conversations": ["prompt only"]}]
    (converted,) = convert_records("lima", iter(lima))
    assert [m["role"] for m in converted["messages"]] == ["user", "assistant", "user", "assistant"]
    stories = tmp_path / "stories.txt"
    stories.write_text("Once upon a time.\nThe end.\n<|endoftext|>\nA cat sat.\n<|endoftext|>\n")
    assert list(convert_records("tinystories", read_raw(stories))) == [
        {"text": "Once upon a time.\nThe end."},
        {"text": "A cat sat."},
    ]
    # What the SFT conversions write reads back as valid records.
    path = write_jsonl(tmp_path / "converted.jsonl", [alpaca[0], converted])
    assert len(read_records(path, strict=True)) == 2
    assert set(SOURCES) >= {"alpaca", "dolly", "lima", "tinystories"}


def test_a_named_dataset_offline_is_one_line_saying_where_a_local_copy_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    # Offline with an empty cache, as on a machine without a network (this one has none either).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MissingInput) as caught:
        prepare_source("dolly", out_dir=tmp_path / "data", flag="--data.val_path")
    message = str(caught.value)
    local_copy = tmp_path / "data" / "dolly" / "databricks-dolly-15k.jsonl"
    assert message.startswith("--data.val_path dolly: cannot fetch databricks-dolly-15k.jsonl of https://")
    assert f"put a copy of that file at {local_copy}" in message and "\n" not in message
    # The copy the message asks for is what the next run converts, without the hub.
    local_copy.parent.mkdir(parents=True)
    local_copy.write_text(json.dumps({"instruction": "Who?", "context": "Ann met Bo.", "response": "Ann."}) + "\n")
    converted = prepare_source("dolly", out_dir=tmp_path / "data")
    assert read_records(converted, strict=True)[0].data == {
        "instruction": "Who?",
        "input": "Ann met Bo.",
        "output": "Ann.",
    }
