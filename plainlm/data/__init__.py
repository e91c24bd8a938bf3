"""Training data: every loader yields batches of the same shape, so one training loop serves all.

A batch is a dict of tensors:
    input_ids       (B, T) int64   the tokens the model reads
    targets         (B, T) int64   the token each position should predict; IGNORE_INDEX where no loss is taken
                                   (prompt tokens in finetuning, padding, the seams between packed examples)
    position_ids    (B, T) int64   optional: positions that restart at 0 for each packed example
    attention_mask  (B, 1, T, T) bool  optional: True where a query may see a key; packed examples
                                   cannot see each other (the model adds causality on top)

Loaders are plain iterables with `state_dict()` / `load_state_dict()` holding their position, so a
resumed run continues with exactly the batch an uninterrupted one would have seen next.

    pretrain.py  text / JSONL files -> memory-mapped token shards -> fixed-length blocks
    sft.py       instruction and chat records -> prompt/response token ids with loss masks, packing
    sources.py   named public datasets (Alpaca, Dolly, LIMA, TinyStories, ...), downloaded when online
"""

IGNORE_INDEX = -100
