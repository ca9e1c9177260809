"""Request-time knowledge access: the ranker never runs the LLM, it reads what the offline job stored.

Two stores behind one interface:
- `RedisKnowledgeStore` follows `llm4msr:kn:current` (polled in a background thread). Scenario and item vectors of
  a version are held in memory; user vectors come from a bounded LRU keyed by (version, user), then from Redis in
  one pipelined round trip per request (with any item vectors not in memory). Request-path Redis calls use short
  socket timeouts; after a failure Redis is skipped for a short while (answers come from cache/default and are
  flagged) until the poller reaches it again, so an outage never turns into slow or failed requests.
- `SnapshotKnowledgeStore` reads a Parquet snapshot (the embedded default, no Redis); given a knowledge root it
  follows the root's LATEST pointer the same way.

A request takes `store.current()` once and uses that immutable `KnowledgeVersion` to the end, so a version swap
never mixes two versions inside one answer.

The Redis store never SCANs: ids come from the id lists the publisher writes with each version, and every vector
read is checked against the version's dim. A version whose name is not a valid version (a bad `current` pointer),
whose id lists are missing, or whose scenario or default user vector has the wrong length is refused (logged,
listed in /readyz, the current version keeps serving); a user or item vector of the wrong length is a counted
fallback (reason "corrupt", the default user vector / NaN = the level's average). The Redis URL is logged with its
password masked.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.errors import UserFacingError
from shared.knowledge import keys
from shared.knowledge.snapshot import LATEST, LEVELS, KnowledgeSnapshot, KnowledgeTable, Manifest, resolve_snapshot_dir
from shared.redact import redact_text, redact_url

log = logging.getLogger(__name__)

# Fallback reasons (also the `reason` label of llm4msr_knowledge_fallback_total).
UNKNOWN = "unknown"  # no vector for this id in the version: default (user) or NaN = average (item)
REDIS_UNAVAILABLE = "redis_unavailable"  # Redis could not be asked: default (user) or NaN = average (item)
CORRUPT = "corrupt"  # the stored vector has the wrong length for the version's dim: default (user) or NaN (item)


@dataclass(frozen=True)
class Fallback:
    """One kind of degraded input used for an answer, reported in the response and counted in metrics."""

    level: str  # scenario | user | item | item_id
    reason: str
    count: int = 1


class ItemVectors:
    """An id-indexed matrix of item vectors (rows aligned with `ids`).

    The index is a plain dict: for a few hundred ids per request it is several times cheaper than building a
    pandas Index and calling get_indexer.
    """

    def __init__(self, ids: Sequence[str], matrix: np.ndarray):
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        self.ids = list(ids)
        self.index = {id_: i for i, id_ in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, ids: Sequence[str]) -> np.ndarray:
        get = self.index.get
        return np.fromiter((get(i, -1) for i in ids), dtype=np.int64, count=len(ids))


@dataclass
class KnowledgeVersion:
    """One published knowledge version as the ranker holds it; treated as immutable once built."""

    version: str
    manifest: Manifest
    dim: int
    scenarios: dict[str, np.ndarray]
    scenario_responses: dict[str, str]
    default_user: np.ndarray
    items: ItemVectors
    # False when only part of the catalogue fit in memory: the rest is fetched per request.
    items_complete: bool = True
    # Item ids whose stored vector had the wrong length: left out of `items`, reported as "corrupt" fallbacks.
    corrupt_items: frozenset[str] = frozenset()
    # Snapshot store only: the users table in memory.
    users: KnowledgeTable | None = None
    user_rows: dict[str, int] | None = None
    loaded_at: float = field(default_factory=time.time)

    @property
    def space_id(self) -> str:
        return self.manifest.space.id


@dataclass
class Fetched:
    """What one request gets from the store."""

    user_vec: np.ndarray | None
    item_vecs: np.ndarray | None
    fallbacks: list[Fallback]


class LRU:
    """A thread-safe bounded LRU (the ASGI threadpool runs several requests at once)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    _MISSING = object()

    def get(self, key, default=_MISSING):
        with self._lock:
            try:
                value = self._data[key]
            except KeyError:
                self.misses += 1
                return default
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key, value) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def drop_version(self, keep: set[str]) -> None:
        """Frees entries of versions no longer served (keys are (version, ...))."""
        with self._lock:
            for k in [k for k in self._data if k[0] not in keep]:
                del self._data[k]

    def __len__(self) -> int:
        return len(self._data)


