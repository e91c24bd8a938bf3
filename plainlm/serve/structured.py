"""Structured output: OpenAI's `response_format` as a grammar that masks each decoding step's logits.

    structured = StructuredOutput(llm.tokenizer, llm.model.config.vocab_size)    # once per served model
    constraint = structured.constraint({"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}})
    # per decode step of that request:
    constraint.mask(logits[row]); token = sample(...); constraint.accept(token)
    if constraint.done: ...                                    # the JSON is complete: finish_reason "stop"

`{"type": "json_object"}` asks for any JSON object, `{"type": "json_schema", ...}` for one that validates
against the schema (always enforced, as OpenAI does with `"strict": true`), `{"type": "text"}` or none for
free text. The output is compact JSON (`{"a": 1, "b": [2, 3]}`, no newlines or indentation): free whitespace
would let a sampled model pad forever, where a schema with maxLength / maxItems bounds the output instead.

The grammar engine is llguidance (guidance-ai's Rust Earley parser; vLLM and SGLang offer it as a backend,
llama.cpp as an option). xgrammar was tried beside it, on SmolLM2's tokenizer (from the packaged GGUF), and
llguidance fits plainlm better:
- it reads plainlm's `Tokenizer` as it is: the tokenizer.json text it loaded (llguidance's own Rust `tokenizers`
  decodes byte-level BPE, byte fallback and "▁"), or a list of token bytes for SentencePiece. xgrammar wants a
  transformers tokenizer object, or a vocabulary type (raw, byte-fallback, byte-level) we would detect ourselves.
- it installs alone: one wheel, no Python dependencies. xgrammar requires torch, transformers, triton and
  apache-tvm-ffi (it fails to import without the last), all runtime dependencies of serving then.
- a schema needs no compiling ahead: a request's matcher is built in about 1.5 ms (PERSON_SCHEMA of
  tests/test_structured.py) against xgrammar's 71 ms compile, so no cache of compiled schemas is needed.
  Both reject a bad schema with a message that can go to the client (`Invalid type: nonsense`).
- its mask is cheap: 0.01-0.2 ms a step for llguidance to compute it over SmolLM2's 49,152 ids (1-2 ms for a
  matcher's first), plus about 0.05 ms to unpack it onto the logits; mask() as a whole took a median 0.16 ms a
  call in tests/test_structured.py's decode loop (it prints it), against a SmolLM2 decode step of several ms.

The mask comes from llguidance as one bit per token id; it is unpacked with tensor ops on the logits' device,
never by a Python loop over the vocabulary.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
import torch

from plainlm.errors import InvalidInput
from plainlm.tokenizer import Tokenizer

RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
# Compact JSON (see the module docstring); a schema's own "x-guidance" options (llguidance's) may change it.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


class StructuredOutput:
    """Compiled once per served model: the tokenizer's vocabulary as the grammar engine needs it.

    vocab_size: the model's (config.vocab_size), which may exceed the tokenizer's; the ids past the
    tokenizer's are never allowed. The tokenizer's stop ids are what ends a completed grammar.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.text_tokens = min(vocab_size, tokenizer.vocab_size)  # ids from here on are no tokenizer's tokens
        # llguidance sizes its bitmask by its own vocabulary, padded to the model's.
        n_vocab = max(vocab_size, tokenizer.vocab_size)
        stop_ids = tokenizer.stop_ids or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        if not stop_ids:
            raise InvalidInput(
                f"The tokenizer in {tokenizer.checkpoint_dir} has no end-of-sequence token, so a constrained "
                "completion could never end: set eos_token in tokenizer_config.json"
            )
        tokenizer_json = tokenizer.tokenizers_json()
        source = tokenizer_json if tokenizer_json is not None else _sentencepiece_wrapper(tokenizer)
        # SentencePiece models start a reply with a word-start "▁" ("▁{"), which decoding removes again: the
        # grammar lets the output begin with that one space rather than force an unusual first token.
        self._word_start_space = tokenizer_json is None
        self._lltokenizer = llguidance.LLTokenizer(source, n_vocab=n_vocab, eos_token=stop_ids)

    def constraint(self, response_format: dict[str, Any] | None) -> Constraint | None:
        """The constraint of one request's `response_format`; None for none or {"type": "text"}.

        Raises InvalidInput (HTTP 400) for an unknown type or a schema that is not a valid JSON schema.
        """
        if response_format is None:
            return None
        if not isinstance(response_format, dict) or response_format.get("type") not in RESPONSE_FORMAT_TYPES:
            kind = response_format.get("type") if isinstance(response_format, dict) else response_format
            raise InvalidInput(
                f"Unknown response_format type {kind!r}: use one of {', '.join(map(repr, RESPONSE_FORMAT_TYPES))}"
            )
        kind = response_format["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            return self._compile({"type": "object"}, "response_format")
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidInput(
                'response_format of type "json_schema" needs a "json_schema" object: '
                '{"name": ..., "schema": {...}, "strict": true}'
            )
        schema = spec.get("schema", {"type": "object"})  # OpenAI's field is optional: any JSON object then
        if not isinstance(schema, dict):
            raise InvalidInput(f"response_format.json_schema.schema must be a JSON object, not {schema!r}")
        return self._compile(schema, "response_format.json_schema.schema")

    def _compile(self, schema: dict[str, Any], where: str) -> Constraint:
        schema = {**schema, "x-guidance": {**JSON_OPTIONS, **schema.get("x-guidance", {})}}
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        except ValueError as e:
            raise InvalidInput(f"{where} is not a valid JSON schema: {e}") from e
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._lltokenizer)
        if is_error:
            raise InvalidInput(f"{where} is not a valid JSON schema: {messages[0]}")
        if self._word_start_space:
            grammar = llguidance.LLMatcher.grammar_from_lark(f'start: " "? json\njson: %json {json.dumps(schema)}')
        matcher = llguidance.LLMatcher(self._lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidInput(f"{where} cannot be used as a grammar: {matcher.get_error()}")
        return Constraint(matcher, self.text_tokens)


class Constraint:
    """One request's grammar state."""

    def __init__(self, matcher: llguidance.LLMatcher, text_tokens: int) -> None:
        self._matcher = matcher
        self._text_tokens = text_tokens

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits (one row, (V,)) of the tokens the grammar does not allow next to -inf, in place."""
        self._raise_if_broken()
        bits = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.uint8).to(logits.device)
        allowed = ((bits[:, None] >> _BIT_SHIFTS.to(logits.device)) & 1).flatten()  # bit i of byte j: id 8j + i
        allowed = allowed[: self._text_tokens].bool()
        logits[: len(allowed)].masked_fill_(~allowed, float("-inf"))
        logits[len(allowed) :] = float("-inf")  # ids no text token has: the model's padding of its vocabulary

    def accept(self, token_id: int) -> None:
        """Advance the grammar by the token sampled from the masked logits."""
        if not self._matcher.consume_token(token_id):
            raise RuntimeError(f"token {token_id} was sampled outside the grammar: {self._matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The output is complete: nothing but an end-of-sequence token may follow (or it already has)."""
        return self._matcher.is_stopped()

    def _raise_if_broken(self) -> None:
        # A grammar too complex for llguidance's per-step limits stops the matcher with an error.
        if self._matcher.is_error():
            raise RuntimeError(f"the response_format grammar failed: {self._matcher.get_error()}")


class _SentencePieceVocabulary:
    """A SentencePiece `Tokenizer` as llguidance.TokenizerWrapper reads one: token bytes, ids, encode."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        pieces = tokenizer.sentencepiece_token_bytes() or []
        # A leading 0xff byte, never part of UTF-8 text, keeps llguidance from matching a special token as text.
        self.tokens = [
            piece if piece is not None else b"\xff" + (tokenizer.id_to_token(i) or "").encode()
            for i, piece in enumerate(pieces)
        ]
        self.special_token_ids = [i for i, piece in enumerate(pieces) if piece is None]
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # TokenizerWrapper probes with bytes to learn which one it may pass
            raise TypeError("SentencePiece vocabularies encode text, not bytes")
        # llguidance tokenizes text the grammar forces in the middle of the output: no word-start "▁" there.
        return self._tokenizer.sentencepiece_encode_continuation(text)


def _sentencepiece_wrapper(tokenizer: Tokenizer) -> llguidance.TokenizerWrapper:
    return llguidance.TokenizerWrapper(_SentencePieceVocabulary(tokenizer))
