"""The HTTP contract of the ranker (DESIGN section 6) as pydantic models; /docs is generated from these."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

ID_MAX = 256
FeatureValue = str | int | float | bool


class Candidate(BaseModel):
    """A candidate item; any further flat field is an optional categorical feature of the model."""

    model_config = ConfigDict(
        extra="allow", json_schema_extra={"additionalProperties": {"type": ["string", "integer", "number", "boolean"]}}
    )

    item_id: str = Field(min_length=1, max_length=ID_MAX)

    @model_validator(mode="after")
    def _flat_features(self) -> Candidate:
        for name, value in (self.model_extra or {}).items():
            if not isinstance(value, FeatureValue):
                raise ValueError(f"feature {name!r} must be a string, number or boolean")
        return self


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=ID_MAX)
    scenario: str = Field(min_length=1, max_length=ID_MAX)
    candidates: list[Candidate] = Field(description="at most the server's max_candidates (default 1000)")
    top_k: int | None = Field(None, ge=1, description="how many items to return (default: server setting)")


class RankedItem(BaseModel):
    item_id: str
    score: float


class FallbackOut(BaseModel):
    """A degraded input behind this answer, e.g. {level: user, reason: unknown} = cold-start default vector."""

    level: str
    reason: str
    count: int


class RankResponse(BaseModel):
    items: list[RankedItem]
    model_version: str
    knowledge_version: str | None
    fallbacks: list[FallbackOut]


class ExplainResponse(BaseModel):
    user_id: str
    known_user: bool = Field(description="the knowledge version has an answer for this user")
    user_answer: str | None = Field(description="the LLM's user-level answer (interests per scenario)")
    scenario_answers: dict[str, str] = Field(description="scenario-level answers (the requested one, or all)")
    model_version: str
    knowledge_version: str | None
    fallbacks: list[FallbackOut]


class HealthResponse(BaseModel):
    status: str


class ReadyResponse(BaseModel):
    ready: bool
    model_version: str | None
    knowledge: dict[str, Any]


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    artifact: str | None = Field(None, description="artifact folder to load (default: reload the current one)")


class ReloadResponse(BaseModel):
    model_version: str
    knowledge_version: str | None


class ErrorResponse(BaseModel):
    detail: str | list[dict[str, Any]]