class KnowledgeStore:
    """Common part: the current version, swap checks, and the space guard."""

    kind = "base"

    def __init__(self, expected_space_id: str | None, poll_interval_s: float = 1.0):
        self.expected_space_id = expected_space_id
        self.poll_interval_s = poll_interval_s
        self._current: KnowledgeVersion | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.refused: dict[str, str] = {}  # version -> why it was not swapped in
        self.on_swap: Callable[[KnowledgeVersion], None] | None = None
        self.swaps = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    def current(self) -> KnowledgeVersion | None:
        return self._current

    @property
    def ready(self) -> bool:
        return self._current is not None

    def start(self) -> None:
        """Loads the current version (raising on a space mismatch) and starts following new ones."""
        self.refresh(initial=True)
        self._thread = threading.Thread(target=self._poll_loop, name=f"knowledge-{self.kind}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.refresh()
            except Exception:  # the poller must survive anything; the old version keeps serving
                log.error(
                    "knowledge refresh failed; still serving %s\n%s",
                    self.version_name(),
                    self.redact(traceback.format_exc()),
                )

    def redact(self, text: object) -> str:
        """Text safe to log or return (the Redis store masks its URL's password)."""
        return str(text)

    def version_name(self) -> str | None:
        cur = self._current
        return None if cur is None else cur.version

    def check_space(self, manifest: Manifest) -> str | None:
        """Why this version cannot feed the loaded model, or None if it can."""
        if self.expected_space_id is not None and manifest.space.id != self.expected_space_id:
            return (
                f"knowledge version {manifest.version} is in knowledge space {manifest.space.id} "
                f"({manifest.space.model}, dim {manifest.space.dim}) but the model artifact was trained on space "
                f"{self.expected_space_id}; retrain the model on this knowledge or publish knowledge of its space"
            )
        return None

    def adopt_space(self, space_id: str | None, swap: Callable[[], None]) -> None:
        """Admin reload of a model: make the store serve knowledge of `space_id`, then call `swap` (which installs
        the new model) right after, so that model and knowledge change together.

        When the served version is of another space (a retrain on a new knowledge space: the refresh job published
        new-space knowledge, which the old model refused), the published version is loaded and must match.
        """
        cur = self._current
        if space_id is None or (cur is not None and cur.space_id == space_id):
            self.expected_space_id = space_id if space_id is not None else self.expected_space_id
            self.refused.clear()
            swap()
            return
        kv = self.load_published()
        if kv is None:
            raise UserFacingError(f"no published knowledge to serve the new model (space {space_id})")
        if kv.space_id != space_id:
            raise UserFacingError(
                f"the new model needs knowledge space {space_id}, but the published knowledge {kv.version} is "
                f"space {kv.space_id}; publish the knowledge the model was trained on first"
            )
        self.expected_space_id = space_id
        self.refused.clear()
        self._current = kv
        swap()
        self.swaps += 1
        log.info("knowledge swapped to %s (space %s) with the new model", kv.version, space_id)
        if self.on_swap is not None:
            self.on_swap(kv)

    def load_published(self) -> KnowledgeVersion | None:
        """The version readers should see now, loaded but not installed."""
        raise NotImplementedError

    def _install(self, kv: KnowledgeVersion, initial: bool) -> bool:
        why = self.check_space(kv.manifest)
        if why is not None:
            if initial:
                raise UserFacingError(why)
            if kv.version not in self.refused:
                log.error("not swapping knowledge: %s", why)
            self.refused[kv.version] = why
            return False
        old = self.version_name()
        self._current = kv
        self.swaps += 1
        if old is not None and old != kv.version:
            log.info("knowledge swapped %s -> %s", old, kv.version)
        if self.on_swap is not None:
            self.on_swap(kv)
        return True

    # -- per store -----------------------------------------------------------------------------------
    def refresh(self, initial: bool = False) -> None:
        raise NotImplementedError

    def fetch(self, kv: KnowledgeVersion, user_id: str, item_ids: Sequence[str] | None, need_user: bool) -> Fetched:
        raise NotImplementedError

    def user_response(self, kv: KnowledgeVersion, user_id: str) -> tuple[str | None, list[Fallback]]:
        raise NotImplementedError

    def describe(self) -> dict:
        cur = self._current
        return {
            "store": self.kind,
            "version": None if cur is None else cur.version,
            "space_id": None if cur is None else cur.space_id,
            "refused_versions": dict(self.refused),
        }

    # -- shared helpers -----------------------------------------------------------------------------------
    @staticmethod
    def _items_from_memory(kv: KnowledgeVersion, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return take_item_rows(kv.items, kv.items.matrix, item_ids)

    def _refuse(self, version: str, why: str) -> None:
        """Keeps serving the current version and never retries this one (until `current` names another)."""
        key = version[:200]
        if key not in self.refused:
            log.error("not swapping knowledge: %s; still serving %s", self.redact(why), self.version_name())
        self.refused[key] = self.redact(why)


def missing_item_fallbacks(kv: KnowledgeVersion, item_ids: Sequence[str], found: np.ndarray) -> list[Fallback]:
    """The fallbacks of items not found in memory: "corrupt" where the version's stored vector had the wrong length,
    "unknown" otherwise (one Fallback per reason, with its count)."""
    missing = int(len(found) - found.sum())
    if not missing:
        return []
    corrupt = 0
    if kv.corrupt_items:
        corrupt = sum(1 for i in np.flatnonzero(~found) if item_ids[i] in kv.corrupt_items)
    out = [Fallback("item", UNKNOWN, missing - corrupt)] if missing > corrupt else []
    if corrupt:
        out.append(Fallback("item", CORRUPT, corrupt))
    return out


def take_item_rows(items: ItemVectors, matrix: np.ndarray, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `matrix` (aligned with items.ids: the raw vectors or a table derived from them) for item_ids, and
    which were found. NaN rows = "no vector": the model substitutes the level's average (as offline evaluation)."""
    pos = items.positions(item_ids)
    found = pos >= 0
    if found.all():
        return matrix.take(pos, axis=0), found  # one gather, no extra copy
    out = np.full((len(item_ids), matrix.shape[1]), np.nan, dtype=np.float32)
    out[found] = matrix[pos[found]]
    return out, found


def _table_to_items(table: KnowledgeTable) -> ItemVectors:
    return ItemVectors(table.ids, table.embeddings)


class SnapshotKnowledgeStore(KnowledgeStore):
    """Knowledge straight from a Parquet snapshot (no Redis): everything in memory."""

    kind = "snapshot"

    def __init__(self, path: str | Path, expected_space_id: str | None, poll_interval_s: float = 1.0):
        super().__init__(expected_space_id, poll_interval_s)
        self.path = Path(path)
        # A knowledge root (with LATEST) is followed; a version folder is fixed.
        self.follow = (self.path / LATEST).exists() and not (self.path / "manifest.json").exists()

    def _target(self) -> Path:
        return resolve_snapshot_dir(self.path)

    def refresh(self, initial: bool = False) -> None:
        if not initial and not self.follow:
            return
        target = self._target()
        cur = self._current
        if cur is not None and target.name == cur.version:
            return
        if not initial and target.name in self.refused:
            return
        self._install(self.load(target), initial)

    def load_published(self) -> KnowledgeVersion | None:
        return self.load(self._target())

    @staticmethod
    def load(path: Path) -> KnowledgeVersion:
        snap = KnowledgeSnapshot(path)
        scen = snap.scenarios()
        users = snap.users()
        try:
            items = snap.items()
        except UserFacingError:
            items = KnowledgeTable([], np.zeros((0, scen.dim), np.float32), [], [])
        return KnowledgeVersion(
            version=snap.version,
            manifest=snap.manifest,
            dim=scen.dim,
            scenarios={sid: scen.embeddings[i] for i, sid in enumerate(scen.ids)},
            scenario_responses={sid: scen.responses[i] or "" for i, sid in enumerate(scen.ids)},
            default_user=snap.default_user(),
            items=_table_to_items(items),
            users=users,
            user_rows={id_: i for i, id_ in enumerate(users.ids)},
        )

    def fetch(self, kv: KnowledgeVersion, user_id: str, item_ids: Sequence[str] | None, need_user: bool) -> Fetched:
        fallbacks: list[Fallback] = []
        user_vec = None
        if need_user:
            assert kv.users is not None and kv.user_rows is not None
            pos = kv.user_rows.get(user_id, -1)
            if pos >= 0:
                user_vec = kv.users.embeddings[pos]
            else:
                user_vec = kv.default_user
                fallbacks.append(Fallback("user", UNKNOWN))
        item_vecs = None
        if item_ids is not None:
            item_vecs, found = self._items_from_memory(kv, item_ids)
            fallbacks.extend(missing_item_fallbacks(kv, item_ids, found))
        return Fetched(user_vec, item_vecs, fallbacks)

    def user_response(self, kv: KnowledgeVersion, user_id: str) -> tuple[str | None, list[Fallback]]:
        assert kv.users is not None
        return kv.users.response_of(user_id), []


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
        n = int(published["counts"][level])
        want = n if limit is None else min(n, limit)
        chunk_size = int(published.get("id_chunk_size", keys.ID_CHUNK))
        n_chunks = -(-want // chunk_size) if want else 0
        if n_chunks > int(published["id_chunks"][level]):
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
        if not isinstance(published, dict) or set(LEVELS) - set(published.get("counts", {})):
            raise UserFacingError(
                f"knowledge version {version} was published without id lists (by an older llm4msr); publish it "
                "again with `llm4msr knowledge publish`"
            )
        if int(published.get("dim", dim)) != dim:
            raise UserFacingError(
                f"knowledge version {version}: published dim {published.get('dim')} differs from the manifest's {dim}"
            )

        scen_ids = sorted(self._read_ids(version, "scenarios", published))
        pipe = self.slow.pipeline(transaction=False)
        for sid in scen_ids:
            pipe.get(keys.scenario_key(version, sid))
            pipe.get(keys.response_key(version, "scenarios", sid))
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

        n_items = int(published["counts"]["items"])
        complete = n_items <= self.item_preload_limit
        item_ids = self._read_ids(version, "items", published, limit=self.item_preload_limit)
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
            raw = self.fast.get(keys.response_key(kv.version, "users", user_id))
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
