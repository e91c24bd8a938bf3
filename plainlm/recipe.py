"""Recipes: YAML files that capture every setting of a training run, read by jsonargparse.

    plainlm finetune --config recipes/finetune/smollm2-135m/lora.yaml --train.max_steps 5

Every key of a recipe is also a command-line option (nested with dots). The resolved recipe (file
plus command line plus defaults) is what the run writes next to its checkpoints, so a run can be
repeated exactly. A key that does not exist is an error that names it and the closest valid one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from plainlm.errors import RecipeError
from plainlm.options import arguments
from plainlm.options import parser_for as options_parser

# Sections whose keys are free-form: the arguments of the optimizer or scheduler class named there, and
# model_config (any Config field, checked when the Config is built).
FREE_FORM = ("optimizer", "scheduler", "model_config")


def parser_for(command: Callable[..., Any], prog: str, description: str | None = None) -> Any:
    """The parser of a training command: its parameters, and --config for a recipe file."""
    description = description or (command.__doc__ or "").split("\n\n")[0]
    return options_parser(command, prog, description, recipe=True)


def parse_recipe(
    command: Callable[..., Any], prog: str, argv: list[str], description: str | None = None
) -> tuple[Any, Any]:
    """(parser, parsed recipe) for `command` from `argv` (recipe files + overrides), keys checked, not instantiated."""
    parser = parser_for(command, prog, description)
    for path in config_paths(argv):
        check_recipe_keys(path, parser)
    return parser, parser.parse_args(argv)  # a value that does not parse is one InvalidInput line (options.Parser)


def run_recipe_command(command: Callable[..., Any], prog: str, argv: list[str], description: str | None = None) -> Any:
    """Parse `argv` (recipe + overrides) for `command`, check the recipe's keys, run it with the resolved recipe."""
    parser, cfg = parse_recipe(command, prog, argv, description)
    recipe = parser.dump(cfg, skip_none=False)
    cfg.pop("config", None)
    return command(**arguments(parser, cfg), recipe=recipe)


def config_paths(argv: list[str]) -> list[Path]:
    """The recipe files named by --config in `argv`, in order."""
    paths = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            paths.append(Path(argv[i + 1]))
        elif arg.startswith("--config="):
            paths.append(Path(arg.split("=", 1)[1]))
    return paths


def known_keys(parser: Any) -> set[str]:
    """Every dotted option name the parser accepts, sections included."""
    keys = set()
    for action in parser._actions:  # jsonargparse keeps nested dataclass fields as dotted option names
        for option in action.option_strings:
            if option.startswith("--"):
                name = option[2:]
                keys.add(name)
                while "." in name:
                    name = name.rsplit(".", 1)[0]
                    keys.add(name)
    return keys


def check_recipe_keys(path: Path, parser: Any) -> None:
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys to values")
    valid = known_keys(parser)
    for key in _flat_keys(data):
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
            hint = (
                f"; did you mean {close[0]!r}?"
                if close
                else f"; valid top-level keys: {sorted(k for k in valid if '.' not in k)}"
            )
            raise RecipeError(f"{path}: recipe key {key!r} does not exist{hint}")


def _flat_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in FREE_FORM and not name.startswith(FREE_FORM):
            keys.extend(_flat_keys(value, name + "."))
        else:
            keys.append(name)
    return keys
