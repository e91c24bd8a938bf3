"""Generation: KV-cache decoding against full forward passes, batching, stopping, sampling."""

from __future__ import annotations

import pytest
import torch
from helpers import reference_greedy, tiny_gpt

from plainlm.config import Config
from plainlm.generate import generate, generate_tokens
from plainlm.model import GPT
from plainlm.sampling import SamplingParams, sample

TINY = dict(vocab_size=97, block_size=32, n_layer=2, n_embd=32, n_head=4, intermediate_size=64)
CONFIGS = {
    "llama_gqa": Config(**TINY, n_kv_head=2),
    "sliding_window": Config(**TINY, n_kv_head=2, sliding_window=4, sliding_window_pattern=2),
    "gemma2": Config(
        **TINY,
        n_kv_head=2,
        head_dim=16,
        attention_logit_softcap=50.0,
        final_logit_softcap=30.0,
        norm_unit_offset=True,
        post_attention_norm=True,
        post_mlp_norm=True,
        scale_embeddings=True,
        sliding_window=4,
        sliding_window_pattern=2,
        mlp_activation="gelu_tanh",
    ),
    "learned_positions": Config(
        **TINY,
        position_embedding="learned",
        norm_class="layernorm",
        mlp_class="plain",
        mlp_activation="gelu_tanh",
        qkv_bias=True,
    ),
    "moe": Config(**TINY, n_kv_head=2, n_expert=4, n_expert_per_token=2),
}


