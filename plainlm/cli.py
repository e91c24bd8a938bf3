"""`plainlm <command>`: one small function per command; their docstrings are the help text.

plainlm download ORG/NAME
plainlm convert from-hf SRC_DIR DST_DIR
plainlm convert from-gguf FILE DST_DIR
plainlm convert to-hf SRC_DIR DST_DIR
plainlm convert to-gguf SRC_DIR FILE [--dtype f16|q8_0|f32|bf16]
plainlm generate --checkpoint_dir D --prompt "..." [--quantize int8|int4|nf4]
plainlm chat --checkpoint_dir D
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from plainlm.errors import InvalidInput, PlainlmError


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
        dtype: Store the weights in this dtype (float32, bfloat16, float16); default as they are.
    """
    from plainlm.api import resolve_dtype
    from plainlm.convert.hf import convert_from_hf as run

    print(run(src_dir, dst_dir, dtype=None if dtype is None else resolve_dtype(dtype, None)))


def convert_from_gguf(file: Path, dst_dir: Path, dtype: str | None = None) -> None:
    """Convert a GGUF file (llama.cpp) into a plainlm checkpoint, dequantizing its weights.

    Args:
        file: A .gguf file of a llama, qwen2, qwen3, phi3, gemma2 or gemma3 model.
        dst_dir: The plainlm checkpoint directory to write (weights, config.yaml, tokenizer files).
        dtype: Store the weights in this dtype (float32, bfloat16, float16); default float32.
    """
    from plainlm.api import resolve_dtype
    from plainlm.convert.gguf import convert_from_gguf as run

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
        src_dir: A plainlm checkpoint directory of a llama, qwen2, qwen3, phi3, gemma2 or gemma3 model.
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
        device: cpu, cuda, cuda:1, ... (default: cuda when available).
        dtype: float32, bfloat16 or float16 (default: float32 on the CPU, bfloat16 on a GPU).
        quantize: Quantize the weights as they load: int8 or int4 (CPU kernels) or nf4 (bitsandbytes).
    """
    from plainlm.api import LLM
    from plainlm.sampling import SamplingParams

    # Made first, so that a bad option fails before the model loads.
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed
    )
    _check_compile(compile)
    llm = LLM.load(_required(checkpoint_dir), device=device, dtype=dtype, quantize=quantize)
    if chat == "auto":
        chat = llm.is_instruct
        if chat:
            print(
                f"[{llm.name} is an instruct model: the prompt goes in its chat template; --chat false sends it raw]",
                file=sys.stderr,
            )
    for piece in llm.stream(prompt, params, chat=chat, truncate_prompt=truncate_prompt, compile=compile):
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
        device: cpu, cuda, cuda:1, ... (default: cuda when available).
        dtype: float32, bfloat16 or float16 (default: float32 on the CPU, bfloat16 on a GPU).
        quantize: Quantize the weights as they load: int8 or int4 (CPU kernels) or nf4 (bitsandbytes).
    """
    from plainlm.api import LLM
    from plainlm.chat import chat_loop
    from plainlm.sampling import SamplingParams

    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed
    )
    _check_compile(compile)
    llm = LLM.load(
        _required(checkpoint_dir), device=device, dtype=dtype, chat_template=chat_template, quantize=quantize
    )
    chat_loop(llm, params, system=system, compile=compile)


def _check_compile(compile: bool | str) -> None:
    from plainlm.generate import check_compile

    check_compile(compile)  # a bad mode fails before the model loads
    if compile:  # the first new token waits on the compiler: say why nothing appears for a while
        print("[compiling the decode step: up to a few minutes the first time, cached for later runs]", file=sys.stderr)


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
    from plainlm.checkpoint import save_checkpoint
    from plainlm.lora import load_peft_adapter
    from plainlm.lora import merge_lora as merge

    llm = LLM.load(checkpoint_dir)
    load_peft_adapter(llm.model, adapter_dir)
    save_checkpoint(merge(llm.model), out_dir)
    llm.tokenizer.save(out_dir)
    print(out_dir)


def finetune(**kwargs) -> None:  # the real signature and help: plainlm/finetune.py, through recipe.py
    """Finetune a model (full, lora, dora, qlora) from a recipe: plainlm finetune --config RECIPE.yaml"""


def pretrain(**kwargs) -> None:  # the real signature and help: plainlm/pretrain.py, through recipe.py
    """Pretrain a model on a folder of text from a recipe: plainlm pretrain --config RECIPE.yaml"""


def estimate(**kwargs) -> None:  # reads finetune/pretrain recipes: plainlm/estimate.py
    """Memory per device of a finetune or pretrain recipe, without loading weights:
    plainlm estimate --config RECIPE.yaml [any recipe key override]"""


# Training commands read YAML recipes: parsed by recipe.py against the function's own signature.
TRAINING_COMMANDS = {"finetune": ("plainlm.finetune", "finetune"), "pretrain": ("plainlm.pretrain", "pretrain")}

COMMANDS = {
    "download": download,
    "convert": {
        "from-hf": convert_from_hf,
        "from-gguf": convert_from_gguf,
        "to-hf": convert_to_hf,
        "to-gguf": convert_to_gguf,
    },
    "generate": generate,
    "chat": chat,
    "pretrain": pretrain,
    "finetune": finetune,
    "merge-lora": merge_lora,
    "estimate": estimate,
}


def main(argv: list[str] | None = None) -> None:
    import importlib

    from jsonargparse import CLI

    from plainlm.recipe import run_recipe_command

    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "estimate":
            from plainlm.estimate import estimate_command

            print(estimate_command(argv[1:]))
        elif argv and argv[0] in TRAINING_COMMANDS:
            module, name = TRAINING_COMMANDS[argv[0]]
            run_recipe_command(getattr(importlib.import_module(module), name), f"plainlm {argv[0]}", argv[1:])
        else:
            CLI(COMMANDS, args=argv, as_positional=True)
    except PlainlmError as e:
        # Bad input ends in one clear line, not a traceback from deep inside a library.
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
