"""Tokenizers from and to GGUF metadata: llama.cpp's `tokenizer.ggml.*` keys <-> tokenizer.json and its configs.

`write_tokenizer_files(reader, dst_dir)` turns a GGUF file's vocabulary into the tokenizer.json, tokenizer_config.json
and generation_config.json that `plainlm.tokenizer.Tokenizer` reads. It builds the tokenizer transformers builds from
the same file (transformers/integrations/gguf/gguf_tokenizer_mapping.py), so the ids are those of
`AutoTokenizer.from_pretrained(..., gguf_file=...)`. `add_tokenizer_to_gguf(writer, checkpoint_dir)` goes the other
way, as llama.cpp's convert_hf_to_gguf.py does. Weights and model configs are gguf.py's business, not this file's.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import sentencepiece as spm
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from plainlm.convert.gguf_reader import GGUFFile
from plainlm.errors import CheckpointError
from plainlm.tokenizer import Tokenizer, _content, _read_json

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (int(t) for t in gguf.TokenType)

# The split regex each `tokenizer.ggml.pre` family's merges were learned with (llama.cpp's llama-vocab.cpp).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # one digit at a time
_QWEN35_SPLIT = (  # Qwen2's, with combining marks counted as letters
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The first name of each regex is the one export writes.
_LLAMA3_NAMES = "llama-bpe llama3 llama-v3 falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano dbrx smaug-bpe"
SPLIT_REGEXES = {
    **dict.fromkeys(_LLAMA3_NAMES.split(), _LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}
# GPT-2's regex after splitting off every numeric character (\p{N}), as SmolLM's and StarCoder's tokenizer.json do.
DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
# GPT-2's regex alone: it is built into the ByteLevel pre-tokenizer.
GPT2_PRE = ("gpt-2", "default", "phi-2", "mpt", "olmo", "jais")
# Llama 3's tokenizer.json (and llama.cpp) look a whole pre-token up in the vocabulary before merging.
IGNORE_MERGES_PRE = ("llama-bpe", "llama3", "llama-v3")
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")

# tokenizer_config.json's names for the special tokens, and generation_config's extra stop ids.
SPECIAL_ID_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                   "pad_token": "padding_token_id", "eot": "eot_token_id", "eom": "eom_token_id"}  # fmt: skip


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the others for chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


BYTE_TO_CHAR = _bytes_to_unicode()


# --- GGUF -> tokenizer files ---
def write_tokenizer_files(reader: GGUFFile, dst_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json for the GGUF file's tokenizer."""
    source = reader.path
    meta, ids = _checked_metadata(reader, source)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        spelled, tokenizer = _byte_level_tokenizer(meta, tokens, types, source)
    elif kind == "llama":
        spelled, tokenizer = _sentencepiece_tokenizer(meta, tokens, ids["unk_token"], source)
    else:
        raise CheckpointError(
            f"{source}: tokenizer.ggml.model is {kind!r}; plainlm reads 'gpt2' (byte-level BPE) and 'llama' "
            "(SentencePiece-style BPE) tokenizers. Use the original model's tokenizer files instead."
        )
    named = {name: spelled[i] for name, i in ids.items() if i is not None and name.endswith("_token")}
    _add_special_tokens(tokenizer, spelled, tokens, types, named)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and ids["bos_token"] is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and ids["eos_token"] is not None
    tokenizer.post_processor = _bos_eos_processor(named, ids, add_bos, add_eos)

    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    (dst_dir / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    # The class name keeps transformers 5 on this tokenizer.json instead of rebuilding one for the model type.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **named, "add_bos_token": add_bos, "add_eos_token": add_eos}
    config["clean_up_tokenization_spaces"] = False
    if template := _chat_template(meta):
        config["chat_template"] = template
    _write_json(dst_dir / "tokenizer_config.json", config)
    stops = list(dict.fromkeys(i for i in (ids["eos_token"], ids["eot"], ids["eom"]) if i is not None))
    generation = {"bos_token_id": ids["bos_token"], "eos_token_id": stops[0] if len(stops) == 1 else stops or None}
    _write_json(dst_dir / "generation_config.json", {k: v for k, v in generation.items() if v is not None})


def _checked_metadata(reader: GGUFFile, source: Any) -> tuple[dict[str, Any], dict[str, int | None]]:
    """The tokenizer metadata as Python values, and the special token ids, each checked against the vocabulary."""
    meta = {k: f.value for k, f in reader.fields.items() if k.startswith(("tokenizer.", "general.architecture"))}
    tokens = _required(meta, "tokenizer.ggml.tokens", source)
    meta.setdefault("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        if (values := meta.get(key)) is not None and len(values) != len(tokens):
            raise CheckpointError(f"{source}: {key} has {len(values)} entries for {len(tokens)} tokenizer.ggml.tokens")
    ids = {name: meta.get(f"tokenizer.ggml.{key}") for name, key in SPECIAL_ID_KEYS.items()}
    for name, token_id in ids.items():
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise CheckpointError(
                f"{source}: tokenizer.ggml.{SPECIAL_ID_KEYS[name]} = {token_id} is not an id of the "
                f"{len(tokens)} tokenizer.ggml.tokens; the file is broken, convert the model again"
            )
    return meta, ids


def _required(meta: dict[str, Any], key: str, source: Any) -> Any:
    if key not in meta:
        raise CheckpointError(
            f"{source}: the metadata has no {key}, so the file carries no usable tokenizer. "
            "Put the original model's tokenizer files next to the converted checkpoint instead."
        )
    return meta[key]


def _byte_level_tokenizer(
    meta: dict, tokens: list[str], types: list[int], source: Any
) -> tuple[list[str], HFTokenizer]:
    merges = _required(meta, "tokenizer.ggml.merges", source)
    # llama.cpp writes vocabulary tokens in GPT-2's byte alphabet and added tokens as their text. A normal token
    # outside the alphabet is respelled into it (as transformers does); added ones stay text, matched whole.
    alphabet = set(BYTE_TO_CHAR.values())
    spelled = [
        t if kind in (CONTROL, USER_DEFINED) or set(t) <= alphabet else "".join(BYTE_TO_CHAR[b] for b in t.encode())
        for t, kind in zip(tokens, types, strict=True)
    ]
    pre = meta.get("tokenizer.ggml.pre", "default")
    vocab, merges = {t: i for i, t in enumerate(spelled)}, [tuple(m.split(" ")) for m in merges]
    tokenizer = HFTokenizer(BPE(vocab, merges, ignore_merges=pre in IGNORE_MERGES_PRE))
    tokenizer.decoder = decoders.ByteLevel()
    if pre in SPLIT_REGEXES:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLIT_REGEXES[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        return spelled, tokenizer
    if pre not in DIGIT_SPLIT_PRE + GPT2_PRE:
        fallback = "splitting text with GPT-2's regex"
        print(f"warning: {source}: unknown tokenizer.ggml.pre {pre!r}; {fallback}", file=sys.stderr)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    digits = [pre_tokenizers.Digits(individual_digits=True)] if pre in DIGIT_SPLIT_PRE else []
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([*digits, byte_level]) if digits else byte_level
    return spelled, tokenizer


def _sentencepiece_tokenizer(
    meta: dict, tokens: list[str], unk_id: int | None, source: Any
) -> tuple[list[str], HFTokenizer]:
    architecture = meta.get("general.architecture")
    gemma = architecture in GEMMA_ARCHITECTURES
    # Gemma files store a token of spaces as spaces; its tokenizer (normalizer below) spells them "▁".
    spelled = ["▁" * len(t) if gemma and t and set(t) == {" "} else t for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    elif gemma:  # Gemma's scores do not follow its merge order; the order of the vocabulary does
        merges = merges_from_scores(vocab, {t: -i for i, t in enumerate(spelled)})
    else:
        merges = merges_from_scores(
            vocab, dict(zip(spelled, _required(meta, "tokenizer.ggml.scores", source), strict=True))
        )
    unk = spelled[unk_id] if unk_id is not None else None
    tokenizer = HFTokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:  # GemmaTokenizer: spaces become "▁" and no "▁" goes in front of the text
        tokenizer.normalizer = normalizers.Replace(" ", "▁")
        tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    elif architecture == "phi3":  # transformers' phi3_tokenizer: the word-start "▁" comes from a normalizer
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        steps.append(decoders.Strip(" ", 1, 0))
    else:  # LlamaTokenizer; a "▁" goes in front of the text before the first special token only
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace("▁", "first" if prefix else "never", split=False)
        steps += [decoders.Strip(" ", 1, 0)] if prefix else []
    tokenizer.decoder = decoders.Sequence(steps)
    return spelled, tokenizer


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges a vocabulary implies: every split of a token into two tokens, best-scored token first.

    transformers' `generate_merges`, line for line, so the merges (and ties among them) are the same.
    """
    merges = []
    for token, score in scores.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges += [(left, right, score) for left, right in pairs]
    merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_special_tokens(
    tokenizer: HFTokenizer, spelled: list[str], tokens: list[str], types: list[int], named: dict[str, str]
) -> None:
    """Control tokens and the named ones as special tokens, user-defined ones as plain added tokens.

    Both are matched whole in the text, as llama.cpp does. A user-defined token only counts under the spelling
    the vocabulary has (transformers: Gemma's "  " token is not matched whole, its "▁▁" spelling merges).
    """
    vocab = tokenizer.get_vocab()
    control = [s for s, kind in zip(spelled, types, strict=True) if kind == CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*control, *named.values()]])
    user = [s for s, t, kind in zip(spelled, tokens, types, strict=True) if kind == USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _bos_eos_processor(named: dict, ids: dict, add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    bos = [f"{named['bos_token']}:{n}" for n in (0, 1)] if add_bos else []
    eos = [f"{named['eos_token']}:{n}" for n in (0, 1)] if add_eos else []
    single = [*bos[:1], "$A:0", *eos[:1]]
    specials = [(named[k], ids[k]) for k, on in (("bos_token", add_bos), ("eos_token", add_eos)) if on]
    return processors.TemplateProcessing(
        single=single, pair=[*single, *bos[1:], "$B:1", *eos[1:]], special_tokens=specials
    )


def _chat_template(meta: dict[str, Any]) -> str | list[dict[str, str]] | None:
    """The default template, or all of them as tokenizer_config.json lists named ones (llama.cpp's `.name` keys)."""
    prefix = "tokenizer.chat_template"
    named = [
        {"name": k.removeprefix(prefix + "."), "template": v} for k, v in meta.items() if k.startswith(prefix + ".")
    ]
    default = meta.get(prefix)
    return [{"name": "default", "template": default}, *named] if named and default else named or default


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- tokenizer files -> GGUF ---
@dataclass
class GGUFVocab:
    """A vocabulary as GGUF stores it: `model` is "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)."""

    model: str
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    add_space_prefix: bool | None = None


def add_tokenizer_to_gguf(writer: gguf.GGUFWriter, checkpoint_dir: Path) -> None:
    """Write the `tokenizer.ggml.*` keys and the chat template of the checkpoint's tokenizer, as llama.cpp does.

    A byte-level BPE tokenizer.json becomes "gpt2" with its merges and `pre` family; a byte-fallback BPE
    tokenizer.json or a tokenizer.model (when there is no tokenizer.json) becomes "llama" with scores and types.
    """
    checkpoint_dir = Path(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)  # the ids and flags plainlm itself tokenizes with
    config = _read_json(checkpoint_dir / "tokenizer_config.json")
    if (checkpoint_dir / "tokenizer.json").is_file():
        vocab = gguf_vocab_from_tokenizer_json(checkpoint_dir / "tokenizer.json")
    else:
        vocab = gguf_vocab_from_sentencepiece(checkpoint_dir / "tokenizer.model", config)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)

    # generation_config's stop ids past EOS go out as llama.cpp's end-of-turn and end-of-message ids.
    eot, eom = (tokenizer.stop_ids[1:] + [None, None])[:2]
    unk, pad = (_content(config.get(k)) for k in ("unk_token", "pad_token"))
    ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "eot": eot, "eom": eom}
    ids |= {"unk": unk and tokenizer.token_to_id(unk), "pad": pad and tokenizer.token_to_id(pad)}
    for name, token_id in ids.items():
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    probe = tokenizer.encode("a")
    writer.add_add_bos_token(tokenizer.bos_id is not None and probe[:1] == [tokenizer.bos_id])
    writer.add_add_eos_token(tokenizer.eos_id is not None and probe[-1:] == [tokenizer.eos_id])
    jinja = checkpoint_dir / "chat_template.jinja"
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else config.get("chat_template")
    if template:
        writer.add_chat_template(template)


def gguf_vocab_from_tokenizer_json(path: Path) -> GGUFVocab:
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data["model"]
    byte_level = (data.get("decoder") or {}).get("type") == "ByteLevel" and not model.get("byte_fallback")
    if model.get("type") != "BPE" or not (byte_level or model.get("byte_fallback")):
        raise CheckpointError(
            f"{path}: a {model.get('type')} model without byte-level or byte-fallback BPE; GGUF export handles "
            "byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) and SentencePiece-style BPE (Llama 2, Gemma) only"
        )
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    by_id = {i: t for t, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(max(by_id) + 1)]
    types = [
        (CONTROL if added[i]["special"] else USER_DEFINED) if i in added
        else UNUSED if i not in by_id
        else BYTE if model.get("byte_fallback") and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t)
        else NORMAL
        for i, t in enumerate(tokens)
    ]  # fmt: skip
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if byte_level:
        return GGUFVocab("gpt2", _pre_name(data.get("pre_tokenizer"), path), tokens, types, merges=merges)
    # A SentencePiece vocabulary merges by score: a token scores minus the rank of the first merge that makes it,
    # so that `merges_from_scores` gives the merge order back. Tokens no merge makes score below all of them.
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), r)
    scores = [-float(rank.get(t, len(merges) + i)) for i, t in enumerate(tokens)]
    return GGUFVocab("llama", "default", tokens, types, scores, add_space_prefix=_adds_space_prefix(data))


def gguf_vocab_from_sentencepiece(path: Path, config: dict[str, Any]) -> GGUFVocab:
    sp = spm.SentencePieceProcessor(model_file=str(path))
    n, added = sp.get_piece_size(), {int(i): t for i, t in config.get("added_tokens_decoder", {}).items()}
    size = max([n - 1, *added]) + 1  # tokenizer_config.json may add tokens past SentencePiece's own
    kinds = ((sp.is_unknown, UNKNOWN), (sp.is_control, CONTROL), (sp.is_unused, UNUSED), (sp.is_byte, BYTE))
    types = [next((kind for test, kind in kinds if test(i)), NORMAL) if i < n else UNUSED for i in range(size)]
    tokens = [sp.id_to_piece(i) if i < n else f"[PAD{i}]" for i in range(size)]
    scores = [sp.get_score(i) if i < n else -1000.0 for i in range(size)]
    for i, token in added.items():  # tokenizer_config's added tokens are matched whole, special or not
        if i >= n or types[i] == NORMAL:
            tokens[i], types[i] = token["content"], CONTROL if token.get("special") else USER_DEFINED
    prefix = sp.encode("a", out_type=str)[0].startswith("▁")
    return GGUFVocab("llama", "default", tokens, types, scores, add_space_prefix=prefix)


def _pre_name(pre_tokenizer: dict | None, path: Path) -> str:
    """The `tokenizer.ggml.pre` family of a byte-level pre-tokenizer."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer] if pre_tokenizer else [])
    kinds = [step["type"] for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return DIGIT_SPLIT_PRE[0]
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        names = {regex: name for name, regex in reversed(SPLIT_REGEXES.items())}
        if name := names.get(steps[0].get("pattern", {}).get("Regex")):
            return name
    raise CheckpointError(
        f"{path}: pre_tokenizer {json.dumps(pre_tokenizer)[:400]} is none of the families GGUF names in "
        f"tokenizer.ggml.pre that plainlm knows: {', '.join([*GPT2_PRE[:1], *DIGIT_SPLIT_PRE[:1], *SPLIT_REGEXES])}"
    )


def _adds_space_prefix(data: dict[str, Any]) -> bool:
    normalizer, pre = data.get("normalizer") or {}, data.get("pre_tokenizer") or {}
    steps = [*normalizer.get("normalizers", [normalizer]), *pre.get("pretokenizers", [pre])]
    return any(
        step.get("type") == "Prepend"
        or (step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never")
        for step in steps
    )
