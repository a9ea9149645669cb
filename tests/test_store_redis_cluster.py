"""RedisStore on a real Redis Cluster (3 masters, 3 replicas): records spread over every master,
one settings WARNING for the whole cluster, a precise error when the cluster is not there, and
``replica_acks`` (Redis WAIT): a claim and a completion are on a replica before they count.
(The store contract and the multi-process dedup tests also run on the cluster.)"""

from __future__ import annotations

import logging

import pytest
import redis
import redis.cluster

from resilient_grpc.core.dedup import Outcome, fingerprint, scoped_key
from resilient_grpc.stores import RedisStore, StoreUnavailableError
from resilient_grpc.testing.cluster import RedisCluster
from resilient_grpc.testing.servers import free_port
from tests.test_store_contract import Blocking

FP = fingerprint(b"request")


def test_records_spread_over_every_master(redis_cluster: RedisCluster) -> None:
    store = RedisStore.from_url(redis_cluster.startup_url, cluster=True, check_config=False)
    client = redis.cluster.RedisCluster.from_url(redis_cluster.startup_url)
    slots = set()
    for index in range(60):
        key = scoped_key("tenant", f"order-{index}")
        claim = store.claim(key, FP, lease=30)
        assert claim.token is not None
        assert store.complete(key, claim.token, Outcome(responses=(b"ok",)))
        slots.add(client.keyslot(store.layout.name(key)))
    masters = {redis_cluster.master_of(slot) for slot in slots}
    assert len(slots) == 60 and masters == set(redis_cluster.masters())
    for port in masters:  # each master holds some of the records, none holds all
        node = redis.Redis(host="127.0.0.1", port=port)
        assert 0 < node.dbsize() < 60
        node.close()
    client.close()
    store.close()


def test_one_warning_names_the_unsafe_settings_of_the_cluster_nodes(
    redis_cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="resilient_grpc.stores.redis")
    store = RedisStore.from_url(redis_cluster.startup_url, cluster=True)
    for index in range(3):
        store.claim(f"k{index}", FP, lease=5)
    warnings = [r.getMessage() for r in caplog.records if r.name == "resilient_grpc.stores.redis"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("Redis at cluster 127.0.0.1:")
    assert 'appendonly no and save ""' in warnings[0]
    for port in redis_cluster.ports:  # every node, masters and replicas, is named
        assert f"127.0.0.1:{port}" in warnings[0].split("execute twice:")[1]
    store.close()


def test_no_cluster_there_is_a_precise_store_error() -> None:
    port = free_port()
    with pytest.raises(StoreUnavailableError, match=rf"^Redis Cluster at 127.0.0.1:{port} failed"):
        RedisStore.from_url(f"redis://127.0.0.1:{port}", cluster=True, socket_connect_timeout=0.5)


def _waits(ports: list[int]) -> int:
    total = 0
    for port in ports:
        node = redis.Redis(host="127.0.0.1", port=port)
        total += int(node.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))
        node.close()
    return total


def _on_replica(cluster: RedisCluster, store: RedisStore, key: str) -> bytes | None:
    """The record of ``key`` as the replica of its master holds it right now."""
    client = redis.cluster.RedisCluster.from_url(cluster.startup_url)
    name = store.layout.name(key)
    master = cluster.master_of(client.keyslot(name))
    client.close()
    replica = redis.Redis(host="127.0.0.1", port=cluster.replica_of(master))
    replica.execute_command("READONLY")
    value = replica.get(name)
    replica.close()
    return value


@pytest.mark.parametrize("view", ["sync", "async"])
async def test_replica_acks_make_claims_and_completions_reach_a_replica_first(
    redis_cluster: RedisCluster, view: str
) -> None:
    store = RedisStore.from_url(
        redis_cluster.startup_url, cluster=True, check_config=False, replica_acks=1
    )
    blocking = Blocking(store) if view == "sync" else None
    async_view = store.as_async()
    target = blocking if blocking is not None else async_view
    key = scoped_key("tenant", f"durable-{view}")
    before = _waits(list(redis_cluster.masters()))
    claim = await target.claim(key, FP, lease=30)
    assert claim.token is not None
    claimed = _on_replica(redis_cluster, store, key)
    assert claimed is not None and claimed.startswith(b"P")  # acknowledged before we ran
    assert await target.complete(key, claim.token, Outcome(responses=(b"ok",)))
    completed = _on_replica(redis_cluster, store, key)
    assert completed is not None and completed.startswith(b"C")
    replay = await target.claim(key, FP, lease=30)
    assert replay.record is not None and replay.record.outcome == Outcome(responses=(b"ok",))
    assert _waits(list(redis_cluster.masters())) - before == 3  # claim, completion, replay
    await async_view.aclose()
    store.close()


@pytest.mark.parametrize("view", ["sync", "async"])
async def test_too_few_replicas_fail_closed_and_leave_the_key_free(
    redis_cluster: RedisCluster, view: str
) -> None:
    store = RedisStore.from_url(
        redis_cluster.startup_url,
        cluster=True,
        check_config=False,
        replica_acks=2,  # each master has one replica
        replica_timeout=0.2,
    )
    async_view = store.as_async()
    target = Blocking(store) if view == "sync" else async_view
    with pytest.raises(StoreUnavailableError, match=r"acknowledged by 1 of the 2 replica"):
        await target.claim("k", FP, lease=30)
    assert await target.get("k") is None  # the unacknowledged claim was given back
    await async_view.aclose()
    store.close()


def test_replica_acks_on_a_redis_without_replicas_fail_closed(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url, replica_acks=1, replica_timeout=0.1, check_config=False)
    with pytest.raises(StoreUnavailableError, match=r"acknowledged by 0 of the 1 replica"):
        store.claim("k", FP, lease=30)
    assert store.get("k") is None
    store.close()
    with pytest.raises(ValueError, match="replica_acks must be an integer >= 0"):
        RedisStore.from_url(redis_url, replica_acks=-1)
