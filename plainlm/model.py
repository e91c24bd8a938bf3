"""The model: `GPT` and its parts, one file for every family.

Every architectural difference between families is a field of `Config`, read in the one
place it matters. Lines that exist for one family say which, and why, in a comment.
Nothing here knows about files, tokenizers or Hugging Face names (see `convert/`), nor about
plainlm's CPU kernels: `kernel_layers.py` swaps in subclasses of Attention and MLP that call them,
as `quantize.py` swaps in quantized Linear layers. What runs here is plain PyTorch.

Shapes: B batch, T new tokens, S key/value length, H heads, K key/value heads, D head_dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from plainlm.config import Config
from plainlm.errors import InvalidInput
from plainlm.grouped_mm import grouped_mm
from plainlm.windowed_attention import windowed_attention

ROPE_TABLE_POSITIONS = 1 << 17  # positions the RoPE tables hold at first (GPT.grow_rope_tables adds more)


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position_embedding == "learned":  # GPT-2
            self.pos_embed = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.final_norm = make_norm(config, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.activation_checkpointing = False  # training sets it: recompute each block in the backward pass
        # Positions past block_size fail with a clear error; the memory model's trace on fake tensors
        # (memory.py), whose positions have no values to read, turns the check off.
        self.check_positions = True
        # quantize.py sets it when it swaps in quantized layers ({"mode": "int8", "group_size": None});
        # None means float weights. save_checkpoint writes it as quantization.json, loading reads it back.
        self.quantization: dict | None = None
        self.init_rope_cache()

    def init_rope_cache(self, device: torch.device | None = None, positions: int | None = None) -> None:
        """(Re)build the cos/sin tables, `positions` rows (default: the context, at most ROPE_TABLE_POSITIONS;
        grow_rope_tables adds more); call after creating the model on the meta device."""
        c = self.config
        if c.position_embedding != "rope":
            return
        device = device or self.embed.weight.device
        if device.type == "meta":  # a model built on the meta device still gets real tables
            device = torch.device("cpu")
        positions = positions or min(c.block_size, ROPE_TABLE_POSITIONS)  # a row depends on its position alone
        cos, sin = rope_cache(positions, c.rope_dim, c.rope_theta, c.rope_scaling, c.block_size, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if c.rope_local_theta is not None:  # Gemma 3: sliding layers rotate with their own base
            cos, sin = rope_cache(positions, c.rope_dim, c.rope_local_theta, None, c.block_size, device)
            self.register_buffer("rope_local_cos", cos, persistent=False)
            self.register_buffer("rope_local_sin", sin, persistent=False)

    def grow_rope_tables(self, positions: int) -> None:
        """Make the tables hold `positions` positions, doubling: Llama 4 Scout's context of 10M positions
        would take gigabytes of tables that few runs read."""
        if self.config.position_embedding == "rope" and positions > (held := self.rope_cos.shape[0]):
            self.init_rope_cache(self.rope_cos.device, min(self.config.block_size, max(positions, 2 * held)))

    # --- KV cache ---
    def set_kv_cache(
        self, batch_size: int, max_seq_length: int | None = None, dtype: torch.dtype | None = None
    ) -> None:
        """Preallocate a key/value cache for decoding up to `max_seq_length` positions.

        A cache of the same shape, dtype and device is zeroed and kept rather than made anew: the modules
        stay as they were, so a compiled decode step's guards can skip them (see generate.py).
        """
        max_seq_length = max_seq_length or self.config.block_size
        if max_seq_length > self.config.block_size:
            raise InvalidInput(
                f"max_seq_length {max_seq_length} exceeds the model's context of {self.config.block_size}"
            )
        self.grow_rope_tables(max_seq_length)  # a compiled step reads positions up to it unchecked
        # A quantized embedding (quantize.py) holds integers and says which float dtype it returns.
        dtype = dtype or getattr(self.embed, "dtype", self.embed.weight.dtype)
        device = self.embed.weight.device
        c = self.config
        shape = v_shape = (batch_size, c.n_kv_head, max_seq_length, c.head_dim)
        make = KVCache
        if c.kv_lora_rank is not None:  # multi-head latent attention caches its latent and rotated key
            make, shape = LatentKVCache, (batch_size, 1, max_seq_length, c.kv_lora_rank)
            v_shape = (batch_size, 1, max_seq_length, c.qk_rope_head_dim)
        for block in self.blocks:
            cache = block.attn.kv_cache
            if cache is not None and cache.k.shape == shape and cache.k.dtype == dtype and cache.k.device == device:
                cache.k.zero_(), cache.v.zero_()
            else:
                block.attn.kv_cache = make(shape, v_shape, dtype, device)

    def repeat_kv_cache(self, batch_size: int) -> None:
        """Copy a one-row cache into `batch_size` rows: sequences that share a prefix compute it once, in row 0."""
        for block in self.blocks:
            cache = block.attn.kv_cache
            if cache is None or cache.k.shape[0] != 1:
                raise InvalidInput("repeat_kv_cache needs a one-row cache: set_kv_cache(1, ...) and fill it first")
            cache.k = cache.k.expand(batch_size, -1, -1, -1).contiguous()
            cache.v = cache.v.expand(batch_size, -1, -1, -1).contiguous()

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    # --- forward ---
    def forward(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        logit_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids `idx` (B, T).

        input_pos (T,): the KV cache slots these tokens occupy. With it, the cache set by
            set_kv_cache is written and read; without it, this is a plain pass over idx (tokens at
            positions 0..T-1) that leaves any cache untouched.
        position_ids (B, T): positions for RoPE / learned embeddings; default input_pos.
            Left-padded batches and packed sequences pass their own.
        attention_mask (B, 1, T, S) bool: True where a query may see a key, on top of causality
            and sliding windows. S is T without a cache, the cache's length with one.
        logit_positions (B, K): compute the logits of only these positions of each row, (B, K, vocab).
            A prefill samples from one position: the vocabulary projection of all T took a fifth of
            SmolLM2's prefill time.
        """
        c = self.config
        B, T = idx.shape
        cache = self.blocks[0].attn.kv_cache if input_pos is not None else None
        positions = input_pos if input_pos is not None else torch.arange(T, device=idx.device)
        if position_ids is None:
            position_ids = positions.unsqueeze(0).expand(B, T)
        # (An empty batch, 0 rows, still runs: a rank out of validation data keeps step with the others.)
        checkable = self.check_positions and not torch.compiler.is_compiling() and position_ids.numel()
        if checkable:
            last = int(position_ids.max())
            if last >= c.block_size:
                raise InvalidInput(f"position {last} is past the model's context of {c.block_size} tokens")
            self.grow_rope_tables(last + 1)
        elif cache is None:  # compiled: T is known while tracing (a cache's positions grew in set_kv_cache)
            self.grow_rope_tables(T)

        x = self.embed(idx)
        if c.scale_embeddings:  # Gemma: the normaliser is rounded to the activation dtype first
            x = x * torch.tensor(c.n_embd**0.5, dtype=x.dtype)
        if c.embedding_multiplier != 1.0:  # Granite
            x = x * c.embedding_multiplier
        if c.position_embedding == "learned":
            x = x + self.pos_embed(position_ids)

        if cache is None:
            masks = self._attention_masks(positions, None, attention_mask, position_ids)
        else:  # the cache says where the queries sit among its keys: model.KVCache, or serve's paged one
            slots = cache.query_slots(input_pos, position_ids)
            masks = self._attention_masks(slots, cache.length, attention_mask, position_ids)
        ropes = self._ropes(position_ids, x.dtype)
        temperature = None
        if c.attn_temperature_floor_scale is not None:  # Llama 4: NoPE layers sharpen attention far into a context
            steps = torch.floor((position_ids.float() + 1.0) / c.attn_temperature_floor_scale)
            temperature = (torch.log1p(steps) * c.attn_temperature_scale + 1.0)[:, None, :, None]  # (B, 1, T, 1)
        for i, block in enumerate(self.blocks):
            sliding = c.is_sliding(i)
            rope, q_scale = (ropes[sliding], None) if c.uses_rope(i) else (None, temperature)
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, rope, masks[sliding], input_pos, q_scale, use_reentrant=False)
            else:
                x = block(x, rope, masks[sliding], input_pos, q_scale)  # input_pos None: no cache
        if logit_positions is not None:
            x = x.gather(1, logit_positions[..., None].expand(-1, -1, x.shape[-1]))
        x = self.final_norm(x)
        logits = self.lm_head(x)
        if c.logit_scale is not None:  # Cohere 2: a fixed multiplier on the logits (its head is tied)
            logits = logits * c.logit_scale
        if c.final_logit_softcap is not None:  # Gemma 2
            logits = softcap(logits, c.final_logit_softcap)
        if c.logits_scaling != 1.0:  # Granite divides its logits
            logits = logits / c.logits_scaling
        return logits

    def _ropes(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> dict[bool, tuple[torch.Tensor, torch.Tensor] | None]:
        """cos/sin (B, 1, T, rope_dim) for global (False) and sliding (True) layers."""
        if self.config.position_embedding != "rope":
            return {False: None, True: None}
        rows = [table[position_ids].unsqueeze(1).to(dtype) for table in (self.rope_cos, self.rope_sin)]
        if self.config.rope_local_theta is None:
            return {False: tuple(rows), True: tuple(rows)}
        local = [table[position_ids].unsqueeze(1).to(dtype) for table in (self.rope_local_cos, self.rope_local_sin)]
        return {False: tuple(rows), True: tuple(local)}

    def _attention_masks(
        self,
        query_slots: torch.Tensor,
        cache_len: int | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
    ) -> dict[bool, torch.Tensor | None]:
        """Boolean masks (..., T, S) for global (False) and local (True: sliding or chunked) layers; None = causal.

        query_slots (T,) or (B, 1, T): where each query sits among the keys, which are numbered 0..S-1.
        position_ids (B, T): the queries' positions, which Llama 4's chunks count in.
        With model.KVCache, attention always spans the whole preallocated cache (slots past the
        current position are masked): the shapes stay fixed from step to step, so a compiled
        decode step never recompiles and nothing waits on the device for a length.
        """
        window, chunk = self.config.sliding_window, self.config.attention_chunk_size
        T = query_slots.shape[-1]
        local_span = window or chunk  # T tokens within one: plain causal (chunks count from token 0, as in HF)
        if cache_len is None and attention_mask is None and (local_span is None or local_span >= T):
            return {False: None, True: None}
        key_pos = torch.arange(cache_len or T, device=query_slots.device)
        query_pos = (query_slots if cache_len is not None else key_pos)[..., :, None]
        causal = key_pos <= query_pos  # (T, S) or (B, 1, T, S)
        if attention_mask is not None:
            causal = causal & attention_mask
        local = causal if window is None else causal & (query_pos - key_pos < window)
        if chunk is not None:  # Llama 4: a query sees only the keys in its own chunk of positions
            positions = position_ids[:, None, :, None]  # (B, 1, T, 1)
            # A key's position: its own without a cache; with one, its slot less its row's offset (left padding).
            key_positions = positions.mT if cache_len is None else key_pos - (query_pos - positions)
            local = local & (key_positions // chunk == positions // chunk)
        return {False: causal, True: local}


class Block(nn.Module):
    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        self.config = config
        self.attn_norm = make_norm(config, config.n_embd) if config.pre_attention_norm else nn.Identity()
        window = config.sliding_window if config.is_sliding(layer) and not config.attention_chunk_size else None
        self.attn = LatentAttention(config) if config.kv_lora_rank is not None else Attention(config, window)
        self.post_attn_norm = make_norm(config, config.n_embd) if config.post_attention_norm else nn.Identity()
        needs_mlp_norm = config.pre_mlp_norm and not config.shared_attention_norm
        self.mlp_norm = make_norm(config, config.n_embd) if needs_mlp_norm else nn.Identity()
        self.mlp = MoE(config) if config.is_moe(layer) else MLP(config, config.intermediate_size)
        self.post_mlp_norm = make_norm(config, config.n_embd) if config.post_mlp_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        input_pos: torch.Tensor | None,
        q_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.attn_norm(x)
        attn_out = self.post_attn_norm(self.attn(h, rope, mask, input_pos, q_scale))
        if self.config.parallel_residual:  # GPT-NeoX, Phi-1.5/2, Falcon: both branches read x
            mlp_in = h if self.config.shared_attention_norm else self.mlp_norm(x)
            return x + attn_out + self.post_mlp_norm(self.mlp(mlp_in))
        r = self.config.residual_multiplier  # Granite scales both outputs before they join the residual
        x = x + (attn_out * r if r != 1.0 else attn_out)
        mlp_out = self.post_mlp_norm(self.mlp(self.mlp_norm(x)))
        return x + (mlp_out * r if r != 1.0 else mlp_out)


class Attention(nn.Module):
    def __init__(self, config: Config, window: int | None = None) -> None:
        super().__init__()
        self.config, self.window = config, window  # window: this layer's sliding window, if it has one
        H, K, D = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, H * D, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, K * D, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, K * D, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * D, config.n_embd, bias=config.attn_out_bias)
        if config.qk_norm == "head":  # Qwen3, Gemma 3: one norm shared by all heads
            self.q_norm, self.k_norm = make_norm(config, D), make_norm(config, D)
        elif config.qk_norm == "full":  # OLMo-2: one norm over the whole projection
            self.q_norm, self.k_norm = make_norm(config, H * D), make_norm(config, K * D)
        self.scale = config.attention_scale if config.attention_scale is not None else D**-0.5
        if config.attention_sinks:  # gpt-oss
            self.sinks = nn.Parameter(torch.zeros(H))
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        input_pos: torch.Tensor | None,
        q_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q_scale (B, 1, T, 1): Llama 4's attention temperature on its NoPE layers, multiplied into q."""
        c = self.config
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        if c.clip_qkv is not None:  # OLMo-1
            q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        if c.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, c.n_head, c.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
        if c.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope, c.rope_interleaved), apply_rope(k, *rope, c.rope_interleaved)
            if c.qk_norm == "l2":  # Llama 4: q and k over their RMS (no weight), after RoPE, on RoPE layers only
                q, k = (F.rms_norm(t.float(), (c.head_dim,), eps=c.norm_eps).to(t.dtype) for t in (q, k))
        if q_scale is not None:
            q = (q * q_scale).to(q.dtype)
        cache = self.kv_cache if input_pos is not None else None  # see GPT.forward
        if cache is not None:
            k, v = cache.update(input_pos, k, v)
        y = self.attend(q, k, v, mask, cache)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim))

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # A method of its own (as is attend) so that kernel_layers.KernelAttention can run the three in one call.
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None
    ) -> torch.Tensor:
        """softmax(q k^T * scale) v over the visible keys. `cache`, the KV cache k and v were read from (if
        any), is for kernel_layers.KernelAttention, which then may take its decode kernel."""
        c = self.config
        if c.attention_logit_softcap is None and not c.attention_sinks:
            # A branch, not an expression: under dynamic shapes `q.shape[2] > 1` is symbolic, which SDPA does not
            # take, and an `if` makes the compiler guard on it and pass a plain bool.
            is_causal = False
            if mask is None and q.shape[2] > 1:
                is_causal = True
            # A sequence longer than two windows, without a cache or padding (training, scoring): see the window only
            windowed = self.window and cache is None and mask is not None and mask.dim() == 2
            if windowed and not torch.compiler.is_compiling() and q.shape[2] > 2 * self.window:
                return windowed_attention(q, k, v, self.window, self.scale, c.n_kv_head != c.n_head)
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale, enable_gqa=c.n_kv_head != c.n_head
            )
        # Gemma 2 caps the attention logits before softmax, gpt-oss adds sinks to it: SDPA expresses neither.
        groups = c.n_head // c.n_kv_head
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if c.attention_logit_softcap is not None:
            scores = softcap(scores, c.attention_logit_softcap)
        if mask is None:
            T, S = q.shape[2], k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        if c.attention_sinks:  # gpt-oss: each head's sink logit joins the softmax as a key without a value
            sinks = self.sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
            probs = torch.cat((scores, sinks), dim=-1).softmax(dim=-1, dtype=torch.float32)[..., :-1]
            return probs.to(q.dtype) @ v
        return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v


