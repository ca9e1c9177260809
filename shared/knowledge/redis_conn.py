"""The knowledge store's Redis: one primary or a Redis Cluster, named by the URL (docs/architecture.md, Redis keys).

A cluster is named by the scheme `redis+cluster://[user:password@]host:port[,host:port...]` (`rediss+cluster://` with
TLS) or by the query parameter `cluster=true` on any redis:// or rediss:// URL. Each host:port is a seed node: the
client learns the others from the first seed that answers, so list more than one (a process that starts while its
only seed is down cannot find the cluster). A cluster has database 0 only. Every other URL is a single primary,
as before.

The key layout puts no hash tag on a version, so a version's keys spread over every slot: multi-key commands are
split here, per slot or per node (reads: one pipeline per node; SCAN and UNLINK: node by node), never sent as one
cross-slot command. Single-key commands (`client.get`, `client.set`, ...) work unchanged on both kinds.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from shared.errors import UserFacingError
from shared.redact import redact_text, redact_url

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
SINGLE_NODE = ""  # the node name of a single primary (one breaker, one group)
MGET_CHUNK = 5000


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a Redis call may raise when Redis (or one cluster node) cannot answer."""
    import redis
    from redis.exceptions import RedisClusterException

    return (redis.RedisError, RedisClusterException)


@dataclass(frozen=True)
class RedisTarget:
    """A parsed knowledge-store URL: what redis-py gets, whether it names a cluster, and the cluster's further seed
    nodes (host, port) beyond the URL's host."""

    url: str
    cluster: bool
    seeds: tuple[tuple[str, int], ...] = ()


