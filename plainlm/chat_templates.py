"""Named fallback chat templates, for checkpoints that ship none of their own.

A model's own template (in `tokenizer_config.json` or `chat_template.jinja`) always wins; `tokenizer.py` uses
these only when there is none, or when asked by name (`Tokenizer(dir, chat_template="chatml")`). Each is the
jinja the family's instruct models use, rendered like transformers does (`trim_blocks`, `lstrip_blocks`), so
newlines are written as `{{ '\\n' }}` expressions: a literal newline after a `{% ... %}` tag would be trimmed.
"""

from __future__ import annotations

CHAT_TEMPLATES: dict[str, str] = {
    # Qwen 2/2.5, SmolLM2, OLMo-2 instruct, Hermes fine-tunes.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Llama 2 chat (and Mistral's [INST] format): the system prompt folds into the first user turn.
    "llama2": (
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
        "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    # Llama 3 / 3.1 / 3.2 instruct.
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # Gemma 1/2/3: no system role, so (as Gemma 3 does) the system prompt opens the first user turn.
    "gemma": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}"
        "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '')"
        " + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    # Phi-3 / Phi-3.5 mini instruct.
    "phi3": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    # Base models have no chat format; a readable transcript is the least surprising prompt.
    "plain": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% else %}{{ message['role'] | capitalize + ': ' + message['content'] + '\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    ),
}

# Family names whose format is one of the above under another name.
_FAMILY_ALIASES = {"qwen": "chatml", "smollm": "chatml", "olmo": "chatml", "mistral": "llama2", "mixtral": "llama2"}


def template_name_for_family(model_family: str | None) -> str:
    """The fallback template for a model family hint ("llama3.2", "Qwen2.5", "gemma-3"...); "plain" if unknown."""
    family = (model_family or "").lower().replace("-", "").replace("_", "")
    for name in CHAT_TEMPLATES:
        if family.startswith(name):
            return name
    for prefix, name in _FAMILY_ALIASES.items():
        if family.startswith(prefix):
            return name
    return "plain"
