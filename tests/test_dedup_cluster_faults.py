"""Exactly-once on a real Redis Cluster under lost responses: 1,000 keyed transfers through
FaultProxy (30 % of committed responses cut) with the full client stack, balanced over two server
replicas that share one cluster-backed RedisStore each."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from protos.ledger_service import SyncLedger, serve
from resilient_grpc import RetryPolicy
from resilient_grpc.server import SHARED_SCOPE, DedupInterceptor
from resilient_grpc.stores import RedisStore
from resilient_grpc.testing import FaultProxy
from resilient_grpc.testing.cluster import RedisCluster
from tests.dedup_fixtures import transfer_in_parallel

RETRY = RetryPolicy(max_attempts=30, initial_backoff=0.002, max_backoff=0.05, jitter="full")
BALANCED = [("grpc.lb_policy_name", "round_robin"), ("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture
def two_replicas(redis_cluster: RedisCluster) -> Iterator[tuple[SyncLedger, list[FaultProxy]]]:
    """Two servers over one ledger state, each with its own RedisStore on the cluster, each
    behind its own FaultProxy."""
    ledger = SyncLedger()
    servers, stores, proxies = [], [], []
    for seed in (11, 12):
        store = RedisStore.from_url(redis_cluster.startup_url, cluster=True, check_config=False)
        server, port, _ = serve(ledger, interceptors=[DedupInterceptor(store, scope=SHARED_SCOPE)])
        proxy = FaultProxy(port, cut_response_probability=0.3, seed=seed).start()
        servers.append(server)
        stores.append(store)
        proxies.append(proxy)
    yield ledger, proxies
    for proxy in proxies:
        proxy.stop()
    for server in servers:
        server.stop(None)
    for store in stores:
        store.close()


@pytest.mark.timeout(180)
def test_a_thousand_transfers_over_two_replicas_on_a_cluster_apply_exactly_once(
    two_replicas: tuple[SyncLedger, list[FaultProxy]],
) -> None:
    ledger, proxies = two_replicas
    target = "ipv4:" + ",".join(proxy.target for proxy in proxies)
    replies = transfer_in_parallel(target, RETRY, BALANCED, workers=4, per_worker=250)

    total = 4 * 250
    state = ledger.state
    assert len(replies) == total
    cut = sum(proxy.counters.responses_cut for proxy in proxies)
    assert cut >= 0.2 * total
    assert all(proxy.counters.responses_cut > 0 for proxy in proxies), "both replicas served"
    assert len(state.executions) == total and state.duplicate_executions == 0
    moved = sum(range(1, total + 1))
    assert state.balances["b"] == state.initial_balance + moved
    assert len({reply.transfer_id for reply in replies}) == total
