"""SamplingParams: one set of options for generate.py, LLM and the CLI, checked once, min-p sampling, and
`distribution`, the probabilities `sample` draws from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_gpt

from plainlm import LLM
from plainlm.errors import InvalidInput
from plainlm.generate import generate
from plainlm.sampling import SamplingParams, distribution, sample, sampling_params

BAD = {
    "--top_p": dict(top_p=1.5),
    "--max_new_tokens": dict(max_new_tokens=0),
    "--temperature": dict(temperature=-0.1),
    "--top_k": dict(top_k=0),
    "--min_p": dict(min_p=1.2),
}


@pytest.mark.parametrize("flag", BAD)
def test_bad_options_are_one_line_naming_the_flag(flag: str) -> None:
    with pytest.raises(InvalidInput, match=f"^{flag} .* must be ") as raised:
        SamplingParams(**BAD[flag])
    assert "\n" not in str(raised.value)
    with pytest.raises(InvalidInput, match=f"^{flag} "):  # changing a valid set checks again
        sampling_params(SamplingParams(), **BAD[flag])


def test_the_old_positional_max_new_tokens_says_what_to_pass_instead() -> None:
    model = tiny_gpt(vocab_size=64).eval()
    with pytest.raises(InvalidInput, match="pass max_new_tokens=3 by keyword"):
        generate(model, [[1, 2]], 3)
    assert len(generate(model, [[1, 2]], max_new_tokens=3)[0]) == 3


def test_edges_that_are_allowed() -> None:
    SamplingParams(top_p=1.0, min_p=0.0, temperature=0.0, top_k=1, max_new_tokens=1)
    SamplingParams(min_p=1.0, top_p=1e-9)
    with pytest.raises(InvalidInput, match="--top_p 0 "):
        SamplingParams(top_p=0)


def test_min_p_keeps_tokens_at_least_min_p_times_the_best() -> None:
    probs = torch.tensor([0.05, 0.5, 0.02, 0.3, 0.1, 0.03])
    logits = probs.log().expand(4000, -1)
    cases = {0.5: {1, 3}, 0.15: {1, 3, 4}, 0.09: {0, 1, 3, 4}, 1.0: {1}, 0.0: {0, 1, 2, 3, 4, 5}}
    for min_p, kept in cases.items():  # 0.3 >= 0.5 * 0.5 > 0.1, 0.1 >= 0.15 * 0.5 > 0.05, ...
        drawn = sample(logits, SamplingParams(temperature=1.0, min_p=min_p), torch.Generator().manual_seed(0))
        assert set(drawn.tolist()) == kept, min_p
    # Applied after the temperature, as transformers does: at temperature 2 the 0.1 token has sqrt(0.1/0.5)
    # = 0.45 of the best one's probability, so min_p 0.4 keeps it (at temperature 1 it had 0.2).
    drawn = sample(logits, SamplingParams(temperature=2.0, min_p=0.4), torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {1, 3, 4}


def test_the_seed_in_the_params_makes_llm_sampling_reproducible(tiny_hf_dir: Path) -> None:
    llm = LLM.load(tiny_hf_dir)
    params = SamplingParams(max_new_tokens=8, temperature=1.5, seed=3)
    first = llm.generate("hello world", params)
    assert llm.generate("hello world", params) == first
    assert llm.generate("hello world", max_new_tokens=8, temperature=1.5, seed=3) == first  # keywords alike
    others = {llm.generate("hello world", params, seed=seed) for seed in range(4)}
    assert len(others) > 1  # the seed matters: it really samples


def test_extra_stop_ids_end_a_reply(tiny_hf_dir: Path) -> None:
    llm = LLM.load(tiny_hf_dir)
    ids = llm.encode_prompt("hello world")
    tokens = generate(llm.model, [ids], max_new_tokens=8, stop_ids=llm.tokenizer.stop_ids)[0]
    assert len(tokens) >= 3
    stop = tokens[2]
    before = tokens[: tokens.index(stop)]
    expected = llm.tokenizer.decode(before, skip_special_tokens=True)
    assert llm.generate("hello world", max_new_tokens=8, stop_ids=[stop]) == expected
    assert llm.generate("hello world", max_new_tokens=8) == llm.tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.slow  # a fresh process per run: `make test` runs it, `make test-fast` does not
def test_cli_refuses_a_bad_option_before_loading(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"  # the options are checked first: the path's error never comes
    for command in ("generate", "chat"):
        result = run_cli(command, "--checkpoint_dir", str(missing), "--top_p", "1.5")
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: --top_p 1.5 ") and result.stderr.count("\n") == 1, result.stderr
    result = run_cli("generate", "--checkpoint_dir", str(missing), "--max_new_tokens", "0")
    assert result.stderr.startswith("error: --max_new_tokens 0 "), result.stderr


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=6),
        SamplingParams(temperature=0.9, top_p=0.8),
        SamplingParams(temperature=1.0, top_k=12, top_p=0.9, min_p=0.05),
    ],
)
def test_distribution_is_what_sample_draws_from(params: SamplingParams) -> None:
    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(0)) * 2
    probs = distribution(logits, params)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    draws = 40_000
    generator = torch.Generator().manual_seed(1)
    counts = torch.zeros(2, 40)
    for _ in range(draws // 1000):
        tokens = sample(logits.repeat_interleave(1000, dim=0), params, generator).view(2, 1000)
        for row in range(2):
            counts[row] += torch.bincount(tokens[row], minlength=40)
    assert counts[probs == 0].sum() == 0  # nothing drawn that the cuts removed
    # 4.5 standard deviations of a binomial count per token, and 3 draws of slack for the rarest tokens
    # (expected well under once, where the normal approximation fails); a fixed seed, so never flaky.
    tolerance = 4.5 * (probs * (1 - probs) / draws).sqrt() + 3 / draws
    assert ((counts / draws - probs).abs() <= tolerance).all()
