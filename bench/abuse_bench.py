"""What one hostile client costs the others: /rank latency of normal traffic with and without an attacker.

What it does:
1. builds a synthetic world (tests/fixtures_serving.build_world: dataset with one extra categorical feature column
   `device`, split, knowledge snapshot of --dim, a STAR + LLM4MSR model with --levels) or uses --artifact and
   --knowledge, and starts one real `llm4msr serve` subprocess with the default limits (1000 candidates, 1 MB body,
   64 fields per candidate) unless told otherwise;
2. drives --clients normal clients (separate processes, persistent connection, TCP_NODELAY, one write per request,
   --candidates candidates each) back to back, in phases alternated over --rounds so that background load on a
   shared machine hits them alike:
   - `baseline`: normal traffic only;
   - `worst`: plus one attacker process sending the costliest body the limits still admit (1000 candidates, each
     with the model's feature fields and junk fields up to the 64-field limit, ~1 MB; answered 200) every
     --interval seconds;
   - `over-limit`: the same with the body of issue 11 (one candidate with ~80k distinct keys; a 422);
   - `flood-plain` and `flood-worst` (with --flood): the attacker sends back to back instead, first the costliest
     legitimate body (1000 plain candidates), then the worst body: a client that floods the ranker loads it
     whatever it sends, so the question there is only how much more the hostile body costs than a legal one;
3. prints, per phase, the normal clients' p50/p99 and their ratio to the baseline p99, requests/s, non-2xx answers,
   and the attacker's latency and status codes. --json OUT writes everything.

Example: python bench/abuse_bench.py --json /tmp/abuse_bench.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.serve_bench import HTTPConn, make_bodies  # noqa: E402

EXPECTED_HOSTILE_STATUS = {"worst": 200, "over-limit": 422, "flood-plain": 200, "flood-worst": 200}


def normal_bodies(users: list[str], items: list[str], scenario: str, n: int, fields: list[str]) -> list[bytes]:
    """serve_bench's request bodies, each candidate also carrying the model's feature fields (as a client would)."""
    from tests.fixtures_serving import FEATURE_VALUES

    out = []
    for k, raw in enumerate(make_bodies(users, items, scenario, n, 64, seed=1)):
        body = json.loads(raw)
        for i, cand in enumerate(body["candidates"]):
            cand.update({f: FEATURE_VALUES[(i + k) % len(FEATURE_VALUES)] for f in fields})
        out.append(json.dumps(body).encode())
    return out


def _normal_client(port: int, bodies: list[bytes], duration: float, seed: int, barrier, out) -> None:
    """Back-to-back normal requests for `duration` seconds after the barrier."""
    conn = HTTPConn("127.0.0.1", port)
    for body in bodies[:3]:  # warm the connection
        conn.post("/rank", body)
    barrier.wait()
    t_start = time.perf_counter()
    deadline = t_start + duration
    lat, statuses, i = [], [], seed
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        status, _ = conn.post("/rank", bodies[i % len(bodies)])
        lat.append(time.perf_counter() - t0)
        statuses.append(status)
        i += 1
    conn.close()
    out.put({"kind": "normal", "lat": lat, "statuses": statuses, "elapsed": time.perf_counter() - t_start})


def _attacker(port: int, body: bytes, duration: float, interval: float, barrier, out) -> None:
    """The hostile body again and again (one connection, like one abusive client), `interval` s apart."""
    conn = HTTPConn("127.0.0.1", port)
    barrier.wait()
    deadline = time.perf_counter() + duration
    lat, statuses = [], []
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        status, _ = conn.post("/rank", body)
        lat.append(time.perf_counter() - t0)
        statuses.append(status)
        if interval > 0:
            time.sleep(interval)
    conn.close()
    out.put({"kind": "hostile", "lat": lat, "statuses": statuses})


def run_phase(
    port: int, normal: list[bytes], clients: int, duration: float, hostile: bytes | None, interval: float
) -> dict:
    """One phase: `clients` normal processes, plus one attacker when `hostile` is given."""
    ctx = mp.get_context("fork")
    parties = clients + (hostile is not None)
    barrier = ctx.Barrier(parties)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_normal_client, args=(port, normal, duration, k * 7, barrier, out)) for k in range(clients)
    ]
    if hostile is not None:
        procs.append(ctx.Process(target=_attacker, args=(port, hostile, duration, interval, barrier, out)))
    for p in procs:
        p.start()
    results = [out.get(timeout=duration + 120) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    normal_res = [r for r in results if r["kind"] == "normal"]
    hostile_res = [r for r in results if r["kind"] == "hostile"]
    return {
        "lat": [x for r in normal_res for x in r["lat"]],
        "statuses": [x for r in normal_res for x in r["statuses"]],
        "elapsed": max(r["elapsed"] for r in normal_res),
        "hostile_lat": [x for r in hostile_res for x in r["lat"]],
        "hostile_statuses": [x for r in hostile_res for x in r["statuses"]],
    }


def summarize(parts: list[dict]) -> dict:
    lat = np.array([x for p in parts for x in p["lat"]]) * 1e3
    hostile = np.array([x for p in parts for x in p["hostile_lat"]]) * 1e3
    statuses = [s for p in parts for s in p["statuses"]]
    out = {
        "n": int(len(lat)),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(lat.max()),
        "rps": float(len(lat) / sum(p["elapsed"] for p in parts)),
        "errors": sum(1 for s in statuses if not 200 <= s < 300),
        "hostile_n": int(len(hostile)),
        "hostile_statuses": dict(Counter(s for p in parts for s in p["hostile_statuses"])),
    }
    if len(hostile):
        out.update(hostile_p50_ms=float(np.percentile(hostile, 50)), hostile_max_ms=float(hostile.max()))
    return out


def measure(
    port: int,
    normal: list[bytes],
    hostile: dict[str, tuple[bytes, float]],
    clients: int = 4,
    duration: float = 5.0,
    rounds: int = 3,
) -> dict[str, dict]:
    """Baseline and one phase per attack (name -> (body, seconds between its requests)), alternated over `rounds`
    and pooled per phase. Every phase's summary has the normal clients' p50/p99 (ms), their p99 over the
    baseline's (`p99_ratio`), and the attacker's answers."""
    phases = ["baseline", *hostile]
    parts: dict[str, list[dict]] = {ph: [] for ph in phases}
    for r in range(rounds):
        for ph in phases[r % len(phases) :] + phases[: r % len(phases)]:
            body, interval = hostile.get(ph, (None, 0.0))
            parts[ph].append(run_phase(port, normal, clients, duration / rounds, body, interval))
    out = {ph: summarize(parts[ph]) for ph in phases}
    for ph in phases:
        out[ph]["p99_ratio"] = out[ph]["p99_ms"] / out["baseline"]["p99_ms"]
    return out


def print_table(results: dict[str, dict]) -> None:
    print(
        f"{'phase':<11} | {'p50':>6} {'p99':>6} {'max':>7} {'p99/base':>8} {'req/s':>6} {'err':>4} | "
        f"{'attacker n':>10} {'p50':>7} {'max':>7}  status"
    )
    for ph, x in results.items():
        hostile = (
            f"{x['hostile_n']:>10} {x.get('hostile_p50_ms', 0):7.1f} {x.get('hostile_max_ms', 0):7.1f}  "
            + ",".join(f"{k}x{v}" for k, v in sorted(x["hostile_statuses"].items()))
            if x["hostile_n"]
            else f"{'-':>10} {'':>7} {'':>7}"
        )
        print(
            f"{ph:<11} | {x['p50_ms']:6.2f} {x['p99_ms']:6.2f} {x['max_ms']:7.1f} {x['p99_ratio']:8.2f} "
            f"{x['rps']:6.0f} {x['errors']:4d} | {hostile}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4, help="concurrent normal clients")
    ap.add_argument("--candidates", type=int, default=500, help="candidates per normal request")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per phase, over all rounds")
    ap.add_argument("--rounds", type=int, default=3, help="alternations between the phases")
    ap.add_argument("--interval", type=float, default=0.25, help="seconds between the attacker's requests")
    ap.add_argument("--flood", action="store_true", help="also the back-to-back phases flood-plain and flood-worst")
    ap.add_argument("--users", type=int, default=300, help="synthetic world: users")
    ap.add_argument("--items-per-scenario", type=int, default=400, help="synthetic world: items per scenario")
    ap.add_argument("--dim", type=int, default=576, help="synthetic knowledge dimension (SmolLM2 hidden size)")
    ap.add_argument("--variant", default="llm4msr", choices=["plain", "llm4msr", "llm4msr-item"])
    ap.add_argument("--artifact", help="serve this artifact instead of the synthetic one (needs --knowledge)")
    ap.add_argument("--knowledge", help="knowledge snapshot for --artifact")
    ap.add_argument("--max-candidates", type=int, default=1000, help="server limit (the worst body uses it)")
    ap.add_argument("--max-body-bytes", type=int, default=1_000_000, help="server limit (the worst body uses it)")
    ap.add_argument("--max-candidate-fields", type=int, default=64, help="server limit (the worst body uses it)")
    ap.add_argument("--work", help="working folder (default: a temp dir)")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)

    from shared.artifact import load_artifact
    from tests.fixtures_serving import build_world, over_limit_body, start_server, worst_rank_body

    load_before = os.getloadavg()[0]
    work = Path(args.work or tempfile.mkdtemp(prefix="abuse_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.artifact:
        artifact, knowledge = Path(args.artifact), Path(args.knowledge) if args.knowledge else None
        art = load_artifact(artifact)
        users, items = [f"u{i}" for i in range(100)], list(art.encoder.vocabs["item_id"].tokens)
        scenario = art.config.scenarios[0]
    else:
        t0 = time.perf_counter()
        world = build_world(
            work / "world",
            users=args.users,
            variants=(args.variant,),
            dim=args.dim,
            items_per_scenario=args.items_per_scenario,
            feature_column="device",
        )
        print(f"built synthetic world in {time.perf_counter() - t0:.1f}s", flush=True)
        artifact, knowledge = world.artifacts[args.variant], world.knowledge_root
        art = load_artifact(artifact)
        users, items, scenario = world.users, world.items, world.scenarios[0]
    fields = art.encoder.extra_fields

    normal = normal_bodies(users, items, scenario, min(args.candidates, len(items)), fields)
    worst = worst_rank_body(
        users[0], scenario, fields, args.max_candidates, args.max_candidate_fields, args.max_body_bytes
    )
    hostile = {
        "worst": (worst, args.interval),
        "over-limit": (over_limit_body(users[0], scenario, args.max_body_bytes), args.interval),
    }
    if args.flood:
        plain = json.dumps(
            {
                "user_id": users[0],
                "scenario": scenario,
                "candidates": [
                    {"item_id": f"{i:08d}", **dict.fromkeys(fields, "web")} for i in range(args.max_candidates)
                ],
            }
        ).encode()
        hostile.update({"flood-plain": (plain, 0.0), "flood-worst": (worst, 0.0)})
    cmd = [
        "--artifact",
        str(artifact),
        "--max-candidates",
        str(args.max_candidates),
        "--max-body-bytes",
        str(args.max_body_bytes),
        "--max-candidate-fields",
        str(args.max_candidate_fields),
    ]
    if knowledge is not None:
        cmd += ["--knowledge", str(knowledge)]
    server = start_server(cmd, work / "server.log", env={"LLM4MSR_KNOWLEDGE_CACHE_DIR": str(work / "knowledge-cache")})
    try:
        results = measure(server.port, normal, hostile, args.clients, args.duration, args.rounds)
    finally:
        server.stop()

    print()
    print(
        f"POST /rank, {args.clients} normal clients x {args.candidates} candidates, one attacker "
        f"(every {args.interval} s; flood = back to back); worst body {len(worst)} bytes, over-limit body "
        f"{len(hostile['over-limit'][0])} bytes; latency in ms ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, 1-min load average {load_before:.1f} before the run)"
    )
    print_table(results)
    bad = [
        ph
        for ph, want in EXPECTED_HOSTILE_STATUS.items()
        if ph in results and set(results[ph]["hostile_statuses"]) != {want}
    ]
    if bad:
        print(f"UNEXPECTED attacker answers in {bad}", flush=True)
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k != "json"}
        Path(args.json).write_text(json.dumps({"args": meta, "load_before": load_before, "results": results}, indent=2))
        print(f"wrote {args.json}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
