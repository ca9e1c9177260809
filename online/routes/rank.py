"""POST /rank: decode the body, ask the rank service, encode the answer; each stage timed."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request, Response

from online.codec import decode_rank, encode_rank, read_body
from online.deps import Service
from online.routes.responses import BODY_TOO_LARGE, INVALID, NOT_READY
from online.schemas import RankResponse
from online.service import RankService

router = APIRouter()

RANK_PATH = "/rank"
# Bodies larger than this are decoded on a worker thread (a normal 500-candidate request is ~20 KB).
LARGE_BODY = 64 * 1024


@router.post(
    RANK_PATH,
    response_model=RankResponse,
    responses={**BODY_TOO_LARGE, **INVALID, **NOT_READY},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RankRequest"}}},
        }
    },
    summary="Score and sort candidates for one user in one scenario",
)
async def rank(request: Request, service: Service) -> Response:
    # One dependency: the framework's dependency solving is a visible share of a small request.
    return await answer_rank(request, service)


async def answer_rank(request: Request, service: RankService) -> Response:
    """The /rank answer; an HTTPProblem for a 4xx/503. Called by the route above and by the fast path
    (online/middleware.py), which skips the framework's routing and dependency solving."""
    started = time.perf_counter()
    state = service.state
    body = await read_body(request, state.settings.max_body_bytes)
    ranker = state.ranker  # this request stays on this model even if an admin reload swaps it
    limits = service.limits(ranker)  # candidates keep this model's feature fields
    if len(body) <= LARGE_BODY:
        query = decode_rank(body, limits)
    else:  # its numpy byte scan releases the GIL: off the loop, the other requests go on meanwhile
        query = await asyncio.to_thread(decode_rank, body, limits)
    metrics = state.metrics
    metrics.stage_children["decode"].observe(time.perf_counter() - started)
    result = await service.rank(query, ranker)
    encode_started = time.perf_counter()
    content = encode_rank(result, query.top_k or state.settings.default_top_k)
    finished = time.perf_counter()
    metrics.stage_children["encode"].observe(finished - encode_started)
    metrics.latency.observe(finished - started)
    return Response(content, media_type="application/json")
