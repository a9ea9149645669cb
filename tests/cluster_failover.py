"""Keyed load on a RedisStore over a real Redis Cluster while a master is killed (its replica is
promoted): how many executions a failover duplicates, with and without ``replica_acks``.

The load follows what a dedup server does with each logical operation: an attempt claims the
key, "executes" (counted), then completes it; right after, a duplicate of the same operation
arrives (the client's retry of an answer it lost) and must be replayed, not executed. Store
errors are retried (the server fails closed, the client retries); a duplicate that finds the key
still in progress polls for a bounded time, then gives up (ABORTED). A claim or completion that
the killed master acknowledged but never replicated is lost with it: the duplicate then claims
the key again and executes a second time.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field

import redis.cluster

from resilient_grpc.core.dedup import Outcome, RecordState, fingerprint
from resilient_grpc.stores import RedisStore, StoreUnavailableError
from tests.redis_cluster import RedisCluster

FP = fingerprint(b"transfer")
OUTCOME = Outcome(responses=(b"done",))


@dataclass
class FailoverRun:
    """What one run under load saw."""

    operations: int = 0
    executions: collections.Counter[str] = field(default_factory=collections.Counter)
    store_errors: int = 0
    gave_up: int = 0  # duplicates that found the key in progress until their bound
    resumed: int = 0  # executions after the last failover (the cluster healthy again)
    failovers: int = 0
    unavailable_seconds: float = 0.0

    @property
    def duplicates(self) -> int:
        return sum(count - 1 for count in self.executions.values() if count > 1)


def _attempt(
    store: RedisStore,
    key: str,
    run: FailoverRun,
    lock: threading.Lock,
    *,
    until: float,
    recovered: threading.Event,
) -> None:
    """One attempt of an operation, retried on store errors, until it executed, replayed or
    ``until`` passed."""
    while time.monotonic() < until:
        try:
            claim = store.claim(key, FP, lease=30)
        except StoreUnavailableError:
            with lock:
                run.store_errors += 1
            time.sleep(0.05)
            continue
        if claim.token is not None:
            with lock:
                run.executions[key] += 1
                run.resumed += recovered.is_set()
            try:
                store.complete(key, claim.token, OUTCOME)
            except StoreUnavailableError:
                with lock:
                    run.store_errors += 1  # the live answer was sent; the record may be lost
            return
        record = claim.record
        if record is not None and record.state is RecordState.COMPLETED:
            return
        time.sleep(0.05)
    with lock:
        run.gave_up += 1


def run_failovers(
    cluster: RedisCluster,
    *,
    replica_acks: int,
    failovers: int,
    workers: int = 8,
    settle: float = 1.0,
    duplicate_bound: float = 3.0,
) -> FailoverRun:
    """``failovers`` times: keyed load for ``settle`` s, SIGKILL a master, wait for its replica's
    promotion, restart the killed node (it rejoins as a replica), ``settle`` s more."""
    store = RedisStore.from_url(
        cluster.startup_url,
        cluster=True,
        check_config=False,
        replica_acks=replica_acks,
        replica_timeout=0.5,
        socket_timeout=1.0,
        socket_connect_timeout=0.5,
    )
    run = FailoverRun()
    lock = threading.Lock()
    stop = threading.Event()
    recovered = threading.Event()  # every failover is over
    ids = itertools.count()
    tag = f"{time.monotonic_ns()}"

    def worker() -> None:
        while not stop.is_set():
            key = f"op-{tag}-{next(ids)}"
            with lock:
                run.operations += 1
            _attempt(store, key, run, lock, until=time.monotonic() + 30, recovered=recovered)
            _attempt(
                store, key, run, lock, until=time.monotonic() + duplicate_bound, recovered=recovered
            )

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    try:
        for round_ in range(failovers):
            time.sleep(settle)
            masters = sorted(cluster.masters())
            victim = masters[round_ % len(masters)]
            killed_at = time.monotonic()
            cluster.kill(victim)
            cluster.wait_for_failover(victim)  # its replica now serves its slots
            run.unavailable_seconds += time.monotonic() - killed_at
            cluster.restart(victim)
            cluster.wait_until_ok(timeout=30)
            run.failovers += 1
        recovered.set()
        time.sleep(settle)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        store.close()
    return run


def slot_master_ports(cluster: RedisCluster, names: list[str]) -> set[int]:
    client = redis.cluster.RedisCluster.from_url(cluster.startup_url)
    ports = {cluster.master_of(client.keyslot(name)) for name in names}
    client.close()
    return ports


def main() -> None:
    """``python -m tests.cluster_failover [--failovers N]``: the measurement quoted in the README
    (a fresh cluster, N failovers without and N with ``replica_acks=1``), as JSON."""
    import argparse
    import json

    from tests.redis_cluster import make_redis_cluster

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--failovers", type=int, default=10)
    parser.add_argument("--replica-acks", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    cluster = make_redis_cluster()
    if cluster is None:
        raise SystemExit("needs redis-server and redis-cli on PATH")
    report = {}
    try:
        for acks in args.replica_acks:
            started = time.monotonic()
            run = run_failovers(cluster, replica_acks=acks, failovers=args.failovers)
            report[f"replica_acks={acks}"] = {
                "failovers": run.failovers,
                "operations": run.operations,
                "duplicate_executions": run.duplicates,
                "left_in_progress": run.gave_up,
                "store_errors": run.store_errors,
                "seconds_to_promote_per_failover": round(
                    run.unavailable_seconds / max(1, run.failovers), 2
                ),
                "operations_per_second": round(run.operations / (time.monotonic() - started), 1),
            }
    except BaseException:
        cluster.stop(keep_files=True)
        print(f"node logs kept in {cluster.directory}", flush=True)
        raise
    cluster.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