def _seed(text: str, url: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserFacingError(f"invalid Redis URL {redact_url(url)}: seed node {text[:60]!r} is not host:port")
    return host.strip("[]"), int(port)


def parse_redis_url(url: str) -> RedisTarget:
    """Splits the cluster marker off a URL; a bad value is a UserFacingError naming the (redacted) URL."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise UserFacingError(f"invalid Redis URL {redact_url(url)}: {exc}") from None
    cluster = parts.scheme in CLUSTER_SCHEMES
    if not cluster and "cluster" not in {k.lower() for k, _ in parse_qsl(parts.query, keep_blank_values=True)}:
        return RedisTarget(url, False)  # untouched: redis-py reads it as it always did
    scheme = CLUSTER_SCHEMES.get(parts.scheme, parts.scheme)
    query = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key.lower() != "cluster":
            query.append((key, value))
        elif value.lower() in _TRUE:
            cluster = True
        elif value.lower() not in _FALSE:
            raise UserFacingError(
                f"invalid Redis URL {redact_url(url)}: cluster={value[:20]!r}, expected true or false"
            )
    if cluster:
        if scheme not in ("redis", "rediss"):
            raise UserFacingError(f"invalid Redis URL {redact_url(url)}: a cluster needs redis:// or rediss://")
        db = parts.path.strip("/") or dict(query).get("db", "0")
        if db != "0":
            raise UserFacingError(f"invalid Redis URL {redact_url(url)}: a Redis Cluster has database 0 only")
        query = [(k, v) for k, v in query if k != "db"]
        userinfo, at, hosts = parts.netloc.rpartition("@")
        first, *others = hosts.split(",")
        seeds = tuple(_seed(h, url) for h in others)
        parts = parts._replace(path="", netloc=f"{userinfo}{at}{first}")
        return RedisTarget(urlunsplit(parts._replace(scheme=scheme, query=urlencode(query))), True, seeds)
    return RedisTarget(urlunsplit(parts._replace(scheme=scheme, query=urlencode(query))), False)


@dataclass
class NodeReads:
    """Values read per node: `values[i]` is None where the key is absent or its node could not be asked
    (`unavailable[i]` then; `errors` holds one exception per failed node)."""

    values: list[bytes | None]
    unavailable: list[bool]
    errors: dict[str, BaseException] = field(default_factory=dict)


class KnowledgeRedis:
    """One interface over a single primary and a cluster, for the commands the publisher and the ranker send.

    The cluster client is created on first use (it connects while it is built), so that a ranker can start before
    the cluster answers; until then every call raises redis.ConnectionError."""

    def __init__(self, url: str | None = None, client=None, **client_kwargs):
        self.url = url
        self._client = client
        self._kwargs = client_kwargs
        if client is not None:
            from redis.cluster import RedisCluster

            self.cluster = isinstance(client, RedisCluster)
            return
        target = parse_redis_url(url)
        self.cluster = target.cluster
        self._target_url = target.url
        self._seeds = target.seeds
        from redis.connection import parse_url

        try:
            parse_url(target.url)  # a bad scheme or value fails now, not at the first request
        except ValueError as exc:
            raise UserFacingError(f"invalid Redis URL {redact_url(url)}: {redact_text(exc, url)}") from None
        if not self.cluster:
            import redis

            self._client = redis.Redis.from_url(target.url, **client_kwargs)
        else:
            # Slots of a dead primary without replica stay unserved: the client keeps serving the others.
            self._kwargs.setdefault("require_full_coverage", False)

    @property
    def client(self):
        """The redis-py client (redis.Redis or redis.cluster.RedisCluster)."""
        if self._client is None:
            import redis
            from redis.cluster import ClusterNode, RedisCluster
            from redis.exceptions import RedisClusterException

            seeds = [ClusterNode(host, port) for host, port in self._seeds]
            try:
                self._client = RedisCluster(url=self._target_url, startup_nodes=seeds, **self._kwargs)
            except RedisClusterException as exc:
                raise redis.ConnectionError(str(exc)) from exc
        return self._client

    def ensure_connected(self) -> None:
        """Builds the cluster client now if it is not yet (while the seeds answer); no error if it cannot."""
        try:
            _ = self.client
        except redis_errors():
            pass

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # -- slots ----------------------------------------------------------------------------------------------
    def _slot_groups(self, keys: Sequence[str | bytes]) -> dict[str, dict[int, list[int]]]:
        """Positions of the keys per node and slot, from the client's slot map (cluster only): one command per
        slot and one pipeline per node, without the cluster pipeline's per-command routing."""
        from redis.crc import key_slot
        from redis.exceptions import SlotNotCoveredError

        slots_cache = self.client.nodes_manager.slots_cache
        groups: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i, key in enumerate(keys):
            slot = key_slot(key.encode() if isinstance(key, str) else key)
            owners = slots_cache.get(slot)
            if not owners:
                raise SlotNotCoveredError(f"slot {slot} is not served by any node of the cluster")
            groups[owners[0].name][slot].append(i)
        return groups

    def _node_client(self, node: str):
        return self.client.get_redis_connection(self.client.get_node(node_name=node))

    def _per_slot(self, node: str, slots: dict[int, list[int]], add: Callable[[object, list[int]], None]) -> list:
        """One pipeline on `node`: `add(pipe, positions)` queues the command of each slot; returns the replies."""
        pipe = self._node_client(node).pipeline(transaction=False)
        for positions in slots.values():
            add(pipe, positions)
        return pipe.execute()

    # -- writes ---------------------------------------------------------------------------------------------
    def set_many(self, keys: Sequence[str], values: Sequence[bytes]) -> None:
        """SET of every key (no TTL): one MSET on a primary, one MSET per slot (pipelined per node) on a cluster."""
        if not keys:
            return
        if not self.cluster:
            pipe = self.client.pipeline(transaction=False)
            pipe.mset(dict(zip(keys, values, strict=True)))
            pipe.execute()
            return
        for node, slots in self._slot_groups(keys).items():
            self._per_slot(node, slots, lambda pipe, pos: pipe.mset({keys[i]: values[i] for i in pos}))

    # -- multi-key reads ---------------------------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """GET of every key, in order: MGET on one primary, one MGET per slot (pipelined per node) on a cluster."""
        out: list[bytes | None] = []
        for start in range(0, len(keys), MGET_CHUNK):
            chunk = list(keys[start : start + MGET_CHUNK])
            if not self.cluster:
                out.extend(self.client.mget(chunk))
                continue
            values: list[bytes | None] = [None] * len(chunk)
            for node, slots in self._slot_groups(chunk).items():
                self._fill(values, slots, self._node_mgets(node, slots, chunk))
            out.extend(values)
        return out

    @staticmethod
    def _fill(values: list, slots: dict[int, list[int]], replies: list) -> None:
        for positions, reply in zip(slots.values(), replies, strict=True):
            for i, value in zip(positions, reply, strict=True):
                values[i] = value

    def strlen_many(self, keys: Sequence[str]) -> list[int]:
        """The byte length of every key's value (0 when missing), read with the MGETs of get_many: in redis-py one
        multi-key command costs far less than one STRLEN per key."""
        return [0 if v is None else len(v) for v in self.get_many(keys)]

    def exists_count(self, keys: Sequence[str]) -> int:
        """How many of the keys exist: one EXISTS on one primary, one EXISTS per slot on a cluster."""
        if not keys:
            return 0
        if not self.cluster:
            return int(self.client.exists(*keys))
        return sum(
            int(n)
            for node, slots in self._slot_groups(keys).items()
            for n in self._per_slot(node, slots, lambda pipe, pos: pipe.exists(*[keys[i] for i in pos]))
        )

    # -- per node ------------------------------------------------------------------------------------------
    def node_of(self, key: str) -> str:
        """The name of the node serving `key` (SINGLE_NODE on one primary); from the client's slot map."""
        if not self.cluster:
            return SINGLE_NODE
        return self.client.get_node_from_key(key).name

    def get_by_node(self, keys: Sequence[str], skip: Callable[[str], bool] = lambda node: False) -> NodeReads:
        """GET of every key with one round trip per node, each node's failure kept to its own keys: the request
        path degrades only where a node is down. Nodes for which `skip(name)` is true are not asked."""
        reads = NodeReads([None] * len(keys), [False] * len(keys))
        if not keys:
            return reads
        try:
            groups = self._slot_groups(keys) if self.cluster else {SINGLE_NODE: {0: list(range(len(keys)))}}
        except redis_errors() as exc:  # no slot map yet (cluster unreachable since start)
            reads.errors[SINGLE_NODE] = exc
            reads.unavailable = [True] * len(keys)
            return reads
        for node, slots in groups.items():
            if not skip(node):
                try:
                    self._fill(reads.values, slots, self._node_mgets(node, slots, keys))
                    continue
                except redis_errors() as exc:
                    reads.errors[node] = exc
                    self._after_node_error(exc)
            for positions in slots.values():
                for i in positions:
                    reads.unavailable[i] = True
        return reads

    def _node_mgets(self, node: str, slots: dict[int, list[int]], keys: Sequence[str]) -> list:
        if not self.cluster:
            return [self.client.mget([keys[i] for i in positions]) for positions in slots.values()]
        return self._per_slot(node, slots, lambda pipe, pos: pipe.mget([keys[i] for i in pos]))

    def _after_node_error(self, exc: BaseException) -> None:
        """A moved slot or a cluster change: reload the slot map so the next call goes to the right node."""
        from redis.exceptions import AskError, ClusterDownError, ConnectionError

        if self.cluster and isinstance(exc, (AskError, ClusterDownError, ConnectionError)):
            try:
                self.client.nodes_manager.initialize()
            except redis_errors():
                pass  # no node reachable now; the next call tries again

    def primaries(self) -> list[tuple[str, object]]:
        """(node name, a plain client of that node) for every primary (one entry on a single primary)."""
        if not self.cluster:
            return [(SINGLE_NODE, self.client)]
        return [(n.name, self.client.get_redis_connection(n)) for n in self.client.get_primaries()]

    def scan_node(self, node_client, pattern: str, count: int = 5000) -> Iterator[bytes]:
        """SCAN MATCH on one node (a cluster node holds only its own slots)."""
        yield from node_client.scan_iter(match=pattern, count=count)

    def unlink_on_node(self, node_client, keys: Sequence[bytes]) -> int:
        """UNLINK keys that one node holds: one command on a primary, one per slot on a cluster node."""
        if not keys:
            return 0
        if not self.cluster:
            return int(node_client.unlink(*keys))
        from redis.crc import key_slot

        by_slot: dict[int, list[bytes]] = defaultdict(list)
        for key in keys:
            by_slot[key_slot(key)].append(key)
        pipe = node_client.pipeline(transaction=False)
        for slot_keys in by_slot.values():
            pipe.unlink(*slot_keys)
        return sum(int(n) for n in pipe.execute())


def connect(url: str, client=None, **client_kwargs) -> KnowledgeRedis:
    """The store named by `url`, or `client` (a redis.Redis / RedisCluster someone built) wrapped as one."""
    return KnowledgeRedis(url, client=client, **client_kwargs)
