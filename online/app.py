"""The FastAPI ranking service (DESIGN section 6).

Request path of POST /rank, each stage timed into llm4msr_rank_stage_seconds:
  decode     read the body (size-limited), validate it with pydantic (in Rust, from the raw bytes; candidates
             keep only the model's feature fields), count each candidate's fields on the bytes (field limit) and
             drop repeated item_ids: what a body can cost is bounded here, linear in its size, before any work is
             queued on the executor
  knowledge  scenario/item vectors from memory, the user vector from the LRU or one Redis round trip
  forward    one batched forward of all candidates (meta layers generated once per request)
  encode     top-k and the JSON response
knowledge + forward run on the ranker's executor thread(s) (blocking Redis I/O and torch stay off the event loop).

Errors: an input problem is a 422; knowledge data that cannot feed the model (e.g. a vector of the wrong length)
is a 503 with the reason in one line; neither is ever a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
from fastapi import FastAPI, Header, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr, ValidationError
from starlette.concurrency import run_in_threadpool

from online.knowledge import (
    UNKNOWN,
    Fallback,
    KnowledgeStore,
    KnowledgeVersion,
    RedisKnowledgeStore,
    SnapshotKnowledgeStore,
    missing_item_fallbacks,
    take_item_rows,
)
from online.metrics import ServingMetrics
from online.ranker import KnowledgeDataError, Ranker, cap_torch_threads
from online.schemas import (
    FEATURE_SCHEMA,
    ID_MAX,
    MAX_ERRORS,
    RANK_REQUEST,
    ErrorResponse,
    ExplainResponse,
    HealthResponse,
    RankResponse,
    ReadyResponse,
    ReloadRequest,
    ReloadResponse,
    candidate_field_errors,
    rank_request_adapter,
    scan_body,
)
from online.settings import ServeSettings
from shared.errors import UserFacingError

log = logging.getLogger(__name__)

# Bodies larger than this are validated on a worker thread (a normal 500-candidate request is ~20 KB).
LARGE_BODY = 64 * 1024
DUPLICATE = "duplicate"  # fallback reason: an item_id repeated in one request, scored and returned once


class HTTPProblem(Exception):
    """An answer with a status and a one-line reason (4xx/503), raised anywhere in a handler."""

    def __init__(self, status: int, detail):
        self.status = status
        self.detail = detail


@dataclass
class ServingState:
    settings: ServeSettings
    metrics: ServingMetrics
    ranker: Ranker
    store: KnowledgeStore | None
    reload_lock: threading.Lock = field(default_factory=threading.Lock)
    executor: ThreadPoolExecutor | None = None

    @property
    def ready(self) -> bool:
        return not self.ranker.uses_knowledge or (self.store is not None and self.store.ready)

    def publish_versions(self) -> None:
        kv = self.store.current() if self.store is not None else None
        self.metrics.set_versions(
            self.ranker.model_version,
            kv.version if kv is not None else None,
            kv.space_id if kv is not None else None,
            self.ranker.backbone,
            self.store.kind if self.store is not None else "none",
        )
        if kv is not None:
            created = _parse_time(kv.manifest.created_at)
            if created is not None:
                self.metrics.knowledge_created.set(created)


def build_store(settings: ServeSettings, ranker: Ranker, metrics: ServingMetrics) -> KnowledgeStore | None:
    if settings.redis_url:
        store: KnowledgeStore = RedisKnowledgeStore(
            settings.redis_url,
            ranker.knowledge_space_id,
            poll_interval_s=settings.poll_interval_s,
            timeout_s=settings.redis_timeout_s,
            retry_s=settings.redis_retry_s,
            user_cache_size=settings.user_cache_size,
            item_preload_limit=settings.item_preload_limit,
        )
        metrics.redis_up.set_function(lambda: 1.0 if store.redis_up else 0.0)
        return store
    if settings.knowledge:
        return SnapshotKnowledgeStore(settings.knowledge, ranker.knowledge_space_id, settings.poll_interval_s)
    if ranker.uses_knowledge:
        raise UserFacingError(
            f"model {ranker.model_version} uses {sorted(ranker.needs_levels)} knowledge: pass --knowledge SNAPSHOT "
            "or --redis-url URL (or set LLM4MSR_KNOWLEDGE / LLM4MSR_REDIS_URL)"
        )
    return None


def load_state(settings: ServeSettings) -> ServingState:
    """Loads the model and the knowledge; raises UserFacingError (e.g. knowledge space mismatch) before serving."""
    if not settings.artifact:
        raise UserFacingError("no model artifact given: pass --artifact DIR (or set LLM4MSR_ARTIFACT)")
    cap_torch_threads(settings.torch_threads)
    if settings.gil_switch_interval_ms > 0:
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    metrics = ServingMetrics()
    ranker = Ranker.load(settings.artifact)
    _check_field_limit(ranker, settings)
    store = build_store(settings, ranker, metrics)
    state = ServingState(settings, metrics, ranker, store)
    if settings.rank_executor == "thread":
        state.executor = ThreadPoolExecutor(max_workers=settings.max_concurrent_forwards, thread_name_prefix="rank")
    if store is not None:

        def on_swap(kv: KnowledgeVersion) -> None:
            metrics.swaps.inc()
            state.publish_versions()
            if state.ranker.needs_items and kv.items_complete:
                state.ranker.reduced_items(kv)  # before requests need it

        store.on_swap = on_swap
        store.start()
    state.publish_versions()
    return state


def create_app(settings: ServeSettings | None = None, state: ServingState | None = None) -> FastAPI:
    """The app; the model and knowledge load in the lifespan unless a preloaded `state` is given (the CLI
    preloads, so that a refused artifact is one clear error line instead of a traceback)."""
    settings = settings or (state.settings if state is not None else ServeSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st = state if state is not None else await asyncio.to_thread(load_state, settings)
        app.state.serving = st
        try:
            yield
        finally:
            if st.store is not None:
                st.store.stop()
            if st.executor is not None:
                st.executor.shutdown(wait=False)

    app = FastAPI(
        title="LLM4MSR ranker",
        version="1",
        summary="Multi-scenario CTR ranking with cached LLM knowledge (the LLM never runs at request time).",
        lifespan=lifespan,
    )
    # The counter wraps everything, including 404s and validation errors.
    app.add_middleware(RequestCounter, app_ref=app)

    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, exc: HTTPProblem):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    errors = {
        413: {"model": ErrorResponse, "description": "body larger than max_body_bytes"},
        422: {"model": ErrorResponse, "description": "invalid request (limit, unknown scenario, schema)"},
        503: {"model": ErrorResponse, "description": "model or knowledge not loaded yet"},
    }

    @app.post(
        "/rank",
        response_model=RankResponse,
        responses=errors,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RankRequest"}}},
            }
        },
        summary="Score and sort candidates for one user in one scenario",
    )
    async def rank(request: Request) -> Response:
        t0 = time.perf_counter()
        st: ServingState = request.app.state.serving
        m = st.metrics
        body = await _read_body(request, st.settings.max_body_bytes)
        ranker = st.ranker  # this request stays on this model even if an admin reload swaps it
        if len(body) <= LARGE_BODY:
            req = _parse_rank(body, st.settings, ranker.feature_fields)  # candidates keep this model's fields
        else:  # its numpy byte scan releases the GIL: off the loop, the other requests go on meanwhile
            req = await asyncio.to_thread(_parse_rank, body, st.settings, ranker.feature_fields)
        n = len(req["item_ids"])  # distinct candidates
        _check_scenario(ranker, req["scenario"])
        kv = None
        if ranker.uses_knowledge:
            kv = st.store.current() if st.store is not None else None
            if kv is None:
                raise HTTPProblem(503, "knowledge not loaded yet (nothing published?); see /readyz")
            if kv.space_id != ranker.knowledge_space_id:
                # An admin reload is swapping model and knowledge of a new space right now: take the new pair (the
                # candidates keep the old model's feature fields; a field only the new one reads counts as unknown).
                ranker, kv = st.ranker, st.store.current()
                if kv is None or kv.space_id != ranker.knowledge_space_id:
                    raise HTTPProblem(503, "model and knowledge are being swapped; retry")
        t1 = time.perf_counter()
        m.stage_children["decode"].observe(t1 - t0)
        m.candidates.observe(n)

        # Off the event loop, on the ranker's own small executor: measured here with 4 clients x 500 candidates,
        # a dedicated 1-thread executor gave ~25% more throughput and a lower p99 than Starlette's shared anyio
        # threadpool (fewer hand-overs, no contention between concurrent forwards on 2 cores).
        try:
            if st.executor is not None:
                loop = asyncio.get_running_loop()
                scores, fallbacks, t_kn, t_fw = await loop.run_in_executor(st.executor, _score, st, ranker, kv, req)
            else:
                scores, fallbacks, t_kn, t_fw = _score(st, ranker, kv, req)
        except KnowledgeDataError as exc:
            reason = _one_line(exc)
            version = kv.version if kv is not None else None
            log.warning("answered 503: knowledge %s cannot feed model %s: %s", version, ranker.model_version, reason)
            raise HTTPProblem(
                503, f"cannot serve this request with knowledge version {version} right now: {reason}"
            ) from None
        except UserFacingError as exc:
            raise HTTPProblem(422, _one_line(exc)) from None
        m.stage_children["knowledge"].observe(t_kn)
        m.stage_children["forward"].observe(t_fw)

        t2 = time.perf_counter()
        top_k = min(req.get("top_k") or st.settings.default_top_k, n)
        order = np.argsort(-scores, kind="stable")[:top_k]
        ids = req["item_ids"]
        payload = {
            "items": [{"item_id": ids[i], "score": float(scores[i])} for i in order.tolist()],
            "model_version": ranker.model_version,
            "knowledge_version": kv.version if kv is not None else None,
            "fallbacks": [{"level": f.level, "reason": f.reason, "count": f.count} for f in fallbacks],
        }
        content = json.dumps(payload, separators=(",", ":")).encode()
        t3 = time.perf_counter()
        m.stage_children["encode"].observe(t3 - t2)
        m.latency.observe(t3 - t0)
        return Response(content, media_type="application/json")

    @app.get(
        "/explain/{user_id}",
        response_model=ExplainResponse,
        responses={422: errors[422], 503: errors[503]},
        summary="The LLM's stored user- and scenario-level answers behind this user's knowledge",
    )
    async def explain(
        request: Request,
        user_id: Annotated[str, Path(min_length=1, max_length=ID_MAX)],
        scenario: Annotated[str | None, Query(min_length=1, max_length=ID_MAX)] = None,
    ) -> ExplainResponse:
        st: ServingState = request.app.state.serving
        ranker = st.ranker
        if scenario is not None:
            _check_scenario(ranker, scenario)
        store = st.store
        kv = store.current() if store is not None else None
        if store is None or kv is None:
            raise HTTPProblem(503, "no knowledge loaded: explanations come from the knowledge snapshot")
        answer, fallbacks = await run_in_threadpool(store.user_response, kv, user_id)
        _count_fallbacks(st.metrics, fallbacks)
        wanted = [scenario] if scenario is not None else sorted(kv.scenario_responses)
        return ExplainResponse(
            user_id=user_id,
            known_user=answer is not None,
            user_answer=answer,
            scenario_answers={s: kv.scenario_responses.get(s, "") for s in wanted},
            model_version=ranker.model_version,
            knowledge_version=kv.version,
            fallbacks=[{"level": f.level, "reason": f.reason, "count": f.count} for f in fallbacks],
        )

    @app.get("/healthz", response_model=HealthResponse, summary="Alive (the process answers)")
    async def healthz() -> HealthResponse:
        return HealthResponse(status="ok")

    @app.get(
        "/readyz",
        response_model=ReadyResponse,
        responses={503: {"model": ReadyResponse}},
        summary="Model and knowledge loaded",
    )
    async def readyz(request: Request):
        st: ServingState | None = getattr(request.app.state, "serving", None)
        if st is None:
            body = ReadyResponse(ready=False, model_version=None, knowledge={})
            return JSONResponse(body.model_dump(), status_code=503)
        body = ReadyResponse(
            ready=st.ready,
            model_version=st.ranker.model_version,
            knowledge=st.store.describe() if st.store is not None else {"store": "none"},
        )
        return JSONResponse(body.model_dump(), status_code=200 if st.ready else 503)

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def metrics(request: Request) -> Response:
        st: ServingState = request.app.state.serving
        return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/admin/reload",
        response_model=ReloadResponse,
        responses={
            401: errors[422] | {"description": "missing or wrong token"},
            403: {"model": ErrorResponse, "description": "admin routes disabled (no admin_token)"},
            422: errors[422],
        },
        summary="Reload the model artifact (or load another) and re-check the published knowledge",
        openapi_extra={
            "requestBody": {
                "required": False,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ReloadRequest"}}},
            }
        },
    )
    async def admin_reload(
        request: Request,
        authorization: Annotated[str | None, Header(description="Bearer <admin token>")] = None,
    ) -> ReloadResponse:
        st: ServingState = request.app.state.serving
        _check_token(st.settings.admin_token, authorization)  # before reading anything else
        raw = await _read_body(request, 64_000)
        body = _parse(ReloadRequest, raw) if raw.strip() else ReloadRequest()
        target = body.artifact or str(st.ranker.artifact_dir)
        try:
            await run_in_threadpool(_reload, st, target)
        except UserFacingError as exc:
            raise HTTPProblem(422, _one_line(exc)) from None
        except (OSError, ValueError) as exc:  # e.g. a path the OS cannot even look at
            # The OS's text can describe the server's file system: it goes to the log, the client gets a fixed line.
            log.warning("admin reload of artifact %r failed: %s: %s", target, type(exc).__name__, exc)
            raise HTTPProblem(422, "cannot load the requested artifact; the reason is in the server log") from None
        app.openapi_schema = None  # scenarios may have changed
        kv = st.store.current() if st.store is not None else None
        return ReloadResponse(
            model_version=st.ranker.model_version, knowledge_version=kv.version if kv is not None else None
        )

    def custom_openapi():
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        rank_schema = RANK_REQUEST.json_schema(ref_template="#/components/schemas/{model}")
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        comps.update(rank_schema.pop("$defs", {}))
        comps["RankRequest"] = rank_schema
        comps["ReloadRequest"] = ReloadRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        # What this server accepts right now, so that clients (and fuzzers) see the real constraints.
        st = getattr(app.state, "serving", None)
        if st is not None:
            rank_schema["properties"]["scenario"]["enum"] = list(st.ranker.scenarios)
            rank_schema["properties"]["candidates"]["maxItems"] = st.settings.max_candidates
            candidate = comps["Candidate"]
            candidate["maxProperties"] = st.settings.max_candidate_fields + 1  # + item_id
            for name in st.ranker.feature_fields:
                candidate["properties"][name] = {**FEATURE_SCHEMA, "description": "a feature this model reads"}
        app.openapi_schema = schema
        return schema

    app.openapi = custom_openapi
    return app


class RequestCounter:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware): llm4msr_requests_total{route,status}."""

    def __init__(self, app, app_ref: FastAPI):
        self.app = app
        self.app_ref = app_ref

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            st = getattr(self.app_ref.state, "serving", None)
            if st is not None:
                route = scope.get("route")
                # Templates, not raw paths: a fuzzer or a scanner must not create a series per URL.
                name = getattr(route, "path", None) or "unmatched"
                st.metrics.requests.labels(route=name, status=str(status)).inc()


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPProblem(413, f"request body of {declared} bytes exceeds max_body_bytes {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPProblem(413, f"request body exceeds max_body_bytes {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(model, body: bytes):
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise HTTPProblem(422, _errors(exc)) from None


def _errors(exc: ValidationError) -> list[dict]:
    """The errors as FastAPI lists them; a hostile body can make 100k of them, which are only counted (turning each
    into a dict and then JSON would hold the event loop for a second)."""
    count = exc.error_count()
    if count > MAX_ERRORS:
        msg = f"the body has {count} validation errors, too many to list; see the RankRequest schema at /docs"
        return [{"loc": ["body"], "msg": msg, "type": "too_many_errors"}]
    out, seen = [], set()
    for err in exc.errors(include_url=False, include_context=False, include_input=False):
        loc = err["loc"]
        if len(loc) == 4 and loc[0] == "candidates" and loc[3] in ("str", "int", "float", "bool"):
            # A feature value failed each member of its union: one entry for the field instead of four.
            if loc[:3] not in seen:
                seen.add(loc[:3])
                msg = f"feature {loc[2]!r} must be a string, number or boolean"
                out.append({"loc": ["body", *loc[:3]], "msg": msg, "type": "value_error"})
            continue
        out.append({"loc": ["body", *loc], "msg": err["msg"], "type": err["type"]})
    return out


def _parse_rank(body: bytes, settings: ServeSettings, feature_fields: tuple[str, ...]) -> dict:
    """Validated request with candidates made distinct by item_id (first occurrence wins), `item_ids` aligned with
    them and `duplicates` (how many were dropped).

    Candidates keep only item_id and the model's feature fields: pydantic skips other keys in Rust, and
    scan_body counts them on the bytes. Every step is linear in the body and none builds a Python object per
    ignored key (the worst admitted body, 1 MB of 1000 candidates x 64 fields: bench/abuse_bench.py)."""
    shape = None
    # Cheap upper bounds first: a body with more brackets or colons than a flat request of max_candidates plain
    # candidates may nest values or carry many fields, so its shape is scanned before pydantic parses it.
    if (
        body.count(b"[") > 1
        or body.count(b"{") > 1 + settings.max_candidates
        or body.count(b":") > 4 + settings.max_candidate_fields
    ):
        shape = scan_body(body)  # exact for valid JSON; an invalid body is a 422 anyway, so refuse before parsing
        if (deep := shape.deep_error()) is not None:
            raise HTTPProblem(422, [deep])
        if bad := candidate_field_errors(shape.keys, settings.max_candidate_fields):
            raise HTTPProblem(422, bad)
    try:
        req = rank_request_adapter(settings.max_candidates, feature_fields).validate_json(body)
    except ValidationError as exc:
        if exc.error_count() <= MAX_ERRORS:
            for err in exc.errors(include_url=False, include_input=False):
                if err["type"] == "too_long" and err["loc"] == ("candidates",):
                    got, limit = err["ctx"]["actual_length"], settings.max_candidates
                    raise HTTPProblem(422, f"too many candidates: {got} > max_candidates {limit}") from None
        raise HTTPProblem(422, _errors(exc)) from None
    cands = req["candidates"]
    if shape is None and body.count(b"{") > 1 + len(cands):  # a small body with an object inside a candidate
        shape = scan_body(body)
        if (deep := shape.deep_error()) is not None:
            raise HTTPProblem(422, [deep])
    if shape is not None:
        if len(shape.starts) != len(cands):
            raise HTTPProblem(422, "the body repeats a key of the request object; send each key once")
        if bad := candidate_field_errors(shape.keys, settings.max_candidate_fields):
            raise HTTPProblem(422, bad)
    ids = [c["item_id"] for c in cands]
    req["duplicates"] = 0
    if len(set(ids)) != len(ids):
        first: dict[str, dict] = {}
        for c in cands:
            first.setdefault(c["item_id"], c)
        req["duplicates"] = len(cands) - len(first)
        req["candidates"] = cands = list(first.values())
        ids = list(first)
    req["item_ids"] = ids
    return req


def _check_field_limit(ranker: Ranker, settings: ServeSettings) -> None:
    """A model reading more candidate fields than a request may carry would refuse its own valid requests."""
    if len(ranker.feature_fields) > settings.max_candidate_fields:
        raise UserFacingError(
            f"model {ranker.model_version} reads {len(ranker.feature_fields)} candidate feature fields but "
            f"max_candidate_fields is {settings.max_candidate_fields}; raise LLM4MSR_MAX_CANDIDATE_FIELDS"
        )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_scenario(ranker: Ranker, scenario: str) -> None:
    if scenario not in ranker.scenarios:
        raise HTTPProblem(422, f"unknown scenario {scenario!r}; valid scenarios: {', '.join(ranker.scenarios)}")


def _check_token(expected: SecretStr | None, authorization: str | None) -> None:
    if expected is None:
        raise HTTPProblem(
            403, "admin routes are disabled: set LLM4MSR_ADMIN_TOKEN or LLM4MSR_ADMIN_TOKEN_FILE (--admin-token-file)"
        )
    given = ""
    if authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise HTTPProblem(401, "missing or wrong admin token (Authorization: Bearer <token>)")


def _parse_time(text: str) -> float | None:
    from datetime import datetime, timezone

    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def _count_fallbacks(metrics: ServingMetrics, fallbacks: list[Fallback]) -> None:
    for f in fallbacks:
        metrics.fallbacks.labels(level=f.level, reason=f.reason).inc(f.count)


def _score(st: ServingState, ranker: Ranker, kv: KnowledgeVersion | None, req: dict):
    """knowledge + forward, in a threadpool thread."""
    from shared.scoring import RequestKnowledge

    t0 = time.perf_counter()
    item_ids = req["item_ids"]
    fallbacks: list[Fallback] = []
    if req.get("duplicates"):
        fallbacks.append(Fallback("item_id", DUPLICATE, req["duplicates"]))
    knowledge = RequestKnowledge(scenario_vec=None, user_vec=None, item_vecs=None)
    if kv is not None and st.store is not None:
        try:
            knowledge = _knowledge(st.store, ranker, kv, req, fallbacks)
        except KnowledgeDataError:
            raise
        except UserFacingError as exc:  # the store could not give usable vectors: not the client's fault
            raise KnowledgeDataError(_one_line(exc)) from exc
    oov = ranker.oov_count(item_ids)
    if oov:
        fallbacks.append(Fallback("item_id", "oov", oov))
    features = _features(req["candidates"], ranker.feature_fields)
    t1 = time.perf_counter()
    scores = ranker.score(req["scenario"], req["user_id"], item_ids, knowledge, features=features)
    t2 = time.perf_counter()
    _count_fallbacks(st.metrics, fallbacks)
    return scores, fallbacks, t1 - t0, t2 - t1


def _knowledge(store: KnowledgeStore, ranker: Ranker, kv: KnowledgeVersion, req: dict, fallbacks: list[Fallback]):
    """The request's vectors. One rule for a missing vector: scenario and item -> a NaN row, which the model reads
    as the level's mean vector; user -> the version's published cold-start default. Each is a counted fallback."""
    from shared.scoring import RequestKnowledge

    item_ids = req["item_ids"]
    # A complete in-memory catalogue: take the model's reduced rows (computed once per version); otherwise
    # the raw vectors come from the store (some from Redis) and are reduced in the forward.
    from_table = ranker.needs_items and kv.items_complete
    ask_items = item_ids if ranker.needs_items and not from_table else None
    fetched = store.fetch(kv, req["user_id"], ask_items, ranker.needs_user)
    fallbacks.extend(fetched.fallbacks)
    item_reduced = None
    if from_table:
        item_reduced, found = take_item_rows(kv.items, ranker.reduced_items(kv), item_ids)
        fallbacks.extend(missing_item_fallbacks(kv, item_ids, found))
    scen = None
    if ranker.needs_scenario:
        scen = kv.scenarios.get(req["scenario"])
        if scen is None:
            scen = np.full(kv.dim, np.nan, np.float32)
            fallbacks.append(Fallback("scenario", UNKNOWN))
    return RequestKnowledge(
        scenario_vec=scen, user_vec=fetched.user_vec, item_vecs=fetched.item_vecs, item_reduced=item_reduced
    )


def _features(cands: list[dict], fields: tuple[str, ...]) -> dict[str, list] | None:
    """The model's own feature columns (missing values are None); O(candidates x model fields), so keys the model
    was not trained on cost nothing here. A column no candidate carries is left out (encoded as unknown)."""
    out = {}
    for name in fields:
        col = [c.get(name) for c in cands]
        if col.count(None) < len(col):
            out[name] = [None if v is None else str(v) for v in col]
    return out or None


def _reload(st: ServingState, artifact: str) -> None:
    with st.reload_lock:
        new = Ranker.load(artifact)
        _check_field_limit(new, st.settings)
        if new.uses_knowledge and st.store is None:
            raise UserFacingError("the new model needs knowledge but the service was started without any")

        def swap() -> None:
            st.ranker = new

        if st.store is not None and new.uses_knowledge:
            st.store.adopt_space(new.knowledge_space_id, swap)
        else:
            swap()
        st.publish_versions()
        log.info("admin reload: now serving model %s", new.model_version)
