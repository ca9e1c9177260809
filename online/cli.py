"""CLI registration of `llm4msr serve`: the ranking service on uvicorn, one or several worker processes."""

from __future__ import annotations

import argparse


class _RemovedAdminToken(argparse.Action):
    """Refuses the removed --admin-token flag without echoing its value."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(
            "--admin-token was removed (a flag is visible to other users in `ps`): set LLM4MSR_ADMIN_TOKEN or pass "
            "--admin-token-file PATH"
        )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the ranking service (FastAPI on uvicorn, one worker process per core)",
        description="Serves POST /rank, GET /explain/{user_id}, /healthz, /readyz, /metrics, /docs. Every option "
        "can also be set by an environment variable LLM4MSR_<OPTION> (e.g. LLM4MSR_REDIS_URL); flags win.",
    )
    p.add_argument("--artifact", help="trained model artifact folder (LLM4MSR_ARTIFACT)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--knowledge", help="knowledge snapshot: a version folder, or a root whose LATEST is followed")
    src.add_argument("--redis-url", help="Redis with published knowledge; follows llm4msr:kn:current")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument(
        "--workers",
        type=int,
        help="worker processes, each with the model (default: the cores this process may use; LLM4MSR_WORKERS)",
    )
    p.add_argument("--max-candidates", type=int, help="candidates per request (default 1000)")
    p.add_argument("--max-body-bytes", type=int, help="request body limit (default 1000000)")
    p.add_argument(
        "--max-candidate-fields",
        type=int,
        help="extra fields per candidate besides item_id (default 64); only the model's own features are read",
    )
    # No --admin-token: a flag's value is visible to every local user in `ps`. Declared (hidden) only so that it is
    # refused by name instead of being taken as an abbreviation of --admin-token-file.
    p.add_argument("--admin-token", nargs="?", action=_RemovedAdminToken, help=argparse.SUPPRESS)
    p.add_argument(
        "--admin-token-file",
        metavar="PATH",
        help="file holding the token for POST /admin/reload (>= 32 characters); or set LLM4MSR_ADMIN_TOKEN",
    )
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default 1)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from online.settings import load_settings
    from online.workers import run_workers

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
            "max_candidate_fields": args.max_candidate_fields,
            "admin_token_file": args.admin_token_file,
            "torch_threads": args.torch_threads,
            "workers": args.workers,
        }.items()
        if v is not None
    }
    if args.admin_token_file is not None:
        overrides["admin_token"] = None  # the flag wins over LLM4MSR_ADMIN_TOKEN, as every flag wins over its variable
    settings = load_settings(**overrides)  # a bad value is one error line naming the setting
    settings.run_dir = None  # only `serve` creates a run folder, for its workers
    if args.knowledge:
        settings.redis_url = None
    elif args.redis_url:
        settings.knowledge = None
    if settings.workers > 1:
        return run_workers(settings, args.log_level)
    from online.app import create_app
    from online.state import load_state

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
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )
    return 0
