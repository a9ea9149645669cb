"""``AdaptiveThrottle``: client-side throttling from Google's SRE book ("Handling Overload").

Each client keeps, over a sliding window, how many requests it attempted and how many the backend
accepted. It rejects a new request locally, without sending it, with probability

    max(0, (requests - k * accepts) / (requests + 1))

While the backend accepts nearly everything, ``requests <= k * accepts`` and nothing is rejected.
When it rejects most requests, the probability climbs towards 1 and the backend is spared the
traffic it would refuse anyway; the requests rejected locally still count as requests (the book's
definition), so the client keeps sending about ``k`` times what the backend accepts. As accepts
return, the probability falls with them: recovery follows the backend instead of a fixed timer
(what a circuit breaker's ``reset_timeout`` does). After a *total* outage that is gradual: the
share of calls let through roughly doubles per window (k = 2), so getting back to no rejections
takes a few windows (measured in ``tests/test_core_throttle.py``: a 5 s outage at 100 calls/s,
window 10 s, is forgotten about 30 s after it ended). The window sets the pace.

Sans-IO: the clock and the random source are injectable; nothing here sleeps or sends.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable

from resilient_grpc.core.codes import UNHEALTHY_CODES, code_names
from resilient_grpc.core.validation import finite_number

Clock = Callable[[], float]

#: How many slots the window is cut into; counts expire one slot (``window / 10``) at a time.
SLOTS = 10

_random = random.Random()


class AdaptiveThrottle:
    """Reject requests locally with probability max(0, (requests - k * accepts) / (requests + 1)).

    ``k`` (> 1 is the useful range; the SRE book uses 2): how many requests per accepted one the
    client may send; lower rejects sooner, higher wastes more backend work on rejections.
    ``window`` (seconds, default 10): how far back requests and accepts are counted. The book
    uses minutes; 10 s holds enough requests to estimate at tens of calls a second, and a
    shorter window recovers faster after an outage (see the module docstring). ``codes``: the statuses that mean "not
    accepted" (default: the breaker's unhealthy codes UNAVAILABLE, DEADLINE_EXCEEDED,
    RESOURCE_EXHAUSTED, INTERNAL); any other answer, business errors included, is an accept.

    One throttle is meant to be shared by every call to a backend. Thread-safe (a lock held for
    a few microseconds, never across I/O), so asyncio code may call it from the event loop.
    """

    def __init__(
        self,
        k: float = 2.0,
        window: float = 10.0,
        *,
        codes: Iterable[object] = UNHEALTHY_CODES,
        clock: Clock = time.monotonic,
        uniform: Callable[[], float] = _random.random,
    ) -> None:
        self.k = finite_number("k", k, at_least=1.0)
        self.window = finite_number("window", window, above=0.0, unit=" of seconds")
        self.codes: frozenset[str] = code_names(codes, field="codes")
        if "OK" in self.codes:
            raise ValueError("codes: OK is an accept and cannot count as a rejection")
        self._clock = clock
        self._uniform = uniform
        self._width = self.window / SLOTS
        self._lock = threading.Lock()
        # [slot number, requests, accepts] per slot; a stale slot number means "empty".
        self._slots: list[list[int]] = [[-1, 0, 0] for _ in range(SLOTS)]
        self._rejected = 0

    def __repr__(self) -> str:
        return f"AdaptiveThrottle(k={self.k!r}, window={self.window!r})"

    def _slot(self, number: int) -> list[int]:
        slot = self._slots[number % SLOTS]
        if slot[0] != number:
            slot[0], slot[1], slot[2] = number, 0, 0
        return slot

    def _totals(self, number: int) -> tuple[int, int]:
        oldest = number - SLOTS + 1
        requests = accepts = 0
        for slot_number, slot_requests, slot_accepts in self._slots:
            if slot_number >= oldest:
                requests += slot_requests
                accepts += slot_accepts
        return requests, accepts

    def _probability(self, requests: int, accepts: int) -> float:
        return max(0.0, (requests - self.k * accepts) / (requests + 1))

    @property
    def rejection_probability(self) -> float:
        """The probability that :meth:`admit` rejects a request right now."""
        with self._lock:
            return self._probability(*self._totals(int(self._clock() // self._width)))

    @property
    def counts(self) -> tuple[int, int]:
        """``(requests, accepts)`` in the window right now."""
        with self._lock:
            return self._totals(int(self._clock() // self._width))

    @property
    def rejected(self) -> int:
        """How many requests this throttle has rejected since it was made."""
        with self._lock:
            return self._rejected

    def admit(self) -> bool:
        """May a request go out now? A rejection is counted as a request (nothing more to do).

        An admitted request is counted when its outcome comes in (:meth:`record`); one whose
        outcome says nothing about the backend (cancelled by the caller) is simply not recorded.
        """
        with self._lock:
            number = int(self._clock() // self._width)
            probability = self._probability(*self._totals(number))
            if probability <= 0.0 or self._uniform() >= probability:
                return True
            self._slot(number)[1] += 1
            self._rejected += 1
            return False

    def record(self, accepted: bool) -> None:
        """Count one request that was sent, and whether the backend accepted it."""
        with self._lock:
            slot = self._slot(int(self._clock() // self._width))
            slot[1] += 1
            if accepted:
                slot[2] += 1

    def accepts(self, code: str) -> bool:
        """Whether an answer with status ``code`` (a name) counts as accepted."""
        return code not in self.codes
