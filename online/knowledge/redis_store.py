"""Knowledge published to Redis, one primary or a Redis Cluster: follows llm4msr:kn:current, user vectors through an
LRU and one round trip per node.

On a cluster the breaker is per node: a dead primary makes only the keys in its slots fall back (counted as
redis_unavailable), the other nodes keep answering. Vectors are decoded in the format each version was published
in (its meta records the format and codec parameters; shared/knowledge/vector_codec.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

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
from shared.knowledge.redis_conn import SINGLE_NODE, KnowledgeRedis, connect, redis_errors
from shared.knowledge.snapshot import Manifest
from shared.knowledge.vector_codec import VectorCodec, VectorLengthError, float32_codec, published_codecs
from shared.redact import redact_text, redact_url

log = logging.getLogger(__name__)

ITEM_BATCH = 5000
ID_LIST_BATCH = 64


@dataclass
class RedisKnowledgeVersion(KnowledgeVersion):
    """A version read from Redis, with the codec each level's vectors were published in (requests decode with the
    codecs of the version they hold)."""

    codecs: dict[str, VectorCodec] = field(default_factory=dict)


def _redis_client(url: str, timeout_s: float) -> KnowledgeRedis:
    """A client that fails fast: no retries (the breaker decides when to try again), short timeouts."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return connect(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
    )


