"""STAR (Sheng et al., CIKM 2021): partitioned normalization, star-topology FCN and an auxiliary network.

Partitioned normalization keeps running mean/variance per scenario. In training each scenario's rows are
normalized with their own batch statistics (as in the paper) and the running buffers are updated; in eval mode the
running buffers are used, so scores never depend on the batch (unlike a public implementation that keeps batch
statistics at test time). The trainer recounts the buffers over sampled train batches before each validation
check (RecountableStatistics, --norm-stats-batches), so eval mode normalizes with the statistics of the weights it
evaluates.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shared.models.backbones.base import (
    Backbone,
    BackboneConfig,
    FusedPerScenario,
    RecountableStatistics,
    mlp,
    single_scenario,
)


class STARConfig(BackboneConfig):
    hidden: list[int] = [128, 64]
    aux_hidden: list[int] = [16]
    scenario_dim: int = 8
    momentum: float = 0.1
    eps: float = 1e-5


class PartitionedNorm(RecountableStatistics):
    """gamma * gamma_s * (x - mu_s) / sigma_s + beta + beta_s."""

    def __init__(self, dim: int, n_scenarios: int, momentum: float, eps: float):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.gamma_s = nn.Parameter(torch.ones(n_scenarios, dim))
        self.beta_s = nn.Parameter(torch.zeros(n_scenarios, dim))
        self.register_buffer("running_mean", torch.zeros(n_scenarios, dim))
        self.register_buffer("running_var", torch.ones(n_scenarios, dim))
        self._fused = FusedPerScenario()
        self._recount: list[int] | None = None  # batches counted per scenario while recounting

    def recount_start(self) -> None:
        self._recount = [0] * self.running_mean.shape[0]

    def recount_stop(self) -> None:
        self._recount = None

    def _update_rate(self, s: int) -> float:
        """The running statistics' step towards a batch: momentum, or 1/k for the k-th batch while recounting
        (the plain average of the batches counted)."""
        if self._recount is None:
            return self.momentum
        self._recount[s] += 1
        return 1.0 / self._recount[s]

    def _fuse(self, one: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.rsqrt(self.running_var[one] + self.eps) * (self.gamma * self.gamma_s[one])
        return self.beta + self.beta_s[one] - self.running_mean[one] * scale, scale

    def forward(self, x: torch.Tensor, scenario: torch.Tensor, one: int | None = None) -> torch.Tensor:
        """`one`: the scenario index when every row has it (single_scenario), computed once by the caller."""
        if self.training:
            mean = torch.zeros_like(x)
            var = torch.ones_like(x)
            for s in torch.unique(scenario).tolist():
                rows = scenario == s
                xs = x[rows]
                if xs.shape[0] < 2:
                    mean[rows] = self.running_mean[s]
                    var[rows] = self.running_var[s]
                    continue
                m, v = xs.mean(0), xs.var(0, unbiased=False)
                mean[rows], var[rows] = m, v
                with torch.no_grad():
                    rate = self._update_rate(s)
                    self.running_mean[s].lerp_(m.detach(), rate)
                    self.running_var[s].lerp_(xs.detach().var(0, unbiased=True), rate)
        else:
            if one is not None:  # a ranking request (one scenario for all rows): one fused affine map
                shift, scale = self._fused.get(self, one, self._fuse)
                return torch.addcmul(shift, x, scale)
            mean, var = self.running_mean.index_select(0, scenario), self.running_var.index_select(0, scenario)
        normed = (x - mean) * torch.rsqrt(var + self.eps)
        gamma_s, beta_s = self.gamma_s.index_select(0, scenario), self.beta_s.index_select(0, scenario)
        return normed * (self.gamma * gamma_s) + self.beta + beta_s


class StarLinear(nn.Module):
    """One star-topology layer: W = W_shared * W_s (element-wise), b = b_shared + b_s."""

    def __init__(self, in_dim: int, out_dim: int, n_scenarios: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.w_shared = nn.Parameter(torch.empty(in_dim, out_dim).uniform_(-bound, bound))
        self.w_s = nn.Parameter(torch.ones(n_scenarios, in_dim, out_dim))
        self.b_shared = nn.Parameter(torch.zeros(out_dim))
        self.b_s = nn.Parameter(torch.zeros(n_scenarios, out_dim))
        self._fused = FusedPerScenario()

    def _fuse(self, one: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.b_shared + self.b_s[one], self.w_shared * self.w_s[one]

    def forward(self, x: torch.Tensor, scenario: torch.Tensor, one: int | None = None) -> torch.Tensor:
        """`one`: the scenario index when every row has it (single_scenario), computed once by the caller."""
        if one is not None:  # a ranking request (one scenario for all rows): one scenario's matmul, not all S
            bias, weight = self._fused.get(self, one, self._fuse)
            return torch.addmm(bias, x, weight)
        s, i, o = self.w_s.shape
        weights = (self.w_shared * self.w_s).permute(1, 0, 2).reshape(i, s * o)  # all scenarios side by side
        out = (x @ weights).view(-1, s, o)
        out = out.gather(1, scenario.view(-1, 1, 1).expand(-1, 1, o)).squeeze(1)
        return out + self.b_shared + self.b_s.index_select(0, scenario)


class STAR(Backbone):
    config_class = STARConfig
    recountable_statistics = True

    def __init__(self, config: STARConfig, input_dim: int, n_scenarios: int):
        super().__init__(config, input_dim, n_scenarios)
        self.pn = PartitionedNorm(input_dim, n_scenarios, config.momentum, config.eps)
        dims = [input_dim, *config.hidden, 1]
        self.layers = nn.ModuleList(StarLinear(dims[i], dims[i + 1], n_scenarios) for i in range(len(dims) - 1))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # Auxiliary network: the scenario's own embedding (plus the input) -> a logit added to the main one.
        self.scenario_emb = nn.Embedding(n_scenarios, config.scenario_dim)
        self.aux = mlp([config.scenario_dim + input_dim, *config.aux_hidden, 1], last_act=False)

    def forward(self, x: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        one = single_scenario(scenario)
        h = self.pn(x, scenario, one)
        for i, layer in enumerate(self.layers):
            h = layer(h, scenario, one)
            if i < len(self.layers) - 1:
                h = self.dropout(torch.relu(h))
        aux = self.aux(torch.cat([self.scenario_emb(scenario), x], dim=-1))
        return (h + aux).squeeze(-1)
