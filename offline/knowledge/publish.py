"""Publishing a snapshot version to Redis (DESIGN section 5; key layout in shared/knowledge/keys.py).

Order matters for readers that follow `llm4msr:kn:current`:
  0. the snapshot is checked before Redis is touched: a safe version name, and every level's vectors of exactly
     the manifest's dim (a wrong row fails here, naming the level and the id);
  1. every vector, answer text, the per-level id lists, the default user vector and the manifest (with the
     published counts) of the new version are written (pipelined, no TTL);
  2. they are read back: the byte length of EVERY vector (STRLEN; a missing key reads 0), every answer's
     existence, the id lists in full, and a sample of vectors bit for bit;
  3. ONE `SET llm4msr:kn:current <version>` flips readers;
  4. versions older than the newest `keep_old` previous ones are deleted.
A failure before step 3 leaves `current` untouched; a rerun rewrites the same keys and completes.
Errors name the Redis URL only with its password masked (shared/redact.py).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import numpy as np

from shared.errors import UserFacingError
from shared.knowledge import keys as K
from shared.knowledge.levels import LEVELS, table_name
from shared.knowledge.snapshot import DEFAULT_USER_ID, DEFAULTS, KnowledgeSnapshot
from shared.redact import redact_text, redact_url

log = logging.getLogger(__name__)

CHUNK = 2000


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


def _published_info(snap: KnowledgeSnapshot, dim: int) -> dict:
    """What the meta key records next to the manifest: readers size and find the id lists with it."""
    counts = {table_name(level): len(snap.table(level).ids) for level in LEVELS}  # stored names
    return {
        "counts": counts,
        "id_chunks": {name: K.id_chunks(n) for name, n in counts.items()},
        "id_chunk_size": K.ID_CHUNK,
        "dim": dim,
    }


def _write_version(r, snap: KnowledgeSnapshot, dim: int) -> dict[str, int]:
    """Writes all keys of the version; returns the number of keys per kind (what verification expects)."""
    version = snap.version
    written: dict[str, int] = {}
    for level in LEVELS:
        table = snap.table(level)
        n_resp = 0
        for sl in _chunks(len(table.ids)):
            pipe = r.pipeline(transaction=False)
            for j in range(sl.start, sl.stop):
                id_ = table.ids[j]
                pipe.set(K.vector_key(version, level, id_), K.encode_vector(table.embeddings[j]))
                if table.responses[j]:
                    pipe.set(K.response_key(version, level, id_), table.responses[j].encode())
                    n_resp += 1
            pipe.execute()
        written[level] = len(table.ids)
        written[f"{level}_responses"] = n_resp
    info = _published_info(snap, dim)
    pipe = r.pipeline(transaction=False)
    for level in LEVELS:
        ids = snap.table(level).ids
        for c in range(info["id_chunks"][table_name(level)]):
            pipe.set(K.ids_key(version, level, c), json.dumps(ids[c * K.ID_CHUNK : (c + 1) * K.ID_CHUNK]))
    pipe.set(K.default_user_key(version), K.encode_vector(snap.default_user()))
    # The manifest last: a version without its meta key does not exist for readers.
    pipe.set(K.meta_key(version), json.dumps({**snap.manifest.to_dict(), K.PUBLISHED: info}, sort_keys=True))
    pipe.execute()
    return written


def _verify_lengths(r, version: str, level: str, ids: list[str], dim: int) -> None:
    """STRLEN of every vector key: a missing key reads 0, a wrong length is a corrupt write."""
    expected = K.vector_bytes(dim)
    for sl in _chunks(len(ids)):
        pipe = r.pipeline(transaction=False)
        for id_ in ids[sl]:
            pipe.strlen(K.vector_key(version, level, id_))
        for id_, n in zip(ids[sl], pipe.execute(), strict=True):
            if n == 0:
                raise UserFacingError(f"publish verification failed: {level} {id_!r} is missing in Redis")
            if n != expected:
                raise UserFacingError(
                    f"publish verification failed: {level} {id_!r} has {n} bytes in Redis, expected {expected} "
                    f"(dim {dim})"
                )


def _verify(r, snap: KnowledgeSnapshot, dim: int, sample: int = 64) -> None:
    """Reads the version back: every vector's length, every answer, the id lists, a sample bit for bit."""
    version = snap.version
    info = _published_info(snap, dim)
    for level in LEVELS:
        table = snap.table(level)
        _verify_lengths(r, version, level, table.ids, dim)
        resp_ids = [i for i, t in zip(table.ids, table.responses, strict=True) if t]
        if resp_ids:
            found = sum(
                int(r.exists(*[K.response_key(version, level, i) for i in resp_ids[sl]]))
                for sl in _chunks(len(resp_ids))
            )
            if found != len(resp_ids):
                raise UserFacingError(f"publish verification failed: {found}/{len(resp_ids)} {level} answers present")
        chunks = r.mget([K.ids_key(version, level, c) for c in range(info["id_chunks"][table_name(level)])])
        listed = [id_ for raw in chunks for id_ in (json.loads(raw) if raw is not None else [None])]
        if listed != table.ids:
            raise UserFacingError(
                f"publish verification failed: the {level} id list in Redis differs from the snapshot"
            )
        if not table.ids:
            continue
        rng = np.random.default_rng(0)
        rows = rng.choice(len(table.ids), size=min(sample, len(table.ids)), replace=False)
        values = r.mget([K.vector_key(version, level, table.ids[j]) for j in rows])
        for j, value in zip(rows, values, strict=True):
            if value is None or not np.array_equal(K.decode_vector(value, dim), table.embeddings[j]):
                raise UserFacingError(f"publish verification failed: {level} {table.ids[j]!r} differs in Redis")
    if r.strlen(K.default_user_key(version)) != K.vector_bytes(dim) or not r.exists(K.meta_key(version)):
        raise UserFacingError("publish verification failed: default user vector or manifest missing or corrupt")


