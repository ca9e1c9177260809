"""CLI registration of `llm4msr serve`: the ranking service on uvicorn, one worker."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the ranking service (FastAPI on uvicorn, one worker)",
        description="Serves POST /rank, GET /explain/{user_id}, /healthz, /readyz, /metrics, /docs. Every option "
        "can also be set by an environment variable LLM4MSR_<OPTION> (e.g. LLM4MSR_REDIS_URL); flags win.",
    )
    p.add_argument("--artifact", help="trained model artifact folder (LLM4MSR_ARTIFACT)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--knowledge", help="knowledge snapshot: a version folder, or a root whose LATEST is followed")
    src.add_argument("--redis-url", help="Redis with published knowledge; follows llm4msr:kn:current")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--max-candidates", type=int, help="candidates per request (default 1000)")
    p.add_argument("--max-body-bytes", type=int, help="request body limit (default 1000000)")
    p.add_argument("--admin-token", help="token for POST /admin/reload (prefer LLM4MSR_ADMIN_TOKEN)")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default 1)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from online.app import create_app, load_state
    from online.settings import ServeSettings

    overrides = {
        k: v
        for k, v in {
            "artifact": args.artifact,
            "knowledge": args.knowledge,
            "redis_url": args.redis_url,
            "host": args.host,
            "port": args.port,
            "max_candidates": args.max_candidates,
            "max_body_bytes": args.max_body_bytes,
            "admin_token": args.admin_token,
            "torch_threads": args.torch_threads,
        }.items()
        if v is not None
    }
    settings = ServeSettings(**overrides)
    if args.knowledge:
        settings.redis_url = None
    elif args.redis_url:
        settings.knowledge = None
    state = load_state(settings)  # a refused artifact or missing knowledge fails here with one clear line
    app = create_app(settings, state)
    print(
        f"serving model {state.ranker.model_version} on http://{settings.host}:{settings.port} (docs at /docs)",
        flush=True,
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    return 0
