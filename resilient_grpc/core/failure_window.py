"""A sliding window of a backend's recent outcomes, to tell an outage from a burst of bad luck.

A breaker that opens after ``fail_max`` *consecutive* failures trips on one cut connection:
every call in flight on it fails within a few milliseconds, while the backend is healthy (the
retries of those calls succeed). :class:`FailureWindow` remembers the last ``size`` outcomes; a
failure only counts towards opening when at least ``threshold`` of them failed, the way
resilience4j's failure-rate threshold works.
"""

from __future__ import annotations

import collections
import math


class FailureWindow:
    """The last ``size`` outcomes (True = failed) and the failure-rate rule over them.

    :meth:`success` is safe to call without a lock (one atomic ``deque.append``);
    :meth:`failure` and :meth:`clear` are meant to be called under the breaker's lock.
    """

    __slots__ = ("_outcomes", "size", "threshold")

    def __init__(self, size: int = 20, threshold: float = 0.5) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"window must be an integer number of calls >= 1, got {size!r}")
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not math.isfinite(threshold)
            or not 0.0 <= threshold <= 1.0
        ):
            raise ValueError(f"failure_rate must be a number in [0, 1], got {threshold!r}")
        self.size = size
        self.threshold = float(threshold)
        self._outcomes: collections.deque[bool] = collections.deque(maxlen=size)

    def success(self) -> None:
        """Remember a successful outcome."""
        self._outcomes.append(False)

    def failure(self) -> bool:
        """Remember a failure; True if it counts, i.e. the failure rate is at the threshold."""
        self._outcomes.append(True)
        outcomes = list(self._outcomes)  # one C-level copy: consistent even beside success()
        return sum(outcomes) >= self.threshold * len(outcomes)

    @property
    def failure_rate(self) -> float:
        """The share of failures among the remembered outcomes (0.0 when there are none)."""
        outcomes = list(self._outcomes)
        return sum(outcomes) / len(outcomes) if outcomes else 0.0

    def clear(self) -> None:
        """Forget everything (the breaker closed again: old failures are history)."""
        self._outcomes.clear()
