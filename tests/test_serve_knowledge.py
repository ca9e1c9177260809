"""The ranker's knowledge access layer against real snapshots and a real Redis server."""

from __future__ import annotations

import time

import numpy as np
import pytest

from online.knowledge import REDIS_UNAVAILABLE, UNKNOWN, RedisKnowledgeStore, SnapshotKnowledgeStore
from shared.errors import UserFacingError
from shared.knowledge.snapshot import KnowledgeSnapshot
from tests.fixtures_serving import make_space, publish, wait_until, write_snapshot

SCEN = ["books", "home"]
USERS = [f"u{i}" for i in range(20)]
ITEMS = [f"i{i}" for i in range(50)]


@pytest.fixture
def kn_root(tmp_path):
    root = tmp_path / "knowledge"
    write_snapshot(root, "v1", SCEN, USERS, ITEMS, make_space(), seed=1)
    return root


wait_for = wait_until


def test_snapshot_store_lookup_and_fallbacks(kn_root):
    snap = KnowledgeSnapshot(kn_root / "v1")
    store = SnapshotKnowledgeStore(kn_root, make_space().id, poll_interval_s=0.1)
    store.start()
    try:
        kv = store.current()
        assert kv.version == "v1" and set(kv.scenarios) == set(SCEN)
        got = store.fetch(kv, "u3", ["i1", "nope", "i7"], need_user=True)
        np.testing.assert_array_equal(got.user_vec, snap.users().embeddings[3])
        np.testing.assert_array_equal(got.item_vecs[0], snap.items().embeddings[1])
        assert np.isnan(got.item_vecs[1]).all()
        assert [(f.level, f.reason, f.count) for f in got.fallbacks] == [("item", UNKNOWN, 1)]
        cold = store.fetch(kv, "stranger", None, need_user=True)
        np.testing.assert_array_equal(cold.user_vec, snap.default_user())
        assert [(f.level, f.reason) for f in cold.fallbacks] == [("user", UNKNOWN)]
        assert store.user_response(kv, "u3")[0] == "User u3 likes things (v1)"
        assert store.in_memory(kv, "anyone", need_user=True, need_items=True)  # no request of it reads the network
        # A new version under the root is followed through LATEST, without a restart.
        write_snapshot(kn_root, "v2", SCEN, USERS, ITEMS, make_space(), seed=2)
        assert wait_for(lambda: store.version_name() == "v2")
        assert kv.version == "v1"  # the old object is untouched: in-flight requests keep their version
    finally:
        store.stop()


def test_snapshot_store_refuses_other_space(kn_root):
    store = SnapshotKnowledgeStore(kn_root, make_space(dim=8, model="another-llm").id)
    with pytest.raises(UserFacingError, match="knowledge space"):
        store.start()


def test_redis_store_follows_current_and_caches(kn_root, redis_server):
    snap = KnowledgeSnapshot(kn_root / "v1")
    publish(kn_root / "v1", redis_server.url)
    store = RedisKnowledgeStore(redis_server.url, make_space().id, poll_interval_s=0.1, retry_s=0.2)
    store.start()
    try:
        kv = store.current()
        assert kv.version == "v1" and kv.items_complete and len(kv.items) == len(ITEMS)
        np.testing.assert_array_equal(kv.scenarios["home"], snap.scenarios().embeddings[1])
        got = store.fetch(kv, "u5", ["i2", "zzz"], need_user=True)
        np.testing.assert_array_equal(got.user_vec, snap.users().embeddings[5])
        np.testing.assert_array_equal(got.item_vecs[0], snap.items().embeddings[2])
        assert [(f.level, f.reason, f.count) for f in got.fallbacks] == [("item", UNKNOWN, 1)]
        assert [(f.level, f.reason) for f in store.fetch(kv, "nobody", None, True).fallbacks] == [("user", UNKNOWN)]
        assert store.user_response(kv, "u5")[0] == "User u5 likes things (v1)"

        # Redis goes away: cached users still answer exactly, uncached ones get the default, flagged, fast.
        redis_server.stop()
        t0 = time.perf_counter()
        cached = store.fetch(kv, "u5", None, need_user=True)
        np.testing.assert_array_equal(cached.user_vec, snap.users().embeddings[5])
        assert cached.fallbacks == []
        assert [(f.level, f.reason) for f in store.fetch(kv, "nobody", None, True).fallbacks] == [("user", UNKNOWN)]
        for _ in range(20):
            down = store.fetch(kv, "u9", None, need_user=True)
            assert [(f.level, f.reason) for f in down.fallbacks] == [("user", REDIS_UNAVAILABLE)]
            np.testing.assert_array_equal(down.user_vec, snap.default_user())
        assert time.perf_counter() - t0 < 1.0, "an outage must not slow requests down"
        assert not store.redis_up

        # Redis returns (empty: it was not persisted); publish again, the store recovers by itself.
        redis_server.start()
        write_snapshot(kn_root, "v2", SCEN, USERS, ITEMS, make_space(), seed=2)
        publish(kn_root / "v2", redis_server.url)
        assert wait_for(lambda: store.version_name() == "v2" and store.redis_up)
        kv2 = store.current()
        back = store.fetch(kv2, "u9", None, need_user=True)
        assert back.fallbacks == []
        np.testing.assert_array_equal(back.user_vec, KnowledgeSnapshot(kn_root / "v2").users().embeddings[9])
    finally:
        store.stop()


def test_redis_store_refuses_other_space(kn_root, redis_server):
    publish(kn_root / "v1", redis_server.url)
    store = RedisKnowledgeStore(redis_server.url, "0123456789abcdef")
    with pytest.raises(UserFacingError, match="knowledge space"):
        store.start()
    # A running store keeps its version when a version of another space is published.
    store = RedisKnowledgeStore(redis_server.url, make_space().id, poll_interval_s=0.1)
    store.start()
    try:
        write_snapshot(kn_root, "v9", SCEN, USERS, ITEMS, make_space(dim=4), seed=3)
        publish(kn_root / "v9", redis_server.url)
        assert wait_for(lambda: "v9" in store.refused)
        assert store.version_name() == "v1"
    finally:
        store.stop()


def test_redis_store_starts_before_redis(kn_root, redis_server):
    """Redis not there yet at start: not ready (no crash), then ready by itself once knowledge is published."""
    redis_server.stop()
    store = RedisKnowledgeStore(redis_server.url, make_space().id, poll_interval_s=0.1, retry_s=0.1)
    store.start()
    try:
        assert not store.ready and not store.redis_up
        redis_server.start()
        time.sleep(0.3)
        assert not store.ready  # Redis answers, nothing published yet
        publish(kn_root / "v1", redis_server.url)
        assert wait_for(lambda: store.ready and store.version_name() == "v1")
    finally:
        store.stop()