class KVCache(nn.Module):
    """Preallocated keys and values (B, K, max_seq_length, D); tokens are written at their slots."""

    def __init__(self, k_shape: tuple[int, ...], v_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.register_buffer("k", torch.zeros(k_shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(v_shape, dtype=dtype, device=device), persistent=False)

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def query_slots(self, input_pos: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # A token's slot is its input_pos for every row (left-padded rows shift their positions, not slots).
        return input_pos

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if k.shape[0] != self.k.shape[0]:
            raise InvalidInput(f"batch of {k.shape[0]} does not match the KV cache's batch of {self.k.shape[0]}")
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi K2): each token's keys and values are expanded
    (kv_b_proj) from a normalised latent of kv_lora_rank values, and every head's key ends in one rotated part
    all heads share (qk_rope_head_dim). The cache holds only those two (LatentKVCache); decoding steps fold the
    expansion into the queries and the output instead of expanding every cached token (attend_latent)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        H, D, R, V = config.n_head, config.head_dim, config.qk_rope_head_dim, config.v_head_dim or config.head_dim
        if config.q_lora_rank is None:  # DeepSeek-V2-Lite
            self.q_proj = nn.Linear(config.n_embd, H * D, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.n_embd, config.q_lora_rank, bias=config.qkv_bias)
            self.q_a_norm = make_norm(config, config.q_lora_rank)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * D, bias=False)
        self.kv_a_proj = nn.Linear(config.n_embd, config.kv_lora_rank + R, bias=config.qkv_bias)
        self.kv_a_norm = make_norm(config, config.kv_lora_rank)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, H * (D - R + V), bias=False)
        self.o_proj = nn.Linear(H * V, config.n_embd, bias=config.attn_out_bias)
        self.scale = config.attention_scale if config.attention_scale is not None else D**-0.5
        scaling = config.rope_scaling or {}
        if scaling.get("rope_type", "default") != "default" and scaling.get("mscale_all_dim"):
            # DeepSeek-V3's YaRN scales every dimension's q.k, not only the rotated ones (HF's yarn_apply_mscale)
            self.scale *= (0.1 * scaling["mscale_all_dim"] * math.log(max(scaling["factor"], 1.0)) + 1.0) ** 2
        self.kv_cache: LatentKVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        input_pos: torch.Tensor | None,
        q_scale: None = None,  # (Llama 4's temperature, which no MLA model has)
    ) -> torch.Tensor:
        c = self.config
        B, T, _ = x.shape
        H, D, R, V = c.n_head, c.head_dim, c.qk_rope_head_dim, c.v_head_dim or c.head_dim
        q = self.q_proj(x) if c.q_lora_rank is None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q_nope, q_rot = q.view(B, T, H, D).transpose(1, 2).split([D - R, R], dim=-1)
        latent, k_rot = self.kv_a_proj(x).unsqueeze(1).split([c.kv_lora_rank, R], dim=-1)  # (B, 1, T, ...)
        latent = self.kv_a_norm(latent)
        if rope is not None:
            q_rot, k_rot = apply_rope(q_rot, *rope, c.rope_interleaved), apply_rope(k_rot, *rope, c.rope_interleaved)
        cache = self.kv_cache if input_pos is not None else None  # see GPT.forward
        if cache is not None:
            latent, k_rot = cache.update(input_pos, latent, k_rot)
        # Expanding costs S * L * H * (D - R + V) for the S cached tokens; absorbing costs attention over
        # L + R dimensions and values of L instead of D and V: T * S * H * (2L + R - D - V) more.
        # A float weight to fold: any nn.Linear (kernel_layers' too) but bitsandbytes' packed one.
        L, plain_b = c.kv_lora_rank, isinstance(self.kv_b_proj, nn.Linear) and self.kv_b_proj.weight.is_floating_point()
        if cache is not None and plain_b and T * (2 * L + R - D - V) < L * (D - R + V):
            y = self.attend_latent(q_nope, q_rot, latent, k_rot, mask)
        else:  # no cache (training, scoring), a long prompt, or kv_b_proj with an adapter or quantized
            S = latent.shape[2]
            kv = self.kv_b_proj(latent.squeeze(1)).view(B, S, H, D - R + V).transpose(1, 2)
            k_nope, v = kv.split([D - R, V], dim=-1)
            q, k = torch.cat((q_nope, q_rot), dim=-1), torch.cat((k_nope, k_rot.expand(-1, H, -1, -1)), dim=-1)
            is_causal = False  # a branch, as in Attention.attend
            if mask is None and T > 1:
                is_causal = True
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * V))

    def attend_latent(
        self,
        q_nope: torch.Tensor,
        q_rot: torch.Tensor,
        latent: torch.Tensor,
        k_rot: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Attention over the latents themselves ("absorbing" kv_b_proj, DeepSeek-V2's paper): a head's q_nope . k_nope
        is (q_nope W_k) . latent, and its weighted sum of values is (weights . latent) W_v^T, with W_k and W_v
        that head's key and value rows of kv_b_proj. Every head attends to the same keys and values, so the heads
        become query rows of one attention (B, 1, H * T, ...), which reads the cache once."""
        c = self.config
        B, H, T, _ = q_nope.shape
        D, R, L = c.head_dim, c.qk_rope_head_dim, c.kv_lora_rank
        w_k, w_v = self.kv_b_proj.weight.view(H, -1, L).split([D - R, c.v_head_dim or D], dim=1)
        q = torch.cat((q_nope @ w_k.to(q_nope.dtype), q_rot), dim=-1).reshape(B, 1, H * T, L + R)
        k = torch.cat((latent, k_rot), dim=-1).to(q.dtype)  # (B, 1, S, L + R)
        S = k.shape[2]
        rows = mask.reshape(-1, 1, 1, T, S)  # with a cache there is always a mask (T, S) or (B, 1, T, S) ...
        mask = rows.expand(-1, 1, H, T, S).reshape(rows.shape[0], 1, H * T, S)  # ... copied for every head
        y = F.scaled_dot_product_attention(q, k, latent.to(q.dtype), attn_mask=mask, scale=self.scale)
        return y.view(B, H, T, L) @ w_v.transpose(1, 2).to(y.dtype)  # (B, H, T, V)


class LatentKVCache(KVCache):
    """Multi-head latent attention's cache: per token only the normalised latent, k (B, 1, max_seq_length,
    kv_lora_rank), and the rotated key all heads share, v (B, 1, max_seq_length, qk_rope_head_dim); DeepSeek-V3
    keeps 576 values a token and layer where its 128 heads' keys and values would be 40,960."""


class MLP(nn.Module):
    def __init__(self, config: Config, intermediate_size: int, bias: bool | None = None) -> None:
        super().__init__()
        bias = config.mlp_bias if bias is None else bias
        self.gated = config.mlp_class == "gated"
        if self.gated:
            self.gate_proj = nn.Linear(config.n_embd, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.n_embd, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, config.n_embd, bias=bias)
        self.activation = config.mlp_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:  # SwiGLU (silu) / GeGLU (gelu)
            return self.down_proj(gated_activation(*self.project_gate_up(x), self.activation))
        return self.down_proj(activate(self.up_proj(x), self.activation))

    def project_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # A method of its own so that kernel_layers.KernelMLP can run the two in one call.
        return self.gate_proj(x), self.up_proj(x)


class MoE(nn.Module):
    """Mixture of experts (Mixtral, Qwen3-MoE): a router sends each token to its top-k experts."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=config.moe_router_bias)
        self.experts = Experts(config, config.moe_intermediate_size or config.intermediate_size)
        if config.moe_shared_intermediate_size:
            self.shared_expert = MLP(config, config.moe_shared_intermediate_size, bias=False)
        if config.moe_shared_gate:  # Qwen2-MoE
            self.shared_expert_gate = nn.Linear(config.n_embd, 1, bias=False)
        if config.moe_router == "noaux_tc":  # DeepSeek-V3: a bias per expert, set by load balancing, not gradients
            self.register_buffer("router_bias", torch.zeros(config.n_expert))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C) tokens
        weights, chosen = self.route(x)
        out = self.experts(x, weights.to(x.dtype), chosen)
        if self.config.moe_shared_intermediate_size:
            shared = self.shared_expert(x)
            if self.config.moe_shared_gate:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out.view(shape)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's k experts (N, k) and the weights (N, k) their outputs are summed with.

        One branch per Config.moe_router value; a family with its own routing adds one here."""
        c = self.config
        if c.moe_router == "sparsemixer":  # PhiMoE
            return sparsemixer(self.router(x), c.n_expert_per_token, c.moe_jitter_eps)
        if c.moe_router == "noaux_tc":  # DeepSeek-V3, GLM-4.5 (router in float32, as theirs)
            scores = F.linear(x.float(), self.router.weight.float()).sigmoid()
            # The bias only chooses: first the moe_topk_group groups whose two best biased scores sum highest
            groups = (scores + self.router_bias.float()).view(-1, c.moe_n_group, c.n_expert // c.moe_n_group)
            best = groups.topk(2, dim=-1)[0].sum(dim=-1).topk(c.moe_topk_group, dim=-1)[1]
            kept = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best, True)
            chosen = groups.masked_fill(~kept[..., None], float("-inf")).flatten(1).topk(c.n_expert_per_token)[1]
            weights = scores.gather(1, chosen)
            if c.moe_normalize_topk:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            return weights * c.moe_routed_scale, chosen
        logits = self.router(x)
        # gpt-oss: top-k of the logits, softmax over those k. Equal in exact arithmetic to "softmax" renormalised,
        # but it chooses on the logits as gpt-oss does, so no tie made by rounding the softmax picks another expert.
        if c.moe_router == "topk_softmax":
            top, chosen = logits.topk(c.n_expert_per_token, dim=-1)
            return top.softmax(dim=-1, dtype=torch.float32), chosen
        if c.moe_router == "sigmoid_input":  # Llama 4: each chosen expert's own sigmoid, no softmax
            top, chosen = logits.topk(c.n_expert_per_token, dim=-1)
            return torch.sigmoid(top.float()), chosen
        probs = logits.softmax(dim=-1, dtype=torch.float32)  # "softmax": Mixtral, Qwen MoE
        weights, chosen = probs.topk(c.n_expert_per_token, dim=-1)
        if c.moe_normalize_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, chosen


class Experts(nn.Module):
    """n_expert gated MLPs in two 3-D weights, each expert's slice an nn.Linear weight (out, in):
    gate_up_proj (E, 2I, C), gate rows first, and down_proj (E, C, I), as transformers 5 holds them.

    Token slots are sorted by expert and every expert multiplies its own rows (grouped_mm): no count is
    read on the host, so the layer compiles whole, and each expert's weights are read once per step."""

    def __init__(self, config: Config, intermediate_size: int) -> None:
        super().__init__()
        E, C, size = config.n_expert, config.n_embd, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * size, C))
        self.down_proj = nn.Parameter(torch.empty(E, C, size))
        for weight in (self.gate_up_proj, self.down_proj):  # as nn.Linear initialises each expert's
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * size)) if config.moe_expert_bias else None  # gpt-oss
        self.down_proj_bias = nn.Parameter(torch.zeros(E, C)) if config.moe_expert_bias else None
        self.config, self.activation = config, config.mlp_activation
        self.scale_input = config.moe_router == "sigmoid_input"  # Llama 4 weights each expert's input, not output

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, project: Callable | None = None
    ) -> torch.Tensor:
        """`project(name, rows, ends)`: the per-expert matmul by the parameter `name`; lora.LoRAExperts passes
        one that adds its adapters' updates."""
        project = project or self.project
        k = chosen.shape[1]
        chosen = chosen.reshape(-1)
        order = chosen.argsort(stable=True)  # slots grouped by expert, each expert's tokens in order
        token = order // k
        counts = chosen.new_zeros(self.gate_up_proj.shape[0]).index_add_(0, chosen, torch.ones_like(chosen))
        ends = counts.cumsum(0).to(torch.int32)
        expert = chosen[order]  # each sorted slot's expert, to gather its biases (gpt-oss)
        weights = weights.reshape(-1)[order, None]
        rows = x[token] * weights if self.scale_input else x[token]
        gate_up = project("gate_up_proj", rows, ends)
        if self.gate_up_proj_bias is not None:
            gate_up = gate_up + self.gate_up_proj_bias[expert]
        y = project("down_proj", self.activate(*gate_up.chunk(2, dim=-1)), ends)
        if self.down_proj_bias is not None:
            y = y + self.down_proj_bias[expert]
        # index_add_ sums a token's k outputs in expert order, as a loop over experts would
        return torch.zeros_like(x).index_add_(0, token, y if self.scale_input else y * weights)

    def project(self, name: str, rows: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        return grouped_mm(rows, getattr(self, name), ends)

    def activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.activation == "clamped_swiglu":  # gpt-oss; autograd's own backward (GatedActivation has none)
            limit = self.config.swiglu_limit
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            return gate * torch.sigmoid(gate * self.config.swiglu_alpha) * (up + 1)
        return gated_activation(gate, up, self.activation)


# --- building blocks ---
class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, unit_offset: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size) if unit_offset else torch.ones(size))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:  # Gemma stores weight - 1 and scales in fp32
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def make_norm(config: Config, size: int) -> nn.Module:
    if config.norm_class == "rmsnorm":
        return RMSNorm(size, config.norm_eps, config.norm_unit_offset)
    affine = config.norm_affine
    return nn.LayerNorm(size, eps=config.norm_eps, elementwise_affine=affine, bias=affine and config.norm_bias)


