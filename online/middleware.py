"""llm4msr_requests_total{route,status} for every HTTP request, 404s and validation errors included."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RequestCounter:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware)."""

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
                route = scope.get("route")
                # Templates, not raw paths: a fuzzer or a scanner must not create a series per URL.
                name = getattr(route, "path", None) or "unmatched"
                state.metrics.requests.labels(route=name, status=str(status)).inc()
