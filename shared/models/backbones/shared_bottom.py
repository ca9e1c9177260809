"""Shared-Bottom: one shared MLP, one tower per scenario."""

from __future__ import annotations

import torch

from shared.models.backbones.base import Backbone, BackboneConfig, StackedMLP, mlp, select


class SharedBottomConfig(BackboneConfig):
    bottom: list[int] = [128, 64]
    tower: list[int] = [32]


class SharedBottom(Backbone):
    config_class = SharedBottomConfig

    def __init__(self, config: SharedBottomConfig, input_dim: int, n_scenarios: int):
        super().__init__(config, input_dim, n_scenarios)
        self.bottom = mlp([input_dim, *config.bottom], config.dropout)
        self.towers = StackedMLP(n_scenarios, [config.bottom[-1], *config.tower, 1], config.dropout, last_act=False)

    def forward(self, x: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        return select(self.towers(self.bottom(x)), scenario).squeeze(-1)
