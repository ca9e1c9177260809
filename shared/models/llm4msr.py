"""LLM4MSR hierarchical meta networks (DESIGN section 4), wrapped around any backbone.

    k_s = P_s e_s,  k_u = P_u e_u                     learned projections of frozen knowledge vectors
    m_s = act(W_s(k_s)^T x + b_s(k_s))                 scenario-level meta layer
    m_u = act(W_u(k_u, k_s)^T m_s + b_u(k_u, k_s))     user-level meta layer, conditioned on the scenario level
    bottom:   x~ = x + A m_u        parallel:  z = w^T m_u        y = sigmoid(backbone(x~, s) + z)

Generated weights are low rank, W(k) = U diag(1 + g(k)) V (as in APG/HAMUR): the hypernetwork emits r gains and a
bias instead of a D x h matrix, so a request computes g once for its (scenario, user) and every candidate pays only
x U (shared weights), an element-wise product and V. Item level (extension): k_i = P_i e_i joins x, and k_u * k_i
joins the meta layers' input so the user's knowledge is matched explicitly against the item's.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn

from shared.errors import UserFacingError

LEVELS = ("scenario", "user", "item")
META_LEVELS = ("scenario", "user")


class LLM4MSRConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    levels: list[str] = ["scenario", "user"]
    placement: Literal["bottom", "parallel", "both"] = "both"
    knowledge_source: Literal["llm", "id", "random"] = "llm"
    # Dimension of the raw knowledge vectors (the knowledge space's dim) for the llm source.
    knowledge_dim: int = 0
    proj_dim: int = 32
    meta_dim: int = 64
    rank: int = 16
    hyper_hidden: int = 64

    @field_validator("levels")
    @classmethod
    def _check_levels(cls, levels: list[str]) -> list[str]:
        bad = [lv for lv in levels if lv not in LEVELS]
        if bad:
            raise UserFacingError(f"unknown knowledge level(s) {bad}; choose from {', '.join(LEVELS)}")
        if not any(lv in levels for lv in META_LEVELS):
            raise UserFacingError("LLM4MSR levels must include 'scenario' or 'user' (the meta layers' inputs)")
        return [lv for lv in LEVELS if lv in levels]  # canonical order

    @property
    def meta_levels(self) -> list[str]:
        return [lv for lv in META_LEVELS if lv in self.levels]

    @property
    def uses_item(self) -> bool:
        return "item" in self.levels

    @property
    def interaction(self) -> bool:
        return self.uses_item and "user" in self.levels


class LowRankMetaLayer(nn.Module):
    """act(x U diag(1 + g(c)) V + b0 + b(c)), with g and b produced by a small MLP from the condition c."""

    def __init__(self, in_dim: int, out_dim: int, cond_dim: int, rank: int, hidden: int):
        super().__init__()
        self.u = nn.Linear(in_dim, rank, bias=False)
        self.v = nn.Linear(rank, out_dim)
        self.hyper = nn.Sequential(nn.Linear(cond_dim, hidden), nn.ReLU(), nn.Linear(hidden, rank + out_dim))
        self.rank = rank
        nn.init.normal_(self.hyper[-1].weight, std=0.01)
        nn.init.zeros_(self.hyper[-1].bias)

    def generate(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The generated layer (gains [G, r], bias [G, out]); G = 1 for a request, B in training."""
        out = self.hyper(cond)
        return 1.0 + out[:, : self.rank], out[:, self.rank :]

    def apply(self, x: torch.Tensor, gains: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.v(self.u(x) * gains) + bias)


