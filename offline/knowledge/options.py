"""Command-line options generated from config dataclasses, and the dataclasses filled back from parsed arguments.

A field becomes `--field-name` with its type and default (in the manner of vLLM's EngineArgs); `cli(...)` in its
metadata adds help text and choices, renames the flag or hides the field. A bool field that defaults to True is
turned off by its flag (`prefix_reuse` -> `--no-prefix-reuse`); `bool | None` gets `--x/--no-x`. The knowledge
CLI and bench/knowledge_bench.py both read their backend settings through dataclass_from_args, so a new
BackendConfig field needs no edit in either.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

METADATA_KEY = "llm4msr.cli"


class ArgumentTarget(Protocol):
    """An argparse parser or argument group (or anything with their add_argument)."""

    def add_argument(self, *flags: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Option:
    """How a config field appears on the command line."""

    help: str | None = None
    # The flag when it is not derived from the field name (e.g. "--full" for incremental=True).
    flag: str | None = None
    # Allowed values, or a function returning them when the parser is built (a registry's current names).
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None
    # Not on the command line: the field keeps its default.
    hidden: bool = False
    # Parses the option's text when the field's type cannot (a union such as `int | str | None`).
    parse: Callable[[str], Any] | None = None


def cli(
    help: str | None = None,  # noqa: A002 (argparse's name)
    flag: str | None = None,
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    hidden: bool = False,
    parse: Callable[[str], Any] | None = None,
) -> dict[str, Option]:
    """The metadata of a dataclass field: `field(default=..., metadata=cli(help=...))`."""
    return {METADATA_KEY: Option(help=help, flag=flag, choices=choices, hidden=hidden, parse=parse)}


@dataclass(frozen=True)
class FieldOption:
    """A dataclass field resolved to its argparse form."""

    field: dataclasses.Field
    option: Option
    flag: str
    value_type: type
    optional: bool

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def negated(self) -> bool:
        """A switch that turns off a field that defaults to True."""
        return self.value_type is bool and not self.optional and self.field.default is True

    def value(self, args: argparse.Namespace) -> Any:
        parsed = getattr(args, self.dest)
        return not parsed if self.negated else parsed


def field_options(
    cls: type, only: Sequence[str] | None = None, exclude: Collection[str] = (), prefix: str = ""
) -> list[FieldOption]:
    """The command-line fields of cls (hidden ones left out), in the order of only, else of the class.

    prefix goes before each derived flag: an executor's settings read `--ray-workers` for RayConfig.workers.
    """
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    names = list(only) if only is not None else list(by_name)
    hints = typing.get_type_hints(cls)
    out = []
    for name in names:
        if name in exclude:
            continue
        f = by_name[name]
        option = f.metadata.get(METADATA_KEY, Option())
        if option.hidden:
            continue
        value_type, optional = _unwrap_optional(hints[name])
        flag = option.flag or _derived_flag(name, prefix, negated=value_type is bool and f.default is True)
        out.append(FieldOption(f, option, flag, value_type, optional))
    return out


def add_dataclass_args(
    parser: ArgumentTarget,
    cls: type,
    only: Sequence[str] | None = None,
    exclude: Collection[str] = (),
    prefix: str = "",
    defaults: Mapping[str, Any] | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Adds the options of cls's fields to a parser or argument group.

    defaults and choices override, by field name, the field's default and its metadata's choices (a registry's names
    for a field of a class the registry itself imports).
    """
    defaults, choices = defaults or {}, choices or {}
    for fo in field_options(cls, only, exclude, prefix):
        kwargs = _argparse_kwargs(fo, defaults.get(fo.field.name, fo.field.default))
        if fo.field.name in choices:
            kwargs["choices"] = list(choices[fo.field.name])
        parser.add_argument(fo.flag, **kwargs)


def dataclass_from_args(cls: type, args: argparse.Namespace, prefix: str = "", **given: Any):
    """An instance of cls from parsed arguments: given values first, then every field whose option was parsed;
    the rest keep their defaults (a parser may carry only some of the options)."""
    values = dict(given)
    parsed = vars(args)
    for fo in field_options(cls, exclude=given, prefix=prefix):
        if fo.dest in parsed:
            values[fo.field.name] = fo.value(args)
    return cls(**values)


def _derived_flag(name: str, prefix: str, negated: bool) -> str:
    words = ([prefix] if prefix else []) + [name]
    if negated:
        words.insert(0, "no")
    return "--" + "-".join(words).replace("_", "-")


def _unwrap_optional(hint: Any) -> tuple[type, bool]:
    """(the value type, whether None is allowed) of `T` or `T | None`."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return hint, False


def _argparse_kwargs(fo: FieldOption, default: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if fo.option.help is not None:
        kwargs["help"] = fo.option.help
    if fo.value_type is bool:
        if fo.optional:
            return {"action": argparse.BooleanOptionalAction, "default": default, **kwargs}
        return {"action": "store_true", **kwargs}
    if default is dataclasses.MISSING and fo.field.default_factory is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = fo.field.default_factory() if default is dataclasses.MISSING else default
    choices = fo.option.choices
    if choices is not None:
        kwargs["choices"] = list(choices() if callable(choices) else choices)
    kwargs["type"] = fo.option.parse or fo.value_type
    return kwargs
