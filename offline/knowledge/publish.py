"""Publishing a snapshot version to Redis (DESIGN section 5).

Order matters for readers that follow `llm4msr:kn:current`:
  1. every vector, answer text, the default user vector and the manifest of the new version are written
     (pipelined, no TTL);
  2. they are counted back (EXISTS over every key) and a sample is decoded and compared;
  3. ONE `SET llm4msr:kn:current <version>` flips readers;
  4. versions older than the newest `keep_old` previous ones are deleted.
A failure before step 3 leaves `current` untouched; a rerun rewrites the same keys and completes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import numpy as np

from shared.errors import UserFacingError
from shared.knowledge import keys as K
from shared.knowledge.snapshot import LEVELS, KnowledgeSnapshot

log = logging.getLogger(__name__)

CHUNK = 2000


def _chunks(n: int, size: int = CHUNK) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _write_version(r, snap: KnowledgeSnapshot) -> dict[str, int]:
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
    pipe = r.pipeline(transaction=False)
    pipe.set(K.default_user_key(version), K.encode_vector(snap.default_user()))
    pipe.set(K.meta_key(version), json.dumps(snap.manifest.to_dict(), sort_keys=True))
    pipe.execute()
    return written


def _verify(r, snap: KnowledgeSnapshot, sample: int = 64) -> None:
    """Counts every key back and compares a sample of vectors bit for bit."""
    version = snap.version
    for level in LEVELS:
        table = snap.table(level)
        found = 0
        for sl in _chunks(len(table.ids)):
            found += int(r.exists(*[K.vector_key(version, level, i) for i in table.ids[sl]]))
        if found != len(table.ids):
            raise UserFacingError(f"publish verification failed: {found}/{len(table.ids)} {level} keys present")
        resp_ids = [i for i, t in zip(table.ids, table.responses, strict=True) if t]
        if resp_ids:
            found = sum(
                int(r.exists(*[K.response_key(version, level, i) for i in resp_ids[sl]]))
                for sl in _chunks(len(resp_ids))
            )
            if found != len(resp_ids):
                raise UserFacingError(f"publish verification failed: {found}/{len(resp_ids)} {level} answers present")
        rng = np.random.default_rng(0)
        rows = rng.choice(len(table.ids), size=min(sample, len(table.ids)), replace=False)
        values = r.mget([K.vector_key(version, level, table.ids[j]) for j in rows])
        for j, value in zip(rows, values, strict=True):
            if value is None or not np.array_equal(K.decode_vector(value), table.embeddings[j]):
                raise UserFacingError(f"publish verification failed: {level} {table.ids[j]} differs in Redis")
    if not r.exists(K.default_user_key(version), K.meta_key(version)) == 2:
        raise UserFacingError("publish verification failed: default user vector or manifest missing")


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
    """Keeps `current` and the newest keep_old other published versions; deletes the rest."""
    versions = [_decode(v) for v in r.lrange(K.VERSIONS, 0, -1)]
    others = [v for v in versions if v != current]
    keep = set(others[-keep_old:]) if keep_old > 0 else set()
    removed = []
    for v in others:
        if v in keep:
            continue
        delete_version(r, v)
        r.lrem(K.VERSIONS, 0, v)
        removed.append(v)
    return removed


def publish_snapshot(snapshot_path: str | os.PathLike, redis_url: str, keep_old: int = 1, client=None) -> str:
    """Publishes a snapshot version and flips `current` to it; returns the version."""
    import redis

    snap = KnowledgeSnapshot(snapshot_path)
    version = snap.version
    r = client if client is not None else redis.Redis.from_url(redis_url)
    try:
        previous = r.get(K.CURRENT)
        written = _write_version(r, snap)
        _verify(r, snap)
        # The one atomic step readers observe.
        r.set(K.CURRENT, version)
        r.lrem(K.VERSIONS, 0, version)
        r.rpush(K.VERSIONS, version)
        removed = _cleanup(r, version, keep_old)
    except redis.RedisError as exc:
        raise UserFacingError(
            f"publishing knowledge {version} to {redis_url} failed ({exc}); "
            "llm4msr:kn:current was not changed; rerun the publish to complete it"
        ) from exc
    log.info(
        "published knowledge %s (previous %s): %s; removed old versions %s",
        version,
        _decode(previous) if previous else None,
        written,
        removed,
    )
    return version
