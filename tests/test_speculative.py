"""Speculative decoding (plainlm/speculative.py): greedy output identical to plain greedy decoding for every
draft kind, sampled output that follows the model's distribution (a chi-square test), KV caches that need
no rollback, and the refusals of drafts that cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import (
    TINY,
    chi_square_p_value,
    greedy_margins,
    joint_distribution,
    reference_greedy,
    run_cli,
    tiny_gpt,
)

from plainlm.api import LLM
from plainlm.config import Config
from plainlm.errors import InvalidInput
from plainlm.generate import generate, generate_tokens
from plainlm.quantize import quantize_model
from plainlm.sampling import SamplingParams
from plainlm.speculative import (
    LookupFirstDraft,
    ModelDraft,
    NgramDraft,
    SpeculativeStats,
    quantized_draft,
    speculative_tokens,
    verify,
)

# n_embd 64: int4's groups of 64 fit. Weights drawn with std 0.3 give peaked logits, so greedy tokens do not
# near-tie and two decoders' outputs can be compared token for token.
SPEC = {**TINY, "n_embd": 64, "intermediate_size": 128, "block_size": 96}
DRAFT_KINDS = ("ngram", "self", "other", "int8", "int4", "ngram+other", "ngram+int8")


def model_and_drafts() -> tuple:
    model = tiny_gpt(std=0.3, **SPEC).eval()
    drafts = {
        "ngram": NgramDraft(),
        "self": ModelDraft(tiny_gpt(std=0.3, **SPEC).eval()),  # the same weights: every proposal is kept
        "other": ModelDraft(tiny_gpt(seed=1, std=0.3, **{**SPEC, "n_layer": 1}).eval()),  # almost none kept
        "int8": quantized_draft(model, "int8"),
        "int4": quantized_draft(model, "int4"),
        "ngram+other": LookupFirstDraft(ModelDraft(tiny_gpt(seed=1, std=0.3, **{**SPEC, "n_layer": 1}).eval())),
        "ngram+int8": LookupFirstDraft(quantized_draft(model, "int8")),
    }
    return model, drafts


def prompts_for_tests() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, SPEC["vocab_size"], (n,), generator=generator).tolist() for n in (1, 5, 12, 30)]
    return [*prompts, [5, 6, 7, 8, 9] * 4]  # a repetitive one: n-gram lookup finds its sequels


@pytest.mark.parametrize("draft_tokens", [None, 1, 3])
def test_greedy_speculative_output_is_plain_greedy_output(draft_tokens: int | None) -> None:
    model, drafts = model_and_drafts()
    prompts = prompts_for_tests()
    expected = [reference_greedy(model, prompt, 40) for prompt in prompts]
    assert [generate(model, [prompt], max_new_tokens=40)[0] for prompt in prompts] == expected
    for kind, draft in drafts.items():
        got = generate(model, prompts, max_new_tokens=40, draft=draft, draft_tokens=draft_tokens)
        assert got == expected, kind
    # The drafts did what they are here for: the same weights are always right, another model rarely.
    assert drafts["self"].stats.acceptance_rate == 1.0
    assert drafts["other"].stats.acceptance_rate < 0.5
    assert drafts["ngram"].stats.accepted > 0  # the repetitive prompt, decoded last


def test_named_drafts_and_streaming() -> None:
    model = tiny_gpt(std=0.3, **SPEC).eval()
    prompt = prompts_for_tests()[-1]
    expected = reference_greedy(model, prompt, 20)
    for name in ("ngram", "int8", "int4", "ngram+int8", "ngram+int4"):
        assert generate(model, [prompt], max_new_tokens=20, draft=name) == [expected], name
    steps = list(generate_tokens(model, [prompt], max_new_tokens=20, draft="ngram"))
    assert steps == [[token] for token in expected]  # one token a step, as without a draft


def test_a_stop_id_inside_an_accepted_run_ends_the_output_there() -> None:
    model, drafts = model_and_drafts()
    prompt = prompts_for_tests()[-1]
    plain = reference_greedy(model, prompt, 30)
    stop = plain[7]
    expected = plain[: plain.index(stop)]
    for kind in ("self", "ngram"):
        assert generate(model, [prompt], max_new_tokens=30, stop_ids=[stop], draft=drafts[kind]) == [expected]
    steps = list(generate_tokens(model, [prompt], max_new_tokens=30, stop_ids=[stop], draft=drafts["self"]))
    assert steps[-1] == [stop] and len(steps) == len(expected) + 1  # the stop token is yielded, nothing after


def test_max_new_tokens_and_the_context_end_are_kept() -> None:
    model, drafts = model_and_drafts()
    prompt = prompts_for_tests()[3]  # 30 tokens
    for kind in ("self", "ngram", "other"):
        for n in (1, 2, 5):
            assert generate(model, [prompt], max_new_tokens=n, draft=drafts[kind]) == [
                reference_greedy(model, prompt, n)
            ]
    room = SPEC["block_size"] - len(prompt)  # the cache's last slot is reached: the scratch slot is never needed
    got = generate(model, [prompt], max_new_tokens=500, draft=drafts["self"], draft_tokens=7)
    assert got == [reference_greedy(model, prompt, room)]


def test_the_next_verification_after_a_refusal_sees_a_cache_like_a_fresh_pass() -> None:
    """The rejected proposals stay in the cache past the accepted tokens: each verification's logits must
    equal a pass without any cache over the accepted sequence and the tokens it feeds."""
    model = tiny_gpt(std=0.3, **SPEC).eval()
    draft = ModelDraft(tiny_gpt(seed=1, std=0.3, **{**SPEC, "n_layer": 1}).eval())
    calls = []

    def record(module, args, kwargs, output):
        if kwargs.get("input_pos") is not None and args[0].shape[1] > 1 and len(calls) < 100:
            calls.append((args[0][0].tolist(), kwargs["input_pos"].tolist(), output[0].clone()))

    prompt = prompts_for_tests()[2]
    handle = model.register_forward_hook(record, with_kwargs=True)
    try:
        (output,) = generate(model, [prompt], max_new_tokens=40, draft=draft, draft_tokens=3)
    finally:
        handle.remove()
    sequence = prompt + output
    verifications = calls[1:]  # the first is the prompt's prefill
    assert draft.stats.accepted < draft.stats.proposed and len(verifications) > 5  # refusals happened
    for fed, slots, logits in verifications:
        context = sequence[: slots[0]] + fed
        with torch.no_grad():
            fresh = model(torch.tensor([context]))[0, slots[0] :]
        torch.testing.assert_close(logits, fresh, atol=1e-5, rtol=1e-5)


def test_lookup_first_asks_the_model_draft_only_where_lookup_finds_nothing() -> None:
    """Behind the lookup, a model with the model's own weights: its proposals must all be kept, which they
    are only if its cache caught up on the tokens that lookup's proposals added in between."""
    model = tiny_gpt(std=0.3, **SPEC).eval()
    draft = LookupFirstDraft(ModelDraft(tiny_gpt(std=0.3, **SPEC).eval()))
    log: list[tuple[str, int, int]] = []  # (which draft proposed, how many, how many were kept)
    lookup_propose, model_propose, accepted = draft.lookup.propose, draft.model_draft.propose, draft.accepted

    def spy(name, propose):
        def call(sequence, k, params, generator):
            proposals, drawn_from = propose(sequence, k, params, generator)
            if proposals:
                log.append((name, len(proposals), -1))
            return proposals, drawn_from

        return call

    def kept(count):
        if log and log[-1][2] == -1:  # not after a step with nothing to check (no room left for proposals)
            log[-1] = (*log[-1][:2], count)
        accepted(count)

    draft.lookup.propose, draft.model_draft.propose = spy("lookup", lookup_propose), spy("model", model_propose)
    draft.accepted = kept
    total = SpeculativeStats()  # a draft's stats are one sequence's
    for prompt in prompts_for_tests():
        assert generate(model, [prompt], max_new_tokens=40, draft=draft) == [reference_greedy(model, prompt, 40)]
        total.add(draft.stats)
    by_lookup = [entry for entry in log if entry[0] == "lookup"]
    by_model = [entry for entry in log if entry[0] == "model"]
    assert len(by_lookup) > 5 and len(by_model) > 5  # both took turns
    assert any(count < proposed for _, proposed, count in by_lookup)  # lookup was refused at times
    assert all(count == proposed for _, proposed, count in by_model)
    assert total.proposed == sum(proposed for _, proposed, _ in log)
    assert total.accepted == sum(count for _, _, count in log)


