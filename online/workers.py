"""`llm4msr serve --workers N`: N uvicorn worker processes on one port, each with its own model.

The parent has model and knowledge loaded once by a short-lived process to check them (a refused artifact is one
error line, and a Parquet snapshot is converted for memory mapping before the workers map it; the parent itself
never imports torch), creates the run folder (online/run_dir.py),
then hands over to uvicorn's supervisor: it binds the port, spawns the workers, replaces a worker that dies
(kill -9 included) while the others keep serving, and on SIGTERM stops them, each draining its requests in flight.

Versions reach every worker: each one polls `llm4msr:kn:current` or LATEST itself, and follows the reload orders in
the run folder; POST /admin/reload reloads in the worker that got it, writes the order, and answers once every live
worker serves the new model (a worker started later reads the latest order before it loads a model).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time

from online.errors import HTTPProblem
from online.run_dir import RunDir
from online.settings import ServeSettings
from online.state import ServingState, load_state, reload_model

log = logging.getLogger(__name__)

WORKER_APP = "online.app:create_worker_app"
RELOAD_WAIT_S = 60.0  # how long POST /admin/reload waits for the other workers to confirm


def settings_environment(settings: ServeSettings) -> dict[str, str | None]:
    """The settings as LLM4MSR_* variables for the worker processes (None: unset it). The admin token stays
    where it came from: the file is named (each worker reads it), a token from the environment is inherited."""
    env: dict[str, str | None] = {}
    for name, value in settings.model_dump(exclude={"admin_token", "admin_token_file"}).items():
        env[f"LLM4MSR_{name.upper()}"] = None if value is None else str(value)
    if settings.admin_token_file is not None:
        env["LLM4MSR_ADMIN_TOKEN_FILE"] = str(settings.admin_token_file)
        env["LLM4MSR_ADMIN_TOKEN"] = None
    return env


def _load_and_close(settings: ServeSettings, log_level: int, formatter: logging.Formatter | None) -> str:
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    logging.basicConfig(level=log_level, handlers=[handler])  # as the parent logs
    state = load_state(settings)
    state.close()
    return state.ranker.model_version


def check_in_child(settings: ServeSettings) -> str:
    """Loads model and knowledge once in a short-lived process: the same checks and error lines as one worker
    (and a Parquet snapshot is converted for memory mapping before the workers map it), while the supervisor
    stays free of torch and of a model copy. Returns the model version."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    root = logging.getLogger()
    formatter = root.handlers[0].formatter if root.handlers else None
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_load_and_close, settings, root.level, formatter).result()


def run_workers(settings: ServeSettings, log_level: str) -> int:
    """Serves with settings.workers processes until SIGTERM/SIGINT; the run folder is removed at the end."""
    import uvicorn

    model = check_in_child(settings)
    run_dir = RunDir.create()
    env = settings_environment(settings.model_copy(update={"run_dir": str(run_dir.path)}))
    env["PROMETHEUS_MULTIPROC_DIR"] = str(run_dir.metrics_dir)  # read by prometheus-client when a worker imports it
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    print(
        f"serving model {model} on http://{settings.host}:{settings.port} with {settings.workers} workers "
        "(docs at /docs)",
        flush=True,
    )
    try:
        uvicorn.run(
            WORKER_APP,
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=log_level,
            access_log=False,
            timeout_graceful_shutdown=settings.drain_timeout_s,
        )
    finally:
        run_dir.remove()
    return 0


class ReloadFollower:
    """A worker's thread that applies the run folder's reload orders (written by whichever worker got the call),
    and stops the worker when its supervisor is gone (no orphan keeps the port)."""

    def __init__(self, state: ServingState, on_reload):
        assert state.run_dir is not None
        self.state = state
        self.on_reload = on_reload
        self._stop = threading.Event()
        self._failed: set[int] = set()  # orders this worker could not apply (not retried; a new order is)
        self._thread = threading.Thread(target=self._loop, name="reload-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        parent = os.getppid()
        while not self._stop.wait(self.state.settings.poll_interval_s):
            if os.getppid() != parent:  # the supervisor died (kill -9, OOM): stop as on SIGTERM, draining
                log.error("the serve supervisor (pid %d) is gone; this worker stops", parent)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            order = self.state.run_dir.read_order()
            if order.generation <= self.state.generation or order.artifact is None or order.generation in self._failed:
                continue
            try:
                reload_model(self.state, order.artifact, order.generation)
                self.on_reload()
            except Exception as exc:  # the old model keeps serving; the worker that got the call answers 503
                self._failed.add(order.generation)
                log.error("cannot apply reload order %d (%s): %s", order.generation, order.artifact, exc)


async def reload_everywhere(state: ServingState, artifact: str) -> int:
    """After this worker reloaded `artifact`: orders the others to, and waits until every live worker serves it.
    Returns the number of workers serving it (1 without a run folder)."""
    run_dir = state.run_dir
    if run_dir is None:
        return 1

    def publish() -> int:
        with state.reload_lock:  # this worker's follower must not take its own order for a new one
            order = run_dir.publish_order(artifact)
            state.generation = order.generation
            state.publish_versions()
        return order.generation

    generation = await asyncio.to_thread(publish)
    deadline = time.monotonic() + RELOAD_WAIT_S
    while True:
        statuses = await asyncio.to_thread(run_dir.live_statuses)
        done = sum(1 for s in statuses if s.generation >= generation)
        if done == len(statuses):
            return done
        if time.monotonic() > deadline:
            raise HTTPProblem(
                503,
                f"reloaded in {done} of {len(statuses)} workers within {RELOAD_WAIT_S:.0f} s; the others keep "
                "serving their model until they load it (see the server log)",
            )
        await asyncio.sleep(0.05)
