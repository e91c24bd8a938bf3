"""`plainlm.tokenizer.Tokenizer` against `transformers.AutoTokenizer` on tokenizers trained here.

Three checkpoints, built once per session (tests/helpers_tokenizers.py): byte-level BPE shaped like SmolLM2
("bpe"), the same with a Llama-3 style post-processor that prepends BOS ("bpe_bos"), and a Llama-2 style
SentencePiece model with byte fallback ("spm").
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
from pathlib import Path

import pytest
from helpers_tokenizers import CHATML_TEMPLATE, make_bpe_tokenizer, make_sentencepiece_tokenizer

from plainlm.chat_templates import CHAT_TEMPLATES
from plainlm.tokenizer import TOKENIZER_FILES, Tokenizer, copy_tokenizer_files

transformers = pytest.importorskip("transformers")

# 110 strings: whitespace runs, code, numbers, scripts, emoji, special-token strings inside text.
# fmt: off
TEXTS = [
    "", " ", "  ", "\t", "\n", "\n\n\n", " \n ", "\r\n", "a", "A", "Hello", "Hello world", "Hello, world!",
    " Hello", "  two leading spaces", "trailing space ", "trailing spaces   ", "many     spaces     inside",
    "tabs\tinside\ttext", "\t\tleading tabs", "mixed \t \n whitespace \t\n", "line one\nline two\n\nline four",
    "The quick brown fox jumps over the lazy dog.", "pack my box with five dozen liquor jugs",
    "ALL CAPS SENTENCE", "CamelCaseIdentifier", "snake_case_identifier", "kebab-case-word",
    "1234567890", "3.14159", "-42", "1,000,000", "2024-06-01T12:00:00Z", "0xDEADBEEF", "1e-5",
    "def f(x):\n    return x * 2\n", "for i in range(10):\n\tprint(i)", "if (a && b) { return; }",
    "x = {'a': [1, 2, 3], \"b\": None}", "SELECT * FROM t WHERE id = 1;", "<div class=\"x\">hi</div>",
    "https://example.com/a/b?c=d&e=f#g", "user@example.org", "C:\\Users\\name\\file.txt", "~/.config/app.yaml",
    "Café", "naïve résumé", "Straße", "Ærøskøbing", "ñandú", "Ελληνικά γράμματα", "Привет, мир!",
    "你好，世界！", "机器学习", "日本語のテキスト", "カタカナ", "한국어", "مرحبا", "שלום", "हिन्दी", "ไทย",
    "😀", "😀😀😀", "👍🏽", "🇫🇷🇯🇵", "👨‍👩‍👧‍👦", "❤️", "🚀 launch ✨", "emoji in text 🎉 here",
    "∑ ∫ √ ≤ ≥ ≠ π ∞", "α β γ δ", "½ ¾ ‰ € £ ¥", "\u200b zero width", "\u00a0non-breaking space",
    "a\u0301 combining accent", "\ufeffbyte order mark", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "Ω≈ç√∫˜µ≤≥÷", "¡¿",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "<unk>",
    "text<|im_end|>more", "a <|im_start|> b", "<|im_start|>user\nHi there<|im_end|>\n",
    "before</s>after", "x <s> y", "</s></s>", "<s> [INST] hi [/INST]", "end of text</s>",
    "<|im_start|><|im_end|><|endoftext|>", "<|im_start", "im_start|>", "< s >", "<<SYS>>\nsys\n<</SYS>>",
    "▁", "a▁b", "word▁ word", "repeated repeated repeated repeated", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "?!?!?!", "...", "---", "___", "'quoted' \"double\"", "it's don't won't", "(parens) [brackets] {braces}",
]
# fmt: on

CHATS = {
    "system_multi_turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3? 🤔 答えて"},
    ],
    "single_user": [{"role": "user", "content": "Hello!"}],
    "no_system": [
        {"role": "user", "content": "  padded question  "},
        {"role": "assistant", "content": "an answer\nwith lines"},
        {"role": "user", "content": "thanks"},
    ],
}

KINDS = ["bpe", "bpe_bos", "spm"]


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "bpe": make_bpe_tokenizer(root / "bpe"),
        "bpe_bos": make_bpe_tokenizer(root / "bpe_bos", bos_via_post_processor=True),
        "spm": make_sentencepiece_tokenizer(root / "spm"),
    }


@pytest.fixture(scope="session")
def pairs(tokenizer_dirs: dict[str, Path]) -> dict[str, tuple[Tokenizer, object]]:
    return {k: (Tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)) for k, d in tokenizer_dirs.items()}


@pytest.fixture(params=KINDS)
def pair(request: pytest.FixtureRequest, pairs: dict) -> tuple[Tokenizer, object]:
    return pairs[request.param]


def test_encode_matches_transformers(pair: tuple) -> None:
    ours, theirs = pair
    # Texts that start with the BOS string are the one deliberate difference: see the test after next.
    texts = [t for t in TEXTS if not (ours.encode("")[:1] == [ours.bos_id] and t.startswith(ours.bos_token))]
    assert len(texts) > 100
    mismatches = [
        (t, ours.encode(t), theirs(t)["input_ids"]) for t in texts if ours.encode(t) != theirs(t)["input_ids"]
    ]
    assert not mismatches
    assert ours.encode_batch(texts) == [theirs(t)["input_ids"] for t in texts]


def test_special_ids_match_transformers(pair: tuple) -> None:
    ours, theirs = pair
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert ours.vocab_size == len(theirs)
    assert ours.stop_ids[0] == ours.eos_id


def test_stop_ids_include_generation_config(pairs: dict) -> None:
    bpe, spm = pairs["bpe"][0], pairs["spm"][0]
    assert bpe.stop_ids == [bpe.token_to_id("<|im_end|>"), bpe.token_to_id("<|endoftext|>")]  # a list there
    assert spm.stop_ids == [2]  # an int there


def test_bos_and_eos_flags(pair: tuple) -> None:
    ours, _ = pair
    body = ours.encode("Hello world", bos=False)
    assert body[:1] != [ours.bos_id]
    assert ours.encode("Hello world", bos=True) == [ours.bos_id, *body]
    assert ours.encode("Hello world", bos=False, eos=True) == [*body, ours.eos_id]
    # A text that already starts with BOS never gets a second one.
    bos_text = ours.bos_token + "Hello"
    assert ours.encode(bos_text, bos=True).count(ours.bos_id) == 1
    assert ours.encode(bos_text).count(ours.bos_id) == 1


def test_bos_is_not_doubled_where_transformers_doubles(pairs: dict) -> None:
    ours, theirs = pairs["spm"]
    assert theirs("<s>hi")["input_ids"][:2] == [1, 1]  # transformers' post-processor adds a second <s>
    assert ours.encode("<s>hi") == theirs("<s>hi")["input_ids"][1:]


@pytest.mark.parametrize(
    ("kind", "changes"),
    [
        # With a tokenizer.json, its post-processor decides and transformers 5 ignores these flags.
        ("bpe", {"add_bos_token": True, "add_eos_token": True}),
        ("bpe_bos", {"add_bos_token": False}),
        ("spm", {"add_eos_token": True}),
        ("spm", {"legacy": True}),  # "▁" after every special token, not only at the start
        ("spm", {"add_prefix_space": False}),
    ],
)
def test_config_flags_match_transformers(tokenizer_dirs: dict, tmp_path: Path, kind: str, changes: dict) -> None:
    directory = _variant(tokenizer_dirs[kind], tmp_path / kind, **changes)
    ours, theirs = Tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
    texts = [t for t in TEXTS if not t.startswith(ours.bos_token)]
    assert [ours.encode(t) for t in texts] == [theirs(t)["input_ids"] for t in texts]
    assert [ours.decode(theirs(t)["input_ids"]) for t in texts] == [
        theirs.decode(theirs(t)["input_ids"]) for t in texts
    ]


def test_sentencepiece_without_add_bos_flag_still_adds_bos(tokenizer_dirs: dict, tmp_path: Path) -> None:
    directory = _variant(tokenizer_dirs["spm"], tmp_path / "spm", add_bos_token=None)
    # transformers 5 adds no BOS here, though LlamaTokenizer documents True as the default, as Llama needs.
    assert transformers.AutoTokenizer.from_pretrained(directory)("hi")["input_ids"][0] != 1
    assert Tokenizer(directory).encode("hi")[0] == 1


def test_decode_matches_transformers_and_round_trips(pair: tuple) -> None:
    ours, theirs = pair
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
        expected = text
        if ours._sp is not None:
            # SentencePiece writes spaces as "▁", so a "▁" in the text comes back as a space. And transformers 5's
            # Llama tokenizer adds no word-start "▁" before a leading space, but its decoder strips one space all
            # the same: one leading space is lost. (SentencePiece itself keeps it.)
            expected = text.replace("▁", " ")
            expected = expected[1:] if expected.startswith(" ") else expected
        assert ours.decode(ours.encode(text, bos=False)) == expected


def test_stream_decoder_concatenates_to_decode(pair: tuple) -> None:
    ours, _ = pair
    # One long sequence through all texts, so special tokens and multibyte characters meet at every boundary.
    ids = [i for text in TEXTS for i in ours.encode(text)]
    for skip in (False, True):
        stream = ours.stream_decoder(skip_special_tokens=skip)
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) + stream.flush() == ours.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in piece for piece in pieces)  # never half a character
        assert sum(bool(p) for p in pieces) > len(TEXTS)  # it really streams


def test_stream_decoder_holds_back_split_characters(pairs: dict) -> None:
    for ours, _ in pairs.values():
        ids = ours.encode("😀", bos=False)
        assert len(ids) > 1  # the emoji is spread over several byte tokens in all three vocabularies
        stream = ours.stream_decoder()
        assert [stream.push(i) for i in ids][:-1] == [""] * (len(ids) - 1)
        assert stream.flush() == ""
        truncated = ours.stream_decoder()  # a stream cut mid-character still ends where decode does
        assert "".join(truncated.push(i) for i in ids[:-1]) + truncated.flush() == ours.decode(ids[:-1])


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("chat", list(CHATS))
def test_chat_template_matches_transformers(pair: tuple, chat: str, generation_prompt: bool) -> None:
    ours, theirs = pair
    messages = CHATS[chat]
    expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    text = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert text == expected
    expected_ids = theirs.apply_chat_template(messages, add_generation_prompt=generation_prompt, return_dict=False)
    assert ours.encode(text, bos=False) == expected_ids


def _variant(src: Path, dst: Path, **config_changes: object) -> Path:
    """A copy of the checkpoint in `src` with some tokenizer_config.json keys changed (None removes one)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config.update(config_changes)
    config = {k: v for k, v in config.items() if v is not None}
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


