"""Named fallback chat templates, for checkpoints that ship none of their own.

A model's own template (in `tokenizer_config.json` or `chat_template.jinja`) always wins; `tokenizer.py` uses
these only when there is none, or when asked by name (`Tokenizer(dir, chat_template="chatml")`). Each is the
jinja the family's instruct models use, rendered like transformers does (`trim_blocks`, `lstrip_blocks`), so
newlines are written as `{{ '\\n' }}` expressions: a literal newline after a `{% ... %}` tag would be trimmed.
"""

from __future__ import annotations


def _chatml(default_system: str | None = None) -> str:
    """ChatML; with `default_system`, the system turn the family's own template writes when there is none."""
    opening = ""
    if default_system:
        opening = (
            "{% if loop.first and messages[0]['role'] != 'system' %}"
            f"{{{{ '<|im_start|>system\\n{default_system}<|im_end|>\\n' }}}}"
            "{% endif %}"
        )
    return (
        "{% for message in messages %}"
        + opening
        + "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


# Each is checked against its family's real template, rendered on the same conversations, in
# tests/test_chat_templates.py.
CHAT_TEMPLATES: dict[str, str] = {
    # Qwen 2/2.5/3, SmolLM (1), Hermes fine-tunes. Qwen 2 and 2.5's own templates also write a default system
    # turn ("You are a helpful assistant." / "You are Qwen, created by Alibaba Cloud. ..."); Qwen3's does not.
    "chatml": _chatml(),
    # SmolLM2 instruct: ChatML with its own default system turn.
    "smollm2": _chatml("You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
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
    # Llama 3 instruct. Llama 3.1-3.3's own templates also open with a system header (knowledge cut-off and
    # today's date) and tool calls; those checkpoints ship their template, so this fallback is Llama 3's.
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
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}"
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

# Name prefixes whose format is one of the above under another name. OLMo's instruct models use the Tulu format
# (<|user|> ... <|assistant|>), not ChatML as this table said before; it gets no fallback until one is checked
# against OLMo's real template. Mistral's [INST] format differs from Llama 2's in spacing and BOS (unchecked).
_ALIASES = {"qwen": "chatml", "smollm": "chatml", "codellama": "llama2", "mistral": "llama2", "mixtral": "llama2"}


def fallback_template_name(model_name: str | None = None, model_family: str | None = None) -> str:
    """The fallback template for a model: by its name first ("Llama-3.2-1B", "meta-llama/Meta-Llama-3-8B",
    "SmolLM2-135M-Instruct", "gemma-3-1b-it"), then by its family ("qwen2", "gemma3", "phi3"); "plain" if
    neither says. The name goes first because families are shared: a "llama" checkpoint may be Llama 2 or 3,
    SmolLM2, or a Mistral."""
    for hint in (model_name, model_family):
        key = (hint or "").rsplit("/", 1)[-1].lower()
        key = key.replace("-", "").replace("_", "").replace(" ", "").removeprefix("meta")
        for name in CHAT_TEMPLATES:
            if name != "plain" and key.startswith(name):
                return name
        for prefix, name in _ALIASES.items():
            if key.startswith(prefix):
                return name
    return "plain"
