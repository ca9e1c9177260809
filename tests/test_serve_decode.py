"""The /rank body codec: the fast path (orjson + column checks) takes only bodies that the checked path (byte scan +
pydantic, which writes every 422) accepts, and decodes them to the same query; the encoder writes the documented
response. Seeded random bodies, valid and not, compared path against path."""

from __future__ import annotations

import json
import random

import numpy as np
import orjson
import pytest

from online.codec import DecodeLimits, RankResult, checked_decode, decode_rank, encode_rank, fast_decode
from online.errors import HTTPProblem
from online.knowledge import Fallback
from online.schemas import RankResponse

LIMITS = DecodeLimits(max_candidates=8, max_candidate_fields=4, feature_fields=("device", "hour"))
PIECES = ["a", "é", ":", "{", "[", '"', "\\", " ", "x" * 300]


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES[:-1]) if rng.random() < 0.1 else rng.choice("abcdef") for _ in range(4))


def _value(rng: random.Random):
    return rng.choice(["web", 3, 2.5, True, False, None, {"x": 1}, [1], "", 10**30, "é:"])


def _candidate(rng: random.Random, pool: list[str]) -> dict:
    cand: dict = {}
    if rng.random() > 0.03:
        cand["item_id"] = rng.choice(pool) if rng.random() < 0.9 else rng.choice(["", 7, None, "x" * 300])
    for name in ("device", "hour"):
        if rng.random() < 0.5:
            cand[name] = _value(rng) if rng.random() < 0.3 else rng.choice(["web", "tv", 3, 1.5, True])
    for j in range(rng.choice([0, 0, 1, 3, 6])):
        cand[f"junk{j}"] = _value(rng) if rng.random() < 0.2 else "v"
    return cand


def _body(rng: random.Random) -> bytes:
    pool = [_text(rng) or "i" for _ in range(6)]
    doc: dict = {
        "user_id": rng.choice(["u1", _text(rng), "", 5]) if rng.random() < 0.2 else "u1",
        "scenario": "books",
        "candidates": [_candidate(rng, pool) for _ in range(rng.choice([0, 1, 3, 8, 9]))],
    }
    if rng.random() < 0.5:
        doc["top_k"] = rng.choice([3, 1, 0, -1, True, 2.0, None, "3"])
    if rng.random() < 0.05:
        doc["surprise"] = 1
    if rng.random() < 0.05:
        del doc["scenario"]
    text = json.dumps(doc, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, None, 1]))
    if rng.random() < 0.05:  # a repeated key, which a dict cannot hold
        text = text.replace('"user_id":', '"user_id": "u2", "user_id":', 1)
    if rng.random() < 0.03:
        text = text[: len(text) // 2]
    return text.encode()


def _checked(body: bytes):
    try:
        return checked_decode(body, LIMITS)
    except HTTPProblem as exc:
        return exc


def test_fast_path_agrees_with_the_checked_path():
    rng = random.Random(5)
    taken = refused = 0
    for _ in range(4000):
        body = _body(rng)
        slow, fast = _checked(body), fast_decode(body, LIMITS)
        if isinstance(slow, HTTPProblem):
            assert fast is None, (body, slow.detail)
            refused += 1
            assert slow.status == 422
            with pytest.raises(HTTPProblem):
                decode_rank(body, LIMITS)
        elif fast is not None:
            assert fast == slow, body
            taken += 1
    # Both kinds were exercised often: the comparison above is not vacuous.
    assert taken > 400 and refused > 400, (taken, refused)


def test_plain_bodies_take_the_fast_path_with_columns_and_duplicates():
    cands = [
        {"item_id": "a", "device": "web"},
        {"item_id": "b", "hour": 7},
        {"item_id": "a", "device": "tv"},
        {"item_id": "c", "device": True, "other": None},
    ]
    body = orjson.dumps({"user_id": "u", "scenario": "s", "candidates": cands, "top_k": 2})
    query = fast_decode(body, LIMITS)
    assert query is not None and query == checked_decode(body, LIMITS)
    assert query.item_ids == ["a", "b", "c"] and query.duplicates == 1 and query.top_k == 2
    assert query.features == {"device": ["web", None, "True"], "hour": [None, "7", None]}
    plain = orjson.dumps({"user_id": "u", "scenario": "s", "candidates": [{"item_id": "x"}]})
    assert fast_decode(plain, LIMITS).features is None


def test_encode_writes_the_response_contract():
    scores = np.array([0.25, 0.75, 0.5, 0.75], np.float32)
    result = RankResult(["a", "b", "c", "d"], scores, [Fallback("user", "unknown")], "m1", None)
    out = RankResponse.model_validate_json(encode_rank(result, top_k=3))
    assert [it.item_id for it in out.items] == ["b", "d", "c"]  # ties keep request order
    assert [it.score for it in out.items] == [0.75, 0.75, 0.5]
    assert out.model_version == "m1" and out.knowledge_version is None
    assert [(f.level, f.reason, f.count) for f in out.fallbacks] == [("user", "unknown", 1)]
