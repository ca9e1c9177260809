"""MMoE: shared experts, one softmax gate and one tower per scenario."""

from __future__ import annotations

import torch

from shared.models.backbones.base import Backbone, BackboneConfig, StackedLinear, StackedMLP, select


class MMoEConfig(BackboneConfig):
    experts: int = 4
    expert: list[int] = [64, 32]
    tower: list[int] = [16]


class MMoE(Backbone):
    config_class = MMoEConfig

    def __init__(self, config: MMoEConfig, input_dim: int, n_scenarios: int):
        super().__init__(config, input_dim, n_scenarios)
        self.experts = StackedMLP(config.experts, [input_dim, *config.expert], config.dropout)
        self.gates = StackedLinear(n_scenarios, input_dim, config.experts)
        self.towers = StackedMLP(n_scenarios, [config.expert[-1], *config.tower, 1], config.dropout, last_act=False)

    def forward(self, x: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        experts = self.experts(x)  # [B, E, h]
        gate = torch.softmax(select(self.gates(x), scenario), dim=-1)  # [B, E]
        mixed = (gate.unsqueeze(-1) * experts).sum(1)
        return select(self.towers(mixed), scenario).squeeze(-1)
