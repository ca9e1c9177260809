"""The OpenAPI document: the routes' own, plus the RankRequest contract with this server's limits and features."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from online.schemas import FEATURE_SCHEMA, RANK_REQUEST, ReloadRequest


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """Built once and cached on the app (a reload clears the cache: the scenarios may change)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    rank_schema = RANK_REQUEST.json_schema(ref_template="#/components/schemas/{model}")
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    comps.update(rank_schema.pop("$defs", {}))
    comps["RankRequest"] = rank_schema
    comps["ReloadRequest"] = ReloadRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    # What this server accepts right now, so that clients (and fuzzers) see the real constraints.
    state = getattr(app.state, "serving", None)
    if state is not None:
        rank_schema["properties"]["scenario"]["enum"] = list(state.ranker.scenarios)
        rank_schema["properties"]["candidates"]["maxItems"] = state.settings.max_candidates
        candidate = comps["Candidate"]
        candidate["maxProperties"] = state.settings.max_candidate_fields + 1  # + item_id
        for name in state.ranker.feature_fields:
            candidate["properties"][name] = {**FEATURE_SCHEMA, "description": "a feature this model reads"}
    app.openapi_schema = schema
    return schema
