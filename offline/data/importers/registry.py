"""The importer registry: a source name -> its options (a dataclass whose fields become the `data import SOURCE`
flags, see offline/common.py) and the function that reads the source into a Dataset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared.dataset.folder import Dataset
from shared.errors import unknown_name

_IMPORTERS: dict[str, ImporterSpec] = {}


@dataclass(frozen=True)
class ImporterSpec:
    """One source: `load(options_class(...))` returns the dataset in the folder format."""

    name: str
    help: str
    options_class: type
    load: Callable[[Any], Dataset]


def register_importer(spec: ImporterSpec) -> None:
    previous = _IMPORTERS.get(spec.name)
    if previous is not None and previous != spec:
        raise ValueError(f"importer {spec.name!r} is already registered")
    _IMPORTERS[spec.name] = spec


def unregister_importer(name: str) -> None:
    """Removes a registered importer (a plugin or a test that registered its own)."""
    _IMPORTERS.pop(name, None)


def importer_names() -> list[str]:
    """Every registered source, in registration order."""
    return list(_IMPORTERS)


def importer_spec(name: str) -> ImporterSpec:
    if name not in _IMPORTERS:
        raise unknown_name("importer", name, _IMPORTERS)
    return _IMPORTERS[name]
