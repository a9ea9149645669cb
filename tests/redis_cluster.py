"""A real Redis Cluster per test session: six ``redis-server --cluster-enabled yes`` processes on free
loopback ports, three masters and three replicas joined with ``redis-cli --cluster create``.

Tests may kill a master (:meth:`RedisCluster.kill`) and wait for its replica to be promoted
(:meth:`RedisCluster.wait_for_failover`); :meth:`RedisCluster.restart` brings a killed node back
(it rejoins as a replica). ``--cluster-node-timeout`` is short (2 s) so a failover takes seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from resilient_grpc.testing.servers import RedisServer, free_port

NODE_TIMEOUT_MS = 2000


def _client(port: int, timeout: float = 2.0) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=timeout, socket_connect_timeout=timeout
    )


def _command(port: int, *words: str, timeout: float = 2.0) -> Any:
    """One command to one node on a fresh connection (replies decoded to text where they are)."""
    client = _client(port, timeout)
    try:
        reply = client.execute_command(*words)
    finally:
        client.close()
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply


class RedisCluster:
    """Six nodes we own (3 masters, 3 replicas); ``start()`` creates the cluster, ``stop()`` kills all."""

    def __init__(self, server: str, cli: str, directory: Path) -> None:
        self.server = server
        self.cli = cli
        self.directory = directory
        self.nodes = [self._node(server, directory / f"node-{index}") for index in range(6)]

    @staticmethod
    def _node(binary: str, directory: Path) -> RedisServer:
        settings = {
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",
            "cluster-port": str(free_port()),
            "cluster-node-timeout": str(NODE_TIMEOUT_MS),
            "repl-ping-replica-period": "1",
            "logfile": str(directory / "redis.log"),
        }
        return RedisServer(settings, binary=binary, directory=directory)

    @property
    def startup_url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                self.cli, "--cluster", "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas", "1", "--cluster-yes",
            ],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.wait_until_ok()

    def wait_until_ok(self, timeout: float = 30.0) -> None:
        """Until every running node reports ``cluster_state:ok``, 3 masters serve all slots and,
        when all six nodes run, each master has a replica in sync."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = [n for n in self.nodes if n.process is not None]
            try:
                states = [_command(n.port, "CLUSTER", "INFO") for n in running]
                masters = self.masters()
                healthy = all("cluster_state:ok" in s for s in states) and len(masters) == 3
                if healthy and (
                    len(running) < len(self.nodes)
                    or (
                        all(self._replicas_served_by(n.port) == 3 for n in running)
                        and all(self._in_sync(n.port) for n in running)
                    )
                ):
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok in time")

    def wait_for_failover(self, victim: int, timeout: float = 30.0) -> None:
        """Until every running node sees a cluster whose 3 masters (with all slots) no longer
        include the killed master ``victim``: its replica has been promoted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = [n.port for n in self.nodes if n.process is not None]
            try:
                views = [self.masters(seen_by=port) for port in running]
                states = [_command(port, "CLUSTER", "INFO") for port in running]
                if all(len(view) == 3 and victim not in view for view in views) and all(
                    "cluster_state:ok" in state for state in states
                ):
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"no replica of killed master {victim} was promoted in time")

    def masters(self, seen_by: int | None = None) -> dict[int, list[tuple[int, int]]]:
        """Port of each live master -> its slot ranges, as node ``seen_by`` (default: the first
        live node) sees them."""
        if seen_by is None:
            seen_by = next(n for n in self.nodes if n.process is not None).port
        masters: dict[int, list[tuple[int, int]]] = {}
        for line in _command(seen_by, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if len(fields) < 8 or "master" not in fields[2] or "fail" in fields[2]:
                continue
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            ranges = []
            for part in fields[8:]:
                if part.startswith("["):
                    continue
                low, _, high = part.partition("-")
                ranges.append((int(low), int(high or low)))
            if ranges:
                masters[port] = ranges
        return masters

    def _in_sync(self, port: int) -> bool:
        """A master, or a replica whose link to its master is up (its first sync done: a
        replica that never synced cannot be promoted when its master dies)."""
        client = _client(port)
        try:
            info = client.info("replication")
        finally:
            client.close()
        return info.get("role") == "master" or info.get("master_link_status") == "up"

    def _replicas_served_by(self, port: int) -> int:
        """How many replicas node ``port`` lists in CLUSTER SLOTS (clients learn the topology
        there; a replica appears once gossip carries a replication offset for it)."""
        return sum(len(section) - 3 for section in _command(port, "CLUSTER", "SLOTS"))

    def master_of(self, slot: int) -> int:
        for port, ranges in self.masters().items():
            if any(low <= slot <= high for low, high in ranges):
                return port
        raise LookupError(f"no master serves slot {slot}")

    def replica_of(self, master: int) -> int:
        """The port of the (healthy) replica of master ``master``."""
        node = next(n for n in self.nodes if n.process is not None)
        lines = [line.split() for line in _command(node.port, "CLUSTER", "NODES").splitlines()]
        ids = {fields[0]: int(fields[1].split("@")[0].rsplit(":", 1)[1]) for fields in lines}
        for fields in lines:
            if "slave" in fields[2] and "fail" not in fields[2] and ids.get(fields[3]) == master:
                return ids[fields[0]]
        raise LookupError(f"master {master} has no healthy replica")

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def kill(self, port: int) -> None:
        """SIGKILL one node (no shutdown save, no goodbye to the cluster)."""
        self.node(port).stop()

    def restart(self, port: int) -> None:
        """Bring a killed node back with its cluster config (it rejoins, as a replica if its
        master role was taken over)."""
        self.node(port).start()

    def stop(self, *, keep_files: bool = False) -> None:
        """Kill every node; remove their directories unless ``keep_files`` (logs to read)."""
        for node in self.nodes:
            node.stop()
        if not keep_files:
            shutil.rmtree(self.directory, ignore_errors=True)


def make_redis_cluster() -> RedisCluster | None:
    """A started cluster, or ``None`` without ``redis-server`` and ``redis-cli`` on PATH."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        return None
    cluster = RedisCluster(server, cli, Path(tempfile.mkdtemp(prefix="resilient-grpc-cluster-")))
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster
