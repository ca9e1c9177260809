"""The HTTP contract of the ranker (docs/architecture.md, HTTP API) as pydantic models; /docs is generated from these."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated, Any, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter
from typing_extensions import NotRequired, TypedDict

ID_MAX = 256
Id = Annotated[str, StringConstraints(min_length=1, max_length=ID_MAX)]
Feature = Union[str, int, float, bool]  # noqa: UP007 (a runtime type for pydantic, also on Python 3.10)
FEATURE_SCHEMA = {"type": ["string", "integer", "number", "boolean"]}

# Error entries listed per 422 at most: the answer to a hostile body stays small.
MAX_ERRORS = 10


# The request side is TypedDicts validated by one TypeAdapter: pydantic checks them in Rust straight from the
# JSON bytes without building a model object per candidate (~3x faster than BaseModels for 500 candidates).
class Candidate(TypedDict):
    """A candidate item. Further fields are optional categorical features: the fields the model was trained on
    (listed in /docs) must be a string, number or boolean; any other field is ignored (at no cost) and may also be
    null, but no field may hold an object or array. At most the server's max_candidate_fields (default 64) fields
    besides item_id per candidate; more -> 422 naming the candidate."""

    __pydantic_config__ = ConfigDict(  # type: ignore[misc]
        extra="allow",
        json_schema_extra={"additionalProperties": {"type": [*FEATURE_SCHEMA["type"], "null"]}},
    )
    item_id: Id


def _rank_request(max_candidates: int | None = None, feature_fields: tuple[str, ...] | None = None) -> type:
    """The request type. With `max_candidates`, pydantic refuses a longer list before validating its items (a body
    of 400k bare numbers would otherwise make 400k errors). With `feature_fields`, a candidate keeps only item_id
    and those fields, typed; pydantic skips every other key in Rust, so none becomes a Python object."""
    candidate: type = Candidate
    if feature_fields is not None:
        fields = {"item_id": Id, **{f: NotRequired[Feature] for f in feature_fields}}
        candidate = TypedDict("Candidate", fields)  # type: ignore[operator]  # noqa: UP013 (runtime field names)
        candidate.__pydantic_config__ = ConfigDict(extra="ignore")  # type: ignore[attr-defined]
    candidates = Field(
        description="at most the server's max_candidates (default 1000). An item_id given more than once is scored "
        "and returned once (the first occurrence's features win); the repeats are reported in `fallbacks` as "
        "{level: item_id, reason: duplicate, count}",
        max_length=max_candidates,
    )
    cls = TypedDict(  # noqa: UP013 (functional form: the limit is a runtime value)
        "RankRequest",
        {
            "user_id": Id,
            "scenario": Annotated[Id, Field(description="one of the model's scenarios")],
            "candidates": Annotated[list[candidate], candidates],  # type: ignore[valid-type]
            "top_k": NotRequired[
                Annotated[int | None, Field(ge=1, description="items to return (default: server setting)")]
            ],
        },
    )
    cls.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]
    return cls


RankRequest = _rank_request()
RANK_REQUEST = TypeAdapter(RankRequest)  # the documented contract (/docs adds the server's limits and features)


@functools.lru_cache(maxsize=8)
def rank_request_adapter(max_candidates: int, feature_fields: tuple[str, ...]) -> TypeAdapter:
    """The validator the service uses for one model: the contract, the server's candidate limit and the model's
    own feature fields, all checked in Rust; candidates' other keys are skipped (and counted by scan_body)."""
    return TypeAdapter(_rank_request(max_candidates, tuple(feature_fields)))


# The change of depth at each structural byte (scan_body).
_DEPTH_STEP = np.zeros(256, dtype=np.int32)
_DEPTH_STEP[[ord("{"), ord("[")]] = 1
_DEPTH_STEP[[ord("}"), ord("]")]] = -1
_OBJ, _ARR, _COLON = ord("{"), ord("["), ord(":")


