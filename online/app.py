"""The FastAPI ranking service (docs/architecture.md, HTTP API): routes in online/routes/, the work of /rank in
online/service.py, its body codec in online/codec.py, the loaded model and knowledge in online/state.py.

POST /rank, each stage timed into llm4msr_rank_stage_seconds:
  decode     read the body (size-limited) and validate it into a RankQuery (orjson for a plainly valid body;
             otherwise a byte scan of its shape and pydantic in Rust): what a body can cost is bounded here, linear
             in its size, before any work is queued on the executor
  knowledge  scenario/item vectors from memory, the user vector from the LRU or one Redis round trip
  forward    one batched forward of all candidates (meta layers generated once per request)
  encode     top-k and the JSON response (orjson)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from online.errors import HTTPProblem, problem_response
from online.middleware import RankFastPath, RequestCounter
from online.openapi import openapi_document
from online.routes import ROUTERS
from online.service import RankService
from online.settings import ServeSettings, load_settings
from online.state import ServingState, load_state
from online.workers import ReloadFollower


def create_app(settings: ServeSettings | None = None, state: ServingState | None = None) -> FastAPI:
    """The app; the model and knowledge load in the lifespan, before the server accepts a request, unless a
    preloaded `state` is given (one worker: the CLI preloads, so that a refused artifact is one clear error line
    instead of a traceback)."""
    settings = settings or (state.settings if state is not None else ServeSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = state if state is not None else await asyncio.to_thread(load_state, settings)
        app.state.serving = loaded
        app.state.rank_service = RankService(loaded)
        follower = None
        if loaded.run_dir is not None:
            follower = ReloadFollower(loaded, on_reload=lambda: setattr(app, "openapi_schema", None))
            follower.start()
        try:
            yield
        finally:
            if follower is not None:
                follower.stop()
            loaded.close()

    app = FastAPI(
        title="LLM4MSR ranker",
        version="1",
        summary="Multi-scenario CTR ranking with cached LLM knowledge (the LLM never runs at request time).",
        lifespan=lifespan,
    )
    app.add_middleware(RankFastPath, app_ref=app)
    app.add_middleware(RequestCounter, app_ref=app)  # wraps everything, 404s and validation errors included

    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, exc: HTTPProblem) -> JSONResponse:
        return problem_response(exc)

    for router in ROUTERS:
        app.include_router(router)
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]
    return app


def create_worker_app() -> FastAPI:
    """The app of one worker process of `serve --workers N` (uvicorn's factory): settings from the LLM4MSR_*
    variables the parent set, the model and knowledge loaded in the lifespan."""
    return create_app(load_settings())