def test_chat_template_from_jinja_file_and_named_list(tokenizer_dirs: dict, tmp_path: Path) -> None:
    messages = CHATS["system_multi_turn"]
    as_file = _variant(tokenizer_dirs["bpe"], tmp_path / "file")  # the file wins over tokenizer_config.json
    (as_file / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    as_list = _variant(
        tokenizer_dirs["bpe"],
        tmp_path / "list",
        chat_template=[
            {"name": "tool_use", "template": "tools!"},
            {"name": "default", "template": CHATML_TEMPLATE + "(default)"},
        ],
    )
    for directory in (as_file, as_list):
        theirs = transformers.AutoTokenizer.from_pretrained(directory)
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert Tokenizer(directory).apply_chat_template(messages) == expected
    assert Tokenizer(as_file).chat_template_source == str(as_file / "chat_template.jinja")


@pytest.mark.parametrize("name", list(CHAT_TEMPLATES))
def test_named_fallbacks_render_like_transformers(pairs: dict, name: str) -> None:
    ours, theirs = pairs["spm"]
    fallback = Tokenizer(ours.checkpoint_dir, chat_template=name)
    messages = CHATS["system_multi_turn"]
    expected = theirs.apply_chat_template(
        messages, chat_template=CHAT_TEMPLATES[name], tokenize=False, add_generation_prompt=True
    )
    assert fallback.apply_chat_template(messages) == expected
    assert "Hello!" in fallback.apply_chat_template(CHATS["single_user"])


def test_fallback_when_model_has_no_template(tokenizer_dirs: dict, tmp_path: Path) -> None:
    bare = _variant(tokenizer_dirs["bpe"], tmp_path / "bare", chat_template=None)
    plain = Tokenizer(bare).apply_chat_template(CHATS["system_multi_turn"])
    assert plain == "You are terse.\n\nUser: What is 2+2?\nAssistant: 4.\nUser: And 3+3? 🤔 答えて\nAssistant:"
    llama3 = Tokenizer(bare, model_family="Llama-3.2-1B-Instruct")
    assert llama3.chat_template == CHAT_TEMPLATES["llama3"]
    assert Tokenizer(bare, model_family="Qwen2.5-0.5B").chat_template == CHAT_TEMPLATES["chatml"]
    with pytest.raises(ValueError, match="Unknown chat template 'vicuna'.*chatml"):
        Tokenizer(bare, chat_template="vicuna")


def test_template_helpers_behave_like_transformers(pairs: dict) -> None:
    ours, theirs = pairs["bpe"]
    template = (
        "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ strftime_now('%Y') }}|{{ bos_token }}"
        "{{ eos_token }}{{ pad_token }}|{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m.role }}{% endfor %}|{{ tools is none }}|{{ messages[1].content is defined }}\n"
        # Hub templates are often written over indented lines and rely on trim_blocks and lstrip_blocks.
        "{% for m in messages %}\n    {% if m.role == 'user' %}\n        <{{ m.role }}>\n    {% endif %}\n{% endfor %}"
    )
    messages = [{"role": "user", "content": "ünïcödé <b>&</b> 😀"}, {"role": "assistant", "content": None}]
    expected = theirs.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert Tokenizer(ours.checkpoint_dir, chat_template=template).apply_chat_template(messages) == expected
    assert f"|{datetime.date.today().year}|" in expected and "ünïcödé <b>&</b> 😀" in expected


@pytest.mark.parametrize(
    "attack",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
    ],
)
def test_sandbox_refuses_python_internals(tokenizer_dirs: dict, tmp_path: Path, attack: str) -> None:
    hostile = _variant(tokenizer_dirs["bpe"], tmp_path / "hostile", chat_template=attack)
    with pytest.raises(ValueError, match="tokenizer_config.json failed: access to attribute") as error:
        Tokenizer(hostile).apply_chat_template(CHATS["single_user"])
    assert str(hostile) in str(error.value)
    assert type(error.value.__cause__).__name__ == "SecurityError"


