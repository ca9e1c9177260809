"""Redis sizing: bytes per user measured with MEMORY USAGE on a local Redis Cluster, per vector format and dim,
the publish rate (keys/s) on the cluster next to a single primary, and the table for 1M / 10M / 100M users.

A synthetic snapshot (Amazon-like 14-character user ids, the version name the build writes) is published with the
real publisher to a 3-primary local cluster and to one redis-server, once per format and dim. Per-key memory comes
from MEMORY USAGE over a sample of keys (what `redis-cli --memkeys` reports) and, as a cross-check, from the nodes'
`used_memory` growth per user. The table extrapolates linearly from the measured bytes per user:
  memory per version  users x (vector key + answer key when answers are stored)
  peak memory         3 versions: llm4msr publishes the new version next to the current one and the one it keeps
                      for rollback (keep_old=1), then deletes the oldest
  nodes               ceil(peak / usable memory per node), at least 3 (a cluster's minimum of primaries)
  publish time        users x keys per user / the measured cluster rate (one publishing process)
Usage: python bench/redis_sizing_bench.py [--users 20000] [--dims 576,256,128] [--node-gib 25] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from offline.knowledge.publish import publish_snapshot  # noqa: E402  (after the path set-up above)
from shared.knowledge import keys as K  # noqa: E402
from shared.knowledge.snapshot import (  # noqa: E402
    DEFAULT_USER_ID,
    KnowledgeSpace,
    KnowledgeTable,
    Manifest,
    write_manifest,
    write_table,
)
from shared.knowledge.vector_codec import FORMATS  # noqa: E402
from tests.conftest import RedisServer  # noqa: E402
from tests.fixtures_cluster import start_cluster  # noqa: E402

VERSION = "20240101T000000Z-1a2b3c4d"  # the length of a build's version name (it is part of every key)
SCALES = (1_000_000, 10_000_000, 100_000_000)
VERSIONS_AT_PEAK = 3
MIN_PRIMARIES = 3


@dataclass
class Measured:
    """One format at one dim: bytes per key by MEMORY USAGE, used_memory growth per user, publish rates."""

    format: str
    dim: int
    value_bytes: int
    vector_key_bytes: float
    answer_key_bytes: float
    used_memory_per_user: float
    cluster_keys_per_s: float
    single_keys_per_s: float
    keys: int


def user_ids(n: int, seed: int = 0) -> list[str]:
    """Amazon reviewer-like ids: 'A' + 13 upper-case letters and digits."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    return ["A" + "".join(row) for row in alphabet[rng.integers(0, len(alphabet), size=(n, 13))]]


def write_sizing_snapshot(root: Path, users: int, dim: int, answer_bytes: int) -> Path:
    """Users with answers of `answer_bytes` characters (generate mode), 100 items, 2 scenarios."""
    rng = np.random.default_rng(dim)
    out = root / f"d{dim}" / VERSION
    out.mkdir(parents=True)
    ids = {"scenario": ["arts_crafts", "office"], "user": user_ids(users), "item": [f"B{i:09d}" for i in range(100)]}
    for level, level_ids in ids.items():
        answer = ("x" * answer_bytes) if level != "item" else ""
        emb = rng.normal(size=(len(level_ids), dim)).astype(np.float32)
        table = KnowledgeTable(level_ids, emb, ["0" * 64] * len(level_ids), [answer] * len(level_ids))
        write_table(out / f"{level}s.parquet", table)
    write_table(
        out / "defaults.parquet", KnowledgeTable([DEFAULT_USER_ID], np.zeros((1, dim), np.float32), ["d"], [""])
    )
    space = KnowledgeSpace(
        model="sizing", template_sha256="0" * 64, pooling="mean", mode="generate", raw_dim=dim, dim=dim
    )
    counts = {f"{lv}s": len(v) for lv, v in ids.items()}
    write_manifest(out, Manifest(VERSION, "2024-01-01T00:00:00Z", space, "sizing", "sizing", counts))
    return out


def used_memory(ports: list[int]) -> int:
    import redis

    total = 0
    for port in ports:
        with redis.Redis(port=port) as r:
            total += int(r.info("memory")["used_memory"])
    return total


def flush(ports: list[int]) -> None:
    import redis

    for port in ports:
        with redis.Redis(port=port) as r:
            r.flushall()


def timed_publish(snapshot: Path, url: str, vector_format: str) -> float:
    start = time.perf_counter()
    publish_snapshot(snapshot, url, keep_old=0, vector_format=vector_format)
    return time.perf_counter() - start


