"""Prometheus metrics of the ranker. Names are a contract (DESIGN section 6): dashboards and alerts query them.

llm4msr_rank_latency_seconds                 histogram, /rank handler time (decode to encoded response)
llm4msr_rank_stage_seconds{stage}            histogram, stage in decode | knowledge | forward | encode
llm4msr_rank_candidates                      histogram, candidates per /rank request
llm4msr_requests_total{route,status}         counter, every HTTP request (route = the route template)
llm4msr_knowledge_fallback_total{level,reason}  counter, degraded inputs (level: user, item, scenario, item_id)
llm4msr_versions_info{model_version,knowledge_version,knowledge_space_id,backbone,knowledge_store}  info (= 1)
llm4msr_redis_up                             gauge, 1 while Redis answers (absent without Redis)
llm4msr_knowledge_swaps_total                counter, knowledge versions installed
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
)
STAGE_BUCKETS = (0.0001, 0.00025, *LATENCY_BUCKETS)
CANDIDATE_BUCKETS = (1, 10, 25, 50, 100, 200, 300, 500, 750, 1000, 2000, 5000)
STAGES = ("decode", "knowledge", "forward", "encode")


class ServingMetrics:
    """One registry per app, so several apps (tests) in one process do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "llm4msr_rank_latency_seconds", "Time to answer POST /rank", buckets=LATENCY_BUCKETS, registry=r
        )
        self.stage = Histogram(
            "llm4msr_rank_stage_seconds", "Time per /rank stage", ["stage"], buckets=STAGE_BUCKETS, registry=r
        )
        self.candidates = Histogram(
            "llm4msr_rank_candidates", "Candidates per /rank request", buckets=CANDIDATE_BUCKETS, registry=r
        )
        self.requests = Counter(
            "llm4msr_requests", "HTTP requests by route template and status code", ["route", "status"], registry=r
        )
        self.fallbacks = Counter(
            "llm4msr_knowledge_fallback",
            "Degraded knowledge inputs used (default user vector, zero item vector, OOV id)",
            ["level", "reason"],
            registry=r,
        )
        self.versions = Info("llm4msr_versions", "Model and knowledge versions being served", registry=r)
        self.redis_up = Gauge("llm4msr_redis_up", "1 while Redis answers the ranker", registry=r)
        self.swaps = Counter("llm4msr_knowledge_swaps", "Knowledge versions installed", registry=r)
        self.knowledge_created = Gauge(
            "llm4msr_knowledge_created_timestamp_seconds",
            "Creation time of the knowledge version being served (its manifest's created_at)",
            registry=r,
        )
        # Pre-create the label sets dashboards plot, so series exist (at 0) before the first event.
        for stage in STAGES:
            self.stage.labels(stage=stage)
        for level, reason in (("user", "unknown"), ("user", "redis_unavailable"), ("item", "unknown")):
            self.fallbacks.labels(level=level, reason=reason)
        self.stage_children = {s: self.stage.labels(stage=s) for s in STAGES}

    def set_versions(
        self, model_version: str, knowledge_version: str | None, space_id: str | None, backbone: str, store: str
    ) -> None:
        self.versions.info(
            {
                "model_version": model_version,
                "knowledge_version": knowledge_version or "",
                "knowledge_space_id": space_id or "",
                "backbone": backbone,
                "knowledge_store": store,
            }
        )
