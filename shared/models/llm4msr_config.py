"""The LLM4MSR wrapper's hyper-parameters, apart from the torch module (shared/models/llm4msr.py), so that
training configs and CLI options can be built without importing torch.

Field descriptions are the help of the generated CLI flags; `cli: False` keeps a field off the command line.

Stored configs (an artifact's config.json) are read with the validation context `{STORED_CONFIG: True}`: a field
added after artifacts were first written then takes the value that reproduces the model those artifacts hold
(`ABSENT_MEANS`), not the default of new models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from shared.errors import UserFacingError
from shared.knowledge.levels import LEVELS, META_LEVELS

# Validation context key: the config is read back from a stored artifact (see the module doc).
STORED_CONFIG = "stored_config"
# Fields newer than the first artifacts, with the value their absence means in a stored config: the model of that
# time (no gate parameters, no knowledge dropout). Also left out of the artifact checksum at that value, so the
# checksums of artifacts written before them still verify (shared/artifact.py).
ABSENT_MEANS: dict[str, Any] = {"gate": "none", "gate_decay": 0.0, "knowledge_dropout": 0.0}


def fill_absent_if_stored(data: Any, info: ValidationInfo, absent: dict[str, Any]) -> Any:
    """The raw input of a config model with the fields it lacks set to `absent` when it is read from a stored
    artifact (validation context STORED_CONFIG); any other input unchanged."""
    if info.context and info.context.get(STORED_CONFIG) and isinstance(data, dict):
        return {**absent, **data}
    return data


class LLM4MSRConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    levels: list[str] = Field(
        ["scenario", "user"], description="comma list of scenario,user,item (paper: scenario,user)"
    )
    # Where the meta layers act: parallel is a logit beside the backbone, bottom modulates the backbone's input.
    # The paper places them at both; on the whole amazon-arts-office the bottom path made the scenario,user,item
    # models of five of six backbones peak after one epoch, and parallel alone was better on validation (README,
    # Quality).
    placement: Literal["bottom", "parallel", "both"] = Field(
        "parallel",
        description="LLM4MSR: where the meta layers act: parallel (a logit beside the backbone), bottom (added to "
        "the backbone's input) or both (the paper's placement)",
    )
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
    # ReZero-style gates: k_l = alpha_l * P_l e_l with alpha_l starting at 0, so every level starts off and opens
    # only as far as it lowers the training loss; gate_decay pulls it back, so a level that does not help stays
    # nearly shut (shared/models/llm4msr.py).
    gate: Literal["none", "scalar", "vector"] = Field(
        "scalar",
        description="LLM4MSR: learned gate per knowledge level, starting closed (scalar: one per level; vector: one "
        "per projected dimension; none: ungated, the model of artifacts saved before gates)",
    )
    gate_decay: float = Field(
        0.1,
        description="LLM4MSR: pull of each gate towards closed while training (an L2 prior on the stored gate; 0 = "
        "none): a level stays shut unless the loss keeps opening it",
    )
    knowledge_dropout: float = Field(
        0.0, description="LLM4MSR: dropout rate on each level's projected knowledge while training (0 <= rate < 1)"
    )

    @model_validator(mode="before")
    @classmethod
    def _absent_in_stored_config(cls, data: Any, info: ValidationInfo) -> Any:
        """A stored config without a newer field holds the model of its time, not today's default."""
        return fill_absent_if_stored(data, info, ABSENT_MEANS)

    @field_validator("levels")
    @classmethod
    def _check_levels(cls, levels: list[str]) -> list[str]:
        bad = [lv for lv in levels if lv not in LEVELS]
        if bad:
            raise UserFacingError(f"unknown knowledge level(s) {bad}; choose from {', '.join(LEVELS)}")
        if not levels:
            raise UserFacingError(f"LLM4MSR levels must not be empty; choose from {', '.join(LEVELS)}")
        return [lv for lv in LEVELS if lv in levels]  # canonical order

    @field_validator("knowledge_dropout")
    @classmethod
    def _check_dropout(cls, rate: float) -> float:
        if not 0.0 <= rate < 1.0:
            raise UserFacingError(f"knowledge_dropout must be in [0, 1), got {rate}")
        return rate

    @field_validator("gate_decay")
    @classmethod
    def _check_gate_decay(cls, decay: float) -> float:
        if decay < 0.0:
            raise UserFacingError(f"gate_decay must be >= 0, got {decay}")
        return decay

    @property
    def meta_levels(self) -> list[str]:
        return [lv for lv in META_LEVELS if lv in self.levels]

    @property
    def has_meta_layers(self) -> bool:
        """False for item-only knowledge: it joins the backbone input and nothing else (placement is unused)."""
        return bool(self.meta_levels)

    @property
    def uses_item(self) -> bool:
        return "item" in self.levels

    @property
    def interaction(self) -> bool:
        return self.uses_item and "user" in self.levels
