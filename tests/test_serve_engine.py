"""The serving engine (plainlm/serve/engine.py, kv_pool.py) against plain decoding: greedy tokens equal
`generate` alone, also with staggered arrivals, chunked prompts, shared prefixes and a pool so small that
requests are preempted; logprobs equal a plain forward pass; the pool's counters return to empty."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from helpers import make_adapter, merged, tiny_gpt

from plainlm.api import LLM
from plainlm.errors import InvalidInput, NotFound, QueueFull
from plainlm.generate import generate
from plainlm.lora import LoRAConfig
from plainlm.sampling import SamplingParams
from plainlm.serve.adapters import AdapterSet
from plainlm.serve.engine import BLOCK_SIZE, Engine, Request
from plainlm.serve.kv_pool import BlockPool

LOGPROB_TOLERANCE = 1e-4  # fp32: a paged forward and a plain one differ by summation order only


@pytest.fixture(scope="module")
def llm(tiny_hf_dir) -> LLM:
    return LLM.load(tiny_hf_dir)


def prompts(count: int, vocab: int, seed: int = 0, shortest: int = 3, longest: int = 70) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest, (count,), generator=generator).tolist()
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def alone(llm: LLM, prompt: list[int], params: SamplingParams) -> list[int]:
    """The reference: the request on its own through plainlm's plain KV-cache decoding."""
    stop = (*llm.tokenizer.stop_ids, *params.stop_ids)
    return generate(llm.model, [prompt], params, stop_ids=stop)[0]


@pytest.mark.parametrize("in_place", [True, False], ids=["pool-read-in-place", "pool-gathered"])
def test_greedy_equals_generate_alone_with_staggered_arrivals_and_chunked_prompts(llm, in_place):
    """12 requests of different lengths: 4 first, then 4 more while those decode, then 4 more; prompts run
    in chunks of 8 tokens; every request's tokens equal what generate gives it alone. Decode steps read the
    pool in place with plainlm's kernel where it runs, or gather it for SDPA (as on other CPUs and GPUs)."""
    engine = Engine(llm, max_batch_size=6, prefill_chunk=8, kv_cache_gb=0.01)
    if in_place and not engine.reads_pool_in_place:
        pytest.skip("plainlm's decode kernel does not run here (it needs AVX512-VNNI)")
    engine.reads_pool_in_place = in_place
    params = SamplingParams(max_new_tokens=20)
    requests = [Request(prompt=p, params=params) for p in prompts(12, llm.model.config.vocab_size)]
    results = {}

    def collect(event):
        results.setdefault(event.request_id, []).extend(event.token_ids)

    for wave in range(3):
        for request in requests[4 * wave : 4 * wave + 4]:
            request.on_event = collect
            engine.submit(request)
        for _ in range(5):  # the next wave arrives while this one is mid-prompt or decoding
            engine.step()
    while engine.running or engine.waiting:
        engine.step()
    for request in requests:
        assert results[request.request_id] == alone(llm, request.prompt, params)
    assert engine.pool.used_blocks == 0


