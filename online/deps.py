"""FastAPI dependencies: what a route needs (the worker's serving state, the rank service, admin auth)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from online.errors import HTTPProblem
from online.service import RankService
from online.state import ServingState


# Dependencies are coroutines: FastAPI runs a plain `def` dependency on a threadpool thread, a hand-over that
# would cost every request more than the lookup itself.
async def serving_state(request: Request) -> ServingState:
    return request.app.state.serving


async def rank_service(request: Request) -> RankService:
    return request.app.state.rank_service


State = Annotated[ServingState, Depends(serving_state)]
Service = Annotated[RankService, Depends(rank_service)]


async def require_admin(
    state: State,
    authorization: Annotated[str | None, Header(description="Bearer <admin token>")] = None,
) -> None:
    """A 403 while admin routes are off (no token configured), a 401 for a missing or wrong token; checked before
    the route reads anything else."""
    expected = state.settings.admin_token
    if expected is None:
        raise HTTPProblem(
            403, "admin routes are disabled: set LLM4MSR_ADMIN_TOKEN or LLM4MSR_ADMIN_TOKEN_FILE (--admin-token-file)"
        )
    given = ""
    if authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise HTTPProblem(401, "missing or wrong admin token (Authorization: Bearer <token>)")


Admin = Depends(require_admin)
