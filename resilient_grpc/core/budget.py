"""``RetryBudget``: a Finagle-style cap on retries as a fraction of recent traffic."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from resilient_grpc.core.service_config import DEFAULT_BUDGET_WINDOW, parse, retry_throttling_json
from resilient_grpc.core.validation import finite_number

Clock = Callable[[], float]


class RetryBudget:
    """Retries allowed = ``ratio`` x logical calls in the last ``window`` seconds
    + ``min_retries_per_second`` x ``window``, minus the retries already made in that window.

    Every logical call deposits (:meth:`deposit`), every retry withdraws (:meth:`try_withdraw`);
    with nothing left the retry is refused and counted (:attr:`refused`). One budget is meant to
    be shared by every call to a backend, so when the backend fails wholesale the extra load
    from retries is bounded by ``ratio`` (10% by default) instead of multiplying it by
    ``max_attempts``. The minimum keeps a trickle of retries possible at low traffic.

    The window slides exactly (timestamps, not buckets). Thread-safe; the lock is held for a few
    microseconds and never across I/O, so asyncio code may call it from the event loop.
    """

    def __init__(
        self,
        ratio: float = 0.1,
        min_retries_per_second: float = 10.0,
        window: float = 10.0,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        ratio = finite_number("ratio", ratio, at_least=0.0, at_most=1.0)
        min_retries_per_second = finite_number(
            "min_retries_per_second", min_retries_per_second, at_least=0.0
        )
        window = finite_number("window", window, above=0.0, unit=" of seconds")
        self.ratio = float(ratio)
        self.min_retries_per_second = float(min_retries_per_second)
        self.window = float(window)
        self._clock = clock
        self._lock = threading.Lock()
        self._deposits: deque[float] = deque()
        self._withdrawals: deque[float] = deque()
        self._refused = 0

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio!r}, min_retries_per_second="
            f"{self.min_retries_per_second!r}, window={self.window!r})"
        )

    def _expire(self, now: float) -> None:
        horizon = now - self.window
        for times in (self._deposits, self._withdrawals):
            while times and times[0] <= horizon:
                times.popleft()

    def _allowance(self) -> float:
        return self.ratio * len(self._deposits) + self.min_retries_per_second * self.window

    def deposit(self) -> None:
        """Record one logical call (call it once per call, not per attempt)."""
        with self._lock:
            now = self._clock()
            deposits = self._deposits
            # Once per call: expire only when something is due (the common case: nothing).
            horizon = now - self.window
            if (deposits and deposits[0] <= horizon) or (
                self._withdrawals and self._withdrawals[0] <= horizon
            ):
                self._expire(now)
            deposits.append(now)

    def try_withdraw(self) -> bool:
        """Take one retry from the budget; ``False`` (and counted as refused) if none is left."""
        return self.withdraw() is not None

    def withdraw(self) -> float | None:
        """:meth:`try_withdraw` that returns the withdrawal's time on the budget's clock
        (``None``: refused), to give to :meth:`refund` if the retry is never sent."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            # Small epsilon: 0.1 * 30 must allow 3 retries despite binary floating point.
            if len(self._withdrawals) + 1 <= self._allowance() + 1e-9:
                self._withdrawals.append(now)
                return now
            self._refused += 1
            return None

    def refund(self, at: float | None = None) -> None:
        """Give back a retry taken but never sent (the call was cancelled).

        ``at`` is the time :meth:`withdraw` returned: that withdrawal is removed, so the
        budget keeps counting every other call's withdrawal until its own time leaves the
        window (removing a newer one instead would let the older one expire early and allow
        one retry more than the ratio for a while). If it has left the window already there
        is nothing to give back. Without ``at``, the latest withdrawal is removed.
        """
        with self._lock:
            withdrawals = self._withdrawals
            if at is None:
                if withdrawals:
                    withdrawals.pop()
                return
            if not withdrawals or withdrawals[0] > at:
                return  # expired (or refunded) already
            # Times are in order and a refund is usually of a recent retry: search from the end.
            for index in range(len(withdrawals) - 1, -1, -1):
                taken = withdrawals[index]
                if taken == at:
                    del withdrawals[index]
                    return
                if taken < at:
                    return

    @property
    def balance(self) -> float:
        """Retries still allowed right now (may be fractional)."""
        with self._lock:
            self._expire(self._clock())
            return self._allowance() - len(self._withdrawals)

    @classmethod
    def from_service_config(
        cls, config: str | bytes | Mapping[str, Any], *, window: float = DEFAULT_BUDGET_WINDOW
    ) -> RetryBudget | None:
        """The budget equivalent to a gRPC service config's ``retryThrottling`` (gRFC A6).

        ``None`` when the config has none. ``ratio`` = ``tokenRatio`` and the reserve of
        ``min_retries_per_second`` x ``window`` retries = ``maxTokens / 2`` (see
        :mod:`resilient_grpc.service_config` for why).
        """
        throttling = parse(config).retry_throttling
        if throttling is None:
            return None
        window = finite_number("window", window, above=0.0, unit=" of seconds")
        return cls(
            ratio=min(throttling.token_ratio, 1.0),
            min_retries_per_second=throttling.max_tokens / 2 / window,
            window=window,
        )

    @property
    def refused(self) -> int:
        """How many retries this budget has refused since it was made."""
        with self._lock:
            return self._refused


def retry_throttling_from_budget(budget: RetryBudget) -> dict[str, Any]:
    """The ``retryThrottling`` object nearest to ``budget`` (inverse of the reading mapping)."""
    if not isinstance(budget, RetryBudget):
        raise ValueError(f"budget: expected a RetryBudget, got {type(budget).__name__}")
    return retry_throttling_json(
        ratio=budget.ratio,
        min_retries_per_second=budget.min_retries_per_second,
        window=budget.window,
    )
