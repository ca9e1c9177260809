"""A name -> (config class, implementation) table for one extension point of the knowledge stage.

The LLM backends (offline/knowledge/backends/__init__.py) and the build executors (offline/knowledge/executors.py)
each have one; the CLI takes its `--backend` and `--engine` choices from them, so a new entry needs no other edit
(docs/architecture.md, Where to extend).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Generic, TypeVar

from shared.errors import UserFacingError

Impl = TypeVar("Impl")


@dataclass(frozen=True)
class Registered(Generic[Impl]):
    """One entry: its name, the dataclass of its settings, and what implements it.

    implementation is the object itself or "module:attribute", imported on first use: listing the choices of a
    command must not import torch, transformers or Ray.
    """

    name: str
    config_class: type
    implementation: Impl | str

    def load(self) -> Impl:
        if not isinstance(self.implementation, str):
            return self.implementation
        module, _, attribute = self.implementation.partition(":")
        return getattr(importlib.import_module(module), attribute)


class Registry(Generic[Impl]):
    """The entries of one extension point, in registration order (the order of the CLI's choices)."""

    def __init__(self, kind: str):
        """kind names the extension point in error messages ("backend", "engine")."""
        self.kind = kind
        self._entries: dict[str, Registered[Impl]] = {}

    def register(self, name: str, config_class: type, implementation: Impl | str) -> Registered[Impl]:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        entry = Registered(name, config_class, implementation)
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self.get(name)
        del self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def entries(self) -> tuple[Registered[Impl], ...]:
        return tuple(self._entries.values())

    def get(self, name: str) -> Registered[Impl]:
        """The entry of name; an unknown name is a one-line error that lists the known ones."""
        entry = self._entries.get(name)
        if entry is None:
            raise UserFacingError(f"unknown {self.kind} {name!r}; expected one of {', '.join(self._entries)}")
        return entry
