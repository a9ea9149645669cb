"""The client stack the review9 tests count effects with (sync and aio alike)."""

from __future__ import annotations

from typing import Any

from protos import ledger_pb2
from resilient_grpc import (
    AdaptiveThrottle,
    CircuitBreaker,
    HedgingPolicy,
    IdempotencyKeys,
    RetryBudget,
    RetryPolicy,
)

#: A long, fixed backoff: a cancellation lands inside it; a retry after it would be seen.
SLOW = RetryPolicy(
    max_attempts=5, initial_backoff=0.6, max_backoff=0.6, multiplier=1.0, jitter="none"
)
WATCH_REQUEST = ledger_pb2.WatchRequest(account="alice", count=2)


class Stack:
    """Budget, breaker and a never-rejecting throttle whose counts show what was recorded."""

    def __init__(
        self,
        retry: RetryPolicy | None = SLOW,
        hedging: HedgingPolicy | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.budget = RetryBudget(ratio=1.0, min_retries_per_second=0.0, window=60.0)
        self.breaker = breaker or CircuitBreaker(fail_max=100, reset_timeout=30, failure_rate=0.0)
        self.throttle = AdaptiveThrottle(window=60.0, uniform=lambda: 1.0)  # never rejects
        self.retry = retry
        self.hedging = hedging

    def kwargs(self) -> dict[str, Any]:
        return {
            "retry": self.retry,
            "hedging": self.hedging,
            "budget": self.budget,
            "breaker": self.breaker,
            "throttle": self.throttle,
            "idempotency": IdempotencyKeys(),
        }

    def failures(self, target: str) -> int:
        return int(self.breaker.for_target(target).circuit.fail_counter)
