"""Publishing a snapshot version to Redis, one primary or a Redis Cluster (docs/architecture.md, Redis keys; key
layout in shared/knowledge/keys.py, cluster URLs in shared/knowledge/redis_conn.py).

Order matters for readers that follow `llm4msr:kn:current`:
  0. the snapshot is checked before Redis is touched: a safe version name, every level's vectors of exactly the
     manifest's dim (a wrong row fails here, naming the level and the id), and every vector representable in the
     chosen vector format (shared/knowledge/vector_codec.py);
  1. every vector (in that format), answer text, the per-level id lists, the default user vector and the manifest
     (with the published counts, the format and its codec parameters) are written (pipelined, no TTL; on a cluster
     the pipeline is split per node, the keys spread over all slots);
  2. they are read back: the byte length of EVERY vector (STRLEN; a missing key reads 0) against the format,
     every answer's existence, the id lists in full, and a sample of vectors bit for bit;
  3. ONE `SET llm4msr:kn:current <version>` flips readers;
  4. versions older than the newest `keep_old` previous ones are deleted, node by node.
A failure before step 3 leaves `current` untouched; a rerun rewrites the same keys and completes.
Errors name the Redis URL only with its password masked (shared/redact.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator

import numpy as np

from shared.errors import UserFacingError
from shared.knowledge import keys as K
from shared.knowledge.levels import LEVELS, table_name
from shared.knowledge.redis_conn import KnowledgeRedis, connect, redis_errors
from shared.knowledge.snapshot import DEFAULT_USER_ID, DEFAULTS, KnowledgeSnapshot
from shared.knowledge.vector_codec import DEFAULT_FORMAT, FLOAT32, VectorCodec, check_format, published_codecs
from shared.redact import redact_text, redact_url

log = logging.getLogger(__name__)

CHUNK = 2000
# Rows per write on a cluster: keys spread over 16,384 slots, so larger batches put several keys in one MSET per slot.
CLUSTER_CHUNK = 50_000


def _chunks(n: int, size: int = CHUNK) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _decode(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _check_vector_lengths(snap: KnowledgeSnapshot) -> int:
    """Every level's vectors have the manifest's dim, checked on the Parquet files before anything is published
    (a level stored with another dim, or rows of other lengths, would otherwise reach Redis); returns the dim."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    dim = int(snap.manifest.space.dim)
    for level in (*LEVELS, DEFAULTS):
        path = snap.path / f"{level if level == DEFAULTS else table_name(level)}.parquet"
        if not path.exists():
            continue  # snap.table() names the missing file when it is needed
        emb_type = pq.read_schema(path).field("embedding").type
        if getattr(emb_type, "list_size", None) == dim:
            continue
        table = pq.read_table(path, columns=["id", "embedding"])
        emb = table.column("embedding").combine_chunks()
        try:
            lengths = pc.list_value_length(emb).to_numpy(zero_copy_only=False)
        except Exception as exc:  # noqa: BLE001 - any non-list type is the same user-facing problem
            raise UserFacingError(
                f"snapshot {path}: column 'embedding' is {emb_type}, expected a list of {dim} float32; nothing was "
                "published"
            ) from exc
        lengths = np.where(np.isnan(lengths.astype(np.float64)), -1, lengths).astype(np.int64)
        bad = np.flatnonzero(lengths != dim)
        what = "the user default" if level == DEFAULTS else level
        if len(bad):
            first = int(bad[0])
            id_ = table.column("id")[first].as_py()
            shown = id_ if level != DEFAULTS else DEFAULT_USER_ID
            raise UserFacingError(
                f"snapshot {path}: {what} vector of id {shown!r} has {max(int(lengths[first]), 0)} values but the "
                f"manifest's dim is {dim} ({len(bad)} of {len(lengths)} {level} vectors have a wrong length); "
                "rebuild the snapshot; nothing was published"
            )
        raise UserFacingError(
            f"snapshot {path}: column 'embedding' is {emb_type}, expected fixed_size_list<float>[{dim}]; "
            "rebuild the snapshot; nothing was published"
        )
    return dim


def _fit_codecs(snap: KnowledgeSnapshot, dim: int, vector_format: str) -> dict[str, VectorCodec]:
    """Each level's codec, after checking that the format can hold every vector (float32 holds anything)."""
    codecs = {}
    for level in LEVELS:
        vectors = snap.table(level).embeddings.reshape(-1, dim)
        if vector_format != FLOAT32:
            _refuse_unrepresentable(snap, level, vectors, VectorCodec(vector_format, dim))
        codecs[level] = VectorCodec.fit(vector_format, vectors)
    if vector_format != FLOAT32:
        default = snap.default_user().reshape(1, dim)
        _refuse_unrepresentable(snap, DEFAULTS, default, VectorCodec(vector_format, dim))
    return codecs


