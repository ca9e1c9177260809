"""Publishing snapshots to a real Redis: atomic flip, verification, cleanup, readers during publish, Redis dying
mid-publish, in every vector format (the default one unless a test is about float32 byte lengths)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from offline.knowledge.publish import publish_snapshot
from shared.errors import UserFacingError
from shared.knowledge import keys as K
from shared.knowledge.levels import LEVELS
from shared.knowledge.snapshot import (
    DEFAULT_USER_ID,
    KnowledgeSpace,
    KnowledgeTable,
    Manifest,
    write_manifest,
    write_table,
)
from shared.knowledge.vector_codec import DEFAULT_FORMAT, FLOAT32, FORMATS, VectorCodec, published_codecs


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


def codecs_in_redis(r, version: str) -> dict[str, VectorCodec]:
    """Each level's codec as readers see it: from the version's meta in Redis."""
    meta = json.loads(r.get(K.meta_key(version)))
    return published_codecs(meta[K.PUBLISHED], meta["space"]["dim"])


@pytest.mark.parametrize("vector_format", FORMATS)
def test_publish_writes_every_key_then_flips(redis_server, tmp_path, vector_format):
    from shared.knowledge.snapshot import KnowledgeSnapshot

    snap = make_snapshot(tmp_path / "kn", "v1")
    r = redis_server.client()
    assert publish_snapshot(snap, redis_server.url, vector_format=vector_format) == "v1"
    assert r.get(K.CURRENT) == b"v1"
    meta = json.loads(r.get(K.meta_key("v1")))
    assert meta[K.PUBLISHED]["vector_format"] == vector_format
    codecs = codecs_in_redis(r, "v1")
    s = KnowledgeSnapshot(snap)
    vec = codecs["user"].decode(r.get(K.user_key("v1", "u5")))
    row = s.users().lookup(["u5"])[0]
    assert np.array_equal(vec, codecs["user"].roundtrip(row)[0])
    if vector_format == FLOAT32:
        assert np.array_equal(vec, row[0]) and np.array_equal(K.decode_vector(r.get(K.user_key("v1", "u5"))), row[0])
    else:
        assert not np.array_equal(vec, row[0]) and np.allclose(vec, row[0], atol=0.05)
    default = codecs["user"].decode(r.get(K.default_user_key("v1")))
    assert np.array_equal(default, codecs["user"].roundtrip(s.default_user())[0])
    assert r.get(K.response_key("v1", "user", "u5")) == b"v1 answer for u5"
    assert r.get(K.response_key("v1", "scenario", "s1")) == b"v1 answer for s1"
    assert r.get(K.response_key("v1", "item", "i1")) is None  # items have no answer
    assert meta["version"] == "v1"
    assert meta[K.PUBLISHED]["counts"] == {"scenarios": 3, "users": 300, "items": 100}
    assert meta[K.PUBLISHED]["id_chunks"] == {"scenarios": 1, "users": 1, "items": 1} and meta[K.PUBLISHED]["dim"] == 8
    assert json.loads(r.get(K.ids_key("v1", "user", 0))) == s.users().ids
    # vectors + answers (users, scenarios) + id lists (3 levels) + default user + meta
    assert len(list(r.scan_iter(match=K.version_pattern("v1")))) == 3 + 300 + 100 + 300 + 3 + 3 + 2
    assert {r.strlen(K.user_key("v1", f"u{i}")) for i in range(300)} == {codecs["user"].nbytes}


def test_default_format_is_int8_and_refresh_uses_it(redis_server, tmp_path):
    """The refresh job calls publish_snapshot(path, url, keep_old=...): what it gets is the measured default."""
    publish_snapshot(make_snapshot(tmp_path / "kn", "v1"), redis_server.url, keep_old=1)
    assert DEFAULT_FORMAT == "int8"
    assert codecs_in_redis(redis_server.client(), "v1")["user"].format == DEFAULT_FORMAT


def test_unknown_vector_format_is_refused_before_redis(redis_server, tmp_path):
    with pytest.raises(UserFacingError, match="unknown vector format 'int4'; choose one of float32, float16, int8"):
        publish_snapshot(make_snapshot(tmp_path / "kn", "v1"), redis_server.url, vector_format="int4")
    assert redis_server.client().dbsize() == 0


def test_keeps_one_old_version(redis_server, tmp_path):
    r = redis_server.client()
    for n, v in enumerate(["v1", "v2", "v3"]):
        publish_snapshot(make_snapshot(tmp_path / "kn", v, seed=n), redis_server.url, keep_old=1)
    assert r.get(K.CURRENT) == b"v3"
    assert r.exists(K.user_key("v2", "u0")) and r.exists(K.meta_key("v2"))  # rollback target
    assert not list(r.scan_iter(match=K.version_pattern("v1")))  # id lists included
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


# ------------------------------------------------------------------------------- vector lengths, id lists, names


def rewrite_embeddings(path: Path, short_rows: dict[int, int] | None = None, dim: int | None = None) -> None:
    """Rewrites a level's Parquet file as a corrupt build would leave it: some rows with `short_rows[row]` values
    (a variable-length list column), or every row with `dim` values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    rows = table.column("embedding").to_pylist()
    if dim is not None:
        rows = [r[:dim] for r in rows]
        emb = pa.FixedSizeListArray.from_arrays(pa.array([x for r in rows for x in r], pa.float32()), dim)
    else:
        rows = [r[: short_rows[i]] if i in (short_rows or {}) else r for i, r in enumerate(rows)]
        emb = pa.array(rows, type=pa.list_(pa.float32()))
    pq.write_table(table.set_column(table.schema.get_field_index("embedding"), "embedding", emb), path)


