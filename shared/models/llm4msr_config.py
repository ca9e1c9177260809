"""The LLM4MSR wrapper's hyper-parameters, apart from the torch module (shared/models/llm4msr.py), so that
training configs and CLI options can be built without importing torch.

Field descriptions are the help of the generated CLI flags; `cli: False` keeps a field off the command line.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.errors import UserFacingError
from shared.knowledge.levels import LEVELS, META_LEVELS


class LLM4MSRConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    levels: list[str] = Field(
        ["scenario", "user"], description="comma list of scenario,user,item (paper: scenario,user)"
    )
    placement: Literal["bottom", "parallel", "both"] = "both"
    knowledge_source: Literal["llm", "id", "random"] = Field(
        "llm", description="llm = snapshot vectors; id / random = the controls (learnable ids / fixed random vectors)"
    )
    # Dimension of the raw knowledge vectors (the knowledge space's dim) for the llm source: set from the snapshot.
    knowledge_dim: int = Field(0, json_schema_extra={"cli": False})
    # LLM vectors are standardized and reduced by a frozen PCA fitted on the snapshot (buffers) to this size
    # before the learned projection: cheaper per row, and robust to the outlier dimensions of LLM hidden states.
    reduce_dim: int = Field(64, description="LLM4MSR: frozen PCA size of the LLM vectors")
    proj_dim: int = Field(32, description="LLM4MSR: projected knowledge size")
    meta_dim: int = Field(32, description="LLM4MSR: meta layer width")
    rank: int = Field(8, description="LLM4MSR: rank of the generated weights")
    hyper_hidden: int = Field(32, description="LLM4MSR: hypernetwork hidden size")

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
