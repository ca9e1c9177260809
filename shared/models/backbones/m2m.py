"""M2M (Zhang et al., 2022, "Leaving No One Behind"): shared experts, a meta attention that mixes them per scenario
and a meta tower whose layers are generated from the scenario's representation. One task (CTR) here.

    meta unit   W(S) = W0 + G_w S,  b(S) = b0 + G_b S         layer weights generated from the scenario's vector S
    experts     E_k = MLP_k(x)                                 k = 1..K, shared by every scenario
    attention   a_k = v^T relu([E_k, T] W_a(S) + b_a(S)),  R = sum_k softmax(a)_k E_k      T: the task's view
    tower       h_0 = R,  h_{l+1} = relu(h_l W_l(S) + b_l(S)) + h_l,  logit = h_L W_o(S) + b_o(S)

S is a learned embedding of the scenario (the paper's scenario knowledge representation; its scenario features are
the scenario id here). Every generated weight depends on the scenario alone, so a batch generates the S scenarios'
weights once ([S, in, out], S is small) and each row is multiplied with all of them side by side and keeps its own
(a gather, as STAR's layers do); a ranking request (one scenario) multiplies with its scenario's weights only. The
task's part of the attention's input, T W_a,T(S), is per scenario too and joins the generated bias.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shared.models.backbones.base import Backbone, BackboneConfig, StackedMLP, single_scenario


class M2MConfig(BackboneConfig):
    experts: int = 4
    expert: list[int] = [64, 32]
    scenario_dim: int = 16
    task_dim: int = 16
    attention_hidden: int = 32
    tower_layers: int = 2


class MetaLinear(nn.Module):
    """A linear layer whose weight and bias are generated from the scenario's representation (the meta unit)."""

    def __init__(self, in_dim: int, out_dim: int, cond_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        # The scenario-dependent part starts at the scale of the shared weight (uniform bound / sqrt(3) = std).
        self.generate_weight = nn.Linear(cond_dim, in_dim * out_dim, bias=False)
        self.generate_bias = nn.Linear(cond_dim, out_dim, bias=False)
        nn.init.normal_(self.generate_weight.weight, std=bound / math.sqrt(3 * cond_dim))
        nn.init.normal_(self.generate_bias.weight, std=bound / math.sqrt(3 * cond_dim))

    def generate(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cond [S, c] -> weights [S, in, out] and biases [S, out], one per scenario."""
        weight = self.generate_weight(cond).view(-1, self.in_dim, self.out_dim) + self.weight
        return weight, self.generate_bias(cond) + self.bias


def per_scenario_linear(
    h: torch.Tensor, scenario: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """h [B, in] times its own scenario's weight [S, in, out] plus bias [S, out] -> [B, out]."""
    one = single_scenario(scenario)
    if one is not None:  # a ranking request: one scenario's matmul, not all S
        return torch.addmm(bias[one], h, weight[one])
    s, i, o = weight.shape
    out = (h @ weight.permute(1, 0, 2).reshape(i, s * o)).view(-1, s, o)  # all scenarios side by side
    out = out.gather(1, scenario.view(-1, 1, 1).expand(-1, 1, o)).squeeze(1)
    return out + bias.index_select(0, scenario)


class MetaAttention(nn.Module):
    """Scores each expert from [E_k, T] through a scenario-generated layer; returns the softmax-weighted mix."""

    def __init__(self, expert_dim: int, task_dim: int, hidden: int, cond_dim: int):
        super().__init__()
        self.expert_dim = expert_dim
        self.layer = MetaLinear(expert_dim + task_dim, hidden, cond_dim)
        self.task = nn.Parameter(torch.randn(task_dim) * 0.1)  # the one task's view (CTR)
        self.score = nn.Linear(hidden, 1, bias=False)

    def forward(self, experts: torch.Tensor, scenario: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """experts [B, K, h], cond [S, c] -> [B, h]."""
        b, k, h = experts.shape
        weight, bias = self.layer.generate(cond)
        # [E, T] W = E W_E + T W_T: the task's share depends on the scenario only and joins the bias.
        bias = bias + torch.einsum("t,sto->so", self.task, weight[:, h:])
        rows = per_scenario_linear(experts.reshape(b * k, h), scenario.repeat_interleave(k), weight[:, :h], bias)
        attention = torch.softmax(self.score(torch.relu(rows)).view(b, k), dim=1)
        return (attention.unsqueeze(-1) * experts).sum(1)


class M2M(Backbone):
    config_class = M2MConfig

    def __init__(self, config: M2MConfig, input_dim: int, n_scenarios: int):
        super().__init__(config, input_dim, n_scenarios)
        width, c = config.expert[-1], config.scenario_dim
        self.scenario_emb = nn.Embedding(n_scenarios, c)
        self.experts = StackedMLP(config.experts, [input_dim, *config.expert], config.dropout)
        self.attention = MetaAttention(width, config.task_dim, config.attention_hidden, c)
        self.tower = nn.ModuleList(MetaLinear(width, width, c) for _ in range(config.tower_layers))
        self.output = MetaLinear(width, 1, c)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        cond = self.scenario_emb.weight  # [S, c]: every scenario's representation, its weights generated once
        h = self.attention(self.experts(x), scenario, cond)
        for layer in self.tower:
            h = self.dropout(torch.relu(per_scenario_linear(h, scenario, *layer.generate(cond)))) + h
        return per_scenario_linear(h, scenario, *self.output.generate(cond)).squeeze(-1)
