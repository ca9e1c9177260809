"""A real Redis Cluster for tests and benches: N `redis-server --cluster-enabled yes` primaries on loopback ports,
joined by `redis-cli --cluster create ... --cluster-yes` (no replicas).

Register the fixture in a test module with `from tests.fixtures_cluster import redis_cluster  # noqa: F401`.
The nodes run with `cluster-require-full-coverage no`, as deploy/redis-cluster.md recommends: when one primary
dies, the others keep answering for their slots, so only the dead node's keys fall back.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import RedisServer, free_port


def _free_port_pair() -> tuple[int, int]:
    """A client port and a cluster-bus port, both free now (the bus port is set explicitly, not port + 10000)."""
    port = free_port()
    bus = free_port()
    while bus == port:
        bus = free_port()
    return port, bus


class ClusterNode(RedisServer):
    """One cluster-enabled redis-server; like the suite's RedisServer it can be killed and restarted."""

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.port, self.bus_port = _free_port_pair()

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server; .ci/run does this)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), "--cluster-enabled", "yes", "--cluster-port", str(self.bus_port)]
        args += ["--cluster-config-file", f"nodes-{self.port}.conf", "--cluster-node-timeout", "1000"]
        args += ["--cluster-require-full-coverage", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"cluster node on port {self.port} did not start")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class RedisClusterProcesses:
    """The running cluster: its nodes and the URL that names it for llm4msr (`redis+cluster://host:port,...`)."""

    nodes: list[ClusterNode]
    workdir: Path
    stopped: list[ClusterNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Every node as a seed, as deploy/redis-cluster.md recommends."""
        return f"redis+cluster://{','.join(n.address for n in self.nodes)}/0"

    def client(self):
        """A plain redis-py cluster client (the tests' own view; llm4msr connects through its URL)."""
        from redis.cluster import RedisCluster

        return RedisCluster(host="127.0.0.1", port=self.nodes[0].port)

    def node_of(self, key: str) -> ClusterNode:
        """The node that serves `key`'s slot (as the cluster itself reports it)."""
        import redis

        slot = int(redis.Redis(port=self.nodes[0].port).cluster("keyslot", key))
        for node in self.nodes:
            for start, end, *_ in _slot_ranges(node):
                if start <= slot <= end:
                    return node
        raise LookupError(f"no node serves slot {slot}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _slot_ranges(node: ClusterNode) -> list[list[int]]:
    import redis

    with redis.Redis(port=node.port) as r:
        me = r.execute_command("CLUSTER", "MYID").decode()
        return [[s[0], s[1]] for s in r.execute_command("CLUSTER", "SLOTS") if s[2][2].decode() == me]


def start_cluster(workdir: Path, n_nodes: int = 3, timeout: float = 30.0) -> RedisClusterProcesses:
    """Starts n_nodes primaries, joins them with redis-cli --cluster create and waits for cluster_state:ok."""
    import redis

    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.fail("redis-cli is not installed (apt-get install redis-tools; .ci/run does this)")
    nodes = [ClusterNode(workdir / f"node{i}") for i in range(n_nodes)]
    cluster = RedisClusterProcesses(nodes, workdir)
    try:
        for node in nodes:
            node.start()
        subprocess.run(
            [cli, "--cluster", "create", *[n.address for n in nodes], "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = []
            for node in nodes:
                with redis.Redis(port=node.port) as r:
                    states.append(r.cluster("info").get("cluster_state"))
            if all(s == "ok" for s in states):
                return cluster
            time.sleep(0.1)
        raise RuntimeError(f"cluster not ok after {timeout} s: {states}")
    except BaseException:
        cluster.stop()
        raise


@pytest.fixture
def redis_cluster(tmp_path) -> Iterator[RedisClusterProcesses]:
    cluster = start_cluster(tmp_path / "cluster")
    yield cluster
    cluster.stop()
