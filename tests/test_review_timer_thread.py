"""Adversarial review: one sync future's slow step must not make another future miss its deadline.

Every sync future's delayed steps (backoff pauses, hedges) run on one shared timer thread. A
future whose breaker keeps its state in shared storage does that storage's round trip (the
retry's admission) on that thread when its backoff ends. If the storage stalls (a Redis outage:
each round trip waits out the socket timeout), a future on another channel, with no breaker at
all, must still end by its own deadline.
"""

from __future__ import annotations

import threading
import time

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, SyncLedger
from resilient_grpc import CircuitBreaker, IdempotencyKeys, RetryPolicy
from resilient_grpc.client import resilient_channel
from tests.helpers import GatedStorage

BALANCE = ledger_pb2.BalanceRequest(account="alice")
RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.1, max_backoff=0.1, jitter="none")
DEADLINE = 1.0


class StalledStorage(GatedStorage):
    """Breaker state whose reads, while armed, hang until the test lets them go (the store stalls
    after the first attempt's outcome was recorded, before the retry is admitted)."""

    def holds(self) -> bool:
        # The library's own threads (not gRPC's callback thread, where the first attempt's
        # outcome is recorded): the retry's admission after the backoff.
        return self.armed and threading.current_thread().name.startswith("resilient-grpc-")


def test_a_stalled_breaker_store_does_not_hold_another_futures_retry_past_its_deadline(
    ledger: tuple[SyncLedger, int],
) -> None:
    servicer, port = ledger
    target = f"127.0.0.1:{port}"
    storage = StalledStorage()
    stalled = resilient_channel(
        target,
        retry=RETRY,
        breaker=CircuitBreaker(storage=lambda _target: storage),
        idempotency=IdempotencyKeys(),
    )
    other = resilient_channel(target, retry=RETRY, idempotency=IdempotencyKeys())
    try:
        servicer.state.faults.fail_times(GET_BALANCE, 2)  # each call's first attempt fails
        first = ledger_pb2_grpc.LedgerStub(stalled).GetBalance.future(BALANCE, timeout=20)
        storage.armed = True  # its retry's admission (on the timer thread) will hang
        assert storage.entered.wait(10)
        started = time.monotonic()
        second = ledger_pb2_grpc.LedgerStub(other).GetBalance.future(BALANCE, timeout=DEADLINE)
        try:
            # The second call's retry is due after 0.1 s; it must end by its deadline.
            second.exception(timeout=DEADLINE + 1.0)
            assert time.monotonic() - started < DEADLINE + 1.0
        finally:
            storage.armed = False
            storage.gate.set()
        assert second.result(timeout=10).account == "alice"
        assert first.result(timeout=10).account == "alice"
    finally:
        storage.gate.set()
        stalled.close()
        other.close()
