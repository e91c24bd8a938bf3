"""Preference data: trl's record formats, trl's DPO token ids, truncation, bad records, paired batches, resume, ranks.

The key claims: a record gives the prompt / chosen / rejected ids trl 1.16's DPOTrainer gives it (its own
`_prepare_dataset`, on tokenizers trained here and on SmolLM2's), and a batch holds what trl's
DataCollatorForPreference holds, in plainlm's form: shifted input_ids / targets, a pair's prompt computed once.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers_tokenizers import make_bpe_tokenizer, make_sentencepiece_tokenizer

from plainlm.data import IGNORE_INDEX
from plainlm.data.preference import (
    PreferenceLoader,
    PreferencePair,
    collate_pairs,
    completion_targets,
    explicit_pair,
    extract_prompt,
    load_preference_data,
    read_pairs,
    tokenize_pair,
    tokenize_pairs,
    truncate_pair,
)
from plainlm.data.sft import Record, SFTDataConfig
from plainlm.errors import PackagedModelMissing
from plainlm.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


CONVERSATIONAL = {
    "prompt": [{"role": "system", "content": "Be brief."}, user("Why is the sky blue?")],
    "chosen": [assistant("Arr, the air be scatterin' blue light, matey!")],
    "rejected": [assistant("The air scatters blue light the most.")],
}
STANDARD = {"prompt": "Q: Why is the sky blue?\nA:", "chosen": " Arr, scatterin' it be!", "rejected": " Scattering."}
IMPLICIT_CONVERSATIONAL = {
    "chosen": [user("Hi, fox?"), assistant("Ahoy!"), user("Jump?"), assistant("Aye, over the dog.")],
    "rejected": [user("Hi, fox?"), assistant("Ahoy!"), user("Jump?"), assistant("Yes, over the dog.")],
}
IMPLICIT_STANDARD = {"chosen": "The quick brown fox jumps over the dog.", "rejected": "The quick brown fox sleeps."}
RECORDS = {
    "conversational": CONVERSATIONAL,
    "standard": STANDARD,
    "implicit_conversational": IMPLICIT_CONVERSATIONAL,
    "implicit_standard": IMPLICIT_STANDARD,
}


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "bpe": make_bpe_tokenizer(root / "bpe"),  # SmolLM2-shaped: ChatML, no BOS on raw text
        "bpe_bos": make_bpe_tokenizer(root / "bpe_bos", bos_via_post_processor=True),  # Llama-3-shaped BOS
        "spm": make_sentencepiece_tokenizer(root / "spm"),  # Llama 2: BOS on raw text, the template writes its own
    }


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dirs: dict[str, Path]) -> Tokenizer:
    return Tokenizer(tokenizer_dirs["bpe"])


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def make_pair(i: int, prompt: int = 3, chosen: int = 2, rejected: int = 3) -> PreferencePair:
    """Pair i with recognisable ids: prompt 100+i, chosen 200+i, rejected 300+i (ints, no tokenizer needed)."""
    return PreferencePair(
        torch.full((prompt,), 100 + i), torch.full((chosen,), 200 + i), torch.full((rejected,), 300 + i), index=i
    )


# --- trl, the reference ---
def trl_tokenized(records: list[dict], hf_tokenizer: Any) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt_ids, chosen_ids, rejected_ids) of each record by trl's DPOTrainer._prepare_dataset itself (prompt
    extraction, EOS, tokenization), without a model: it needs only the tokenizer and three of DPOConfig's fields."""
    datasets = pytest.importorskip("datasets")
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    datasets.disable_progress_bars()
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    trainer = SimpleNamespace(_tokenizer=hf_tokenizer)
    dataset = dpo_trainer.DPOTrainer._prepare_dataset(
        trainer, datasets.Dataset.from_list(records), hf_tokenizer, args, "test"
    )
    return [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in dataset]


def hf_tokenizer(directory: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Any]:
    """SmolLM2-135M-Instruct's tokenizer, ours from the packaged GGUF and transformers' from the same file."""
    transformers = pytest.importorskip("transformers")
    from plainlm.convert.gguf_reader import read_gguf
    from plainlm.convert.gguf_tokenizer import write_tokenizer_files
    from plainlm.packaged_models import smollm2_gguf

    try:
        path = smollm2_gguf()
    except PackagedModelMissing as e:
        pytest.skip(str(e))
    directory = tmp_path_factory.mktemp("smollm2")
    write_tokenizer_files(read_gguf(path), directory)
    return Tokenizer(directory), transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# --- reading ---
def test_the_three_record_formats_parse(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", list(RECORDS.values()))
    conversational, standard, implicit_conversational, implicit_standard = (r.data for r in read_pairs(path))
    assert conversational == CONVERSATIONAL and standard == STANDARD
    assert implicit_conversational == {
        "prompt": IMPLICIT_CONVERSATIONAL["chosen"][:3],
        "chosen": [assistant("Aye, over the dog.")],
        "rejected": [assistant("Yes, over the dog.")],
    }
    # The shared text up to the first difference, less the space that ends it.
    assert implicit_standard == {
        "prompt": "The quick brown fox",
        "chosen": " jumps over the dog.",
        "rejected": " sleeps.",
    }


@pytest.mark.parametrize(
    "example",
    [
        IMPLICIT_STANDARD,
        IMPLICIT_CONVERSATIONAL,
        {"chosen": "Q: hi? A: yes", "rejected": "Q: hi? A: no"},  # differs right after a space
        {"chosen": "Q: hi?A: yes", "rejected": "Q: hi?A: no"},
        {"chosen": "Q: hi? A: yes", "rejected": "Q: hi? A: yes, and more"},  # one is the start of the other
        {"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("b"), user("c"), assistant("d")]},
        {"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("c")]},
    ],
)
def test_implicit_prompt_is_trls_extract_prompt(example: dict) -> None:
    data_utils = pytest.importorskip("trl.data_utils")
    theirs = data_utils.extract_prompt(example)
    assert extract_prompt(example["chosen"], example["rejected"]) == (
        theirs["prompt"],
        theirs["chosen"],
        theirs["rejected"],
    )


def test_malformed_records_are_reported_with_file_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = [
        '{"prompt": "broken',
        {"prompt": "Q?", "chosen": "A."},
        {"prompt": "Q?", "chosen": "A.", "rejected": 3},
        {"prompt": [user("Q?")], "chosen": [{"role": "pirate", "content": "Arr"}], "rejected": [assistant("No.")]},
        {"prompt": "Q?", "chosen": [assistant("A.")], "rejected": [assistant("B.")]},
        {"prompt": [assistant("Q?")], "chosen": [assistant("A.")], "rejected": [assistant("B.")]},
        {"chosen": [user("a"), assistant("b")], "rejected": [user("c"), assistant("b")]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [STANDARD, *bad])
    assert [r.source for r in read_pairs(path)] == [f"{path}:1"]
    err = capsys.readouterr().err
    assert f"{path}:2: invalid JSON" in err
    assert f"{path}:3: 'rejected' is missing" in err
    assert f"{path}:4: 'rejected' must be a string or a list of messages, not int" in err
    assert f"{path}:5: chosen[0] must be {{'role': one of system, user, assistant" in err
    assert f"{path}:6: 'prompt', 'chosen', 'rejected' must all be strings or all lists of messages" in err
    assert f"{path}:7: the prompt must end with a user message" in err
    assert f"{path}:8: 'chosen' and 'rejected' differ from their start, so there is no prompt" in err
    assert "skipped 7 of 8 records" in err
    with pytest.raises(ValueError, match=f"{path}:2: invalid JSON"):
        read_pairs(path, strict=True)


def test_identical_chosen_and_rejected_are_counted_and_skipped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    same = [
        {"prompt": "Q?", "chosen": " A.", "rejected": " A."},
        {"chosen": IMPLICIT_CONVERSATIONAL["chosen"], "rejected": IMPLICIT_CONVERSATIONAL["chosen"]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [same[0], STANDARD, same[1]])
    assert [r.source for r in read_pairs(path, strict=True)] == [f"{path}:2"]  # not malformed: strict reads on
    assert f"skipped 2 of 3 pairs whose chosen and rejected are the same: {path}:1, {path}:3" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no usable pairs in .*every pair's chosen and rejected are the same"):
        read_pairs(write_jsonl(tmp_path / "same.jsonl", same))


# --- tokenizing: trl's ids ---
@pytest.mark.parametrize("kind", ["bpe", "bpe_bos", "spm"])
@pytest.mark.parametrize("format", list(RECORDS))
def test_ids_equal_trls_dpo_tokenization(tokenizer_dirs: dict[str, Path], kind: str, format: str) -> None:
    ours = Tokenizer(tokenizer_dirs[kind])
    (expected,) = trl_tokenized([RECORDS[format]], hf_tokenizer(tokenizer_dirs[kind]))
    assert tokenize_pair(explicit_pair(RECORDS[format]), ours) == expected


@pytest.mark.slow  # transformers reads SmolLM2's tokenizer out of the GGUF file: ~15 s
def test_ids_equal_trls_on_smollm2(smollm2: tuple[Tokenizer, Any]) -> None:
    ours, theirs = smollm2
    records = [json.loads(line) for line in (REPO / "data/preference/pirate_pairs.jsonl").read_text().splitlines()]
    records = records[:8]
    expected = trl_tokenized(records, theirs)
    got = [tokenize_pair(explicit_pair(r), ours) for r in records]
    assert got == expected
    prompt, chosen, _ = got[0]
    assert ours.decode(prompt).endswith("<|im_start|>assistant\n")
    assert ours.decode(chosen) == records[0]["chosen"][0]["content"] + "<|im_end|>\n"
    (standard,) = trl_tokenized([STANDARD], theirs)  # and a raw-text record: EOS appended, no BOS (SmolLM2 adds none)
    assert tokenize_pair(STANDARD, ours) == standard and standard[1][-1] == ours.eos_id


def branch_sequence(batch: dict[str, torch.Tensor], row: int, rejected: bool) -> tuple[torch.Tensor, ...]:
    """A pair's chosen or rejected branch read back as the row of its own it stands for: the columns its last
    column sees, in order, as (input ids, positions, targets)."""
    targets = completion_targets(batch)[int(rejected)][row]
    last = int((targets != IGNORE_INDEX).nonzero().max())
    seen = batch["attention_mask"][row, 0, last, : last + 1].nonzero().squeeze(1)
    return batch["input_ids"][row, seen], batch["position_ids"][row, seen], targets[seen]


def test_batch_holds_trls_collated_sequences(tokenizer_dirs: dict[str, Path]) -> None:
    """trl feeds each whole sequence in a row of its own and scores the tokens of completion_mask[:, 1:] from the
    logits before them; plainlm's row holds both of a pair's sequences, each branch seeing the prompt and itself at
    its own positions: read back, each is trl's sequence but its last token, scoring the same tokens."""
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    ours, theirs = Tokenizer(tokenizer_dirs["spm"]), hf_tokenizer(tokenizer_dirs["spm"])
    records = [CONVERSATIONAL, {**CONVERSATIONAL, "rejected": [assistant("No.")]}]
    tokenized = trl_tokenized(records, theirs)
    trl_batch = dpo_trainer.DataCollatorForPreference(pad_token_id=0)(
        [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in tokenized]
    )
    pairs = tokenize_pairs([Record(explicit_pair(r), f"r:{i}") for i, r in enumerate(records)], ours)
    batch = collate_pairs(pairs, pad_id=0)
    assert batch["input_ids"].shape[0] == len(pairs) and batch["pair_ids"].tolist() == [0, 1]
    for b in range(2 * len(pairs)):  # trl's rows: the chosen sequences, then the rejected ones
        inputs, positions, targets = branch_sequence(batch, b % len(pairs), rejected=b >= len(pairs))
        read = trl_batch["attention_mask"][b, 1:].bool()
        assert torch.equal(inputs, trl_batch["input_ids"][b, :-1][read])
        assert torch.equal(positions, torch.arange(len(inputs)))
        scored = trl_batch["completion_mask"][b, 1:][read].bool()
        assert torch.equal(targets != IGNORE_INDEX, scored)
        assert torch.equal(targets[scored], trl_batch["input_ids"][b, 1:][read][scored])


def test_targets_fall_on_completions_only(tokenizer: Tokenizer) -> None:
    pairs = tokenize_pairs([Record(CONVERSATIONAL, "c"), Record(STANDARD, "s")], tokenizer)
    batch = collate_pairs(pairs, pad_id=tokenizer.eos_id)
    chosen, rejected = completion_targets(batch)
    learned = [tokenizer.decode(row[row != IGNORE_INDEX]) for row in torch.cat([chosen, rejected])]
    assert learned == [
        "Arr, the air be scatterin' blue light, matey!<|im_end|>\n",
        " Arr, scatterin' it be!<|im_end|>",
        "The air scatters blue light the most.<|im_end|>\n",
        " Scattering.<|im_end|>",
    ]
    for b, pair in enumerate(pairs):
        # [prompt[:-1] | prompt[-1] chosen[:-1] | prompt[-1] rejected[:-1] | padding]: only the branches predict.
        n, c, r = len(pair.prompt_ids) - 1, len(pair.chosen_ids), len(pair.rejected_ids)
        row = batch["targets"][b]
        assert (row[:n] == IGNORE_INDEX).all() and (row[n + c + r :] == IGNORE_INDEX).all()  # prompt, padding
        assert torch.equal(row[n : n + c], pair.chosen_ids) and torch.equal(row[n + c : n + c + r], pair.rejected_ids)
        assert batch["rejected_from"][b] == n + c


def test_an_empty_prompt_scores_each_completion_from_its_second_token() -> None:
    """As trl does with nothing before a completion: its first token has no logits before it."""
    pair = PreferencePair(torch.tensor([], dtype=torch.long), torch.tensor([5, 6, 7]), torch.tensor([8, 9]))
    batch = collate_pairs([pair], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 8]] and batch["position_ids"].tolist() == [[0, 1, 0]]
    assert batch["targets"].tolist() == [[6, 7, 9]] and batch["rejected_from"].tolist() == [2]
    assert batch["attention_mask"][0, 0].tolist() == [[True, True, False], [True, True, False], [False, False, True]]


# --- truncation ---
def test_truncation_cuts_the_prompts_start_then_the_completions_end() -> None:
    prompt, chosen, rejected = list(range(10)), list(range(100, 106)), list(range(200, 203))
    assert truncate_pair(prompt, chosen, rejected, 16) == (prompt, chosen, rejected)  # fits: untouched
    # Cutting the prompt's start suffices: 8 of its tokens stay, its end.
    assert truncate_pair(prompt, chosen, rejected, 14) == (prompt[2:], chosen, rejected)
    # The prompt keeps at least max_seq_length // 2 tokens; the completions then lose their ends.
    assert truncate_pair(prompt, chosen, rejected, 10) == (prompt[5:], chosen[:5], rejected)
    assert truncate_pair(prompt, chosen, rejected, 8) == (prompt[6:], chosen[:4], rejected[:3])
    # ... or all of itself if shorter.
    assert truncate_pair(prompt[:3], chosen, rejected, 8) == (prompt[:3], chosen[:5], rejected)


def test_truncation_is_counted(tokenizer: Tokenizer, capsys: pytest.CaptureFixture) -> None:
    long_answer = " ".join(["The quick brown fox jumps over the lazy dog."] * 8)
    records = [
        Record({**STANDARD, "chosen": long_answer if i % 2 else " Yes."}, f"t:{i}")  # odd: 80 tokens or so
        for i in range(6)
    ]
    pairs = tokenize_pairs(records, tokenizer, max_seq_length=40)
    assert [p.truncated for p in pairs] == [False, True] * 3
    assert all(len(p) <= 40 for p in pairs) and len(pairs[1]) == 40
    assert torch.equal(pairs[1].prompt_ids, pairs[0].prompt_ids)  # the prompt is short: only completions are cut
    assert [p.index for p in pairs] == list(range(6))
    assert "truncated 3 of 6 pairs to max_seq_length=40 tokens: 0 prompts lost their start, 3 pairs" in (
        capsys.readouterr().err
    )


def test_a_prompt_longer_than_max_seq_length_is_skipped_with_its_file_line(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture
) -> None:
    long_question = {**STANDARD, "prompt": "Q: " + "The quick brown fox jumps. " * 10 + "\nA:"}
    path = write_jsonl(tmp_path / "d.jsonl", [STANDARD, long_question, STANDARD])
    pairs = tokenize_pairs(read_pairs(path), tokenizer, max_seq_length=32)
    n = len(tokenize_pair(long_question, tokenizer)[0])
    assert [p.source for p in pairs] == [f"{path}:1", f"{path}:3"] and [p.index for p in pairs] == [0, 1]
    err = capsys.readouterr().err
    assert f"{path}:2: prompt of {n} tokens is longer than max_seq_length 32: raise max_seq_length or shorten it" in err
    assert "skipped 1 of 3 pairs whose prompt alone is longer than max_seq_length=32" in err
    # Nothing left: one error naming the file.
    only_long = write_jsonl(tmp_path / "long.jsonl", [long_question])
    with pytest.raises(ValueError, match="no training pairs left in .*long.jsonl: every prompt is longer"):
        load_preference_data(SFTDataConfig(path=str(only_long), val_fraction=0, max_seq_length=32), tokenizer)


# --- batching ---
def test_a_pairs_chosen_and_rejected_share_its_row_and_prompt(tokenizer: Tokenizer) -> None:
    records = [Record(explicit_pair(r), f"r:{i}") for i, r in enumerate(RECORDS.values())]
    pairs = tokenize_pairs(records, tokenizer)
    batch = next(PreferenceLoader(pairs, batch_size=4, seed=2, pad_id=tokenizer.eos_id))
    assert batch["input_ids"].shape[0] == batch["targets"].shape[0] == 4
    assert batch["input_ids"].dtype == batch["targets"].dtype == batch["pair_ids"].dtype == torch.int64
    assert sorted(batch["pair_ids"].tolist()) == [0, 1, 2, 3] and batch["pair_ids"].tolist() != [0, 1, 2, 3]
    for i, pair_id in enumerate(batch["pair_ids"].tolist()):
        pair = pairs[pair_id]
        for completion, rejected in ((pair.chosen_ids, False), (pair.rejected_ids, True)):
            inputs, _, targets = branch_sequence(batch, i, rejected)
            assert torch.equal(inputs, torch.cat([pair.prompt_ids, completion[:-1]]))
            assert torch.equal(targets[targets != IGNORE_INDEX], completion)


def test_loader_resumes_exactly() -> None:
    pairs = [make_pair(i, prompt=2 + i % 3, chosen=1 + i % 4) for i in range(7)]
    loader = PreferenceLoader(pairs, batch_size=3, seed=1)
    for _ in range(5):  # past the end of the first epoch
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(4)]
    resumed = PreferenceLoader(pairs, batch_size=3, seed=1)
    resumed.load_state_dict(state)
    for want, got in zip(expected, [next(resumed) for _ in range(4)], strict=True):
        assert (
            want.keys()
            == got.keys()
            == {"input_ids", "targets", "position_ids", "attention_mask", "rejected_from", "pair_ids"}
        )
        assert all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(ValueError, match="resume with the same data and seed"):
        PreferenceLoader(pairs[:6], batch_size=3, seed=1).load_state_dict(state)


def test_two_ranks_cover_every_pair_once_per_epoch() -> None:
    pairs = [make_pair(i) for i in range(12)]
    loaders = [PreferenceLoader(pairs, batch_size=2, seed=5, rank=r, world_size=2) for r in range(2)]
    epochs = []
    for _ in range(2):  # 3 steps x 2 ranks x 2 pairs = one epoch
        batches = [next(loader) for _ in range(3) for loader in loaders]
        ids = [i for b in batches for i in b["pair_ids"].tolist()]
        assert sorted(ids) == list(range(12))
        for b in batches:  # each row holds its own pair: the ids say which
            # [prompt[:2] | prompt[2] chosen[0] | prompt[2] rejected[:2]]
            assert torch.equal(b["input_ids"][:, 0], 100 + b["pair_ids"])
            assert torch.equal(b["input_ids"][:, 5], 300 + b["pair_ids"])
        epochs.append(ids)
    assert epochs[0] != epochs[1]  # a fresh shuffle each epoch


def test_val_batches_number_pairs_in_their_split_and_pad_short_ranks(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture
) -> None:
    records = [{**STANDARD, "prompt": f"Q{i}: Why?\nA:"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    train, val = load_preference_data(SFTDataConfig(path=str(path), val_fraction=0.25, seed=3), tokenizer)
    assert (len(train), len(val)) == (15, 5)
    assert [p.index for p in train] == list(range(15)) and [p.index for p in val] == list(range(5))
    assert not {p.source for p in train} & {p.source for p in val}
    per_rank = [list(PreferenceLoader(train, 2, rank=r, world_size=2, val_pairs=val).val_batches()) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2  # 5 pairs: rank 1 has none left for step 2
    assert per_rank[1][1]["pair_ids"].tolist() == [-1] and (per_rank[1][1]["targets"] == IGNORE_INDEX).all()
    ids = [i for batches in per_rank for b in batches for i in b["pair_ids"].tolist() if i >= 0]
    assert sorted(ids) == list(range(5))
    with pytest.raises(ValueError, match="no validation pairs"):
        next(PreferenceLoader(train, 2).val_batches())


def test_shipped_pairs_read_cleanly(tokenizer: Tokenizer) -> None:
    folder = REPO / "data" / "preference"
    train, heldout = (
        read_pairs(folder / name, strict=True) for name in ("pirate_pairs.jsonl", "pirate_pairs_heldout.jsonl")
    )
    assert 100 <= len(train) <= 140 and 16 <= len(heldout) <= 40
    for record in train + heldout:
        prompt, chosen, rejected = (record.data[k] for k in ("prompt", "chosen", "rejected"))
        assert [m["role"] for m in prompt + chosen + rejected] == ["user", "assistant", "assistant"]
        assert chosen[0]["content"].startswith("Arr") and not rejected[0]["content"].startswith("Arr")
    questions = [r.data["prompt"][0]["content"] for r in train + heldout]
    assert len(set(questions)) == len(questions)  # no question twice, none held out that is also trained on
    pairs = tokenize_pairs(train, tokenizer, max_seq_length=256)
    assert len(pairs) == len(train) and not any(p.truncated for p in pairs)
