"""`LLM`: the Python entry point. Load any supported checkpoint, generate text, chat.

    from plainlm import LLM
    llm = LLM.load("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct")   # or a .gguf file
    llm.generate("Hello", max_new_tokens=20, temperature=0.0)   # -> str
    logits = llm.model(input_ids)                                  # (batch, time, vocab)

`llm.model` is the plain `GPT` module and `llm.tokenizer` the `Tokenizer`: nothing is hidden.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plainlm.checkpoint import detect_format, load_checkpoint
from plainlm.convert.gguf import load_gguf_model
from plainlm.convert.hf import load_hf_model
from plainlm.device import resolve_device, resolve_dtype
from plainlm.errors import InvalidInput
from plainlm.generate import generate_tokens
from plainlm.kernel_layers import use_cpu_kernels
from plainlm.model import GPT
from plainlm.quantize import check_mode, quantize_model
from plainlm.sampling import SamplingParams, sampling_params
from plainlm.speculative import (
    DRAFT_KINDS,
    LOOKUP_FIRST,
    Draft,
    LookupFirstDraft,
    ModelDraft,
    SpeculativeStats,
    make_draft,
)
from plainlm.tokenizer import Tokenizer


@dataclass
class GenerationStats:
    """What the last generate / stream / chat call did, for the CLI's stats line.

    seconds: from the prompt going in to the last token coming out, compiling excluded.
    compile_seconds: compiling the decode step (compile=...), or loading it from inductor's cache: the first
    decode step's time less the second's (one step's own work), so a user sees what the compiled steps cost.
    draft: with speculative decoding, how many of the draft's tokens the model kept (speculative.py).
    """

    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    compile_seconds: float = 0.0
    draft: SpeculativeStats | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def add(self, other: GenerationStats) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.new_tokens += other.new_tokens
        self.seconds += other.seconds
        self.compile_seconds += other.compile_seconds
        if other.draft is not None:
            self.draft = self.draft or SpeculativeStats()
            self.draft.add(other.draft)

    def line(self) -> str:
        """`[200 tokens in 6.52 s: 30.7 tokens/s]`, and the compile time beside it when there was one."""
        tokens = f"{self.new_tokens} token{'' if self.new_tokens == 1 else 's'}"
        line = f"[{tokens} in {self.seconds:.2f} s: {self.tokens_per_second:.1f} tokens/s"
        if self.compile_seconds:
            line += f"; before them {self.compile_seconds:.1f} s compiling the decode step or loading it from the cache"
        if self.draft is not None:
            line += f"; {self.draft.line()}"
        return line + "]"


# Names of checkpoints tuned to follow chat turns: SmolLM2-135M-Instruct, Llama-2-7b-chat-hf, gemma-3-1b-it, ...
INSTRUCT_NAME = re.compile(r"instruct|chat|[-_]it\b|[-_]sft\b", re.IGNORECASE)


class LLM:
    def __init__(self, model: GPT, tokenizer: Tokenizer, name: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or model.config.name  # what the user calls it (see display_name)
        self.last_stats = GenerationStats()
        self._drafts: dict[str, Draft] = {}  # drafts made from a name or a path, kept for the next call

    @property
    def is_instruct(self) -> bool:
        """Whether the model is tuned to follow chat turns, so a raw prompt belongs in its chat template:
        it ships a chat template of its own, and its name says Instruct, Chat, -it or -sft."""
        names = f"{self.name} {self.model.config.name}"
        return self.tokenizer.chat_template_fallback is None and INSTRUCT_NAME.search(names) is not None

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        chat_template: str | None = None,
        quantize: str | None = None,
        cpu_kernels: bool = True,
    ) -> LLM:
        """A plainlm checkpoint directory, a Hugging Face model directory or a GGUF file (both converted
        in memory; a GGUF file's weights are dequantized).

        device: default "cuda" when available, else "cpu". dtype: default float32 on the CPU (exact;
        batch-1 bf16 decoding measured no faster on this project's AMX CPUs), bfloat16 on a GPU that has it.
        quantize: "int8", "int4", "nf4" or "fp4" quantizes the weights as they load (see quantize.py);
        a checkpoint saved quantized loads as it was saved, without this. cpu_kernels: swap in plainlm's CPU
        kernel layers when the model is on the CPU (false for a model loaded there on its way to a GPU).
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
            model = load_hf_model(path, device=device, dtype=dtype)
        else:
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
        tokenizer = Tokenizer(
            tokenizer_dir, chat_template, model_family=model.config.hf_model_type, model_name=model.config.name
        )
        llm = cls((use_cpu_kernels(model) if cpu_kernels else model).eval(), tokenizer, name=display_name(path))
        llm._tokenizer_files = temporary
        return llm

    # --- text in, text out ---
    def generate(self, prompt: str | list[str], params: SamplingParams | None = None, **kwargs: Any) -> str | list[str]:
        """Continue `prompt` (or each of a list of prompts, batched). Returns only the new text.

        params: how to sample and when to stop (default SamplingParams(): 100 new tokens, greedy); its fields
        also work as keywords (max_new_tokens=20, temperature=0.7, top_p=0.9, seed=1, ...). Other kwargs:
        chat (wrap the prompt in the model's chat template as a user turn), truncate_prompt (keep the end of a
        prompt longer than the context), compile (torch.compile the decode step: True, or "reduce-overhead"
        for less per-step overhead after a longer compile), draft (speculative decoding, the same tokens
        faster: "ngram", "int8", "int4", a checkpoint's path, another LLM; see `draft_for`) and draft_tokens
        (proposals checked per forward pass; default adaptive). With a draft, prompts run one after another.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = [[] for _ in prompts]
        # Rows decode together; with a draft, one after another (each then gets its own stats, summed here).
        rows = [range(len(prompts))] if kwargs.get("draft") is None else [range(i, i + 1) for i in range(len(prompts))]
        stats = GenerationStats()
        for group in rows:
            for step in self._steps([prompts[i] for i in group], params, **kwargs):
                for row, token in zip(group, step, strict=True):
                    if token is not None:
                        ids[row].append(token)
            stats.add(self.last_stats)
        self.last_stats = stats
        texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in ids]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, params: SamplingParams | None = None, **kwargs: Any) -> Iterator[str]:
        """Like `generate` for one prompt, yielding text pieces as they are decoded."""
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
        for step in self._steps([prompt], params, **kwargs):
            token = step[0]
            if token is None:
                break
            piece = decoder.push(token)
            if piece:
                yield piece
        rest = decoder.flush()
        if rest:
            yield rest

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None, **kwargs: Any) -> str:
        """The assistant's reply to a conversation (list of {"role", "content"}); at most 256 new tokens
        unless `params` or max_new_tokens= says otherwise."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(prompt, params or SamplingParams(max_new_tokens=256), templated=True, **kwargs)

    def encode_prompt(self, prompt: str, chat: bool = False, templated: bool = False) -> list[int]:
        if chat:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            templated = True
        # A rendered chat template writes its own BOS where the model wants one.
        return self.tokenizer.encode(prompt, bos=False if templated else None)

    def _steps(
        self,
        prompts: list[str],
        params: SamplingParams | None = None,
        chat: bool = False,
        templated: bool = False,
        truncate_prompt: bool = False,
        compile: bool | str = False,
        draft: Draft | LLM | GPT | str | Path | None = None,
        draft_tokens: int | None = None,
        **options: Any,
    ) -> Iterator[list[int | None]]:
        """generate_tokens' steps for these prompts, with a row's stop token already None: the row has ended."""
        params = sampling_params(params, **options)
        # The model's own end-of-sequence ids stop every request, besides the ones it names.
        params = dataclasses.replace(params, stop_ids=(*self.tokenizer.stop_ids, *params.stop_ids))
        stop = set(params.stop_ids)
        ids = [self.encode_prompt(p, chat=chat, templated=templated) for p in prompts]
        speculation = self.draft_for(draft) if draft is not None else None
        self.last_stats = stats = GenerationStats(prompt_tokens=sum(map(len, ids)))
        stamps = [time.perf_counter()]  # the start, then the time of each step
        steps = generate_tokens(
            self.model,
            ids,
            params,
            truncate_prompt=truncate_prompt,
            compile=compile,
            draft=speculation,
            draft_tokens=draft_tokens,
        )
        for step in steps:
            stamps.append(time.perf_counter())
            if compile and speculation is None and len(stamps) in (3, 4):  # the first decode step (1 -> 2) compiled
                one_step = stamps[3] - stamps[2] if len(stamps) == 4 else 0.0
                stats.compile_seconds = max(0.0, stamps[2] - stamps[1] - one_step)
            if speculation is not None:  # the draft timed its compiles itself: tokens arrive in runs
                stats.compile_seconds, stats.draft = speculation.stats.compile_seconds, speculation.stats
            stats.new_tokens += sum(t is not None for t in step)
            stats.seconds = stamps[-1] - stamps[0] - stats.compile_seconds
            yield [None if t in stop else t for t in step]

    def draft_for(self, draft: Draft | LLM | GPT | str | Path) -> Draft:
        """The speculative draft `draft` names (generate's draft=): "ngram" (prompt lookup), "int8" or "int4"
        (this model's own weights quantized, made once and kept), a checkpoint's path (loaded as LLM.load
        does, onto this model's device and dtype, once), "ngram+" before one of the last three (lookup where
        it finds a match, that model elsewhere), another LLM, a GPT, or a speculative.Draft.
        A draft model must share this model's tokens: its vocabulary, special tokens and the ids of a
        rendered chat turn must agree, or it is refused."""
        if isinstance(draft, (Draft, GPT)):
            return make_draft(self.model, draft)
        if isinstance(draft, LLM):
            check_same_tokens(self.tokenizer, draft.tokenizer, draft.name)
            return ModelDraft(draft.model)
        key = str(draft)
        if key not in self._drafts:
            if key.startswith(LOOKUP_FIRST):  # the model draft behind the lookup is the one its own name makes
                behind = self.draft_for(key.removeprefix(LOOKUP_FIRST))
                if not isinstance(behind, ModelDraft):
                    raise InvalidInput(
                        f"draft {key!r}: after {LOOKUP_FIRST!r} comes a model draft (int8, int4 or a checkpoint's "
                        "path), where n-gram lookup finds no match"
                    )
                self._drafts[key] = LookupFirstDraft(behind)
            elif key in DRAFT_KINDS:
                self._drafts[key] = make_draft(self.model, key)
            elif not Path(key).exists():
                raise InvalidInput(
                    f"draft {key!r} is neither {', '.join(DRAFT_KINDS)} nor an existing checkpoint: pass one of those "
                    "names, or the path of a smaller model that shares this one's tokenizer"
                )
            else:
                weights = self.model.embed.weight
                dtype = getattr(self.model.embed, "dtype", weights.dtype)
                loaded = LLM.load(key, device=weights.device, dtype=dtype)
                self._drafts[key] = self.draft_for(loaded)
        return self._drafts[key]


def check_same_tokens(tokenizer: Tokenizer, draft: Tokenizer, draft_name: str) -> None:
    """Refuse a draft whose tokenizer would give other ids than the model's: its proposals would be other
    tokens. What is compared is ids, not files: a conversation rendered by each one's chat template and
    encoded, and the special tokens' ids."""
    turn = [{"role": "user", "content": 'Rewrite: 3 apples, 12 pears ("fresh")! Done?'}]
    compared = [
        ("vocabulary size", tokenizer.vocab_size, draft.vocab_size),
        ("end-of-sequence ids", sorted(tokenizer.stop_ids), sorted(draft.stop_ids)),
        ("beginning-of-sequence id", tokenizer.bos_id, draft.bos_id),
        ("ids of a plain text", tokenizer.encode(turn[0]["content"]), draft.encode(turn[0]["content"])),
        (
            "ids of a chat turn in its chat template",
            tokenizer.encode(tokenizer.apply_chat_template(turn), bos=False),
            draft.encode(draft.apply_chat_template(turn), bos=False),
        ),
    ]
    for what, ours, theirs in compared:
        if ours != theirs:
            raise InvalidInput(
                f"the draft {draft_name} does not share the model's tokens: its {what} differ ({theirs} against "
                f"{ours}). A draft must come from the same tokenizer: a smaller model of the same family, or "
                "int8, int4 or ngram"
            )


def display_name(path: str | Path) -> str:
    """How a user names the model at `path`: its hub id where the path shows one (`plainlm download` writes
    checkpoints/ORG/NAME, the hub cache models--ORG--NAME/), else the directory's or the file's name. Not a
    GGUF file's general.name, which is often a training run's label ("Smollm2 135M 8k Lc100K Mix1 Ep2")."""
    path = Path(path).absolute()
    for part in path.parts:
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    if len(path.parts) >= 3 and path.parts[-3] == "checkpoints":
        return f"{path.parent.name}/{path.name}"
    if path.name == "final":  # a training run's output: name the run
        return f"{path.parent.name}/final"
    return path.name.removesuffix(".gguf")