def test_a_draft_of_the_models_own_structure_reads_the_models_cache_instead_of_feeding_tokens() -> None:
    """quantized_draft's drafts (reads_model_cache) copy the keys and values the model computed and feed only
    the sequence's last token: the draft runs one-token steps only, holds the model's own keys and values
    for the accepted tokens, and (with the model's own weights here) is always right."""
    model = tiny_gpt(std=0.3, **SPEC).eval()
    twin = tiny_gpt(std=0.3, **SPEC).eval()
    draft = ModelDraft(twin, reads_model_cache=True)
    widths: list[int] = []
    twin.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    accepted = draft.accepted

    def compare_caches(kept: int) -> None:  # before the next call: the slots the model filled, both caches
        accepted(kept)
        end = draft._copied
        ours, theirs = model.blocks[0].attn.kv_cache, twin.blocks[0].attn.kv_cache
        seen.append((ours.k[0, :, :end].clone(), theirs.k[0, :, :end].clone()))

    draft.accepted = compare_caches
    for prompt in prompts_for_tests():
        assert generate(model, [prompt], max_new_tokens=30, draft=draft) == [reference_greedy(model, prompt, 30)]
        assert draft.stats.acceptance_rate == 1.0
    assert set(widths) == {1}
    assert len(seen) > 10 and all(torch.equal(ours, theirs) for ours, theirs in seen)
    assert quantized_draft(model, "int8").reads_model_cache and not ModelDraft(twin).reads_model_cache


