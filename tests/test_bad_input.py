"""Bad input ends in one clear message naming the file and what to do: never a deep traceback,
never executed pickles."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_cli

from plainlm import LLM
from plainlm.checkpoint import load_checkpoint, save_tensors
from plainlm.convert.hf import convert_from_hf, load_hf_model
from plainlm.errors import CheckpointError


@pytest.fixture
def hf_copy(tiny_hf_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_hf_dir, tmp_path / "model"))


def assert_clean_cli_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def test_directory_without_weights(hf_copy: Path) -> None:
    (hf_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_hf_model(hf_copy)
    assert_clean_cli_error(
        run_cli("convert", "from-hf", str(hf_copy), str(hf_copy / "out")), str(hf_copy), "no weights"
    )


def test_truncated_safetensors(hf_copy: Path) -> None:
    weights = hf_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_hf_model(hf_copy)
    result = run_cli("generate", "--checkpoint_dir", str(hf_copy), "--max_new_tokens", "2")
    assert_clean_cli_error(result, "model.safetensors", "download it again")


def test_garbage_safetensors_header(hf_copy: Path) -> None:
    weights = hf_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff" * 32
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf_model(hf_copy)


def test_shape_mismatch_names_key_and_shapes(hf_copy: Path, tmp_path: Path) -> None:
    native = convert_from_hf(hf_copy, tmp_path / "native")
    config = yaml.safe_load((native / "config.yaml").read_text())
    config["intermediate_size"] = 100
    (native / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(
        CheckpointError, match=r"'blocks\.0\.mlp\.\w+_proj\.weight' has shape \(\d+, \d+\) but the config needs"
    ):
        load_checkpoint(native)


def test_unknown_architecture_names_supported_ones(hf_copy: Path) -> None:
    config = json.loads((hf_copy / "config.json").read_text())
    config["model_type"] = "bert"
    (hf_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unsupported model_type 'bert'.*llama.*gpt2"):
        LLM.load(hf_copy)
    assert_clean_cli_error(
        run_cli("convert", "from-hf", str(hf_copy), str(hf_copy / "o")), "config.json", "bert", "mistral"
    )


def test_weights_of_another_architecture(hf_copy: Path) -> None:
    config = json.loads((hf_copy / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (hf_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="gpt_neox.embed_in.weight"):
        load_hf_model(hf_copy)


class _RunsCode:
    """A pickle payload that would create a file if it were ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bin_with_code_is_refused_never_executed(hf_copy: Path, tmp_path: Path) -> None:
    (hf_copy / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(hf_copy / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": torch.zeros(2), "evil": _RunsCode(marker)}, f)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_hf_model(hf_copy)
    assert not marker.exists()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "evil": _RunsCode(marker)}, hf_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_hf_model(hf_copy)
    assert not marker.exists()


def test_bin_with_non_tensor_values_is_refused(hf_copy: Path) -> None:
    (hf_copy / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "step": 3}, hf_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="other than a flat dict of tensors"):
        load_hf_model(hf_copy)


@pytest.mark.slow  # a fresh process per run: `make test` runs it, `make test-fast` does not
def test_prompt_longer_than_context(tiny_hf_dir: Path) -> None:
    long_prompt = "word " * 600
    result = run_cli("generate", "--checkpoint_dir", str(tiny_hf_dir), "--prompt", long_prompt, "--max_new_tokens", "3")
    assert_clean_cli_error(result, "context is 512 tokens", "truncate_prompt")
    assert "the prompt has" in result.stderr and "--truncate_prompt true" in result.stderr
    ok = run_cli(
        "generate",
        "--checkpoint_dir",
        str(tiny_hf_dir),
        "--prompt",
        long_prompt,
        "--max_new_tokens",
        "3",
        "--truncate_prompt",
        "true",
    )
    assert ok.returncode == 0, ok.stderr
    assert "note: the prompt has" in ok.stderr and "tokens are dropped (--truncate_prompt true)" in ok.stderr


