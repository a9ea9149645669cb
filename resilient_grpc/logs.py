"""The logging subscriber: stdlib ``logging`` lines under the ``resilient_grpc`` logger.

:class:`LogHook` is one of the two default hooks of :mod:`resilient_grpc.telemetry` (the other
is OpenTelemetry's): the interceptors never log the events on their own, so the sync and aio
shells say exactly the same things. It watches a call only while ``resilient_grpc.client`` logs
DEBUG; otherwise it hears only a failed call's end (for the give-up WARNING, and the breaker's
DEBUG line for a call it failed fast). What is logged, and where:

* ``resilient_grpc.client``: WARNING once when a call gives up on a failure it would have
  retried (attempts made, last status, why it stopped, method, target); DEBUG for every attempt
  and for every other end of a call.
* ``resilient_grpc.breaker``: WARNING when a circuit breaker opens, INFO for its other
  transitions, DEBUG for each call it fails fast.
* ``resilient_grpc.server``: DEBUG for each dedup outcome; WARNING (at most one line per
  outcome per :data:`SERVER_WARNING_INTERVAL` seconds, with the count of lines held back) when
  the dedup store is unreachable, so a store outage cannot flood the log. Also one WARNING when a
  ``DedupInterceptor`` is built with ``scope=None`` (configuration, logged by
  :class:`~resilient_grpc.server.DedupSettings` itself, not through this module).
* ``resilient_grpc.stores.redis``: one WARNING per ``RedisStore`` naming the server's unsafe
  persistence or eviction settings, or saying it could not read them;
  ``resilient_grpc.stores.sqlite``: a WARNING when a background purge fails.

Lines carry only method names, status codes, counts, delays, reasons and breaker names or
targets: never idempotency keys, metadata or request/response bodies (the facade is never given
them). Each record also has structured fields in ``extra`` (``rpc_method``, ``grpc_code``,
``attempts``, ``retry_reason``, ...) for JSON formatters. As a library we attach only a
``NullHandler``; the application decides where lines go.
"""

from __future__ import annotations

import logging
import threading
import time

from resilient_grpc.core.retry import Reason, RetryDecision
from resilient_grpc.events import (
    AttemptFinished,
    BreakerRejected,
    BreakerStateChanged,
    CallEvent,
    CallFinished,
    CallHookBase,
    CallStarted,
    DedupOutcome,
    Event,
)

logger = logging.getLogger("resilient_grpc")
logger.addHandler(logging.NullHandler())

client_logger = logging.getLogger("resilient_grpc.client")
breaker_logger = logging.getLogger("resilient_grpc.breaker")
server_logger = logging.getLogger("resilient_grpc.server")

#: Reasons for which a failed call counts as "gave up" (a WARNING): the failure was retryable
#: but the stack stopped. Business errors (not retryable) and non-idempotent calls without a
#: key end at DEBUG: retrying them was never an option.
GIVE_UP_REASONS: frozenset[Reason] = frozenset(
    {
        Reason.MAX_ATTEMPTS,
        Reason.DEADLINE,
        Reason.BUDGET_EXHAUSTED,
        Reason.PUSHBACK_STOP,
        Reason.BREAKER_OPEN,
    }
)

#: Dedup outcomes logged at WARNING (throttled), and what each line says happened.
SERVER_WARNINGS: dict[str, str] = {
    "store_error": "dedup store unavailable, refusing the call",
    "store_undecodable": (
        "dedup store holds a record this version cannot decode (corrupt, or written by a newer "
        "version), refusing the call"
    ),
    "fail_open": "dedup store unavailable, running the handler without deduplication",
    "store_full": "dedup store full of in-flight claims, refusing the call (RESOURCE_EXHAUSTED)",
    "outcome_not_stored": (
        "dedup store unavailable after the handler ran: its outcome was answered but not "
        "stored, and its key stays claimed until the lease lapses"
    ),
    "complete_refused": "dedup store refused the handler's outcome, which was not stored",
    "commit_failed": (
        "the call's transaction did not commit: the handler's writes were rolled back, the key "
        "released and the call answered UNAVAILABLE"
    ),
    "lease_lost": "dedup store refused to renew a running handler's lease",
    "renew_failed": "dedup store unavailable while renewing a running handler's lease",
}
#: Dedup outcomes logged at WARNING (throttled): the store could not be used as it should.
SERVER_WARNING_OUTCOMES: frozenset[str] = frozenset(SERVER_WARNINGS)

#: Minimum seconds between two WARNING lines for the same server outcome.
SERVER_WARNING_INTERVAL = 10.0


