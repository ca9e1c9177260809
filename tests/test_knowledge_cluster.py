"""Knowledge on a real Redis Cluster (three `redis-server --cluster-enabled yes` primaries joined by
`redis-cli --cluster create`): publishing spreads a version over every node, readers split multi-key reads per
node, the flip is one SET, cleanup runs node by node; a served ranker survives a flip under load with 0 failed
requests, and a dead primary (no replica) costs only its own keys, as counted fallbacks, never a 5xx."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from offline.knowledge.publish import publish_snapshot
from online.knowledge import REDIS_UNAVAILABLE, RedisKnowledgeStore
from shared.errors import UserFacingError
from shared.knowledge import keys as K
from shared.knowledge.redis_conn import parse_redis_url
from shared.knowledge.snapshot import KnowledgeSnapshot
from shared.knowledge.vector_codec import published_codecs
from tests.fixtures_cluster import redis_cluster  # noqa: F401  (fixture)
from tests.fixtures_serving import REPO, build_world, make_space, rank_body, start_server, wait_until, write_snapshot
from tests.test_serve_redis import Stream

SCEN = ["books", "home"]
USERS = [f"user-{i}" for i in range(400)]
ITEMS = [f"item-{i}" for i in range(150)]


def node_keys(cluster, pattern: str) -> dict[int, int]:
    """How many keys matching `pattern` each node holds (asked node by node, not through the cluster client)."""
    import redis

    out = {}
    for node in cluster.nodes:
        with redis.Redis(port=node.port) as r:
            out[node.port] = sum(1 for _ in r.scan_iter(match=pattern, count=1000))
    return out


@pytest.mark.parametrize(
    ("url", "target", "cluster"),
    [
        ("redis+cluster://10.0.0.1:7000", "redis://10.0.0.1:7000", True),
        ("redis+cluster://u:pw@a:7000,b:7001,[::1]:7002/0", "redis://u:pw@a:7000", True),
        ("rediss+cluster://:pw@h:7000/0", "rediss://:pw@h:7000", True),
        ("redis://h:7000/0?cluster=true", "redis://h:7000", True),
        ("redis://h:7000/0?cluster=false&socket_timeout=1", "redis://h:7000/0?socket_timeout=1", False),
        ("redis://:p%40ss@h:6379/2?password=x", "redis://:p%40ss@h:6379/2?password=x", False),
    ],
)
def test_cluster_urls(url, target, cluster):
    parsed = parse_redis_url(url)
    assert (parsed.url, parsed.cluster) == (target, cluster)
    assert parsed.seeds == ((("b", 7001), ("::1", 7002)) if "b:7001" in url else ())


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://:s3cret@h:7000/3", r"invalid Redis URL redis\+cluster://:\*\*\*@h:7000/3: .*database 0 only"),
        ("redis://h:1?cluster=maybe", r"cluster='maybe', expected true or false"),
        ("unix:///tmp/r.sock?cluster=yes", r"a cluster needs redis:// or rediss://"),
        ("redis+cluster://:s3cret@a:1,b/0", r"seed node 'b' is not host:port"),
    ],
)
def test_bad_cluster_urls_are_one_line_errors(url, message):
    with pytest.raises(UserFacingError, match=message) as err:
        parse_redis_url(url)
    assert "s3cret" not in str(err.value) and "\n" not in str(err.value)


def test_publish_spreads_over_nodes_reads_back_and_cleans_every_node(redis_cluster, tmp_path):  # noqa: F811
    root = tmp_path / "kn"
    for n, version in enumerate(("v1", "v2", "v3")):
        write_snapshot(root, version, SCEN, USERS, ITEMS, make_space(dim=16), seed=n)
    assert publish_snapshot(root / "v1", redis_cluster.url) == "v1"
    rc = redis_cluster.client()
    assert rc.get(K.CURRENT) == b"v1"
    spread = node_keys(redis_cluster, K.version_pattern("v1"))
    # vectors + answers (scenarios, users) + id lists + default + meta, on every node (no hash tag)
    assert sum(spread.values()) == 2 + 400 + 150 + 2 + 400 + 3 + 2
    assert min(spread.values()) > 200, spread

    store = RedisKnowledgeStore(redis_cluster.url, make_space(dim=16).id)
    store.start()
    try:
        kv = store.current()
        snap = KnowledgeSnapshot(root / "v1")
        codecs = published_codecs(json.loads(rc.get(K.meta_key("v1")))[K.PUBLISHED], 16)
        assert kv.version == "v1" and len(kv.items) == 150 and kv.items_complete
        np.testing.assert_array_equal(kv.items.matrix, codecs["item"].roundtrip(snap.items().embeddings))
        for user in ("user-0", "user-7", "user-399"):
            got = store.fetch(kv, user, None, need_user=True)
            row = snap.users().lookup([user])[0]
            assert got.fallbacks == [] and np.array_equal(got.user_vec, codecs["user"].roundtrip(row)[0])
        assert store.user_response(kv, "user-3")[0] == "User user-3 likes things (v1)"
    finally:
        store.stop()

    publish_snapshot(root / "v2", redis_cluster.url, keep_old=1)
    publish_snapshot(root / "v3", redis_cluster.url, keep_old=1)
    assert rc.get(K.CURRENT) == b"v3"
    assert set(node_keys(redis_cluster, K.version_pattern("v1")).values()) == {0}  # gone from every node
    assert min(node_keys(redis_cluster, K.version_pattern("v2")).values()) > 200  # the rollback version stays
    assert [v.decode() for v in rc.lrange(K.VERSIONS, 0, -1)] == ["v2", "v3"]


def test_publish_with_a_dead_primary_does_not_flip(redis_cluster, tmp_path):  # noqa: F811
    root = tmp_path / "kn"
    write_snapshot(root, "v1", SCEN, USERS, ITEMS, make_space(dim=16), seed=1)
    write_snapshot(root, "v2", SCEN, USERS, ITEMS, make_space(dim=16), seed=2)
    publish_snapshot(root / "v1", redis_cluster.url)
    rc = redis_cluster.client()
    holder = redis_cluster.node_of(K.CURRENT)
    victim = next(n for n in redis_cluster.nodes if n is not holder)
    victim.stop()
    with pytest.raises(UserFacingError) as err:
        publish_snapshot(root / "v2", redis_cluster.url)
    msg = str(err.value)
    assert msg.startswith("publishing knowledge v2 to redis+cluster://") and "current was not changed" in msg, msg
    assert "\n" not in msg
    assert rc.get(K.CURRENT) == b"v1"


def test_knowledge_publish_command_takes_a_cluster_url(redis_cluster, tmp_path):  # noqa: F811
    """`llm4msr knowledge publish --redis-url redis+cluster://...`, the same argument the refresh job passes on."""
    write_snapshot(tmp_path / "kn", "v1", SCEN, USERS[:50], ITEMS[:20], make_space(dim=16), seed=1)
    out = subprocess.run(
        [sys.executable, "-m", "llm4msr_cli", "knowledge", "publish", str(tmp_path / "kn" / "v1")]
        + ["--redis-url", f"redis://{redis_cluster.nodes[1].address}/0?cluster=true"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert redis_cluster.client().get(K.CURRENT) == b"v1"
    assert min(node_keys(redis_cluster, K.version_pattern("v1")).values()) > 0


# ------------------------------------------------------------------------------------------- a served ranker


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("serving-cluster"), variants=("llm4msr-item",))


def serve(world, cluster, tmp_path, **env):
    return start_server(
        ["--artifact", str(world.artifacts["llm4msr-item"]), "--redis-url", cluster.url],
        tmp_path / "server.log",
        env={"LLM4MSR_POLL_INTERVAL_S": "0.2", **env},
    )


def test_serve_under_load_and_flip_on_a_cluster(world, redis_cluster, tmp_path):  # noqa: F811
    publish_snapshot(world.snapshot_dir, redis_cluster.url)
    srv = serve(world, redis_cluster, tmp_path, LLM4MSR_USER_CACHE_SIZE="0")
    users = world.users
    try:
        with Stream(srv.url, lambda i: rank_body(users[i % len(users)], world.scenarios[0], world.items[:50])) as s:
            assert wait_until(lambda: len(s.records) >= 30, timeout=20)
            v2 = write_snapshot(
                world.knowledge_root,
                "v2",
                world.scenarios,
                world.users,
                world.items,
                make_space(),
                seed=42,
                split_fingerprint=world.split.fingerprint(),
            )
            publish_snapshot(v2, redis_cluster.url)
            assert wait_until(lambda: s.records and s.records[-1][2]["knowledge_version"] == "v2", timeout=20)
            n_at_flip = len(s.records)
            assert wait_until(lambda: len(s.records) >= n_at_flip + 30, timeout=20)
        assert s.errors == [] and {code for _, code, _ in s.records} == {200}
        versions = [rec["knowledge_version"] for _, _, rec in s.records]
        first_v2 = versions.index("v2")
        assert versions[0] == "v1" and set(versions[first_v2:]) == {"v2"}
        # Every user was read from the cluster (no cache): none fell back.
        assert not [f for _, _, rec in s.records for f in rec["fallbacks"] if f["level"] == "user"]
    finally:
        srv.stop()


def test_dead_primary_costs_only_its_keys(world, redis_cluster, tmp_path):  # noqa: F811
    """A primary without replica dies: users whose key lives there get the counted default (redis_unavailable),
    the others are served from the live nodes; no request fails."""
    publish_snapshot(world.snapshot_dir, redis_cluster.url)
    holder = redis_cluster.node_of(K.CURRENT)
    victim = next(
        n for n in redis_cluster.nodes if n is not holder and n is not redis_cluster.node_of(K.meta_key("v1"))
    )
    on_victim = [u for u in world.users if redis_cluster.node_of(K.user_key("v1", u)) is victim]
    elsewhere = [u for u in world.users if redis_cluster.node_of(K.user_key("v1", u)) is not victim]
    assert on_victim and elsewhere
    srv = serve(world, redis_cluster, tmp_path, LLM4MSR_USER_CACHE_SIZE="0", LLM4MSR_REDIS_RETRY_S="0.3")
    try:
        victim.stop()
        codes, flagged, clean = [], 0, 0
        with httpx.Client(base_url=srv.url, timeout=5) as c:
            t_end = time.time() + 3.0  # past the cluster's node timeout (1 s): the live nodes serve on
            i = 0
            while time.time() < t_end or i < 40:
                user = (on_victim if i % 2 else elsewhere)[i // 2 % len(on_victim if i % 2 else elsewhere)]
                r = c.post("/rank", json=rank_body(user, world.scenarios[0], world.items[:20]))
                codes.append(r.status_code)
                reasons = {f["reason"] for f in r.json()["fallbacks"] if f["level"] == "user"}
                if user in on_victim:
                    assert reasons == {REDIS_UNAVAILABLE}, (user, r.json()["fallbacks"])
                    flagged += 1
                else:
                    assert reasons == set(), (user, r.json()["fallbacks"])
                    clean += 1
                i += 1
        assert set(codes) == {200} and flagged >= 20 and clean >= 20
        metrics = httpx.get(f"{srv.url}/metrics").text
        line = next(
            x
            for x in metrics.splitlines()
            if x.startswith('llm4msr_knowledge_fallback_total{level="user",reason="redis_unavailable"}')
        )
        assert float(line.split()[-1]) >= flagged
        assert httpx.get(f"{srv.url}/readyz").status_code == 200
    finally:
        srv.stop()
