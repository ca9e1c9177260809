"""The one error type a handler answers with: a status and a one-line reason (docs/architecture.md, HTTP API)."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse


class HTTPProblem(Exception):
    """An answer with a status and a reason (4xx/503), raised anywhere in a request; never a 500."""

    def __init__(self, status: int, detail: str | list[dict[str, Any]]):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def one_line(exc: BaseException) -> str:
    """The first line of an error's text: answers and logs stay one line even for multi-line messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def problem_response(exc: HTTPProblem) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status)
