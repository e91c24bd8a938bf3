"""plainlm's import graph has no cycle, counting imports inside functions too.

An import cycle means a responsibility sits in the wrong module; a function-level import only
hides it. The graph is read from the source with `ast`, so nothing is imported to build it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "plainlm"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an `ImportFrom` names, relative imports resolved against `importer`."""
    if node.level == 0:
        return node.module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The plainlm modules that `name` imports anywhere in its file (module level or in functions)."""
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, path.name == "__init__.py", node)
            for alias in node.names:
                # `from plainlm import quantize` imports the submodule, not the package.
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in modules else base)
    return {target for target in targets if target in modules and target != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle_from(node: str, graph: dict[str, set[str]], path: list[str], done: set[str]) -> list[str] | None:
    """Depth-first from `node`: the first edge back into `path` closes a cycle, returned as [a, ..., a]."""
    path.append(node)
    for target in sorted(graph[node]):
        if target in path:
            return [*path[path.index(target) :], target]
        if target not in done:
            cycle = _cycle_from(target, graph, path, done)
            if cycle:
                return cycle
    path.pop()
    done.add(node)
    return None


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per tangle of modules, each as [a, b, ..., a]; fixing one may reveal the next."""
    cycles: list[list[str]] = []
    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            cycle = _cycle_from(start, graph, [], done)
            if cycle:
                cycles.append(cycle)
                done.update(cycle)
    return cycles


def test_the_graph_sees_function_level_relative_and_submodule_imports() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    modules = _modules()
    tree = ast.parse("from . import quantize\nfrom .convert import hf\nfrom plainlm import errors\n")
    nodes = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert [_resolve("plainlm.api", False, node) for node in nodes] == ["plainlm", "plainlm.convert", "plainlm"]
    assert "plainlm.quantize" in _imports("plainlm.api", PACKAGE_ROOT / "api.py", modules)


def test_plainlm_has_no_import_cycle() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)
