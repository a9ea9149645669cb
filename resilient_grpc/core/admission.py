"""Server admission control: decide, before a handler runs, whether a call is worth starting.

Plain Python (no grpc, no sleeping, clock and randomness injected); the sync and aio
``OverloadInterceptor`` shells only feed it what they see and act on what it says. Three rules,
checked in this order when a call is about to start:

* ``deadline``: the caller's remaining time is shorter than 1.5 x the method's expected
  execution time (the margin covers the slower half): the answer would arrive after the caller
  has gone, so the work would be wasted. Expected = the lower median of its last 16 execution
  times, scaled up by how many more calls are executing now than usually were when it ran
  (Little's law: where calls share a resource, time grows with concurrency), so a sudden jump
  in concurrency is not judged by the times measured before it; not scaled before its 10th
  execution (warm-up concurrency says nothing about load). A median, not an average: a stall
  of the process (a garbage collection, a starved CPU) lengthens every execution caught in it,
  and one 750 ms stall of the benchmark's server lifted an average to ~1 s and refused 254
  calls that would have made it. While nothing executes, the method's baseline (its lowest
  smoothed time, which a stall barely moves) stands in: the estimate learns only from admitted
  calls, so one inflated by a stall long enough would otherwise refuse every call for good
  (measured with the average: naive x3 with 250 ms timeouts refused for the rest of the run
  after one 240 ms stall); a caller with too little time even for the baseline is still
  refused.
* ``queue`` (CoDel, as in Facebook's "Fail at Scale"): the call waited in the server's queue
  longer than allowed. While the queue has not drained for a whole ``queue_interval`` (no call
  started after waiting less than a quarter of ``queue_target``), the server is overloaded and
  the allowance is ``queue_target``; otherwise it is ``queue_interval``. A standing queue is
  thus kept short (latency stays low for the admitted calls) while a burst is still absorbed.
  A call with a deadline may always wait ``deadline_share`` of its whole time (what it waited
  plus what remains): a caller with time to spare keeps its place. Without that, a short
  CoDel allowance turns any pause in the arrivals (a client's garbage collection, a CPU-starved
  process) into idle workers and then refuses, as the queue re-forms, calls that would still
  have finished in time; their callers come back after a pushback, often too late.
* ``limit``: the calls already executing reach the adaptive concurrency limit. The limit follows
  the latency gradient (Netflix concurrency-limits' Gradient2, Envoy's adaptive concurrency):
  each finished call compares its method's recent execution time (a short EWMA) with the
  method's baseline (the lowest that average has been, drifting slowly up towards it); while
  recent <= ``tolerance`` x baseline the limit grows by about sqrt(limit) per sample (when it is
  actually used), above that it shrinks in proportion. The baseline follows the smoothed
  average, not single samples, so that a method whose calls are sometimes much faster (a
  dedup replay, a cache hit) does not make its normal executions look like an overload.

Only calls that executed their handler teach the estimates: a call that a
``DedupInterceptor`` inside the overload shell answered without executing it (it waited for its
in-flight twin, was replayed, conflicted or was refused) reports that through
:func:`handler_executed` and is counted in flight, but its duration, which measures the twin or
nothing, is not taken for an execution time (else hedged copies waiting for their twins look like
slow executions and shrink the limit).

A refused call gets a pushback (seconds before a retry is worth it) scaled to the overload:
the longer of the method's expected time and the wait the call saw, times the pressure
1 / (1 - recent shed fraction), jittered by x0.5-1.5 so refused clients do not return together,
short enough to leave the retry twice the expected time before the caller's deadline (when the
deadline leaves room for that: else a retry would come too late anyway), and clamped
to [``min_pushback``, ``max_pushback``].
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from enum import Enum

from resilient_grpc.core.validation import finite_number, whole_number

__all__ = [
    "Admission",
    "AdmissionController",
    "Admit",
    "CallRecord",
    "MethodEstimate",
    "Shed",
    "ShedReason",
    "handler_executed",
    "record_call",
]


class ShedReason(str, Enum):
    """Why a call was refused."""

    DEADLINE = "deadline"
    QUEUE = "queue"
    LIMIT = "limit"


@dataclass(frozen=True)
class Admit:
    """The call may run; hand this ticket back to :meth:`AdmissionController.finish`."""

    method: str
    started: float
    concurrency: int = 1


@dataclass(frozen=True)
class Shed:
    """The call is refused with RESOURCE_EXHAUSTED; retry after ``pushback`` seconds."""

    reason: ShedReason
    pushback: float

    @property
    def pushback_ms(self) -> int:
        """The pushback as the whole milliseconds of a ``grpc-retry-pushback-ms`` trailer."""
        return max(0, round(self.pushback * 1000))


Admission = Admit | Shed


class CallRecord:
    """What the layers inside an overload shell say about one admitted call: whether it executed
    its handler (``False`` for a dedup wait, replay, conflict or refusal)."""

    __slots__ = ("executed",)

    def __init__(self) -> None:
        self.executed = True


_current_call: ContextVar[CallRecord | None] = ContextVar("resilient_grpc_call", default=None)


def record_call() -> CallRecord:
    """Start the record of the admitted call running in this context (the overload shells call
    it after admitting a call and read it when the call ends).

    Not reset afterwards: a sync worker thread keeps its context across calls, and a stale
    record (already read) is replaced by the next admitted call's; an aio call has its own
    task context. A mutable record rather than a value, so that a handler run in a task with a
    copied context (a shielded aio execution) still reaches it.
    """
    record = CallRecord()
    _current_call.set(record)
    return record


def handler_executed(executed: bool) -> None:
    """Tell the overload shell around this call, if any, whether the call executed its handler."""
    record = _current_call.get()
    if record is not None:
        record.executed = executed


#: A call is admitted only if its deadline leaves this multiple of the method's recent
#: execution time (an average: a margin for the slower half of the executions).
DEADLINE_MARGIN = 1.5
#: Weight of a new sample in the short (recent) execution-time average.
RECENT_WEIGHT = 0.2
#: How fast the baseline drifts up towards a slower recent average (per sample).
BASELINE_DRIFT = 0.002
#: Weight of one decision in the recent shed fraction.
SHED_WEIGHT = 0.02
#: The pressure factor never exceeds this (a 90% shed fraction).
MAX_PRESSURE = 10.0
#: A pushback leaves the refused caller's retry at least this multiple of the expected time.
PUSHBACK_ROOM = 2.0
#: Executions whose median is a method's typical time (what the deadline rule expects).
WINDOW = 16
#: Executions a method needs before its expected time is scaled by concurrency: the first ones
#: ran while the server warmed up, at a concurrency that says nothing about later load.
WARM_SAMPLES = 10


class MethodEstimate:
    """What one method costs: recent execution time (short EWMA), its baseline (its low) and its
    typical time (the lower median of the last ``WINDOW`` executions)."""

    __slots__ = ("baseline", "concurrency", "recent", "samples", "typical", "window")

    def __init__(self) -> None:
        self.window: deque[float] = deque(maxlen=WINDOW)
        self.typical = 0.0
        self.recent = 0.0
        self.baseline = 0.0
        self.concurrency = 1.0
        self.samples = 0

    def add(self, seconds: float, concurrency: int = 1) -> None:
        """Fold in one execution time and the calls executing when it started (its own included)."""
        seconds = max(0.0, seconds)
        self.window.append(seconds)
        ordered = sorted(self.window)
        self.typical = ordered[(len(ordered) - 1) // 2]
        if self.samples == 0:
            self.recent = self.baseline = seconds
            self.concurrency = float(max(1, concurrency))
        else:
            self.recent += RECENT_WEIGHT * (seconds - self.recent)
            self.concurrency += RECENT_WEIGHT * (max(1, concurrency) - self.concurrency)
            if self.recent < self.baseline:
                self.baseline = self.recent
            else:
                self.baseline += BASELINE_DRIFT * (self.recent - self.baseline)
        self.samples += 1


class AdmissionController:
    """Admission decisions for one server, shared by all its methods; thread-safe.

    ``queue_target`` / ``queue_interval`` (seconds): the CoDel queue allowances (see the module
    docstring); ``deadline_share`` (0..1): the part of its whole deadline a call may always
    spend queued (0: CoDel alone). ``initial_limit``, ``min_limit``, ``max_limit``: the concurrency limit's start
    and bounds; ``tolerance``: how much slower than its baseline a method may run before the limit
    shrinks; ``min_pushback`` / ``max_pushback`` (seconds): bounds of the retry delay sent with
    a refusal. ``clock`` (monotonic seconds) and ``uniform`` (a [0, 1) source for the pushback
    jitter) are injectable for tests.
    """

    def __init__(
        self,
        *,
        queue_target: float = 0.05,
        queue_interval: float = 0.2,
        deadline_share: float = 0.5,
        initial_limit: int = 32,
        min_limit: int = 2,
        max_limit: int = 1000,
        tolerance: float = 2.0,
        min_pushback: float = 0.02,
        max_pushback: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        uniform: Callable[[], float] = random.random,
    ) -> None:
        self.queue_target = finite_number(
            "queue_target", queue_target, above=0.0, unit=" of seconds"
        )
        self.queue_interval = finite_number(
            "queue_interval", queue_interval, at_least=self.queue_target, unit=" of seconds"
        )
        self.deadline_share = finite_number("deadline_share", deadline_share, at_least=0.0)
        if self.deadline_share > 1.0:
            raise ValueError(f"deadline_share must be <= 1, got {deadline_share!r}")
        self.min_limit = whole_number("min_limit", min_limit, at_least=1)
        self.max_limit = whole_number("max_limit", max_limit, at_least=self.min_limit)
        initial = whole_number("initial_limit", initial_limit, at_least=self.min_limit)
        if initial > self.max_limit:
            raise ValueError(
                f"initial_limit must be <= max_limit ({self.max_limit}), got {initial_limit!r}"
            )
        self.tolerance = finite_number("tolerance", tolerance, at_least=1.0)
        self.min_pushback = finite_number(
            "min_pushback", min_pushback, at_least=0.0, unit=" of seconds"
        )
        self.max_pushback = finite_number(
            "max_pushback", max_pushback, at_least=self.min_pushback, unit=" of seconds"
        )
        if not callable(clock) or not callable(uniform):
            raise ValueError("clock and uniform must be callables")
        self._clock = clock
        self._uniform = uniform
        self._lock = threading.Lock()
        self._limit = float(initial)
        self._in_flight = 0
        self._methods: dict[str, MethodEstimate] = {}
        self._shed_fraction = 0.0
        self._last_empty: float | None = None

    # -- what the shells and telemetry read

    @property
    def limit(self) -> int:
        """The current concurrency limit (whole calls)."""
        return max(self.min_limit, math.floor(self._limit))

    @property
    def in_flight(self) -> int:
        """Admitted calls that have not finished."""
        return self._in_flight

    def service_time(self, method: str) -> float | None:
        """The method's recent execution time (seconds), or ``None`` before its first call ends."""
        estimate = self._methods.get(method)
        return estimate.recent if estimate is not None and estimate.samples else None

    def expected_time(self, method: str) -> float | None:
        """How long a call of ``method`` started now should take: its typical execution time,
        scaled by the concurrency it would start at over the concurrency it usually ran at."""
        with self._lock:
            return self._expected(method)

    def baseline_time(self, method: str) -> float | None:
        """The method's baseline execution time (the lowest its recent average has been,
        drifting slowly up): what the deadline rule judges by while nothing executes."""
        with self._lock:
            return self._baseline(method) if method in self._methods else None

    def overloaded(self) -> bool:
        """True while the queue has not drained for a whole ``queue_interval``."""
        with self._lock:
            return self._overloaded(self._clock())

    # -- decisions

    def decide(
        self, method: str, *, queued_for: float | None, deadline_remaining: float | None
    ) -> Admission:
        """Admit or refuse a call of ``method`` that is about to start.

        ``queued_for``: how long it waited to start (``None`` when the server cannot tell, which
        turns the queue rule off); ``deadline_remaining``: the caller's remaining time
        (``None``: no deadline).
        """
        now = self._clock()
        with self._lock:
            expected = self._expected(method) or 0.0
            if queued_for is not None:
                queued_for = max(0.0, queued_for)
                if queued_for < self.queue_target / 4 or self._last_empty is None:
                    self._last_empty = now
            reason: ShedReason | None = None
            # while nothing executes, the recent average may be a stall's: judge by the baseline
            judged = expected if self._in_flight > 0 else self._baseline(method)
            if deadline_remaining is not None and (
                deadline_remaining <= 0 or deadline_remaining < DEADLINE_MARGIN * judged
            ):
                reason = ShedReason.DEADLINE
            elif queued_for is not None and queued_for > self._allowed_wait(
                now, queued_for, deadline_remaining
            ):
                reason = ShedReason.QUEUE
            elif self._in_flight >= self.limit:
                reason = ShedReason.LIMIT
            if reason is None:
                self._shed_fraction -= SHED_WEIGHT * self._shed_fraction
                self._in_flight += 1
                return Admit(method, now, self._in_flight)
            self._shed_fraction += SHED_WEIGHT * (1.0 - self._shed_fraction)
            pressure = min(MAX_PRESSURE, 1.0 / max(1e-9, 1.0 - self._shed_fraction))
            base = max(expected, queued_for or 0.0, self.min_pushback)
            delay = base * pressure * (0.5 + self._uniform())
            if deadline_remaining is not None:
                # a pushback the caller cannot wait is no pushback: leave its retry the time to
                # be served; when there is not even that, the caller is better off not retrying
                room = deadline_remaining - PUSHBACK_ROOM * expected
                if room > self.min_pushback:
                    delay = min(delay, room)
            return Shed(reason, min(self.max_pushback, max(self.min_pushback, delay)))

    def finish(self, ticket: Admit, *, executed: bool = True) -> None:
        """The admitted call ``ticket`` ended (however): learn its execution time, adapt the limit.

        ``executed=False``: the call did not execute its handler (a dedup wait or replay, see
        :class:`CallRecord`); it leaves the calls in flight, but its duration is no sample.
        """
        now = self._clock()
        with self._lock:
            busy = self._in_flight
            self._in_flight = max(0, self._in_flight - 1)
            if not executed:
                return
            estimate = self._methods.get(ticket.method)
            if estimate is None:
                estimate = self._methods[ticket.method] = MethodEstimate()
            estimate.add(now - ticket.started, ticket.concurrency)
            if estimate.recent <= 0:
                return
            gradient = min(1.0, max(0.5, self.tolerance * estimate.baseline / estimate.recent))
            if gradient >= 1.0 and busy < self._limit / 2:
                return  # the limit is not what holds the server back: do not grow it
            target = self._limit * gradient + math.sqrt(self._limit)
            smoothed = self._limit + RECENT_WEIGHT * (target - self._limit)
            self._limit = min(float(self.max_limit), max(float(self.min_limit), smoothed))

    # -- internals (lock held)

    def _expected(self, method: str) -> float | None:
        estimate = self._methods.get(method)
        if estimate is None or not estimate.samples:
            return None
        if estimate.samples < WARM_SAMPLES:
            return estimate.typical
        return estimate.typical * max(1.0, (self._in_flight + 1) / estimate.concurrency)

    def _baseline(self, method: str) -> float:
        estimate = self._methods.get(method)
        return estimate.baseline if estimate is not None and estimate.samples else 0.0

    def _overloaded(self, now: float) -> bool:
        return self._last_empty is not None and now - self._last_empty > self.queue_interval

    def _allowed_wait(self, now: float, queued_for: float, remaining: float | None) -> float:
        allowed = self.queue_target if self._overloaded(now) else self.queue_interval
        if remaining is not None:
            allowed = max(allowed, self.deadline_share * (queued_for + remaining))
        return allowed
