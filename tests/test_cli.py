"""The `plainlm` command itself: one table of commands, their help, and parse failures as one error line."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
from helpers import REPO, run_cli

from plainlm.cli import COMMANDS, command_parser, main


def test_help_lists_every_command_with_its_summary() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for name, command in COMMANDS.items():
        assert f"{name}  " in result.stdout and command.summary in result.stdout, name
    assert run_cli().stdout == result.stdout  # `plainlm` alone shows the same overview


def test_every_command_in_the_table_runs_and_has_help() -> None:
    for name in COMMANDS:
        module, function = COMMANDS[name].function.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
    for name in ("generate", "convert to-gguf", "finetune"):
        result = run_cli(*name.split(), "--help")
        assert result.returncode == 0 and f"usage: plainlm {name}" in result.stdout, result.stderr


def test_help_imports_no_torch() -> None:
    code = "import sys; from plainlm.cli import main; main(['--help']); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip().splitlines()[-1] == "False", result.stdout + result.stderr


def test_python_dash_m_plainlm_and_the_console_script_run_main() -> None:
    result = subprocess.run([sys.executable, "-m", "plainlm", "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "merge-lora" in result.stdout, result.stderr
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="plainlm")
    assert script.load() is main


def test_a_group_lists_its_commands(capsys: pytest.CaptureFixture[str]) -> None:
    main(["convert"])
    out = capsys.readouterr().out
    assert all(f"convert {to}" in out for to in ("from-hf", "from-gguf", "to-hf", "to-gguf"))
    assert "generate" not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["genrate"], "'plainlm genrate' is not a command; did you mean 'plainlm generate'?"),
        (["conver", "from-hf"], "did you mean 'plainlm convert'?"),
        (["convert", "from-hff", "a", "b"], "did you mean 'plainlm convert from-hf'?"),
    ],
)
def test_an_unknown_command_is_one_error_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_version_is_the_package_metadata_version() -> None:
    import plainlm

    version = importlib.metadata.version("plainlm")
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'\nversion = "{version}"\n' in pyproject  # one source: pyproject.toml, as installed
    assert plainlm.__version__ == version
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout == f"plainlm {version}\n", result.stderr


@pytest.mark.slow  # a fresh process per run: `make test` runs it, `make test-fast` does not
def test_models_lists_name_family_size_and_hub_id() -> None:
    result = run_cli("models", "smollm2-135")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "family", "size", "hub", "id"]
    assert lines[1].split() == ["SmolLM2-135M", "llama", "135M", "HuggingFaceTB/SmolLM2-135M"]
    assert lines[2].split() == ["SmolLM2-135M-Instruct", "llama", "135M", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert len(lines) == 3
    assert "Qwen/Qwen3-0.6B" in run_cli("models", "--filter", "QWEN3").stdout  # any case, as option too
    missing = run_cli("models", "no-such-model")
    assert (
        missing.returncode == 2
        and missing.stderr == "error: no named config matches 'no-such-model'; plainlm models lists them all\n"
    )


def test_output_cut_short_by_the_reader_is_not_an_error() -> None:
    # `true` exits at once, so plainlm writes into a pipe nobody reads (as `plainlm models | head` does)
    code = f"set -o pipefail; {sys.executable} -m plainlm models | true"
    result = subprocess.run(["bash", "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize(
    "name, hf_count",  # model.num_parameters() of the transformers model (tied embeddings counted once)
    [("SmolLM2-135M", 134_515_008), ("gpt2", 124_439_808), ("Qwen3-0.6B", 596_049_920)],
)
def test_model_sizes_equal_the_reference_parameter_counts(name: str, hf_count: int) -> None:
    from plainlm.cli import _parameter_count
    from plainlm.named_configs import NAMED_CONFIGS

    assert _parameter_count(NAMED_CONFIGS[name]) == hf_count


def test_counting_two_blocks_equals_counting_the_whole_model() -> None:
    from plainlm.cli import _meta_count, _parameter_count, _short_count
    from plainlm.named_configs import NAMED_CONFIGS

    smallest = {}  # one model per family, the smallest, so whole models stay quick to build
    for config in sorted(NAMED_CONFIGS.values(), key=lambda c: c.n_layer * c.n_embd):
        smallest.setdefault(config.hf_model_type, config)
    assert len(smallest) >= 10
    for config in smallest.values():
        assert _parameter_count(config) == _meta_count(config), config.name
    assert [_short_count(n) for n in (70_426_624, 999_885_952, 1_235_814_400, 70_553_706_496)] == [
        "70M",
        "1.0B",
        "1.2B",
        "71B",
    ]


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "estimate"])
def test_every_option_has_help_and_a_type_as_users_type_it(name: str) -> None:
    parser = command_parser(name)
    text = parser.format_help()
    for action in parser._actions:
        assert action.help, f"plainlm {name}: {action.dest} has no help"
    assert "typing." not in text and "<class" not in text and "NoneType" not in text, text
    assert "default: True" not in text and "default: False" not in text  # written as typed: true, false


def test_help_of_nested_sections_and_user_types() -> None:
    text = " ".join(command_parser("finetune").format_help().split())  # unwrapped
    assert "--lora.r R The rank of each adapter" in text
    assert "--data.packing {true,false} Put several examples in one row" in text
    assert "--checkpoint_dir CHECKPOINT_DIR The model to start from" in text and "(required, type: PATH)" in text
    assert "type: true|false|auto" in text  # --resume
    assert "type: full|lora|dora|qlora, default: lora" in text
    text = " ".join(command_parser("generate").format_help().split())
    assert "--max_new_tokens MAX_NEW_TOKENS Generate at most this many tokens. (type: int, default: 100)" in text


@pytest.mark.slow  # a fresh process per run: `make test` runs it, `make test-fast` does not
def test_estimate_help() -> None:
    result = run_cli("estimate", "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: plainlm estimate --config RECIPE.yaml")
    assert "plainlm finetune --help" in result.stdout, result.stdout
    recipe = "recipes/finetune/smollm2-135m-instruct/lora.yaml"
    result = run_cli("estimate", "--config", recipe, "--help")  # the recipe's own options
    assert result.returncode == 0 and "--train.micro_batch_size" in result.stdout, result.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--top_pp", "0.5"], "plainlm generate: unknown option --top_pp; did you mean --top_p?"),
        (["generate", "--max_new", "5"], "unknown option --max_new; did you mean --max_new_tokens?"),  # no prefixes
        (["finetune", "--checkpoint_dir", "x", "--lora.rr", "4"], "unknown option --lora.rr; did you mean --lora.r?"),
        (
            ["finetune", "--checkpoint_dir", "x", "--train.max_steps", "ten"],
            "--train.max_steps ten: not a valid value; expected int",
        ),
        (["finetune", "--checkpoint_dir", "x", "--method", "lorra"], "expected full|lora|dora|qlora"),
        (["generate", "--chat", "maybe"], "--chat maybe: not a valid value; expected true|false"),
        (["convert", "from-hf", "only-one"], "plainlm convert from-hf: missing dst_dir; see plainlm convert"),
        (["finetune", "--train.max_steps", "1"], "plainlm finetune: missing --checkpoint_dir"),
        (
            ["finetune", "--checkpoint_dir", "x", "--optimizer", "AdamW", "--optimizer.init_args.lr", "fast"],
            "--optimizer.init_args.lr fast: not a valid value; expected float",
        ),
        (
            ["finetune", "--checkpoint_dir", "x", "--optimizer", "SGD", "--optimizer.init_args.betas", "[0.9,0.9]"],
            "--optimizer: torch.optim.SGD takes no argument 'betas'",
        ),
        (["convert", "to-hf", "a", "b", "c"], "unexpected argument 'c'"),
        (["models", "--filter"], "plainlm models: "),
        (
            [
                "estimate",
                "--config",
                "recipes/finetune/smollm2-135m-instruct/lora.yaml",
                "--train.micro_batch_sise",
                "2",
            ],
            "did you mean --train.micro_batch_size?",
        ),
    ],
)
def test_a_parse_failure_is_one_error_line(argv: list[str], message: str) -> None:
    result = run_cli(*argv)
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr, result.stderr
