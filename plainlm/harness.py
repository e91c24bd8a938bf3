"""lm-evaluation-harness's model interface over plainlm's own model: `PlainlmLM`, registered as "plainlm".

    import lm_eval, plainlm.harness
    lm_eval.simple_evaluate(model="plainlm", model_args="pretrained=out/final", tasks=["plainlm_mc"])
    lm_eval.simple_evaluate(model=PlainlmLM(LLM.load(path, quantize="int8")), tasks=[...])
    python -m plainlm.harness --model plainlm --model_args pretrained=DIR --tasks ...   # lm_eval's own CLI

`plainlm evaluate` (evaluate.py) is the command around it. A task's requests are tokenized as lm-eval's
Hugging Face backend (`HFLM`) tokenizes them, so both score the same tokens: lm-eval's TemplateLM splits a
context from its continuation (trailing spaces move to the continuation; the pair is encoded whole and
cut where the context alone ends; an empty context is the BOS, or EOS, token), and `tok_encode` adds
special tokens as HFLM does (what the tokenizer adds by itself unless `add_bos_token` says otherwise, never
before a text that already starts with the BOS).

loglikelihood: every request is (context + continuation) cut to the model's context as HFLM cuts it. The
part before the continuation's inputs is a prefix; requests with the same prefix (a multiple-choice
question's choices) compute it once, packed with their continuations into one row (scoring.py), and only the
continuations' positions go through the vocabulary projection. loglikelihood_rolling: a
document in lm-eval's disjoint windows of the model's context, each scored as above. generate_until: the
serving engine (serve/engine.py) runs the requests with continuous batching, each with its stop strings
and max_gen_toks; greedy unless the task samples.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from lm_eval import utils as lm_eval_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from plainlm.api import LLM
from plainlm.checkpoint import CONFIG_FILE
from plainlm.errors import InvalidInput
from plainlm.sampling import SamplingParams
from plainlm.scoring import loglikelihoods

DEFAULT_MAX_GEN_TOKS = 256  # HFLM's, for generation requests that name none


def resolve_checkpoint(path: str | Path) -> Path:
    """A model path as LLM.load takes it; a finetune run's output directory means its final/ checkpoint."""
    path = Path(path)
    is_model = (path / CONFIG_FILE).exists() or (path / "config.json").exists()
    return path / "final" if (path / "final").is_dir() and not is_model else path