def test_verify_keeps_proposals_while_they_are_the_argmax() -> None:
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 7, 2, 9]):
        logits[row, best] = 5.0
    greedy = SamplingParams(temperature=0)
    assert verify(logits, [3, 7, 2], None, greedy) == [3, 7, 2, 9]  # all kept, and the model's next one
    assert verify(logits, [3, 1, 2], None, greedy) == [3, 7]  # the first wrong one is replaced
    assert verify(logits[:1], [], None, greedy) == [3]  # nothing proposed: a plain decode step


@pytest.mark.slow  # about 30 s each: 3,000 sequences
@pytest.mark.parametrize("draft_kind", ["model", "ngram"])
def test_sampled_tokens_follow_the_models_distribution(draft_kind: str) -> None:
    """Chi-square test at significance 0.001 (fixed seed) of the first three sampled tokens' joint
    distribution against the model's own, with a draft whose distribution is far from it (total variation
    above 0.3, checked, so the test could tell them apart). The third token sits after a rejection
    whenever the second was refused, and is a residual draw whenever the second was kept and the third not."""
    config = Config(vocab_size=8, n_layer=1, n_embd=32, n_head=4, n_kv_head=2, intermediate_size=64, block_size=16)
    model = tiny_gpt(config, std=0.7).eval()
    draft_model = tiny_gpt(config, seed=3, std=0.7).eval()
    params = SamplingParams(max_new_tokens=4, temperature=0.9, top_k=6)
    prompt = [1, 2, 3, 1, 2]
    expected = joint_distribution(model, prompt, params, 3)
    assert (expected - joint_distribution(draft_model, prompt, params, 3)).abs().sum() / 2 > 0.3
    draft = ModelDraft(draft_model) if draft_kind == "model" else RepeatDraft()
    generator = torch.Generator().manual_seed(1234)
    draws, total = 3000, SpeculativeStats()
    counts = torch.zeros_like(expected)
    for _ in range(draws):
        tokens = list(
            speculative_tokens(model, prompt, params, draft, cache_length=16, draft_tokens=2, generator=generator)
        )
        counts[tuple(tokens[:3])] += 1
        total.add(draft.stats)
    # Both kept and refused proposals were exercised, hundreds of times each.
    assert min(total.accepted, total.proposed - total.accepted) >= 300
    assert chi_square_p_value(counts.flatten(), expected.flatten() * draws) > 0.001


class RepeatDraft(NgramDraft):
    """A deterministic draft (q = 1 at its token) that always proposes the last token again."""

    def propose(self, sequence, k, params, generator):
        return [sequence[-1]] * k, None


@pytest.mark.slow  # compiles the verification step and a draft's decode step
def test_compiled_speculative_decoding_matches_eager() -> None:
    model, drafts = model_and_drafts()
    prompts = prompts_for_tests()
    expected = [reference_greedy(model, prompt, 30) for prompt in prompts]
    for kind in ("ngram", "other", "ngram+other"):
        got = generate(model, prompts, max_new_tokens=30, draft=drafts[kind], compile=True)
        assert got == expected, kind


# --- refusals ---
def test_a_draft_with_another_vocabulary_is_refused_naming_both_sizes() -> None:
    model = tiny_gpt(**SPEC).eval()
    draft = tiny_gpt(**{**SPEC, "vocab_size": 32}).eval()
    with pytest.raises(InvalidInput, match="draft's vocabulary has 32 tokens and the model's 64"):
        generate(model, [[1, 2]], max_new_tokens=5, draft=draft)


