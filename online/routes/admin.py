"""POST /admin/reload (bearer token): load the model artifact again, or another one, in every worker."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from online.codec import parse_model, read_body
from online.deps import Admin, State
from online.errors import HTTPProblem, one_line
from online.routes.responses import INVALID
from online.schemas import ErrorResponse, ReloadRequest, ReloadResponse
from online.state import reload_model
from online.workers import reload_everywhere
from shared.errors import UserFacingError

log = logging.getLogger(__name__)

router = APIRouter()


@router.post(
    "/admin/reload",
    dependencies=[Admin],  # the token is checked before anything else is read
    response_model=ReloadResponse,
    responses={
        401: INVALID[422] | {"description": "missing or wrong token"},
        403: {"model": ErrorResponse, "description": "admin routes disabled (no admin_token)"},
        **INVALID,
        503: {"model": ErrorResponse, "description": "not every worker confirmed the new model in time"},
    },
    summary="Reload the model artifact (or load another) and re-check the published knowledge, in every worker",
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ReloadRequest"}}},
        }
    },
)
async def admin_reload(request: Request, state: State) -> ReloadResponse:
    raw = await read_body(request, 64_000)
    body = parse_model(ReloadRequest, raw) if raw.strip() else ReloadRequest()
    target = body.artifact or str(state.ranker.artifact_dir)
    try:
        await run_in_threadpool(reload_model, state, target)  # here first: a bad artifact never reaches the others
    except UserFacingError as exc:
        raise HTTPProblem(422, one_line(exc)) from None
    except (OSError, ValueError) as exc:  # e.g. a path the OS cannot even look at
        # The OS's text can describe the server's file system: it goes to the log, the client gets a fixed line.
        log.warning("admin reload of artifact %r failed: %s: %s", target, type(exc).__name__, exc)
        raise HTTPProblem(422, "cannot load the requested artifact; the reason is in the server log") from None
    request.app.openapi_schema = None  # scenarios may have changed
    workers = await reload_everywhere(state, target)
    kv = state.knowledge()
    return ReloadResponse(
        model_version=state.ranker.model_version,
        knowledge_version=kv.version if kv is not None else None,
        workers=workers,
    )
