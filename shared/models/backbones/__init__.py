"""Backbone registry: one config class and one model class per architecture, looked up by name."""

from __future__ import annotations

from pydantic import ValidationError

from shared.errors import UserFacingError
from shared.models.backbones.base import Backbone, BackboneConfig
from shared.models.backbones.mmoe import MMoE, MMoEConfig
from shared.models.backbones.ple import PLE, PLEConfig
from shared.models.backbones.shared_bottom import SharedBottom, SharedBottomConfig
from shared.models.backbones.star import STAR, STARConfig

BACKBONES: dict[str, type[Backbone]] = {
    "shared_bottom": SharedBottom,
    "mmoe": MMoE,
    "ple": PLE,
    "star": STAR,
}

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneConfig",
    "MMoE",
    "MMoEConfig",
    "PLE",
    "PLEConfig",
    "STAR",
    "STARConfig",
    "SharedBottom",
    "SharedBottomConfig",
    "backbone_class",
    "build_backbone",
]


def backbone_class(name: str) -> type[Backbone]:
    if name not in BACKBONES:
        raise UserFacingError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def build_backbone(name: str, params: dict, input_dim: int, n_scenarios: int) -> Backbone:
    """Validates params against the architecture's config class (unknown keys are refused)."""
    cls = backbone_class(name)
    try:
        config = cls.config_class(**params)
    except ValidationError as exc:
        raise UserFacingError(
            f"invalid {name} parameters: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
        ) from None
    return cls(config, input_dim, n_scenarios)
