"""The documented error answers the routes share (/docs)."""

from online.schemas import ErrorResponse

BODY_TOO_LARGE = {413: {"model": ErrorResponse, "description": "body larger than max_body_bytes"}}
INVALID = {422: {"model": ErrorResponse, "description": "invalid request (limit, unknown scenario, schema)"}}
NOT_READY = {503: {"model": ErrorResponse, "description": "model or knowledge not loaded yet"}}
