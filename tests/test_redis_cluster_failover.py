"""A master of a real Redis Cluster killed under keyed load: calls fail closed while its slots have
no master, then resume; with ``replica_acks=1`` no execution is duplicated. The count without it
is reported, not asserted (asynchronous replication loses only the writes of the last moments,
so it is often 0 on an idle machine)."""

from __future__ import annotations

import pytest

from tests.cluster_failover import run_failovers
from tests.redis_cluster import RedisCluster


@pytest.mark.timeout(120)
def test_a_failover_duplicates_nothing_with_replica_acks(
    redis_cluster: RedisCluster, record_property: pytest.RecordProperty
) -> None:
    plain = run_failovers(redis_cluster, replica_acks=0, failovers=1)
    durable = run_failovers(redis_cluster, replica_acks=1, failovers=1)
    for name, run in (("replica_acks=0", plain), ("replica_acks=1", durable)):
        record_property(f"{name} duplicates", run.duplicates)
        print(
            f"{name}: {run.operations} operations, {run.failovers} failover(s), "
            f"{run.duplicates} duplicate executions, {run.store_errors} store errors, "
            f"{run.gave_up} duplicates gave up, {run.unavailable_seconds:.1f} s to promote, "
            f"{run.resumed} executions after it"
        )
        assert run.failovers == 1 and run.operations > 50
        assert run.resumed > 0  # executions went on once the cluster was healthy again
    # With replica_acks=1 every claim on the promoted master fails closed until the killed node
    # is back as its replica and in sync: hundreds of store errors. Without it, only the calls
    # that redis-py gives up on before the promotion are errors (those in flight at the kill;
    # later ones wait for the new slot map): a handful, and none at all when no call happens to
    # be on its way to the killed master then, which a loaded machine makes likely. Reported.
    assert durable.store_errors > 0
    assert durable.duplicates == 0
