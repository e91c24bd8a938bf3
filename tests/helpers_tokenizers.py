"""Tiny tokenizers trained on the spot, so tests compare against transformers without downloads.

`make_bpe_tokenizer(dir)` writes a byte-level BPE tokenizer shaped like SmolLM2's (tokenizer.json, ChatML),
`make_sentencepiece_tokenizer(dir)` a Llama-2 style SentencePiece one (tokenizer.model, [INST] template).
Both return the directory, so a test can drop a tokenizer into any checkpoint dir it builds.
Training takes well under a second; call them from session-scoped fixtures anyway.
"""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# A few KB of deliberately mixed text: prose, code, numbers, accents, CJK, emoji, odd whitespace.
TRAINING_TEXT = "\n".join(
    [
        "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
        "In 1969, Apollo 11 landed on the Moon; 384,400 km away, at 20:17 UTC on July 20.",
        "def forward(self, x: torch.Tensor) -> torch.Tensor:\n    return self.proj(F.silu(self.fc(x)))",
        "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot product",
        "Café, naïve, résumé, Über, façade, jalapeño, smörgåsbord, Ærø, Straße.",
        "Привет, мир! Как дела? Всё хорошо, спасибо.",
        "你好，世界！今天天气很好。我们去公园散步吧。机器学习和自然语言处理。",
        "こんにちは世界。東京は日本の首都です。カタカナとひらがな。",
        "안녕하세요 세계. 한국어 문장입니다.",
        "مرحبا بالعالم. هذه جملة عربية.",
        "Emoji: 😀 🎉 👍🏽 🇫🇷 ❤️ 👨‍👩‍👧‍👦 🚀✨ and math: ∑ ∫ √ ≤ ≥ ≠ π ∞ α β γ.",
        "Tabs\tand\t\tmore tabs, spaces  between   words    here, and trailing spaces   ",
        'JSON: {"name": "plainlm", "version": 1, "tags": ["llm", "torch"], "ok": true}',
        '<html><body><p class="x">Hello &amp; welcome</p></body></html>',
        "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC LIMIT 10;",
        "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 3.14159 2.71828 1e-5 -7 +8 1,000,000 0xFF 0b1010",
        "URLs like https://example.com/path?q=1&r=two#frag and emails like a.b@c.org appear too.",
        "Once upon a time, in a land far away, there lived a small tokenizer who dreamed of merges.",
        "She said, \"It's fine—really!\" He replied: 'Are you sure?' … (maybe) [not] {quite}.",
        "Markdown: # Title\n## Subtitle\n- item one\n- item two\n\n```python\nprint('hi')\n```",
    ]
)
TRAINING_LINES = [line for line in TRAINING_TEXT.split("\n") if line.strip()] * 8

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 2's own template (from meta-llama/Llama-2-7b-chat-hf), whitespace and all.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

BPE_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


def _added_tokens_decoder(tokens: list[str], first_id: int) -> dict[str, dict]:
    return {
        str(first_id + i): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, tok in enumerate(tokens)
    }


def make_bpe_tokenizer(dir: str | Path, vocab_size: int = 700, bos_via_post_processor: bool = False) -> Path:
    """A byte-level BPE tokenizer like SmolLM2's (GPT-2 pre-tokenizer, ChatML, `<|im_end|>` as EOS).

    `bos_via_post_processor=True` makes it Llama-3 shaped instead: the tokenizer.json post-processor prepends
    `<|endoftext|>` as BOS, so `encode` must get its BOS from the post-processor, not from a flag.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=BPE_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_LINES, trainer=trainer)
    bos = "<|endoftext|>" if bos_via_post_processor else "<|im_start|>"
    if bos_via_post_processor:
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
                ),
            ]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(dir / "tokenizer.json"))
    _write_json(
        dir / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": _added_tokens_decoder(BPE_SPECIAL_TOKENS, 0),
            "bos_token": bos,
            "eos_token": "<|im_end|>",
            "unk_token": "<|endoftext|>",
            "pad_token": "<|im_end|>",
            "chat_template": CHATML_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 2048,
            # As SmolLM2 and Llama 3 ship. For GPT2Tokenizer transformers 5 rebuilds the pre-tokenizer itself rather
            # than read tokenizer.json's, which is why ours is GPT-2's plain ByteLevel (SmolLM2 also splits digits).
            "tokenizer_class": "PreTrainedTokenizerFast" if bos_via_post_processor else "GPT2Tokenizer",
        },
    )
    eos_ids = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    _write_json(dir / "generation_config.json", {"bos_token_id": tok.token_to_id(bos), "eos_token_id": eos_ids})
    return dir


def make_sentencepiece_tokenizer(dir: str | Path, vocab_size: int = 700) -> Path:
    """A Llama-2 style SentencePiece BPE tokenizer: byte fallback, identity normalization, `<s>`/`</s>`."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    # Llama 2's trainer options (its tokenizer.model's trainer_spec), with a lower character coverage so that
    # rare characters of the training text fall back to bytes.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_LINES),
        model_prefix=str(dir / "tokenizer"),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (dir / "tokenizer.vocab").unlink()
    _write_json(
        dir / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            # Llama 2 writes these as AddedToken dicts; transformers 5 refuses one without "__type".
            "bos_token": {
                "__type": "AddedToken",
                "content": "<s>",
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
            },
            "eos_token": {
                "__type": "AddedToken",
                "content": "</s>",
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
            },
            "unk_token": "<unk>",
            "chat_template": LLAMA2_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "legacy": False,
            "model_max_length": 4096,
            # transformers 5 needs the class named: without it (even with a config.json of model_type "llama")
            # it builds a generic tokenizer that puts no "▁" in front of the text at all.
            "tokenizer_class": "LlamaTokenizer",
        },
    )
    _write_json(dir / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    return dir
