"""The ranking service over real HTTP (uvicorn subprocess) on the Parquet snapshot: parity with offline scoring,
sorting, fallbacks, limits, explanations, metrics and admin auth."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from shared.artifact import load_artifact
from shared.knowledge.snapshot import KnowledgeSnapshot
from shared.scoring import RequestScorer, SnapshotLookup
from tests.fixtures_serving import build_world, rank_body, start_server

MAX_CANDIDATES = 200
MAX_BODY = 64_000
TOKEN = "test-admin-token-0123456789abcdefghijkl"  # >= 32 characters (ServeSettings refuses less)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("serving"))


def _server_args(world) -> list[str]:
    return [
        "--artifact",
        str(world.artifacts["llm4msr-item"]),
        "--knowledge",
        str(world.knowledge_root),
        "--max-candidates",
        str(MAX_CANDIDATES),
        "--max-body-bytes",
        str(MAX_BODY),
    ]


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    srv = start_server(
        _server_args(world),
        tmp_path_factory.mktemp("logs") / "server.log",
        env={"LLM4MSR_ADMIN_TOKEN": TOKEN},
    )
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def test_rank_scores_equal_offline_scoring(world, client):
    """Same user, scenario and items: /rank returns what offline evaluation (score_rows) computes."""
    scorer = RequestScorer(load_artifact(world.artifacts["llm4msr-item"]))
    lookup = SnapshotLookup(KnowledgeSnapshot(world.snapshot_dir))
    test = world.split.test
    groups = list(test.groupby(["user_id", "scenario"], sort=True))[:6]
    assert groups, "the synthetic split has test rows"
    compared = 0
    for (user, scenario), rows in groups:
        # Add an item without knowledge (NaN -> average) and an id the model never saw (OOV).
        items = list(dict.fromkeys(rows["item_id"].astype(str).tolist() + [world.items[-1], "never-seen-item"]))
        frame = (
            rows.iloc[:0]
            .reindex(range(len(items)))
            .assign(user_id=user, scenario=scenario, item_id=items, label=0.0, sampled=False)
        )
        offline = dict(zip(items, scorer.score_rows(frame, lookup), strict=True))
        r = client.post("/rank", json=rank_body(user, scenario, items, top_k=len(items)))
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["knowledge_version"] == "v1" and out["model_version"] == scorer.artifact.config.model_version
        got = {it["item_id"]: it["score"] for it in out["items"]}
        assert set(got) == set(items)
        for item in items:
            assert abs(got[item] - float(offline[item])) <= 1e-5, (user, scenario, item)
            compared += 1
        flags = {(f["level"], f["reason"]): f["count"] for f in out["fallbacks"]}
        assert flags.get(("item", "unknown")) == 2  # the knowledge-less item and the never-seen id
        assert flags.get(("item_id", "oov")) == 1
    assert compared >= 20

    # A cold-start user gets the default vector: flagged, and still the offline score.
    items = world.items[:5]
    frame = (
        world.split.test.iloc[:0]
        .reindex(range(5))
        .assign(user_id="brand-new-user", scenario=world.scenarios[0], item_id=items, label=0.0, sampled=False)
    )
    offline = scorer.score_rows(frame, lookup)
    out = client.post("/rank", json=rank_body("brand-new-user", world.scenarios[0], items, top_k=5)).json()
    got = {it["item_id"]: it["score"] for it in out["items"]}
    np.testing.assert_allclose([got[i] for i in items], offline, atol=1e-5)
    assert {"level": "user", "reason": "unknown", "count": 1} in out["fallbacks"]


def test_rank_sorted_top_k(world, client):
    items = world.items[:50]
    out = client.post("/rank", json=rank_body(world.users[0], world.scenarios[1], items, top_k=7)).json()
    scores = [it["score"] for it in out["items"]]
    assert len(scores) == 7 and scores == sorted(scores, reverse=True)
    full = client.post("/rank", json=rank_body(world.users[0], world.scenarios[1], items, top_k=50)).json()
    assert [it["item_id"] for it in full["items"][:7]] == [it["item_id"] for it in out["items"]]
    assert out["fallbacks"] == []
    empty = client.post("/rank", json=rank_body(world.users[0], world.scenarios[1], []))
    assert empty.status_code == 200 and empty.json()["items"] == []


def test_limits_and_bad_input(world, client):
    user, scen = world.users[0], world.scenarios[0]
    many = [f"x{i}" for i in range(MAX_CANDIDATES + 1)]
    r = client.post("/rank", json=rank_body(user, scen, many))
    assert r.status_code == 422 and f"max_candidates {MAX_CANDIDATES}" in r.json()["detail"]
    assert client.post("/rank", json=rank_body(user, scen, many[:MAX_CANDIDATES])).status_code == 200

    big = b'{"user_id": "' + b"a" * MAX_BODY + b'"}'
    r = client.post("/rank", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and f"max_body_bytes {MAX_BODY}" in r.json()["detail"]
    # Without a Content-Length (chunked upload) the limit holds too.
    r = client.post("/rank", content=iter([big[:40_000], big[40_000:]]), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text

    r = client.post("/rank", json=rank_body(user, "no-such-scenario", ["a"]))
    assert r.status_code == 422
    assert all(s in r.json()["detail"] for s in world.scenarios), r.text
    for bad in (
        b"not json",
        b'{"scenario": "x", "candidates": []}',
        b'{"user_id": "u", "scenario": "%s", "candidates": [{"item_id": "a", "f": {"nested": 1}}]}' % scen.encode(),
        b'{"user_id": "u", "scenario": "%s", "candidates": [], "top_k": 0}' % scen.encode(),
        b'{"user_id": "u", "scenario": "%s", "candidates": [], "surprise": 1}' % scen.encode(),
        b'{"user_id": "", "scenario": "%s", "candidates": []}' % scen.encode(),
    ):
        r = client.post("/rank", content=bad, headers={"content-type": "application/json"})
        assert r.status_code == 422, (bad, r.status_code, r.text)
    r = client.get("/explain/u1", params={"scenario": "nope"})
    assert r.status_code == 422 and world.scenarios[0] in r.json()["detail"]


def test_explain_returns_stored_answers(world, client):
    snap = KnowledgeSnapshot(world.snapshot_dir)
    user = world.users[3]
    r = client.get(f"/explain/{user}", params={"scenario": world.scenarios[1]})
    assert r.status_code == 200
    out = r.json()
    assert out["known_user"] is True
    assert out["user_answer"] == snap.users().response_of(user) and "likes things" in out["user_answer"]
    assert out["scenario_answers"] == {world.scenarios[1]: snap.scenarios().response_of(world.scenarios[1])}
    assert out["knowledge_version"] == "v1"
    everything = client.get(f"/explain/{user}").json()
    assert set(everything["scenario_answers"]) == set(world.scenarios)
    unknown = client.get("/explain/nobody-we-know").json()
    assert unknown["known_user"] is False and unknown["user_answer"] is None


def test_metrics_names_and_admin(world, client):
    client.post("/rank", json=rank_body(world.users[1], world.scenarios[0], world.items[:30]))
    text = client.get("/metrics").text
    for needle in (
        'llm4msr_rank_latency_seconds_bucket{le="0.0005"}',
        'llm4msr_rank_stage_seconds_count{stage="decode"}',
        'llm4msr_rank_stage_seconds_count{stage="knowledge"}',
        'llm4msr_rank_stage_seconds_count{stage="forward"}',
        'llm4msr_rank_stage_seconds_count{stage="encode"}',
        "llm4msr_rank_candidates_bucket",
        'llm4msr_requests_total{route="/rank",status="200"}',
        'llm4msr_knowledge_fallback_total{level="user",reason="unknown"}',
        'knowledge_version="v1"',
        "llm4msr_knowledge_created_timestamp_seconds",
    ):
        assert needle in text, needle
    info = [line for line in text.splitlines() if line.startswith("llm4msr_versions_info{")]
    assert len(info) == 1 and "model_version=" in info[0]
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["ready"] is True
    assert client.get("/docs").status_code == 200
    assert "RankRequest" in client.get("/openapi.json").json()["components"]["schemas"]
    # Admin: token required.
    assert client.post("/admin/reload").status_code == 401
    assert client.post("/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["knowledge_version"] == "v1"
    r = client.post(
        "/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, json={"artifact": str(world.artifacts["plain"])}
    )
    assert r.status_code == 200 and r.json()["model_version"].startswith("star-plain")
    out = client.post("/rank", json=rank_body(world.users[1], world.scenarios[0], world.items[:3])).json()
    assert out["model_version"] == r.json()["model_version"]
    back = client.post(
        "/admin/reload",
        headers={"Authorization": f"Bearer {TOKEN}"},
        json={"artifact": str(world.artifacts["llm4msr-item"])},
    )
    assert back.status_code == 200
    assert (
        client.post(
            "/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, json={"artifact": "/no/such/dir"}
        ).status_code
        == 422
    )


def test_fast_path_answers_as_the_route(world, server, tmp_path):
    """POST /rank through the fast path (the default) and through the framework's route (LLM4MSR_RANK_FAST_PATH=
    false): the same status, content type and body for valid and invalid requests, and the same request counts."""
    routed = start_server(
        _server_args(world),
        tmp_path / "routed.log",
        env={"LLM4MSR_RANK_FAST_PATH": "false"},
    )
    user, scen = world.users[3], world.scenarios[0]
    requests = [
        ("POST", "/rank", rank_body(user, scen, world.items[:40], top_k=10)),
        ("POST", "/rank", rank_body("someone-new", scen, [*world.items[:5], world.items[2], "no-such-item"])),
        ("POST", "/rank", rank_body(user, scen, [f"x{i}" for i in range(MAX_CANDIDATES + 1)])),
        ("POST", "/rank", rank_body(user, "no-such-scenario", ["a"])),
        ("POST", "/rank", b'{"user_id": "' + b"a" * MAX_BODY + b'"}'),
        ("POST", "/rank", b"not json"),
        ("POST", "/rank", b'{"user_id": "u", "scenario": "%s", "candidates": [], "top_k": 0}' % scen.encode()),
        ("POST", "/rank", b'{"user_id": "u", "scenario": "%s", "candidates": [{"item_id": 5}]}' % scen.encode()),
        ("GET", "/rank", None),
    ]
    try:
        with httpx.Client(base_url=server.url, timeout=10) as fast, httpx.Client(base_url=routed.url) as slow:
            before = [_rank_counts(c) for c in (fast, slow)]
            for method, path, body in requests:
                kwargs = {"json": body} if isinstance(body, dict) else {"content": body}
                a, b = fast.request(method, path, **kwargs), slow.request(method, path, **kwargs)
                assert a.status_code == b.status_code, (path, body, a.text, b.text)
                assert a.headers["content-type"] == b.headers["content-type"]
                assert a.json() == b.json(), (a.text, b.text)
            added = [_rank_counts(c) - before[i] for i, c in enumerate((fast, slow))]
        assert added[0] == added[1] and sum(added[0].values()) == len(requests), added
        assert {"200", "413", "422", "405"} <= set(added[0])
    finally:
        routed.stop()


def _rank_counts(client: httpx.Client):
    """llm4msr_requests_total of route /rank by status."""
    from collections import Counter

    counts = Counter()
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('llm4msr_requests_total{route="/rank"'):
            status = line.split('status="')[1].split('"')[0]
            counts[status] = float(line.rsplit(" ", 1)[1])
    return counts
