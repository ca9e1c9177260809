"""The Redis key layout's guards (version names, vector lengths) and how the ranker's Redis reader applies them
against a real redis-server: a bad `current` pointer or a broken version is refused and the served version stays;
a corrupt user or item vector is a counted fallback."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from online.knowledge import CORRUPT, UNKNOWN, RedisKnowledgeStore
from shared.errors import UserFacingError
from shared.knowledge import keys as K
from shared.knowledge.snapshot import KnowledgeSnapshot
from tests.fixtures_serving import make_space, publish, wait_until, write_snapshot

SCEN = ["books", "home"]
USERS = [f"u{i}" for i in range(20)]
ITEMS = [f"i{i}" for i in range(50)]


def test_version_names_of_the_build_are_valid(tmp_path):
    from offline.knowledge.build import _new_version

    first = _new_version(tmp_path, "0123456789abcdef")
    (tmp_path / first).mkdir()
    second = _new_version(tmp_path, "0123456789abcdef")  # same second: the "-2" suffix
    for name in (first, second, "v1", "old", "2024.01.01_a-b"):
        assert K.validate_version(name) == name
        assert K.version_pattern(name) == f"llm4msr:kn:{name}:*"


@pytest.mark.parametrize("bad", ["*", "v1*", "v?", "v[12]", "a:b", "-a", "_a", ".a", "", "a b", "a\n", "x" * 129, None])
def test_invalid_version_names_are_refused(bad):
    with pytest.raises(UserFacingError, match="invalid knowledge version"):
        K.validate_version(bad)
    with pytest.raises(UserFacingError, match="invalid knowledge version"):
        K.version_pattern(bad)


def test_long_bad_version_is_shortened_in_the_message():
    with pytest.raises(UserFacingError) as err:
        K.validate_version("*" * 10_000)
    assert len(str(err.value)) < 300


def test_decode_vector_checks_the_length():
    vec = np.arange(8, dtype=np.float32)
    data = K.encode_vector(vec)
    np.testing.assert_array_equal(K.decode_vector(data, 8), vec)
    with pytest.raises(K.VectorLengthError, match="28 bytes, expected 32"):
        K.decode_vector(data[:28], 8)
    with pytest.raises(K.VectorLengthError, match="not a whole number"):
        K.decode_vector(data[:7])
    assert K.ids_key("v1", "user", 3) == "llm4msr:kn:v1:ids:users:3"
    with pytest.raises(ValueError):
        K.ids_key("v1", "users", 0)  # a stored name, not a level
    assert [K.id_chunks(n) for n in (0, 1, K.ID_CHUNK, K.ID_CHUNK + 1)] == [1, 1, 1, 2]


# ----------------------------------------------------------------------------------------- the Redis reader


@pytest.fixture
def kn_root(tmp_path):
    root = tmp_path / "knowledge"
    write_snapshot(root, "v1", SCEN, USERS, ITEMS, make_space(), seed=1)
    write_snapshot(root, "v2", SCEN, USERS, ITEMS, make_space(), seed=2)
    return root


wait_for = wait_until


def test_bad_current_pointer_is_refused_and_logged(kn_root, redis_server, caplog):
    publish(kn_root / "v1", redis_server.url)
    r = redis_server.client()
    store = RedisKnowledgeStore(redis_server.url, make_space().id, poll_interval_s=0.05)
    store.start()
    try:
        with caplog.at_level(logging.ERROR, logger="online.knowledge"):
            for bad in ("v1*", "*", "v1:u:u1"):
                r.set(K.CURRENT, bad)
                assert wait_for(lambda b=bad: b in store.refused), store.refused
                assert "invalid knowledge version" in store.refused[bad]
        assert store.version_name() == "v1"
        kv = store.current()
        assert store.fetch(kv, "u3", None, need_user=True).fallbacks == []
        logged = [rec.getMessage() for rec in caplog.records if "not swapping knowledge" in rec.getMessage()]
        assert len(logged) == 3 and "'v1*'" in logged[0] and "still serving v1" in logged[0], logged
        # A good version published afterwards is followed as usual.
        publish(kn_root / "v2", redis_server.url)
        assert wait_for(lambda: store.version_name() == "v2")
    finally:
        store.stop()
    # At start there is nothing to keep serving: the pointer is refused with one clear error.
    r.set(K.CURRENT, "v*")
    with pytest.raises(UserFacingError, match=r"llm4msr:kn:current .*invalid knowledge version 'v\*'"):
        RedisKnowledgeStore(redis_server.url, make_space().id).start()


def test_corrupt_user_and_item_vectors_are_counted_fallbacks(kn_root, redis_server, caplog):
    """In float32 (exact values, lengths of 4 * dim); tests/test_knowledge_compact.py has the compact formats."""
    from offline.knowledge.publish import publish_snapshot

    snap = KnowledgeSnapshot(kn_root / "v1")
    publish_snapshot(kn_root / "v1", redis_server.url, vector_format="float32")
    r = redis_server.client()
    r.set(K.user_key("v1", "u4"), b"\x00" * 12)
    r.set(K.item_key("v1", "i7"), b"\x00" * 36)
    with caplog.at_level(logging.ERROR, logger="online.knowledge"):
        # Items preloaded (the whole catalogue in memory) and fetched per request (preload limit 0).
        for limit in (1000, 0):
            store = RedisKnowledgeStore(redis_server.url, make_space().id, item_preload_limit=limit)
            store.start()
            try:
                kv = store.current()
                assert kv.version == "v1"
                for _ in range(2):  # the second time the user comes from the LRU: still flagged
                    got = store.fetch(kv, "u4", ["i7", "i8", "nope"], need_user=True)
                    np.testing.assert_array_equal(got.user_vec, snap.default_user())
                    assert np.isnan(got.item_vecs[0]).all() and np.isnan(got.item_vecs[2]).all()
                    np.testing.assert_array_equal(got.item_vecs[1], snap.items().embeddings[8])
                    assert sorted((f.level, f.reason, f.count) for f in got.fallbacks) == [
                        ("item", CORRUPT, 1),
                        ("item", UNKNOWN, 1),
                        ("user", CORRUPT, 1),
                    ]
                ok = store.fetch(kv, "u5", ["i8"], need_user=True)
                assert ok.fallbacks == []
                np.testing.assert_array_equal(ok.user_vec, snap.users().embeddings[5])
                assert store.describe()["corrupt_vectors"] >= 1
            finally:
                store.stop()
    text = caplog.text
    assert "the user vector of 'u4' is corrupt (12 bytes, expected 32 (dim 8))" in text
    assert "1 item vectors are missing or not 32 bytes" in text and "'i7'" in text


def test_version_with_a_corrupt_scenario_vector_is_refused(kn_root, redis_server, caplog):
    publish(kn_root / "v1", redis_server.url)
    r = redis_server.client()
    store = RedisKnowledgeStore(redis_server.url, make_space().id, poll_interval_s=0.05)
    store.start()
    try:
        # v2 is written completely, then one scenario vector is damaged before readers see it.
        from offline.knowledge.publish import _write_version

        _write_version(r, KnowledgeSnapshot(kn_root / "v2"), 8, "float32")
        r.set(K.scenario_key("v2", "home"), b"\x01" * 16)
        with caplog.at_level(logging.ERROR, logger="online.knowledge"):
            r.set(K.CURRENT, "v2")
            assert wait_for(lambda: "v2" in store.refused)
        assert "scenario 'home' vector is corrupt (16 bytes, expected 32" in store.refused["v2"]
        assert store.version_name() == "v1"
        assert "not swapping knowledge" in caplog.text and "'home'" in caplog.text
    finally:
        store.stop()
    with pytest.raises(UserFacingError, match="scenario 'home' vector is corrupt"):
        RedisKnowledgeStore(redis_server.url, make_space().id).start()


def test_version_without_id_lists_is_refused(kn_root, redis_server):
    """Published before id lists existed: the reader does not fall back to scanning, it asks for a republish."""
    publish(kn_root / "v1", redis_server.url)
    r = redis_server.client()
    meta = json.loads(r.get(K.meta_key("v1")))
    del meta[K.PUBLISHED]
    r.set(K.meta_key("v1"), json.dumps(meta))
    with pytest.raises(UserFacingError, match="without id lists .*llm4msr knowledge publish"):
        RedisKnowledgeStore(redis_server.url, make_space().id).start()
    r.set(K.meta_key("v1"), "{not json")
    with pytest.raises(UserFacingError, match="is not a manifest"):
        RedisKnowledgeStore(redis_server.url, make_space().id).start()
