"""Publishing snapshots to a real Redis: atomic flip, verification, cleanup, readers during publish, Redis dying
mid-publish."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from offline.knowledge.publish import publish_snapshot
from shared.errors import UserFacingError
from shared.knowledge import keys as K
from shared.knowledge.snapshot import (
    DEFAULT_USER_ID,
    KnowledgeSpace,
    KnowledgeTable,
    Manifest,
    write_manifest,
    write_table,
)


def make_snapshot(root: Path, version: str, users: int = 300, items: int = 100, dim: int = 8, seed: int = 0) -> Path:
    """A snapshot written through the shared writer (no LLM needed to test publishing)."""
    rng = np.random.default_rng(seed)
    vdir = root / version
    vdir.mkdir(parents=True)
    space = KnowledgeSpace(model="m", template_sha256="t", pooling="mean", mode="generate", raw_dim=dim, dim=dim)
    sizes = {"scenarios": 3, "users": users, "items": items}
    for level, n in sizes.items():
        ids = [f"{level[0]}{i}" for i in range(n)]
        responses = [f"{version} answer for {i}" if level != "items" else "" for i in ids]
        emb = rng.normal(size=(n, dim)).astype(np.float32)
        write_table(vdir / f"{level}.parquet", KnowledgeTable(ids, emb, ["h"] * n, responses))
        if level == "users":
            write_table(
                vdir / "defaults.parquet", KnowledgeTable([DEFAULT_USER_ID], emb.mean(0, keepdims=True), ["d"], [""])
            )
    write_manifest(vdir, Manifest(version, "now", space, "d", "s", sizes))
    return vdir


def test_publish_writes_every_key_then_flips(redis_server, tmp_path):
    snap = make_snapshot(tmp_path / "kn", "v1")
    r = redis_server.client()
    assert publish_snapshot(snap, redis_server.url) == "v1"
    assert r.get(K.CURRENT) == b"v1"
    vec = K.decode_vector(r.get(K.user_key("v1", "u5")))
    from shared.knowledge.snapshot import KnowledgeSnapshot

    s = KnowledgeSnapshot(snap)
    assert np.array_equal(vec, s.users().lookup(["u5"])[0][0])
    assert np.array_equal(K.decode_vector(r.get(K.default_user_key("v1"))), s.default_user())
    assert r.get(K.response_key("v1", "users", "u5")) == b"v1 answer for u5"
    assert r.get(K.response_key("v1", "scenarios", "s1")) == b"v1 answer for s1"
    assert r.get(K.response_key("v1", "items", "i1")) is None  # items have no answer
    assert json.loads(r.get(K.meta_key("v1")))["version"] == "v1"
    assert len(list(r.scan_iter(match=K.version_pattern("v1")))) == 3 + 300 + 100 + 300 + 3 + 2


def test_keeps_one_old_version(redis_server, tmp_path):
    r = redis_server.client()
    for n, v in enumerate(["v1", "v2", "v3"]):
        publish_snapshot(make_snapshot(tmp_path / "kn", v, seed=n), redis_server.url, keep_old=1)
    assert r.get(K.CURRENT) == b"v3"
    assert r.exists(K.user_key("v2", "u0")) and r.exists(K.meta_key("v2"))  # rollback target
    assert not list(r.scan_iter(match=K.version_pattern("v1")))
    assert [v.decode() for v in r.lrange(K.VERSIONS, 0, -1)] == ["v2", "v3"]
    # Republishing the current version is idempotent.
    publish_snapshot(tmp_path / "kn" / "v3", redis_server.url)
    assert r.get(K.CURRENT) == b"v3" and r.exists(K.user_key("v2", "u0"))


def test_reader_polling_during_publish_never_sees_missing_keys(redis_server, tmp_path):
    ids = [f"u{i}" for i in range(3000)]
    snaps = [make_snapshot(tmp_path / "kn", f"v{n}", users=3000, seed=n) for n in range(3)]
    publish_snapshot(snaps[0], redis_server.url)
    stop = threading.Event()
    problems: list[str] = []
    seen: set[str] = set()

    def reader() -> None:
        r = redis_server.client()
        while not stop.is_set():
            version = r.get(K.CURRENT).decode()
            seen.add(version)
            values = r.mget(
                [K.user_key(version, u) for u in ids[::7]] + [K.default_user_key(version), K.meta_key(version)]
            )
            if any(v is None for v in values):
                problems.append(f"version {version} had missing keys")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for snap in snaps[1:]:
            publish_snapshot(snap, redis_server.url, keep_old=1)
    finally:
        stop.set()
        t.join()
    assert not problems, problems[:3]
    assert {"v0", "v2"} <= seen or {"v1", "v2"} <= seen  # the reader really followed the flips


def test_redis_dying_mid_publish_keeps_old_version_and_rerun_succeeds(redis_server, tmp_path):
    import redis

    old = make_snapshot(tmp_path / "kn", "old", users=5000, seed=1)
    new = make_snapshot(tmp_path / "kn", "new", users=5000, seed=2)
    publish_snapshot(old, redis_server.url)
    admin = redis_server.client()

    class DyingClient(redis.Redis):
        """After two pipelines of the new version, persist what Redis holds and kill the server."""

        executed = 0

        def pipeline(self, *a, **kw):
            pipe = super().pipeline(*a, **kw)
            original = pipe.execute

            def execute(*ea, **ekw):
                DyingClient.executed += 1
                if DyingClient.executed == 3:
                    admin.save()  # the server comes back with exactly this state
                    redis_server.stop()
                return original(*ea, **ekw)

            pipe.execute = execute
            return pipe

    client = DyingClient.from_url(redis_server.url, socket_timeout=5)
    with pytest.raises(UserFacingError, match="current was not changed"):
        publish_snapshot(new, redis_server.url, client=client)

    redis_server.start()  # same port and dir: loads the saved state
    r = redis_server.client()
    assert r.get(K.CURRENT) == b"old"
    assert r.exists(K.user_key("new", "u0"))  # the new version was half written ...
    assert sum(r.exists(K.user_key("old", f"u{i}")) for i in range(0, 5000, 50)) == 100  # ... old stays whole

    assert publish_snapshot(new, redis_server.url) == "new"
    assert r.get(K.CURRENT) == b"new"
    assert r.exists(K.user_key("new", "u4999")) and r.exists(K.user_key("old", "u4999"))


def test_publish_of_unfinished_snapshot_is_refused(redis_server, tmp_path):
    (tmp_path / "kn" / "v9").mkdir(parents=True)
    (tmp_path / "kn" / "v9" / "users.parquet").write_text("partial")
    with pytest.raises(UserFacingError, match="no finished knowledge snapshot"):
        publish_snapshot(tmp_path / "kn", redis_server.url)
    assert redis_server.client().get(K.CURRENT) is None
