"""The paged KV cache: one pool of fixed-size blocks shared by every running request, and its prefix cache.

    pool = BlockPool(num_blocks=4096, block_size=16)
    blocks, hashes = pool.allocate(prompt, salt="")   # shares the prompt's already-computed full blocks
    pool.grow(blocks, length)                         # one more block when a sequence crosses a boundary
    pool.register(block, block_hash)                  # a computed full block becomes findable by later requests
    pool.release(blocks)                              # back to the pool; full ones stay cached until reused

    step = PagedKVCache.install(model, pool)   # the model's layers now read and write the pool
    step.apply(rows, width)                    # before each forward: where this step's keys go, what it reads

Memory follows the tokens in use: a request holds ceil(length / block_size) blocks, not a
max_seq_length-long row. A block's id is also its place in storage: token slot = block * block_size + offset.

Prefix caching: a full block is identified by a hash chained over every token before it and the
request's salt (its LoRA adapter: another adapter computes other keys and values for the same tokens).
A new request walks its prompt block by block and shares each block whose chain is cached, until the
first miss. Released blocks keep their hash while they wait in the free list (least recently released
first out), so a repeated system prompt, few-shot block or earlier conversation turn is found again
as long as the pool has not needed those blocks. A block is written only by the one request that
computes it: the match stops one token short of the prompt's end, so a fully cached prompt still
computes its last token (for its logits) into a block of its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch
import torch.nn as nn

from plainlm.model import GPT


class BlockPool:
    """Block ids, their reference counts and the prefix cache; no tensors (PagedKVCache holds those)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_count = [0] * num_blocks
        self.block_hash: list[Hashable | None] = [None] * num_blocks
        self.cached: dict[Hashable, int] = {}  # hash -> block holding those tokens
        # Blocks nobody holds, oldest release first; cached ones are taken last-resort only in that order.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hits = self.queries = 0  # prefix-cache counters, in blocks

    @property
    def free_blocks(self) -> int:
        return len(self.free)

    @property
    def used_blocks(self) -> int:
        """Blocks held by running requests (cached blocks nobody holds count as free)."""
        return self.num_blocks - len(self.free)

    @property
    def cached_blocks(self) -> int:
        return len(self.cached)

    def blocks_for(self, length: int) -> int:
        return -(-length // self.block_size)

    @staticmethod
    def next_hash(previous: Hashable, block_tokens: Sequence[int]) -> Hashable:
        """The prefix hash of a full block: of its tokens and of every block before it (`previous`, or
        the salt for the first block)."""
        return hash((previous, tuple(block_tokens)))

    def chain(self, tokens: Sequence[int], salt: Hashable) -> list[Hashable]:
        """The prefix hash of each full block of `tokens`: block i's covers tokens [0, (i+1) * block_size)."""
        hashes, previous = [], salt
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            previous = self.next_hash(previous, tokens[start : start + self.block_size])
            hashes.append(previous)
        return hashes

    def cached_prefix(self, tokens: Sequence[int], salt: Hashable) -> tuple[list[int], list[Hashable]]:
        """The cached blocks that hold the start of `tokens`, stopping one token short of its end, and
        their hashes."""
        blocks, hashes = [], []
        for block_hash in self.chain(tokens[: len(tokens) - 1], salt):
            block = self.cached.get(block_hash)
            if block is None:
                break
            blocks.append(block)
            hashes.append(block_hash)
        return blocks, hashes

    def can_allocate(self, tokens: Sequence[int], salt: Hashable, share: bool = True, reserve: int = 0) -> bool:
        """Whether `allocate` would find blocks for `tokens`, leaving `reserve` blocks free."""
        shared = self.cached_prefix(tokens, salt)[0] if share else []
        idle_shared = sum(self.ref_count[b] == 0 for b in shared)  # taking them uses up free blocks too
        return self.blocks_for(len(tokens)) - len(shared) + idle_shared + reserve <= len(self.free)

    def allocate(self, tokens: Sequence[int], salt: Hashable, share: bool = True) -> tuple[list[int], list[Hashable]]:
        """Blocks for `tokens`: the cached prefix shared (unless `share` is False), the rest fresh; and the
        hashes of the shared ones (they hold len(hashes) * block_size computed tokens)."""
        shared, hashes = self.cached_prefix(tokens, salt) if share else ([], [])
        self.queries += (len(tokens) - 1) // self.block_size
        self.hits += len(shared)
        for block in shared:
            self._hold(block)
        fresh = [self._take() for _ in range(self.blocks_for(len(tokens)) - len(shared))]
        return shared + fresh, hashes

    def grow(self, blocks: list[int], length: int) -> bool:
        """Give `blocks` room for `length` tokens; False (nothing taken) when the pool has too few free."""
        needed = self.blocks_for(length) - len(blocks)
        if needed > len(self.free):
            return False
        blocks.extend(self._take() for _ in range(needed))
        return True

    def register(self, block: int, block_hash: Hashable) -> None:
        """Make a full block whose keys and values are computed findable by later requests (under
        `block_hash`, from next_hash). Where another block already holds the same prefix, that one stays."""
        if self.block_hash[block] is None and block_hash not in self.cached:
            self.block_hash[block] = block_hash
            self.cached[block_hash] = block

    def release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):  # the end of a sequence is the least likely to be shared: reused first
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
        blocks.clear()

    def _hold(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        if self.block_hash[block] is not None:  # evict its old contents from the prefix cache
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
        self.ref_count[block] = 1
        return block


class PagedKVCache(nn.Module):
    """One layer's keys and values in the pool's storage, read and written through the step's slot tables.

    Storage is (n_kv_head * slots, head_dim) with the heads outermost, so one index_select per tensor
    gathers a batch's keys straight into the (B, K, S, D) layout attention (and plainlm's decode kernel,
    which needs it contiguous) reads. It takes the place of model.KVCache in `Attention.kv_cache`: GPT
    asks it where queries sit among the keys (`query_slots`) and how many keys a row has (`length`).
    """

    def __init__(
        self,
        pool: BlockPool,
        n_kv_head: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        value_dim: int | None = None,  # multi-head latent attention: the rotated key's size beside the latent
    ):
        super().__init__()
        # The pool's blocks, and one block more: its first slot takes the keys and values of padding tokens
        # (PagedStep.scratch_slot), which no request reads.
        self.slots = (pool.num_blocks + 1) * pool.block_size
        self.n_kv_head = n_kv_head
        shape = (n_kv_head * self.slots, head_dim)
        # torch.zeros of this size maps fresh pages that the OS commits only when written: the pool costs
        # the memory of the blocks actually used.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        v_shape = (n_kv_head * self.slots, value_dim or head_dim)
        self.register_buffer("v", torch.zeros(v_shape, dtype=dtype, device=device), persistent=False)
        self.step: PagedStep | None = None  # shared by every layer; set by PagedStep.apply before a forward

    @staticmethod
    def install(model: GPT, pool: BlockPool, dtype: torch.dtype | None = None) -> PagedStep:
        """Give every attention layer of `model` a PagedKVCache over `pool`; returns the step tables they share."""
        c = model.config
        dtype = dtype or getattr(model.embed, "dtype", model.embed.weight.dtype)  # a quantized embedding says
        device = model.embed.weight.device
        K, D, V = c.n_kv_head, c.head_dim, c.head_dim
        if c.kv_lora_rank is not None:  # DeepSeek-V3: one latent "head" and the rotated key (model.LatentKVCache)
            K, D, V = 1, c.kv_lora_rank, c.qk_rope_head_dim
        step = PagedStep(pool, K, device)
        for _ in model.blocks:
            cache = PagedKVCache(pool, K, D, dtype, device, V)
            cache.step = step
            step.caches.append(cache)
        step.attach(model)
        return step

    @property
    def length(self) -> int:
        return self.step.read_index.shape[-1]

    def query_slots(self, input_pos: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # A row's keys are its tokens in order, so a query at position p sees keys 0..p: (B, 1, T)
        # against key indices 0..S-1 (the rows' padding beyond their length is past every query).
        return position_ids.unsqueeze(1)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys and values (B, K, T, D) at their slots; return each row's keys and values
        so far, (B, K, S, D) contiguous, S the longest row's length (shorter rows padded with slot 0); or,
        for a step that reads in place, the pool's (R, D) storage itself."""
        step = self.step
        B, K, T, D = k.shape
        self.k.index_copy_(0, step.write_index, k.to(self.k.dtype).reshape(B * K * T, D))
        self.v.index_copy_(0, step.write_index, v.to(self.v.dtype).reshape(B * K * T, v.shape[-1]))
        if step.in_place:  # plainlm's attention kernel reads the pool where it lies (kernel_layers)
            return self.k, self.v
        S = step.read_index.shape[-1]
        return (
            self.k.index_select(0, step.read_index.reshape(-1)).view(B, K, S, D),
            self.v.index_select(0, step.read_index.reshape(-1)).view(B, K, S, v.shape[-1]),
        )


class PagedStep:
    """The slot tables of one forward pass, shared by every layer's PagedKVCache."""

    def __init__(self, pool: BlockPool, n_kv_head: int, device: torch.device) -> None:
        self.pool, self.device = pool, device
        self.head_offsets = torch.arange(n_kv_head, device=device) * ((pool.num_blocks + 1) * pool.block_size)
        self.scratch_slot = pool.num_blocks * pool.block_size  # see PagedKVCache.__init__
        self.caches: list[PagedKVCache] = []  # one per layer
        # Set by the engine for a step whose attention reads the pool in place (see
        # kernel_layers.reads_paged_pool): update() then returns the pool itself, not a gathered copy.
        self.in_place = False
        self.write_index = torch.zeros(0, dtype=torch.long, device=device)
        self.read_index = torch.zeros(1, n_kv_head, 0, dtype=torch.long, device=device)

    def attach(self, model: GPT) -> None:
        """Put the layers' paged caches (back) into `model`: plain decoding on the same model
        (generate.py's set_kv_cache / clear_kv_cache) replaces them, and the engine calls this before each step."""
        for block, cache in zip(model.blocks, self.caches, strict=True):
            block.attn.kv_cache = cache

    def slots(self, blocks: list[int], start: int, end: int) -> list[int]:
        """The storage slots of a sequence's positions [start, end)."""
        size = self.pool.block_size
        return [blocks[p // size] * size + p % size for p in range(start, end)]

    def apply(self, rows: Sequence[tuple[list[int], int, int]], width: int) -> None:
        """Set the tables for a batch whose row i writes positions [start, end) of the sequence in blocks
        (rows[i] = (blocks, start, end)) and reads positions [0, end). Each row has `width` tokens: those
        past end - start are padding, written to the scratch slot."""
        size = self.pool.block_size
        longest = max(end for _, _, end in rows)
        table_width = -(-longest // size)
        table = torch.tensor([b[:table_width] + [0] * (table_width - len(b[:table_width])) for b, _, _ in rows])
        offsets = torch.arange(size)
        read = (table[:, :, None] * size + offsets).view(len(rows), -1)[:, :longest]  # (B, S)
        padding = [[self.scratch_slot] * (width - end + start) for _, start, end in rows]
        write = torch.tensor(
            [self.slots(b, start, end) + pad for (b, start, end), pad in zip(rows, padding, strict=True)]
        )  # (B, T)
        read, write = read.to(self.device), write.to(self.device)
        heads = self.head_offsets[None, :, None]
        self.read_index = (read[:, None, :] + heads).contiguous()  # (B, K, S)
        self.write_index = (write[:, None, :] + heads).reshape(-1)  # (B * K * T,), as k.reshape(B * K * T, D)