def activate(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    raise InvalidInput(f"unknown activation {name!r}")


def gated_activation(gate: torch.Tensor, up: torch.Tensor, name: str) -> torch.Tensor:
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return GatedActivation.apply(gate, up, name)
    return activate(gate, name) * up


class GatedActivation(torch.autograd.Function):
    """activate(gate) * up, keeping only gate and up for the backward, which recomputes activate(gate).

    Autograd would also keep activate(gate): one more (tokens x intermediate_size) tensor per layer, about a
    sixth of what a layer saves for the backward, for one elementwise op again in the backward. The gradients
    are autograd's own, bit for bit (the same backward kernels on the same values)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, name: str) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.name = name
        return activate(gate, name) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = activation_backward(grad * up, gate, ctx.name)
        if ctx.needs_input_grad[1]:
            grad_up = grad * activate(gate, ctx.name)
        return grad_gate, grad_up, None


def activation_backward(grad: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """The gradient through activate(x, name): the kernels autograd itself calls for each."""
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, x)
    if name in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_backward(grad, x, approximate="tanh" if name == "gelu_tanh" else "none")
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, x, 0)
    raise InvalidInput(f"unknown activation {name!r}")


def sparsemixer(logits: torch.Tensor, k: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's routing as transformers' modeling_phimoe.sparsemixer in eval mode (training too: no sampling): k times
    the best expert left, weighted by its softmax (logits' dtype) over the logits left within 2 * eps of it."""
    weights, chosen, left = [], [], logits
    for _ in range(k):
        best, expert = left.max(dim=-1, keepdim=True)
        far = (best - logits) / logits.abs().clamp(min=best) > 2 * eps
        weights.append(left.masked_fill(far, -math.inf).softmax(dim=-1).gather(-1, expert))
        chosen.append(expert)
        left = left.scatter(-1, expert, -math.inf)
    return torch.cat(weights, dim=-1), torch.cat(chosen, dim=-1)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


# --- rotary position embedding ---
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of each head; the rest pass through.

    Pair i is (i, i + d/2) (halves layout) or, interleaved, (2i, 2i+1). The tables hold each frequency
    twice, cat((f, f)), so the interleaved layout reads its first half and repeats each value."""
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    if interleaved:  # Cohere, ERNIE 4.5
        cos = cos[..., : d // 2].repeat_interleave(2, dim=-1)
        sin = sin[..., : d // 2].repeat_interleave(2, dim=-1)
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., : d // 2], rot[..., d // 2 :]
        rotated = torch.cat((-x2, x1), dim=-1)
    out = rot * cos + rotated * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def rope_cache(
    seq_len: int, dim: int, base: float, scaling: dict | None, max_positions: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (seq_len, dim) in fp32, computed as Hugging Face does for bit-equal results."""
    inv_freq, attention_factor = rope_inv_freq(dim, base, scaling, max_positions)
    positions = torch.arange(seq_len, dtype=torch.float32, device="cpu")
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_factor).to(device), (emb.sin() * attention_factor).to(device)


def rope_inv_freq(dim: int, base: float, scaling: dict | None, max_positions: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) and the cos/sin multiplier for each RoPE scaling type."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (base**exponents)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    assert scaling is not None
    factor = scaling.get("factor")
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":  # Llama 3.1+: stretch low frequencies, keep high ones, blend in between
        old_len = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return yarn_inv_freq(dim, base, scaling, max_positions)
    raise InvalidInput(f"unsupported rope scaling type {kind!r}; supported: default, linear, llama3, yarn")


def yarn_inv_freq(dim: int, base: float, scaling: dict, max_positions: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, with a linear ramp between."""
    original = scaling.get("original_max_position_embeddings") or max_positions
    factor = scaling.get("factor") or max_positions / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)
