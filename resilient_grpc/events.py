"""The typed telemetry events the resilience stack emits, and the hook protocols that receive them.

The client driver, the breaker, the dedup server and the overload interceptor report what
happened as small immutable events (below); subscribers turn them into spans, metrics or log
lines. Two subscribers ship with the package, each in its own module:
:class:`resilient_grpc.otel.OtelHook` (OpenTelemetry) and :class:`resilient_grpc.logs.LogHook`
(stdlib ``logging``); :mod:`resilient_grpc.telemetry` holds the active hooks and dispatches.

A subscriber is a :class:`Hook`. A logical client call is watched by the hooks that say so when
it starts (:meth:`Hook.watching`, asked once per call and meant to be a few attribute reads):
each returns a :class:`CallHook` that receives that call's events in order. When no hook
watches a call, the driver builds no event for it, except the :class:`CallFinished` of a call
that failed, which goes to every hook's :meth:`Hook.on_event` (a give-up is logged at WARNING
whatever the DEBUG level). Events not tied to a call's life (breaker transitions, dedup outcomes,
admission) go to :meth:`Hook.on_event` of every hook.

Events never carry an idempotency key, metadata or a message: only method names, targets,
status code names, counts, delays, reasons and breaker names.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Protocol

from resilient_grpc.core.retry import Reason, RetryDecision

Transport = Literal["sync", "aio"]


class CallStarted(NamedTuple):
    """A logical client call started (before its first attempt)."""

    method: str
    target: str | None
    #: ``"sync"``/``"aio"``: which flavour of gRPC instrumentation may sit below the stack.
    transport: Transport | None


class AttemptFinished(NamedTuple):
    """One attempt ended with ``code``; ``decision`` says what the stack decided after it.

    ``decision`` is ``None`` after a success, or for an attempt that was cancelled (a hedge
    that lost the race).
    """

    attempt: int
    code: str
    decision: RetryDecision | None


class BreakerRejected(NamedTuple):
    """An open circuit breaker failed the call fast (before an attempt was sent)."""


class CallFinished(NamedTuple):
    """The logical call ended with status ``code`` after ``attempts`` attempts, for ``reason``."""

    method: str
    target: str | None
    code: str
    attempts: int
    reason: Reason


class CallAbandoned(NamedTuple):
    """The call stopped by an exception before it finished (``GeneratorExit``: the caller left)."""

    error: BaseException


class BreakerStateChanged(NamedTuple):
    """Circuit breaker ``name`` moved from state ``old`` to ``new`` (closed/open/half-open)."""

    name: str
    old: str
    new: str


class DedupOutcome(NamedTuple):
    """The dedup server interceptor decided ``outcome`` for a call of ``method``.

    ``detail`` (e.g. a store's error message) is for the server log only.
    """

    method: str
    outcome: str
    detail: str


class CallAdmitted(NamedTuple):
    """The overload interceptor let a call of ``method`` start."""

    method: str


class CallShed(NamedTuple):
    """The overload interceptor refused a call before its handler (``reason``: deadline/queue/limit)."""

    method: str
    reason: str


#: Events of one watched call, in the order a :class:`CallHook` receives them.
CallEvent = AttemptFinished | BreakerRejected | CallFinished | CallAbandoned
#: Events every hook receives through :meth:`Hook.on_event`.
Event = BreakerStateChanged | DedupOutcome | CallAdmitted | CallShed | CallFinished


class CallHook(Protocol):
    """One hook's view of one logical call it watches."""

    def on_call_event(self, event: CallEvent) -> None:
        """Receive the call's next event (the last one is :class:`CallFinished` or
        :class:`CallAbandoned`)."""

    def attach(self) -> object:
        """Make the call current in this context while its attempts run (e.g. its span);
        return what :meth:`detach` needs to undo it."""

    def detach(self, token: object) -> None:
        """Undo :meth:`attach`."""

    def close(self) -> None:
        """The call is over and neither finished nor abandoned was reported: release it."""


class CallHookBase:
    """A :class:`CallHook` with nothing to make current and nothing to release (subclass it)."""

    __slots__ = ()

    def attach(self) -> object:
        return None

    def detach(self, token: object) -> None:
        pass

    def close(self) -> None:
        pass


class Hook(Protocol):
    """A telemetry subscriber (see the module docstring)."""

    def watching(self) -> bool:
        """Whether the call starting now should be watched (asked once per call: keep it cheap)."""

    def start_call(self, event: CallStarted) -> CallHook:
        """Watch the call that starts (only after :meth:`watching` said yes)."""

    def on_event(self, event: Event) -> None:
        """Receive an event that is not part of a watched call (see the module docstring)."""


__all__ = [
    "AttemptFinished",
    "BreakerRejected",
    "BreakerStateChanged",
    "CallAbandoned",
    "CallAdmitted",
    "CallEvent",
    "CallFinished",
    "CallHook",
    "CallHookBase",
    "CallShed",
    "CallStarted",
    "DedupOutcome",
    "Event",
    "Hook",
    "Transport",
]