def record_logits(model: GPT, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Make the model keep the last-position logits (B, V) of every forward call it makes."""
    calls: list[torch.Tensor] = []
    forward = model.forward

    def recording_forward(*args, **kwargs):
        logits = forward(*args, **kwargs)
        calls.append(logits[:, -1].clone())
        return logits

    monkeypatch.setattr(model, "forward", recording_forward)
    return calls


# --- 1. the KV cache reproduces the full forward pass ---
@pytest.mark.parametrize("name", CONFIGS)
def test_kv_cache_decoding_matches_full_forward(name: str) -> None:
    model = tiny_gpt(CONFIGS[name], std=0.2).eval()
    seq = torch.randint(0, model.config.vocab_size, (2, 14), generator=torch.Generator().manual_seed(1))
    prefill = 5
    with torch.no_grad():
        full = model(seq)
        model.set_kv_cache(batch_size=2, max_seq_length=seq.shape[1])
        got = [model(seq[:, :prefill], input_pos=torch.arange(prefill))]
        for i in range(prefill, seq.shape[1]):
            got.append(model(seq[:, i : i + 1], input_pos=torch.tensor([i])))
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama_gqa", "gemma2"])  # gemma2: the final softcap applies to the chosen ones
def test_logit_positions_compute_only_those_positions_logits(name: str) -> None:
    """What a prefill asks for (generate.py, the serving engine): each row's own positions, the same numbers."""
    model = tiny_gpt(CONFIGS[name], std=0.2).eval()
    seq = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([[8], [3], [0]])  # a row each, as right-padded rows of different lengths end
    with torch.no_grad():
        full = model(seq)
        chosen = model(seq, logit_positions=positions)
        two = model(seq, logit_positions=torch.tensor([[1, 8], [2, 3], [0, 0]]))
    assert chosen.shape == (3, 1, model.config.vocab_size)
    torch.testing.assert_close(chosen[:, 0], full[torch.arange(3), positions[:, 0]], atol=1e-6, rtol=0)
    torch.testing.assert_close(two[0], full[0, [1, 8]], atol=1e-6, rtol=0)


# --- 2. batching with left padding changes nothing ---
@pytest.mark.parametrize("name", CONFIGS)
def test_batched_prompts_match_each_prompt_alone(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_gpt(CONFIGS[name], std=0.2).eval()
    prompts = [[5, 17, 3], [9, 1, 44, 2, 60, 7, 31], [12, 80, 6, 6, 29]]  # longer than the sliding window
    n = 8
    calls = record_logits(model, monkeypatch)
    batched = generate(model, prompts, max_new_tokens=n)
    batched_logits = torch.stack(calls, dim=1)  # (B, steps, V)
    for row, prompt in enumerate(prompts):
        calls.clear()
        alone = generate(model, [prompt], max_new_tokens=n)[0]
        assert batched[row] == alone
        torch.testing.assert_close(batched_logits[row], torch.cat(calls), atol=1e-5, rtol=0)


def nan_on_empty_rows_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """Attention as some CUDA kernels compute it: a query that sees no key gets NaN, not 0."""
    if enable_gqa:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    scores = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        attn_mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def test_pad_queries_never_poison_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_gpt(CONFIGS["llama_gqa"], std=0.2).eval()
    prompts = [[5, 17, 3], [9, 1, 44, 2, 60, 7, 31]]
    alone = [generate(model, [prompt], max_new_tokens=6)[0] for prompt in prompts]
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", nan_on_empty_rows_sdpa)
    calls = record_logits(model, monkeypatch)
    assert generate(model, prompts, max_new_tokens=6) == alone
    assert all(torch.isfinite(logits).all() for logits in calls)


# --- 3. greedy decoding with the cache equals argmax of full forward passes ---
@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_matches_no_cache_reference(name: str) -> None:
    model = tiny_gpt(CONFIGS[name], seed=3, std=0.2).eval()
    prompt = [4, 8, 15, 16, 23, 42]
    assert generate(model, [prompt], max_new_tokens=10) == [reference_greedy(model, prompt, 10)]


# --- 4. stopping, lengths and streaming ---
def test_max_new_tokens_and_streaming() -> None:
    model = tiny_gpt(CONFIGS["llama_gqa"], std=0.2).eval()
    steps = list(generate_tokens(model, [[1, 2, 3]], max_new_tokens=7))
    assert len(steps) == 7 and all(len(step) == 1 for step in steps)
    assert [step[0] for step in steps] == generate(model, [[1, 2, 3]], max_new_tokens=7)[0]
    assert model.blocks[0].attn.kv_cache is None


def test_max_new_tokens_is_cut_to_the_context() -> None:
    model = tiny_gpt(CONFIGS["llama_gqa"], std=0.2).eval()
    block_size = model.config.block_size
    out = generate(model, [list(range(block_size - 3)), [1, 2]], max_new_tokens=10)
    assert [len(o) for o in out] == [3, 3]


def test_stop_ids_end_each_sequence_on_its_own() -> None:
    model = tiny_gpt(CONFIGS["llama_gqa"], std=0.2).eval()
    prompts = [[5, 17, 3], [9, 1, 44, 2, 60]]
    full = generate(model, prompts, max_new_tokens=12)
    stop_id = full[0][2]
    expected = [out[: out.index(stop_id)] if stop_id in out else out for out in full]
    assert len(expected[0]) <= 2  # row 0 stops early

    assert generate(model, prompts, max_new_tokens=12, stop_ids=[stop_id]) == expected
    steps = list(generate_tokens(model, prompts, max_new_tokens=12, stop_ids=[stop_id]))
    # The stop token is streamed, then the row reports None until every row has stopped.
    column0 = [step[0] for step in steps]
    assert column0[: len(expected[0]) + 1] == expected[0] + [stop_id]
    assert all(t is None for t in column0[len(expected[0]) + 1 :])
    if stop_id in full[1]:
        assert len(steps) == max(len(e) for e in expected) + 1  # ends once all rows stopped
    else:
        assert len(steps) == 12


def test_stopping_the_stream_early_clears_the_cache() -> None:
    model = tiny_gpt(CONFIGS["llama_gqa"], std=0.2).eval()
    stream = generate_tokens(model, [[1, 2, 3]], max_new_tokens=5)
    next(stream)
    assert model.blocks[0].attn.kv_cache is not None
    stream.close()
    assert model.blocks[0].attn.kv_cache is None


# --- 5. sampling ---
def test_top_k_1_is_greedy() -> None:
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    for seed in range(5):
        picked = sample(logits, SamplingParams(temperature=1.5, top_k=1), torch.Generator().manual_seed(seed))
        assert torch.equal(picked, logits.argmax(dim=-1))
    model = tiny_gpt(CONFIGS["llama_gqa"], std=0.2).eval()
    greedy = generate(model, [[3, 1, 4, 1, 5]], max_new_tokens=8)
    assert generate(model, [[3, 1, 4, 1, 5]], max_new_tokens=8, temperature=0.9, top_k=1) == greedy


def test_top_p_samples_only_the_nucleus() -> None:
    probs = torch.tensor([0.05, 0.5, 0.02, 0.3, 0.1, 0.03])
    logits = probs.log().expand(4000, -1)
    cases = {0.75: {1, 3}, 0.85: {1, 3, 4}, 0.4: {1}, 1e-9: {1}}  # 0.5 < 0.75 <= 0.5 + 0.3, ...
    for top_p, nucleus in cases.items():
        drawn = sample(logits, SamplingParams(temperature=1.0, top_p=top_p), torch.Generator().manual_seed(0))
        assert set(drawn.tolist()) == nucleus, top_p
    drawn = sample(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.95), torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {1, 3, 4}  # top-k first; within it 0.5/0.9 + 0.3/0.9 < 0.95


def test_temperature_sampling_follows_the_tempered_distribution() -> None:
    logits = torch.tensor([1.0, 2.0, 0.5, 1.5])
    drawn = sample(logits.expand(40000, -1), SamplingParams(temperature=2.0), torch.Generator().manual_seed(0))
    frequencies = torch.bincount(drawn, minlength=4).float() / drawn.numel()
    torch.testing.assert_close(frequencies, (logits / 2.0).softmax(dim=-1), atol=0.01, rtol=0)


def test_seeded_sampling_is_reproducible() -> None:
    model = tiny_gpt(CONFIGS["llama_gqa"], std=0.2).eval()
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6]]

    def run(seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompts, max_new_tokens=10, temperature=1.5, top_p=0.95, generator=g)

    assert run(0) == run(0)
    assert len({str(run(seed)) for seed in range(4)}) > 1  # the seed matters: it really samples


