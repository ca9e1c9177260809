"""The dashboards and alert rules read metrics that a real ranker exports, and a real Prometheus can compute them.

A real `llm4msr serve` with 2 worker processes (uvicorn, knowledge from a real Redis; metrics in prometheus-client's
multiprocess mode, aggregated over the workers at every scrape) is scraped directly, then by the Debian
`prometheus` server loaded with the project's own alert rules and scrape job; after a short /rank load the
dashboard's p99 query, sent through Prometheus's HTTP API, returns a number, and every dashboard query and rule
evaluates without error.
"""

from __future__ import annotations

import json
import math
import random
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures_deploy import (
    ALERTS,
    DASHBOARDS,
    PROMETHEUS_DIR,
    alert_rules,
    dashboard_exprs,
    grafana_to_promql,
    metric_names,
    prom_query,
    prometheus_exe,
    start_prometheus,
)
from tests.fixtures_serving import build_world, publish, rank_body, start_server
from tests.required import require

P99_TITLE = "/rank latency percentiles"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("deploy-world"), users=40, variants=("llm4msr-item",))


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    from tests.conftest import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("deploy-redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def ranker(world, redis_url, tmp_path_factory):
    publish(world.snapshot_dir, redis_url)
    log = tmp_path_factory.mktemp("deploy-ranker") / "ranker.log"
    server = start_server(
        ["--artifact", str(world.artifacts["llm4msr-item"]), "--redis-url", redis_url],
        log,
        env={"LLM4MSR_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "LLM4MSR_WORKERS": "2"},
        timeout=240,  # two processes import torch and load the model
    )
    yield server
    server.stop()


def send_load(world, base_url: str, n: int, seconds: float) -> list[float]:
    """n /rank requests spread over `seconds` (bounded in count and time), with unknown users and items mixed in."""
    rng = random.Random(0)
    latencies = []
    deadline = time.time() + seconds * 3
    with httpx.Client(base_url=base_url, timeout=10) as client:
        for k in range(n):
            if time.time() > deadline:
                break
            user = world.users[k % len(world.users)] if k % 7 else f"new-user-{k}"
            scenario = world.scenarios[k % len(world.scenarios)]
            items = rng.sample(world.items, min(len(world.items), rng.choice([5, 20, 50])))
            if k % 5 == 0:
                items.append(f"unknown-item-{k}")
            t0 = time.perf_counter()
            r = client.post("/rank", json=rank_body(user, scenario, items))
            latencies.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            time.sleep(seconds / n)
        # one 4xx so the error-ratio series has a non-2xx status too
        bad = client.post("/rank", json=rank_body(world.users[0], "no-such-scenario", world.items[:2]))
        assert bad.status_code == 422, bad.text
    return latencies


def scrape_sample_names(base_url: str) -> set[str]:
    text = httpx.get(base_url + "/metrics", timeout=5).text
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_every_dashboard_and_alert_metric_is_exported(world, ranker):
    send_load(world, ranker.url, n=20, seconds=0.5)
    exported = scrape_sample_names(ranker.url)
    wanted: dict[str, set[str]] = {}
    for path in DASHBOARDS:
        for expr in dashboard_exprs(path):
            for name in metric_names(expr):
                wanted.setdefault(name, set()).add(path.name)
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            wanted.setdefault(name, set()).add(ALERTS.name)
    wanted.pop("up", None)  # Prometheus's own series for every scrape target
    assert len(wanted) >= 8, sorted(wanted)
    missing = {name: sorted(where) for name, where in wanted.items() if name not in exported}
    assert not missing, f"queried but not exported by the ranker: {missing}"
    # the knowledge age the stale alert reads is the manifest's creation time of the served version
    text = httpx.get(ranker.url + "/metrics", timeout=5).text
    created = next(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "llm4msr_knowledge_created_timestamp_seconds"
    )
    assert created == pytest.approx(1704067200.0)  # 2024-01-01T00:00:00Z in the test snapshot


def test_prometheus_scrapes_ranker_and_dashboard_p99_is_a_number(world, ranker, tmp_path):
    require(prometheus_exe(), "prometheus not installed (Debian package; .ci/run installs it)")
    base, prom = start_prometheus(tmp_path, f"127.0.0.1:{ranker.port}")
    try:
        # the ranker is a healthy target before the load starts
        deadline = time.time() + 20
        while time.time() < deadline and not prom_query(base, 'up{job="llm4msr-ranker"} == 1'):
            time.sleep(0.5)
        assert prom_query(base, 'up{job="llm4msr-ranker"} == 1'), prom.log()

        latencies = send_load(world, ranker.url, n=150, seconds=4.0)
        time.sleep(2.5)  # two more scrapes after the last request

        dash = (PROMETHEUS_DIR.parent / "grafana/dashboards/llm4msr-ranker.json").read_text()
        panel = next(p for p in json.loads(dash)["panels"] if p.get("title") == P99_TITLE)
        p99_expr = next(t["expr"] for t in panel["targets"] if t["legendFormat"] == "p99")
        result = prom_query(base, grafana_to_promql(p99_expr))
        assert len(result) == 1, result
        p99 = float(result[0]["value"][1])
        assert math.isfinite(p99) and 0 < p99 <= 1.0, p99
        # the server measures inside the client's time, so every observation lies in a bucket at or below the one
        # holding the slowest client latency, and so does the interpolated p99
        from online.metrics import LATENCY_BUCKETS

        bound = next((b for b in LATENCY_BUCKETS if b >= max(latencies)), LATENCY_BUCKETS[-1])
        assert p99 <= bound + 1e-9, (p99, max(latencies))

        # every dashboard query is valid PromQL for this Prometheus, and the core ones have data
        for path in DASHBOARDS:
            for expr in dashboard_exprs(path):
                if expr.startswith("label_values("):
                    name = expr[len("label_values(") :].split(",")[0].strip()
                    assert prom_query(base, name), f"{name} has no series"
                    continue
                prom_query(base, grafana_to_promql(expr))
        rps = prom_query(base, 'sum(rate(llm4msr_requests_total{route="/rank"}[1m]))')
        assert float(rps[0]["value"][1]) > 0
        versions = prom_query(base, "count by (model_version, knowledge_version) (llm4msr_versions_info)")
        assert versions and versions[0]["metric"]["knowledge_version"] == "v1"

        # the project's rules load and evaluate without errors; the p99 recording rule has a value
        deadline = time.time() + 10
        while time.time() < deadline and not prom_query(base, "llm4msr:rank_latency_seconds:p99_5m"):
            time.sleep(0.5)
        recorded = prom_query(base, "llm4msr:rank_latency_seconds:p99_5m")
        assert recorded and math.isfinite(float(recorded[0]["value"][1]))
        rules = httpx.get(base + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        loaded = [r for g in rules for r in g["rules"]]
        assert len(loaded) == len(alert_rules())
        bad = [(r["name"], r.get("lastError")) for r in loaded if r.get("health") == "err"]
        assert not bad, bad
        # the stale-knowledge alert fires: the test snapshot was created on 2024-01-01
        stale = next(r for r in loaded if r["name"] == "Llm4msrKnowledgeStale")
        assert stale["state"] in {"pending", "firing"}, stale
    finally:
        prom.stop()
