"""`LLM`: the Python entry point. Load any supported checkpoint, generate text, chat.

    from plainlm import LLM
    llm = LLM.load("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct")
    llm.generate("Hello", max_new_tokens=20, temperature=0.0)   # -> str
    logits = llm.model(input_ids)                                  # (batch, time, vocab)

`llm.model` is the plain `GPT` module and `llm.tokenizer` the `Tokenizer`: nothing is hidden.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plainlm.checkpoint import CheckpointError, detect_format, load_checkpoint
from plainlm.generate import generate_tokens
from plainlm.model import GPT
from plainlm.tokenizer import Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


class LLM:
    def __init__(self, model: GPT, tokenizer: Tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.last_stats = GenerationStats()

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        chat_template: str | None = None,
    ) -> LLM:
        """A plainlm checkpoint directory or a Hugging Face model directory (converted in memory).

        device: default "cuda" when available, else "cpu". dtype: default float32 on the CPU
        (no native bf16 there), bfloat16 on a GPU that supports it.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = resolve_dtype(dtype, device)
        kind = detect_format(path)
        if kind == "plainlm":
            model = load_checkpoint(path, device=device, dtype=dtype)
        elif kind == "hf":
            from plainlm.convert.hf import load_hf_model

            model = load_hf_model(path, device=device, dtype=dtype)
        else:
            raise CheckpointError(f"{path}: GGUF files cannot be loaded yet; convert the model to safetensors first")
        tokenizer = Tokenizer(path, chat_template=chat_template, model_family=model.config.hf_model_type)
        return cls(model.eval(), tokenizer)

    # --- text in, text out ---
    def generate(self, prompt: str | list[str], max_new_tokens: int = 100, **kwargs: Any) -> str | list[str]:
        """Continue `prompt` (or each of a list of prompts, batched). Returns only the new text.

        kwargs: temperature (0 = greedy), top_k, top_p, seed, truncate_prompt, chat (wrap the
        prompt in the model's chat template as a user turn), compile (torch.compile the decode step).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = [[] for _ in prompts]
        for step in self._steps(prompts, max_new_tokens, **kwargs):
            for row, token in enumerate(step):
                if token is not None and token not in self.tokenizer.stop_ids:
                    ids[row].append(token)
        texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in ids]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, max_new_tokens: int = 100, **kwargs: Any) -> Iterator[str]:
        """Like `generate` for one prompt, yielding text pieces as they are decoded."""
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
        for step in self._steps([prompt], max_new_tokens, **kwargs):
            token = step[0]
            if token is None or token in self.tokenizer.stop_ids:
                break
            piece = decoder.push(token)
            if piece:
                yield piece
        rest = decoder.flush()
        if rest:
            yield rest

    def chat(self, messages: list[dict[str, str]], max_new_tokens: int = 256, **kwargs: Any) -> str:
        """The assistant's reply to a conversation (list of {"role", "content"})."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(prompt, max_new_tokens, templated=True, **kwargs)

    def encode_prompt(self, prompt: str, chat: bool = False, templated: bool = False) -> list[int]:
        if chat:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            templated = True
        # A rendered chat template writes its own BOS where the model wants one.
        return self.tokenizer.encode(prompt, bos=False if templated else None)

    def _steps(
        self,
        prompts: list[str],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        truncate_prompt: bool = False,
        chat: bool = False,
        templated: bool = False,
        compile: bool = False,
    ) -> Iterator[list[int | None]]:
        ids = [self.encode_prompt(p, chat=chat, templated=templated) for p in prompts]
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.model.embed.weight.device).manual_seed(seed)
        self.last_stats = stats = GenerationStats(prompt_tokens=sum(map(len, ids)))
        start = time.perf_counter()
        for step in generate_tokens(
            self.model,
            ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_ids=self.tokenizer.stop_ids,
            generator=generator,
            truncate_prompt=truncate_prompt,
            compile=compile,
        ):
            stats.new_tokens += sum(t is not None for t in step)
            stats.seconds = time.perf_counter() - start
            yield step


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]
