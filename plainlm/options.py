"""Command-line options read from a function's signature and docstring (jsonargparse), as users type them.

Every `plainlm` command parses its options here: each option's help comes from the function's
`Args:` docstring (a dataclass parameter's fields from the dataclass's own `Args:`), its type is
written as it is typed (int, true|false, PATH, int8|int4|nf4), option names are never matched by
prefix (a typo is an error, not another option), and a parse failure is one `InvalidInput` line,
with "did you mean --X" for an unknown option, which the CLI prints as one `error:` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, DefaultHelpFormatter

from plainlm.errors import InvalidInput


def type_name(hint: Any) -> str:
    """A type hint as a user types its values: int, true|false, PATH, int8|int4|nf4, [str,...]."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return "true|false"
    if hint is type(None):
        return "null"
    if isinstance(hint, type) and issubclass(hint, Path):
        return "PATH"
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return "section"
    if isinstance(hint, type):
        return hint.__name__
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]  # "null" is shown as the default
        return "|".join(dict.fromkeys(names))
    if origin in (list, tuple, set) or origin is typing.Sequence:
        return f"[{type_name(args[0]) if args else 'value'},...]"
    if origin in (dict, typing.Mapping):
        return "{key: value}"
    if origin is Callable or getattr(origin, "__name__", "") == "Callable":
        return "CLASS_PATH"  # a callable made from class_path + init_args (optimizer, scheduler)
    return str(hint).replace("typing.", "")


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help (type and default after each option's text), with types as users type them."""

    def _get_type_str(self, action: Any) -> str | None:
        if isinstance(action, ActionYesNo):
            return "true|false"
        hint = getattr(action, "_typehint", None) or action.type
        return None if hint is None else type_name(hint)

    def _expand_help(self, action: Any) -> str:
        # Defaults as they are typed too: true, false, null (jsonargparse writes Python's True, False).
        return re.sub(r"default: (True|False)\b", lambda m: f"default: {m[1].lower()}", super()._expand_help(action))


class Parser(ArgumentParser):
    """An ArgumentParser whose failures are one InvalidInput line, and which never expands an abbreviated option."""

    def __init__(self, **kwargs: Any) -> None:
        # setdefault: jsonargparse makes nested parsers of this class with its own settings
        for key, value in dict(exit_on_error=False, allow_abbrev=False, formatter_class=HelpFormatter).items():
            kwargs.setdefault(key, value)
        super().__init__(**kwargs)

    def parse_args(self, args: list[str] | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        # Caught here, not in error(): jsonargparse tries alternatives internally by catching ArgumentError.
        try:
            return super().parse_args(args, **kwargs)
        except argparse.ArgumentError as e:
            raise InvalidInput(self._one_line(str(e))) from None

    def _one_line(self, message: str) -> str:
        """jsonargparse's message (several lines, Python type names) as one line in the user's terms."""
        text = "; ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())
        for explain in (self._unknown_option, self._missing, self._class_argument, self._bad_value):
            line = explain(text)
            if line:
                return f"{self.prog}: {line}"
        return f"{self.prog}: {text or 'the options do not parse'}"

    def _unknown_option(self, text: str) -> str | None:
        if not text.lower().startswith("unrecognized arguments:"):
            return None
        given = text.split(":", 1)[1].split()
        unknown = next((g.split("=", 1)[0] for g in given if g.startswith("-")), given[0] if given else "")
        options = sorted({o for a in self._actions for o in a.option_strings if o.startswith("--")})
        close = difflib.get_close_matches(unknown, options, n=1, cutoff=0.6)
        if close:
            return f"unknown option {unknown}; did you mean {close[0]}?"
        if not unknown.startswith("-"):
            return f"unexpected argument {unknown!r}; see {self.prog} --help"
        return f"unknown option {unknown}; see {self.prog} --help for the options"

    def _missing(self, text: str) -> str | None:
        required = re.match(r"the following arguments are required: (.*)", text)
        if not required:
            return None
        names = [self._option_name(n.strip()) for n in required[1].split(",")]  # --checkpoint_dir, as typed
        return f"missing {', '.join(names)}; see {self.prog} --help"

    def _class_argument(self, text: str) -> str | None:
        """A bad value under a class_path section (--optimizer, --scheduler): name the inner key."""
        keys = re.findall(r'Parser key "([^"]+)"', text)
        not_accepted = re.search(r"Option '(\w+)' is not accepted.*?class_path='([\w.]+)'", text)
        if keys and not_accepted:  # an argument the class does not take (or no class named yet)
            option, cls, key = not_accepted[1], not_accepted[2], keys[0]
            hint = f"name the class with --{key} CLASS; its arguments: {self.prog} --{key}.help CLASS"
            return f"--{key}: {cls} takes no argument {option!r} ({hint})"
        if len(keys) < 2:
            return None
        inner = text[text.index(f'Parser key "{keys[-1]}"') :]
        given = re.findall(r"Given value: (.*?)(?:\. Got value|;|$)", inner)
        expected = re.findall(r"Expected a <class '(\w+)'>", inner)
        hint = f"; expected {expected[0]}" if expected else ""
        return f"--{keys[0]}.init_args.{keys[-1]} {given[0] if given else ''}: not a valid value{hint}"

    def _bad_value(self, text: str) -> str | None:
        """jsonargparse lists every union member it tried: say what was given and what fits."""
        bad_value = re.match(r'Parser key "([^"]+)":', text)
        if not bad_value:
            return None
        key, given = bad_value[1], re.findall(r"(?:Got|Given) value: (.*?)(?:;|$)", text)
        hint = next((getattr(a, "_typehint", None) or a.type for a in self._actions if a.dest == key), None)
        expected = f"; expected {type_name(hint)}" if hint is not None else ""
        return f"--{key} {given[-1] if given else ''}: not a valid value{expected}"

    def _option_name(self, dest: str) -> str:
        action = next((a for a in self._actions if a.dest == dest), None)
        return action.option_strings[0] if action is not None and action.option_strings else dest


def parser_for(
    function: Callable[..., Any],
    prog: str,
    description: str,
    positional: bool = False,
    recipe: bool = False,
) -> Parser:
    """A parser for `function`'s parameters (except `recipe`, which the caller passes).

    positional: required parameters are positional arguments (`plainlm convert from-hf SRC DST`).
    recipe: options may also come from a YAML file given as --config (training recipes).
    """
    parser = Parser(prog=prog, description=description)
    if recipe:
        parser.add_argument("--config", action=ActionConfigFile, help="A recipe: a YAML file of these options.")
    skip = {"recipe"} if "recipe" in inspect.signature(function).parameters else set()
    parser.add_function_arguments(function, skip=skip, as_positional=positional, as_group=False)
    return parser


def arguments(parser: Parser, cfg: Any) -> dict[str, Any]:
    """The keyword arguments of the parsed function: dataclass sections and class_path options instantiated."""
    init = parser.instantiate_classes(cfg)
    return {key: init[key] for key in init.keys() if "." not in key}