def delete_version(r, version: str) -> int:
    """Removes every key of a version (SCAN + UNLINK in batches); returns how many."""
    n = 0
    batch: list[bytes] = []
    for key in r.scan_iter(match=K.version_pattern(version), count=5000):
        batch.append(key)
        if len(batch) >= CHUNK:
            n += int(r.unlink(*batch))
            batch = []
    if batch:
        n += int(r.unlink(*batch))
    return n


def _cleanup(r, current: str, keep_old: int) -> list[str]:
    """Keeps `current` and the newest keep_old other published versions; deletes the rest.

    A name in the versions list that is not a valid version (written by something else) is dropped from the list
    without deleting anything: as a SCAN pattern it could match other versions' keys."""
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
        delete_version(r, v)
        r.lrem(K.VERSIONS, 0, v)
        removed.append(v)
    return removed


def publish_snapshot(snapshot_path: str | os.PathLike, redis_url: str, keep_old: int = 1, client=None) -> str:
    """Publishes a snapshot version and flips `current` to it; returns the version."""
    import redis

    snap = KnowledgeSnapshot(snapshot_path)
    try:
        version = K.validate_version(snap.version)
    except UserFacingError as exc:
        raise UserFacingError(f"snapshot {snap.path}: {exc}; nothing was published") from None
    dim = _check_vector_lengths(snap)
    where = redact_url(redis_url)
    try:
        r = client if client is not None else redis.Redis.from_url(redis_url)
    except ValueError as exc:
        raise UserFacingError(f"invalid Redis URL {where}: {redact_text(exc, redis_url)}") from None
    flipped = False
    try:
        previous = r.get(K.CURRENT)
        written = _write_version(r, snap, dim)
        _verify(r, snap, dim)
        # The one atomic step readers observe.
        r.set(K.CURRENT, version)
        flipped = True
        r.lrem(K.VERSIONS, 0, version)
        r.rpush(K.VERSIONS, version)
        removed = _cleanup(r, version, keep_old)
    except redis.RedisError as exc:
        state = (
            "llm4msr:kn:current already points at it; the rerun completes the cleanup of old versions"
            if flipped
            else "llm4msr:kn:current was not changed"
        )
        raise UserFacingError(
            f"publishing knowledge {version} to {where} failed ({redact_text(exc, redis_url)}); {state}; "
            "rerun the publish to complete it"
        ) from exc
    log.info(
        "published knowledge %s (previous %s): %s; removed old versions %s",
        version,
        _decode(previous)[:80] if previous else None,
        written,
        removed,
    )
    return version