def test_a_draft_whose_context_is_too_short_is_refused() -> None:
    model = tiny_gpt(**SPEC).eval()
    draft = tiny_gpt(**{**SPEC, "block_size": 16}).eval()
    with pytest.raises(InvalidInput, match="draft's context of 16 tokens is shorter than this request's 22"):
        generate(model, [[1, 2]], max_new_tokens=20, draft=draft)


@pytest.mark.parametrize("count", [0, -2])
def test_draft_tokens_below_one_are_refused(count: int) -> None:
    model = tiny_gpt(**SPEC).eval()
    with pytest.raises(InvalidInput, match=f"--draft_tokens {count} is not allowed"):
        generate(model, [[1, 2]], max_new_tokens=5, draft="ngram", draft_tokens=count)


def test_unknown_drafts_and_batches_are_refused() -> None:
    model = tiny_gpt(**SPEC).eval()
    with pytest.raises(InvalidInput, match="unknown draft 'int3'"):
        generate(model, [[1, 2]], max_new_tokens=5, draft="int3")
    with pytest.raises(InvalidInput, match="one prompt at a time, not 2"):
        list(generate_tokens(model, [[1, 2], [3]], max_new_tokens=5, draft="ngram"))
    quantized = quantize_model(tiny_gpt(**SPEC).eval(), "int8")
    with pytest.raises(InvalidInput, match="already quantized"):
        quantized_draft(quantized, "int4")


def test_stats_add_up() -> None:
    total = SpeculativeStats()
    total.add(SpeculativeStats(verifications=2, proposed=8, accepted=6, tokens=8))
    total.add(SpeculativeStats(verifications=2, proposed=4, accepted=0, tokens=2))
    assert total.acceptance_rate == 0.5 and total.tokens_per_verification == 2.5
    assert total.line() == "draft: 50% of 12 proposed tokens accepted, 2.5 tokens per verification"


# --- LLM and the command line ---
def test_llm_generates_the_same_text_with_each_named_draft_and_reports_it(tiny_hf_dir: Path) -> None:
    llm = LLM.load(tiny_hf_dir)
    prompts = ["Once upon a time", "the cat sat on the mat, the cat sat on the"]
    expected, new_tokens = [], 0
    for prompt in prompts:
        expected.append(llm.generate(prompt, max_new_tokens=16))
        new_tokens += llm.last_stats.new_tokens
    for draft in ("ngram", "int8", str(tiny_hf_dir), "ngram+int8", f"ngram+{tiny_hf_dir}"):
        assert llm.generate(prompts, max_new_tokens=16, draft=draft) == expected, draft
        assert llm.last_stats.new_tokens == new_tokens  # both prompts' stats, summed
        assert llm.last_stats.draft is not None and llm.last_stats.draft.verifications > 0
        assert "proposed tokens accepted" in llm.last_stats.line()
    assert llm.draft_for(str(tiny_hf_dir)) is llm.draft_for(str(tiny_hf_dir))  # loaded once, kept
    assert llm.draft_for("ngram+int8").model_draft is llm.draft_for("int8")  # one quantized copy for both
    llm.generate(prompts[0], max_new_tokens=16, draft=str(tiny_hf_dir))
    assert llm.last_stats.draft.acceptance_rate == 1.0  # the model itself as its draft
    assert "".join(llm.stream(prompts[1], max_new_tokens=16, draft="ngram")) == expected[1]


def test_a_draft_with_other_token_ids_is_refused_and_one_with_the_same_ids_is_not(tiny_hf_dir: Path) -> None:
    llm = LLM.load(tiny_hf_dir)
    # Another template's source, the same rendering: accepted, as what is compared is ids.
    same_ids = LLM.load(tiny_hf_dir, chat_template="{# another file #}" + llm.tokenizer.chat_template)
    assert same_ids.tokenizer.chat_template != llm.tokenizer.chat_template
    assert llm.generate("Hi", max_new_tokens=4, draft=same_ids) == llm.generate("Hi", max_new_tokens=4)
    other_template = LLM.load(tiny_hf_dir, chat_template="llama2")
    with pytest.raises(InvalidInput, match="does not share the model's tokens: its ids of a chat turn"):
        llm.generate("Hi", max_new_tokens=4, draft=other_template)
    with pytest.raises(InvalidInput, match="neither ngram, int8, int4, ngram\\+int8, ngram\\+int4 nor an existing"):
        llm.generate("Hi", max_new_tokens=4, draft="no/such/model")
    with pytest.raises(InvalidInput, match="after 'ngram\\+' comes a model draft"):
        llm.generate("Hi", max_new_tokens=4, draft="ngram+ngram")


