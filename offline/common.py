"""What several offline commands share: CLI flags generated from config classes, the dataset folder and its split.

Flags come from the config classes themselves, as vLLM's EngineArgs makes them: a field `batch_size` becomes
`--batch-size`, its type and default come from the field, its help from the field's metadata
(`dataclasses.field(metadata={"help": ...})` or pydantic `Field(description=...)`), choices from a Literal type or a
`choices` entry (a callable is asked when the parser is built: registries fill it). Other metadata keys:
`positional` (an argument, not a flag), `repeat` (a list given by repeating the flag; else a comma list) and
`cli: False` (never on the command line). A field whose type is itself a config class contributes its own fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from offline.data.split import Split, SplitConfig, make_split
from shared.dataset.folder import Dataset, read_dataset

log = logging.getLogger(__name__)

REQUIRED = dataclasses.MISSING


@dataclass(frozen=True)
class ConfigField:
    """One leaf field of a config class (nested config classes flattened)."""

    name: str
    annotation: Any
    default: Any  # REQUIRED when the field has no default
    meta: Mapping[str, Any]


def _is_config(annotation: Any) -> bool:
    return isinstance(annotation, type) and (dataclasses.is_dataclass(annotation) or issubclass(annotation, BaseModel))


def _own_fields(config_class: type) -> list[ConfigField]:
    """The class's own fields, from its dataclass fields or its pydantic model fields."""
    if dataclasses.is_dataclass(config_class):
        hints = typing.get_type_hints(config_class)
        out = []
        for f in dataclasses.fields(config_class):
            default = f.default_factory() if f.default_factory is not REQUIRED else f.default
            out.append(ConfigField(f.name, hints[f.name], default, f.metadata))
        return out
    out = []
    for name, info in config_class.model_fields.items():
        meta = dict(info.json_schema_extra or {}) | ({"help": info.description} if info.description else {})
        default = REQUIRED if info.is_required() else info.get_default(call_default_factory=True)
        out.append(ConfigField(name, info.annotation, default, meta))
    return out


def config_fields(config_class: type) -> dict[str, ConfigField]:
    """Every leaf field by name; a nested config's fields join under their own names (which must be unique)."""
    out: dict[str, ConfigField] = {}
    for f in _own_fields(config_class):
        leaves = config_fields(f.annotation).values() if _is_config(f.annotation) else [f]
        for leaf in leaves:
            if leaf.name in out:
                raise TypeError(f"{config_class.__name__}: field {leaf.name!r} appears twice once flattened")
            out[leaf.name] = leaf
    return out


def build_config(config_class: type, values: Mapping[str, Any]) -> Any:
    """An instance from flat leaf values (as config_fields names them); missing fields keep their defaults."""
    unknown = set(values) - set(config_fields(config_class))
    if unknown:
        raise TypeError(f"{config_class.__name__} has no field(s) {sorted(unknown)}")
    kwargs = {}
    for f in _own_fields(config_class):
        if _is_config(f.annotation):
            kwargs[f.name] = build_config(
                f.annotation, {k: v for k, v in values.items() if k in config_fields(f.annotation)}
            )
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return config_class(**kwargs)


def comma_list(item_type: Callable[[str], Any] = str) -> Callable[[str], list]:
    """Parses 'a,b,c' (blanks dropped) into a list of item_type."""

    def parse(text: str) -> list:
        return [item_type(t.strip()) for t in text.split(",") if t.strip()]

    parse.__name__ = f"comma list of {getattr(item_type, '__name__', 'values')}"
    return parse


def _argument(f: ConfigField, flag_name: str) -> tuple[list[str], dict[str, Any]]:
    """argparse's flags and keyword arguments for one field."""
    annotation, default = f.annotation, f.default
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        annotation = next(a for a in args if a is not type(None))  # X | None: an optional X
    dest = flag_name.replace("-", "_")
    kwargs: dict[str, Any] = {"help": f.meta.get("help")}
    if annotation is bool:
        flag = f"--no-{flag_name}" if default is True else f"--{flag_name}"
        return [flag], kwargs | {"dest": dest, "action": "store_false" if default is True else "store_true"}
    choices = f.meta.get("choices")
    if typing.get_origin(annotation) is Literal:
        choices, annotation = typing.get_args(annotation), type(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is list:
        item_type = (typing.get_args(annotation) or (str,))[0]
        if f.meta.get("repeat"):
            kwargs |= {"action": "append", "type": item_type}
        else:
            kwargs["type"] = comma_list(item_type)
    elif annotation in (int, float, str):
        kwargs["type"] = annotation
    else:
        raise TypeError(f"field {f.name!r}: no command-line form for {annotation!r}; give it metadata cli=False")
    if choices is not None:
        kwargs["choices"] = list(choices() if callable(choices) else choices)
    if f.meta.get("positional"):
        return [dest], kwargs
    if default is REQUIRED:
        return [f"--{flag_name}"], kwargs | {"dest": dest, "required": True}
    return [f"--{flag_name}"], kwargs | {"dest": dest, "default": default}


@dataclass(frozen=True)
class ConfigFlags:
    """The flags of one config class: `add_to` puts them on a parser or group, `values` reads them back.

    fields: which leaf fields, in this order (default: every one not marked cli=False, in declaration order);
    rename: field -> flag name where the flag differs (e.g. {"seed": "split-seed"}: --split-seed, args.split_seed).
    """

    config_class: type
    fields: Sequence[str] | None = None
    rename: Mapping[str, str] = field(default_factory=dict)

    def selected(self) -> list[ConfigField]:
        every = config_fields(self.config_class)
        names = self.fields or [name for name, f in every.items() if f.meta.get("cli", True)]
        return [every[name] for name in names]

    def flag_name(self, name: str) -> str:
        return self.rename.get(name, name.replace("_", "-"))

    def add_to(self, target: Any) -> None:
        """target: anything with argparse's add_argument (a parser, a group, a filtering wrapper)."""
        for f in self.selected():
            flags, kwargs = _argument(f, self.flag_name(f.name))
            target.add_argument(*flags, **kwargs)

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """Field name -> parsed value, for the selected fields."""
        return {f.name: getattr(args, self.flag_name(f.name).replace("-", "_")) for f in self.selected()}

    def build(self, args: argparse.Namespace, **overrides: Any) -> Any:
        """The config from parsed args (fields not selected keep their defaults)."""
        return build_config(self.config_class, {**self.values(args), **overrides})


SPLIT_FLAGS = ConfigFlags(SplitConfig, rename={"seed": "split-seed"})


def add_split_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("split (must match between knowledge, training and evaluation)")
    SPLIT_FLAGS.add_to(g)


def split_config_from_args(args: argparse.Namespace) -> SplitConfig:
    return SPLIT_FLAGS.build(args)


def load_split(data_dir: str, config: SplitConfig) -> tuple[Dataset, Split]:
    dataset = read_dataset(data_dir)
    split = make_split(dataset, config)
    log.info(
        "dataset %s: %d train / %d valid / %d test rows (split %s)",
        dataset.name,
        len(split.train),
        len(split.valid),
        len(split.test),
        split.fingerprint()[:12],
    )
    return dataset, split