def _attempt_finished(method: str, attempt: int, code: str, decision: RetryDecision | None) -> None:
    """DEBUG: one attempt ended with ``code``, and what the stack decided next."""
    if not client_logger.isEnabledFor(logging.DEBUG):
        return
    extra = {"rpc_method": method, "attempt": attempt, "grpc_code": code}
    if decision is None:
        client_logger.debug("%s attempt %d: %s", method, attempt, code, extra=extra)
    elif decision.retry:
        source = decision.source.value if decision.source is not None else "computed"
        client_logger.debug(
            "%s attempt %d: %s; retrying in %.3f s (%s backoff)",
            method,
            attempt,
            code,
            decision.delay,
            source,
            extra={**extra, "retry_reason": decision.reason.value, "backoff_s": decision.delay},
        )
    else:
        client_logger.debug(
            "%s attempt %d: %s; not retrying (%s)",
            method,
            attempt,
            code,
            decision.reason.value,
            extra={**extra, "retry_reason": decision.reason.value},
        )


def _call_finished(event: CallFinished) -> None:
    """WARNING when the call gave up on a retryable failure; DEBUG for any other end."""
    method, target, code, attempts, reason = event
    # A call the breaker refused before any attempt is not a give-up: the breaker's opening was
    # already logged once, and one WARNING per refused call would flood the log.
    gave_up = code != "OK" and reason in GIVE_UP_REASONS and attempts > 0
    if not gave_up and not client_logger.isEnabledFor(logging.DEBUG):
        return  # the common case (a success, nothing logged): build nothing
    extra = {
        "rpc_method": method,
        "grpc_code": code,
        "attempts": attempts,
        "retry_reason": reason.value,
        "target": target,
    }
    where = f" to {target}" if target else ""
    client_logger.log(
        logging.WARNING if gave_up else logging.DEBUG,
        "%s%s gave up after %d attempt%s: last status %s (%s)"
        if gave_up
        else "%s%s finished after %d attempt%s: %s (%s)",
        method,
        where,
        attempts,
        "" if attempts == 1 else "s",
        code,
        reason.value,
        extra=extra,
    )


def _breaker_rejected(method: str, target: str | None) -> None:
    """DEBUG: an open breaker failed a call fast."""
    if breaker_logger.isEnabledFor(logging.DEBUG):
        breaker_logger.debug(
            "%s%s: circuit breaker open, failing fast",
            method,
            f" to {target}" if target else "",
            extra={"rpc_method": method, "target": target},
        )


def _breaker_changed(name: str, old: str, new: str) -> None:
    """WARNING when a breaker opens; INFO for its other transitions."""
    extra = {"breaker": name, "breaker_from": old, "breaker_to": new}
    if new == "open":
        breaker_logger.warning(
            "circuit breaker %s opened (was %s): calls fail fast until a probe succeeds",
            name,
            old,
            extra=extra,
        )
    else:
        breaker_logger.info("circuit breaker %s: %s -> %s", name, old, new, extra=extra)


class _Throttle:
    """At most one line per key per ``interval`` seconds; counts the lines held back."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def admit(self, key: str) -> int | None:
        """``None``: hold this line back; else the number of lines held back since the last one."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._held[key] = self._held.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._held.pop(key, 0)

    def reset(self) -> None:
        with self._lock:
            self._last.clear()
            self._held.clear()


_server_throttle = _Throttle(SERVER_WARNING_INTERVAL)


def _dedup_outcome(method: str, outcome: str, detail: str = "") -> None:
    """DEBUG per dedup outcome; a throttled WARNING when the store could not be used as it
    should (see :data:`SERVER_WARNINGS`), with ``detail`` (e.g. the store's error message)."""
    extra = {"rpc_method": method, "dedup_outcome": outcome}
    what = SERVER_WARNINGS.get(outcome)
    if what is not None:
        held = _server_throttle.admit(outcome)
        if held is not None:
            more = f" ({held} more since the last line)" if held else ""
            why = f": {detail}" if detail else ""
            server_logger.warning("%s: %s%s%s", method, what, why, more, extra=extra)
            return
    if server_logger.isEnabledFor(logging.DEBUG):
        server_logger.debug("%s: dedup %s", method, outcome, extra=extra)


class _CallLog(CallHookBase):
    """The log lines of one watched call."""

    __slots__ = ("method", "target")

    def __init__(self, started: CallStarted) -> None:
        self.method = started.method
        self.target = started.target

    def on_call_event(self, event: CallEvent) -> None:
        if isinstance(event, AttemptFinished):
            _attempt_finished(self.method, *event)
        elif isinstance(event, CallFinished):
            _call_finished(event)
        elif isinstance(event, BreakerRejected):
            _breaker_rejected(self.method, self.target)


class LogHook:
    """Log lines for the stack's events (see the module docstring)."""

    def watching(self) -> bool:
        return client_logger.isEnabledFor(logging.DEBUG)

    def start_call(self, event: CallStarted) -> _CallLog:
        return _CallLog(event)

    def on_event(self, event: Event) -> None:
        if isinstance(event, CallFinished):  # a failed call this hook did not watch
            if event.reason is Reason.BREAKER_OPEN and event.attempts == 0:
                _breaker_rejected(event.method, event.target)
            _call_finished(event)
        elif isinstance(event, BreakerStateChanged):
            _breaker_changed(*event)
        elif isinstance(event, DedupOutcome):
            _dedup_outcome(*event)
