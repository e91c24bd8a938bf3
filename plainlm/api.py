"""`LLM`: the Python entry point. Load any supported checkpoint, generate text, chat.

    from plainlm import LLM
    llm = LLM.load("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct")   # or a .gguf file
    llm.generate("Hello", max_new_tokens=20, temperature=0.0)   # -> str
    logits = llm.model(input_ids)                                  # (batch, time, vocab)

`llm.model` is the plain `GPT` module and `llm.tokenizer` the `Tokenizer`: nothing is hidden.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plainlm.checkpoint import detect_format, load_checkpoint
from plainlm.device import resolve_device, resolve_dtype
from plainlm.errors import InvalidInput
from plainlm.generate import generate_tokens
from plainlm.kernel_layers import use_cpu_kernels
from plainlm.model import GPT
from plainlm.quantize import check_mode, quantize_model
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
        quantize: str | None = None,
    ) -> LLM:
        """A plainlm checkpoint directory, a Hugging Face model directory or a GGUF file (both converted
        in memory; a GGUF file's weights are dequantized).

        device: default "cuda" when available, else "cpu". dtype: default float32 on the CPU (exact;
        batch-1 bf16 decoding measured no faster on this project's AMX CPUs), bfloat16 on a GPU that has it.
        quantize: "int8", "int4" or "nf4" quantizes the weights as they load (see quantize.py);
        a checkpoint saved quantized loads as it was saved, without this.
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if quantize is not None:
            check_mode(quantize, None, device)  # fail before the weights load, not after
        kind = detect_format(path)
        tokenizer_dir, temporary = Path(path), None
        if kind == "plainlm":
            model = load_checkpoint(path, device=device, dtype=dtype)
        elif kind == "hf":
            from plainlm.convert.hf import load_hf_model

            model = load_hf_model(path, device=device, dtype=dtype)
        else:
            from plainlm.convert.gguf import load_gguf_model

            # The tokenizer files come from the GGUF metadata, written to a temporary directory that lives
            # as long as this LLM (Tokenizer.save copies from it).
            temporary = tempfile.TemporaryDirectory(prefix="plainlm-gguf-tokenizer-")
            tokenizer_dir = Path(temporary.name)
            model = load_gguf_model(path, device=device, dtype=dtype, tokenizer_dir=tokenizer_dir)
        saved = model.quantization
        if quantize is not None and saved is None:
            quantize_model(model, quantize)
        elif quantize is not None and saved["mode"] != quantize:
            raise InvalidInput(
                f"{path} is saved quantized as {saved['mode']}; load it without quantize={quantize!r}, "
                "or quantize the float checkpoint it came from"
            )
        tokenizer = Tokenizer(tokenizer_dir, chat_template=chat_template, model_family=model.config.hf_model_type)
        llm = cls(use_cpu_kernels(model).eval(), tokenizer)
        llm._tokenizer_files = temporary
        return llm

    # --- text in, text out ---
    def generate(self, prompt: str | list[str], max_new_tokens: int = 100, **kwargs: Any) -> str | list[str]:
        """Continue `prompt` (or each of a list of prompts, batched). Returns only the new text.

        kwargs: temperature (0 = greedy), top_k, top_p, seed, truncate_prompt, chat (wrap the
        prompt in the model's chat template as a user turn), compile (torch.compile the decode step:
        True, or "reduce-overhead" for less per-step overhead after a longer compile).
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
        compile: bool | str = False,
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
