"""Values and a clock that many test files share (fixtures live in ``conftest.py``)."""

from __future__ import annotations

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
