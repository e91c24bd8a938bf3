"""`plainlm <command>`: the table of commands (`COMMANDS`), one dispatch (`main`), and the small functions
of the commands that are not a module of their own; a function's parameters are its options, its docstring's
Args their help (read by plainlm/options.py). Each function imports what it runs inside itself, on use:
`plainlm --help` and a mistyped option answer at once, without importing torch.

plainlm download ORG/NAME
plainlm convert from-hf SRC_DIR DST_DIR
plainlm convert from-gguf FILE DST_DIR
plainlm convert to-hf SRC_DIR DST_DIR
plainlm convert to-gguf SRC_DIR FILE [--dtype f16|q8_0|f32|bf16]
plainlm generate --checkpoint_dir D --prompt "..." [--quantize int8|int4|nf4|fp4]
plainlm chat --checkpoint_dir D
plainlm finetune | pretrain --config RECIPE.yaml   (plainlm/finetune.py, plainlm/pretrain.py)
plainlm estimate --config RECIPE.yaml [--target GPU]   (plainlm/estimate.py)
plainlm serve MODEL [--port 8000] [--lora NAME=PATH ...]   (plainlm/serve/app.py)
plainlm evaluate MODEL --tasks T1,T2 [--include_path data/eval] | --perplexity FILE   (plainlm/evaluate.py)
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from plainlm.errors import InvalidInput, PlainlmError
from plainlm.gpus import GPUS

if TYPE_CHECKING:
    from plainlm.config import Config


def download(
    repo_id: str,
    checkpoint_dir: Path = Path("checkpoints"),
    revision: str | None = None,
    token: str | None = None,
    convert: bool = True,
) -> None:
    """Download a model from the Hugging Face hub and convert it to a plainlm checkpoint.

    Args:
        repo_id: The repository, e.g. HuggingFaceTB/SmolLM2-135M-Instruct.
        checkpoint_dir: Where the converted checkpoint goes (as checkpoint_dir/ORG/NAME).
        revision: A branch, tag or commit of the repository.
        token: A hub token for gated models (or set HF_TOKEN).
        convert: Convert to a plainlm checkpoint; without it the hub snapshot path is printed.
    """
    from plainlm.download import download as run

    print(run(repo_id, checkpoint_dir, revision=revision, token=token, convert=convert))


def convert_from_hf(src_dir: Path, dst_dir: Path, dtype: str | None = None) -> None:
    """Convert a Hugging Face model directory into a plainlm checkpoint.

    Args:
        src_dir: A directory with config.json and safetensors or .bin weights.
        dst_dir: The plainlm checkpoint directory to write.
        dtype: Store the weights in this dtype (float32, bfloat16, float16); default as they are. A GPTQ
            or AWQ model stays quantized without it (plainlm's int4 layers) and is dequantized with it.
    """
    from plainlm.convert.hf import convert_from_hf as run
    from plainlm.device import resolve_dtype

    print(run(src_dir, dst_dir, dtype=None if dtype is None else resolve_dtype(dtype, None)))


def convert_from_gguf(file: Path, dst_dir: Path, dtype: str | None = None) -> None:
    """Convert a GGUF file (llama.cpp) into a plainlm checkpoint, dequantizing its weights.

    Args:
        file: A .gguf file of a llama, qwen2, qwen2moe, qwen3, phi3, gemma2, gemma3, cohere2, exaone4, smollm3, olmo2
            (OLMo 2 and 3), granite, seed_oss, ernie4_5 or gpt-oss model.
        dst_dir: The plainlm checkpoint directory to write (weights, config.yaml, tokenizer files).
        dtype: Store the weights in this dtype (float32, bfloat16, float16); default float32.
    """
    from plainlm.convert.gguf import convert_from_gguf as run
    from plainlm.device import resolve_dtype

    print(run(file, dst_dir, dtype=None if dtype is None else resolve_dtype(dtype, None)))


def convert_to_hf(src_dir: Path, dst_dir: Path, max_shard_size_mb: int = 5000) -> None:
    """Convert a plainlm checkpoint into a directory that transformers' from_pretrained loads as it is.

    Args:
        src_dir: A plainlm checkpoint directory (config.yaml + model.safetensors).
        dst_dir: The Hugging Face model directory to write.
        max_shard_size_mb: Split the weights into shards of at most this size, with an index.
    """
    from plainlm.convert.hf import convert_to_hf as run

    print(run(src_dir, dst_dir, max_shard_bytes=max_shard_size_mb * 1024**2))


def convert_to_gguf(src_dir: Path, file: Path, dtype: str = "f16") -> None:
    """Convert a plainlm checkpoint into a GGUF file that llama.cpp (and transformers' gguf_file=) loads.

    Args:
        src_dir: A plainlm checkpoint of a llama, qwen2, qwen2moe, qwen3, phi3, gemma2, gemma3, cohere2, exaone4,
            smollm3, olmo2 (OLMo 2 and 3), granite, seed_oss or ernie4_5 model.
        file: The .gguf file to write: metadata, tokenizer and weights in llama.cpp's layout.
        dtype: The type of the 2-D weights: f16, q8_0 (8-bit blocks), f32 or bf16; norms and biases stay float32.
    """
    from plainlm.convert.gguf_export import convert_to_gguf as run

    print(run(src_dir, file, dtype=dtype))


def generate(
    checkpoint_dir: Path | None = None,
    prompt: str = "What food do llamas eat?",
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    chat: bool | Literal["auto"] = "auto",
    truncate_prompt: bool = False,
    compile: bool | str = False,
    draft: str | None = None,
    draft_tokens: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
) -> None:
    """Continue a prompt, streaming the text as it is generated.

    Args:
        checkpoint_dir: A plainlm checkpoint, a Hugging Face model directory or a .gguf file.
        prompt: The text to continue.
        max_new_tokens: Generate at most this many tokens.
        temperature: 0 is greedy decoding; higher samples more freely.
        top_k: Sample only among the k most likely tokens.
        top_p: Sample only within the smallest set of tokens whose probability reaches top_p.
        min_p: Sample only among tokens at least min_p times as likely as the most likely one.
        seed: Seed for sampling, for reproducible output.
        chat: Wrap the prompt in the model's chat template as a user turn. auto: when the model is an instruct
            model (its name says Instruct, Chat or -it, and it ships a chat template), which answers a raw prompt
            poorly or not at all; true or false: always or never.
        truncate_prompt: Keep the end of a prompt longer than the model's context instead of failing.
        compile: torch.compile the decode step: slow to start, faster per token. true, or
            reduce-overhead: faster still per token, minutes to compile the first time (cached after).
        draft: Speculative decoding, the same tokens sooner: ngram (copy from earlier in the text: good for
            rewriting and summaries), int8 or int4 (the model's own weights quantized, held beside them), or the
            path of a smaller model with the same tokenizer; ngram+int8 (or +int4, +PATH): lookup where it finds
            a match, that model elsewhere. The stats line says how many proposals were kept.
        draft_tokens: Draft tokens checked per forward pass (default: adaptive, 1 to 8).
        device: cpu, cuda, cuda:1, ... (default: cuda when available).
        dtype: float32, bfloat16 or float16 (default: float32 on the CPU, bfloat16 on a GPU).
        quantize: Quantize the weights as they load: int8 or int4 (CPU kernels), nf4 or fp4 (bitsandbytes).
    """
    from plainlm.api import LLM
    from plainlm.sampling import SamplingParams

    # Made first, so that a bad option fails before the model loads.
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed
    )
    _check_compile(compile)
    _check_draft(draft, draft_tokens)
    llm = LLM.load(_required(checkpoint_dir), device=device, dtype=dtype, quantize=quantize)
    if chat == "auto":
        chat = llm.is_instruct
        if chat:
            print(
                f"[{llm.name} is an instruct model: the prompt goes in its chat template; --chat false sends it raw]",
                file=sys.stderr,
            )
    options = dict(chat=chat, truncate_prompt=truncate_prompt, compile=compile, draft=draft, draft_tokens=draft_tokens)
    for piece in llm.stream(prompt, params, **options):
        print(piece, end="", flush=True)
    print(flush=True)
    print(llm.last_stats.line(), file=sys.stderr)


def chat(
    checkpoint_dir: Path | None = None,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    chat_template: str | None = None,
    compile: bool | str = False,
    draft: str | None = None,
    draft_tokens: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
) -> None:
    """Talk with a model, turn by turn, in its own chat template. Type /exit or press Ctrl-D to leave,
    /reset to forget the conversation.

    Args:
        checkpoint_dir: A plainlm checkpoint, a Hugging Face model directory or a .gguf file.
        system: A system message to start the conversation with.
        max_new_tokens: The longest reply, in tokens.
        temperature: 0 is greedy decoding; higher samples more freely.
        top_k: Sample only among the k most likely tokens.
        top_p: Sample only within the smallest set of tokens whose probability reaches top_p.
        min_p: Sample only among tokens at least min_p times as likely as the most likely one.
        seed: Seed for sampling, for reproducible output.
        chat_template: A named template (chatml, llama2, llama3, gemma, phi3, plain) for models without one.
        compile: torch.compile the decode step, as for generate (true or reduce-overhead).
        draft: Speculative decoding, the same tokens sooner: ngram (copy from earlier in the text: good for
            rewriting and summaries), int8 or int4 (the model's own weights quantized, held beside them), or the
            path of a smaller model with the same tokenizer; ngram+int8 (or +int4, +PATH): lookup where it finds
            a match, that model elsewhere. The stats line says how many proposals were kept.
        draft_tokens: Draft tokens checked per forward pass (default: adaptive, 1 to 8).
        device: cpu, cuda, cuda:1, ... (default: cuda when available).
        dtype: float32, bfloat16 or float16 (default: float32 on the CPU, bfloat16 on a GPU).
        quantize: Quantize the weights as they load: int8 or int4 (CPU kernels), nf4 or fp4 (bitsandbytes).
    """
    from plainlm.api import LLM
    from plainlm.chat import chat_loop
    from plainlm.sampling import SamplingParams

    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed
    )
    _check_compile(compile)
    _check_draft(draft, draft_tokens)
    llm = LLM.load(
        _required(checkpoint_dir), device=device, dtype=dtype, chat_template=chat_template, quantize=quantize
    )
    chat_loop(llm, params, system=system, compile=compile, draft=draft, draft_tokens=draft_tokens)


def _check_compile(compile: bool | str) -> None:
    from plainlm.compiled_step import check_compile

    check_compile(compile)  # a bad mode fails before the model loads
    if compile:  # the first new token waits on the compiler: say why nothing appears for a while
        print("[compiling the decode step: up to a few minutes the first time, cached for later runs]", file=sys.stderr)


def _check_draft(draft: str | None, draft_tokens: int | None) -> None:
    """A draft the model could never use fails before the model loads."""
    from plainlm.speculative import DRAFT_KINDS, LOOKUP_FIRST, check_draft_tokens

    check_draft_tokens(draft_tokens, has_draft=draft is not None)
    if draft is not None and draft not in DRAFT_KINDS and not Path(draft.removeprefix(LOOKUP_FIRST)).exists():
        raise InvalidInput(
            f"--draft {draft}: no such file or directory, and not one of {', '.join(DRAFT_KINDS)}: pass one of "
            f"those, or the path of a smaller model that shares this one's tokenizer (after {LOOKUP_FIRST!r} or not)"
        )


def _required(checkpoint_dir: Path | None) -> Path:
    if checkpoint_dir is None:
        raise InvalidInput(
            "pass --checkpoint_dir: a plainlm checkpoint, a Hugging Face model directory or a .gguf file"
        )
    return checkpoint_dir


def merge_lora(checkpoint_dir: Path, adapter_dir: Path, out_dir: Path) -> None:
    """Fold a LoRA or DoRA adapter (PEFT layout) into its base model and write a plain plainlm checkpoint.

    Args:
        checkpoint_dir: The base model: a plainlm checkpoint, a Hugging Face model directory or a .gguf file.
        adapter_dir: The adapter: adapter_config.json + adapter_model.safetensors (ours or peft's).
        out_dir: The merged checkpoint to write.
    """
    from plainlm.api import LLM
    from plainlm.checkpoint import check_output_path, save_checkpoint
    from plainlm.lora import load_peft_adapter
    from plainlm.lora import merge_lora as merge

    check_output_path(out_dir, "out_dir")  # before the model loads
    llm = LLM.load(checkpoint_dir)
    load_peft_adapter(llm.model, adapter_dir)
    save_checkpoint(merge(llm.model), out_dir)
    llm.tokenizer.save(out_dir)
    print(out_dir)


def serve(
    model: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    api_key: str | None = None,
    lora: list[str] | None = None,
    max_batch_size: int = 16,
    max_seq_length: int | None = None,
    kv_cache_gb: float | None = None,
    draft: str | None = None,
    draft_tokens: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models),
    many requests batched at once, with a chat page at /. Stop it with Ctrl-C or SIGTERM.

    Args:
        model: A plainlm checkpoint, a Hugging Face model directory or a .gguf file.
        host: The address to listen on: 127.0.0.1 answers this machine only; 0.0.0.0 every network (set --api_key).
        port: The port to listen on (0: any free one; the address line says which).
        served_model_name: The name requests put in "model" (default: the model's name, as GET /v1/models shows).
        api_key: Require "Authorization: Bearer KEY" on every request but /health and the chat page
            (default: the PLAINLM_API_KEY environment variable, which keeps the key out of the process list).
        lora: A LoRA adapter (PEFT layout) to serve as NAME=PATH; a request picks it with "model": NAME.
            Repeat --lora for more adapters.
        max_batch_size: The most requests decoded together in one step.
        max_seq_length: The longest prompt plus completion of a request (default: the model's context).
        kv_cache_gb: The KV cache's size in GB (default: what fits the machine, printed at start).
        draft: Speculative decoding for a request alone on the server (lower latency, the same tokens): ngram,
            int8, int4, a smaller model's path or ngram+ one of those, as for generate. Several requests at once
            decode as without. /health and each response's usage.completion_tokens_details say how many
            proposals were kept.
        draft_tokens: Draft tokens checked per forward pass (default: adaptive, 1 to 8).
        device: cpu, cuda, cuda:1, ... (default: cuda when available).
        dtype: float32, bfloat16 or float16 (default: float32 on the CPU, bfloat16 on a GPU).
        quantize: Quantize the weights as they load: int8 or int4 (CPU kernels), nf4 or fp4 (bitsandbytes).
    """
    # Before torch loads OpenMP: its idle threads sleep instead of spinning, which on a CPU server would take
    # the cores the engine's and the HTTP loop's Python threads need (int4 SmolLM2 on 2 cores, 16 clients:
    # 135 against 118 tokens/s, docs/benchmarks.md). Set OMP_WAIT_POLICY yourself to choose otherwise.
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from plainlm.api import LLM
    from plainlm.serve.adapters import AdapterSet
    from plainlm.serve.app import bind, create_app, run_server
    from plainlm.serve.engine import Engine
    from plainlm.serve.structured import StructuredOutput

    adapters_to_load = _lora_options(lora or [])
    _check_draft(draft, draft_tokens)
    sock = bind(host, port)  # a port in use fails now, not after the model has loaded
    llm = LLM.load(model, device=device, dtype=dtype, quantize=quantize)
    speculation = llm.draft_for(draft) if draft is not None else None  # before the AdapterSet wraps the layers
    try:
        structured = StructuredOutput(llm.tokenizer, llm.model.config.vocab_size)
    except InvalidInput as e:  # a tokenizer without an end-of-sequence token: serve, but refuse response_format
        structured = None
        print(f"[response_format is off: {e}]", file=sys.stderr)
    engine = Engine(
        llm,
        max_batch_size=max_batch_size,
        max_seq_length=max_seq_length,
        kv_cache_gb=kv_cache_gb,
        adapters=AdapterSet(llm.model),
        structured=structured,
        draft=speculation,
        draft_tokens=draft_tokens,
    )
    for name, path in adapters_to_load.items():
        engine.load_adapter(name, str(path))
    print(engine.describe(), flush=True)
    api_key = api_key or os.environ.get("PLAINLM_API_KEY") or None
    run_server(create_app(engine, served_model_name=served_model_name or llm.name, api_key=api_key), sock)


def _lora_options(options: list[str]) -> dict[str, Path]:
    """--lora NAME=PATH options as {name: path}; a malformed or repeated name fails before the model loads."""
    adapters: dict[str, Path] = {}
    for option in options:
        name, sep, path = option.partition("=")
        if not sep or not name or not path:
            raise InvalidInput(f"--lora {option}: write it as NAME=PATH, e.g. --lora sql=out/sql-lora/final")
        if name in adapters:
            raise InvalidInput(f"--lora {option}: the name {name!r} is given twice; each adapter needs its own")
        adapters[name] = Path(path)
    return adapters


def models(filter: str | None = None) -> None:
    """List the named configs: name, family, size (parameters, counted on the meta device) and hub id.

    Args:
        filter: Only models whose name, family or hub id contains this text, in any case (plainlm models qwen).
    """
    from plainlm.named_configs import NAMED_CONFIGS

    wanted = (filter or "").lower()
    rows = [
        (name, c.hf_model_type, _short_count(_parameter_count(c)), c.hf_repo or "")
        for name, c in NAMED_CONFIGS.items()
        if wanted in f"{name} {c.hf_model_type} {c.hf_repo or ''}".lower()
    ]
    if not rows:
        raise InvalidInput(f"no named config matches {filter!r}; plainlm models lists them all")
    rows.insert(0, ("name", "family", "size", "hub id"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for name, family, size, hub in rows:
        print(f"{name:<{widths[0]}}  {family:<{widths[1]}}  {size:>{widths[2]}}  {hub}")


def _parameter_count(config: Config) -> int:
    """The parameters of `config`'s model, counted on the meta device (no memory, no weights).

    A block's shapes depend on its index only through whether it has experts (Config.is_moe; tests/test_cli.py
    checks this against whole models), so a model without blocks and one of each kind give the count quickly.
    """

    def blocks(n_layer: int, dense: list[int]) -> int:
        return _meta_count(dataclasses.replace(config, n_layer=n_layer, moe_dense_layers=dense, nope_layers=[]))

    rest = blocks(0, [])
    dense, moe = blocks(1, [0]) - rest, blocks(1, []) - rest
    return rest + sum(moe if config.is_moe(i) else dense for i in range(config.n_layer))


def _meta_count(config: Config) -> int:
    import torch

    from plainlm.model import GPT

    # The count does not depend on the context length where positions are RoPE (no learned table), and
    # the cos/sin tables of 128k positions would take most of the time: build with a short one.
    if config.position_embedding == "rope":
        config = dataclasses.replace(config, block_size=256)
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(config).parameters())  # parameters() yields a tied weight once


def _short_count(n: int) -> str:
    """135M, 1.2B, 70B: as model names write sizes."""
    if n < 999_500_000:
        return f"{n / 10**6:.0f}M"
    return f"{n / 10**9:.1f}B" if n < 9_950_000_000 else f"{n / 10**9:.0f}B"


# --- the commands: one table, one dispatch ---
@dataclass(frozen=True)
class Command:
    """A `plainlm` command: its line in `plainlm --help`, and the function that runs it, named as
    module:function so that only the command that runs is imported (`plainlm --help` imports no torch).
    The function's parameters are the options, its docstring's Args their help."""

    summary: str
    function: str
    positional: str | None = None  # an optional parameter also given without its --name: plainlm models [FILTER]
    repeatable: tuple[str, ...] = ()  # list options given once per value: --lora a=x --lora b=y


COMMANDS = {
    "download": Command("Download a model from the Hugging Face hub and convert it", "plainlm.cli:download"),
    "convert from-hf": Command("Hugging Face model directory -> plainlm checkpoint", "plainlm.cli:convert_from_hf"),
    "convert from-gguf": Command("GGUF file (llama.cpp) -> plainlm checkpoint", "plainlm.cli:convert_from_gguf"),
    "convert to-hf": Command("plainlm checkpoint -> Hugging Face model directory", "plainlm.cli:convert_to_hf"),
    "convert to-gguf": Command("plainlm checkpoint -> GGUF file (f16, q8_0, f32, bf16)", "plainlm.cli:convert_to_gguf"),
    "generate": Command("Continue a prompt, streaming the text", "plainlm.cli:generate"),
    "chat": Command("Talk with a model in its chat template", "plainlm.cli:chat"),
    "finetune": Command("Finetune a model (full, lora, dora, qlora) from a recipe", "plainlm.finetune:finetune"),
    "pretrain": Command("Pretrain a model on a folder of text from a recipe", "plainlm.pretrain:pretrain"),
    "quantize": Command(
        "Quantize a model to 4 bits (GPTQ, AWQ, round-to-nearest) as a Hugging Face directory", "plainlm.gptq:quantize"
    ),
    "merge-lora": Command("Fold a LoRA or DoRA adapter into its base model", "plainlm.cli:merge_lora"),
    "serve": Command(
        "Serve a model over an OpenAI-compatible HTTP API, with a chat page", "plainlm.cli:serve", repeatable=("lora",)
    ),
    "models": Command("List the named configs: name, family, size, hub id", "plainlm.cli:models", "filter"),
    "evaluate": Command(
        "Score a model on lm-evaluation-harness tasks, or the perplexity of a file", "plainlm.evaluate:evaluate"
    ),
    "estimate": Command(
        "Memory per device of a finetune or pretrain recipe, without loading weights",
        "plainlm.estimate:estimate_command",
    ),
}
HELP = ("-h", "--help")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["--version"]:
            from plainlm import __version__

            print(f"plainlm {__version__}")
            return
        name, args = _find_command(argv)
        if name is None:
            print(_overview(argv[0] if argv and argv[0] not in HELP else None))
            return
        result = _run(name, args)
        if isinstance(result, str):
            print(result)
    except PlainlmError as e:
        # Bad input ends in one clear line, not a traceback from deep inside a library.
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except BrokenPipeError:  # the reader stopped reading (plainlm models | head): nothing went wrong here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        raise SystemExit(0) from None


def _find_command(argv: list[str]) -> tuple[str | None, list[str]]:
    """The command named by argv's first words and the arguments after it; None for `plainlm [--help]`
    and for a group asked for its help (`plainlm convert`)."""
    if not argv or argv[0] in HELP:
        return None, []
    for words in (2, 1):
        name = " ".join(argv[:words])
        if name in COMMANDS:
            return name, argv[words:]
    group = [n for n in COMMANDS if n.startswith(argv[0] + " ")]
    if group and (len(argv) == 1 or argv[1] in HELP):
        return None, []
    given = " ".join(argv[:2]) if group else argv[0]
    names = {n.split()[0] for n in COMMANDS} | set(COMMANDS)  # `plainlm conver` -> convert, not one subcommand
    close = difflib.get_close_matches(given, sorted(names), n=1, cutoff=0.6)
    hint = f"did you mean 'plainlm {close[0]}'?" if close else "see plainlm --help for the commands"
    raise InvalidInput(f"'plainlm {given}' is not a command; {hint}")


def _overview(group: str | None) -> str:
    names = [n for n in COMMANDS if group is None or n.startswith(group + " ")]
    width = max(len(n) for n in names) + 2
    lines = [f"  {n:<{width}}{COMMANDS[n].summary}" for n in names]
    usage = f"plainlm {group} <command>" if group else "plainlm <command> [options]"
    footer = ["", "plainlm <command> --help: its options", "plainlm --version: the installed version"]
    return "\n".join([f"usage: {usage}", "", "commands:", *lines, *footer])


def _run(name: str, argv: list[str]) -> object:
    """Parse `argv` for command `name` and run it. Training commands (a `recipe` parameter) also read
    options from a YAML recipe given as --config; `estimate` reads a recipe of either training command."""
    from plainlm.options import arguments
    from plainlm.recipe import run_recipe_command

    command, function = COMMANDS[name], _function(name)
    if name == "estimate":
        if any(a in HELP for a in argv) and not any(a.split("=")[0] == "--config" for a in argv):
            return _estimate_help()
        return function(argv)
    if command.positional and argv and not argv[0].startswith("-"):
        argv = [f"--{command.positional}", *argv]
    for option in command.repeatable:  # jsonargparse appends to a list option written as --name+
        argv = [re.sub(rf"^--{option}(?==|$)", f"--{option}+", a) for a in argv]
    if "recipe" in inspect.signature(function).parameters:
        return run_recipe_command(function, f"plainlm {name}", argv, description=command.summary)
    parser = command_parser(name)
    return function(**arguments(parser, parser.parse_args(argv)))


def command_parser(name: str) -> Any:
    """The options of command `name` (its --help): the function's parameters, a recipe file for training commands."""
    from plainlm.options import parser_for
    from plainlm.recipe import parser_for as recipe_parser_for

    function, prog, summary = _function(name), f"plainlm {name}", COMMANDS[name].summary
    if "recipe" in inspect.signature(function).parameters:
        return recipe_parser_for(function, prog, summary)
    return parser_for(function, prog, summary, positional=True)


def _function(name: str) -> Any:
    module, function = COMMANDS[name].function.split(":")
    return getattr(importlib.import_module(module), function)


def _estimate_help() -> str:
    return "\n".join(
        [
            "usage: plainlm estimate --config RECIPE.yaml [--target GPU] [--KEY VALUE ...]",
            "",
            COMMANDS["estimate"].summary + ":",
            "the peak per device, what makes it up, whether it fits the device the run will use,",
            "and what to change when it does not.",
            "",
            "options:",
            "  --config RECIPE.yaml  a finetune recipe (with checkpoint_dir) or a pretrain recipe (with tokenizer_dir)",
            "  --target GPU          plan for that card without having it (CUDA, bf16 where the recipe says auto,",
            f"                        its memory): {', '.join(GPUS)}",
            "  --devices N           processes (one per GPU), as the run takes it",
            "  --KEY VALUE           any option of that recipe's command overrides the recipe, as it would the run:",
            "                        plainlm finetune --help, plainlm pretrain --help (or --config RECIPE.yaml --help)",
        ]
    )


if __name__ == "__main__":
    main()
