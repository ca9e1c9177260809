"""Request-time knowledge access: the ranker never runs the LLM, it reads what the offline job stored.

Two stores behind one interface:
- `RedisKnowledgeStore` follows `llm4msr:kn:current` (polled in a background thread). Scenario and item vectors of
  a version are held in memory; user vectors come from a bounded LRU keyed by (version, user), then from Redis in
  one pipelined round trip per request (with any item vectors not in memory). Request-path Redis calls use short
  socket timeouts; after a failure Redis is skipped for a short while (answers come from cache/default and are
  flagged) until the poller reaches it again, so an outage never turns into slow or failed requests.
- `SnapshotKnowledgeStore` reads a Parquet snapshot (the embedded default, no Redis); given a knowledge root it
  follows the root's LATEST pointer the same way. The vectors are memory-mapped from an uncompressed copy made on
  first load, so the worker processes of one server share them.

A request takes `store.current()` once and uses that immutable `KnowledgeVersion` to the end, so a version swap
never mixes two versions inside one answer.

The Redis store never SCANs: ids come from the id lists the publisher writes with each version, and every vector
read is checked against the version's dim. A version whose name is not a valid version (a bad `current` pointer),
whose id lists are missing, or whose scenario or default user vector has the wrong length is refused (logged,
listed in /readyz, the current version keeps serving); a user or item vector of the wrong length is a counted
fallback (reason "corrupt", the default user vector / NaN = the level's average). The Redis URL is logged with its
password masked.
"""

from online.knowledge.base import (
    CORRUPT,
    REDIS_UNAVAILABLE,
    UNKNOWN,
    Fallback,
    Fetched,
    ItemVectors,
    KnowledgeStore,
    KnowledgeVersion,
    UserVectors,
    missing_item_fallbacks,
    take_item_rows,
)
from online.knowledge.redis_store import RedisKnowledgeStore
from online.knowledge.snapshot_store import SnapshotKnowledgeStore

__all__ = [
    "CORRUPT",
    "REDIS_UNAVAILABLE",
    "UNKNOWN",
    "Fallback",
    "Fetched",
    "ItemVectors",
    "KnowledgeStore",
    "KnowledgeVersion",
    "RedisKnowledgeStore",
    "SnapshotKnowledgeStore",
    "UserVectors",
    "missing_item_fallbacks",
    "take_item_rows",
]
