"""Fault drills: a real ranker under concurrent load with a real Redis, while things go wrong.

Each drill reports requests sent, non-2xx answers (and 5xx among them), fallbacks reported in the answers and the
recovery time:
1. redis-outage   Redis is killed for --outage-s seconds while most users are not in the ranker's LRU (the world
                  has more users than the cache holds), then restarted from its saved data. Expect 0 5xx, counted
                  fallbacks while it is down, and answers from Redis again without restarting the ranker.
2. version-flips  --flips new knowledge versions are published under load. Expect 0 failed requests, and every
                  answer scored entirely with the version it names (its scores are recomputed in this process from
                  that version's snapshot, so a user vector of one version mixed with items of another is caught).
3. corrupt-publish  A snapshot whose user vectors have a wrong length in some rows is published. The publish must
                  fail before the `llm4msr:kn:current` flip; the ranker keeps answering from the old version.
4. kill-9-worker  A ranker with --worker-count worker processes is under load when the worker holding the most
                  client connections is killed with SIGKILL. Expect the supervisor to start a replacement, the other
                  workers to keep answering meanwhile, and the only failed requests to be those in flight on the
                  killed worker's connections (at most one per connection; never an HTTP 5xx).
5. kill-9-build   `llm4msr knowledge build` (a tiny randomly initialised transformers model) is killed with SIGKILL
                  in the middle of the user phase and run again; the snapshot must equal an uninterrupted build.

`--short` is the form CI runs (tests/test_fault_drills.py): smaller world, 2 s outage. The full form:
    python bench/fault_drills.py --json /tmp/fault_drills.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.conftest import RedisServer  # noqa: E402  (after the path set-up above)

# ---------------------------------------------------------------------------------------------------------------
# Real processes: Redis (restartable from its own RDB file) and the load


class DurableRedis(RedisServer):
    """The suite's real redis-server (in `workdir`, where it keeps its RDB file); `crash()` saves, then kills it
    (-9), and `start()` again reloads the file, as a restarted production Redis reloads its AOF/RDB."""

    def crash(self) -> None:
        self.client().save()
        self.stop()


@dataclass
class Answer:
    started: float  # seconds since the load started
    ended: float
    status: int
    body: dict | None
    request: dict
    worker: int | None = None  # pid of the worker process holding the connection (when the load asked for it)
    client: int = 0


@dataclass
class Load:
    """`clients` threads, each with its own keep-alive connection (TCP_NODELAY, one write per request), sending
    /rank requests for random users back to back until stopped."""

    port: int
    users: list[str]
    scenarios: list[str]
    items: list[str]
    clients: int = 4
    candidates: int = 50
    track_workers: bool = False  # ask each new connection which worker holds it (GET /readyz)
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    t0: float = 0.0

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        conn, worker = self._connect()
        try:
            while not self._stop.is_set():
                req = {
                    "user_id": rng.choice(self.users),
                    "scenario": rng.choice(self.scenarios),
                    "candidates": [{"item_id": i} for i in rng.sample(self.items, self.candidates)],
                    "top_k": self.candidates,
                }
                t = time.perf_counter() - self.t0
                try:
                    status, raw = conn.post("/rank", json.dumps(req).encode())
                    body = json.loads(raw) if status == 200 else None
                except (ConnectionError, OSError):
                    status, body = 0, None  # connection-level failure: counted as non-2xx
                    conn.close()
                    conn, next_worker = self._connect()
                else:
                    next_worker = worker
                with self._lock:
                    self.answers.append(Answer(t, time.perf_counter() - self.t0, status, body, req, worker, seed))
                worker = next_worker
        finally:
            conn.close()

    def _connect(self) -> tuple:
        from bench.serve_bench import HTTPConn

        for _ in range(100):  # right after a kill the port may refuse for a moment
            try:
                conn = HTTPConn("127.0.0.1", self.port)
                if not self.track_workers:
                    return conn, None
                status, raw = conn.request("GET", "/readyz")
                return conn, json.loads(raw)["worker_pid"]
            except (ConnectionError, OSError):
                time.sleep(0.05)
        raise ConnectionError(f"cannot connect to the ranker on port {self.port}")

    def start(self) -> Load:
        self.t0 = time.perf_counter()
        self._threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def stop(self) -> list[Answer]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        return sorted(self.answers, key=lambda a: a.started)


def summarize(name: str, answers: list[Answer], **extra) -> dict:
    fallbacks: dict[str, int] = {}
    for a in answers:
        for f in (a.body or {}).get("fallbacks", []):
            key = f"{f['level']}/{f['reason']}"
            fallbacks[key] = fallbacks.get(key, 0) + int(f["count"])
    lat = sorted(a.ended - a.started for a in answers if a.status == 200)
    return {
        "drill": name,
        "requests": len(answers),
        "non_2xx": sum(1 for a in answers if not 200 <= a.status < 300),
        "5xx": sum(1 for a in answers if a.status >= 500 or a.status == 0),
        "fallbacks": fallbacks,
        "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 2) if lat else None,
        **extra,
    }


# ---------------------------------------------------------------------------------------------------------------
# The drills


def drill_redis_outage(world, redis: DurableRedis, port: int, outage_s: float, settle_s: float) -> dict:
    load = Load(port, world.users, world.scenarios, world.items).start()
    time.sleep(settle_s)
    down_at = load.now()
    redis.crash()
    time.sleep(outage_s)
    redis.start()
    up_at = load.now()
    # Recovered = an answer started after the restart with no Redis fallback, and none after it has one.
    deadline = time.time() + 30
    while time.time() < deadline:
        time.sleep(0.5)
        recent = [a for a in list(load.answers) if a.started > load.now() - 1.0]
        if recent and not any(_redis_fallback(a) for a in recent):
            break
    time.sleep(settle_s)
    answers = load.stop()
    degraded = [a for a in answers if _redis_fallback(a)]
    last_degraded = max((a.ended for a in degraded), default=up_at)
    recovered = not any(_redis_fallback(a) for a in answers if a.started > last_degraded)
    return summarize(
        "redis-outage",
        answers,
        outage_s=outage_s,
        answers_while_down=sum(1 for a in answers if down_at <= a.started < up_at),
        degraded_answers=len(degraded),
        recovery_s=round(max(0.0, last_degraded - up_at), 2) if recovered else None,
    )


def _redis_fallback(a: Answer) -> bool:
    return any(f["reason"] == "redis_unavailable" for f in (a.body or {}).get("fallbacks", []))


def drill_version_flips(world, redis: DurableRedis, port: int, flips: int, gap_s: float, work: Path) -> dict:
    from tests.fixtures_serving import make_space, publish, write_snapshot

    published = {}
    load = Load(port, world.users, world.scenarios, world.items).start()
    time.sleep(gap_s)
    flip_times = []
    for k in range(flips):
        version = f"flip{k + 1}"
        path = write_snapshot(
            work / "knowledge", version, world.scenarios, world.users, world.items[:-1], make_space(world.dim),
            seed=100 + 10 * k, split_fingerprint=world.split.fingerprint(),
        )  # fmt: skip
        publish(path, redis.url)
        published[version] = path
        flip_times.append(round(load.now(), 2))
        time.sleep(gap_s)
    answers = load.stop()
    versions_seen = sorted({a.body["knowledge_version"] for a in answers if a.body})
    mismatched, checked, separable = verify_versions(world, answers, published)
    return summarize(
        "version-flips",
        answers,
        flips=flips,
        versions_answered=versions_seen,
        answers_checked=checked,
        answers_mixing_versions=mismatched,
        checked_distinguishable=separable,
    )


def verify_versions(world, answers: list[Answer], published: dict[str, Path], sample: int = 150):
    """Recomputes sampled answers with the knowledge of the version each one names; counts mismatches and how many
    of the checked answers would have scored differently under any other published version (so a mix is visible)."""
    from online.ranker import Ranker
    from shared.knowledge.snapshot import KnowledgeSnapshot
    from shared.scoring import RequestKnowledge

    ranker = Ranker.load(world.artifact)
    snaps = {v: KnowledgeSnapshot(p) for v, p in published.items()}
    rng = random.Random(0)
    pool = [a for a in answers if a.body and a.body["knowledge_version"] in snaps]
    mismatched = separable = 0
    chosen = rng.sample(pool, min(sample, len(pool)))
    for a in chosen:
        got = {it["item_id"]: it["score"] for it in a.body["items"]}
        ids = list(got)
        expected = {}
        for v, snap in snaps.items():
            users, items, scen = snap.table("user"), snap.table("item"), snap.table("scenario")
            user_vec, found = users.lookup([a.request["user_id"]], default=snap.default_user())
            item_vecs, item_found = items.lookup(ids)
            item_vecs[~item_found] = np.nan
            kn = RequestKnowledge(
                scenario_vec=scen.lookup([a.request["scenario"]])[0][0], user_vec=user_vec[0], item_vecs=item_vecs
            )
            expected[v] = ranker.score(a.request["scenario"], a.request["user_id"], ids, kn)
        mine = a.body["knowledge_version"]
        scores = np.array([got[i] for i in ids], np.float32)
        if not np.allclose(scores, expected[mine], atol=2e-5):
            mismatched += 1
        others = [v for v in expected if v != mine]
        if others and all(not np.allclose(expected[v], expected[mine], atol=2e-5) for v in others):
            separable += 1
    return mismatched, len(chosen), separable


def drill_corrupt_publish(world, redis: DurableRedis, port: int, settle_s: float, work: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.fixtures_serving import make_space, publish, write_snapshot

    r = redis.client()
    before = r.get("llm4msr:kn:current").decode()
    path = write_snapshot(
        work / "knowledge", "corrupt1", world.scenarios, world.users, world.items[:-1], make_space(world.dim),
        seed=999, split_fingerprint=world.split.fingerprint(),
    )  # fmt: skip
    users = pq.read_table(path / "users.parquet").to_pydict()
    for j in range(0, len(users["embedding"]), 7):  # every 7th user vector loses its last value
        users["embedding"][j] = users["embedding"][j][:-1]
    schema = pa.schema([("id", pa.string()), ("prompt_sha256", pa.string()), ("response", pa.string()),
                        ("embedding", pa.list_(pa.float32()))])  # fmt: skip
    pq.write_table(pa.Table.from_pydict({k: users[k] for k in schema.names}, schema=schema), path / "users.parquet")

    load = Load(port, world.users, world.scenarios, world.items).start()
    time.sleep(settle_s)
    error = None
    try:
        publish(path, redis.url)
    except Exception as exc:  # what the publisher says is part of the report
        error = f"{type(exc).__name__}: {exc}"
    time.sleep(settle_s)
    answers = load.stop()
    after = r.get("llm4msr:kn:current").decode()
    leftover = sum(1 for _ in r.scan_iter(match="llm4msr:kn:corrupt1:*", count=1000))
    return summarize(
        "corrupt-publish",
        answers,
        publish_refused=error is not None,
        publish_error=(error or "")[:200],
        current_before=before,
        current_after=after,
        versions_answered=sorted({a.body["knowledge_version"] for a in answers if a.body}),
        corrupt_keys_left=leftover,
    )


def worker_pids(parent: int) -> set[int]:
    """The uvicorn worker processes of a `serve --workers N` parent (its spawned children, not the tracker)."""
    out = set()
    for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.add(int(pid))
        except OSError:  # exited meanwhile
            pass
    return out


def drill_kill_worker(world, redis: DurableRedis, work: Path, workers: int, settle_s: float) -> dict:
    from tests.fixtures_serving import start_server

    server = start_server(
        ["--artifact", str(world.artifact), "--redis-url", redis.url],
        work / "ranker-workers.log",
        env={"LLM4MSR_WORKERS": str(workers), "LLM4MSR_POLL_INTERVAL_S": "0.2"},
        timeout=240,
    )
    try:
        before = worker_pids(server.proc.pid)
        load = Load(server.port, world.users, world.scenarios, world.items, track_workers=True).start()
        time.sleep(settle_s)
        held = [a.worker for a in list(load.answers)[-50:]]
        victim = max(before, key=held.count)
        kill_at = load.now()
        os.kill(victim, signal.SIGKILL)
        replaced_at = None
        deadline = time.time() + 240
        while time.time() < deadline and replaced_at is None:
            time.sleep(0.1)
            fresh = worker_pids(server.proc.pid) - before
            if fresh and _answering_pids(server.url) & fresh:  # the replacement accepts requests
                replaced_at = load.now()
        time.sleep(settle_s)
        answers = load.stop()
        alive = server.proc.poll() is None
    finally:
        server.stop()
    return summarize_kill(answers, victim, kill_at, replaced_at, alive, workers)


def _answering_pids(url: str, tries: int = 10) -> set[int]:
    """Worker pids that answer /readyz on new connections (the kernel hands them to any accepting worker)."""
    import httpx

    pids = set()
    for _ in range(tries):
        try:
            pids.add(httpx.get(url + "/readyz", timeout=2).json()["worker_pid"])
        except (httpx.HTTPError, ValueError, KeyError):
            pass
    return pids


def summarize_kill(answers: list[Answer], victim: int, kill_at: float, replaced_at: float | None, alive, workers):
    """Failures are expected only on the connections the killed worker held (at most one request each)."""
    last_worker: dict[int, int | None] = {}
    for a in answers:
        if a.started < kill_at:
            last_worker[a.client] = a.worker
    failed = [a for a in answers if a.status != 200]
    return summarize(
        "kill-9-worker",
        answers,
        workers=workers,
        connections_on_killed_worker=sum(1 for w in last_worker.values() if w == victim),
        failed=len(failed),
        failed_on_killed_worker=sum(1 for a in failed if a.worker == victim),
        http_5xx=sum(1 for a in answers if a.status >= 500),
        answered_while_replacing=sum(
            1 for a in answers if a.status == 200 and kill_at <= a.started < (replaced_at or kill_at)
        ),
        replaced_after_s=round(replaced_at - kill_at, 2) if replaced_at is not None else None,
        server_alive=bool(alive),
    )


def drill_kill_build(work: Path, users: int, max_new_tokens: int) -> dict:
    from offline.data.synth import SynthConfig, generate
    from shared.dataset.folder import write_dataset
    from shared.knowledge.snapshot import MANIFEST, KnowledgeSnapshot
    from tests.fixtures_llm import build_tiny_model, corpus_for

    data = work / "build-data"
    write_dataset(
        generate(SynthConfig(users=users, items_per_scenario=40, main_impressions=12, side_impressions=4)), data
    )
    model = build_tiny_model(work / "tiny-llm", corpus_for(data))
    argv = ["knowledge", "build", "--data", str(data), "--model", str(model), "--dtype", "float32"]
    argv += ["--mode", "generate", "--max-new-tokens", str(max_new_tokens), "--shard-size", "4", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    killed_dir, clean_dir = work / "kn-killed", work / "kn-clean"
    cli = [sys.executable, "-m", "llm4msr_cli"]
    proc = subprocess.Popen([*cli, *argv, "--out", str(killed_dir)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    killed_after = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = len(list(killed_dir.glob("*/_work/users-gen-*.parquet")))
        if done >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            killed_after = done
            break
        time.sleep(0.005)
    proc.wait()
    visible_after_kill = bool(list(killed_dir.glob(f"*/{MANIFEST}")))
    t = time.perf_counter()
    resumed = subprocess.run([*cli, *argv, "--out", str(killed_dir)], cwd=REPO, env=env, capture_output=True, text=True)
    resume_s = time.perf_counter() - t
    t = time.perf_counter()
    clean = subprocess.run([*cli, *argv, "--out", str(clean_dir)], cwd=REPO, env=env, capture_output=True, text=True)
    clean_s = time.perf_counter() - t
    equal = False
    if resumed.returncode == 0 and clean.returncode == 0:
        a, b = KnowledgeSnapshot(killed_dir), KnowledgeSnapshot(clean_dir)
        equal = all(
            a.table(lv).ids == b.table(lv).ids
            and a.table(lv).responses == b.table(lv).responses
            and np.array_equal(a.table(lv).embeddings, b.table(lv).embeddings)
            for lv in ("scenario", "user", "item")
        )
    return {
        "drill": "kill-9-build",
        "killed_after_user_shards": killed_after,
        "visible_after_kill": visible_after_kill,
        "resume_exit": resumed.returncode,
        "resume_s": round(resume_s, 1),
        "uninterrupted_s": round(clean_s, 1),
        "equal_to_uninterrupted": equal,
        "stderr_tail": (resumed.stderr + clean.stderr)[-400:] if not equal else "",
    }


# ---------------------------------------------------------------------------------------------------------------


@dataclass
class World:
    users: list[str]
    items: list[str]
    scenarios: list[str]
    split: object
    artifact: Path
    snapshot: Path
    dim: int


def build(work: Path, users: int, dim: int) -> World:
    from tests.fixtures_serving import build_world

    w = build_world(work / "world", users=users, variants=("llm4msr-item",), dim=dim)
    return World(w.users, w.items, w.scenarios, w.split, w.artifacts["llm4msr-item"], w.snapshot_dir, dim)


def run(args: argparse.Namespace) -> list[dict]:
    from tests.fixtures_serving import publish, start_server

    work = Path(args.work or tempfile.mkdtemp(prefix="llm4msr-drills-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", flush=True)
    t = time.perf_counter()
    world = build(work, args.users, args.dim)
    print(f"world: {len(world.users)} users, {len(world.items)} items ({time.perf_counter() - t:.1f} s)", flush=True)
    redis = DurableRedis(work)
    redis.start()
    server = None
    rows = []
    try:
        publish(world.snapshot, redis.url)
        server = start_server(
            ["--artifact", str(world.artifact), "--redis-url", redis.url, "--log-level", "info"],
            work / "ranker.log",
            env={"LLM4MSR_USER_CACHE_SIZE": str(args.cache_size), "LLM4MSR_POLL_INTERVAL_S": "0.2"},
        )
        wanted = set(args.drills.split(","))
        if "redis-outage" in wanted:
            rows.append(drill_redis_outage(world, redis, server.port, args.outage_s, args.settle_s))
            print(json.dumps(rows[-1]), flush=True)
        if "version-flips" in wanted:
            rows.append(drill_version_flips(world, redis, server.port, args.flips, args.settle_s, work))
            print(json.dumps(rows[-1]), flush=True)
        if "corrupt-publish" in wanted:
            rows.append(drill_corrupt_publish(world, redis, server.port, args.settle_s, work))
            print(json.dumps(rows[-1]), flush=True)
        if server.proc.poll() is not None:
            raise RuntimeError(f"the ranker died during the drills:\n{server.log()[-3000:]}")
        server.stop()
        if "kill-9-worker" in wanted:
            rows.append(drill_kill_worker(world, redis, work, args.worker_count, args.settle_s))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if server is not None:
            server.stop()
        redis.stop()
    if "kill-9-build" in set(args.drills.split(",")):
        rows.append(drill_kill_build(work, args.build_users, args.max_new_tokens))
        print(json.dumps(rows[-1]), flush=True)
    if not args.work and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print()
    print(f"{'drill':<16} {'requests':>8} {'non-2xx':>7} {'5xx':>4}  {'p99 ms':>7}  fallbacks / outcome")
    for r in rows:
        if r["drill"] == "kill-9-build":
            outcome = (
                f"killed after {r['killed_after_user_shards']} user shards; resumed in {r['resume_s']} s "
                f"(uninterrupted {r['uninterrupted_s']} s); equal: {r['equal_to_uninterrupted']}"
            )
            print(f"{r['drill']:<16} {'-':>8} {'-':>7} {'-':>4}  {'-':>7}  {outcome}")
            continue
        fb = ", ".join(f"{k} {v}" for k, v in sorted(r["fallbacks"].items())) or "none"
        if r["drill"] == "kill-9-worker":
            outcome = (
                f"{r['failed']} failed, {r['failed_on_killed_worker']} of them on the killed worker's "
                f"{r['connections_on_killed_worker']} connections; replaced after {r['replaced_after_s']} s, "
                f"{r['answered_while_replacing']} answered meanwhile"
            )
        elif r["drill"] == "redis-outage":
            outcome = f"{fb}; recovery {r['recovery_s']} s after restart"
        elif r["drill"] == "version-flips":
            outcome = (
                f"{r['flips']} flips; {r['answers_mixing_versions']}/{r['answers_checked']} checked answers "
                f"mix versions ({r['checked_distinguishable']} distinguishable)"
            )
        else:
            outcome = (
                f"publish refused: {r['publish_refused']}; current {r['current_before']} -> {r['current_after']}; "
                f"answered {r['versions_answered']}"
            )
        print(f"{r['drill']:<16} {r['requests']:>8} {r['non_2xx']:>7} {r['5xx']:>4}  {r['p99_ms']!s:>7}  {outcome}")


def failures(rows: list[dict]) -> list[str]:
    """What a drill expects; an empty list means every drill passed."""
    bad = []
    for r in rows:
        name = r["drill"]
        if name == "kill-9-build":
            if r["visible_after_kill"] or not r["equal_to_uninterrupted"] or r["killed_after_user_shards"] is None:
                bad.append(f"{name}: {r}")
            continue
        if name == "kill-9-worker":
            if (
                r["http_5xx"]
                or r["failed"] != r["failed_on_killed_worker"]
                or r["failed"] > r["connections_on_killed_worker"]
                or r["replaced_after_s"] is None
                or not r["answered_while_replacing"]
                or not r["server_alive"]
            ):
                bad.append(f"{name}: {r}")
            continue
        if r["5xx"]:
            bad.append(f"{name}: {r['5xx']} server errors")
        if name == "redis-outage":
            if r["recovery_s"] is None or not r["fallbacks"].get("user/redis_unavailable"):
                bad.append(f"{name}: no counted fallbacks or no recovery: {r}")
        if name == "version-flips" and (r["non_2xx"] or r["answers_mixing_versions"] or not r["answers_checked"]):
            bad.append(f"{name}: {r}")
        if name == "corrupt-publish" and (
            not r["publish_refused"] or r["current_after"] != r["current_before"] or r["non_2xx"]
        ):
            bad.append(f"{name}: {r}")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true", help="the CI form: smaller world, 2 s outage")
    p.add_argument("--drills", default="redis-outage,version-flips,corrupt-publish,kill-9-worker,kill-9-build")
    p.add_argument("--worker-count", type=int, default=2, help="worker processes of the kill-9-worker ranker")
    p.add_argument("--users", type=int, help="users with knowledge (default 400; --short 150)")
    p.add_argument("--cache-size", type=int, default=16, help="the ranker's user LRU (far below --users)")
    p.add_argument("--dim", type=int, default=32, help="knowledge vector size of the drill snapshots")
    p.add_argument("--outage-s", type=float, help="how long Redis is down (default 10; --short 2)")
    p.add_argument("--flips", type=int, default=5)
    p.add_argument("--settle-s", type=float, help="load before and after each fault (default 3; --short 1.5)")
    p.add_argument("--build-users", type=int, help="users in the kill -9 build (default 200; --short 48)")
    p.add_argument("--max-new-tokens", type=int, help="generated tokens per prompt in that build (24; --short 8)")
    p.add_argument("--work", help="work folder (kept); default a temporary one, removed at the end")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    p.add_argument("--json", help="write the rows as JSON here")
    args = p.parse_args(argv)
    short = args.short
    args.users = args.users or (150 if short else 400)
    args.outage_s = args.outage_s if args.outage_s is not None else (2.0 if short else 10.0)
    args.settle_s = args.settle_s if args.settle_s is not None else (1.5 if short else 3.0)
    args.build_users = args.build_users or (48 if short else 200)
    args.max_new_tokens = args.max_new_tokens or (8 if short else 24)
    started = time.perf_counter()
    rows = run(args)
    print_table(rows)
    bad = failures(rows)
    report = {
        "bench": "fault_drills",
        "short": short,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
        "failures": bad,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nall {len(rows)} drills met their expectations" if not bad else "\nFAILED:\n" + "\n".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
