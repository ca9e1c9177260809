"""Compact knowledge vectors: the float16 and int8 codecs, the publisher's checks for them, the ranker's decoding
of every format (lengths checked against the format), and score parity with float32 over real HTTP."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from offline.knowledge.publish import publish_snapshot
from online.knowledge import CORRUPT, UNKNOWN, RedisKnowledgeStore
from shared.errors import UserFacingError
from shared.knowledge import keys as K
from shared.knowledge.snapshot import KnowledgeSnapshot, KnowledgeTable, write_table
from shared.knowledge.vector_codec import FLOAT16, FLOAT32, FORMATS, INT8, VectorCodec, VectorLengthError
from tests.fixtures_serving import build_world, make_space, rank_body, start_server, wait_until, write_snapshot

SCEN = ["books", "home"]
USERS = [f"u{i}" for i in range(30)]
ITEMS = [f"i{i}" for i in range(40)]


def llm_like(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Vectors shaped like mean-pooled LLM hidden states: a few dimensions with a large constant offset (SmolLM2's
    reach ~35 against a typical 0.4) and unequal spreads."""
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=rng.uniform(0.2, 1.5, size=dim), size=(n, dim))
    x[:, :2] += [35.0, -17.0]
    return x.astype(np.float32)


def test_stored_lengths_per_format():
    assert [VectorCodec(f, 8).nbytes for f in FORMATS] == [32, 16, 12]
    assert VectorCodec(INT8, 576).nbytes == 580 and VectorCodec(FLOAT16, 576).nbytes == 1152


def test_int8_standardizes_before_its_per_vector_scale():
    x = llm_like(500)
    spread = x.std(0)
    err = {f: np.abs(VectorCodec.fit(f, x).roundtrip(x) - x) / spread for f in FORMATS}
    assert err[FLOAT32].max() == 0
    # float16 keeps 11 significant bits of every value (an offset dimension loses more of its spread).
    f16 = VectorCodec.fit(FLOAT16, x).roundtrip(x)
    assert (np.abs(f16 - x) <= np.abs(x) * 2.0**-11 + 1e-7).all()
    # Each value is off by at most half a step of its vector's scale (in standard deviations of its dimension).
    codec = VectorCodec.fit(INT8, x)
    z_max = np.abs((x - codec.offset) / codec.spread).max(1, keepdims=True)
    assert (err[INT8] <= z_max / 127 / 2 + 1e-5).all()
    assert np.sqrt((err[INT8] ** 2).mean()) < 0.01
    # A plain absmax code (no standardization) spends its steps on the offset dimensions: far worse.
    scale = np.abs(x).max(1, keepdims=True) / 127
    naive = np.abs(np.rint(x / scale) * scale - x) / spread
    assert np.sqrt((naive**2).mean()) > 10 * np.sqrt((err[INT8] ** 2).mean())


def test_decoding_checks_the_length_of_the_format():
    x = llm_like(3, dim=8)
    for fmt, wrong in ((FLOAT16, 15), (INT8, 13), (INT8, 32)):
        codec = VectorCodec.fit(fmt, x)
        value = codec.encode(x[0])
        np.testing.assert_array_equal(codec.decode(value), codec.roundtrip(x[:1])[0])
        with pytest.raises(VectorLengthError, match=rf"{wrong} bytes, expected {codec.nbytes} \({fmt}, dim 8\)"):
            codec.decode((value * 3)[:wrong])
    codec = VectorCodec.fit(INT8, x)
    matrix, present, corrupt = codec.decode_many([codec.encode(x[1]), None, b"\x00" * 32])
    assert present.tolist() == [True, False, True] and corrupt.tolist() == [False, False, True]
    assert np.isnan(matrix[1:]).all() and np.isfinite(matrix[0]).all()


def test_codec_travels_through_the_meta_exactly():
    x = llm_like(50)
    codec = VectorCodec.fit(INT8, x)
    back = VectorCodec.from_meta(json.loads(json.dumps(codec.to_meta())), 64)
    assert back.encode_rows(x) == codec.encode_rows(x)
    np.testing.assert_array_equal(back.roundtrip(x), codec.roundtrip(x))
    with pytest.raises(UserFacingError, match="offset/spread are not 64 finite values"):
        VectorCodec.from_meta({**codec.to_meta(), "offset": [0.0] * 3}, 64)
    with pytest.raises(UserFacingError, match="unknown vector format 'int3'"):
        VectorCodec.from_meta({"format": "int3"}, 64)


def _snapshot_with(tmp_path, user_row: int, value: float):
    root = tmp_path / "kn"
    vdir = write_snapshot(root, "v1", SCEN, USERS, ITEMS, make_space(), seed=1)
    table = KnowledgeSnapshot(vdir).users()
    emb = table.embeddings.copy()
    emb[user_row, 3] = value
    write_table(vdir / "users.parquet", KnowledgeTable(table.ids, emb, table.prompt_sha256, table.responses))
    return vdir


