"""Serving settings: CLI flags override environment variables (prefix LLM4MSR_), which override the defaults."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import UserFacingError


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (a container's limit,
    which the affinity does not show)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


# An admin token must be unguessable: 32 characters of URL-safe base64 (secrets.token_urlsafe) carry 192 bits.
ADMIN_TOKEN_MIN_CHARS = 32


class ServeSettings(BaseSettings):
    """Everything the ranker needs to start; e.g. LLM4MSR_REDIS_URL, LLM4MSR_ADMIN_TOKEN, LLM4MSR_MAX_CANDIDATES.

    Build it with `load_settings` to get one clear error line for a bad value instead of a ValidationError.
    """

    model_config = SettingsConfigDict(env_prefix="LLM4MSR_", extra="ignore")

    artifact: str = Field("", description="trained model artifact folder")
    knowledge: str | None = Field(None, description="knowledge snapshot (version folder or root) when no Redis")
    redis_url: str | None = Field(None, description="Redis holding published knowledge; wins over `knowledge`")
    host: str = "127.0.0.1"
    port: int = 8000
    # Each worker is a process with its own model; they share the port, the memory-mapped snapshot knowledge and,
    # through a run folder, the metrics and admin reloads.
    workers: int = Field(default_factory=usable_cores, ge=1, le=256, description="worker processes (default: cores)")
    # Seconds a stopping worker (SIGTERM) waits for requests in flight before it closes their connections.
    drain_timeout_s: float = Field(10.0, gt=0)
    # Set by `serve` for its workers (the run folder they share: online/run_dir.py); not a user option.
    run_dir: str | None = None

    max_candidates: int = Field(1000, ge=1, description="candidates per /rank request; more -> 422")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="request body size limit; larger -> 413")
    # Bounds what one candidate can carry: its keys are counted on the request's bytes before any work is queued;
    # only the model's own feature fields are read, every other key is ignored.
    max_candidate_fields: int = Field(
        64, ge=0, description="extra fields (besides item_id) per candidate; more -> 422 naming the candidate"
    )
    default_top_k: int = Field(100, ge=1)
    # Only from the environment or a file: a command-line flag would be readable by every user through `ps`.
    admin_token: SecretStr | None = Field(
        None,
        description=f"token for /admin/*, at least {ADMIN_TOKEN_MIN_CHARS} characters; admin routes are off without it",
    )
    admin_token_file: Path | None = Field(None, description="file holding the admin token (instead of admin_token)")

    # Knowledge access
    user_cache_size: int = Field(100_000, ge=0, description="LRU entries of (version, user) vectors")
    poll_interval_s: float = Field(1.0, gt=0, description="how often `llm4msr:kn:current` is checked")
    redis_timeout_s: float = Field(0.05, gt=0, description="socket timeout of request-path Redis calls")
    redis_retry_s: float = Field(0.5, gt=0, description="after a Redis failure, skip Redis this long")
    item_preload_limit: int = Field(2_000_000, ge=0, description="item vectors loaded into memory per version")
    knowledge_cache_dir: str | None = Field(
        None, description="where a Parquet snapshot is converted for memory mapping (default $LLM4MSR_CACHE/...)"
    )

    # CPU hygiene
    torch_threads: int = Field(1, ge=1, le=64)
    # Threads of the ranker's executor (= concurrent forwards). On 2 cores one is best: the event loop parses and
    # encodes the next requests while it runs the forward; more only add GIL and cache contention.
    max_concurrent_forwards: int = Field(1, ge=1)
    # Where knowledge + forward run. "thread": on the executor above, off the event loop. "inline": on the event
    # loop thread, which spares the hand-over to the executor thread and back (~0.3-0.6 ms per request on a VM, where
    # the idle thread's wake-up is slow) but blocks the loop for one forward. "auto": inline when the request has at
    # most inline_max_candidates candidates and its knowledge is all in this process's memory (no Redis round trip
    # can block the loop); on the executor otherwise.
    rank_executor: Literal["auto", "thread", "inline"] = "auto"
    # The largest request "auto" scores on the event loop: its forward takes a few ms at most on one CPU core.
    inline_max_candidates: int = Field(500, ge=0)
    # POST /rank answered by a middleware that calls its handler directly, past the framework's routing and
    # dependency solving (online/middleware.py RankFastPath); the same answers. False: through the route.
    rank_fast_path: bool = True
    # The forward as TorchScript graphs (one per scenario and knowledge layout, checked against the eager forward
    # when the model loads): about half the forward time of a 100-candidate request. False: the eager forward.
    traced_forward: bool = True
    # Python's GIL hand-over interval (default 5 ms): a request thread waiting for the GIL behind the event loop's
    # pure-Python work waits up to this long, which shows directly in p99. 0 = leave Python's default.
    gil_switch_interval_ms: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _admin_token(self) -> ServeSettings:
        """Reads the token file and refuses guessable tokens at start-up, not at the first admin call."""
        if self.admin_token is not None and not self.admin_token.get_secret_value():
            self.admin_token = None  # LLM4MSR_ADMIN_TOKEN= (empty) means "admin routes off", as unset does
        if self.admin_token_file is not None:
            if self.admin_token is not None:
                raise ValueError("set the admin token either in LLM4MSR_ADMIN_TOKEN or in a file, not both")
            try:
                text = self.admin_token_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
                raise ValueError(f"cannot read the admin token file {self.admin_token_file}: {why}") from None
            if not text:
                raise ValueError(f"the admin token file {self.admin_token_file} is empty")
            self.admin_token = SecretStr(text)
        if self.admin_token is not None and len(self.admin_token.get_secret_value()) < ADMIN_TOKEN_MIN_CHARS:
            raise ValueError(
                f"the admin token has {len(self.admin_token.get_secret_value())} characters, fewer than the "
                f"{ADMIN_TOKEN_MIN_CHARS} required; make one with: python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'"
            )
        return self


def load_settings(**overrides) -> ServeSettings:
    """ServeSettings from flags (`overrides`) over the environment, or one UserFacingError line naming the setting."""
    try:
        return ServeSettings(**overrides)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        name = ".".join(str(x) for x in err["loc"])
        where = f"setting {name} (LLM4MSR_{name.upper()}): " if name else ""
        msg = err["msg"].removeprefix("Value error, ")
        raise UserFacingError(f"invalid serve settings: {where}{msg}") from None
