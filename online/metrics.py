"""Prometheus metrics of the ranker. Names are a contract (docs/architecture.md, Metrics): dashboards and alerts
query them.

llm4msr_rank_latency_seconds                 histogram, /rank handler time (decode to encoded response)
llm4msr_rank_stage_seconds{stage}            histogram, stage in decode | knowledge | forward | encode
llm4msr_rank_candidates                      histogram, candidates per /rank request
llm4msr_requests_total{route,status}         counter, every HTTP request (route = the route template)
llm4msr_knowledge_fallback_total{level,reason}  counter, degraded inputs (level: user, item, scenario, item_id)
llm4msr_versions_info{model_version,knowledge_version,knowledge_space_id,backbone,knowledge_store}  info (= 1)
llm4msr_redis_up                             gauge, 1 while Redis answers (absent without Redis)
llm4msr_knowledge_swaps_total                counter, knowledge versions installed
llm4msr_knowledge_created_timestamp_seconds  gauge, creation time of the served knowledge version

With several worker processes (`serve --workers N`) every worker writes its values into the run folder
(prometheus-client's multiprocess mode) and a scrape of any worker returns them all aggregated: counters summed
(requests, fallbacks; knowledge swaps count once per worker), histograms merged bucket by bucket, gauges by their
`multiprocess_mode`: llm4msr_redis_up is the minimum over live workers (0 when any of them cannot reach Redis),
llm4msr_knowledge_created_timestamp_seconds the maximum over live workers (the newest knowledge served), and
llm4msr_versions_info has one series per distinct set of versions that live workers serve (two during a swap).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import InfoMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from online.run_dir import RunDir

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
        self.redis_up = Gauge(
            "llm4msr_redis_up", "1 while Redis answers the ranker", multiprocess_mode="livemin", registry=r
        )
        self.swaps = Counter("llm4msr_knowledge_swaps", "Knowledge versions installed", registry=r)
        self.knowledge_created = Gauge(
            "llm4msr_knowledge_created_timestamp_seconds",
            "Creation time of the knowledge version being served (its manifest's created_at)",
            multiprocess_mode="livemax",
            registry=r,
        )
        # Pre-create the label sets dashboards plot, so series exist (at 0) before the first event.
        for stage in STAGES:
            self.stage.labels(stage=stage)
        for level, reason in (("user", "unknown"), ("user", "redis_unavailable"), ("item", "unknown")):
            self.fallbacks.labels(level=level, reason=reason)
        self.stage_children = {s: self.stage.labels(stage=s) for s in STAGES}


class VersionsCollector:
    """llm4msr_versions_info across worker processes (an Info has no multiprocess mode): one series per distinct
    set of versions that live workers report in the run folder."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir

    def collect(self):
        family = InfoMetricFamily("llm4msr_versions", "Model and knowledge versions being served")
        seen = set()
        for st in self.run_dir.live_statuses():
            labels = st.version_labels()
            key = tuple(labels.values())
            if key not in seen:
                seen.add(key)
                family.add_metric([], labels)
        yield family


def render_metrics(metrics: ServingMetrics, run_dir: RunDir | None) -> bytes:
    """The Prometheus text of this process (one worker), or of every worker of the run aggregated."""
    if run_dir is None:
        return generate_latest(metrics.registry)
    run_dir.forget_dead_workers()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(run_dir.metrics_dir))
    registry.register(VersionsCollector(run_dir))
    return generate_latest(registry)
