"""GET /explain/{user_id}: the LLM's stored answers behind a user's knowledge."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from starlette.concurrency import run_in_threadpool

from online.deps import State
from online.errors import HTTPProblem
from online.routes.responses import INVALID, NOT_READY
from online.schemas import ID_MAX, ExplainResponse, FallbackOut
from online.service import check_scenario

router = APIRouter()


@router.get(
    "/explain/{user_id}",
    response_model=ExplainResponse,
    responses={**INVALID, **NOT_READY},
    summary="The LLM's stored user- and scenario-level answers behind this user's knowledge",
)
async def explain(
    state: State,
    user_id: Annotated[str, Path(min_length=1, max_length=ID_MAX)],
    scenario: Annotated[str | None, Query(min_length=1, max_length=ID_MAX)] = None,
) -> ExplainResponse:
    ranker = state.ranker
    if scenario is not None:
        check_scenario(ranker, scenario)
    store, kv = state.store, state.knowledge()
    if store is None or kv is None:
        raise HTTPProblem(503, "no knowledge loaded: explanations come from the knowledge snapshot")
    answer, fallbacks = await run_in_threadpool(store.user_response, kv, user_id)
    for f in fallbacks:
        state.metrics.fallbacks.labels(level=f.level, reason=f.reason).inc(f.count)
    wanted = [scenario] if scenario is not None else sorted(kv.scenario_responses)
    return ExplainResponse(
        user_id=user_id,
        known_user=answer is not None,
        user_answer=answer,
        scenario_answers={s: kv.scenario_responses.get(s, "") for s in wanted},
        model_version=ranker.model_version,
        knowledge_version=kv.version,
        fallbacks=[FallbackOut(level=f.level, reason=f.reason, count=f.count) for f in fallbacks],
    )
