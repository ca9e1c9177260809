"""Serving settings: CLI flags override environment variables (prefix LLM4MSR_), which override the defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServeSettings(BaseSettings):
    """Everything the ranker needs to start; e.g. LLM4MSR_REDIS_URL, LLM4MSR_ADMIN_TOKEN, LLM4MSR_MAX_CANDIDATES."""

    model_config = SettingsConfigDict(env_prefix="LLM4MSR_", extra="ignore")

    artifact: str = Field("", description="trained model artifact folder")
    knowledge: str | None = Field(None, description="knowledge snapshot (version folder or root) when no Redis")
    redis_url: str | None = Field(None, description="Redis holding published knowledge; wins over `knowledge`")
    host: str = "127.0.0.1"
    port: int = 8000

    max_candidates: int = Field(1000, ge=1, description="candidates per /rank request; more -> 422")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="request body size limit; larger -> 413")
    default_top_k: int = Field(100, ge=1)
    admin_token: str | None = Field(None, description="token for /admin/*; admin routes are off without it")

    # Knowledge access
    user_cache_size: int = Field(100_000, ge=0, description="LRU entries of (version, user) vectors")
    poll_interval_s: float = Field(1.0, gt=0, description="how often `llm4msr:kn:current` is checked")
    redis_timeout_s: float = Field(0.05, gt=0, description="socket timeout of request-path Redis calls")
    redis_retry_s: float = Field(0.5, gt=0, description="after a Redis failure, skip Redis this long")
    item_preload_limit: int = Field(2_000_000, ge=0, description="item vectors loaded into memory per version")

    # CPU hygiene
    torch_threads: int = Field(1, ge=1, le=64)
    # Threads of the ranker's executor (= concurrent forwards). On 2 cores one is best: the event loop parses and
    # encodes the next requests while it runs the forward; more only add GIL and cache contention.
    max_concurrent_forwards: int = Field(1, ge=1)
    # "thread": knowledge + forward on the executor above, off the event loop (the design's rule: the loop stays
    # free for health checks and parsing). "inline": on the event loop thread; no thread hand-over, measured ~20%
    # more throughput on a busy 2-core box, at the price of blocking the loop for one forward (1-3 ms).
    rank_executor: Literal["thread", "inline"] = "thread"
    # Python's GIL hand-over interval (default 5 ms): a request thread waiting for the GIL behind the event loop's
    # pure-Python work waits up to this long, which shows directly in p99. 0 = leave Python's default.
    gil_switch_interval_ms: float = Field(1.0, ge=0)