@register_model("plainlm")
class PlainlmLM(TemplateLM):
    """lm-eval's model API over a plainlm LLM (see the module docstring)."""

    def __init__(
        self,
        pretrained: str | Path | LLM,
        batch_size: int | str = "auto",
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        quantize: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        **unused: Any,
    ) -> None:
        """pretrained: an LLM, or anything LLM.load takes (a finetune run's directory: its final/).
        batch_size: requests scored in one pass (loglikelihood) and decoding together (generation); "auto"
        fills each loglikelihood pass to scoring.AUTO_TOKENS_PER_FORWARD tokens. max_length: the context in tokens
        (default the model's). add_bos_token, prefix_token_id: as lm-eval's hf model takes them.
        quantize, device, dtype: as LLM.load takes them (ignored for an LLM)."""
        super().__init__()
        if isinstance(pretrained, LLM):
            self.llm = pretrained
        else:
            if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's command line passes --device cuda:0 unless told otherwise; as its hf model does, use
                # what this machine has.
                print(f"plainlm model: no CUDA device here, so not {device}: running on the CPU", file=sys.stderr)
                device = None
            self.llm = LLM.load(resolve_checkpoint(pretrained), device=device, dtype=dtype, quantize=quantize)
        self.model, self.tokenizer = self.llm.model, self.llm.tokenizer
        batch_size = str(batch_size)
        if batch_size.startswith("auto"):  # lm-eval also passes "auto:N" (re-detect N times): one rule here
            self.batch_size: int | None = None
        elif batch_size.isdigit() and int(batch_size) >= 1:
            self.batch_size = int(batch_size)
        else:
            raise InvalidInput(f"batch_size {batch_size!r}: give a whole number of at least 1, or auto")
        self._max_length = max_length or self.model.config.block_size
        if not 1 < self._max_length <= self.model.config.block_size:
            raise InvalidInput(f"max_length {max_length} must be in [2, {self.model.config.block_size}]")
        self._max_gen_toks = max_gen_toks
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.truncated = 0  # requests cut on the left to fit the context, as HFLM cuts them (evaluate.py reports it)
        self._device = self.model.embed.weight.device
        if unused:  # lm-eval passes the CLI's max_batch_size and device to every model; say what is ignored
            ignored = ", ".join(f"{k}={v}" for k, v in unused.items() if v is not None and k != "max_batch_size")
            if ignored:
                print(f"plainlm model: ignoring {ignored}", file=sys.stderr)

    # --- what lm-eval asks of a model ---
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is: the BOS, or EOS where there is none (as HFLM)."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.llm.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """HFLM's rule: add_special_tokens, else add_bos_token, else the tokenizer's own default; never
        before a text that starts with the prefix token's text."""
        special = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if add_special_tokens is None and string.startswith(self.tokenizer.decode([self.prefix_token_id])):
            special = False
        return self.tokenizer.encode(string, bos=False if special is False else None)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- loglikelihood ---
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        **unused: Any,
    ) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding gives it) for each
        (strings, context tokens, continuation tokens), in the requests' order (scoring.py computes them)."""
        pairs = [(context, continuation) for _, context, continuation in requests]
        self.truncated += sum(len(c) + len(t) > self.max_length + 1 for c, t in pairs)
        answers = loglikelihoods(self.model, pairs, self.max_length, self.batch_size, progress=not disable_tqdm)
        for (strings, _, _), answer in zip(requests, answers, strict=True):
            if strings is not None:  # rolling windows have none: lm-eval caches whole documents
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Each document's whole log-likelihood: lm-eval's disjoint windows of the model's context, the first
        after the prefix token, each later one with as much of the text before it as fits."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            (text,) = request.args
            rolling = lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(lm_eval_utils.make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --- generation ---
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation until one of its stop strings (cut before it) or max_gen_toks tokens,
        HFLM's way: the context cut on the left to max_length - max_gen_toks tokens."""
        from plainlm.serve.engine import Engine, Request  # the engine's own imports, deferred to generation

        engine_requests = []
        for request in requests:
            context, gen_kwargs = request.args
            options = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(options.pop("until", None), eos=self.tok_decode([self.eot_token_id], False))
            max_gen_toks = options.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise InvalidInput(f"max_gen_toks {max_gen_toks} leaves no room in the context of {self.max_length}")
            prompt = self.tok_encode(context)[-(self.max_length - max_gen_toks) :]
            params = SamplingParams(
                max_new_tokens=max_gen_toks,
                temperature=float(options.get("temperature", 0.0)) if options.get("do_sample") else 0.0,
                top_p=options.get("top_p"),
                top_k=options.get("top_k") or None,
            )
            engine_requests.append(Request(prompt=prompt, params=params, stop=tuple(s for s in until if s)))
        engine = Engine(self.llm, max_batch_size=self.batch_size or 16, max_seq_length=self.max_length)
        texts: dict[int, str] = {}
        ids: list[int] = []
        with tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until requests") as progress:
            for event in engine.stream(engine_requests, ids):
                texts[event.request_id] = texts.get(event.request_id, "") + event.text
                if event.finish_reason is not None:
                    if event.finish_reason == "error":
                        raise RuntimeError(f"generation failed: {event.error}")
                    progress.update(1)
        answers = [texts.get(request_id, "") for request_id in ids]
        for request, text in zip(requests, answers, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return answers


if __name__ == "__main__":  # lm_eval's own command line, with this model registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
