"""The telemetry seam: the active hooks, and the calls the stack makes to report events.

The client driver (:mod:`resilient_grpc.logical_call`, :mod:`resilient_grpc.hedged_call`), the
breaker, the dedup server and the overload interceptor report here and nowhere else, so the
sync and aio shells report identically. Each report becomes a typed event
(:mod:`resilient_grpc.events`) handed to the active hooks: by default
:class:`~resilient_grpc.otel.OtelHook` (spans and metrics) and
:class:`~resilient_grpc.logs.LogHook` (log lines). :func:`set_hooks` replaces them (add your
own, or drop one); :func:`capture` records the events instead, for tests.

A logical call is watched only by the hooks that want it when it starts
(:meth:`~resilient_grpc.events.Hook.watching`): with no OpenTelemetry SDK installed and the
``resilient_grpc`` loggers above DEBUG, :func:`start_call` returns ``None``, and the call builds
no event and starts no span (only a failed call's end is still reported, for its log line).

:func:`configure` (where spans and metrics go, the span kind) and :func:`register_breaker` /
:func:`register_limit` (gauges) belong to the OpenTelemetry hook and are re-exported here.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from resilient_grpc import logs, otel
from resilient_grpc.core.retry import Reason, RetryDecision
from resilient_grpc.events import (
    AttemptFinished,
    BreakerRejected,
    BreakerStateChanged,
    CallAbandoned,
    CallAdmitted,
    CallEvent,
    CallFinished,
    CallHook,
    CallHookBase,
    CallShed,
    CallStarted,
    DedupOutcome,
    Event,
    Hook,
    Transport,
)
from resilient_grpc.otel import configure, register_breaker, register_limit

#: The dedup outcomes the server interceptors report (others are accepted if short identifiers).
DEDUP_OUTCOMES: frozenset[str] = frozenset(
    {
        "executed",
        "replayed",
        "conflict",
        "waited",
        "store_error",
        "store_undecodable",
        "fail_open",
        "store_full",
        "crowded",
        "outcome_not_stored",
        "complete_refused",
        "commit_failed",
        "lease_lost",
        "renew_failed",
        "interrupted",
        "abandoned",
    }
)

_OUTCOME_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

_BREAKER_REJECTED = BreakerRejected()


def _default_hooks() -> tuple[Hook, ...]:
    return (otel.OtelHook(), logs.LogHook())


#: The active hooks (replaced as a whole, so readers need no lock).
_hooks: tuple[Hook, ...] = _default_hooks()


def set_hooks(*hooks: Hook) -> None:
    """Make ``hooks`` the active subscribers (none: telemetry off); see :func:`reset_hooks`."""
    global _hooks
    _hooks = tuple(hooks)


def get_hooks() -> tuple[Hook, ...]:
    """The active subscribers, in the order they receive events."""
    return _hooks


def reset_hooks() -> None:
    """Go back to the default subscribers (OpenTelemetry, then logging)."""
    set_hooks(*_default_hooks())


class CallTelemetry:
    """The reports of one watched logical call, fanned out to the hooks watching it.

    Made by :func:`start_call`; the driver reports each attempt, a breaker rejection, and the
    end (:meth:`end` or :meth:`abandon`; :meth:`close` if neither happened). A failed end also
    reaches, through :meth:`~resilient_grpc.events.Hook.on_event`, the hooks not watching it.
    """

    __slots__ = ("_idle", "_watchers", "ended", "method", "target")

    def __init__(
        self,
        method: str,
        target: str | None,
        watchers: tuple[CallHook, ...],
        idle: tuple[Hook, ...],
    ) -> None:
        self.method = method
        self.target = target
        self.ended = False
        self._watchers = watchers
        self._idle = idle

    def _emit(self, event: CallEvent) -> None:
        for watcher in self._watchers:
            watcher.on_call_event(event)

    def attempt(self, attempt: int, code: str, decision: RetryDecision | None) -> None:
        """One attempt ended with status ``code`` (a name) and ``decision`` was taken after it."""
        if self._watchers:  # nothing built for nobody
            self._emit(AttemptFinished(attempt, code, decision))

    def breaker_rejected(self) -> None:
        """The breaker was open: the call fails fast without touching the network."""
        self._emit(_BREAKER_REJECTED)

    def end(self, code: str, *, attempts: int, reason: Reason) -> None:
        """The call finished with status ``code``; later reports of its end are ignored."""
        if self.ended:
            return
        self.ended = True
        if not self._watchers and (code == "OK" or not self._idle):
            return  # nobody to tell
        event = CallFinished(self.method, self.target, code, attempts, reason)
        self._emit(event)
        if code != "OK":
            for hook in self._idle:
                hook.on_event(event)

    def abandon(self, error: BaseException) -> None:
        """The call stopped by ``error`` before :meth:`end` (``GeneratorExit``: the caller left)."""
        if not self.ended:
            self.ended = True
            self._emit(CallAbandoned(error))

    def close(self) -> None:
        """Release the watchers if neither :meth:`end` nor :meth:`abandon` was reported."""
        if not self.ended:
            self.ended = True
            for watcher in self._watchers:
                watcher.close()

    def make_current(self) -> Any:
        """Make the call current (its span) for the attempts; give the result to :meth:`restore`."""
        watchers = self._watchers
        if len(watchers) == 1:
            return watchers[0].attach()
        if not watchers:
            return None
        return [watcher.attach() for watcher in watchers]

    def restore(self, token: Any) -> None:
        """Undo :meth:`make_current`."""
        watchers = self._watchers
        if len(watchers) == 1:
            watchers[0].detach(token)
            return
        if not watchers:
            return
        for watcher, one in zip(reversed(watchers), reversed(token), strict=True):
            watcher.detach(one)

    def use(self) -> contextlib.AbstractContextManager[CallTelemetry]:
        """Make the call current inside the block (for an attempt of a call that outlives it)."""
        if self is UNWATCHED:
            return _UNWATCHED_USE
        if not self._watchers:
            return contextlib.nullcontext(self)
        return self._use()

    @contextlib.contextmanager
    def _use(self) -> Iterator[CallTelemetry]:
        token = self.make_current()
        try:
            yield self
        finally:
            self.restore(token)


#: The telemetry of a call no hook watches, for a driver that wants one (hedged calls): it
#: reports nothing, not even a failed end (the driver reports that with :func:`call_failed`),
#: and builds nothing. Shared by every such call.
UNWATCHED = CallTelemetry("", None, (), ())
UNWATCHED.ended = True
_UNWATCHED_USE = contextlib.nullcontext(UNWATCHED)


def start_call(
    method: str, *, target: str | None = None, transport: Transport | None = None
) -> CallTelemetry | None:
    """The telemetry of a logical call starting now; ``None`` when no hook watches it.

    Asks each hook once (a few attribute reads each), so a hook that starts watching later (an
    SDK installed after the channel was made) sees the next call.
    """
    hooks = _hooks
    for hook in hooks:  # the common case, nobody watching, in as few steps as possible
        if hook.watching():
            break
    else:
        return None
    watching = [hook for hook in hooks if hook.watching()]
    started = CallStarted(method, target, transport)
    watchers = tuple(hook.start_call(started) for hook in watching)
    idle = tuple(hook for hook in hooks if hook not in watching)
    return CallTelemetry(method, target, watchers, idle)


def start_client_call(
    method: str, *, target: str | None = None, transport: Transport | None = None
) -> CallTelemetry:
    """:func:`start_call` for a driver that always wants a :class:`CallTelemetry` of its own.

    When no hook watches, it reports to none and passes a failed end to every hook. (Hedged
    calls use :func:`start_call` and :data:`UNWATCHED`, which build nothing per call.)
    """
    call = start_call(method, target=target, transport=transport)
    if call is None:
        call = CallTelemetry(method, target, (), _hooks)
    return call


def call_failed(method: str, target: str | None, code: str, attempts: int, reason: Reason) -> None:
    """A call nobody watched failed: every hook gets its :class:`CallFinished` (e.g. to log it)."""
    event = CallFinished(method, target, code, attempts, reason)
    for hook in _hooks:
        hook.on_event(event)


def _emit(event: Event) -> None:
    for hook in _hooks:
        hook.on_event(event)


def breaker_state_changed(name: str, old: str, new: str) -> None:
    """Report a circuit breaker transition (``closed``/``open``/``half-open``)."""
    _emit(BreakerStateChanged(name, old, new))


def dedup_outcome(method: str, outcome: str, detail: str = "") -> None:
    """Report one server-side dedup outcome (see :data:`DEDUP_OUTCOMES`) for ``method``.

    Call it only for methods the server implements: ``method`` becomes a metric attribute.
    An outcome that is not a short lower-case identifier is reported as ``other``. ``detail``
    (e.g. a store's error message) goes to the server log only, never to a metric or span.
    """
    if outcome not in DEDUP_OUTCOMES and not _OUTCOME_NAME.match(outcome):
        outcome = "other"
    _emit(DedupOutcome(method, outcome, detail))


def call_admitted(method: str) -> None:
    """Report one call the overload interceptor admitted (``method``: one the server implements)."""
    _emit(CallAdmitted(method))


def call_shed(method: str, reason: str) -> None:
    """Report one call refused before its handler, ``reason`` being deadline, queue or limit."""
    _emit(CallShed(method, reason))


class Recorder(CallHookBase):
    """A hook that watches every call and keeps every event, for tests (see :func:`capture`)."""

    def __init__(self) -> None:
        #: Every event received, in order, calls' own events included.
        self.events: list[CallStarted | CallEvent | Event] = []

    def watching(self) -> bool:
        return True

    def start_call(self, event: CallStarted) -> Recorder:
        self.events.append(event)
        return self

    def on_call_event(self, event: CallEvent) -> None:
        self.events.append(event)

    def on_event(self, event: Event) -> None:
        self.events.append(event)


@contextlib.contextmanager
def capture() -> Iterator[Recorder]:
    """Replace the active hooks with a :class:`Recorder` inside the block (testing mode)."""
    previous = _hooks
    recorder = Recorder()
    set_hooks(recorder)
    try:
        yield recorder
    finally:
        set_hooks(*previous)


def _reset_for_tests() -> None:
    """Default hooks and providers; forget instruments, breakers and log throttling (tests)."""
    reset_hooks()
    otel._reset_for_tests()
    logs._server_throttle.reset()


__all__ = [
    "DEDUP_OUTCOMES",
    "CallTelemetry",
    "Recorder",
    "breaker_state_changed",
    "call_admitted",
    "call_failed",
    "call_shed",
    "capture",
    "configure",
    "dedup_outcome",
    "get_hooks",
    "register_breaker",
    "register_limit",
    "reset_hooks",
    "set_hooks",
    "start_call",
    "start_client_call",
]