class LLM4MSR(nn.Module):
    """Turns knowledge vectors into a modified backbone input and a parallel logit."""

    def __init__(self, config: LLM4MSRConfig, x_dim: int, n_scenarios: int, n_users: int, n_items: int):
        super().__init__()
        self.config = config
        c = config
        sizes = {"scenario": n_scenarios, "user": n_users, "item": n_items}
        raw_dim = c.knowledge_dim if c.knowledge_source == "llm" else c.proj_dim
        if c.knowledge_source == "llm" and raw_dim <= 0:
            raise UserFacingError("the llm knowledge source needs knowledge_dim (the snapshot's vector size)")
        self.proj = nn.ModuleDict({lv: nn.Linear(raw_dim, c.proj_dim) for lv in c.levels})
        if c.knowledge_source == "llm":
            # Per-level standardization of the raw LLM vectors (fitted on the snapshot, frozen): hidden states of
            # small LLMs have a few huge outlier dimensions that would otherwise dominate the projection.
            for lv in c.levels:
                self.register_buffer(f"mean_{lv}", torch.zeros(raw_dim))
                self.register_buffer(f"scale_{lv}", torch.ones(raw_dim))
        elif c.knowledge_source == "id":
            self.id_emb = nn.ModuleDict({lv: nn.Embedding(sizes[lv], c.proj_dim) for lv in c.levels})
            for emb in self.id_emb.values():
                nn.init.normal_(emb.weight, std=0.1)
        else:
            # Fixed random vectors per entity, saved with the model (buffers), so the control is reproducible.
            gen = torch.Generator().manual_seed(1234)
            for lv in c.levels:
                self.register_buffer(f"random_{lv}", torch.randn(sizes[lv], c.proj_dim, generator=gen))
        self.x_dim = x_dim + (c.proj_dim if c.uses_item else 0)  # backbone input: [x; k_i]
        meta_in = self.x_dim + (c.proj_dim if c.interaction else 0)
        self.meta = nn.ModuleList()
        for j, _lv in enumerate(c.meta_levels):
            self.meta.append(
                LowRankMetaLayer(
                    meta_in if j == 0 else c.meta_dim, c.meta_dim, c.proj_dim * (j + 1), c.rank, c.hyper_hidden
                )
            )
        self.bottom = None
        self.parallel = None
        if c.placement in ("bottom", "both"):
            self.bottom = nn.Linear(c.meta_dim, self.x_dim)
            nn.init.zeros_(self.bottom.weight)  # starts as the plain backbone; learns how much to modulate
        if c.placement in ("parallel", "both"):
            self.parallel = nn.Linear(c.meta_dim, 1)

    @property
    def needs_levels(self) -> frozenset[str]:
        return frozenset(self.config.levels) if self.config.knowledge_source == "llm" else frozenset()

    def set_normalization(self, level: str, mean: torch.Tensor, scale: torch.Tensor) -> None:
        getattr(self, f"mean_{level}").copy_(mean)
        getattr(self, f"scale_{level}").copy_(scale)

    def _knowledge(self, level: str, raw: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor:
        """Projected knowledge k for a level: [G, proj_dim]. index = the entity's vocabulary index [B]."""
        src = self.config.knowledge_source
        if src == "id":
            vec = self.id_emb[level](index)
        elif src == "random":
            vec = getattr(self, f"random_{level}")[index]
        else:
            if raw is None:
                raise UserFacingError(f"this model needs {level}-level knowledge vectors")
            vec = (raw - getattr(self, f"mean_{level}")) * getattr(self, f"scale_{level}")
            vec = torch.nan_to_num(vec, nan=0.0)  # a missing vector (NaN row) = the level's average
        return self.proj[level](vec)

    def forward(
        self,
        x: torch.Tensor,
        index: dict[str, torch.Tensor],
        raw: dict[str, torch.Tensor | None],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, D] -> (backbone input [B, D'], parallel logit [B] or None).

        raw[level] is [B, d] or [1, d] (one request: computed once and broadcast); index[level] is [B] or [1].
        """
        k = {lv: self._knowledge(lv, raw.get(lv), index[lv]) for lv in self.config.levels}
        if self.config.uses_item:
            x = torch.cat([x, k["item"].expand(x.shape[0], -1)], dim=-1)
        h = x
        if self.config.interaction:
            h = torch.cat([h, k["user"] * k["item"]], dim=-1)
        cond: list[torch.Tensor] = []
        for layer, lv in zip(self.meta, self.config.meta_levels):
            cond.append(k[lv])
            width = max(c.shape[0] for c in cond)
            gains, bias = layer.generate(torch.cat([c.expand(width, -1) for c in cond], dim=-1))
            h = layer.apply(h, gains, bias)
        x_out = x + self.bottom(h) if self.bottom is not None else x
        z = self.parallel(h).squeeze(-1) if self.parallel is not None else None
        return x_out, z
