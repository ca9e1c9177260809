"""The ranking service over real HTTP with knowledge in a real Redis: version flips and Redis outages during a
steady stream of requests, and refusal of knowledge from another space."""

from __future__ import annotations

import functools
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.fixtures_serving import REPO, build_world, make_space, publish, rank_body, start_server, write_snapshot
from tests.fixtures_serving import wait_until as poll_until

# Rankers refuse admin tokens shorter than 32 characters.
ADMIN_TOKEN = "redis-tests-admin-token-0123456789abcdef"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("serving-redis"), variants=("llm4msr-item",))


class Stream:
    """A steady stream of /rank requests from a background thread, recording every answer."""

    def __init__(self, url: str, body_for):
        self.url = url
        self.body_for = body_for
        self.records: list[tuple[float, int, dict | None]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        with httpx.Client(base_url=self.url, timeout=5) as c:
            deadline = time.time() + 60  # bounded even if the test forgets to stop it
            while not self._stop.is_set() and time.time() < deadline:
                try:
                    r = c.post("/rank", json=self.body_for(i))
                    self.records.append((time.time(), r.status_code, r.json() if r.status_code == 200 else None))
                except httpx.HTTPError as exc:  # a transport failure counts as a failed request
                    self.errors.append(repr(exc))
                i += 1
                time.sleep(0.005)

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


wait_until = functools.partial(poll_until, timeout=10.0)


def test_version_flip_during_stream(world, redis_server, tmp_path):
    publish(world.snapshot_dir, redis_server.url)
    srv = start_server(
        ["--artifact", str(world.artifacts["llm4msr-item"]), "--redis-url", redis_server.url],
        tmp_path / "server.log",
        # The inline executor mode here, thread mode in the outage test, the default (auto) elsewhere.
        env={"LLM4MSR_POLL_INTERVAL_S": "0.2", "LLM4MSR_RANK_EXECUTOR": "inline"},
    )
    try:
        items = world.items[:40]
        body = rank_body(world.users[2], world.scenarios[0], items, top_k=40)
        with Stream(srv.url, lambda i: body) as stream:
            assert wait_until(lambda: len(stream.records) >= 20)
            v2 = write_snapshot(
                world.knowledge_root,
                "v2",
                world.scenarios,
                world.users,
                world.items,
                make_space(),
                seed=99,
                split_fingerprint=world.split.fingerprint(),
            )
            publish(v2, redis_server.url)
            assert wait_until(lambda: stream.records and stream.records[-1][2]["knowledge_version"] == "v2")
            n_at_flip = len(stream.records)
            assert wait_until(lambda: len(stream.records) >= n_at_flip + 20)
        assert stream.errors == []
        assert {code for _, code, _ in stream.records} == {200}
        versions = [rec["knowledge_version"] for _, _, rec in stream.records]
        first_v2 = versions.index("v2")
        assert versions[0] == "v1" and first_v2 > 0 and set(versions[first_v2:]) == {"v2"}
        # The new knowledge really is used: the same request scores differently.
        before = {it["item_id"]: it["score"] for it in stream.records[0][2]["items"]}
        after = {it["item_id"]: it["score"] for it in stream.records[-1][2]["items"]}
        assert any(abs(before[i] - after[i]) > 1e-6 for i in items)
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'knowledge_version="v2"' in metrics and "llm4msr_knowledge_swaps_total 2.0" in metrics
        # Without an admin token the admin routes are off.
        assert httpx.post(f"{srv.url}/admin/reload").status_code == 403
    finally:
        srv.stop()


def test_redis_outage_during_stream(world, redis_server, tmp_path):
    publish(world.snapshot_dir, redis_server.url)
    srv = start_server(
        ["--artifact", str(world.artifacts["llm4msr-item"]), "--redis-url", redis_server.url],
        tmp_path / "server.log",
        # No user cache: every request needs Redis, so the outage shows in every answer.
        env={
            "LLM4MSR_POLL_INTERVAL_S": "0.2",
            "LLM4MSR_USER_CACHE_SIZE": "0",
            "LLM4MSR_REDIS_RETRY_S": "0.2",
            "LLM4MSR_RANK_EXECUTOR": "thread",
        },
    )
    users = world.users

    def user_flags(rec: dict) -> set[str]:
        return {f["reason"] for f in rec["fallbacks"] if f["level"] == "user"}

    try:
        with Stream(srv.url, lambda i: rank_body(users[i % len(users)], world.scenarios[1], world.items[:100])) as s:
            assert wait_until(lambda: len(s.records) >= 10)
            redis_server.stop()
            t_down = time.time()
            assert wait_until(
                lambda: any("redis_unavailable" in user_flags(r) for t, _, r in s.records if r and t > t_down)
            )
            time.sleep(1.0)
            t_restart = time.time()
            redis_server.start()  # comes back empty (no persistence): the publisher runs again
            publish(world.snapshot_dir, redis_server.url)
            t_up = time.time()
            assert wait_until(
                lambda: sum(1 for t, _, r in s.records if r and t > t_up + 0.5 and not user_flags(r)) >= 20, timeout=15
            )
        assert s.errors == []
        codes = {code for _, code, _ in s.records}
        assert codes == {200}, codes
        # (between the restart and the publish Redis answers but is empty: users are "unknown" then)
        during = [r for t, _, r in s.records if t_down + 0.3 < t < t_restart]
        assert during and all("redis_unavailable" in user_flags(r) for r in during)
        metrics = httpx.get(f"{srv.url}/metrics").text
        line = next(
            x
            for x in metrics.splitlines()
            if x.startswith('llm4msr_knowledge_fallback_total{level="user",reason="redis_unavailable"}')
        )
        assert float(line.split()[-1]) >= len(during)
        assert "llm4msr_redis_up 1.0" in metrics
        assert httpx.get(f"{srv.url}/readyz").status_code == 200
    finally:
        srv.stop()


def test_artifact_of_other_space_is_refused(world, redis_server, tmp_path):
    other = write_snapshot(
        tmp_path / "kn", "v1", world.scenarios, world.users, world.items, make_space(model="another-llm"), seed=1
    )
    publish(other, redis_server.url)
    # Refused whether the knowledge comes from Redis or straight from the snapshot.
    for source in (["--redis-url", redis_server.url], ["--knowledge", str(other)]):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "llm4msr_cli",
                "serve",
                "--artifact",
                str(world.artifacts["llm4msr-item"]),
                *source,
                "--port",
                "1",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        assert "knowledge space" in proc.stderr
        if source[0] == "--redis-url":
            assert "retrain" in proc.stderr


def test_admin_reload_moves_to_a_new_knowledge_space(world, redis_server, tmp_path):
    """The refresh job's rollout: knowledge of a new space is published (the running model refuses it), a model
    trained on it is loaded by POST /admin/reload, and model and knowledge switch together."""
    from tests.fixtures_models import train_tiny_artifact

    publish(world.snapshot_dir, redis_server.url)
    srv = start_server(
        ["--artifact", str(world.artifacts["llm4msr-item"]), "--redis-url", redis_server.url],
        tmp_path / "server.log",
        env={"LLM4MSR_POLL_INTERVAL_S": "0.2", "LLM4MSR_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        body = rank_body(world.users[0], world.scenarios[0], world.items[:20])
        v9 = write_snapshot(
            world.knowledge_root,
            "v9",
            world.scenarios,
            world.users,
            world.items,
            make_space(dim=4, model="another-llm"),
            seed=5,
            split_fingerprint=world.split.fingerprint(),
        )
        publish(v9, redis_server.url)
        assert wait_until(lambda: "v9" in httpx.get(f"{srv.url}/readyz").json()["knowledge"]["refused_versions"])
        assert httpx.post(f"{srv.url}/rank", json=body).json()["knowledge_version"] == "v1"  # refused, still v1

        new_model = train_tiny_artifact(
            world.data_dir,
            v9,
            tmp_path / "artifact-v9",
            levels=("scenario", "user"),
            epochs=1,
            batch_size=512,
            user_knowledge="full-history",  # the seeded snapshot has no fit vectors
        )
        r = httpx.post(f"{srv.url}/admin/reload", headers=auth, json={"artifact": str(new_model)}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["knowledge_version"] == "v9"
        out = httpx.post(f"{srv.url}/rank", json=body).json()
        assert out["knowledge_version"] == "v9" and out["model_version"] == r.json()["model_version"]
        # The old model cannot come back while the published knowledge is of the new space.
        r = httpx.post(
            f"{srv.url}/admin/reload", headers=auth, json={"artifact": str(world.artifacts["llm4msr-item"])}, timeout=60
        )
        assert r.status_code == 422 and "space" in r.json()["detail"]
        assert httpx.post(f"{srv.url}/rank", json=body).json()["knowledge_version"] == "v9"
    finally:
        srv.stop()


def test_corrupt_knowledge_over_http(world, redis_server, tmp_path):
    """A corrupt user vector is a counted fallback in the answer and the metrics; a version with a corrupt scenario
    vector and a `current` pointer that is no valid version are refused: the ranker keeps serving v1."""
    from offline.knowledge.publish import _write_version
    from shared.knowledge import keys as K
    from shared.knowledge.snapshot import KnowledgeSnapshot

    publish(world.snapshot_dir, redis_server.url)
    r = redis_server.client()
    user = world.users[1]
    r.set(K.user_key("v1", user), b"\x00" * 20)
    srv = start_server(
        ["--artifact", str(world.artifacts["llm4msr-item"]), "--redis-url", redis_server.url, "--log-level", "info"],
        tmp_path / "server.log",
        env={"LLM4MSR_POLL_INTERVAL_S": "0.1"},
    )
    try:
        body = rank_body(user, world.scenarios[0], world.items[:10])
        out = httpx.post(f"{srv.url}/rank", json=body).json()
        assert {"level": "user", "reason": "corrupt", "count": 1} in out["fallbacks"], out["fallbacks"]
        good = httpx.post(f"{srv.url}/rank", json=rank_body(world.users[2], world.scenarios[0], world.items[:10]))
        assert not [f for f in good.json()["fallbacks"] if f["level"] == "user"]
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'llm4msr_knowledge_fallback_total{level="user",reason="corrupt"} 1.0' in metrics

        v2 = write_snapshot(
            world.knowledge_root,
            "v2",
            world.scenarios,
            world.users,
            world.items,
            make_space(),
            seed=7,
            split_fingerprint=world.split.fingerprint(),
        )
        _write_version(r, KnowledgeSnapshot(v2), 8)
        r.set(K.scenario_key("v2", world.scenarios[0]), b"\x00" * 8)
        r.set(K.CURRENT, "v2")
        assert wait_until(lambda: "v2" in httpx.get(f"{srv.url}/readyz").json()["knowledge"]["refused_versions"])
        r.set(K.CURRENT, "v*")
        assert wait_until(lambda: "v*" in httpx.get(f"{srv.url}/readyz").json()["knowledge"]["refused_versions"])
        ready = httpx.get(f"{srv.url}/readyz")
        assert ready.status_code == 200 and ready.json()["knowledge"]["version"] == "v1"
        assert "scenario" in ready.json()["knowledge"]["refused_versions"]["v2"]
        assert httpx.post(f"{srv.url}/rank", json=body).json()["knowledge_version"] == "v1"
        log = srv.log()
        assert "invalid knowledge version 'v*'" in log and "vector is corrupt" in log, log[-3000:]
    finally:
        srv.stop()


def test_auto_executor_scores_on_the_loop_only_what_memory_answers(world, redis_server):
    """rank_executor=auto (the default): a request is scored on the event loop only when it is small and no Redis
    read can block the loop (the user's vector is in the LRU, the items are preloaded); both paths give the same
    scores."""
    import asyncio

    import numpy as np

    from online.codec import RankQuery
    from online.ranker import Ranker
    from online.service import RankService
    from online.settings import load_settings
    from online.state import load_state

    publish(world.snapshot_dir, redis_server.url)
    artifact = str(world.artifacts["llm4msr-item"])
    state = load_state(load_settings(artifact=artifact, redis_url=redis_server.url, inline_max_candidates=30))
    try:
        assert state.settings.rank_executor == "auto" and state.executor is not None
        service, ranker = RankService(state), state.ranker
        kv = state.knowledge()
        assert kv is not None and kv.items_complete
        user, scen = world.users[4], world.scenarios[0]

        def query(n: int) -> RankQuery:
            return RankQuery(user, scen, world.items[:n], None, None, 0)

        assert ranker.has_reduced_items(kv)  # the item table was reduced when the version was installed
        assert not service.runs_inline(query(10), ranker, kv)  # the user's vector needs a Redis read
        first = asyncio.run(service.rank(query(10), ranker))  # ... on the executor, which caches it
        assert service.runs_inline(query(10), ranker, kv) and service.runs_inline(query(30), ranker, kv)
        assert not service.runs_inline(query(31), ranker, kv)  # more than inline_max_candidates
        again = asyncio.run(service.rank(query(10), ranker))  # now on the loop
        np.testing.assert_array_equal(first.scores, again.scores)
        assert not service.runs_inline(RankQuery("someone-else", scen, world.items[:10], None, None, 0), ranker, kv)
        fresh = Ranker.load(artifact)  # a model whose item table for this version is not reduced yet: the first
        assert not service.runs_inline(query(10), fresh, kv)  # request does that, off the loop
        fresh.reduced_items(kv)
        assert service.runs_inline(query(10), fresh, kv)
        for mode, inline in (("thread", False), ("inline", True)):
            state.settings.rank_executor = mode
            assert service.runs_inline(query(10), ranker, kv) is inline
            assert service.runs_inline(query(31), ranker, kv) is inline
    finally:
        state.close()