@pytest.mark.slow  # fresh processes
def test_the_command_line_switch(tiny_hf_dir: Path) -> None:
    plain = run_cli(
        "generate", "--checkpoint_dir", str(tiny_hf_dir), "--prompt", "a b a b a b", "--max_new_tokens", "12"
    )
    assert plain.returncode == 0, plain.stderr
    for draft in ("ngram", "int4", "ngram+int8"):
        fast = run_cli(
            "generate", "--checkpoint_dir", str(tiny_hf_dir), "--prompt", "a b a b a b", "--max_new_tokens", "12",
            "--draft", draft, "--draft_tokens", "3",
        )  # fmt: skip
        assert fast.returncode == 0, fast.stderr
        assert fast.stdout == plain.stdout
        assert "proposed tokens accepted" in fast.stderr
    for options, message in [
        (["--draft", "ngram", "--draft_tokens", "0"], "--draft_tokens 0 is not allowed"),
        (["--draft", "no/such/model"], "--draft no/such/model: no such file or directory"),
        (["--draft", "ngram+no/such"], "--draft ngram+no/such: no such file or directory"),
        (["--draft_tokens", "3"], "--draft_tokens needs --draft"),
    ]:
        result = run_cli("generate", "--checkpoint_dir", str(tiny_hf_dir), *options)
        assert result.returncode != 0
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr


# --- the packaged real models ---
CHAT_PROMPTS = ["What food do llamas eat?", "Write a haiku about the sea.", "Explain what a compiler does."]
GROUNDED = (
    "Rewrite this paragraph in plain words, keeping its facts: The committee convened on Tuesday to review the "
    "proposal for the new library. After a lengthy discussion, the members agreed that the library would open "
    "in the spring, with extended hours on weekends and a dedicated room for children."
)


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real_llm(request: pytest.FixtureRequest) -> LLM:
    from plainlm.packaged_models import gemma3_gguf, smollm2_gguf

    return LLM.load(smollm2_gguf() if request.param == "smollm2" else gemma3_gguf())


@pytest.mark.slow  # two real models, three drafts, a few prompts each
def test_real_models_give_plain_greedy_tokens_with_every_draft(real_llm: LLM) -> None:
    """Token for token up to the first float-rounding tie of plain decoding's path (a lead under 1e-3 of a
    logit, where a different but equally right summation order may pick the other token); such ties must be
    rare, so at least 90% of the tokens are compared."""
    llm, compared, total = real_llm, 0, 0
    drafted = {kind: SpeculativeStats() for kind in ("ngram", "int8", "int4", "ngram+int8")}
    for text in [*CHAT_PROMPTS[:2], GROUNDED]:
        prompt = llm.encode_prompt(text, chat=True)
        (plain,) = generate(llm.model, [prompt], max_new_tokens=32)
        margins = greedy_margins(llm.model, prompt, plain)
        sure = next((i for i, margin in enumerate(margins) if margin < 1e-3), len(plain))
        for kind, stats in drafted.items():
            (got,) = generate(llm.model, [prompt], max_new_tokens=32, draft=llm.draft_for(kind))
            assert got[:sure] == plain[:sure], (kind, text)
            stats.add(llm.draft_for(kind).stats)
        compared, total = compared + sure, total + len(plain)
    assert compared >= 0.9 * total
    assert drafted["int8"].acceptance_rate > 0.5  # the quantized copy agrees with its model


@pytest.mark.slow  # compiles the real model's verification step
def test_compiled_speculative_decoding_on_a_real_model() -> None:
    from plainlm.packaged_models import smollm2_gguf

    llm = LLM.load(smollm2_gguf())
    prompt = llm.encode_prompt(GROUNDED, chat=True)
    (plain,) = generate(llm.model, [prompt], max_new_tokens=24)
    sure = next((i for i, m in enumerate(greedy_margins(llm.model, prompt, plain)) if m < 1e-3), len(plain))
    assert sure >= 20
    for compile in (False, True):
        (got,) = generate(llm.model, [prompt], max_new_tokens=24, draft="ngram", compile=compile)
        assert got[:sure] == plain[:sure], compile
