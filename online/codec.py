"""Bytes to a typed /rank query and a ranked result back to bytes: the decode and encode stages of POST /rank.

Decoding has two paths with one outcome. The fast path (orjson, then checks over whole columns) takes a body only
when it is plainly valid: JSON that orjson reads, one array, one object per candidate carrying only item_id and the
model's feature fields, as many colons as keys (so no repeated key and no bracket, brace or colon inside a string),
every value of the documented type and within the limits. Anything else goes to the checked path (a byte scan of the body's shape, then pydantic in Rust against the
RankRequest contract), which also writes every 422. A body the fast path takes is one the checked path accepts with
the same result (tests/test_serve_decode.py compares them), so the answers to bad input do not depend on the path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from online.errors import HTTPProblem
from online.knowledge import Fallback
from online.schemas import (
    ID_MAX,
    MAX_ERRORS,
    BodyShape,
    candidate_field_errors,
    rank_request_adapter,
    scan_body,
)

_ROOT_KEYS = frozenset({"user_id", "scenario", "candidates", "top_k"})
_FEATURE_TYPES = frozenset({str, int, float, bool, type(None)})
_BIG_INT = 2.0**63


@dataclass(frozen=True)
class RankQuery:
    """A validated /rank request, candidates as columns: distinct item ids (the first occurrence of a repeated id
    wins) and, per feature field of the model, the values aligned with them (None where a candidate has none)."""

    user_id: str
    scenario: str
    item_ids: list[str]
    features: dict[str, list[str | None]] | None  # None when no candidate carries any of the model's fields
    top_k: int | None
    duplicates: int  # candidates dropped because their item_id came earlier in the list


@dataclass(frozen=True)
class RankResult:
    """The scores of one query's candidates (aligned with item_ids), with what they were computed from."""

    item_ids: list[str]
    scores: np.ndarray
    fallbacks: list[Fallback]
    model_version: str
    knowledge_version: str | None