@pytest.mark.parametrize(("fmt", "value", "why"), [(FLOAT16, 1e5, "beyond"), (INT8, np.nan, "not finite")])
def test_a_vector_the_format_cannot_hold_is_refused_before_redis(redis_server, tmp_path, fmt, value, why):
    vdir = _snapshot_with(tmp_path, 7, value)
    with pytest.raises(UserFacingError) as err:
        publish_snapshot(vdir, redis_server.url, vector_format=fmt)
    msg = str(err.value)
    assert f"user vector of id 'u7' cannot be stored as {fmt}" in msg and why in msg and "\n" not in msg, msg
    assert "nothing was published" in msg and redis_server.client().dbsize() == 0


def test_store_decodes_each_format_and_counts_corrupt_lengths(redis_server, tmp_path):
    root = tmp_path / "kn"
    snap = KnowledgeSnapshot(write_snapshot(root, "v1", SCEN, USERS, ITEMS, make_space(), seed=1))
    r = redis_server.client()
    for fmt in FORMATS:
        publish_snapshot(snap.path, redis_server.url, vector_format=fmt)
        store = RedisKnowledgeStore(redis_server.url, make_space().id, item_preload_limit=0)
        store.start()
        try:
            kv = store.current()
            codecs = kv.codecs
            assert {c.format for c in codecs.values()} == {fmt}
            np.testing.assert_array_equal(
                kv.scenarios["home"], codecs["scenario"].roundtrip(snap.scenarios().embeddings)[1]
            )
            got = store.fetch(kv, "u5", ["i3", "nope"], need_user=True)
            np.testing.assert_array_equal(got.user_vec, codecs["user"].roundtrip(snap.users().embeddings)[5])
            np.testing.assert_array_equal(got.item_vecs[0], codecs["item"].roundtrip(snap.items().embeddings)[3])
            assert [(f.level, f.reason) for f in got.fallbacks] == [("item", UNKNOWN)]
            # A float32-length value in a compact version (and the reverse) is corrupt, not misread.
            wrong = b"\x00" * (12 if fmt == FLOAT32 else 32)
            r.set(K.user_key("v1", "u6"), wrong)
            r.set(K.item_key("v1", "i4"), wrong)
            bad = store.fetch(kv, "u6", ["i4"], need_user=True)
            assert sorted((f.level, f.reason) for f in bad.fallbacks) == [("item", CORRUPT), ("user", CORRUPT)]
            np.testing.assert_array_equal(bad.user_vec, kv.default_user)
            assert np.isnan(bad.item_vecs[0]).all()
        finally:
            store.stop()
        r.flushall()


# ------------------------------------------------------------------------------------------- score parity


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("serving-compact"), variants=("llm4msr-item",))


def test_compact_scores_match_float32_over_http(world, redis_server, tmp_path):
    """The same vectors published as float32, float16 and int8 (three versions of one space): every score of the
    served model stays within 1e-3 of its float32 score, and the compact ones really were used."""
    versions = {}
    for fmt in FORMATS:
        path = write_snapshot(
            world.knowledge_root,
            f"parity-{fmt}",
            world.scenarios,
            world.users,
            world.items[:-1],
            make_space(),
            seed=11,  # build_world's seed: the model's own knowledge
            split_fingerprint=world.split.fingerprint(),
        )
        versions[fmt] = path
    publish_snapshot(versions[FLOAT32], redis_server.url, vector_format=FLOAT32)
    srv = start_server(
        ["--artifact", str(world.artifacts["llm4msr-item"]), "--redis-url", redis_server.url],
        tmp_path / "server.log",
        env={"LLM4MSR_POLL_INTERVAL_S": "0.1"},
    )
    n = len(world.items)
    bodies = [
        rank_body(u, world.scenarios[i % len(world.scenarios)], world.items, n) for i, u in enumerate(world.users)
    ]
    scores = {}
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as client:
            for fmt in FORMATS:
                if fmt != FLOAT32:
                    publish_snapshot(versions[fmt], redis_server.url, vector_format=fmt)
                assert wait_until(
                    lambda v=f"parity-{fmt}": client.post("/rank", json=bodies[0]).json()["knowledge_version"] == v,
                    timeout=10,
                )
                answers = [client.post("/rank", json=b).json() for b in bodies]
                assert {len(a["items"]) for a in answers} == {n}  # every candidate, so the same ones are compared
                assert {a["knowledge_version"] for a in answers} == {f"parity-{fmt}"}
                scores[fmt] = np.array(
                    [[it["score"] for it in sorted(a["items"], key=lambda it: it["item_id"])] for a in answers]
                )
    finally:
        srv.stop()
    for fmt in (FLOAT16, INT8):
        diff = np.abs(scores[fmt] - scores[FLOAT32])
        assert diff.max() <= 1e-3, (fmt, diff.max())
        assert diff.max() > 0, fmt  # decoded from the compact values, not the float32 ones
