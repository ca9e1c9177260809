"""Knowledge published to Redis: follows llm4msr:kn:current, user vectors through an LRU and one round trip."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from online.knowledge.base import (
    CORRUPT,
    LRU,
    REDIS_UNAVAILABLE,
    UNKNOWN,
    Fallback,
    Fetched,
    ItemVectors,
    KnowledgeStore,
    KnowledgeVersion,
    missing_item_fallbacks,
)
from shared.errors import UserFacingError
from shared.knowledge import keys
from shared.knowledge.levels import LEVELS, table_name
from shared.knowledge.snapshot import Manifest
from shared.redact import redact_text, redact_url

log = logging.getLogger(__name__)


def _redis_client(url: str, timeout_s: float):
    """A client that fails fast: no retries (the breaker decides when to try again), short timeouts."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
    )


class RedisKnowledgeStore(KnowledgeStore):
    """Knowledge published to Redis (key layout: shared/knowledge/keys.py)."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        expected_space_id: str | None,
        poll_interval_s: float = 1.0,
        timeout_s: float = 0.05,
        retry_s: float = 0.5,
        user_cache_size: int = 100_000,
        item_preload_limit: int = 2_000_000,
        on_redis_error: Callable[[], None] | None = None,
    ):
        super().__init__(expected_space_id, poll_interval_s)
        self.url = url
        self.shown_url = redact_url(url)  # the only form of the URL that is ever logged or returned
        self.retry_s = retry_s
        self.item_preload_limit = item_preload_limit
        try:
            self.fast = _redis_client(url, timeout_s)  # request path
            self.slow = _redis_client(url, max(2.0, timeout_s))  # poller and version loads
        except ValueError as exc:
            raise UserFacingError(f"invalid Redis URL {self.shown_url}: {self.redact(exc)}") from None
        self.cache = LRU(user_cache_size)
        self._down_until = 0.0
        self._down_since: float | None = None
        self.errors = 0
        self.corrupt_vectors = 0  # user/item vectors of the wrong length met on the request path
        self._corrupt_logged: set[str] = set()  # versions whose first corrupt vector was logged
        self.on_redis_error = on_redis_error

    def redact(self, text: object) -> str:
        return redact_text(text, self.url)

    # -- breaker ------------------------------------------------------------------------------------
    @property
    def redis_up(self) -> bool:
        return time.monotonic() >= self._down_until

    def _mark_down(self, exc: BaseException) -> None:
        self.errors += 1
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("Redis at %s unreachable (%s); serving from cache/defaults", self.shown_url, self.redact(exc))
        self._down_until = time.monotonic() + self.retry_s
        if self.on_redis_error is not None:
            self.on_redis_error()

    def _mark_up(self) -> None:
        if self._down_since is not None:
            log.info("Redis reachable again after %.1f s", time.monotonic() - self._down_since)
            self._down_since = None
        self._down_until = 0.0

    # -- versions ----------------------------------------------------------------------------------------
    def refresh(self, initial: bool = False) -> None:
        import redis

        try:
            raw = self.slow.get(keys.CURRENT)
        except redis.RedisError as exc:
            # Not fatal even at start: the ranker stays unready (/readyz 503) and keeps polling, so that it can
            # start before Redis does (compose, Kubernetes) and comes up by itself.
            self._mark_down(exc)
            if initial:
                log.warning(
                    "cannot read %s from Redis at %s (%s); not ready until it answers",
                    keys.CURRENT,
                    self.shown_url,
                    self.redact(exc),
                )
            return
        self._mark_up()
        if raw is None:
            if initial:
                log.warning(
                    "no knowledge published at %s yet (%s unset); not ready until there is",
                    self.shown_url,
                    keys.CURRENT,
                )
            return
        version = raw.decode(errors="replace")
        cur = self._current
        if cur is not None and cur.version == version:
            return
        if version[:200] in self.refused and not initial:
            return
        try:
            kv = self.load(version)
        except redis.RedisError as exc:
            self._mark_down(exc)
            if initial:
                log.warning(
                    "cannot load knowledge %s from Redis (%s); not ready until it can", version, self.redact(exc)
                )
            return
        except UserFacingError as exc:
            # A bad pointer value or a broken version: a person must republish; the current version keeps serving.
            why = f"{keys.CURRENT} at {self.shown_url}: {self.redact(exc)}"
            if initial:
                raise UserFacingError(why) from None
            self._refuse(version, why)
            return
        if self._install(kv, initial):
            self.cache.drop_version({kv.version})

    def load_published(self) -> KnowledgeVersion | None:
        import redis

        try:
            raw = self.slow.get(keys.CURRENT)
            return None if raw is None else self.load(raw.decode(errors="replace"))
        except redis.RedisError as exc:
            raise UserFacingError(
                f"cannot read the published knowledge from Redis at {self.shown_url}: {self.redact(exc)}"
            ) from None

    def _read_ids(self, version: str, level: str, published: dict, limit: int | None = None) -> list[str]:
        """The level's ids from the publisher's id lists (never a SCAN); the first `limit` ids when given."""
        n = int(published["counts"][table_name(level)])
        want = n if limit is None else min(n, limit)
        chunk_size = int(published.get("id_chunk_size", keys.ID_CHUNK))
        n_chunks = -(-want // chunk_size) if want else 0
        if n_chunks > int(published["id_chunks"][table_name(level)]):
            raise UserFacingError(f"knowledge version {version}: {level} id lists are shorter than its count {n}")
        ids: list[str] = []
        for start in range(0, n_chunks, 64):
            names = [keys.ids_key(version, level, c) for c in range(start, min(n_chunks, start + 64))]
            for name, raw in zip(names, self.slow.mget(names), strict=True):
                chunk = json.loads(raw) if raw is not None else None
                if not isinstance(chunk, list) or not all(isinstance(i, str) for i in chunk):
                    raise UserFacingError(f"knowledge version {version}: {name} is missing or not a list of ids")
                ids.extend(chunk)
        if len(ids) < want:
            raise UserFacingError(f"knowledge version {version}: {level} id lists hold {len(ids)} of {n} ids")
        return ids[:want]

    def load(self, version: str) -> KnowledgeVersion:
        """Reads a published version's manifest, scenarios, default user and (up to the limit) items.

        Raises UserFacingError when the version cannot be served as published (see the module docstring)."""
        keys.validate_version(version)
        meta = self.slow.get(keys.meta_key(version))
        if meta is None:
            raise UserFacingError(f"knowledge version {version} has no {keys.meta_key(version)} in Redis")
        try:
            meta_dict = json.loads(meta)
            manifest = Manifest.from_dict(meta_dict)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserFacingError(
                f"knowledge version {version}: {keys.meta_key(version)} is not a manifest ({type(exc).__name__}: "
                f"{str(exc)[:200]})"
            ) from None
        dim = int(manifest.space.dim)
        published = meta_dict.get(keys.PUBLISHED)
        if not isinstance(published, dict) or {table_name(lv) for lv in LEVELS} - set(published.get("counts", {})):
            raise UserFacingError(
                f"knowledge version {version} was published without id lists (by an older llm4msr); publish it "
                "again with `llm4msr knowledge publish`"
            )
        if int(published.get("dim", dim)) != dim:
            raise UserFacingError(
                f"knowledge version {version}: published dim {published.get('dim')} differs from the manifest's {dim}"
            )

        scen_ids = sorted(self._read_ids(version, "scenario", published))
        pipe = self.slow.pipeline(transaction=False)
        for sid in scen_ids:
            pipe.get(keys.scenario_key(version, sid))
            pipe.get(keys.response_key(version, "scenario", sid))
        pipe.get(keys.default_user_key(version))
        res = pipe.execute()
        scenarios, responses = {}, {}
        for i, sid in enumerate(scen_ids):
            raw = res[2 * i]
            if raw is None:
                raise UserFacingError(f"knowledge version {version}: scenario {sid!r} has no vector in Redis")
            scenarios[sid] = self._decode_or_refuse(version, "scenario", sid, raw, dim)
            responses[sid] = (res[2 * i + 1] or b"").decode()
        default_raw = res[-1]
        if default_raw is None:
            default_user = np.zeros(dim, np.float32)
            log.warning("knowledge %s has no default user vector; cold-start users get zeros", version)
        else:
            default_user = self._decode_or_refuse(version, "default user", "", default_raw, dim)

        n_items = int(published["counts"][table_name("item")])
        complete = n_items <= self.item_preload_limit
        item_ids = self._read_ids(version, "item", published, limit=self.item_preload_limit)
        matrix = np.zeros((len(item_ids), dim), np.float32)
        keep = np.ones(len(item_ids), dtype=bool)
        for start in range(0, len(item_ids), 5000):
            chunk = item_ids[start : start + 5000]
            vals = self.slow.mget([keys.item_key(version, i) for i in chunk])
            for j, v in enumerate(vals):
                if v is None:
                    keep[start + j] = False  # listed but absent: an unknown item, as if never published
                    continue
                try:
                    matrix[start + j] = keys.decode_vector(v, dim)
                except keys.VectorLengthError:
                    keep[start + j] = False
        corrupt: frozenset[str] = frozenset()
        if not keep.all():
            lost = [item_ids[j] for j in np.flatnonzero(~keep)]
            corrupt = frozenset(lost)
            log.error(
                "knowledge %s: %d item vectors are missing or not %d bytes (dim %d), e.g. %r; those items are "
                "served as fallbacks (reason corrupt); republish the version",
                version,
                len(lost),
                keys.vector_bytes(dim),
                dim,
                lost[:3],
            )
            item_ids = [i for i, k in zip(item_ids, keep, strict=True) if k]
            matrix = matrix[keep]
        log.info(
            "loaded knowledge %s from Redis: %d scenarios, %d items%s",
            version,
            len(scenarios),
            len(item_ids),
            "" if complete else " (partial; rest on demand)",
        )
        return KnowledgeVersion(
            version=version,
            manifest=manifest,
            dim=dim,
            scenarios=scenarios,
            scenario_responses=responses,
            default_user=default_user,
            items=ItemVectors(item_ids, matrix),
            items_complete=complete,
            corrupt_items=corrupt,
        )

    @staticmethod
    def _decode_or_refuse(version: str, what: str, id_: str, raw: bytes, dim: int) -> np.ndarray:
        """Vectors every request needs (scenarios, the default user): a wrong length refuses the whole version."""
        try:
            return keys.decode_vector(raw, dim)
        except keys.VectorLengthError as exc:
            name = f"{what} {id_!r}" if id_ else what
            raise UserFacingError(
                f"knowledge version {version}: the {name} vector is corrupt ({exc}); republish the version"
            ) from None

    def _corrupt(self, version: str, level: str, id_: str, exc: Exception) -> None:
        """Counts a corrupt request-path vector; logs the first of each version (not one line per request)."""
        self.corrupt_vectors += 1
        if version not in self._corrupt_logged:
            self._corrupt_logged.add(version)
            log.error(
                "knowledge %s: the %s vector of %r is corrupt (%s); served as a fallback (reason corrupt); "
                "further ones are only counted",
                version,
                level,
                id_,
                exc,
            )

    # -- request path ---------------------------------------------------------------------------------
    def fetch(self, kv: KnowledgeVersion, user_id: str, item_ids: Sequence[str] | None, need_user: bool) -> Fetched:
        import redis

        fallbacks: list[Fallback] = []
        version = kv.version
        user_vec = None
        ask_user = False
        if need_user:
            cached = self.cache.get((version, user_id), None)
            if cached is not None:
                user_vec = cached
            else:
                ask_user = True

        item_vecs = None
        ask_items: list[int] = []
        if item_ids is not None:
            item_vecs, found = self._items_from_memory(kv, item_ids)
            if not found.all():
                if kv.items_complete:
                    fallbacks.extend(missing_item_fallbacks(kv, item_ids, found))
                else:
                    ask_items = np.flatnonzero(~found).tolist()

        if ask_user or ask_items:
            results = None
            if self.redis_up:
                try:
                    pipe = self.fast.pipeline(transaction=False)
                    if ask_user:
                        pipe.get(keys.user_key(version, user_id))
                    if ask_items:
                        pipe.mget([keys.item_key(version, item_ids[i]) for i in ask_items])
                    results = pipe.execute()
                except redis.RedisError as exc:
                    self._mark_down(exc)
            if results is None:
                if ask_user:
                    user_vec = kv.default_user
                    fallbacks.append(Fallback("user", REDIS_UNAVAILABLE))
                if ask_items:
                    fallbacks.append(Fallback("item", REDIS_UNAVAILABLE, len(ask_items)))
            else:
                pos = 0
                if ask_user:
                    raw = results[0]
                    pos = 1
                    if raw is None:
                        # Not published for this version: cold start. Cached too (with the default vector) so a
                        # stream of requests for an unknown user does not hit Redis every time.
                        user_vec = _Stand(kv.default_user, UNKNOWN)
                    else:
                        try:
                            user_vec = keys.decode_vector(raw, kv.dim)
                        except keys.VectorLengthError as exc:
                            self._corrupt(version, "user", user_id, exc)
                            user_vec = _Stand(kv.default_user, CORRUPT)
                    self.cache.put((version, user_id), user_vec)
                if ask_items:
                    unknown = corrupt = 0
                    for i, raw in zip(ask_items, results[pos], strict=True):
                        if raw is None:
                            unknown += 1
                            continue
                        try:
                            item_vecs[i] = keys.decode_vector(raw, kv.dim)
                        except keys.VectorLengthError as exc:
                            self._corrupt(version, "item", item_ids[i], exc)
                            corrupt += 1  # the row stays NaN: the model substitutes the level's average
                    if unknown:
                        fallbacks.append(Fallback("item", UNKNOWN, unknown))
                    if corrupt:
                        fallbacks.append(Fallback("item", CORRUPT, corrupt))
        if isinstance(user_vec, _Stand):
            fallbacks.append(Fallback("user", user_vec.reason))
            user_vec = user_vec.vec
        return Fetched(user_vec, item_vecs, fallbacks)

    def user_response(self, kv: KnowledgeVersion, user_id: str) -> tuple[str | None, list[Fallback]]:
        import redis

        if not self.redis_up:
            return None, [Fallback("user", REDIS_UNAVAILABLE)]
        try:
            raw = self.fast.get(keys.response_key(kv.version, "user", user_id))
        except redis.RedisError as exc:
            self._mark_down(exc)
            return None, [Fallback("user", REDIS_UNAVAILABLE)]
        return (None if raw is None else raw.decode()), []

    def describe(self) -> dict:
        out = super().describe()
        out.update(
            {
                "redis_up": self.redis_up,
                "user_cache_entries": len(self.cache),
                "redis_errors": self.errors,
                "corrupt_vectors": self.corrupt_vectors,
            }
        )
        return out

    def stop(self) -> None:
        super().stop()
        for client in (self.fast, self.slow):
            try:
                client.close()
            except Exception:  # closing a dead connection is not an error worth reporting
                pass


class _Stand:
    """LRU marker: this user's vector cannot be used in the version (`reason`: unknown or corrupt); `vec` is the
    default it gets instead."""

    __slots__ = ("vec", "reason")

    def __init__(self, vec: np.ndarray, reason: str):
        self.vec = vec
        self.reason = reason
