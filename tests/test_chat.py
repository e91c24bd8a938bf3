"""`plainlm chat`'s loop: commands, Ctrl-C during a reply, the banner."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from plainlm import LLM
from plainlm.chat import COMMANDS, chat_loop


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def llm(tiny_hf_dir: Path) -> LLM:
    return LLM.load(tiny_hf_dir)


def test_help_lists_the_commands_and_never_reaches_the_model(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("/help went to the model")

    monkeypatch.setattr(llm, "stream", no_model)
    out = io.StringIO()
    messages = chat_loop(llm, stdin=io.StringIO("/help\n"), stdout=out)
    assert messages == []
    assert out.getvalue() == COMMANDS + "\n"
    assert all(command in COMMANDS for command in ("/help", "/reset", "/exit", "Ctrl-C"))


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """A KeyboardInterrupt from inside the token stream (where Ctrl-C lands while the model writes) ends that
    reply only: what it wrote stays in the conversation, and the next turn is answered."""
    stream, calls = llm.stream, []

    def interrupted_once(prompt: str, *args, **kwargs) -> Iterator[str]:
        calls.append(prompt)
        pieces = stream(prompt, *args, **kwargs)
        if len(calls) > 1:
            yield from pieces
            return
        yield next(pieces)
        pieces.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(llm, "stream", interrupted_once)
    out = io.StringIO()
    messages = chat_loop(llm, stdin=io.StringIO("hi there\nand again\n"), stdout=out, max_new_tokens=8)
    first_piece = stream(calls[0], max_new_tokens=8, templated=True).__next__()
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == first_piece.strip()
    assert messages[3]["content"]  # the turn after the interruption is answered
    assert "(stopped)" in out.getvalue().splitlines()[0]
    # The second prompt carries the interrupted reply: the conversation was kept.
    assert first_piece.strip() in calls[1]


def test_banner_names_the_model_and_its_chat_template(llm: LLM, tiny_hf_dir: Path) -> None:
    out = Terminal()
    chat_loop(llm, stdin=Terminal("/exit\n"), stdout=out)
    banner = out.getvalue().splitlines()[0]
    assert banner.startswith(f"Chatting with {tiny_hf_dir.name} in the model's own chat template. ")
    assert "/help" in banner
    fallback = LLM.load(tiny_hf_dir, chat_template="llama3")
    out = Terminal()
    chat_loop(fallback, stdin=Terminal("/exit\n"), stdout=out)
    assert "in plainlm's 'llama3' chat template" in out.getvalue()
