"""The Redis Cluster fixture itself: three masters own all 16384 slots, each with a replica."""

from __future__ import annotations

import redis
import redis.cluster

from tests.redis_cluster import RedisCluster


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
