"""``AdaptiveThrottle``: client-side throttling from Google's SRE book ("Handling Overload").

Each client keeps, over a sliding window, how many requests it attempted and how many the backend
accepted. It rejects a new request locally, without sending it, with probability

    max(0, (requests - k * accepts) / (requests + 1))

While the backend accepts nearly everything, ``requests <= k * accepts`` and nothing is rejected.
When it rejects most requests, the probability climbs towards 1 and the backend is spared the
traffic it would refuse anyway; the requests rejected locally still count as requests (the book's
definition), so the client keeps sending about ``k`` times what the backend accepts. As accepts
return, the probability falls with them: recovery follows the backend instead of a fixed timer
(what a circuit breaker's ``reset_timeout`` does).

After a *total* outage the book's formula alone recovers slowly: the window is full of requests
and empty of accepts, so almost nothing is let through (about one request per window), and the
share let through then only doubles per window (k = 2): a 5 s outage at 100 calls/s with a 10 s
window was forgotten about 30 s after it ended, 30 s of self-inflicted downtime. Two additions
bound that (both can be turned off to get the book's behaviour):

* ``max_rejection`` (default 0.9) caps the probability: even during a total outage one call in
  ten still goes out, so the backend's return is seen within ``10 / rate`` seconds. These are
  first attempts the caller made anyway: the load stays below what the callers offer.
* ``recovery`` (default 20): that many accepts in a row, with no refusal between them, while the
  throttle is rejecting, mean the backend is answering again: the window is cleared and nothing
  is rejected until refusals come back. Under overload the backend refuses about half of what
  is sent (k = 2), so 20 accepts in a row happen about once per million requests sent; a
  backend that refuses in bursts (a rate limiter with a long period) can still pass the test
  now and then, and a cleared window then costs a burst of refused requests until the
  probability climbs again. Measured with a fake clock in ``tests/test_core_throttle.py``: a
  5 s outage at 100 calls/s is forgotten within 0.5 s after the backend returns.

Sans-IO: the clock and the random source are injectable; nothing here sleeps or sends.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable

from resilient_grpc.core.codes import UNHEALTHY_CODES, code_names
from resilient_grpc.core.validation import finite_number, whole_number

Clock = Callable[[], float]

#: How many slots the window is cut into; counts expire one slot (``window / 10``) at a time.
SLOTS = 10

_random = random.Random()


class AdaptiveThrottle:
    """Reject requests locally with probability max(0, (requests - k * accepts) / (requests + 1)),
    capped at ``max_rejection``, and forget a past outage once the backend answers again.

    ``k`` (> 1 is the useful range; the SRE book uses 2): how many requests per accepted one the
    client may send; lower rejects sooner, higher wastes more backend work on rejections.
    ``window`` (seconds, default 10): how far back requests and accepts are counted. The book
    uses minutes; 10 s holds enough requests to estimate at tens of calls a second, and a
    shorter window reacts faster. ``max_rejection`` (in (0, 1], default 0.9; 1 is the book's
    formula) caps the probability and ``recovery`` (a count >= 1, or ``None`` for the book's
    behaviour; default 20) clears the window after that many accepts in a row while rejecting:
    see the module docstring for why and what they cost. ``codes``: the statuses that mean "not
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
        max_rejection: float = 0.9,
        recovery: int | None = 20,
        clock: Clock = time.monotonic,
        uniform: Callable[[], float] = _random.random,
    ) -> None:
        self.k = finite_number("k", k, at_least=1.0)
        self.window = finite_number("window", window, above=0.0, unit=" of seconds")
        self.codes: frozenset[str] = code_names(codes, field="codes")
        if "OK" in self.codes:
            raise ValueError("codes: OK is an accept and cannot count as a rejection")
        self.max_rejection = finite_number("max_rejection", max_rejection, above=0.0, at_most=1.0)
        if recovery is not None:
            whole_number("recovery", recovery, at_least=1)
        self.recovery = recovery
        self._clock = clock
        self._uniform = uniform
        #: Accepts in a row since the last refusal.
        self._streak = 0
        self._width = self.window / SLOTS
        self._lock = threading.Lock()
        # [slot number, requests, accepts] per slot; a stale slot number means "empty".
        self._slots: list[list[int]] = [[-1, 0, 0] for _ in range(SLOTS)]
        self._rejected = 0

    def __repr__(self) -> str:
        return (
            f"AdaptiveThrottle(k={self.k!r}, window={self.window!r}, "
            f"max_rejection={self.max_rejection!r}, recovery={self.recovery!r})"
        )

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
        return min(self.max_rejection, max(0.0, (requests - self.k * accepts) / (requests + 1)))

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
            number = int(self._clock() // self._width)
            slot = self._slot(number)
            slot[1] += 1
            if not accepted:
                self._streak = 0
                return
            slot[2] += 1
            self._streak += 1
            recovery = self.recovery
            if (
                recovery is not None
                and self._streak >= recovery
                and self._probability(*self._totals(number)) > 0.0
            ):
                # The backend answers again: what it refused before is history.
                for stale in self._slots:
                    stale[0] = -1
                self._streak = 0

    def accepts(self, code: str) -> bool:
        """Whether an answer with status ``code`` (a name) counts as accepted."""
        return code not in self.codes
