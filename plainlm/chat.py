"""The interactive chat loop behind `plainlm chat`: read a turn, render the conversation with the
model's chat template, stream the reply, repeat. Works on a terminal and on piped stdin.
Ctrl-C stops the reply being written and keeps the conversation, that partial reply included."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from plainlm.api import LLM
from plainlm.sampling import SamplingParams

HELP = "Type a message and press Enter; /help lists the commands."
COMMANDS = """/help   this list
/reset  forget the conversation (the system message stays)
/exit   leave (also /quit, or Ctrl-D)
Ctrl-C while the model writes stops its reply; the conversation keeps what it wrote."""


def template_description(llm: LLM) -> str:
    """Which chat template renders the conversation, in a few words for the banner."""
    fallback = llm.tokenizer.chat_template_fallback
    if llm.tokenizer.chat_template_source == "the chat_template argument":
        return "the chat template given with --chat_template"
    if fallback is None:
        return "the model's own chat template"
    return f"plainlm's {fallback!r} chat template (plainlm/chat_templates.py; --chat_template picks another)"


def chat_loop(
    llm: LLM,
    params: SamplingParams | None = None,
    system: str | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    **options: Any,
) -> list[dict[str, str]]:
    """Run the conversation until /exit or end of input; returns the messages exchanged.

    params: how replies are sampled (default: up to 256 tokens, greedy); options: LLM.stream's (compile).
    """
    params = params or SamplingParams(max_new_tokens=256)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    if interactive:
        print(f"Chatting with {llm.name} in {template_description(llm)}. {HELP}", file=stdout)
    while True:
        if interactive:
            print(">> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/help":
            print(COMMANDS, file=stdout, flush=True)
            continue
        if text == "/reset":
            messages = list(start)
            print("(conversation reset)", file=stdout, flush=True)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        context = llm.model.config.block_size
        if len(llm.tokenizer.encode(prompt, bos=False)) >= context:
            messages.pop()
            print(
                f"(the conversation no longer fits the model's context of {context} tokens: /reset starts over)",
                file=stdout,
                flush=True,
            )
            continue
        reply = []
        print("Assistant: ", end="", file=stdout, flush=True)
        try:
            for piece in llm.stream(prompt, params, templated=True, **options):
                reply.append(piece)
                print(piece, end="", file=stdout, flush=True)
        except KeyboardInterrupt:  # stop this reply, not the chat
            print(" (stopped)", end="", file=stdout, flush=True)
        print(file=stdout, flush=True)
        messages.append({"role": "assistant", "content": "".join(reply).strip()})
    return messages
