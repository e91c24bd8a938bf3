"""The `Tokenizer`: text to token ids and back for one checkpoint directory, plus its chat template.

It reads the files Hugging Face checkpoints ship: `tokenizer.json` (the `tokenizers` library) or else
`tokenizer.model` (SentencePiece), with `tokenizer_config.json` and `generation_config.json` for BOS, EOS, stop ids
and the chat template. `encode` gives the ids `transformers.AutoTokenizer` gives; tests/test_tokenizer.py proves it.
Also here: `IncrementalDecoder` for streaming and `copy_tokenizer_files` for conversion. Named fallback chat
templates live in `chat_templates.py`; sampling and the chat loop live in `generate.py`.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import sentencepiece as spm
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from plainlm.chat_templates import CHAT_TEMPLATES, fallback_template_name
from plainlm.errors import InvalidInput, MissingInput

# Copied unchanged by checkpoint conversion; whichever of them exist.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[Path]:
    """Copy every file of `TOKENIZER_FILES` that exists in `src` to `dst`; returns the copies."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    present = [src / name for name in TOKENIZER_FILES if (src / name).is_file()]
    if src.resolve() == dst.resolve():
        return present
    return [Path(shutil.copy2(path, dst / path.name)) for path in present]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _content(token: str | dict | None) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    """Tokenizer of the checkpoint in `checkpoint_dir`.

    `chat_template` picks a named fallback ("chatml", "llama2", ...) or is a jinja template itself; without it the
    model's own template is used, or the fallback for `model_name` or else `model_family` ("plain" if neither
    names one; see chat_templates.fallback_template_name).
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        chat_template: str | None = None,
        model_family: str | None = None,
        model_name: str | None = None,
    ):
        self.checkpoint_dir = Path(checkpoint_dir)
        config = _read_json(self.checkpoint_dir / "tokenizer_config.json")
        generation_config = _read_json(self.checkpoint_dir / "generation_config.json")
        self._sp: spm.SentencePieceProcessor | None = None
        if (self.checkpoint_dir / "tokenizer.json").is_file():
            self._load_tokenizers(config)
        elif (self.checkpoint_dir / "tokenizer.model").is_file():
            self._load_sentencepiece(config)
        else:
            raise MissingInput(
                f"No tokenizer in {self.checkpoint_dir}: looked for tokenizer.json (Hugging Face tokenizers) and "
                "tokenizer.model (SentencePiece). Copy them from the original model repository next to the weights."
            )

        self.bos_token, self.eos_token = _content(config.get("bos_token")), _content(config.get("eos_token"))
        self.bos_id = self._special_id(self.bos_token, generation_config.get("bos_token_id"), "bos")
        gen_eos = generation_config.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.eos_id = self._special_id(self.eos_token, gen_eos[0] if gen_eos else None, "eos")
        self.stop_ids: list[int] = list(dict.fromkeys(i for i in [self.eos_id, *gen_eos] if i is not None))
        self.bos_token = self.bos_token or self.id_to_token(self.bos_id)
        self.eos_token = self.eos_token or self.id_to_token(self.eos_id)
        # What templates see as `unk_token`, `pad_token`, ... besides BOS and EOS (transformers passes them all).
        self._template_tokens = {k: _content(config.get(k)) for k in ("unk_token", "pad_token") if config.get(k)}
        found = self._find_chat_template(config, chat_template, model_name, model_family)
        # chat_template_fallback: the name of the fallback in use (chat_templates.py), None for the model's own.
        self.chat_template, self.chat_template_source, self.chat_template_fallback = found

    # --- loading ---
    def _load_tokenizers(self, config: dict[str, Any]) -> None:
        self._tok = HFTokenizer.from_file(str(self.checkpoint_dir / "tokenizer.json"))
        # transformers makes sure the named special tokens of tokenizer_config.json split out of text.
        added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        named = [_content(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
        missing = [t for t in named if t and t not in added]
        self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        # BOS and EOS come from tokenizer.json's post-processor alone: transformers 5 ignores the add_bos_token
        # and add_eos_token of tokenizer_config.json when there is a tokenizer.json.
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)

    def _load_sentencepiece(self, config: dict[str, Any]) -> None:
        model = (self.checkpoint_dir / "tokenizer.model").read_bytes()
        # transformers 5 puts the leading "▁" in front of a text itself (see `_sp_encode_piece`), so we need
        # SentencePiece without its own dummy prefix. The model file is a protobuf, and a repeated message field
        # merges into the first: these four bytes set ModelProto.normalizer_spec (3).add_dummy_prefix (3) = false.
        self._sp = spm.SentencePieceProcessor(model_proto=model + b"\x1a\x02\x18\x00")
        with_prefix = spm.SentencePieceProcessor(model_proto=model)
        own_prefix = with_prefix.encode("a") != self._sp.encode("a")
        add_prefix = config.get("add_prefix_space", own_prefix) is not False
        self._prepend = "never" if not add_prefix else "always" if config.get("legacy") else "first"
        # Llama's tokenizer_config sets add_bos_token. Without it transformers 5 adds no BOS, but a SentencePiece
        # Llama needs one (LlamaTokenizer's own docs say True is the default).
        self._add_bos, self._add_eos = config.get("add_bos_token", True), config.get("add_eos_token", False)
        # Special tokens match before SentencePiece sees the text, like transformers' added tokens.
        sp_specials = (self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id())
        self._added: dict[str, int] = {self._sp.id_to_piece(i): i for i in sp_specials if i >= 0}
        added_tokens = {int(i): _content(t) for i, t in config.get("added_tokens_decoder", {}).items()}
        added_tokens |= {i: t for t, i in _read_json(self.checkpoint_dir / "added_tokens.json").items()}
        self._added |= {t: i for i, t in added_tokens.items()}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            token = _content(config.get(key))
            if token and token not in self._added and self._sp.piece_to_id(token) != self._sp.unk_id():
                self._added[token] = self._sp.piece_to_id(token)
        self._added_by_id = {i: t for t, i in self._added.items()}
        # Longest first, so "<|im_start|>" wins over a "<|im" that might also be a token.
        alternatives = sorted(self._added, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
        self.vocab_size = max(self._sp.get_piece_size(), max(self._added_by_id, default=-1) + 1)

    def _special_id(self, token: str | None, fallback: int | None, kind: str) -> int | None:
        if token is not None and (token_id := self.token_to_id(token)) is not None:
            return token_id
        if fallback is not None or self._sp is None:
            return fallback
        sp_id = self._sp.bos_id() if kind == "bos" else self._sp.eos_id()
        return sp_id if sp_id >= 0 else None

    # --- vocabulary ---
    def token_to_id(self, token: str) -> int | None:
        if self._sp is None:
            return self._tok.token_to_id(token)
        if token in self._added:
            return self._added[token]
        token_id = self._sp.piece_to_id(token)
        return None if token_id == self._sp.unk_id() else token_id

    def id_to_token(self, token_id: int | None) -> str | None:
        if token_id is None:
            return None
        if self._sp is None:
            return self._tok.id_to_token(token_id)
        return self._added_by_id.get(token_id) or self._sp.id_to_piece(token_id)

    # --- for libraries that match bytes against the vocabulary (serve/structured.py's grammar engine) ---
    def tokenizers_json(self) -> str | None:
        """This tokenizer as tokenizer.json text, named special tokens added; None for a SentencePiece one."""
        return self._tok.to_str() if self._sp is None else None

    def sentencepiece_token_bytes(self) -> list[bytes | None] | None:
        """What each id of a SentencePiece tokenizer stands for, as UTF-8 bytes ("▁" as a space, byte-fallback
        pieces as their byte), None for the ids that are no text (control, unknown, added or unused); None for
        a `tokenizers` one."""
        if self._sp is None:
            return None
        sp, pieces = self._sp, []
        for i in range(self.vocab_size):
            in_model = i < sp.get_piece_size() and i not in self._added_by_id
            if not in_model or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                pieces.append(None)
            elif sp.is_byte(i):  # "<0x0A>"
                pieces.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))
            else:
                pieces.append(sp.id_to_piece(i).replace("▁", " ").encode("utf-8"))
        return pieces

    def sentencepiece_encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` where it continues a text already begun (no word-start "▁" put in front, no BOS, no
        special tokens parsed), for a SentencePiece tokenizer; what a grammar engine forcing text needs."""
        if self._sp is None:
            raise TypeError(f"{self.checkpoint_dir} has a tokenizer.json tokenizer, not a SentencePiece one")
        return self._sp.encode(text)

    # --- encoding ---
    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        """Token ids of `text`, special-token strings in it included.

        `bos=None` adds what the tokenizer adds by itself (as transformers does), `bos=True/False` forces a BOS on
        or off; a BOS is never doubled, even when `text` already starts with one. `eos=True` appends an EOS.
        """
        return self.encode_batch([text], bos, eos)[0]

    def encode_batch(self, texts: list[str], bos: bool | None = None, eos: bool = False) -> list[list[int]]:
        """`encode` for many texts; the `tokenizers` backend spreads them over threads."""
        for wanted, token_id, name in ((bos, self.bos_id, "BOS"), (eos, self.eos_id, "EOS")):
            if wanted and token_id is None:
                raise InvalidInput(f"The tokenizer in {self.checkpoint_dir} has no {name} token to add")
        if self._sp is None:
            batch = [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=bos is None)]
        else:
            batch = [self._sp_encode(text, add_specials=bos is None) for text in texts]
        for ids in batch:
            if ids[:2] == [self.bos_id, self.bos_id]:
                del ids[0]  # the text began with the BOS string and the tokenizer added another
            if bos and ids[:1] != [self.bos_id]:
                ids.insert(0, self.bos_id)
            if eos and ids[-1:] != [self.eos_id]:
                ids.append(self.eos_id)
        return batch

    def _sp_encode(self, text: str, add_specials: bool) -> list[int]:
        ids = [self.bos_id] if add_specials and self._add_bos and self.bos_id is not None else []
        start = 0
        for match in self._added_re.finditer(text) if self._added_re else ():
            ids += self._sp_encode_piece(text[start : match.start()], first=start == 0)
            ids.append(self._added[match.group()])
            start = match.end()
        ids += self._sp_encode_piece(text[start:], first=start == 0)
        return ids + ([self.eos_id] if add_specials and self._add_eos and self.eos_id is not None else [])

    def _sp_encode_piece(self, text: str, first: bool) -> list[int]:
        # transformers 5 (Metaspace, prepend_scheme "first") adds the word-start "▁" only to the text before the
        # first special token, and not when the text already starts with a space; SentencePiece itself always
        # would (" Hello" -> "▁▁Hello"). "legacy" tokenizers prepend it after every special token.
        if text and (self._prepend == "always" or (self._prepend == "first" and first)):
            text = text if text.startswith((" ", "▁")) else " " + text
        return self._sp.encode(text) if text else []

    # --- decoding ---
    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids` (a list, a tensor or one id). To stream, use `stream_decoder()`, not one id at a time."""
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        if self._sp is None:
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        parts, run = [], []
        for i in ids:
            if i in self._added_by_id:
                parts.append(self._sp.decode(run))
                run = []
                parts.append("" if skip_special_tokens else self._added_by_id[i])
            else:
                run.append(i)
        text = "".join(parts) + self._sp.decode(run)
        # The "▁" added in front of the text at encoding comes off again, once (transformers' Strip decoder).
        return text[1:] if self._prepend != "never" and text.startswith(" ") else text

    def stream_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)

    # --- chat ---
    def _find_chat_template(
        self, config: dict, requested: str | None, name: str | None, family: str | None
    ) -> tuple[str, str, str | None]:
        """The template, a description of where it came from (for messages) and the fallback's name if it is one."""
        if requested is not None:
            if "{{" in requested or "{%" in requested:
                return requested, "the chat_template argument", None
            if requested not in CHAT_TEMPLATES:
                raise InvalidInput(f"Unknown chat template {requested!r}; named templates: {', '.join(CHAT_TEMPLATES)}")
            return CHAT_TEMPLATES[requested], f"fallback template {requested!r} (plainlm/chat_templates.py)", requested
        # transformers 5 saves the template as its own file, which wins over tokenizer_config.json.
        if (self.checkpoint_dir / "chat_template.jinja").is_file():
            path = self.checkpoint_dir / "chat_template.jinja"
            return path.read_text(encoding="utf-8"), str(path), None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        if template:
            return template, f"chat_template in {self.checkpoint_dir / 'tokenizer_config.json'}", None
        fallback = fallback_template_name(name, family)
        source = f"fallback template {fallback!r} (plainlm/chat_templates.py), as the model has none"
        return CHAT_TEMPLATES[fallback], source, fallback

    @cached_property
    def _compiled_chat_template(self) -> jinja2.Template:
        try:
            return _chat_template_env().from_string(self.chat_template)
        except jinja2.TemplateError as e:
            raise InvalidInput(f"Chat template from {self.chat_template_source} does not compile: {e}") from e

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_vars: Any
    ) -> str:
        """The conversation as the model's prompt text; encode it with `bos=False`, the template writes its BOS.

        `template_vars` reach the template as variables (`tools`, `enable_thinking`, ...), as in transformers.
        """
        # transformers drops None values first: many templates print "None" for `content=None` otherwise.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context = {"tools": None, "documents": None, **self._template_tokens, **template_vars}
        try:
            return self._compiled_chat_template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **context,
            )
        except jinja2.TemplateError as e:
            raise InvalidInput(f"Chat template from {self.chat_template_source} failed: {e}") from e

    # --- saving ---
    def save(self, dst_dir: str | Path) -> list[Path]:
        """Copy this checkpoint's tokenizer files unchanged to `dst_dir`."""
        return copy_tokenizer_files(self.checkpoint_dir, dst_dir)


class IncrementalDecoder:
    """Turns token ids, pushed one at a time, into text pieces whose concatenation is `decode(all ids)`.

    Decoding each id alone is wrong twice: byte-level BPE and byte fallback spread one character over several
    tokens, and decoders strip a leading space at the start of a text only. So each push decodes a short window
    of recent ids and returns what the newest id adds to it, holding text back while it ends in an incomplete
    character (decoded as U+FFFD). The window is the last emitted piece, so a push costs O(1) tokens to decode.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self._prefix_start = self._read_start = 0  # window = ids[prefix_start:], already emitted up to read_start

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back, e.g. an incomplete character at the very end."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self.tokenizer.decode
        emitted = decode(self.ids[self._prefix_start : self._read_start], self.skip_special_tokens)
        text = decode(self.ids[self._prefix_start :], self.skip_special_tokens)
        if len(text) <= len(emitted) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix_start, self._read_start = self._read_start, len(self.ids)
        return text[len(emitted) :]


def _chat_template_env() -> ImmutableSandboxedEnvironment:
    """The jinja environment transformers renders chat templates in: templates come from the Hub, untrusted."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        # jinja's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