@dataclass(frozen=True)
class BodyShape:
    """The containers of a /rank body, from its bytes (exact for valid JSON, see scan_body)."""

    starts: np.ndarray  # byte offset of each object at depth 3: in a valid request, the candidates in order
    keys: np.ndarray  # the number of keys of each (item_id included)
    deep_at: int | None  # byte offset of the first object or array deeper than 3 (a field holding one), or None
    deep_in: int | None  # which of `starts` holds it, None when it is not inside one of them

    def deep_error(self) -> dict | None:
        """The 422 entry for a field value that is an object or array (candidate fields are flat), or None."""
        if self.deep_at is None:
            return None
        if self.deep_in is None:
            msg = f"not a valid request: not JSON, or nested deeper than a request is (byte {self.deep_at})"
            return {"loc": ["body"], "msg": msg, "type": "too_deep"}
        return {
            "loc": ["body", "candidates", self.deep_in],
            "msg": f"candidate {self.deep_in} has a field holding an object or array (byte {self.deep_at}); "
            "candidate fields must be strings, numbers or booleans",
            "type": "value_error",
        }


def scan_body(body: bytes) -> BodyShape:
    """The containers of a body in a few numpy passes over its bytes: O(body), no Python object per key or value.

    Escapes are blanked first, so that every remaining quote delimits a string; a structural character is inside
    a string when an odd number of quotes precede it. A valid request has the root object (depth 1), the candidates
    list (2) and the candidates (3), whose colons are their keys; anything deeper is a field holding an object or
    array. Used before pydantic parses the body (a 1 MB body of nested arrays costs it ~10x a flat one) and, with
    the candidate count it parsed, to count each candidate's keys without building them."""
    if b"\\" in body:
        body = body.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    raw = np.frombuffer(body, dtype=np.uint8)
    inside = np.bitwise_xor.accumulate((raw == ord('"')).view(np.uint8)).view(bool)  # in a string (or its "open)
    structural = (raw == _COLON) | (raw == _OBJ) | (raw == ord("}")) | (raw == _ARR) | (raw == ord("]"))
    structural &= ~inside
    pos = np.flatnonzero(structural)  # every numpy pass above is over the bytes; from here, over these only
    c = raw[pos]
    depth = np.cumsum(_DEPTH_STEP[c])  # after each character: an opener's own depth
    opens3 = (depth == 3) & ((c == _OBJ) | (c == _ARR))
    starts = pos[opens3 & (c == _OBJ)]
    colons = pos[(c == _COLON) & (depth == 3)]
    owner = np.searchsorted(starts, colons, side="right") - 1
    keys = np.bincount(owner[owner >= 0], minlength=len(starts))  # (>= 0 always holds for valid JSON)
    deep = np.flatnonzero(depth > 3)
    deep_at = deep_in = None
    if len(deep):
        deep_at = int(pos[deep[0]])
        holder = np.flatnonzero(opens3[: deep[0]])  # the depth-3 container it is in: the last one opened before it
        if len(holder) and c[holder[-1]] == _OBJ:
            deep_in = int(np.searchsorted(starts, pos[holder[-1]]))
    return BodyShape(starts, keys[: len(starts)], deep_at, deep_in)


def candidate_field_errors(counts: np.ndarray, max_fields: int) -> list[dict]:
    """One error per candidate (the first MAX_ERRORS) with more than max_fields keys besides item_id (counts: the
    keys of each candidate, item_id included, as BodyShape.keys)."""
    return [
        {
            "loc": ["body", "candidates", int(i)],
            "msg": f"candidate {i} has {counts[i] - 1} fields besides item_id, more than max_candidate_fields "
            f"{max_fields}",
            "type": "too_many_fields",
        }
        for i in np.flatnonzero(counts - 1 > max_fields)[:MAX_ERRORS]
    ]


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
    worker_pid: int = Field(description="the worker process that answered (each worker loads model and knowledge)")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    artifact: str | None = Field(None, description="artifact folder to load (default: reload the current one)")


class ReloadResponse(BaseModel):
    model_version: str
    knowledge_version: str | None
    workers: int = Field(description="worker processes now serving this model (every live one)")


class ErrorResponse(BaseModel):
    detail: str | list[dict[str, Any]]
