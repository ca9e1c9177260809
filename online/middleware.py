"""Pure ASGI middleware (cheaper than BaseHTTPMiddleware): the request counter around everything, and the fast path
of POST /rank."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from online.errors import HTTPProblem, problem_response
from online.routes.rank import RANK_PATH, answer_rank

# The route template of a request the fast path answered (it never reaches the router, which sets scope["route"]).
ROUTE_KEY = "llm4msr.route"


class RequestCounter:
    """llm4msr_requests_total{route,status} for every HTTP request, 404s and validation errors included."""

    def __init__(self, app: ASGIApp, app_ref: FastAPI):
        self.app = app
        self.app_ref = app_ref

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            state = getattr(self.app_ref.state, "serving", None)
            if state is not None:
                # Templates, not raw paths: a fuzzer or a scanner must not create a series per URL.
                name = scope.get(ROUTE_KEY) or getattr(scope.get("route"), "path", None) or "unmatched"
                state.metrics.requests.labels(route=name, status=str(status)).inc()


class RankFastPath:
    """POST /rank straight to its handler (online/routes/rank.py answer_rank), past the framework's inner middleware,
    routing and dependency solving: ~0.5 ms of a 100-candidate request's p50 on a 2-core VM (bench/serve_bench.py,
    variant @routed). The answers are the route's: the same handler, an HTTPProblem written
    as the app's handler writes it, anything unexpected a 500 raised on to the server's log (a bug: the contract has
    no 500). The route stays declared for the OpenAPI document; `rank_fast_path=false` (LLM4MSR_RANK_FAST_PATH)
    sends /rank through it."""

    def __init__(self, app: ASGIApp, app_ref: FastAPI):
        self.app = app
        self.app_ref = app_ref

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = getattr(self.app_ref.state, "rank_service", None)
        if (
            scope["type"] != "http"
            or scope["path"] != RANK_PATH
            or scope["method"] != "POST"
            or service is None
            or not service.state.settings.rank_fast_path
        ):
            return await self.app(scope, receive, send)
        scope[ROUTE_KEY] = RANK_PATH
        try:
            response = await answer_rank(Request(scope, receive), service)
        except HTTPProblem as exc:
            response = problem_response(exc)
        except Exception:
            # As the framework's outermost handler does: a plain 500, and the error raised on to the server's log.
            await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send)
            raise
        await response(scope, receive, send)