@pytest.mark.parametrize("in_place", [True, False], ids=["pool-read-in-place", "pool-gathered"])
def test_shared_prefix_is_computed_once_and_decodes_the_same(llm, in_place):
    """Five questions behind one cached system prompt arrive together: their prompt chunks (of different
    lengths) run as one padded batch, reading the pool in place or gathered."""
    vocab = llm.model.config.vocab_size
    system = prompts(1, vocab, seed=1, shortest=50, longest=51)[0]  # 3 full blocks and 2 tokens
    questions = prompts(6, vocab, seed=2, shortest=2, longest=12)
    engine = Engine(llm, max_batch_size=8, kv_cache_gb=0.01)
    if in_place and not engine.reads_pool_in_place:
        pytest.skip("plainlm's decode kernel does not run here (it needs AVX512-VNNI)")
    engine.reads_pool_in_place = in_place
    params = SamplingParams(max_new_tokens=12)
    first = engine.generate([Request(prompt=system + questions[0], params=params)])[0]
    assert first.cached_tokens == 0
    later = engine.generate([Request(prompt=system + q, params=params) for q in questions[1:]])
    full_blocks = len(system) // BLOCK_SIZE * BLOCK_SIZE
    assert [r.cached_tokens for r in later] == [full_blocks] * len(later)
    for question, result in zip(questions, [first, *later], strict=True):
        assert result.token_ids == alone(llm, system + question, params)
    # A repeated whole prompt is found too, but its last token always runs (its logits start the answer).
    again = engine.generate([Request(prompt=system + questions[0], params=params)])[0]
    assert again.token_ids == first.token_ids
    assert again.cached_tokens == (len(system + questions[0]) - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert engine.pool.used_blocks == 0 and engine.pool.cached_blocks > 0


def test_a_pool_too_small_for_everyone_preempts_and_still_decodes_exactly(llm):
    """Room for about two requests' tokens: the others wait or are preempted and recomputed."""
    bytes_per_block = engine_bytes_per_token(llm) * BLOCK_SIZE
    engine = Engine(llm, max_batch_size=8, kv_cache_gb=10 * bytes_per_block / 2**30)
    assert engine.pool.num_blocks == 10
    params = SamplingParams(max_new_tokens=40)
    batch = prompts(6, llm.model.config.vocab_size, seed=3, shortest=20, longest=40)
    results = engine.generate([Request(prompt=p, params=params) for p in batch])
    for prompt, result in zip(batch, results, strict=True):
        assert result.token_ids == alone(llm, prompt, params)
    assert engine.pool.used_blocks == 0


def engine_bytes_per_token(llm: LLM) -> int:
    c = llm.model.config
    return 2 * c.n_layer * c.n_kv_head * c.head_dim * 4


# Llama 4's attention with chunks of 4 positions, a NoPE layer with its temperature, and its experts: the pool's
# masks must count positions as a plain forward does, across prompt chunks of 7
LLAMA4 = dict(
    n_layer=4,
    block_size=64,
    n_expert=4,
    n_expert_per_token=1,
    moe_router="sigmoid_input",
    moe_shared_intermediate_size=32,
    moe_dense_layers=[0, 2],
    nope_layers=[3],
    attention_chunk_size=4,
    attn_temperature_floor_scale=3,
    qk_norm="l2",
    rope_interleaved=True,
)


@pytest.mark.parametrize("family", ["llama", "llama4"])
def test_logprobs_equal_a_plain_forward_pass(llm, family):
    if family == "llama4":
        model = tiny_gpt(**LLAMA4, vocab_size=llm.model.config.vocab_size, std=0.2).eval()
        llm = LLM(model, llm.tokenizer)
    prompt = prompts(1, llm.model.config.vocab_size, seed=4, shortest=30, longest=31)[0]
    engine = Engine(llm, prefill_chunk=7, kv_cache_gb=0.01)
    result = engine.generate(
        [Request(prompt=prompt, params=SamplingParams(max_new_tokens=8), logprobs=3, prompt_logprobs=True)]
    )[0]
    sequence = prompt + result.token_ids
    with torch.no_grad():
        reference = llm.model(torch.tensor([sequence]))[0].float().log_softmax(dim=-1)
    assert result.prompt_logprobs[0].token_id == prompt[0] and math.isnan(result.prompt_logprobs[0].logprob)
    served = result.prompt_logprobs[1:] + result.logprobs
    assert [t.token_id for t in served] == sequence[1:]
    for position, token in enumerate(served):
        expected = reference[position, token.token_id].item()
        assert token.logprob == pytest.approx(expected, abs=LOGPROB_TOLERANCE)
        top_values, top_ids = reference[position].topk(3)
        assert [i for i, _ in token.top] == top_ids.tolist()
        assert [v for _, v in token.top] == pytest.approx(top_values.tolist(), abs=LOGPROB_TOLERANCE)


def test_each_row_samples_with_its_own_parameters(llm):
    """A seeded sampled request in a batch with greedy ones draws what it draws alone: its own generator."""
    vocab = llm.model.config.vocab_size
    batch = prompts(4, vocab, seed=5)
    sampled = SamplingParams(max_new_tokens=15, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    greedy = SamplingParams(max_new_tokens=15)
    engine = Engine(llm, kv_cache_gb=0.01)
    params = [sampled, greedy, sampled, greedy]
    results = engine.generate([Request(prompt=p, params=q) for p, q in zip(batch, params, strict=True)])
    for prompt, q, result in zip(batch, params, results, strict=True):
        assert result.token_ids == alone(llm, prompt, q)


def test_stop_strings_across_token_boundaries(llm):
    engine = Engine(llm, kv_cache_gb=0.01)
    prompt = prompts(1, llm.model.config.vocab_size, seed=6)[0]
    free = engine.generate([Request(prompt=prompt, params=SamplingParams(max_new_tokens=30))])[0]
    text = free.text
    assert len(text) > 12
    stop = text[5:9]  # four characters that likely span two tokens
    streamed = []
    request = Request(prompt=prompt, params=SamplingParams(max_new_tokens=30), stop=("never appears", stop))
    request.on_event = lambda event: streamed.append(event.text)
    result = engine.generate([request])[0]
    assert result.finish_reason == "stop"
    assert result.text == "".join(streamed) == text[: text.find(stop)]
    assert free.finish_reason == "length" and free.completion_tokens == 30


def test_cancel_and_stop_free_every_block(llm):
    engine = Engine(llm, kv_cache_gb=0.01)
    events: dict[int, list] = {}
    finished = threading.Event()

    def listen(event):
        events.setdefault(event.request_id, []).append(event)
        if event.finish_reason and len([e for v in events.values() for e in v if e.finish_reason]) == 3:
            finished.set()

    engine.start()
    try:
        ids = [
            engine.submit(Request(prompt=p, params=SamplingParams(max_new_tokens=400), on_event=listen))
            for p in prompts(3, llm.model.config.vocab_size, seed=8)
        ]
        while not all(events.get(i) for i in ids):  # all three are decoding
            threading.Event().wait(0.01)
        engine.cancel(ids[0])
        while not (events[ids[0]] and events[ids[0]][-1].finish_reason):
            threading.Event().wait(0.01)
    finally:
        engine.stop()
    assert finished.wait(5)
    assert [events[i][-1].finish_reason for i in ids] == ["abort"] * 3
    assert engine.pool.used_blocks == 0 and not engine.running and not engine.waiting


def test_a_request_that_fails_fails_alone(llm):
    class Broken:
        done = False

        def mask(self, logits):
            raise RuntimeError("this constraint is broken")

        def accept(self, token):
            pass

    engine = Engine(llm, kv_cache_gb=0.01)
    batch = prompts(3, llm.model.config.vocab_size, seed=9)
    params = SamplingParams(max_new_tokens=10)
    requests = [Request(prompt=p, params=params) for p in batch]
    requests[1].constraint = Broken()
    results = engine.generate(requests)
    assert results[1].finish_reason == "error" and "this constraint is broken" in results[1].error
    for i in (0, 2):
        assert results[i].token_ids == alone(llm, batch[i], params)
    assert engine.pool.used_blocks == 0


def test_bad_requests_say_what_is_wrong(llm):
    engine = Engine(llm, max_seq_length=64, max_queue=1, kv_cache_gb=0.01)
    with pytest.raises(InvalidInput, match="prompt is empty"):
        engine.submit(Request(prompt=[]))
    with pytest.raises(InvalidInput, match="the prompt has 80 tokens, but the context is 64"):
        engine.submit(Request(prompt=[5] * 80))
    with pytest.raises(InvalidInput, match="ask for at most 14"):
        engine.submit(Request(prompt=[5] * 50, params=SamplingParams(max_new_tokens=20)))
    with pytest.raises(NotFound, match="no adapter named 'french'"):
        engine.submit(Request(prompt=[5], params=SamplingParams(max_new_tokens=2), adapter="french"))
    engine.submit(Request(prompt=[5], params=SamplingParams(max_new_tokens=2)))
    with pytest.raises(QueueFull, match="retry later"):
        engine.submit(Request(prompt=[5], params=SamplingParams(max_new_tokens=2)))
    with pytest.raises(InvalidInput, match="max_seq_length 4096"):
        Engine(llm, max_seq_length=4096)


def test_block_pool_counts_and_evicts_least_recently_released_first():
    pool = BlockPool(num_blocks=4, block_size=2)
    a, hashes = pool.allocate([1, 2, 3, 4, 5], salt="")
    assert len(a) == 3 and hashes == [] and pool.used_blocks == 3
    for block, block_hash in zip(a, pool.chain([1, 2, 3, 4], ""), strict=False):
        pool.register(block, block_hash)
    pool.release(a)
    assert pool.used_blocks == 0 and pool.cached_blocks == 2
    b, hashes = pool.allocate([1, 2, 3, 4, 9], salt="")
    assert b[:2] == [0, 1] and len(hashes) == 2  # the cached prefix is shared
    assert pool.can_allocate([1, 2, 3], salt="") and not pool.can_allocate([1, 2, 3], salt="lora")
    c, hashes = pool.allocate([1, 2], salt="lora")  # another salt shares nothing
    assert hashes == [] and pool.free_blocks == 0 and not pool.grow(c, 5)
    pool.release(b)
    pool.release(c)
    assert pool.used_blocks == 0


def test_a_mixed_batch_of_adapters_decodes_each_row_as_its_adapter_merged_and_alone(llm, tmp_path):
    """Rows for adapter a, the base, adapter b and a again, in one batch: each row's greedy tokens equal the
    same request against that adapter merged into the base (merge-lora), decoded alone."""
    base = llm.model
    made = {
        "a": make_adapter(base, tmp_path / "a", LoRAConfig(r=4, alpha=8, targets=["q", "v", "up"]), seed=1),
        "b": make_adapter(base, tmp_path / "b", LoRAConfig(r=2, alpha=4, targets=["k", "o", "down"]), seed=2),
    }
    served = LLM(copy.deepcopy(base), llm.tokenizer)
    adapters = AdapterSet(served.model)
    engine = Engine(served, adapters=adapters, kv_cache_gb=0.01)
    engine.load_adapter("a", made["a"])
    engine.load_adapter("b", made["b"])
    params = SamplingParams(max_new_tokens=12)
    batch = prompts(4, llm.model.config.vocab_size, seed=10)
    names = ["a", None, "b", "a"]
    results = engine.generate([Request(prompt=p, params=params, adapter=n) for p, n in zip(batch, names, strict=True)])
    for prompt, name, result in zip(batch, names, results, strict=True):
        reference = llm if name is None else LLM(merged(base, made[name]), llm.tokenizer)
        assert result.token_ids == alone(reference, prompt, params), name
    assert results[0].token_ids != alone(llm, batch[0], params)  # the adapter changes the answer

    # The same prompt under the base and under an adapter never shares cached blocks: their keys differ.
    shared = batch[0] * 3
    first, second = engine.generate([Request(prompt=shared, params=params, adapter=n) for n in ("a", None)])
    assert second.cached_tokens == 0
    engine.unload_adapter("b")
    with pytest.raises(NotFound, match="no adapter named 'b'"):
        engine.submit(Request(prompt=shared, params=params, adapter="b"))
    engine.load_adapter("b", made["a"])  # another adapter under an old name: a's weights, no stale blocks
    again = engine.generate([Request(prompt=shared, params=params, adapter="b")])[0]
    assert again.cached_tokens == 0 and again.token_ids == first.token_ids


def test_latent_attention_serves_from_the_pool_as_it_generates_alone(llm):
    """DeepSeek-V3's multi-head latent attention: the pool holds its latent and rotated key per token
    (kv_lora_rank + qk_rope_head_dim values a layer), and each request's greedy tokens are generate's alone."""
    fields = dict(
        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, head_dim=24, v_head_dim=12, rope_interleaved=True,
        n_expert=8, n_expert_per_token=2, moe_router="noaux_tc", moe_n_group=4, moe_topk_group=2,
        moe_shared_intermediate_size=16, moe_dense_layers=[0],
    )  # fmt: skip
    model = tiny_gpt(vocab_size=llm.model.config.vocab_size, block_size=128, std=0.2, **fields).eval()
    mla = LLM(model, llm.tokenizer)
    engine = Engine(mla, max_batch_size=4, prefill_chunk=8, kv_cache_gb=0.01)
    assert engine.bytes_per_token == model.config.n_layer * (16 + 8) * 4
    params = SamplingParams(max_new_tokens=12)
    requests = [Request(prompt=p, params=params) for p in prompts(6, model.config.vocab_size, longest=40)]
    results = {}
    for request in requests:
        request.on_event = lambda event: results.setdefault(event.request_id, []).extend(event.token_ids)
        engine.submit(request)
    while engine.running or engine.waiting:
        engine.step()
    for request in requests:
        assert results[request.request_id] == alone(mla, request.prompt, params)
    assert engine.pool.used_blocks == 0
