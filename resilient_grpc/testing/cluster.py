"""A private Redis Cluster for tests and benchmarks: six ``redis-server --cluster-enabled yes``
processes on free loopback ports, three masters and three replicas joined with
``redis-cli --cluster create``.

A test of :class:`~resilient_grpc.stores.RedisStore` on a cluster (``cluster=True``) wants to kill
a master in the middle of its calls and watch a replica take over::

    with RedisCluster() as cluster:
        store = RedisStore.from_url(cluster.startup_url, cluster=True)
        ...
        victim = cluster.master_of(slot)
        cluster.kill(victim)               # SIGKILL: no shutdown save, no goodbye
        cluster.wait_for_failover(victim)  # its replica was promoted
        cluster.restart(victim)            # it rejoins, as a replica of the new master

Each node is a :class:`~resilient_grpc.testing.servers.RedisServer` in a directory of its own
under :attr:`RedisCluster.directory`; ``cluster-node-timeout`` is short (2 s by default) so a
failover takes seconds. Unlike :mod:`resilient_grpc.testing.servers`, this module reads the
cluster's state with the ``redis`` client (``pip install 'resilient-grpc[redis]'``).
:class:`~resilient_grpc.testing.servers.ServerUnavailableError` is raised when ``redis-server`` or
``redis-cli`` is missing, so a test suite can skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

try:
    import redis
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "RedisCluster needs the redis client: pip install 'resilient-grpc[redis]'"
    ) from error

from resilient_grpc.testing.servers import (
    HOST,
    Launcher,
    RedisServer,
    ServerUnavailableError,
    free_port,
)

__all__ = ["RedisCluster", "make_redis_cluster"]

#: the default ``cluster-node-timeout``: a master unreachable this long is failed over
NODE_TIMEOUT_MS = 2000


def _client(port: int, timeout: float = 2.0) -> redis.Redis:
    return redis.Redis(host=HOST, port=port, socket_timeout=timeout, socket_connect_timeout=timeout)


def _command(port: int, *words: str, timeout: float = 2.0) -> Any:
    """One command to one node on a fresh connection (replies decoded to text where they are)."""
    client = _client(port, timeout)
    try:
        reply = client.execute_command(*words)  # type: ignore[no-untyped-call]
    finally:
        client.close()
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply


def _port_of(address: str) -> int:
    """The client port of a ``CLUSTER NODES`` address, ``127.0.0.1:7000@17000``."""
    return int(address.split("@")[0].rsplit(":", 1)[1])


class RedisCluster(Launcher):
    """Six ``redis-server`` nodes we own (3 masters, 3 replicas) on 127.0.0.1.

    Constructing does not start it: :meth:`start` or ``with`` does (the first start creates the
    cluster with ``redis-cli --cluster create``; a later one restarts the nodes, which rejoin from
    their ``nodes.conf``). :meth:`stop` kills every node and keeps their files; :meth:`close` also
    removes :attr:`directory` if the cluster made it. :meth:`kill` and :meth:`restart` crash and
    bring back one node.

    ``binary`` and ``cli`` default to ``redis-server`` and ``redis-cli`` on ``PATH``;
    ``node_timeout_ms`` is each node's ``cluster-node-timeout``.
    """

    def __init__(
        self,
        *,
        binary: str | None = None,
        cli: str | None = None,
        directory: str | os.PathLike[str] | None = None,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
        start_timeout: float = 60.0,
    ) -> None:
        found_binary = binary or shutil.which("redis-server")
        found_cli = cli or shutil.which("redis-cli")
        if found_binary is None or found_cli is None:
            raise ServerUnavailableError("redis-server and redis-cli must both be on PATH")
        #: the ``redis-server`` and ``redis-cli`` executables
        self.binary, self.cli = found_binary, found_cli
        self.node_timeout_ms = node_timeout_ms
        #: seconds :meth:`start` waits for the cluster to be created and healthy
        self.start_timeout = start_timeout
        # the nodes' directories in it: ``node-0`` ... ``node-5`` (data, nodes.conf, redis.log)
        super().__init__(directory, "resilient-grpc-cluster-")
        self._created = False
        #: the six nodes, each a :class:`RedisServer` on a port of its own
        self.nodes = [self._node(self.directory / f"node-{index}") for index in range(6)]

    def _node(self, directory: Path) -> RedisServer:
        settings = {
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",
            "cluster-port": str(free_port()),
            "cluster-node-timeout": str(self.node_timeout_ms),
            "repl-ping-replica-period": "1",
            "logfile": str(directory / "redis.log"),
        }
        return RedisServer(settings, binary=self.binary, directory=directory)

    @property
    def startup_url(self) -> str:
        """``redis://127.0.0.1:<port of node 0>/0``: a cluster client learns the rest from it."""
        return f"redis://{HOST}:{self.nodes[0].port}/0"

    @property
    def ports(self) -> list[int]:
        """The six nodes' ports, masters and replicas."""
        return [node.port for node in self.nodes]

    def start(self) -> None:
        """Start every node, create the cluster the first time, and wait until it is healthy
        (:meth:`wait_until_ok`). On failure every node is stopped again."""
        try:
            for node in self.nodes:
                if node.process is None:
                    node.start()
            if not self._created:
                subprocess.run(
                    [
                        self.cli, "--cluster", "create",
                        *(f"{HOST}:{node.port}" for node in self.nodes),
                        "--cluster-replicas", "1", "--cluster-yes",
                    ],
                    check=True, capture_output=True, timeout=self.start_timeout,
                )  # fmt: skip
                self._created = True
            self.wait_until_ok(self.start_timeout)
        except BaseException:
            self.stop()
            raise

    def wait_until_ok(self, timeout: float = 30.0) -> None:
        """Until every running node reports ``cluster_state:ok``, 3 masters serve all slots and,
        when all six nodes run, each master has a replica in sync; ``RuntimeError`` after
        ``timeout`` s."""
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
        include the killed master ``victim``: its replica has been promoted; ``RuntimeError``
        after ``timeout`` s."""
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
        running node) sees them."""
        if seen_by is None:
            seen_by = next(n for n in self.nodes if n.process is not None).port
        masters: dict[int, list[tuple[int, int]]] = {}
        for line in _command(seen_by, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if len(fields) < 8 or "master" not in fields[2] or "fail" in fields[2]:
                continue
            ranges = []
            for part in fields[8:]:
                if part.startswith("["):
                    continue
                low, _, high = part.partition("-")
                ranges.append((int(low), int(high or low)))
            if ranges:
                masters[_port_of(fields[1])] = ranges
        return masters

    def _in_sync(self, port: int) -> bool:
        """A master, or a replica whose link to its master is up (its first sync done: a
        replica that never synced cannot be promoted when its master dies)."""
        client = _client(port)
        try:
            info = client.info("replication")
        finally:
            client.close()
        return bool(info.get("role") == "master" or info.get("master_link_status") == "up")

    def _replicas_served_by(self, port: int) -> int:
        """How many replicas node ``port`` lists in CLUSTER SLOTS (clients learn the topology
        there; a replica appears once gossip carries a replication offset for it)."""
        return sum(len(section) - 3 for section in _command(port, "CLUSTER", "SLOTS"))

    def master_of(self, slot: int) -> int:
        """The port of the master serving hash slot ``slot``."""
        for port, ranges in self.masters().items():
            if any(low <= slot <= high for low, high in ranges):
                return port
        raise LookupError(f"no master serves slot {slot}")

    def replica_of(self, master: int) -> int:
        """The port of the (healthy) replica of master ``master``."""
        node = next(n for n in self.nodes if n.process is not None)
        lines = [line.split() for line in _command(node.port, "CLUSTER", "NODES").splitlines()]
        ids = {fields[0]: _port_of(fields[1]) for fields in lines}
        for fields in lines:
            if "slave" in fields[2] and "fail" not in fields[2] and ids.get(fields[3]) == master:
                return ids[fields[0]]
        raise LookupError(f"master {master} has no healthy replica")

    def node(self, port: int) -> RedisServer:
        """The node listening on ``port``."""
        return next(n for n in self.nodes if n.port == port)

    def kill(self, port: int) -> None:
        """SIGKILL one node (no shutdown save, no goodbye to the cluster)."""
        self.node(port).stop()

    def restart(self, port: int) -> None:
        """Bring a killed node back with its cluster config (it rejoins, as a replica if its
        master role was taken over)."""
        self.node(port).start()

    def stop(self) -> None:
        """SIGKILL every node, keeping their files (logs to read, ``nodes.conf`` for a later
        :meth:`start`)."""
        for node in self.nodes:
            node.stop()

    @property
    def running(self) -> bool:
        """Whether every node was started and not stopped (one may have died since)."""
        return all(node.process is not None for node in self.nodes)


def make_redis_cluster() -> RedisCluster | None:
    """A started cluster in a fresh temp directory (:meth:`RedisCluster.close` removes it), or
    ``None`` without ``redis-server`` and ``redis-cli`` on ``PATH``."""
    try:
        cluster = RedisCluster()
    except ServerUnavailableError:
        return None
    try:
        cluster.start()
    except BaseException:
        cluster.close()
        raise
    return cluster