def assert_version_intact(r, snap_dir: Path) -> None:
    """Every vector of the version is in Redis with exactly its snapshot bytes."""
    from shared.knowledge.snapshot import KnowledgeSnapshot

    s = KnowledgeSnapshot(snap_dir)
    codecs = codecs_in_redis(r, s.version)
    for level in LEVELS:
        t = s.table(level)
        values = r.mget([K.vector_key(s.version, level, i) for i in t.ids])
        assert values == codecs[level].encode_rows(t.embeddings), level
    assert r.get(K.default_user_key(s.version)) == codecs["user"].encode(s.default_user())


def test_snapshot_with_short_vectors_fails_before_the_flip(redis_server, tmp_path):
    r = redis_server.client()
    v1 = make_snapshot(tmp_path / "kn", "v1", seed=1)
    publish_snapshot(v1, redis_server.url)
    v2 = make_snapshot(tmp_path / "kn", "v2", seed=2)
    rewrite_embeddings(v2 / "users.parquet", short_rows={7: 6, 40: 3})
    with pytest.raises(UserFacingError) as err:
        publish_snapshot(v2, redis_server.url)
    msg = str(err.value)
    assert "user vector of id 'u7' has 6 values" in msg and "dim is 8" in msg and "2 of 300" in msg, msg
    assert "\n" not in msg
    assert r.get(K.CURRENT) == b"v1"
    assert not list(r.scan_iter(match=K.version_pattern("v2")))  # refused before Redis was touched
    assert_version_intact(r, v1)

    # A whole level stored with another dim than the manifest's is refused the same way.
    v3 = make_snapshot(tmp_path / "kn", "v3", seed=3)
    rewrite_embeddings(v3 / "items.parquet", dim=6)
    with pytest.raises(UserFacingError, match=r"item vector of id 'i0' has 6 values .*100 of 100 item vectors"):
        publish_snapshot(v3, redis_server.url)
    assert r.get(K.CURRENT) == b"v1"
    assert_version_intact(r, v1)


def test_verification_reads_every_vector_length_back(redis_server, tmp_path):
    """A vector that reaches Redis with the wrong length (another writer, a partial write) fails the
    verification, wherever it is (not only in a sample), naming the level and the id."""
    from offline.knowledge.publish import _verify, _write_version
    from shared.knowledge.snapshot import KnowledgeSnapshot

    r = redis_server.client()
    snap = KnowledgeSnapshot(make_snapshot(tmp_path / "kn", "v1", users=3000))
    _write_version(r, snap, 8, FLOAT32)
    _verify(r, snap, 8)  # as written: passes
    rows = np.random.default_rng(0).choice(3000, size=64, replace=False)  # the sample _verify compares
    victim = next(f"u{j}" for j in range(2999, 0, -1) if j not in set(rows.tolist()))
    good = r.get(K.user_key("v1", victim))
    r.set(K.user_key("v1", victim), good[:12])
    with pytest.raises(UserFacingError, match=rf"user '{victim}' has 12 bytes in Redis, expected 32"):
        _verify(r, snap, 8)
    r.set(K.user_key("v1", victim), good)
    r.delete(K.item_key("v1", "i99"))
    with pytest.raises(UserFacingError, match="item 'i99' is missing"):
        _verify(r, snap, 8)
    r.set(K.item_key("v1", "i99"), K.encode_vector(snap.items().embeddings[99]))
    r.set(K.ids_key("v1", "scenario", 0), json.dumps(["s0", "s1"]))
    with pytest.raises(UserFacingError, match="scenario id list in Redis differs"):
        _verify(r, snap, 8)

    # In a compact format the expected length is the format's: int8 = 4-byte scale + 8 codes.
    _write_version(r, snap, 8, "int8")
    _verify(r, snap, 8)
    r.set(K.user_key("v1", victim), r.get(K.user_key("v1", victim))[:8])
    with pytest.raises(UserFacingError, match=rf"user '{victim}' has 8 bytes in Redis, expected 12 \(int8, dim 8\)"):
        _verify(r, snap, 8)