def measure(snapshot: Path, users: list[str], fmt: str, cluster, single: RedisServer, sample: int) -> Measured:
    """Publishes to the cluster (memory, rate) and to the single primary (rate); both are emptied afterwards."""
    ports = [n.port for n in cluster.nodes]
    n_keys = 2 * len(users) + 2 * 2 + 100 + 3 + 2  # users' vectors and answers, scenarios, items, id lists, meta
    flush(ports)
    before = used_memory(ports)
    cluster_s = timed_publish(snapshot, cluster.url, fmt)
    grown = used_memory(ports) - before
    rc = cluster.client()
    picked = np.random.default_rng(1).choice(len(users), size=min(sample, len(users)), replace=False)
    vec = [rc.memory_usage(K.user_key(VERSION, users[i]), samples=0) for i in picked]
    ans = [rc.memory_usage(K.response_key(VERSION, "user", users[i]), samples=0) for i in picked]
    value_bytes = int(rc.strlen(K.user_key(VERSION, users[0])))
    rc.close()
    flush(ports)
    single_s = timed_publish(snapshot, single.url, fmt)
    single.client().flushall()
    return Measured(
        format=fmt,
        dim=int(snapshot.parent.name[1:]),
        value_bytes=value_bytes,
        vector_key_bytes=float(np.mean(vec)),
        answer_key_bytes=float(np.mean(ans)),
        used_memory_per_user=grown / len(users),
        cluster_keys_per_s=n_keys / cluster_s,
        single_keys_per_s=n_keys / single_s,
        keys=n_keys,
    )


def extrapolate(m: Measured, node_gib: float, answers: bool) -> list[dict]:
    """Memory, publish time and nodes for SCALES users, from the measured bytes and rate."""
    per_user = m.vector_key_bytes + (m.answer_key_bytes if answers else 0.0)
    keys_per_user = 2 if answers else 1
    rows = []
    for users in SCALES:
        version_gib = users * per_user / 2**30
        peak_gib = VERSIONS_AT_PEAK * version_gib
        rows.append(
            {
                "users": users,
                "format": m.format,
                "dim": m.dim,
                "answers": answers,
                "bytes_per_user": per_user,
                "version_gib": version_gib,
                "peak_gib": peak_gib,
                "nodes": max(MIN_PRIMARIES, math.ceil(peak_gib / node_gib)),
                "publish_min": users * keys_per_user / m.cluster_keys_per_s / 60,
            }
        )
    return rows


def print_tables(results: list[Measured], rows: list[dict], node_gib: float, users: int) -> None:
    print(f"measured on a local 3-primary cluster, {users:,} users per run (MEMORY USAGE, mean over a sample)")
    print(
        f"{'format':<8}{'dim':>5}{'value B':>9}{'vector key B':>14}{'answer key B':>14}{'used_memory/user B':>20}"
        f"{'cluster keys/s':>16}{'single keys/s':>15}"
    )
    for m in results:
        print(
            f"{m.format:<8}{m.dim:>5}{m.value_bytes:>9}{m.vector_key_bytes:>14.0f}{m.answer_key_bytes:>14.0f}"
            f"{m.used_memory_per_user:>20.0f}{m.cluster_keys_per_s:>16,.0f}{m.single_keys_per_s:>15,.0f}"
        )
    print(f"\nsizing (vectors only; peak = {VERSIONS_AT_PEAK} versions; nodes at {node_gib:g} GiB usable each)")
    print(
        f"{'users':>12}{'format':>9}{'dim':>5}{'B/user':>8}{'version GiB':>13}{'peak GiB':>10}{'nodes':>7}"
        f"{'publish min':>13}"
    )
    for r in rows:
        if r["answers"]:
            continue
        print(
            f"{r['users']:>12,}{r['format']:>9}{r['dim']:>5}{r['bytes_per_user']:>8.0f}{r['version_gib']:>13.1f}"
            f"{r['peak_gib']:>10.1f}{r['nodes']:>7}{r['publish_min']:>13.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000, help="users per measured publish")
    parser.add_argument("--dims", default="576,256,128", help="comma list of vector dims")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--answer-bytes", type=int, default=180, help="answer text per user (SmolLM2, 64 tokens)")
    parser.add_argument("--node-gib", type=float, default=25.0, help="usable memory per primary (maxmemory)")
    parser.add_argument("--sample", type=int, default=2000, help="keys sampled with MEMORY USAGE")
    parser.add_argument("--json", help="write results as JSON here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llm4msr-sizing-"))
    cluster = start_cluster(work / "cluster")
    single = RedisServer(work / "single")
    single.workdir.mkdir(parents=True)
    single.start()
    results: list[Measured] = []
    try:
        for dim in (int(d) for d in args.dims.split(",")):
            snapshot = write_sizing_snapshot(work / "kn", args.users, dim, args.answer_bytes)
            users = user_ids(args.users)
            for fmt in args.formats.split(","):
                results.append(measure(snapshot, users, fmt, cluster, single, args.sample))
    finally:
        cluster.stop()
        single.stop()
    rows = [row for m in results for answers in (False, True) for row in extrapolate(m, args.node_gib, answers)]
    print_tables(results, rows, args.node_gib, args.users)
    if args.json:
        meta = {"users_per_run": args.users, "node_gib": args.node_gib, "answer_bytes": args.answer_bytes}
        meta.update({"machine": platform.platform(), "redis_py": __import__("redis").__version__})
        Path(args.json).write_text(
            json.dumps({"meta": meta, "measured": [asdict(m) for m in results], "sizing": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
