"""What every knowledge store shares: the immutable version a request reads, fallbacks, the LRU, the poller."""

from __future__ import annotations

import logging
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa

from shared.errors import UserFacingError
from shared.knowledge.snapshot import Manifest

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


@dataclass(frozen=True)
class UserVectors:
    """A snapshot version's users: row of each id, the vectors ([n, dim]; memory-mapped by the snapshot store, so
    that worker processes share the pages) and the LLM's answers (an Arrow string array, also mapped)."""

    rows: dict[str, int]
    matrix: np.ndarray
    responses: pa.ChunkedArray

    def response_of(self, user_id: str) -> str | None:
        row = self.rows.get(user_id)
        return None if row is None else self.responses[row].as_py()


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
    # Snapshot store only: the users' vectors (memory-mapped, rows aligned with user_rows) and answers.
    users: UserVectors | None = None

    @cached_property
    def space_id(self) -> str:
        """Computed once: the space's id is a hash of its fields, and every request compares it."""
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

    _MISSING = object()

    def get(self, key, default=_MISSING):
        with self._lock:
            try:
                value = self._data[key]
            except KeyError:
                return default
            self._data.move_to_end(key)
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

    def __contains__(self, key) -> bool:
        """Whether key is cached (without touching its recency)."""
        return key in self._data

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
        self.on_poll: Callable[[], None] | None = None  # after every poll, e.g. to update gauges

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
            if self.on_poll is not None:
                self.on_poll()

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

    def in_memory(self, kv: KnowledgeVersion, user_id: str, need_user: bool, need_items: bool) -> bool:
        """Whether `fetch` answers from this process's memory, without a network round trip (then a request may be
        scored on the event loop). A snapshot is all in memory; a network store overrides this."""
        return True

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