@pytest.mark.parametrize("bad", ["v*", "v?", "[v]1", "a:b", "-v1", ".v1", "", "v 1", "v1\n", "x" * 129])
def test_invalid_version_name_is_refused_before_redis(redis_server, tmp_path, bad):
    vdir = make_snapshot(tmp_path / "kn", "ok")
    manifest = json.loads((vdir / "manifest.json").read_text())
    manifest["version"] = bad
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserFacingError, match="invalid knowledge version"):
        publish_snapshot(vdir, redis_server.url)
    assert redis_server.client().dbsize() == 0


def test_cleanup_never_deletes_by_a_glob_from_the_versions_list(redis_server, tmp_path):
    """A name with glob characters in llm4msr:kn:versions (written by something else) is dropped from the list;
    used as a SCAN pattern it would have deleted the current version's keys."""
    r = redis_server.client()
    v1 = make_snapshot(tmp_path / "kn", "v1", seed=1)
    v2 = make_snapshot(tmp_path / "kn", "v2", seed=2)
    publish_snapshot(v1, redis_server.url)
    r.rpush(K.VERSIONS, "*")
    publish_snapshot(v2, redis_server.url, keep_old=0)
    assert r.get(K.CURRENT) == b"v2"
    assert_version_intact(r, v2)
    assert not list(r.scan_iter(match=K.version_pattern("v1")))
    assert [v.decode() for v in r.lrange(K.VERSIONS, 0, -1)] == ["v2"]


def test_id_lists_are_chunked_and_the_reader_never_scans(redis_server, tmp_path, monkeypatch):
    from online.knowledge import RedisKnowledgeStore
    from shared.knowledge.snapshot import KnowledgeSnapshot

    monkeypatch.setattr(K, "ID_CHUNK", 64)  # 300 users -> 5 keys, 100 items -> 2 keys
    snap = make_snapshot(tmp_path / "kn", "v1")
    publish_snapshot(snap, redis_server.url)
    r = redis_server.client()
    meta = json.loads(r.get(K.meta_key("v1")))[K.PUBLISHED]
    assert meta["id_chunks"] == {"scenarios": 1, "users": 5, "items": 2} and meta["id_chunk_size"] == 64
    assert [len(json.loads(r.get(K.ids_key("v1", "user", c)))) for c in range(5)] == [64, 64, 64, 64, 44]

    r.config_resetstat()
    for limit, complete in ((1000, True), (70, False)):
        store = RedisKnowledgeStore(redis_server.url, None, item_preload_limit=limit)
        try:
            kv = store.load("v1")
        finally:
            store.stop()
        expected = KnowledgeSnapshot(snap).items()
        assert kv.items.ids == expected.ids[:limit] and kv.items_complete is complete
        stored = codecs_in_redis(r, "v1")["item"].roundtrip(expected.embeddings[:limit])
        np.testing.assert_array_equal(kv.items.matrix, stored)
        assert sorted(kv.scenarios) == ["s0", "s1", "s2"]
    stats = r.info("commandstats")
    assert "cmdstat_scan" not in stats and stats["cmdstat_mget"]["calls"] >= 2


def test_reading_a_ragged_embedding_column_names_the_file_and_id(tmp_path):
    """Training and serving read snapshots without the publisher's checks: a ragged column is one clear error."""
    from shared.knowledge.snapshot import read_table

    v = make_snapshot(tmp_path / "kn", "v1", users=20)
    rewrite_embeddings(v / "users.parquet", short_rows={5: 7})
    with pytest.raises(UserFacingError, match=r"users.parquet: the embedding of id 'u5' \(row 6\) has 7 values"):
        read_table(v / "users.parquet")
    rewrite_embeddings(v / "items.parquet", short_rows={})  # a variable-length column whose rows all agree
    assert read_table(v / "items.parquet").embeddings.shape == (100, 8)
