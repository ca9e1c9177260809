"""The backbone registry: a name -> the architecture's config class and its implementation.

Entries may name their class as 'package.module:Class', imported on first use, so that listing the names (the CLI's
choices) never imports torch. The implementation declares its hyper-parameters as `config_class`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import ValidationError

from shared.errors import UserFacingError, unknown_name

if TYPE_CHECKING:
    from shared.models.backbones.base import Backbone, BackboneConfig

# name -> the Backbone subclass, or 'module:Class' until first use (registration order = listing order)
_IMPLEMENTATIONS: dict[str, type[Backbone] | str] = {}


@dataclass(frozen=True)
class BackboneSpec:
    """One registered architecture."""

    name: str
    config_class: type[BackboneConfig]
    model_class: type[Backbone]


def register_backbone(name: str, implementation: type[Backbone] | str) -> None:
    """Adds an architecture under `name`; the class itself or 'package.module:Class' (imported when first built)."""
    previous = _IMPLEMENTATIONS.get(name)
    if previous is not None and previous is not implementation:
        raise ValueError(f"backbone {name!r} is already registered ({previous})")
    _IMPLEMENTATIONS[name] = implementation


def unregister_backbone(name: str) -> None:
    """Removes a registered architecture (a plugin or a test that registered its own)."""
    _IMPLEMENTATIONS.pop(name, None)


def backbone_names() -> list[str]:
    """Every registered architecture, in registration order."""
    return list(_IMPLEMENTATIONS)


def backbone_spec(name: str) -> BackboneSpec:
    """The architecture registered as `name`; an unknown name is a one-line error listing the valid ones."""
    if name not in _IMPLEMENTATIONS:
        raise unknown_name("backbone", name, _IMPLEMENTATIONS)
    implementation = _IMPLEMENTATIONS[name]
    if isinstance(implementation, str):
        module, _, attribute = implementation.partition(":")
        implementation = getattr(importlib.import_module(module), attribute)
        _IMPLEMENTATIONS[name] = implementation
    return BackboneSpec(name, implementation.config_class, implementation)


def build_backbone(name: str, params: dict, input_dim: int, n_scenarios: int) -> Backbone:
    """Validates params against the architecture's config class (unknown keys are refused)."""
    spec = backbone_spec(name)
    try:
        config = spec.config_class(**params)
    except ValidationError as exc:
        raise UserFacingError(
            f"invalid {name} parameters: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
        ) from None
    return spec.model_class(config, input_dim, n_scenarios)
