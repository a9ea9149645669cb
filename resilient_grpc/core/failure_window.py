"""A sliding time window of a backend's recent outcomes, to tell an outage from a burst of bad luck.

A breaker that opens after ``fail_max`` *consecutive* failures trips on one cut connection:
every call in flight on it fails within a few milliseconds while the backend is healthy (the
retries of those calls succeed). :class:`FailureWindow` counts the outcomes of the last
``seconds``; a failure only counts towards opening while at least ``threshold`` of them failed,
the way resilience4j's time-based failure-rate threshold works. Because the window is measured
in time rather than calls, the same settings hold at 10 and at 10,000 calls a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from resilient_grpc.core.validation import finite_number

Clock = Callable[[], float]

#: How many slots the window is cut into; counts expire one slot (``seconds / 10``) at a time.
SLOTS = 10


class FailureWindow:
    """Success and failure counts over the last ``seconds``, in :data:`SLOTS` rolling slots.

    :meth:`success` takes no lock (it sits on every call's hot path): two threads adding in the
    same instant may lose one count, which only nudges a rate. :meth:`failure` and
    :meth:`clear` are called under the breaker's lock.
    """

    __slots__ = ("_clock", "_slots", "_width", "seconds", "threshold")

    def __init__(
        self, seconds: float = 1.0, threshold: float = 0.5, *, clock: Clock = time.monotonic
    ) -> None:
        seconds = finite_number("window", seconds, above=0.0, unit=" of seconds")
        threshold = finite_number("failure_rate", threshold, at_least=0.0, at_most=1.0)
        self.seconds = float(seconds)
        self.threshold = float(threshold)
        self._clock = clock
        self._width = self.seconds / SLOTS
        # [slot number, successes, failures] per slot; a stale slot number means "empty".
        self._slots: list[list[int]] = [[-1, 0, 0] for _ in range(SLOTS)]

    def _slot(self) -> list[int]:
        number = int(self._clock() // self._width)
        slot = self._slots[number % SLOTS]
        if slot[0] != number:
            slot[0], slot[1], slot[2] = number, 0, 0
        return slot

    def _totals(self) -> tuple[int, int]:
        oldest = int(self._clock() // self._width) - SLOTS + 1
        successes = failures = 0
        for number, ok, failed in self._slots:
            if number >= oldest:
                successes += ok
                failures += failed
        return successes, failures

    def success(self) -> None:
        """Count a successful outcome now."""
        self._slot()[1] += 1

    def failure(self) -> bool:
        """Count a failure now; True if it counts, i.e. the failure rate is at the threshold."""
        self._slot()[2] += 1
        successes, failures = self._totals()
        return failures >= self.threshold * (successes + failures)

    @property
    def failure_rate(self) -> float:
        """The share of failures among the outcomes in the window (0.0 when there are none)."""
        successes, failures = self._totals()
        total = successes + failures
        return failures / total if total else 0.0

    def clear(self) -> None:
        """Forget everything (the breaker closed again: old failures are history)."""
        for slot in self._slots:
            slot[0] = -1