def _refuse_unrepresentable(snap: KnowledgeSnapshot, level: str, vectors: np.ndarray, codec: VectorCodec) -> None:
    bad = codec.unrepresentable(vectors)
    if not len(bad):
        return
    what = "the user default" if level == DEFAULTS else level
    id_ = DEFAULT_USER_ID if level == DEFAULTS else snap.table(level).ids[int(bad[0])]
    raise UserFacingError(
        f"snapshot {snap.path}: {what} vector of id {id_!r} cannot be stored as {codec.format} (a value that is not "
        f"finite{' or beyond +-65504' if codec.format == 'float16' else ''}; {len(bad)} such {what} vectors); "
        "publish with another --vector-format or rebuild the snapshot; nothing was published"
    )


def _published_info(snap: KnowledgeSnapshot, dim: int, codecs: dict[str, VectorCodec]) -> dict:
    """What the meta key records next to the manifest: readers size and find the id lists, and decode the vectors,
    with it."""
    counts = {table_name(level): len(snap.table(level).ids) for level in LEVELS}  # stored names
    return {
        "counts": counts,
        "id_chunks": {name: K.id_chunks(n) for name, n in counts.items()},
        "id_chunk_size": K.ID_CHUNK,
        "dim": dim,
        "vector_format": codecs["user"].format,
        "codecs": {table_name(level): codec.to_meta() for level, codec in codecs.items()},
    }


def _as_store(r) -> KnowledgeRedis:
    return r if isinstance(r, KnowledgeRedis) else connect("", client=r)


def _write_version(
    r,
    snap: KnowledgeSnapshot,
    dim: int,
    vector_format: str = DEFAULT_FORMAT,
    codecs: dict[str, VectorCodec] | None = None,
) -> dict[str, int]:
    """Writes all keys of the version; returns the number of keys per kind (what verification expects)."""
    store = _as_store(r)
    version = snap.version
    codecs = codecs if codecs is not None else _fit_codecs(snap, dim, vector_format)
    chunk = CLUSTER_CHUNK if store.cluster else CHUNK
    written: dict[str, int] = {}
    for level in LEVELS:
        table = snap.table(level)
        n_resp = 0
        for sl in _chunks(len(table.ids), chunk):
            names = [K.vector_key(version, level, id_) for id_ in table.ids[sl]]
            values = codecs[level].encode_rows(table.embeddings[sl])
            for j in range(sl.start, sl.stop):
                if table.responses[j]:
                    names.append(K.response_key(version, level, table.ids[j]))
                    values.append(table.responses[j].encode())
                    n_resp += 1
            store.set_many(names, values)
        written[level] = len(table.ids)
        written[f"{level}_responses"] = n_resp
    info = _published_info(snap, dim, codecs)
    names, values = [K.default_user_key(version)], [codecs["user"].encode(snap.default_user())]
    for level in LEVELS:
        ids = snap.table(level).ids
        for c in range(info["id_chunks"][table_name(level)]):
            names.append(K.ids_key(version, level, c))
            values.append(json.dumps(ids[c * K.ID_CHUNK : (c + 1) * K.ID_CHUNK]).encode())
    store.set_many(names, values)
    # The manifest last: a version without its meta key does not exist for readers.
    store.client.set(K.meta_key(version), json.dumps({**snap.manifest.to_dict(), K.PUBLISHED: info}, sort_keys=True))
    return written


def _verify_lengths(store: KnowledgeRedis, version: str, level: str, ids: list[str], codec: VectorCodec) -> None:
    """STRLEN of every vector key: a missing key reads 0, a wrong length is a corrupt write."""
    expected = codec.nbytes
    for sl in _chunks(len(ids)):
        lengths = store.strlen_many([K.vector_key(version, level, id_) for id_ in ids[sl]])
        for id_, n in zip(ids[sl], lengths, strict=True):
            if n == 0:
                raise UserFacingError(f"publish verification failed: {level} {id_!r} is missing in Redis")
            if n != expected:
                fmt = "" if codec.format == FLOAT32 else f"{codec.format}, "
                raise UserFacingError(
                    f"publish verification failed: {level} {id_!r} has {n} bytes in Redis, expected {expected} "
                    f"({fmt}dim {codec.dim})"
                )


def _verified_codecs(store: KnowledgeRedis, snap: KnowledgeSnapshot, dim: int) -> dict[str, VectorCodec]:
    """The codecs as readers will see them: from the meta key just written (which must be there)."""
    raw = store.client.get(K.meta_key(snap.version))
    if raw is None:
        raise UserFacingError("publish verification failed: default user vector or manifest missing or corrupt")
    try:
        return published_codecs(json.loads(raw)[K.PUBLISHED], dim)
    except (ValueError, KeyError, TypeError, UserFacingError) as exc:
        raise UserFacingError(f"publish verification failed: the manifest in Redis is unreadable ({exc})") from None


