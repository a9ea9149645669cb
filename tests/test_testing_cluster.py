"""resilient_grpc.testing.cluster: three masters own all 16384 slots, each with a replica; a whole
cluster stopped and started again comes back from its nodes' files; ``with`` removes the directory
it made; missing binaries are ServerUnavailableError."""

from __future__ import annotations

import pytest
import redis
import redis.cluster

from resilient_grpc.testing.cluster import RedisCluster, make_redis_cluster
from resilient_grpc.testing.servers import ServerUnavailableError
from tests.private_servers import unavailable


def test_three_masters_serve_every_slot(redis_cluster: RedisCluster) -> None:
    masters = redis_cluster.masters()
    assert len(masters) == 3
    slots = sorted(
        slot for ranges in masters.values() for low, high in ranges for slot in range(low, high + 1)
    )
    assert slots == list(range(16384))
    client = redis.cluster.RedisCluster.from_url(redis_cluster.startup_url)
    assert len(client.get_primaries()) == 3 and len(client.get_replicas()) == 3
    client.set("{a}x", b"1")
    assert client.get("{a}x") == b"1"
    client.close()


def test_a_stopped_cluster_starts_again_and_close_removes_its_directory() -> None:
    try:
        cluster = RedisCluster()
    except ServerUnavailableError as error:
        unavailable("Redis", str(error))
    assert not any(node.running for node in cluster.nodes) and not cluster.running
    with cluster:
        assert all(node.running for node in cluster.nodes) and cluster.running
        before = cluster.masters()
        assert len(before) == 3
        cluster.stop()  # every node crashes at once: files kept
        assert not any(node.running for node in cluster.nodes) and not cluster.running
        assert all((node.directory / "nodes.conf").is_file() for node in cluster.nodes)
        cluster.start()  # no second "redis-cli --cluster create": the nodes rejoin
        assert sorted(cluster.masters().values()) == sorted(before.values())
        client = redis.cluster.RedisCluster.from_url(cluster.startup_url)
        client.set("{b}y", b"2")
        assert client.get("{b}y") == b"2"
        client.close()
    assert not any(node.running for node in cluster.nodes)
    assert not cluster.directory.exists()


def test_missing_binaries_are_server_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ServerUnavailableError):
        RedisCluster()
    assert make_redis_cluster() is None