def test_unknown_compile_mode_fails_before_loading(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"  # the mode is checked first: the path's error never comes
    result = run_cli("generate", "--checkpoint_dir", str(missing), "--compile", "max-autotune")
    assert_clean_cli_error(result, "compile must be True, False or one of default, reduce-overhead")


def test_missing_path_and_missing_checkpoint_dir(tmp_path: Path) -> None:
    assert_clean_cli_error(run_cli("generate", "--checkpoint_dir", str(tmp_path / "nope")), "no such file or directory")
    assert_clean_cli_error(run_cli("generate"), "--checkpoint_dir")


def test_a_named_dataset_that_cannot_be_fetched_offline(tiny_hf_dir: Path, tmp_path: Path) -> None:
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}  # and an empty cache
    out = tmp_path / "run"
    args = ["finetune", "--checkpoint_dir", str(tiny_hf_dir), "--out_dir", str(out), "--data.path", "alpaca"]
    result = run_cli(*args, "--train.max_steps", "1", env=offline)
    assert_clean_cli_error(
        result, "--data.path alpaca: cannot fetch", "put a copy of that file at data/alpaca/alpaca_data_cleaned.json"
    )
    assert not out.exists()  # the failed start left no folder behind


def test_from_hf_checks_every_shape_before_writing(hf_copy: Path, tmp_path: Path) -> None:
    """A config.json that does not match its weights fails as loading does (key and both shapes), and
    leaves nothing behind: never a checkpoint that only fails when loaded."""
    config = json.loads((hf_copy / "config.json").read_text())
    config["intermediate_size"] = 100
    (hf_copy / "config.json").write_text(json.dumps(config))
    mismatch = r"'blocks\.0\.mlp\.gate_proj\.weight' has shape \(128, 64\) but the config needs \(100, 64\)"
    with pytest.raises(CheckpointError, match=mismatch):
        load_hf_model(hf_copy)
    with pytest.raises(CheckpointError, match=mismatch):
        convert_from_hf(hf_copy, tmp_path / "native")
    assert not (tmp_path / "native").exists()
    result = run_cli("convert", "from-hf", str(hf_copy), str(tmp_path / "cli"))
    assert_clean_cli_error(result, "blocks.0.mlp.gate_proj.weight", "(128, 64)", "(100, 64)")
    assert not (tmp_path / "cli").exists()


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        ("from-hf", "dst_dir"),
        ("to-gguf", "file"),
        ("merge-lora", "out_dir"),
        ("finetune", "--out_dir"),
        ("download", "--checkpoint_dir"),
    ],
)
def test_a_destination_that_is_a_file_is_one_error_line(command: str, flag: str, hf_copy: Path, tmp_path: Path) -> None:
    """Each command that writes a folder names its argument when the folder (or one above it) is a file,
    before it loads, downloads or trains anything."""
    taken = tmp_path / "taken"
    taken.write_text("a file where a folder should go")
    args = {
        "from-hf": ["convert", "from-hf", str(hf_copy), str(taken)],
        "to-gguf": ["convert", "to-gguf", str(hf_copy), str(taken / "model.gguf")],
        "merge-lora": ["merge-lora", str(hf_copy), str(hf_copy), str(taken)],
        "finetune": ["finetune", "--checkpoint_dir", str(hf_copy), "--out_dir", str(taken / "run")],
        "download": ["download", "org/name", "--checkpoint_dir", str(taken)],
    }[command]
    itself = command in ("from-hf", "merge-lora")  # the others write into a folder below it
    why = f"{taken} is an existing file" if itself else f"cannot be created: {taken} is a file"
    assert_clean_cli_error(run_cli(*args), f"{flag} {taken}", why)
    assert taken.read_text() == "a file where a folder should go"


def test_a_conversion_that_fails_midway_leaves_no_shards(tmp_path: Path) -> None:
    """save_tensors writes shards under hidden names first; when a tensor fails to come, they go again."""

    def tensors_then_a_failure():  # noqa: ANN202
        for i in range(3):
            yield f"t{i}", torch.zeros(256)
        raise CheckpointError("model.safetensors: tensor 't3' cannot be read")

    with pytest.raises(CheckpointError, match="'t3' cannot be read"):
        save_tensors(tensors_then_a_failure(), tmp_path / "out", max_shard_bytes=1024)
    assert list((tmp_path / "out").iterdir()) == []