class RedisKnowledgeStore(KnowledgeStore):
    """Knowledge published to Redis (key layout: shared/knowledge/keys.py; cluster URLs: shared/knowledge/redis_conn.py)."""

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
    ):
        super().__init__(expected_space_id, poll_interval_s)
        self.url = url
        self.shown_url = redact_url(url)  # the only form of the URL that is ever logged or returned
        self.retry_s = retry_s
        self.item_preload_limit = item_preload_limit
        try:
            self.fast = _redis_client(url, timeout_s)  # request path
            self.slow = _redis_client(url, max(2.0, timeout_s))  # poller and version loads
        except UserFacingError as exc:
            raise UserFacingError(self.redact(exc)) from None
        self.cache = LRU(user_cache_size)
        self._down_until: dict[str, float] = {}  # node -> skip it until then (SINGLE_NODE on one primary)
        self._down_since: float | None = None
        self.errors = 0
        self.corrupt_vectors = 0  # user/item vectors of the wrong length met on the request path
        self._corrupt_logged: set[str] = set()  # versions whose first corrupt vector was logged

    def redact(self, text: object) -> str:
        return redact_text(text, self.url)

    # -- breaker (per node) -------------------------------------------------------------------------------
    @property
    def redis_up(self) -> bool:
        """False while any node is being skipped after a failure."""
        now = time.monotonic()
        return all(now >= until for until in self._down_until.values())

    def _node_up(self, node: str) -> bool:
        return time.monotonic() >= self._down_until.get(node, 0.0)

    def _node_of(self, key: str) -> str:
        try:
            return self.slow.node_of(key)
        except redis_errors():
            return SINGLE_NODE

    def _mark_down(self, exc: BaseException, node: str = SINGLE_NODE) -> None:
        self.errors += 1
        if self._down_since is None:
            self._down_since = time.monotonic()
            where = self.shown_url if node == SINGLE_NODE else f"{self.shown_url} (node {node})"
            log.warning("Redis at %s unreachable (%s); serving from cache/defaults", where, self.redact(exc))
        self._down_until[node] = time.monotonic() + self.retry_s

    def _mark_up(self, node: str = SINGLE_NODE) -> None:
        if node not in self._down_until:
            return
        del self._down_until[node]
        now = time.monotonic()
        for other in [n for n, until in self._down_until.items() if until <= now]:
            del self._down_until[other]
        if self._down_since is not None and not self._down_until:
            log.info("Redis reachable again after %.1f s", time.monotonic() - self._down_since)
            self._down_since = None

    # -- versions ----------------------------------------------------------------------------------------
    def refresh(self, initial: bool = False) -> None:
        try:
            raw = self.slow.client.get(keys.CURRENT)
        except redis_errors() as exc:
            # Not fatal even at start: the ranker stays unready (/readyz 503) and keeps polling, so that it can
            # start before Redis does (compose, Kubernetes) and comes up by itself.
            self._mark_down(exc, self._node_of(keys.CURRENT))
            if initial:
                log.warning(
                    "cannot read %s from Redis at %s (%s); not ready until it answers",
                    keys.CURRENT,
                    self.shown_url,
                    self.redact(exc),
                )
            return
        self._mark_up(self._node_of(keys.CURRENT))
        self.fast.ensure_connected()  # a cluster's request-path client learns the topology while the seeds answer
        if raw is None:
            if initial:
                log.warning(
                    "no knowledge published at %s yet (%s unset); not ready until there is",
                    self.shown_url,
                    keys.CURRENT,
                )
            return
        self._follow(raw.decode(errors="replace"), initial)

    def _follow(self, version: str, initial: bool) -> None:
        """Loads and installs the version `current` names, unless it is served or was refused already."""
        cur = self._current
        if cur is not None and cur.version == version:
            return
        if version[:200] in self.refused and not initial:
            return
        try:
            kv = self.load(version)
        except redis_errors() as exc:
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
        try:
            raw = self.slow.client.get(keys.CURRENT)
            return None if raw is None else self.load(raw.decode(errors="replace"))
        except redis_errors() as exc:
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
        for start in range(0, n_chunks, ID_LIST_BATCH):
            names = [keys.ids_key(version, level, c) for c in range(start, min(n_chunks, start + ID_LIST_BATCH))]
            for name, raw in zip(names, self.slow.get_many(names), strict=True):
                chunk = json.loads(raw) if raw is not None else None
                if not isinstance(chunk, list) or not all(isinstance(i, str) for i in chunk):
                    raise UserFacingError(f"knowledge version {version}: {name} is missing or not a list of ids")
                ids.extend(chunk)
        if len(ids) < want:
            raise UserFacingError(f"knowledge version {version}: {level} id lists hold {len(ids)} of {n} ids")
        return ids[:want]

    def _read_meta(self, version: str) -> tuple[Manifest, dict, dict[str, VectorCodec]]:
        """The version's manifest, its published block and its codecs; UserFacingError if unusable."""
        keys.validate_version(version)
        meta = self.slow.client.get(keys.meta_key(version))
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
        try:
            codecs = published_codecs(published, dim)
        except UserFacingError as exc:
            raise UserFacingError(f"knowledge version {version}: {exc}; republish the version") from None
        return manifest, published, codecs

    def _load_scenarios(
        self, version: str, published: dict, codec: VectorCodec
    ) -> tuple[dict[str, np.ndarray], dict[str, str], np.ndarray]:
        """Every scenario vector and answer, and the default user vector (all needed by every request)."""
        scen_ids = sorted(self._read_ids(version, "scenario", published))
        names = [
            k
            for sid in scen_ids
            for k in (keys.scenario_key(version, sid), keys.response_key(version, "scenario", sid))
        ]
        res = self.slow.get_many([*names, keys.default_user_key(version)])
        scenarios, responses = {}, {}
        for i, sid in enumerate(scen_ids):
            raw = res[2 * i]
            if raw is None:
                raise UserFacingError(f"knowledge version {version}: scenario {sid!r} has no vector in Redis")
            scenarios[sid] = self._decode_or_refuse(version, "scenario", sid, raw, codec)
            responses[sid] = (res[2 * i + 1] or b"").decode()
        default_raw = res[-1]
        if default_raw is None:
            default_user = np.zeros(codec.dim, np.float32)
            log.warning("knowledge %s has no default user vector; cold-start users get zeros", version)
        else:
            default_user = self._decode_or_refuse(version, "default user", "", default_raw, codec)
        return scenarios, responses, default_user

    def _load_items(self, version: str, published: dict, codec: VectorCodec) -> tuple[ItemVectors, bool, frozenset]:
        """Up to item_preload_limit item vectors in memory: (items, whether that is all of them, corrupt ids)."""
        n_items = int(published["counts"][table_name("item")])
        complete = n_items <= self.item_preload_limit
        item_ids = self._read_ids(version, "item", published, limit=self.item_preload_limit)
        matrix = np.zeros((len(item_ids), codec.dim), np.float32)
        keep = np.ones(len(item_ids), dtype=bool)
        for start in range(0, len(item_ids), ITEM_BATCH):
            chunk = item_ids[start : start + ITEM_BATCH]
            values = self.slow.get_many([keys.item_key(version, i) for i in chunk])
            decoded, present, corrupt = codec.decode_many(values)
            ok = present & ~corrupt  # listed but absent: an unknown item, as if never published
            matrix[start : start + len(chunk)][ok] = decoded[ok]
            keep[start : start + len(chunk)] = ok
        lost_ids: frozenset[str] = frozenset()
        if not keep.all():
            lost = [item_ids[j] for j in np.flatnonzero(~keep)]
            lost_ids = frozenset(lost)
            log.error(
                "knowledge %s: %d item vectors are missing or not %d bytes (%s, dim %d), e.g. %r; those items are "
                "served as fallbacks (reason corrupt); republish the version",
                version,
                len(lost),
                codec.nbytes,
                codec.format,
                codec.dim,
                lost[:3],
            )
            item_ids = [i for i, k in zip(item_ids, keep, strict=True) if k]
            matrix = matrix[keep]
        return ItemVectors(item_ids, matrix), complete, lost_ids

    def load(self, version: str) -> KnowledgeVersion:
        """Reads a published version's manifest, scenarios, default user and (up to the limit) items.

        Raises UserFacingError when the version cannot be served as published (see the module docstring)."""
        manifest, published, codecs = self._read_meta(version)
        scenarios, responses, default_user = self._load_scenarios(version, published, codecs["scenario"])
        items, complete, corrupt = self._load_items(version, published, codecs["item"])
        log.info(
            "loaded knowledge %s from Redis (%s vectors): %d scenarios, %d items%s",
            version,
            codecs["user"].format,
            len(scenarios),
            len(items),
            "" if complete else " (partial; rest on demand)",
        )
        return RedisKnowledgeVersion(
            version=version,
            manifest=manifest,
            dim=int(manifest.space.dim),
            scenarios=scenarios,
            scenario_responses=responses,
            default_user=default_user,
            items=items,
            items_complete=complete,
            corrupt_items=corrupt,
            codecs=codecs,
        )

    @staticmethod
    def _decode_or_refuse(version: str, what: str, id_: str, raw: bytes, codec: VectorCodec) -> np.ndarray:
        """Vectors every request needs (scenarios, the default user): a wrong length refuses the whole version."""
        try:
            return codec.decode(raw)
        except VectorLengthError as exc:
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
        fallbacks: list[Fallback] = []
        user_vec = None
        ask_user = False
        if need_user:
            cached = self.cache.get((kv.version, user_id), None)
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
            names = [keys.user_key(kv.version, user_id)] if ask_user else []
            names += [keys.item_key(kv.version, item_ids[i]) for i in ask_items]
            values, unavailable = self._read_request_keys(kv, names)
            if ask_user:
                user_vec = self._user_from(kv, user_id, values[0], unavailable[0])
                values, unavailable = values[1:], unavailable[1:]
            if ask_items:
                fallbacks.extend(self._items_from(kv, item_ids, ask_items, values, unavailable, item_vecs))
        if isinstance(user_vec, _Stand):
            fallbacks.append(Fallback("user", user_vec.reason))
            user_vec = user_vec.vec
        return Fetched(user_vec, item_vecs, fallbacks)

    def in_memory(self, kv: KnowledgeVersion, user_id: str, need_user: bool, need_items: bool) -> bool:
        """The user's vector is in the LRU and the items are all preloaded (a vector missing from a complete
        catalogue is a fallback, not a read)."""
        return (not need_user or (kv.version, user_id) in self.cache) and (not need_items or kv.items_complete)

    def _read_request_keys(self, kv: KnowledgeVersion, names: list[str]) -> tuple[list[bytes | None], list[bool]]:
        """One round trip per node (nodes whose breaker is open are skipped); which keys could not be asked."""
        reads = self.fast.get_by_node(names, skip=lambda node: not self._node_up(node))
        for node, exc in reads.errors.items():
            self._mark_down(exc, node)
        return reads.values, reads.unavailable

    def _user_from(self, kv: KnowledgeVersion, user_id: str, raw: bytes | None, unavailable: bool):
        """The user's vector, or a _Stand (cached) when the version has no usable one; Redis down: the default."""
        if unavailable:
            return _Stand(kv.default_user, REDIS_UNAVAILABLE)  # not cached: the next request asks again
        if raw is None:
            # Not published for this version: cold start. Cached too (with the default vector) so a stream of
            # requests for an unknown user does not hit Redis every time.
            vec = _Stand(kv.default_user, UNKNOWN)
        else:
            try:
                vec = self._request_codec(kv, "user").decode(raw)
            except VectorLengthError as exc:
                self._corrupt(kv.version, "user", user_id, exc)
                vec = _Stand(kv.default_user, CORRUPT)
        self.cache.put((kv.version, user_id), vec)
        return vec

    def _items_from(
        self,
        kv: KnowledgeVersion,
        item_ids: Sequence[str],
        asked: list[int],
        values: list[bytes | None],
        unavailable: list[bool],
        item_vecs: np.ndarray,
    ) -> list[Fallback]:
        """Fills item_vecs rows from Redis values (rows left NaN: the model substitutes the level's average)."""
        codec = self._request_codec(kv, "item")
        out: list[Fallback] = []
        missing = sum(unavailable)
        if missing:
            out.append(Fallback("item", REDIS_UNAVAILABLE, missing))
        usable = [(i, v) for i, v, down in zip(asked, values, unavailable, strict=True) if not down]
        decoded, present, corrupt = codec.decode_many([v for _, v in usable])
        for j, (i, raw) in enumerate(usable):
            if present[j] and not corrupt[j]:
                item_vecs[i] = decoded[j]
            elif corrupt[j]:
                try:
                    codec.decode(raw)
                except VectorLengthError as exc:  # the message says which length was expected
                    self._corrupt(kv.version, "item", item_ids[i], exc)
        unknown = int((~present).sum())
        if unknown:
            out.append(Fallback("item", UNKNOWN, unknown))
        if corrupt.any():
            out.append(Fallback("item", CORRUPT, int(corrupt.sum())))
        return out

    @staticmethod
    def _request_codec(kv: KnowledgeVersion, level: str) -> VectorCodec:
        codecs = getattr(kv, "codecs", None)
        return codecs[level] if codecs else float32_codec(kv.dim)

    def user_response(self, kv: KnowledgeVersion, user_id: str) -> tuple[str | None, list[Fallback]]:
        name = keys.response_key(kv.version, "user", user_id)
        reads = self.fast.get_by_node([name], skip=lambda node: not self._node_up(node))
        for node, exc in reads.errors.items():
            self._mark_down(exc, node)
        if reads.unavailable[0]:
            return None, [Fallback("user", REDIS_UNAVAILABLE)]
        raw = reads.values[0]
        return (None if raw is None else raw.decode()), []

    def describe(self) -> dict:
        out = super().describe()
        out.update(
            {
                "redis_up": self.redis_up,
                "redis_cluster": self.fast.cluster,
                "redis_nodes_down": sorted(n for n, t in self._down_until.items() if n and t > time.monotonic()),
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