# --- 6. prompts that do not fit ---
def test_too_long_prompt_raises_a_clear_error() -> None:
    model = tiny_gpt(CONFIGS["llama_gqa"], std=0.2).eval()
    long_prompt = list(range(40))
    with pytest.raises(ValueError, match=r"prompt 1 has 40 tokens.*context is 32.*--truncate_prompt true"):
        generate(model, [[1, 2], long_prompt], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"^the prompt has 40 tokens.*--truncate_prompt true to keep its last 31"):
        generate(model, [long_prompt], max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[]], max_new_tokens=4)


def test_truncate_prompt_keeps_the_last_tokens() -> None:
    model = tiny_gpt(CONFIGS["learned_positions"], std=0.2).eval()
    long_prompt = [(7 * i) % 97 for i in range(40)]
    out = generate(model, [long_prompt], max_new_tokens=4, truncate_prompt=True)
    assert out == generate(model, [long_prompt[-31:]], max_new_tokens=4)
    assert len(out[0]) == 1  # the last 31 tokens fill the 32-token context but one


def test_a_prompt_that_leaves_fewer_new_tokens_than_asked_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_gpt(CONFIGS["llama_gqa"], std=0.2).eval()
    out = generate(model, [list(range(1, 29))], max_new_tokens=10)
    assert len(out[0]) == 4
    assert capsys.readouterr().err == (
        "note: the prompt has 28 tokens and the model's context is 32: "
        "room for 4 new tokens, not the 10 asked for (--max_new_tokens)\n"
    )
    generate(model, [[1, 2], list(range(1, 32))], max_new_tokens=3)
    assert capsys.readouterr().err.startswith(
        "note: prompt 1 has 31 tokens and the model's context is 32: room for 1 new token,"
    )
    generate(model, [list(range(1, 29))], max_new_tokens=4)
    assert capsys.readouterr().err == ""  # exactly what was asked fits: nothing to say
    generate(model, [list(range(40))], max_new_tokens=1, truncate_prompt=True)
    assert capsys.readouterr().err == (
        "note: the prompt has 40 tokens and the model's context is 32: "
        "its first 9 tokens are dropped (--truncate_prompt true)\n"
    )


@pytest.mark.slow
def test_compiled_decoding_matches_eager_and_compiles_once_for_any_prompt_length() -> None:
    """compile=True gives eager's tokens, and a prompt of another length reuses the compiled step."""
    from plainlm import compiled_step

    config = Config(**{**TINY, "block_size": 512}, n_kv_head=2)
    model = tiny_gpt(config, std=0.2).eval()
    torch._dynamo.reset()
    compiled_step._loaded.clear()  # the compiled steps this process holds, one per file saved or loaded
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 6]]
    eager = [generate(model, [p], max_new_tokens=6) for p in prompts]
    compiled = [generate(model, [prompts[0]], max_new_tokens=6, compile=True)]
    steps_after_first = dict(compiled_step._loaded)
    compiled.append(generate(model, [prompts[1]], max_new_tokens=6, compile=True))
    assert compiled == eager
    assert len(steps_after_first) == 1
    assert compiled_step._loaded == steps_after_first  # the second length compiled or loaded nothing new
    # The compiled path keeps its KV cache on the model, and the next call reuses it (zeroed): the same
    # modules, so the compiled step's guards can skip them.
    kept = model.blocks[0].attn.kv_cache
    assert kept is not None
    assert generate(model, [prompts[0]], max_new_tokens=6, compile=True) == eager[0]
    assert model.blocks[0].attn.kv_cache is kept
    # A forward without input_pos is a plain pass that neither reads nor writes the kept cache.
    idx, cached_keys = torch.tensor([prompts[1]]), kept.k.clone()
    with torch.no_grad():
        with_cache = model(idx)
        model.clear_kv_cache()
        torch.testing.assert_close(with_cache, model(idx), rtol=0, atol=0)
    assert torch.equal(kept.k, cached_keys)
    generate(model, [prompts[0]], max_new_tokens=6)
    assert model.blocks[0].attn.kv_cache is None  # eager decoding frees its cache


def test_rope_tables_grow_to_the_positions_a_run_reaches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A context of millions (Llama 4 Scout's 10M) starts with short cos/sin tables: a forward pass past them,
    a KV cache longer than them, grow them, to the numbers full tables give."""
    import plainlm.model

    full = tiny_gpt(CONFIGS["sliding_window"], std=0.2).eval()  # a context of 32: tables of 32 positions
    monkeypatch.setattr(plainlm.model, "ROPE_TABLE_POSITIONS", 8)
    short = tiny_gpt(CONFIGS["sliding_window"], std=0.2).eval()
    assert (short.rope_cos.shape[0], full.rope_cos.shape[0]) == (8, 32)
    seq = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(short(seq), full(seq), atol=0, rtol=0)
    assert short.rope_cos.shape[0] == 16  # doubled: at least the 12 positions read
    torch.testing.assert_close(short.rope_cos, full.rope_cos[:16], atol=0, rtol=0)
    prompt = [[5, 17, 3, 9]]
    assert generate(short, prompt, max_new_tokens=25) == generate(full, prompt, max_new_tokens=25)
    assert short.rope_cos.shape[0] == 32  # the cache's length, capped at the context
