"""The fallback chat templates (plainlm/chat_templates.py) render what the real templates of their families
render, on the same conversations; and a checkpoint without a template gets its fallback by model name first."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from gguf import GGUFReader

from plainlm.chat_templates import CHAT_TEMPLATES, fallback_template_name
from plainlm.packaged_models import smollm2_gguf
from plainlm.tokenizer import Tokenizer, _chat_template_env

# The real templates of each family's tokenizer_config.json on the Hugging Face hub (not available offline here,
# unlike SmolLM2's, which is read from the packaged GGUF below). Checked character for character against
# llama.cpp's models/templates/microsoft-Phi-3.5-mini-instruct.jinja, and against public copies of the Llama 2,
# Llama 3 and Gemma 3 (google/gemma-3-4b-it, also llama.cpp's GEMMA3_CHAT_TEMPLATE) templates.
REAL_TEMPLATES = {
    # meta-llama/Llama-2-7b-chat-hf, tokenizer_config.json "chat_template"
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    # meta-llama/Meta-Llama-3-8B-Instruct, tokenizer_config.json "chat_template"
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # microsoft/Phi-3.5-mini-instruct, tokenizer_config.json "chat_template"
    "phi3": (
        "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
        "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}"
        "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
        "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    # google/gemma-3-1b-it, tokenizer_config.json "chat_template"
    "gemma": """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
""",
}

SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [
    {"role": "user", "content": " What is 2+2? "},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3? 🤔\nanswer briefly"},
]
CONVERSATIONS = {"one_turn": TURNS[:1], "multi_turn": TURNS, "with_system": [SYSTEM, *TURNS]}


def render(template: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """As transformers renders a chat template (the environment test_tokenizer.py checks against it)."""
    return (
        _chat_template_env()
        .from_string(template)
        .render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token="<s>", eos_token="</s>")
    )


@functools.cache  # reading the GGUF's metadata takes seconds
def smollm2_real_template() -> str:
    return GGUFReader(smollm2_gguf()).fields["tokenizer.chat_template"].contents()


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", [*REAL_TEMPLATES, "smollm2"])
def test_fallback_renders_like_the_real_template(name: str, conversation: str, add_generation_prompt: bool) -> None:
    real = smollm2_real_template() if name == "smollm2" else REAL_TEMPLATES[name]
    messages = CONVERSATIONS[conversation]
    expected = render(real, messages, add_generation_prompt)
    assert render(CHAT_TEMPLATES[name], messages, add_generation_prompt) == expected


def test_the_check_can_fail() -> None:
    """ChatML without SmolLM2's default system turn (the fallback SmolLM2 got before) differs from the real one."""
    real = render(smollm2_real_template(), TURNS, True)
    assert render(CHAT_TEMPLATES["chatml"], TURNS, True) != real
    assert real.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_gemma_refuses_roles_that_do_not_alternate_as_the_real_one_does() -> None:
    for template in (REAL_TEMPLATES["gemma"], CHAT_TEMPLATES["gemma"]):
        with pytest.raises(Exception, match="must alternate"):
            render(template, [TURNS[0], TURNS[0]], True)


def test_the_model_name_is_looked_up_before_the_family() -> None:
    # A Llama-type checkpoint: the family "llama" says nothing about the format, the name does.
    assert fallback_template_name("Llama-3.2-1B", "llama") == "llama3"
    assert fallback_template_name("meta-llama/Meta-Llama-3-8B-Instruct", "llama") == "llama3"
    assert fallback_template_name("Llama-2-7b-chat-hf", "llama") == "llama2"
    assert fallback_template_name("CodeLlama-7b-Instruct-hf", "llama") == "llama2"
    assert fallback_template_name("Smollm2 135M 8k Lc100K Mix1 Ep2", "llama") == "smollm2"  # a GGUF's general.name
    assert fallback_template_name("Phi-3.5-mini-instruct", "phi3") == "phi3"
    assert fallback_template_name("my-finetune", "gemma3") == "gemma"  # the family when the name says nothing
    assert fallback_template_name("my-finetune", "qwen2") == "chatml"
    assert fallback_template_name("my-finetune", "llama") == "plain"
    assert fallback_template_name(None, None) == "plain"


def test_a_llama_checkpoint_without_a_template_gets_its_names_fallback(tiny_hf_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        text = (tiny_hf_dir / name).read_text(encoding="utf-8")
        (bare / name).write_text(text, encoding="utf-8")
    data = json.loads((bare / "tokenizer_config.json").read_text(encoding="utf-8"))
    data.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(data), encoding="utf-8")
    tokenizer = Tokenizer(bare, model_family="llama", model_name="Llama-3.2-1B")
    assert tokenizer.chat_template_fallback == "llama3"
    assert tokenizer.chat_template == CHAT_TEMPLATES["llama3"]
    assert Tokenizer(bare, model_family="llama").chat_template_fallback == "plain"