@dataclass(frozen=True)
class DecodeLimits:
    """What one request may carry (ServeSettings) and what the model reads of a candidate."""

    max_candidates: int
    max_candidate_fields: int
    feature_fields: tuple[str, ...]


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is known to exceed `limit` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPProblem(413, f"request body of {declared} bytes exceeds max_body_bytes {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPProblem(413, f"request body exceeds max_body_bytes {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_model(model: type[BaseModel], body: bytes) -> Any:
    """A small JSON body as a pydantic model, or a 422 listing the errors as FastAPI does."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise HTTPProblem(422, validation_errors(exc)) from None


def validation_errors(exc: ValidationError) -> list[dict]:
    """The errors as FastAPI lists them; a hostile body can make 100k of them, which are only counted (turning each
    into a dict and then JSON would hold the event loop for a second)."""
    count = exc.error_count()
    if count > MAX_ERRORS:
        msg = f"the body has {count} validation errors, too many to list; see the RankRequest schema at /docs"
        return [{"loc": ["body"], "msg": msg, "type": "too_many_errors"}]
    out, seen = [], set()
    for err in exc.errors(include_url=False, include_context=False, include_input=False):
        loc = err["loc"]
        if len(loc) == 4 and loc[0] == "candidates" and loc[3] in ("str", "int", "float", "bool"):
            # A feature value failed each member of its union: one entry for the field instead of four.
            if loc[:3] not in seen:
                seen.add(loc[:3])
                msg = f"feature {loc[2]!r} must be a string, number or boolean"
                out.append({"loc": ["body", *loc[:3]], "msg": msg, "type": "value_error"})
            continue
        out.append({"loc": ["body", *loc], "msg": err["msg"], "type": err["type"]})
    return out


def decode_rank(body: bytes, limits: DecodeLimits) -> RankQuery:
    """The query of a /rank body, or an HTTPProblem 422 naming what is wrong."""
    return fast_decode(body, limits) or checked_decode(body, limits)


def _is_id(value: object) -> bool:
    return type(value) is str and 0 < len(value) <= ID_MAX


def fast_decode(body: bytes, limits: DecodeLimits) -> RankQuery | None:
    """The query of a plainly valid body, or None (then `checked_decode` decides). Python work is per column
    (map over candidates), never per ignored key: a body with nested or extra structure never gets this far."""
    braces, colons = body.count(b"{"), body.count(b":")
    if body.count(b"[") != 1 or colons > 4 + (braces - 1) * (1 + len(limits.feature_fields)):
        # Not the one array of a request, or candidates with keys the model does not read: orjson would build
        # each of them, pydantic skips them in Rust (the worst admitted body has 64k such keys).
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(doc) is not dict or not _ROOT_KEYS.issuperset(doc):
        return None
    cands, top_k = doc.get("candidates"), doc.get("top_k")
    if not (_is_id(doc.get("user_id")) and _is_id(doc.get("scenario"))) or type(cands) is not list:
        return None
    if len(cands) > limits.max_candidates or (top_k is not None and (type(top_k) is not int or top_k < 1)):
        return None
    if braces != 1 + len(cands) or (cands and set(map(type, cands)) != {dict}):
        return None
    # As many colons as keys: no repeated key anywhere, no colon inside a string; then len() is each key count.
    if colons != len(doc) + sum(map(len, cands)):
        return None
    if cands and max(map(len, cands)) > limits.max_candidate_fields + 1:
        return None
    try:
        ids = [c["item_id"] for c in cands]
    except KeyError:
        return None
    if ids and (set(map(type, ids)) != {str} or min(map(len, ids)) < 1 or max(map(len, ids)) > ID_MAX):
        return None
    if not _flat_feature_values(cands, limits.feature_fields):
        return None
    ids, cands, duplicates = _first_occurrences(ids, cands)
    features = _feature_columns(cands, limits.feature_fields)
    return RankQuery(doc["user_id"], doc["scenario"], ids, features, top_k, duplicates)


def _first_occurrences(ids: list[str], cands: list[dict]) -> tuple[list[str], list[dict], int]:
    """Distinct item ids with their first candidate, in request order, and how many repeats were dropped."""
    if len(set(ids)) == len(ids):
        return ids, cands, 0
    first: dict[str, dict] = {}
    for item_id, cand in zip(ids, cands, strict=True):
        first.setdefault(item_id, cand)
    return list(first), list(first.values()), len(ids) - len(first)


def _flat_feature_values(cands: list[dict], fields: Sequence[str]) -> bool:
    """Whether every candidate's value of every model field is a string, number or boolean, as the contract says
    (an explicit null refused too), and one that orjson and pydantic read alike."""
    for name in fields:
        col = [c.get(name) for c in cands]
        types = set(map(type, col))
        if not types <= _FEATURE_TYPES:
            return False
        if float in types and any(type(v) is float and abs(v) >= _BIG_INT for v in col):
            return False  # perhaps an integer beyond 64 bits, which orjson reads as a float and pydantic as an int
        missing = col.count(None)
        if missing and sum(1 for c in cands if name in c) != len(col) - missing:
            return False  # an explicit null
    return True


def _feature_columns(cands: list[dict], fields: Sequence[str]) -> dict[str, list[str | None]] | None:
    """The model's feature columns as strings, None where a candidate has none; a column no candidate carries is
    left out (the model encodes it as unknown), and so is the whole dict when none is left."""
    out: dict[str, list[str | None]] = {}
    for name in fields:
        col = [c.get(name) for c in cands]
        if col.count(None) < len(col):
            out[name] = [None if v is None else str(v) for v in col]
    return out or None


def checked_decode(body: bytes, limits: DecodeLimits) -> RankQuery:
    """The strict path: the body's shape is scanned on its bytes where it could be costly (nested values, many
    fields), then pydantic validates it in Rust (candidates keep only item_id and the model's fields; it skips
    other keys without building them). Every step is linear in the body (the worst admitted body, 1 MB of 1000
    candidates x 64 fields: bench/abuse_bench.py)."""
    shape = None
    # Cheap upper bounds first: a body with more brackets or colons than a flat request of max_candidates plain
    # candidates may nest values or carry many fields, so its shape is scanned before pydantic parses it.
    if (
        body.count(b"[") > 1
        or body.count(b"{") > 1 + limits.max_candidates
        or body.count(b":") > 4 + limits.max_candidate_fields
    ):
        shape = _flat_shape(body)
        _check_field_counts(shape, limits)
    try:
        req = rank_request_adapter(limits.max_candidates, limits.feature_fields).validate_json(body)
    except ValidationError as exc:
        raise HTTPProblem(422, _rank_errors(exc, limits.max_candidates)) from None
    cands = req["candidates"]
    if shape is None and body.count(b"{") > 1 + len(cands):  # a small body with an object inside a candidate
        shape = _flat_shape(body)
    if shape is not None:
        if len(shape.starts) != len(cands):
            raise HTTPProblem(422, "the body repeats a key of the request object; send each key once")
        _check_field_counts(shape, limits)
    ids, cands, duplicates = _first_occurrences([c["item_id"] for c in cands], cands)
    features = _feature_columns(cands, limits.feature_fields)
    return RankQuery(req["user_id"], req["scenario"], ids, features, req.get("top_k"), duplicates)


def _flat_shape(body: bytes) -> BodyShape:
    """The body's shape (exact for valid JSON; an invalid body is a 422 anyway), refusing a nested value."""
    shape = scan_body(body)
    if (deep := shape.deep_error()) is not None:
        raise HTTPProblem(422, [deep])
    return shape


def _check_field_counts(shape: BodyShape, limits: DecodeLimits) -> None:
    if bad := candidate_field_errors(shape.keys, limits.max_candidate_fields):
        raise HTTPProblem(422, bad)


def _rank_errors(exc: ValidationError, max_candidates: int) -> str | list[dict]:
    """A too-long candidate list is one line naming the limit; other errors as FastAPI lists them."""
    if exc.error_count() <= MAX_ERRORS:
        for err in exc.errors(include_url=False, include_input=False):
            if err["type"] == "too_long" and err["loc"] == ("candidates",):
                return f"too many candidates: {err['ctx']['actual_length']} > max_candidates {max_candidates}"
    return validation_errors(exc)


def encode_rank(result: RankResult, top_k: int) -> bytes:
    """The RankResponse JSON: the top_k candidates by score (ties keep request order)."""
    scores = result.scores
    order = np.argsort(-scores, kind="stable")[:top_k]
    ids = result.item_ids
    items = [{"item_id": ids[i], "score": s} for i, s in zip(order.tolist(), scores[order].tolist(), strict=True)]
    return orjson.dumps(
        {
            "items": items,
            "model_version": result.model_version,
            "knowledge_version": result.knowledge_version,
            "fallbacks": [{"level": f.level, "reason": f.reason, "count": f.count} for f in result.fallbacks],
        }
    )
