"""The request bodies the server accepts (pydantic models), checked as OpenAI and vLLM check them.

Types are strict (a string where a number belongs is refused, not converted) and ranges are OpenAI's:
a body that fails here gets a 400 naming the field (app.py replaces FastAPI's 422). Fields OpenAI
clients send that plainlm does not use (`user`, `presence_penalty`, ...) are ignored, as vLLM does.
The responses are plain dicts, built where they are sent (app.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_CHOICES = 16  # n: each choice is one engine request, and one call should not fill the whole batch
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat's top_logprobs; vLLM's default for both APIs


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Body):
    include_usage: bool = False


class SamplingFields(Body):
    """What chat and text completions share: the model, sampling, stopping, several choices, streaming."""

    model: str | None = None  # None: the base model (vLLM's default; OpenAI's clients always send one)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)  # None: OpenAI's default, 1; 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extra; -1 and 0 mean every token, as there
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None  # {"type": "json_object"} or {"type": "json_schema", ...}


class TextPart(Body):
    """One part of a message's content given as a list (newer OpenAI clients); only text is understood."""

    type: Literal["text"]
    text: str


class Message(BaseModel):
    # Not strict about extra keys: tool_calls, name, ... reach the chat template as they came.
    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: str | list[TextPart] | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: content as one string."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        return message


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(SamplingFields):
    # A text, token ids, or a batch of either (lm-eval sends a batch of token-id lists).
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class TokenizeRequest(Body):
    """vLLM's /tokenize: a text, or chat messages rendered with the model's template first."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[int]


class LoadLoraRequest(Body):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(Body):
    lora_name: str = Field(min_length=1)
