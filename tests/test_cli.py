"""The `plainlm` command itself: one table of commands, their help, and parse failures as one error line."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
from conftest import REPO, run_cli

from plainlm.cli import COMMANDS, main


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