def test_template_errors_name_their_source(pairs: dict) -> None:
    ours, _ = pairs["spm"]  # Llama 2's template insists on alternating roles
    with pytest.raises(ValueError, match=r"spm/tokenizer_config.json failed: Conversation roles must alternate"):
        ours.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="chat_template argument does not compile"):
        Tokenizer(ours.checkpoint_dir, chat_template="{% for %}").apply_chat_template(CHATS["single_user"])


def test_missing_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=rf"No tokenizer in {re.escape(str(tmp_path))}: .*tokenizer.json.*tokenizer.model"
    ):
        Tokenizer(tmp_path)


def test_copy_tokenizer_files(tokenizer_dirs: dict, tmp_path: Path) -> None:
    for kind, original in tokenizer_dirs.items():
        src = shutil.copytree(original, tmp_path / f"{kind}_checkpoint")
        (src / "model.safetensors").write_bytes(b"not a tokenizer file")
        copied = copy_tokenizer_files(src, tmp_path / kind)
        assert sorted(p.name for p in copied) == sorted(p.name for p in src.iterdir() if p.name in TOKENIZER_FILES)
        assert all(p.read_bytes() == (src / p.name).read_bytes() for p in copied)
        assert not (tmp_path / kind / "model.safetensors").exists()
        assert Tokenizer(tmp_path / kind).encode("Hello world") == Tokenizer(src).encode("Hello world")
    assert {p.name for p in Tokenizer(tokenizer_dirs["spm"]).save(tmp_path / "saved")} == {
        "tokenizer.model",
        "tokenizer_config.json",
        "generation_config.json",
    }
