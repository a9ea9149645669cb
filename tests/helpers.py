"""Values and clocks that many test files share (fixtures live in ``conftest.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable

from protos import ledger_pb2
from resilient_grpc import RetryPolicy

#: Retries that back off for milliseconds, so retrying tests stay fast.
FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)

BALANCE_REQUEST = ledger_pb2.BalanceRequest(account="alice")
TRANSFER_REQUEST = ledger_pb2.TransferRequest(from_account="alice", to_account="bob", amount=5)


class FakeClock:
    """A clock the test moves by hand (``clock.now += 0.5``), for the sans-IO core's ``clock=``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ShiftedClock:
    """A real clock plus an offset the test moves (:meth:`advance`): expiry can be jumped to in
    no time, while a store's waits on the same clock still time out as they would for real."""

    def __init__(self, base: Callable[[], float] = time.monotonic) -> None:
        self.base = base
        self.offset = 0.0

    def __call__(self) -> float:
        return self.base() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds
