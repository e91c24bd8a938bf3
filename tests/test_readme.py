"""The README's examples: Python snippets that import what they use, and `plainlm estimate` lines that run."""

from __future__ import annotations

import ast
import builtins
import re
import shlex

import pytest
from helpers import REPO, run_cli

README = (REPO / "README.md").read_text(encoding="utf-8")
PYTHON_SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
BASH_LINES = [
    line.split("#")[0].strip()
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    for line in block.replace("\\\n", " ").splitlines()
]
ESTIMATE_LINES = [line for line in BASH_LINES if line.startswith("plainlm estimate ")]


def undefined_names(source: str) -> set[str]:
    """Names a snippet reads but never imports, assigns or defines (builtins aside)."""
    tree = ast.parse(source)
    bound, used = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return used - bound


def test_the_readme_has_the_examples_these_tests_check() -> None:
    assert len(PYTHON_SNIPPETS) >= 2
    assert len(ESTIMATE_LINES) >= 2


def test_undefined_names_are_found() -> None:  # the check below can fail
    assert undefined_names("import json\nx = json.loads(y)\nprint(torch.tensor([x]))") == {"y", "torch"}


@pytest.mark.parametrize("index", range(len(PYTHON_SNIPPETS)))
def test_python_snippet_parses_and_imports_what_it_uses(index: int) -> None:
    snippet = PYTHON_SNIPPETS[index]
    assert undefined_names(snippet) == set(), snippet


@pytest.mark.slow  # a fresh process per run: `make test` runs it, `make test-fast` does not
@pytest.mark.parametrize("line", ESTIMATE_LINES)
def test_estimate_line_runs(line: str) -> None:
    result = run_cli(*shlex.split(line)[1:])
    assert result.returncode == 0, result.stderr
    assert "fits" in result.stdout.lower() or "does not fit" in result.stdout.lower(), result.stdout
