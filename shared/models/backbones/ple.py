"""PLE: stacked CGC layers with shared and scenario-specific experts (Tang et al., RecSys 2020)."""

from __future__ import annotations

import torch
from torch import nn

from shared.models.backbones.base import Backbone, BackboneConfig, StackedLinear, StackedMLP, select


class PLEConfig(BackboneConfig):
    levels: int = 2
    shared_experts: int = 2
    specific_experts: int = 1
    expert: list[int] = [64]
    tower: list[int] = [32]


class CGC(nn.Module):
    """One extraction layer. Inputs: one representation per scenario plus a shared one, [B, S + 1, D]."""

    def __init__(self, config: PLEConfig, in_dim: int, n_scenarios: int, last: bool):
        super().__init__()
        self.s = n_scenarios
        self.ks, self.kt = config.shared_experts, config.specific_experts
        self.shared = StackedMLP(self.ks, [in_dim, *config.expert], config.dropout)
        self.specific = StackedMLP(n_scenarios * self.kt, [in_dim, *config.expert], config.dropout)
        # Scenario gates mix the scenario's own experts with the shared ones.
        self.gates = StackedLinear(n_scenarios, in_dim, self.kt + self.ks)
        # The shared gate (feeding the next level) mixes every expert.
        self.shared_gate = None if last else nn.Linear(in_dim, n_scenarios * self.kt + self.ks)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        b = inputs.shape[0]
        per_scenario, shared_in = inputs[:, : self.s], inputs[:, self.s]
        spec_in = per_scenario.repeat_interleave(self.kt, dim=1)  # [B, S*kt, D]
        specific = self.specific(spec_in).view(b, self.s, self.kt, -1)
        shared = self.shared(shared_in)  # [B, ks, h]
        gate = torch.softmax(self.gates(per_scenario), dim=-1)  # [B, S, kt + ks]
        # Weighted sums as broadcast multiply + sum: einsum would run B*S tiny matrix products.
        out = (gate[..., : self.kt, None] * specific).sum(2) + (gate[..., self.kt :, None] * shared[:, None]).sum(2)
        if self.shared_gate is None:
            return out
        all_experts = torch.cat([specific.reshape(b, self.s * self.kt, -1), shared], dim=1)
        g = torch.softmax(self.shared_gate(shared_in), dim=-1)
        shared_out = (g.unsqueeze(-1) * all_experts).sum(1)
        return torch.cat([out, shared_out.unsqueeze(1)], dim=1)


class PLE(Backbone):
    config_class = PLEConfig

    def __init__(self, config: PLEConfig, input_dim: int, n_scenarios: int):
        super().__init__(config, input_dim, n_scenarios)
        dims = [input_dim] + [config.expert[-1]] * config.levels
        self.layers = nn.ModuleList(
            CGC(config, dims[i], n_scenarios, last=i == config.levels - 1) for i in range(config.levels)
        )
        self.towers = StackedMLP(n_scenarios, [config.expert[-1], *config.tower, 1], config.dropout, last_act=False)

    def forward(self, x: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(1).expand(-1, self.n_scenarios + 1, -1)
        for layer in self.layers:
            h = layer(h)
        return select(self.towers(h[:, : self.n_scenarios]), scenario).squeeze(-1)
