"""Issue 11 hardening of the ranker's request path, each against a real uvicorn ranker (and real Redis where the
fault lives there): hostile bodies cost bounded work and do not stall other clients, knowledge faults are 503s
(never 500s), duplicate candidates and missing scenario vectors follow one documented rule, and /admin/reload takes
a long token from the environment or a file and never echoes OS error text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from tests.fixtures_serving import (
    REPO,
    build_world,
    make_space,
    over_limit_body,
    rank_body,
    seeded_table,
    start_server,
    worst_rank_body,
    write_snapshot,
)

TOKEN = "hardening-admin-token-0123456789abcdef"  # >= 32 characters
FEATURE = "device"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("hardening"), variants=("llm4msr-item",), feature_column=FEATURE)


@pytest.fixture(scope="module")
def artifact(world):
    return world.artifacts["llm4msr-item"]


@pytest.fixture(scope="module")
def server(world, artifact, tmp_path_factory):
    """Default limits (1000 candidates, 1 MB, 64 fields per candidate); the admin token comes from a file."""
    logs = tmp_path_factory.mktemp("logs")
    token_file = logs / "admin-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    srv = start_server(
        ["--artifact", str(artifact), "--knowledge", str(world.knowledge_root), "--admin-token-file", str(token_file)],
        logs / "server.log",
        env={"LLM4MSR_ADMIN_TOKEN": ""},
    )
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _scores(response: httpx.Response) -> dict[str, float]:
    assert response.status_code == 200, response.text
    return {it["item_id"]: it["score"] for it in response.json()["items"]}


def _metric(client: httpx.Client, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _post(client: httpx.Client, body: bytes) -> httpx.Response:
    return client.post("/rank", content=body, headers={"content-type": "application/json"})


# -- 1. candidate fields: only the model's own are read, and their number is capped ------------------------------


def test_only_the_models_feature_fields_are_read(world, artifact, client):
    from shared.artifact import load_artifact

    assert load_artifact(artifact).encoder.extra_fields == [FEATURE]
    user, scen, items = world.users[0], world.scenarios[0], world.items[:20]

    def body(value: str, junk: int = 0) -> dict:
        junk_fields = {f"junk{j}": [j, str(j), j > 3, None][j % 4] for j in range(junk)}  # flat values or null
        cands = [{"item_id": i, FEATURE: value, **junk_fields} for i in items]
        return {"user_id": user, "scenario": scen, "candidates": cands, "top_k": len(items)}

    mobile = _scores(client.post("/rank", json=body("mobile")))
    assert _scores(client.post("/rank", json=body("mobile", junk=63))) == mobile  # unknown keys change nothing
    web = _scores(client.post("/rank", json=body("web")))
    assert max(abs(mobile[i] - web[i]) for i in items) > 1e-6, "the model's own field is read"


def test_field_limit_is_checked_in_validation(world, client):
    user, scen = world.users[0], world.scenarios[0]
    cands = [{"item_id": i} for i in world.items[:5]]
    cands[3].update({f"k{j}": "v" for j in range(65)})
    r = client.post("/rank", json={"user_id": user, "scenario": scen, "candidates": cands})
    assert r.status_code == 422, r.text
    [err] = r.json()["detail"]
    assert err["loc"] == ["body", "candidates", 3]
    assert "candidate 3" in err["msg"] and "max_candidate_fields 64" in err["msg"]
    cands[3] = {"item_id": world.items[3], **{f"k{j}": "v" for j in range(64)}}
    assert client.post("/rank", json={"user_id": user, "scenario": scen, "candidates": cands}).status_code == 200

    # The body (one candidate with ~80k distinct keys) is refused by the count, in bounded time.
    t0 = time.perf_counter()
    r = _post(client, over_limit_body(user, scen))
    assert r.status_code == 422 and "candidate 0" in r.json()["detail"][0]["msg"], r.text[:300]
    assert time.perf_counter() - t0 < 5.0
    # A field holding an array is an error naming the candidate; the answer to a flood of errors stays short.
    r = client.post("/rank", json={"user_id": user, "scenario": scen, "candidates": [{"item_id": "a", "f": [1]}]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "candidates", 0]
    ones = b'{"user_id": "u", "scenario": "s", "candidates": [' + b",".join([b"1"] * 400_000) + b"]}"
    junk_root = {"user_id": "u", "scenario": scen, "candidates": [], **{f"x{j}": 0 for j in range(70_000)}}
    for flood, answer in (
        (ones, "too many candidates: 400000 > max_candidates 1000"),
        (json.dumps(junk_root).encode(), "70000 validation errors, too many to list"),
    ):
        t0 = time.perf_counter()
        r = _post(client, flood)
        assert r.status_code == 422 and len(r.content) < 2000 and answer in r.text, r.text[:300]
        assert time.perf_counter() - t0 < 5.0

    schema = client.get("/openapi.json").json()["components"]["schemas"]["Candidate"]
    assert schema["maxProperties"] == 65 and "ignored" in schema["description"]


def test_scan_body_counts_keys_exactly():
    """The byte scan behind the field limit agrees with a JSON parser on bodies full of quotes, backslashes,
    brackets and colons inside strings, and finds a nested value (seeded random bodies)."""
    import random

    from online.schemas import scan_body

    rng = random.Random(11)
    pieces = ["a", '"', "\\", "{", "}", "[", "]", ":", ",", " ", "é", "\n", '\\"', "\\\\"]

    def text() -> str:
        return "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 8)))

    for _ in range(500):
        cands = []
        for _ in range(rng.randrange(0, 6)):
            cand = {"item_id": text() or "x"}
            cand.update({text() + str(j): rng.choice([text(), 1, 2.5, True, None]) for j in range(rng.randrange(5))})
            cands.append(cand)
        doc = {"user_id": text(), "scenario": text(), "candidates": cands}
        body = json.dumps(doc, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1])).encode()
        shape = scan_body(body)
        assert shape.deep_at is None and shape.keys.tolist() == [len(c) for c in cands], body
        if cands:
            k = rng.randrange(len(cands))
            cands[k]["nested"] = {"x": [text()]}
            nested = scan_body(json.dumps(doc).encode())
            assert nested.deep_in == k and nested.deep_error()["loc"] == ["body", "candidates", k]


def test_hostile_bodies_do_not_stall_other_clients(world, artifact, server):
    """4 clients of normal traffic; then the same with one more client sending the worst body the limits admit
    (then the issue's over-limit body) 4 times a second. Bound: every hostile request is answered within 5 s and
    the normal p99 stays under max(2x baseline, baseline + 50 ms). (Before the fix, one over-limit body held every
    request for about a minute.)"""
    from bench.abuse_bench import measure, normal_bodies

    scen = world.scenarios[0]
    normal = normal_bodies(world.users, world.items, scen, 100, [FEATURE])
    worst = worst_rank_body(world.users[0], scen, [FEATURE])
    assert len(worst) > 900_000
    hostile = {"worst": (worst, 0.25), "over-limit": (over_limit_body(world.users[0], scen), 0.25)}
    results = measure(server.port, normal, hostile, clients=4, duration=4.0, rounds=1)
    print(json.dumps({ph: {k: v for k, v in x.items() if "ms" in k or "status" in k} for ph, x in results.items()}))
    base = results["baseline"]
    assert base["errors"] == 0 and base["n"] > 100
    for phase, status in (("worst", 200), ("over-limit", 422)):
        x = results[phase]
        assert x["errors"] == 0, x
        assert x["hostile_n"] >= 3 and set(x["hostile_statuses"]) == {status}, x
        assert x["hostile_max_ms"] < 5000, x
        bound = max(2 * base["p99_ms"], base["p99_ms"] + 50)
        assert x["p99_ms"] < bound, (phase, x["p99_ms"], base["p99_ms"])


# -- 2. a knowledge fault is a 503 (never a 500); an input fault in scoring is a 422 ----------------------------


def test_wrong_length_knowledge_vector_is_503(world, artifact, tmp_path):
    """A snapshot whose user vectors have 3 values for a model of dim 8: that user's requests are 503 with the reason
    in one line (not a 500, not the client's fault); a cold-start user (the default vector is fine) is served."""
    from shared.knowledge.snapshot import write_table

    broken = write_snapshot(
        tmp_path / "kn",
        "v1",
        world.scenarios,
        world.users,
        world.items[:-1],
        make_space(8),
        seed=11,
        split_fingerprint=world.split.fingerprint(),
    )
    write_table(broken / "users.parquet", seeded_table(world.users, 3, seed=13, answer=None))
    srv = start_server(["--artifact", str(artifact), "--knowledge", str(broken)], tmp_path / "server.log")
    try:
        items = world.items[:10]
        r = httpx.post(f"{srv.url}/rank", json=rank_body(world.users[1], world.scenarios[0], items))
        assert r.status_code == 503, r.text
        detail = r.json()["detail"]
        assert detail == (
            "cannot serve this request with knowledge version v1 right now: the user knowledge vector has 3 values, "
            "the model expects 8"
        ), detail
        cold = httpx.post(f"{srv.url}/rank", json=rank_body("someone-new", world.scenarios[0], items))
        assert (
            cold.status_code == 200 and {"level": "user", "reason": "unknown", "count": 1} in cold.json()["fallbacks"]
        )
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'llm4msr_requests_total{route="/rank",status="503"} 1.0' in metrics
        assert 'status="500"' not in metrics and "Traceback" not in srv.log()
        assert "answered 503" in srv.log()  # the operator sees it too
    finally:
        srv.stop()


def test_scoring_errors_are_classified(artifact):
    """The ranker tells a data fault (wrong vector length: 503) from an input fault (422) on a real model."""
    from online.ranker import KnowledgeDataError, Ranker
    from shared.errors import UserFacingError
    from shared.scoring import RequestKnowledge

    ranker = Ranker.load(artifact)
    scen, items = ranker.scenarios[0], ["a", "b", "c"]
    d = ranker.scorer.dim
    ok = RequestKnowledge(np.zeros(d, np.float32), np.zeros(d, np.float32), np.zeros((3, d), np.float32))
    assert ranker.score(scen, "u", items, ok).shape == (3,)
    short_user = RequestKnowledge(np.zeros(d, np.float32), np.zeros(d - 1, np.float32), ok.item_vecs)
    with pytest.raises(KnowledgeDataError, match=f"user knowledge vector has {d - 1} values, the model expects {d}"):
        ranker.score(scen, "u", items, short_user)
    with pytest.raises(UserFacingError) as info:
        ranker.score(scen, "u", items, ok, features={FEATURE: ["web"]})  # 1 value for 3 candidates
    assert not isinstance(info.value, KnowledgeDataError)


# -- 3. duplicate candidate ids ------------------------------------------------------------------------------------


def test_duplicate_item_ids_are_scored_once(world, client):
    user, scen = world.users[2], world.scenarios[1]
    a, b, c = world.items[:3]
    before = _metric(client, "llm4msr_knowledge_fallback_total", level="item_id", reason="duplicate")
    cands = [
        {"item_id": a, FEATURE: "mobile"},
        {"item_id": b, FEATURE: "tv"},
        {"item_id": a, FEATURE: "web"},
        {"item_id": c, FEATURE: "tv"},
        {"item_id": b, FEATURE: "web"},
    ]
    r = client.post("/rank", json={"user_id": user, "scenario": scen, "candidates": cands, "top_k": 10})
    got = _scores(r)
    assert sorted(got) == sorted([a, b, c]) and len(r.json()["items"]) == 3
    assert {"level": "item_id", "reason": "duplicate", "count": 2} in r.json()["fallbacks"]
    firsts = [cands[0], cands[1], cands[3]]
    assert got == _scores(client.post("/rank", json={"user_id": user, "scenario": scen, "candidates": firsts}))
    lasts = [cands[2], cands[4], cands[3]]
    assert got != _scores(client.post("/rank", json={"user_id": user, "scenario": scen, "candidates": lasts}))
    after = _metric(client, "llm4msr_knowledge_fallback_total", level="item_id", reason="duplicate")
    assert after - before == 2


# -- 4. a missing scenario vector is the level's mean (a NaN row), flagged -------------------------------------------


def test_missing_scenario_vector_scores_as_the_level_mean(world, artifact, tmp_path):
    from online.ranker import Ranker
    from shared.knowledge.snapshot import KnowledgeSnapshot
    from shared.scoring import RequestKnowledge

    missing = world.scenarios[0]
    # The same seeded tables as v1 (same ids and seed), without the first scenario's vector.
    v2 = write_snapshot(
        tmp_path / "kn",
        "v2",
        world.scenarios[1:],
        world.users,
        world.items[:-1],
        make_space(8),
        seed=11,
        split_fingerprint=world.split.fingerprint(),
    )
    srv = start_server(["--artifact", str(artifact), "--knowledge", str(v2)], tmp_path / "server.log")
    try:
        user, items = world.users[4], world.items[:15]
        r = httpx.post(f"{srv.url}/rank", json=rank_body(user, missing, items, top_k=15))
        served = _scores(r)
        assert {"level": "scenario", "reason": "unknown", "count": 1} in r.json()["fallbacks"]
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'llm4msr_knowledge_fallback_total{level="scenario",reason="unknown"} 1.0' in metrics
        other = httpx.post(f"{srv.url}/rank", json=rank_body(user, world.scenarios[1], items)).json()
        assert not any(f["level"] == "scenario" for f in other["fallbacks"])
        # Admin routes are off without a token, and the answer says how to turn them on.
        r = httpx.post(f"{srv.url}/admin/reload")
        assert r.status_code == 403 and "LLM4MSR_ADMIN_TOKEN_FILE" in r.json()["detail"]
    finally:
        srv.stop()

    ranker = Ranker.load(artifact)
    snap = KnowledgeSnapshot(v2)
    user_vec = snap.users().lookup([user])[0][0]
    item_vecs, found = snap.items().lookup(items)
    item_vecs[~found] = np.nan

    def offline(scenario_vec: np.ndarray) -> np.ndarray:
        return ranker.score(missing, user, items, RequestKnowledge(scenario_vec, user_vec, item_vecs))

    mean = ranker.artifact.model.wrapper.mean_scenario.numpy()
    as_mean, as_nan = offline(mean), offline(np.full(8, np.nan, np.float32))
    np.testing.assert_array_equal(as_mean, as_nan)
    np.testing.assert_allclose([served[i] for i in items], as_mean, atol=1e-6)
    # Another vector is another answer (a far one: the knowledge here is seeded noise, so training opens the
    # scenario level's gate only a little and a nearby vector, e.g. zeros, moves the scores by less than 1e-6).
    assert np.abs(offline(mean + 100) - as_mean).max() > 1e-5, "a far-off scenario vector would be another answer"


# -- 5. /admin/reload: token rules and no OS error text ---------------------------------------------------------------


def _serve(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("LLM4MSR_")}
    full.update(PYTHONPATH=str(REPO), **env)
    return subprocess.run(
        [sys.executable, "-m", "llm4msr_cli", "serve", *args], cwd=REPO, env=full, capture_output=True, text=True
    )


def test_admin_token_must_be_long_and_not_a_flag(artifact, tmp_path):
    art = ["--artifact", str(artifact)]
    short = _serve(art, {"LLM4MSR_ADMIN_TOKEN": "short-secret-value"})
    assert short.returncode == 2 and "fewer than the 32 required" in short.stderr, short.stderr
    assert "short-secret-value" not in short.stderr and len(short.stderr.strip().splitlines()) == 1

    flag = _serve([*art, "--admin-token", "flag-secret-value-0123456789abcdefghij"], {})
    assert flag.returncode == 2 and "--admin-token was removed" in flag.stderr, flag.stderr
    assert "flag-secret-value" not in flag.stderr

    token_file = tmp_path / "token"
    token_file.write_text("file-secret\n")
    too_short = _serve([*art, "--admin-token-file", str(token_file)], {})
    assert too_short.returncode == 2 and "11 characters" in too_short.stderr, too_short.stderr
    both = _serve(art, {"LLM4MSR_ADMIN_TOKEN": TOKEN, "LLM4MSR_ADMIN_TOKEN_FILE": str(token_file)})
    assert both.returncode == 2 and "not both" in both.stderr, both.stderr
    missing = _serve([*art, "--admin-token-file", str(tmp_path / "nope")], {})
    assert missing.returncode == 2 and "cannot read the admin token file" in missing.stderr, missing.stderr


def test_admin_reload_never_echoes_os_errors(world, artifact, client, server, tmp_path):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/admin/reload", headers={"Authorization": "Bearer " + TOKEN[:-1]}).status_code == 401
    r = client.post("/admin/reload", headers=auth)
    assert r.status_code == 200 and r.json()["knowledge_version"] == "v1", r.text

    odd = tmp_path / "odd-artifact"
    odd.mkdir()
    (odd / "config.json").write_bytes(b"\xff\xfe not utf-8")  # read_text() raises UnicodeDecodeError
    for target in ("a" * 5000, str(odd)):  # OSError ENAMETOOLONG from stat(); a ValueError from decoding
        r = client.post("/admin/reload", headers=auth, json={"artifact": target})
        assert r.status_code == 422, r.text
        assert r.json()["detail"] == "cannot load the requested artifact; the reason is in the server log"
    log = server.log()
    assert "File name too long" in log and "can't decode" in log  # the details are for the operator
    # Still serving the model it had.
    assert client.post("/rank", json=rank_body(world.users[0], world.scenarios[0], world.items[:3])).status_code == 200
