"""The one interface every multi-scenario backbone implements, and small building blocks they share.

A backbone maps the concatenated input embeddings x [B, D] and the scenario index [B] to one CTR logit per row.
Every operation is row-wise in eval mode (normalization uses running statistics), so a row's score never depends
on what else is in the batch: the ranker's 500-candidate request and the evaluator's 4096-row batch agree.

Per-row parameters are gathered with index_select, gather or an embedding, never with advanced indexing
(param[scenario]): on CPU the latter's backward adds into the shared rows with atomic floats across threads, so
training at 2+ threads would not be reproducible (the trainer's deterministic mode serializes it as a guard, but
the models should not depend on it).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class BackboneConfig(BaseModel):
    """Hyper-parameters of one architecture; subclasses add their own fields (the registry names the
    architecture)."""

    model_config = ConfigDict(extra="forbid")
    dropout: float = 0.0


class Backbone(nn.Module):
    """Subclasses set `config_class` and implement forward(x, scenario) -> logits [B]."""

    config_class: ClassVar[type[BackboneConfig]] = BackboneConfig
    # True when the architecture has RecountableStatistics layers: training settings about them (the trainer's
    # norm_stats_batches) matter for it only.
    recountable_statistics: ClassVar[bool] = False

    def __init__(self, config: BackboneConfig, input_dim: int, n_scenarios: int):
        super().__init__()
        self.config = config
        self.input_dim = input_dim
        self.n_scenarios = n_scenarios

    def forward(self, x: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class RecountableStatistics(nn.Module):
    """A normalization that keeps running statistics for eval mode and can recount them exactly.

    In training the running statistics are an exponential average over the last ~1/momentum batches, taken while
    the layers below them still move; when those layers learn fast (LLM4MSR's knowledge pathway), eval mode
    normalizes with statistics of a network that no longer exists. Between recount_start and recount_stop, every
    train-mode forward adds its batch to a plain average instead, so that a pass over sampled train rows with the
    weights held (offline/training/trainer.py) sets statistics that match them.
    """

    def recount_start(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def recount_stop(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def single_scenario(scenario: torch.Tensor) -> int | None:
    """The scenario index when every row has the same one (the serving path: one request), else None.

    The fast paths it enables compute the same values as the general ones up to float rounding (~1e-7).
    """
    if scenario.numel() == 0:
        return None
    first = scenario[:1]
    return int(first) if bool((scenario == first).all()) else None


class FusedPerScenario:
    """One scenario's fused parameters (e.g. STAR's W_shared * W_s), computed once and reused while the module's
    parameters and buffers are unchanged: a ranking request then skips the per-layer fusing ops.

    Only without autograd (serving, evaluation): with gradients on, the fused tensors are recomputed on every call so
    that backward reaches the parameters. A cached entry is keyed by the version counters of the module's own
    tensors, which every in-place change (an optimizer step, load_state_dict, a running-statistics update) bumps.
    """

    def __init__(self) -> None:
        self._cache: dict[int, tuple[tuple[int, ...], tuple[torch.Tensor, ...]]] = {}

    def get(self, module: nn.Module, one: int, fuse) -> tuple[torch.Tensor, ...]:
        if torch.is_grad_enabled():
            return fuse(one)
        versions = tuple(t._version for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)))
        hit = self._cache.get(one)
        if hit is not None and hit[0] == versions:
            return hit[1]
        fused = fuse(one)
        self._cache[one] = (versions, fused)  # one dict store: safe with concurrent request threads
        return fused

    # A copied or unpickled module starts with an empty cache (its tensors' version counters start afresh).
    def __deepcopy__(self, memo: dict) -> FusedPerScenario:
        return FusedPerScenario()

    def __getstate__(self) -> dict:
        return {"_cache": {}}


def mlp(dims: list[int], dropout: float = 0.0, last_act: bool = True) -> nn.Sequential:
    """Linear + ReLU stack; dims = [in, h1, ..., out]."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2 or last_act:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class StackedLinear(nn.Module):
    """K independent linear maps applied to the same or to K different inputs in one einsum.

    Used for per-scenario towers and experts: with few scenarios, computing all of them and selecting the row's
    own is faster on CPU than gathering per-row weight matrices, and it is batch-independent.
    """

    def __init__(self, k: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(k, out_dim))
        bound = 1.0 / math.sqrt(in_dim)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, D] (shared input) or [B, K, D] (one input per map) -> [B, K, out]."""
        k, d, o = self.weight.shape
        if x.dim() == 2:  # one matmul against all K maps side by side
            out = (x @ self.weight.permute(1, 0, 2).reshape(d, k * o)).view(-1, k, o)
        else:  # K matmuls, batched over K
            out = torch.bmm(x.transpose(0, 1), self.weight).transpose(0, 1)
        return out + self.bias


class StackedMLP(nn.Module):
    """K MLPs of the same shape evaluated together: [B, D] or [B, K, D] -> [B, K, dims[-1]]."""

    def __init__(self, k: int, dims: list[int], dropout: float = 0.0, last_act: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(StackedLinear(k, dims[i], dims[i + 1]) for i in range(len(dims) - 1))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.last_act = last_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1 or self.last_act:
                x = self.dropout(torch.relu(x))
        return x


def select(stacked: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
    """[B, S, ...] -> [B, ...]: each row's own scenario slice."""
    index = scenario.view(-1, *([1] * (stacked.dim() - 1))).expand(-1, 1, *stacked.shape[2:])
    return stacked.gather(1, index).squeeze(1)
