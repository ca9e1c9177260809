"""The Grafana dashboard's latency panels, rendered as PNG from a real Prometheus scrape of a real ranker.

Grafana is not packaged for Debian, so this is the stand-in for a screenshot: it
1. builds the synthetic serving world (tests/fixtures_serving.build_world: dataset, knowledge snapshot with seeded
   vectors, an LLM4MSR-STAR artifact with scenario, user and item levels);
2. starts `llm4msr serve` and the Debian `prometheus` with the project's scrape job and alert rules
   (deploy/prometheus, 1 s scrape);
3. drives POST /rank in phases of growing candidate counts (TCP_NODELAY keep-alive clients from serve_bench);
4. runs the dashboard's own PromQL (deploy/grafana/dashboards/llm4msr-ranker.json, $__rate_interval replaced by
   --rate-interval) through Prometheus's query_range API and plots: p50/p95/p99 over time, per-stage p99,
   requests/s and candidates per request, and the latency histogram (bucket counts at the end of the run);
5. writes the plots and a JSON summary (server-side percentiles from Prometheus next to client-side ones).

Example: python bench/dashboard_bench.py --out /tmp/dashboard_bench
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DASHBOARD = REPO / "deploy/grafana/dashboards/llm4msr-ranker.json"


def panel_targets(title: str) -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    for p in dash["panels"]:
        if p.get("title") == title:
            return [(t["expr"], t.get("legendFormat", "")) for t in p["targets"]]
    raise KeyError(f"no panel {title!r} in {DASHBOARD}")


def to_promql(expr: str, rate_interval: str) -> str:
    return expr.replace("$__rate_interval", rate_interval).replace("$instance", ".*")


def query_range(base: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    import httpx

    r = httpx.get(
        base + "/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step}, timeout=30
    )
    body = r.json()
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def legend(fmt: str, metric: dict) -> str:
    out = fmt
    for k, v in metric.items():
        out = out.replace("{{" + k + "}}", v)
    return out or json.dumps(metric)


def panel_series(base, title, rate_interval, start, end, step) -> list[tuple[str, list[float], list[float]]]:
    series = []
    for expr, fmt in panel_targets(title):
        for s in query_range(base, to_promql(expr, rate_interval), start, end, step):
            ts = [float(t) - start for t, _ in s["values"]]
            vs = [float(v) for _, v in s["values"]]
            series.append((legend(fmt, s["metric"]), ts, vs))
    return series


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="dashboard_bench", help="folder for the PNGs and summary.json")
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--items-per-scenario", type=int, default=200)
    ap.add_argument("--dim", type=int, default=64, help="knowledge dimension of the synthetic world")
    ap.add_argument("--candidates", default="20,100,300", help="candidates per request, one load phase each")
    ap.add_argument("--phase-seconds", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="ranker torch threads (per worker)")
    ap.add_argument("--workers", type=int, default=1, help="ranker worker processes (metrics aggregated over them)")
    ap.add_argument("--rate-interval", default="10s", help="what Grafana's $__rate_interval becomes")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from bench.serve_bench import build_world, make_bodies, run_cell, start_server, summarize
    from tests.fixtures_deploy import prom_query, start_prometheus

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="llm4msr-dashboard-"))
    world = build_world(work, args.users, args.items_per_scenario, args.dim, epochs=1, variants=["llm4msr-item"])
    artifact = world["artifacts"]["llm4msr-item"]
    env = {"LLM4MSR_KNOWLEDGE_CACHE_DIR": str(work / "knowledge-cache")}
    server, port = start_server(artifact, world["knowledge"], work / "ranker.log", args.threads, args.workers, env)
    base, prom = start_prometheus(work, f"127.0.0.1:{port}")
    phases = []
    try:
        time.sleep(3)  # a few scrapes before the load
        t_start = time.time()
        for k, n in enumerate(int(c) for c in args.candidates.split(",")):
            scenario = world["scenarios"][k % len(world["scenarios"])]
            bodies = make_bodies(world["users"], world["items"], scenario, min(n, len(world["items"])), 200, seed=k)
            t0 = time.time() - t_start
            cell = summarize([run_cell(port, bodies, args.clients, 10**6, 10, args.phase_seconds)])
            phases.append(
                {
                    "candidates": n,
                    "start_s": round(t0, 1),
                    "end_s": round(time.time() - t_start, 1),
                    **{key: cell[key] for key in ("n", "errors", "p50_ms", "p95_ms", "p99_ms", "rps")},
                }
            )
            print(
                f"phase {n:>4} candidates: {cell['n']} requests, {cell['rps']:.0f} req/s, client p50 "
                f"{cell['p50_ms']:.2f} ms p99 {cell['p99_ms']:.2f} ms",
                flush=True,
            )
        time.sleep(3)  # the last scrapes
        t_end = time.time()
        step = 1.0
        rate = args.rate_interval

        def draw(ax, series, unit_scale=1.0, ylabel=""):
            for name, ts, vs in series:
                ax.plot(ts, np.array(vs) * unit_scale, label=name)
            for j, ph in enumerate(phases):
                ax.axvspan(ph["start_s"], ph["end_s"], alpha=0.05 + 0.05 * (j % 2), color="grey")
            ax.set_xlabel("seconds since load start")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)

        files = []
        fig, ax = plt.subplots(figsize=(9, 4.5))
        draw(ax, panel_series(base, "/rank latency percentiles", rate, t_start, t_end, step), 1e3, "ms")
        cands = ", ".join(str(ph["candidates"]) for ph in phases)
        ax.set_title(f"/rank latency percentiles (Prometheus, rate window {rate}); phases: {cands} candidates")
        fig.tight_layout()
        files.append(out / "dashboard_latency_percentiles.png")
        fig.savefig(files[-1], dpi=90)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(9, 4.5))
        draw(ax, panel_series(base, "Per-stage latency (p99)", rate, t_start, t_end, step), 1e3, "ms")
        ax.set_title("Per-stage latency p99 (decode, knowledge, forward, encode)")
        fig.tight_layout()
        files.append(out / "dashboard_stage_latency.png")
        fig.savefig(files[-1], dpi=90)
        plt.close(fig)

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
        draw(a1, panel_series(base, "Request rate by route and status", rate, t_start, t_end, step), 1.0, "req/s")
        a1.set_title("Request rate by route and status")
        draw(a2, panel_series(base, "Candidates per request", rate, t_start, t_end, step), 1.0, "candidates")
        a2.set_title("Candidates per request")
        fig.tight_layout()
        files.append(out / "dashboard_traffic.png")
        fig.savefig(files[-1], dpi=90)
        plt.close(fig)

        buckets = prom_query(base, "sum by (le) (llm4msr_rank_latency_seconds_bucket)")
        pairs = sorted((float(b["metric"]["le"]), float(b["value"][1])) for b in buckets)
        bounds = [le for le, _ in pairs]
        counts = np.diff([0.0] + [c for _, c in pairs])
        fig, ax = plt.subplots(figsize=(9, 4.5))
        labels = [f"≤{le * 1e3:g}" if np.isfinite(le) else "+Inf" for le in bounds]
        ax.bar(range(len(counts)), counts)
        ax.set_xticks(range(len(counts)), labels, rotation=60, fontsize=8)
        ax.set_xlabel("latency bucket (ms)")
        ax.set_ylabel("requests")
        ax.set_title("/rank latency histogram (llm4msr_rank_latency_seconds buckets, whole run)")
        fig.tight_layout()
        files.append(out / "dashboard_latency_histogram.png")
        fig.savefig(files[-1], dpi=90)
        plt.close(fig)

        # server-side percentiles over the whole run, from the same dashboard expression
        window = f"{int(t_end - t_start) + 1}s"
        whole = {}
        for expr, fmt in panel_targets("/rank latency percentiles"):
            res = prom_query(base, to_promql(expr, window))
            whole[fmt] = round(float(res[0]["value"][1]) * 1e3, 3) if res else None
        summary = {
            "phases": phases,
            "prometheus_whole_run_ms": whole,
            "rate_interval": rate,
            "world": {"users": len(world["users"]), "items": len(world["items"]), "dim": args.dim},
            "plots": [str(f) for f in files],
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps({"prometheus_whole_run_ms": whole, "plots": summary["plots"]}, indent=2))
    finally:
        prom.stop()
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
