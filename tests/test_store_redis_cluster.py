"""RedisStore on a real Redis Cluster (3 masters, 3 replicas): records spread over every master,
one settings WARNING for the whole cluster, and a precise error when the cluster is not there.
(The store contract and the multi-process dedup tests also run on the cluster.)"""

from __future__ import annotations

import logging

import pytest
import redis
import redis.cluster

from resilient_grpc.core.dedup import Outcome, fingerprint, scoped_key
from resilient_grpc.stores import RedisStore, StoreUnavailableError
from tests.redis_cluster import RedisCluster
from tests.redis_server import free_port

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
