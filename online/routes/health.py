"""GET /healthz (the process answers), GET /readyz (model and knowledge loaded), GET /metrics."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from online.deps import State
from online.metrics import render_metrics
from online.schemas import HealthResponse, ReadyResponse

router = APIRouter()


@router.get("/healthz", response_model=HealthResponse, summary="Alive (the process answers)")
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse}},
    summary="Model and knowledge loaded (in the worker process that answers)",
)
async def readyz(request: Request) -> JSONResponse:
    state = getattr(request.app.state, "serving", None)
    if state is None:
        body = ReadyResponse(ready=False, model_version=None, knowledge={}, worker_pid=os.getpid())
        return JSONResponse(body.model_dump(), status_code=503)
    body = ReadyResponse(
        ready=state.ready,
        model_version=state.ranker.model_version,
        knowledge=state.store.describe() if state.store is not None else {"store": "none"},
        worker_pid=os.getpid(),
    )
    return JSONResponse(body.model_dump(), status_code=200 if state.ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics (of every worker process, aggregated)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics(state: State) -> Response:
    state.update_gauges()
    return Response(render_metrics(state.metrics, state.run_dir), media_type=CONTENT_TYPE_LATEST)