def _verify(r, snap: KnowledgeSnapshot, dim: int, sample: int = 64) -> None:
    """Reads the version back: every vector's length, every answer, the id lists, a sample bit for bit."""
    store = _as_store(r)
    version = snap.version
    codecs = _verified_codecs(store, snap, dim)
    id_chunks = _published_info(snap, dim, codecs)["id_chunks"]
    for level in LEVELS:
        table = snap.table(level)
        _verify_lengths(store, version, level, table.ids, codecs[level])
        resp_ids = [i for i, t in zip(table.ids, table.responses, strict=True) if t]
        found = sum(
            store.exists_count([K.response_key(version, level, i) for i in resp_ids[sl]])
            for sl in _chunks(len(resp_ids))
        )
        if found != len(resp_ids):
            raise UserFacingError(f"publish verification failed: {found}/{len(resp_ids)} {level} answers present")
        chunks = store.get_many([K.ids_key(version, level, c) for c in range(id_chunks[table_name(level)])])
        listed = [id_ for raw in chunks for id_ in (json.loads(raw) if raw is not None else [None])]
        if listed != table.ids:
            raise UserFacingError(
                f"publish verification failed: the {level} id list in Redis differs from the snapshot"
            )
        if not table.ids:
            continue
        rng = np.random.default_rng(0)
        rows = rng.choice(len(table.ids), size=min(sample, len(table.ids)), replace=False)
        values = store.get_many([K.vector_key(version, level, table.ids[j]) for j in rows])
        expected = codecs[level].encode_rows(table.embeddings[rows])
        for j, value, want in zip(rows, values, expected, strict=True):
            if value != want:
                raise UserFacingError(f"publish verification failed: {level} {table.ids[j]!r} differs in Redis")
    if store.client.strlen(K.default_user_key(version)) != codecs["user"].nbytes:
        raise UserFacingError("publish verification failed: default user vector or manifest missing or corrupt")


def delete_version(r, version: str) -> int:
    """Removes every key of a version, node by node (SCAN + UNLINK in batches on each primary); returns how many."""
    store = _as_store(r)
    pattern = K.version_pattern(version)
    n = 0
    for _, node in store.primaries():
        batch: list[bytes] = []
        for key in store.scan_node(node, pattern):
            batch.append(key)
            if len(batch) >= CHUNK:
                n += store.unlink_on_node(node, batch)
                batch = []
        n += store.unlink_on_node(node, batch)
    return n


def _cleanup(store: KnowledgeRedis, current: str, keep_old: int) -> list[str]:
    """Keeps `current` and the newest keep_old other published versions; deletes the rest.

    A name in the versions list that is not a valid version (written by something else) is dropped from the list
    without deleting anything: as a SCAN pattern it could match other versions' keys."""
    r = store.client
    versions = [_decode(v) for v in r.lrange(K.VERSIONS, 0, -1)]
    others = [v for v in versions if v != current]
    keep = set(others[-keep_old:]) if keep_old > 0 else set()
    removed = []
    for v in others:
        if v in keep:
            continue
        try:
            K.validate_version(v)
        except UserFacingError as exc:
            log.error("not deleting keys of %s listed in %s: %s", v[:80], K.VERSIONS, exc)
            r.lrem(K.VERSIONS, 0, v)
            continue
        delete_version(store, v)
        r.lrem(K.VERSIONS, 0, v)
        removed.append(v)
    return removed


def publish_snapshot(
    snapshot_path: str | os.PathLike,
    redis_url: str,
    keep_old: int = 1,
    client=None,
    vector_format: str = DEFAULT_FORMAT,
) -> str:
    """Publishes a snapshot version and flips `current` to it; returns the version.

    `redis_url` names one primary or a cluster (redis+cluster://host:port, or ?cluster=true); `client`, a
    redis-py client someone built, replaces the URL's connection. `vector_format` is how vectors are stored."""
    snap = KnowledgeSnapshot(snapshot_path)
    try:
        version = K.validate_version(snap.version)
    except UserFacingError as exc:
        raise UserFacingError(f"snapshot {snap.path}: {exc}; nothing was published") from None
    vector_format = check_format(vector_format)
    dim = _check_vector_lengths(snap)
    codecs = _fit_codecs(snap, dim, vector_format)  # refuses a vector the format cannot hold: Redis is not touched
    where = redact_url(redis_url)
    store = connect(redis_url, client=client)
    flipped = False
    started = time.perf_counter()
    try:
        previous = store.client.get(K.CURRENT)
        written = _write_version(store, snap, dim, vector_format, codecs)
        _verify(store, snap, dim)
        # The one atomic step readers observe.
        store.client.set(K.CURRENT, version)
        flipped = True
        store.client.lrem(K.VERSIONS, 0, version)
        store.client.rpush(K.VERSIONS, version)
        removed = _cleanup(store, version, keep_old)
    except redis_errors() as exc:
        state = (
            "llm4msr:kn:current already points at it; the rerun completes the cleanup of old versions"
            if flipped
            else "llm4msr:kn:current was not changed"
        )
        raise UserFacingError(
            f"publishing knowledge {version} to {where} failed ({redact_text(exc, redis_url)}); {state}; "
            "rerun the publish to complete it"
        ) from exc
    finally:
        if client is None:
            store.close()
    log.info(
        "published knowledge %s (previous %s) as %s%s in %.1f s: %s; removed old versions %s",
        version,
        _decode(previous)[:80] if previous else None,
        vector_format,
        " to a cluster" if store.cluster else "",
        time.perf_counter() - started,
        written,
        removed,
    )
    return version
