"""`llm4msr serve --workers N` as real processes: metrics summed over the workers, version changes (a new LATEST, an
admin reload) reaching every worker, SIGTERM draining requests in flight, the default worker count, and the
memory-mapped snapshot that the workers share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.fixtures_serving import REPO, build_world, make_space, rank_body, start_server, wait_until, write_snapshot

TOKEN = "workers-admin-token-0123456789abcdefgh"  # >= 32 characters
STARTUP_S = 240  # each worker imports torch and loads the model; generous for a busy CI machine


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("workers"), users=40, variants=("llm4msr-item", "llm4msr"))


def _fresh(url: str, path: str, **kwargs) -> httpx.Response:
    """One request on its own connection, so that any worker may take it."""
    with httpx.Client(base_url=url, timeout=30) as c:
        return c.request("POST" if "json" in kwargs else "GET", path, **kwargs)


def _worker_pids(url: str, tries: int = 40) -> set[int]:
    return {_fresh(url, "/readyz").json()["worker_pid"] for _ in range(tries)}


def _sample(text: str, name: str) -> float:
    return float(next(line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(name + " ")))


def test_two_workers_sum_metrics_and_follow_versions(world, tmp_path):
    srv = start_server(
        ["--artifact", str(world.artifacts["llm4msr-item"]), "--knowledge", str(world.knowledge_root)],
        tmp_path / "server.log",
        env={"LLM4MSR_WORKERS": "2", "LLM4MSR_ADMIN_TOKEN": TOKEN, "LLM4MSR_POLL_INTERVAL_S": "0.2"},
        timeout=STARTUP_S,
    )
    try:
        assert wait_until(lambda: len(_worker_pids(srv.url, 10)) == 2, timeout=STARTUP_S), srv.log()[-3000:]
        # 60 requests from 4 threads, each on new connections: both workers serve some; the scrape counts all.
        sent, pids, lock = [], set(), threading.Lock()

        def client(k: int) -> None:
            for j in range(15):
                body = rank_body(world.users[(k * 15 + j) % len(world.users)], world.scenarios[0], world.items[:20])
                code = _fresh(srv.url, "/rank", json=body).status_code
                pid = _fresh(srv.url, "/readyz").json()["worker_pid"]
                with lock:
                    sent.append(code)
                    pids.add(pid)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sent == [200] * 60 and len(pids) == 2
        text = _fresh(srv.url, "/metrics").text
        assert _sample(text, 'llm4msr_requests_total{route="/rank",status="200"}') == 60
        assert _sample(text, "llm4msr_rank_latency_seconds_count") == 60
        assert _sample(text, "llm4msr_rank_candidates_sum") == 60 * 20
        assert len([x for x in text.splitlines() if x.startswith("llm4msr_versions_info{")]) == 1

        # A new LATEST reaches both workers (each polls), then an admin reload (one worker gets the call).
        write_snapshot(
            world.knowledge_root, "v2", world.scenarios, world.users, world.items[:-1], make_space(8), seed=12,
            split_fingerprint=world.split.fingerprint(),
        )  # fmt: skip
        assert wait_until(lambda: 'knowledge_version="v2"' in _fresh(srv.url, "/metrics").text, timeout=20)
        r = _fresh(srv.url, "/admin/reload", json={"artifact": str(world.artifacts["llm4msr"])}, headers=_auth())
        assert r.status_code == 200 and r.json()["workers"] == 2, r.text
        new_model = r.json()["model_version"]
        users = world.users
        answers = [
            _fresh(srv.url, "/rank", json=rank_body(users[k % len(users)], world.scenarios[k % 2], world.items[:5]))
            for k in range(50)
        ]
        got = {(a.status_code, a.json()["model_version"], a.json()["knowledge_version"]) for a in answers}
        assert got == {(200, new_model, "v2")}, got
        info = [x for x in _fresh(srv.url, "/metrics").text.splitlines() if x.startswith("llm4msr_versions_info{")]
        assert len(info) == 1 and f'model_version="{new_model}"' in info[0] and 'knowledge_version="v2"' in info[0]
    finally:
        srv.stop()
    assert "Traceback" not in srv.log(), srv.log()[-3000:]


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def test_sigterm_drains_requests_in_flight(world, tmp_path):
    """16 costly requests are sent at once; SIGTERM follows the first answer, while the others are queued inside
    the workers: every one is answered (200), some after the signal, and the server exits cleanly."""
    import orjson

    from bench.serve_bench import HTTPConn

    srv = start_server(
        ["--artifact", str(world.artifacts["llm4msr-item"]), "--knowledge", str(world.knowledge_root)],
        tmp_path / "server.log",
        env={"LLM4MSR_WORKERS": "2"},
        timeout=STARTUP_S,
    )
    body = orjson.dumps(rank_body(world.users[0], world.scenarios[0], [f"x{i}" for i in range(1000)], top_k=1000))
    conns = [HTTPConn("127.0.0.1", srv.port) for _ in range(16)]
    results: list[tuple[int, float]] = []
    first = threading.Event()

    def one(conn: HTTPConn) -> None:
        try:
            status, _ = conn.post("/rank", body)
        except ConnectionError:
            status = 0
        results.append((status, time.perf_counter()))
        first.set()

    try:
        threads = [threading.Thread(target=one, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        assert first.wait(timeout=60)
        signalled = time.perf_counter()
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        assert srv.proc.wait(timeout=60) == 0
    finally:
        for c in conns:
            c.close()
        srv.stop()
    assert [code for code, _ in results] == [200] * 16, results
    assert any(at > signalled for _, at in results), "no request was in flight at SIGTERM"


def test_default_workers_are_the_usable_cores(tmp_path):
    """Without --workers, `serve` starts one worker per core it may run on (CPU affinity; a cgroup quota caps it)."""
    code = "from online.settings import ServeSettings; print(ServeSettings().workers)"
    env = {k: v for k, v in os.environ.items() if k != "LLM4MSR_WORKERS"}
    one = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}),
    )  # fmt: skip
    assert one.stdout.strip() == "1", one.stderr
    from online.settings import usable_cores

    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))


def test_snapshot_vectors_are_mapped_once_for_all_processes(world, tmp_path):
    """The store maps the converted Arrow files: the vectors are views of file pages (no private copy), and a
    second store of the same snapshot reuses the conversion."""
    from online.knowledge import SnapshotKnowledgeStore

    cache = tmp_path / "cache"
    first = SnapshotKnowledgeStore(world.knowledge_root, None, cache_dir=cache).load_published()
    [folder] = [p for p in cache.iterdir() if p.is_dir()]
    made = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = SnapshotKnowledgeStore(world.knowledge_root, None, cache_dir=cache).load_published()
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == made
    for kv in (first, again):
        assert not kv.users.matrix.flags.writeable and not kv.users.matrix.flags.owndata
        assert not kv.items.matrix.flags.owndata
    maps = open(f"/proc/{os.getpid()}/maps").read()
    assert str(folder / "users.arrow") in maps and str(folder / "items.arrow") in maps
    assert again.users.response_of(world.users[0]) == first.users.response_of(world.users[0]) != ""
