"""Structured output (plainlm/serve/structured.py): response_format as a grammar over the logits.

The real-model tests sample SmolLM2-135M-Instruct (the packaged GGUF) at temperature 1 with the constraint
in the loop, batched over one KV cache, and check every completion with `jsonschema`, the reference validator.
The tiny tests check the mask itself on the BPE and SentencePiece tokenizers of helpers_tokenizers.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import pytest
import torch
from helpers_tokenizers import make_bpe_tokenizer, make_sentencepiece_tokenizer

from plainlm.api import LLM
from plainlm.errors import InvalidInput, PackagedModelMissing
from plainlm.packaged_models import smollm2_gguf
from plainlm.sampling import SamplingParams, sample
from plainlm.serve.structured import Constraint, StructuredOutput
from plainlm.tokenizer import Tokenizer

# Nested objects, a bounded array and enums; every string and number bounded, so every completion ends.
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}, "country": {"enum": ["FR", "DE", "US"]}},
            "required": ["city", "country"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}
EXTRA_IDS = 16  # the tiny tokenizers' model has this many ids past the tokenizer's vocabulary


# --- the real model ---
@pytest.fixture(scope="module")
def smollm2() -> LLM:
    try:
        return LLM.load(smollm2_gguf())
    except PackagedModelMissing as e:
        pytest.skip(str(e))


def constrained_completions(
    llm: LLM, constraints: list[Constraint], temperatures: list[float], prompt: str, max_new_tokens: int
) -> tuple[list[list[int]], list[float]]:
    """One completion per constraint, decoded as a batch over one KV cache, each row masked by its own constraint
    and sampled at its own temperature; a row ends when its constraint is done. Returns each row's tokens (without
    the end-of-sequence token) and the seconds each mask() call took."""
    model, n = llm.model, len(constraints)
    ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]), bos=False)
    params, generator = [SamplingParams(temperature=t) for t in temperatures], torch.Generator().manual_seed(0)
    slots = torch.arange(len(ids) + max_new_tokens)
    outputs: list[list[int]] = [[] for _ in constraints]
    mask_seconds: list[float] = []
    model.set_kv_cache(n, len(slots))
    try:
        with torch.inference_mode():
            logits = model(torch.tensor([ids] * n), input_pos=slots[: len(ids)])[:, -1]
            for step in range(max_new_tokens):
                running = [row for row, c in enumerate(constraints) if not c.done]
                if not running:
                    break
                for row in running:
                    start = time.perf_counter()
                    constraints[row].mask(logits[row])
                    mask_seconds.append(time.perf_counter() - start)
                tokens = [0] * n  # rows already done decode a token nobody reads, so the batch keeps its shape
                for row in running:
                    tokens[row] = int(sample(logits[row : row + 1], params[row], generator))
                    constraints[row].accept(tokens[row])
                    if tokens[row] not in llm.tokenizer.stop_ids:
                        outputs[row].append(tokens[row])
                slot = slots[len(ids) + step : len(ids) + step + 1]
                logits = model(torch.tensor(tokens)[:, None], input_pos=slot)[:, -1]
    finally:
        model.clear_kv_cache()
    return outputs, mask_seconds


@pytest.fixture(scope="module")
def sampled(smollm2: LLM) -> tuple[list[dict], list[Constraint], list[str]]:
    """21 completions decoded in one batch: 20 under PERSON_SCHEMA at temperature 1, and a greedy one in
    json_object mode (its strings are unbounded: sampled at temperature 1, SmolLM2 may write one past any limit)."""
    structured = StructuredOutput(smollm2.tokenizer, smollm2.model.config.vocab_size)
    person = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    formats, temperatures = [person] * 20 + [{"type": "json_object"}], [1.0] * 20 + [0.0]
    constraints = [structured.constraint(response_format) for response_format in formats]
    prompt = "Describe a fictional person as JSON: name, age, role, address and tags."
    outputs, mask_seconds = constrained_completions(smollm2, constraints, temperatures, prompt, max_new_tokens=160)
    median, mean = sorted(mask_seconds)[len(mask_seconds) // 2], sum(mask_seconds) / len(mask_seconds)
    vocab_size = smollm2.model.config.vocab_size
    print(f"\nmask() over {vocab_size} ids: median {median * 1e3:.3f} ms, mean {mean * 1e3:.3f} ms a call")
    texts = [smollm2.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in outputs]
    return formats, constraints, texts


@pytest.mark.slow
def test_sampled_completions_validate_against_the_schema(sampled: tuple) -> None:
    """Each of the 20 ends by the grammar (not by the length cut), parses and validates; they differ."""
    formats, constraints, texts = sampled
    schema_rows = [row for row, f in enumerate(formats) if f["type"] == "json_schema"]
    for row in schema_rows:
        assert constraints[row].done, f"cut by the length limit, not ended by the grammar: {texts[row]!r}"
        jsonschema.validate(json.loads(texts[row]), PERSON_SCHEMA)
    assert len({texts[row] for row in schema_rows}) > 10, "temperature 1 should sample different completions"


@pytest.mark.slow
def test_json_object_mode_gives_a_json_object(sampled: tuple) -> None:
    formats, constraints, texts = sampled
    for row in (row for row, f in enumerate(formats) if f["type"] == "json_object"):
        assert constraints[row].done, f"cut by the length limit: {texts[row]!r}"
        assert isinstance(json.loads(texts[row]), dict), texts[row]


# --- the mask on tiny tokenizers ---
@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    make = {"bpe": make_bpe_tokenizer, "sentencepiece": make_sentencepiece_tokenizer}[request.param]
    return Tokenizer(make(tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="module")
def structured(tokenizer: Tokenizer) -> StructuredOutput:
    return StructuredOutput(tokenizer, tokenizer.vocab_size + EXTRA_IDS)


def allowed_ids(constraint: Constraint, vocab_size: int) -> list[int]:
    logits = torch.zeros(vocab_size)
    constraint.mask(logits)
    return logits.isfinite().nonzero().flatten().tolist()


def test_mask_leaves_only_what_can_start_a_json_object(tokenizer: Tokenizer, structured: StructuredOutput) -> None:
    """The first token: a brace, or (SentencePiece) the word-start space before one; nothing else, no padding id."""
    allowed = allowed_ids(structured.constraint({"type": "json_object"}), structured.vocab_size)
    texts = [tokenizer.decode([token_id]) for token_id in allowed]
    assert "{" in texts, "the token that is just the brace must be allowed"  # "{", or SentencePiece's "▁{"
    for token_id, text in zip(allowed, texts, strict=True):
        assert token_id < tokenizer.vocab_size, "an id past the tokenizer's vocabulary was allowed"
        assert text.lstrip()[:1] in ("", "{"), f"id {token_id} ({text!r}) cannot start a JSON object"


def test_valid_json_ends_the_grammar_and_allows_the_end(tokenizer: Tokenizer, structured: StructuredOutput) -> None:
    """Any tokenization of valid output is accepted; at its end the constraint is done and EOS is allowed."""
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}}}}
    constraint = structured.constraint({"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    for token_id in tokenizer.encode('{"tags": ["a", "b"]}', bos=False):
        assert token_id in allowed_ids(constraint, structured.vocab_size)
        assert not constraint.done
        constraint.accept(token_id)
    assert constraint.done
    assert tokenizer.eos_id in allowed_ids(constraint, structured.vocab_size)
    constraint.accept(tokenizer.eos_id)
    assert constraint.done


def test_text_or_no_response_format_is_unconstrained(structured: StructuredOutput) -> None:
    assert structured.constraint(None) is None
    assert structured.constraint({"type": "text"}) is None


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        ({"type": "xml"}, r"Unknown response_format type 'xml': use one of 'text', 'json_object', 'json_schema'"),
        ({"type": "json_schema"}, r'needs a "json_schema" object'),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
            r"response_format.json_schema.schema is not a valid JSON schema: .*nonsense",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "minLength": "x"}}},
            r"not a valid JSON schema: .*minLength",
        ),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": "object"}}, r"must be a JSON object"),
    ],
)
def test_bad_response_formats_say_what_is_wrong(
    structured: StructuredOutput, response_format: dict, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        structured.constraint(response_format)


def test_sentencepiece_vocabulary_marks_specials(tmp_path: Path) -> None:
    tokenizer = Tokenizer(make_sentencepiece_tokenizer(tmp_path))
    pieces = tokenizer.sentencepiece_token_bytes()
    assert pieces is not None and len(pieces) == tokenizer.vocab_size
    assert pieces[tokenizer.eos_id] is None and pieces[tokenizer.bos_id] is None
    assert pieces[tokenizer.token_to_id("<0x0A>")] == b"\n"
