"""The HTTP contract of the ranker (DESIGN section 6) as pydantic models; /docs is generated from these."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter
from typing_extensions import NotRequired, TypedDict

ID_MAX = 256
Id = Annotated[str, StringConstraints(min_length=1, max_length=ID_MAX)]
FEATURE_TYPES = (str, int, float, bool)


# The request side is TypedDicts validated by one TypeAdapter: pydantic checks them in Rust straight from the
# JSON bytes without building a model object per candidate (~3x faster than BaseModels for 500 candidates).
class Candidate(TypedDict):
    """A candidate item; any further flat field (string, number, boolean) is an optional categorical feature."""

    __pydantic_config__ = ConfigDict(  # type: ignore[misc]
        extra="allow",
        json_schema_extra={"additionalProperties": {"type": ["string", "integer", "number", "boolean"]}},
    )
    item_id: Id


class RankRequest(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    user_id: Id
    scenario: Annotated[Id, Field(description="one of the model's scenarios")]
    candidates: Annotated[list[Candidate], Field(description="at most the server's max_candidates (default 1000)")]
    top_k: NotRequired[Annotated[int | None, Field(ge=1, description="items to return (default: server setting)")]]


RANK_REQUEST = TypeAdapter(RankRequest)


def candidate_feature_errors(candidates: list[dict]) -> list[dict]:
    """Extra candidate fields must be flat values (the TypedDict admits anything there)."""
    errors = []
    for i, cand in enumerate(candidates):
        if len(cand) > 1:
            for name, value in cand.items():
                if name != "item_id" and (value is None or not isinstance(value, FEATURE_TYPES)):
                    errors.append(
                        {
                            "loc": ["body", "candidates", i, name],
                            "msg": f"feature {name!r} must be a string, number or boolean",
                            "type": "value_error",
                        }
                    )
    return errors


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
