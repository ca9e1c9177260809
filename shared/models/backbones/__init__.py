"""Multi-scenario backbones, looked up by name in the registry (registry.py).

Adding one: a module with its config class (a BackboneConfig) and its class (a Backbone whose `config_class` names
the config), plus one register_backbone line below. Training, evaluation, compare, refresh and their CLI choices
read the registry.
"""

from __future__ import annotations

from shared.models.backbones.registry import (
    BackboneSpec,
    backbone_names,
    backbone_spec,
    build_backbone,
    register_backbone,
    unregister_backbone,
)

register_backbone("shared_bottom", "shared.models.backbones.shared_bottom:SharedBottom")
register_backbone("mmoe", "shared.models.backbones.mmoe:MMoE")
register_backbone("ple", "shared.models.backbones.ple:PLE")
register_backbone("star", "shared.models.backbones.star:STAR")
register_backbone("pepnet", "shared.models.backbones.pepnet:PEPNet")
register_backbone("m2m", "shared.models.backbones.m2m:M2M")

__all__ = [
    "BackboneSpec",
    "backbone_names",
    "backbone_spec",
    "build_backbone",
    "register_backbone",
    "unregister_backbone",
]
