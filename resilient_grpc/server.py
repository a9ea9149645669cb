"""Server-side replay deduplication for ``grpc.server``: :class:`DedupInterceptor`.

A call that carries an idempotency key executes at most once per (caller identity, key) while
its record lives, and the key is bound to one method and one request; every repeat gets the
stored answer (exact response bytes, or the stored status code, details and trailing metadata)
plus the trailer ``idempotency-replayed: true``.
The decisions are taken by :class:`resilient_grpc.core.dedup.DedupFlow`, held by one
:class:`FlowDriver` per call; this module only performs its effects with blocking calls. The
``grpc.aio`` flavour is :class:`resilient_grpc.aio.DedupInterceptor`; both share
:class:`DedupBase`, :class:`DedupSettings` and :class:`FlowDriver`, and their effect loops read
line for line alike.

Rules the design leaves open, chosen here:

* Methods: ``methods=None`` dedups every unary-request method (unary-unary and unary-stream)
  whose call carries a key; stream-request methods always pass through. A call without a key
  passes through unless its method is in ``require_key_methods`` (then INVALID_ARGUMENT).
* Scope: ``scope=None`` scopes records by the caller's authenticated identity
  (:func:`peer_identity`: ``context.peer_identities()``, e.g. the TLS client certificate's
  subjectAltName), so one tenant never gets another's stored answer. Callers without one share
  one key space: the interceptor logs a WARNING at construction saying so, silenced by passing
  ``scope=peer_identity`` (all callers authenticate), ``scope=SHARED_SCOPE`` (one key space on
  purpose) or a function of your own.
* The request is read as raw bytes and deserialized once, on admission, by the handler's own
  deserializer; the fingerprint is the SHA-256 of the method name and the request's canonical
  bytes (a protobuf message's deterministic serialization, so equal requests match however
  their maps were ordered; the raw bytes for anything else). A key reused on another method or
  with another request is refused with FAILED_PRECONDITION. A request that cannot be
  deserialized is refused with INVALID_ARGUMENT before anything is claimed. The response is
  serialized by the interceptor, so a replay sends the exact stored bytes.
* unary-stream: messages go to the client as they are produced and are also collected; the
  whole stream (messages and final status) is stored when it fits in ``max_response_bytes``.
* An outcome larger than ``max_response_bytes`` is not stored, but the key stays completed: a
  repeat gets FAILED_PRECONDITION saying so, never a second execution.
* A concurrent duplicate waits for the in-flight attempt (in-process: on an event; across
  processes: by polling the store) until shortly before the caller's deadline (``max_wait`` s
  without one), then gets ABORTED with a ``grpc-retry-pushback-ms`` trailer: the in-flight
  attempt's remaining lease, capped at ``max_pushback`` (default 1 s). The client stack retries
  a keyed call that gets ABORTED with a pushback after that delay, whatever its ``retryable_codes``.
* At most ``max_waiters`` duplicates of one key wait at once in one process (default 64); more
  are answered ABORTED with the pushback at once. A key re-claimed in this process (its old
  claim's lease lapsed) wakes the old claim's waiters, so none sleeps out its deadline.
* A cancellation (a client cancel, a deadline, a client gone mid-stream) never releases a
  claim: it says nothing about whether the effect happened. A unary handler finishes (the sync
  server never interrupts it; the aio one shields it) and its outcome is stored and replayed; a
  stream cut short keeps its claim until its lease lapses. Only a call known not to have run
  its handler (cancelled while its claim was being written) releases its claim.
* Lease renewal: while a handler runs its claim is renewed every ``lease / 3`` s (timed by one
  thread per sync interceptor, and one shared by the aio ones; aio renewals run on the loop), so a live handler is never duplicated however slow;
  ``lease`` (per method if a mapping) only bounds how long a *dead* executor blocks its key.
  A handler shorter than ``lease / 3`` costs no renewal. A renewal or completion the store
  refuses (the claim was lost) is a WARNING, a dedup outcome and a span event, never silent.
* An expired deadline on arrival is answered DEADLINE_EXCEEDED before any claim. (In
  ``grpc.aio`` the server usually cancels such a call before any interceptor runs.)
* Store down: ``fail_open=False`` answers UNAVAILABLE ("idempotency store unavailable", no
  more: paths, hosts and driver text go to the server log only) without running the handler;
  with ``fail_open=True`` the handler runs without dedup. If the store fails *after* the handler
  ran, the live answer is still returned and logged as not stored (the record stays claimed
  until its lease lapses).
* Store full (:class:`~resilient_grpc.stores.base.StoreFullError`: full of live claims):
  RESOURCE_EXHAUSTED with a ``grpc-retry-pushback-ms`` trailer, handler not run. ``fail_open``
  does not apply: it is an overload signal, and running handlers without dedup exactly when
  the store is saturated would multiply duplicates.
* Initial metadata sent by a handler (``send_initial_metadata``) is stored with the outcome and
  replayed before the responses. The handler sees a thin wrapper of its servicer context
  (:class:`HandlerContext`) that records it, and whether the handler aborted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

import grpc

from resilient_grpc import logs, telemetry
from resilient_grpc.core.admission import handler_executed
from resilient_grpc.core.dedup import (
    DEFAULT_LEASE,
    RENEWALS_PER_LEASE,
    Abandoned,
    Action,
    Claim,
    ClaimResult,
    CommitFailed,
    Complete,
    Crowded,
    DedupFlow,
    Effect,
    Execute,
    Execution,
    FlowSettings,
    LeaseTable,
    Outcome,
    Release,
    StoreDown,
    StoreFull,
    Verdict,
    Wait,
    admission_problem,
    renewed,
    request_fingerprint,
    scoped_key,
)
from resilient_grpc.core.keys import (
    DEFAULT_HEADER,
    DerivationScope,
    IdempotencyKeys,
    derivation_scope,
)
from resilient_grpc.core.methods import method_matches, method_patterns
from resilient_grpc.core.validation import finite_number, whole_number
from resilient_grpc.handlers import WrappedHandlers
from resilient_grpc.stores.base import (
    AsyncStore,
    CommitFailedError,
    Store,
    StoreFullError,
    StoreUnavailableError,
    UndecodableRecordError,
)
from resilient_grpc.stores.memory import MemoryStore
from resilient_grpc.transactional import call_scope

__all__ = [
    "SHARED_SCOPE",
    "DedupBase",
    "DedupInterceptor",
    "DedupSettings",
    "FlowDriver",
    "ScopeFunction",
    "peer_identity",
]

ScopeFunction = Callable[[Any], str]
_log = logging.getLogger(__name__)
MethodSelection = Iterable[str] | Callable[[str], bool] | None


class _Settable(Protocol):
    def set(self) -> None: ...


E = TypeVar("E", bound=_Settable)

if TYPE_CHECKING:  # generic only in grpc-stubs
    _ServerInterceptor = grpc.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.ServerInterceptor

#: Without a client deadline, a duplicate waits at most this long by default (seconds).
DEFAULT_MAX_WAIT = 10.0
#: How many duplicates of one key may wait at once in one process, by default.
DEFAULT_MAX_WAITERS = 64
_NO_DEADLINE = 1e8


def peer_identity(context: Any) -> str:
    """The caller's authenticated identity, or ``""`` without one: the default ``scope``.

    ``context.peer_identities()`` under ``context.peer_identity_key()``: with TLS client
    certificates, the certificate's subjectAltName entries (its common name when it has none);
    with ALTS, the service account. Insecure channels and TLS without a client certificate have
    none.
    """
    identities = context.peer_identities()
    if not identities:
        return ""
    # length-prefixed, so no two lists of names share an encoding (a name may hold any byte)
    names = "".join(f"/{len(name)}:{name}" for name in map(_text, identities))
    return f"{_text(context.peer_identity_key() or '')}{names}"


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def _shared_scope(context: Any) -> str:
    return ""


#: ``scope=SHARED_SCOPE``: every caller shares one key space, on purpose (one tenant, or callers
#: that trust each other): no construction WARNING.
SHARED_SCOPE: ScopeFunction = _shared_scope


@dataclass(slots=True)
class CallPlan:
    """An admitted call: its method, its (valid) idempotency key, its store key, how long a
    duplicate of it may wait (``wait_until`` on ``time.monotonic``), and, once
    :meth:`DedupBase.admit` has read the request, the deserialized ``request`` and its
    ``fingerprint``."""

    method: str
    idempotency_key: str
    store_key: str
    wait_until: float
    request: Any = None
    fingerprint: bytes = b""


class DedupSettings:
    """The configuration and per-call bookkeeping shared by the sync and aio interceptors."""

    def __init__(
        self,
        *,
        scope: ScopeFunction | None,
        methods: MethodSelection,
        require_key_methods: MethodSelection,
        ttl: float | None,
        lease: float,
        max_response_bytes: int,
        fail_open: bool,
        header: str,
        max_wait: float,
        store_ttl: float,
        max_pushback: float = 1.0,
    ) -> None:
        if scope is not None and not callable(scope):
            raise ValueError(f"scope must be a function of the servicer context, got {scope!r}")
        if scope is None:
            _log.warning(
                "DedupInterceptor(scope=None): records are scoped by the caller's authenticated "
                "identity (a TLS client certificate), and all callers without one share one key "
                "space: one caller's idempotency key replays another's stored response. Pass "
                "scope=peer_identity if every caller authenticates, scope=SHARED_SCOPE to share "
                "one key space on purpose, or your own scope function"
            )
            scope = peer_identity
        if ttl is not None:
            finite_number("ttl", ttl, above=0.0, unit=" of seconds")
        finite_number("lease", lease, above=0.0, unit=" of seconds")
        whole_number("max_response_bytes", max_response_bytes, at_least=1)
        finite_number("max_wait", max_wait, above=0.0, unit=" of seconds")
        finite_number("max_pushback", max_pushback, above=0.0, unit=" of seconds")
        if not isinstance(fail_open, bool):
            raise ValueError(f"fail_open must be True or False, got {fail_open!r}")
        self.header = IdempotencyKeys(header=header).header  # validates the header name
        self.scope: ScopeFunction = scope
        self.ttl = float(ttl) if ttl is not None else store_ttl
        self.lease = float(lease)
        self.max_wait = float(max_wait)
        self.flow_settings = FlowSettings(
            max_response_bytes, fail_open, self.lease, float(max_pushback)
        )
        self._rules: dict[str, tuple[bool, bool]] = {}
        self._selected = _selector(methods, "methods", default=True)
        self._required = _selector(require_key_methods, "require_key_methods", default=False)
        # a user's predicate is asked on every call (it may change its mind); names and patterns
        # are matched once per method
        self._rules_fixed = not callable(methods) and not callable(require_key_methods)

    def wants(self, method: str, metadata: Sequence[tuple[str, Any]] | None) -> bool:
        """Whether a call is handled at all (cheap: decided before the handler is chosen)."""
        required, selected = self.method_rules(method)
        return required or (selected and self.key_of(metadata) is not None)

    def method_rules(self, method: str) -> tuple[bool, bool]:
        """``(required, selected)`` for ``method``, matched once per method unless a predicate decides.

        Only methods the server implements get here (the interceptors ask after the handler
        lookup), so the cache is bounded by the service definitions.
        """
        rules = self._rules.get(method)
        if rules is None:
            rules = (bool(self._required(method)), bool(self._selected(method)))
            if self._rules_fixed:
                self._rules[method] = rules
        return rules

    def key_of(self, metadata: Sequence[tuple[str, Any]] | None) -> str | None:
        """The idempotency key in a call's metadata, if any."""
        header = self.header
        for name, value in metadata or ():
            if name == header:
                return value if isinstance(value, str) else str(value.decode("latin-1"))
        return None

    def plan(
        self, method: str, context: Any, remaining: float | None
    ) -> CallPlan | tuple[grpc.StatusCode, str]:
        """The plan of a call :meth:`wants`, or the status refusing it (bad or missing key)."""
        key = self.key_of(context.invocation_metadata())
        problem = admission_problem(
            key, required=self.method_rules(method)[0], method=method, header=self.header
        )
        if problem is not None:
            return grpc.StatusCode.INVALID_ARGUMENT, problem
        assert key is not None
        identity = self.scope(context)
        if not isinstance(identity, str):
            raise TypeError(f"scope() must return a string, got {type(identity).__name__}")
        budget = self.max_wait
        if remaining is not None and remaining < _NO_DEADLINE:
            budget = min(budget, remaining - min(0.1, 0.2 * remaining))
        return CallPlan(method, key, scoped_key(identity, key), time.monotonic() + budget)


def _selector(selection: MethodSelection, field: str, *, default: bool) -> Callable[[str], bool]:
    if selection is None:
        return lambda method: default
    if callable(selection):
        return selection
    patterns = method_patterns(selection, field=field)
    return lambda method: method_matches(patterns, method)


def report(method: str, verdict: Verdict) -> None:
    """Send the verdict's dedup outcomes to telemetry."""
    for event in verdict.events:
        telemetry.dedup_outcome(method, event, verdict.detail)


def status_code(name: str) -> grpc.StatusCode:
    """``"NOT_FOUND"`` -> ``grpc.StatusCode.NOT_FOUND``."""
    return grpc.StatusCode[name]


def text(details: str | bytes | None) -> str:
    """Status details as ``str`` (sync contexts hold bytes, aio contexts str)."""
    if details is None:
        return ""
    return details.decode("utf-8", "replace") if isinstance(details, bytes) else details


def error_outcome(
    context: Any, responses: tuple[bytes, ...] = (), *, omitted: int = 0
) -> Outcome | None:
    """The status a handler ended with (from its context), or ``None`` if it set none."""
    code = context.code()
    if code is None or code == grpc.StatusCode.OK:
        return None
    if omitted:
        return Outcome(code.name, omitted_bytes=omitted)
    trailers = _trailers(context)
    initial = context.initial_metadata
    return Outcome(code.name, text(context.details()), trailers, responses, 0, initial)


def handler_outcome(context: Any, responses: tuple[bytes, ...], *, omitted: int = 0) -> Outcome:
    """The outcome of a handler that returned: the status it set (OK if none), its trailers."""
    code = context.code()
    name = "OK" if code is None or code == grpc.StatusCode.OK else code.name
    if omitted:
        return Outcome(name, omitted_bytes=omitted)
    metadata = context.trailing_metadata()
    trailers = tuple(metadata) if metadata else ()
    initial = context.initial_metadata
    if name == "OK":
        return Outcome("OK", "", trailers, responses, 0, initial)
    return Outcome(name, text(context.details()), trailers, responses, 0, initial)


def _trailers(context: Any) -> tuple[tuple[str, str | bytes], ...]:
    metadata = context.trailing_metadata()
    return tuple(metadata) if metadata else ()


class Collector:
    """Collects a stream's serialized messages up to ``limit`` bytes (then only counts them)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.messages: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size <= self.limit:
            self.messages.append(data)

    @property
    def omitted(self) -> int:
        return self.size if self.size > self.limit else 0


class _Flight(Generic[E]):
    """One key's execution in this process: the claim's token, and the event its waiters wait on."""

    __slots__ = ("event", "token")

    def __init__(self, token: int) -> None:
        self.token = token
        self.event: E | None = None


class Flights(Generic[E]):
    """In-process single flight: the keys this process is executing, each with an event to wait on.

    ``make_event`` is ``threading.Event`` (sync) or ``asyncio.Event`` (aio); an event is made only
    when a duplicate actually waits. A call opens its flight when it wins a claim and ends it when
    it completes or releases the claim; a flight is ended only by the claim that opened it, and a
    key re-claimed in this process (the old claim's lease lapsed) wakes the old flight's waiters,
    so none sleeps out its deadline. At most ``max_waiters`` duplicates per key wait at once.
    """

    def __init__(self, make_event: Callable[[], E], max_waiters: int) -> None:
        self._make_event = make_event
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight[E]] = {}
        self._waiting: dict[str, int] = {}
        self.max_waiters = max_waiters

    def get(self, key: str) -> E | None:
        """The event of ``key``'s flight in this process (``None``: not executing here)."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is None:
                return None
            event = flight.event
            if event is None:
                event = flight.event = self._make_event()
            return event

    def open(self, key: str, token: int) -> None:
        """Start the flight of a key this process just claimed with ``token``."""
        with self._lock:
            old = self._flights.get(key)
            self._flights[key] = _Flight(token)
        if old is not None and old.event is not None:
            old.event.set()  # the old claim lapsed: its waiters look again

    def end(self, key: str, token: int) -> None:
        """End the flight opened by ``token`` (a later claim's flight is left alone)."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is None or flight.token != token:
                return
            del self._flights[key]
        if flight.event is not None:
            flight.event.set()

    def enter(self, key: str) -> bool:
        """Count one more waiting duplicate of ``key``; ``False`` (not counted) if the bound is reached."""
        with self._lock:
            waiting = self._waiting.get(key, 0)
            if waiting >= self.max_waiters:
                return False
            self._waiting[key] = waiting + 1
            return True

    def leave(self, key: str) -> None:
        """A duplicate of ``key`` stopped waiting."""
        with self._lock:
            waiting = self._waiting[key] - 1
            if waiting:
                self._waiting[key] = waiting
            else:
                del self._waiting[key]


class Cancellable(Protocol):
    """An in-flight asyncio renewal (a task) that stopping the heartbeat cancels."""

    def cancel(self) -> object: ...


class Renewer(Protocol):
    """What the renewal thread calls when a call's renewal is due: a shell's renewal."""

    def renew_due(self, driver: FlowDriver) -> float | None:
        """Renew ``driver``'s claim now; seconds to its next renewal (``None``: not from here)."""
        ...


class FlowDriver:
    """Production's driver of one call's dedup flow: holds the :class:`DedupFlow` (the decisions)
    and does the bookkeeping both shells share: single flight, telemetry, lease renewal
    decisions, and the live result of this call's execution (``response``, or the handler's
    ``error``).

    The shell loops ``effect = driver.advance(effect, answer)`` until it returns ``None``, then
    reads :attr:`verdict`; the handler runs inside :meth:`scope` (the one context manager the
    handler runs in); :meth:`close` (in a ``finally``) ends a flight left open when the call
    stopped between claim and outcome. Such a claim is *kept*: the handler may have done its
    effect, so the key stays claimed until its lease lapses (never released).
    """

    __slots__ = (
        "_flights",
        "beat",
        "beating",
        "detached",
        "error",
        "flow",
        "heartbeats",
        "idempotency_key",
        "lease",
        "method",
        "renewer",
        "response",
        "store",
        "store_key",
        "token",
        "verdict",
    )

    def __init__(
        self,
        plan: CallPlan,
        fingerprint: bytes,
        settings: FlowSettings,
        flights: Flights[Any],
        lease: float,
    ) -> None:
        self.flow = DedupFlow(
            fingerprint, settings, clock=time.monotonic, wait_until=plan.wait_until, lease=lease
        )
        self.method = plan.method
        #: the key in the store: the client's key scoped by the caller's identity (a hash)
        self.store_key = plan.store_key
        #: the client's idempotency key, as sent
        self.idempotency_key = plan.idempotency_key
        #: this call's lease (seconds), as configured for its method
        self.lease = lease
        self._flights = flights
        #: our claim's token while we hold it (flight open), else ``None``
        self.token: int | None = None
        #: while the handler runs: its claim is renewed (by ``renewer``); an aio renewal in flight
        self.beating = False
        self.renewer: Renewer | None = None
        #: the renewal thread that times this call's renewals (set by :meth:`Heartbeats.start`)
        self.heartbeats: Heartbeats | None = None
        self.beat: Cancellable | None = None
        #: the caller went away while the handler's execution was shielded (aio)
        self.detached = False
        self.verdict: Verdict | None = None
        self.response: bytes | None = None
        self.error: Exception | None = None
        self.store: object = None

    def first(self) -> Effect:
        """The first effect (claim the key)."""
        return self.flow.start()

    def scope(self) -> call_scope:
        """The context manager the handler runs inside: the call's key as derivation scope, and
        the call (store, store key, claim token) bound for :func:`resilient_grpc.transaction`."""
        inner = derivation_scope.of(DerivationScope.trusted(self.idempotency_key))
        return call_scope(self.store, self.store_key, self.token, inner)

    def advance(self, effect: Effect, answer: object) -> Effect | None:
        """Send ``answer`` (to ``effect``) to the flow; ``None`` when the flow has decided."""
        if isinstance(answer, ClaimResult):
            token = answer.token
            if token is not None:  # we own the key: duplicates in this process wait on us
                self._flights.open(self.store_key, token)
                self.token = token
        elif isinstance(effect, (Complete, Release)) and not isinstance(answer, CommitFailed):
            # (a failed commit keeps the flight open until the release that follows it)
            self.token = None
            self._flights.end(self.store_key, effect.token)
        step = self.flow.send(answer)
        if isinstance(step, Verdict):
            self.verdict = step
            report(self.method, step)
            return None
        return step

    def renewed(self, answer: object) -> float | None:
        """After a lease renewal answered ``answer``: seconds to the next one (``None``: stop).

        A refused renewal (the claim is lost) or a store failure is reported; an answer that
        arrives after the handler finished is ignored.
        """
        if not self.beating or self.token is None:
            return None
        step = renewed(answer, self.flow.lease)
        if step.event is not None:
            telemetry.dedup_outcome(self.method, step.event, step.detail)
        return step.delay

    def stop_beating(self) -> None:
        """Stop renewing the lease (the handler returned, or the call stopped)."""
        if self.beating:
            self.beating = False
            heartbeats = self.heartbeats
            if heartbeats is not None:
                heartbeats.stop(self)
            beat = self.beat
            if beat is not None:
                self.beat = None
                beat.cancel()

    def reraise(self) -> None:
        """Raise the handler's exception again, if it raised one (an EXECUTED verdict)."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """End the flight of a call stopped between its claim and its outcome, keeping the claim.

        The handler may have run, so the outcome is unknown: the claim stays until its lease
        lapses (renewal stops here). Nothing to do once the flow decided, or while a detached
        execution still owns the flight.
        """
        if self.detached:  # the execution goes on (and renews its lease) without the call
            return
        self.stop_beating()
        token = self.token
        if token is None:
            return
        self.token = None
        self._flights.end(self.store_key, token)
        telemetry.dedup_outcome(self.method, "interrupted", "")


class Heartbeats:
    """One thread renewing the leases of the running handlers it is given (never one per call).

    :meth:`start` registers a call whose claim is due for renewal after ``delay`` s; :meth:`stop`
    forgets it. Both are one dict operation with no lock (atomic under the GIL), so a call
    shorter than a third of its lease costs no round trip and almost nothing else. The thread
    wakes every :attr:`POLL` s (sooner for shorter leases), renews what is due through the
    call's :class:`Renewer` one at a time, and ends when nothing is left to renew (the next
    :meth:`start` starts it again). Each sync :class:`DedupInterceptor` has its own: its
    renewals block on its store, and a stalled store (each renewal waiting out the store's
    timeout) must not hold up the renewals of another store's handlers until their claims
    lapse while they run. The aio interceptors share :data:`HEARTBEATS` (they only schedule).
    """

    #: The longest the thread sleeps (seconds).
    POLL = 0.5

    def __init__(self) -> None:
        self._due: dict[FlowDriver, float] = {}
        self._period = self.POLL
        self._lock = threading.Lock()
        self._sooner = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, driver: FlowDriver, renewer: Renewer, delay: float) -> None:
        """Renew ``driver``'s claim in ``delay`` s through ``renewer`` (and as it says after)."""
        driver.renewer = renewer
        driver.heartbeats = self
        self._due[driver] = time.monotonic() + delay
        if delay < 2 * self._period or self._thread is None:
            self._wake_sooner(delay)

    def stop(self, driver: FlowDriver) -> None:
        """Stop renewing ``driver``'s claim (a renewal already running finishes)."""
        self._due.pop(driver, None)

    def _wake_sooner(self, delay: float) -> None:
        """Poll at least every ``delay / 2`` s from now on (a shorter lease than any so far)."""
        with self._lock:
            self._period = min(self._period, delay / 2)
            self._sooner.set()  # a sleeping thread starts over with the shorter period
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="resilient-grpc-lease-renewal", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            if self._sooner.wait(self._period):
                self._sooner.clear()
            with self._lock:
                # Idle: end. Marked first, then checked: a start() that wrote its driver after
                # the check saw no thread and starts one; one that wrote it before is seen here.
                self._thread = None
                if not self._due:
                    return
                self._thread = threading.current_thread()
            now = time.monotonic()
            for driver, due in self._due.copy().items():  # a copy: calls come and go meanwhile
                if due > now:
                    continue
                self._due.pop(driver, None)  # before renewing: an async renewal re-registers
                renewer = driver.renewer
                if not driver.beating or renewer is None:
                    continue
                try:
                    delay = renewer.renew_due(driver)
                except Exception:  # a renewal must never kill the thread every call relies on
                    logs.server_logger.exception("lease renewal failed unexpectedly")
                    continue
                if delay is not None and driver.beating:
                    self._due[driver] = time.monotonic() + delay


#: The renewal thread of the process's aio interceptors (started when a renewal is scheduled).
HEARTBEATS = Heartbeats()


class RecordingContext:
    """The part of a handler's servicer context both shells share: it delegates to the real
    context and records what the stored outcome needs (initial metadata, whether the handler
    aborted). Every attribute it does not define is the real context's."""

    __slots__ = ("_context", "aborted", "initial_metadata")

    def __init__(self, context: Any) -> None:
        self._context = context
        self.aborted = False
        self.initial_metadata: tuple[tuple[str, str | bytes], ...] = ()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def time_remaining(self) -> Any:
        return self._context.time_remaining()

    def peer(self) -> Any:
        return self._context.peer()

    def peer_identities(self) -> Any:
        return self._context.peer_identities()

    def peer_identity_key(self) -> Any:
        return self._context.peer_identity_key()

    def auth_context(self) -> Any:
        return self._context.auth_context()

    def code(self) -> Any:
        return self._context.code()

    def details(self) -> Any:
        return self._context.details()

    def trailing_metadata(self) -> Any:
        return self._context.trailing_metadata()

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._context.set_trailing_metadata(trailing_metadata)

    def set_code(self, code: Any) -> None:
        self._context.set_code(code)

    def set_details(self, details: Any) -> None:
        self._context.set_details(details)

    def set_compression(self, compression: Any) -> None:
        self._context.set_compression(compression)

    def disable_next_message_compression(self) -> None:
        self._context.disable_next_message_compression()


class HandlerContext(RecordingContext, grpc.ServicerContext):
    """The servicer context a deduplicated sync handler sees: a ``grpc.ServicerContext`` (for
    ``isinstance`` checks) that delegates to the real one and records what it sent."""

    __slots__ = ()

    def send_initial_metadata(self, initial_metadata: Any) -> None:
        self.initial_metadata = tuple(initial_metadata)
        self._context.send_initial_metadata(initial_metadata)

    def abort(self, code: grpc.StatusCode, details: str) -> Any:
        self.aborted = True
        return self._context.abort(code, details)

    def abort_with_status(self, status: Any) -> Any:
        self.aborted = True
        return self._context.abort_with_status(status)

    def is_active(self) -> bool:
        return bool(self._context.is_active())

    def cancel(self) -> None:
        self._context.cancel()

    def add_callback(self, callback: Any) -> bool:
        return bool(self._context.add_callback(callback))


class DedupBase:
    """Arguments, validation and admission shared by the sync and aio interceptors."""

    _flights: Flights[Any]

    def __init__(
        self,
        store: Store | AsyncStore | None = None,
        scope: ScopeFunction | None = None,
        *,
        methods: MethodSelection = None,
        require_key_methods: MethodSelection = (),
        ttl: float | None = None,
        lease: float | Mapping[str, float] = DEFAULT_LEASE,
        max_response_bytes: int = 256 * 1024,
        fail_open: bool = False,
        header: str = DEFAULT_HEADER,
        max_wait: float = DEFAULT_MAX_WAIT,
        max_pushback: float = 1.0,
        max_waiters: int = DEFAULT_MAX_WAITERS,
    ) -> None:
        if store is None:
            store = MemoryStore()
        if not isinstance(store, (Store, AsyncStore)):
            raise ValueError(f"store must be a resilient_grpc.stores.Store, got {store!r}")
        self.leases = LeaseTable(lease)
        self.max_waiters = whole_number("max_waiters", max_waiters, at_least=1)
        self.settings = DedupSettings(
            scope=scope,
            methods=methods,
            require_key_methods=require_key_methods,
            ttl=ttl,
            lease=self.leases.default,
            max_response_bytes=max_response_bytes,
            fail_open=fail_open,
            header=header,
            max_wait=max_wait,
            store_ttl=store.ttl,
            max_pushback=max_pushback,
        )
        self._attach(store)
        self._handlers = WrappedHandlers(self._wrap)

    def _attach(self, store: Store | AsyncStore) -> None:
        raise NotImplementedError

    def _wrap(self, method: str, handler: Any) -> Any:
        """The handler that deduplicates calls of ``method`` around ``handler`` (per shell)."""
        raise NotImplementedError

    def store_call(self, store: Store | AsyncStore, key: str, effect: Effect) -> Any:
        """The store call an effect asks for (a value, or a coroutine for an :class:`AsyncStore`)."""
        if isinstance(effect, Claim):
            return store.claim(key, effect.fingerprint, lease=effect.lease)
        if isinstance(effect, Complete):
            return store.complete(key, effect.token, effect.outcome, ttl=self.settings.ttl)
        if isinstance(effect, Release):
            return store.release(key, effect.token)
        raise TypeError(f"not a store effect: {effect!r}")

    def admit(
        self,
        method: str,
        context: Any,
        raw: bytes,
        deserialize: Callable[[bytes], Any] | None,
    ) -> CallPlan | tuple[grpc.StatusCode, str]:
        """The plan of a call, or the status refusing it before anything runs.

        Reads the request once: ``plan.request`` is ``deserialize(raw)`` (``raw`` without a
        deserializer), to be passed to the handler, and ``plan.fingerprint`` binds the key to
        the method and the request's canonical bytes (see
        :func:`~resilient_grpc.core.dedup.request_fingerprint`).
        """
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the deadline expired before the call could start; nothing was executed",
            )
        plan = self.settings.plan(method, context, remaining)
        if isinstance(plan, CallPlan):
            try:
                plan.request = deserialize(raw) if deserialize is not None else raw
            except Exception:
                return (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "the request could not be deserialized; nothing was executed",
                )
            plan.fingerprint = request_fingerprint(method, plan.request, raw)
        return plan

    def driver(self, plan: CallPlan) -> FlowDriver:
        """The driver of an admitted call's flow (``plan`` from :meth:`admit`)."""
        driver = FlowDriver(
            plan,
            plan.fingerprint,
            self.settings.flow_settings,
            self._flights,
            self.leases(plan.method) if self.leases.per_method else self.leases.default,
        )
        driver.store = self.store  # type: ignore[attr-defined]  # set by both subclasses
        return driver


def store_down(error: Exception) -> StoreDown:
    """The flow's view of a store error: full (an overload signal), a transaction that did
    not commit, an undecodable record (counted as ``store_undecodable``) or down (counted as
    ``store_error``); its message goes to the server log only.

    Any other exception (a custom store that lets its driver's error through) is a store that
    is down too: the client gets the same UNAVAILABLE, never the driver's text."""
    if not isinstance(error, StoreUnavailableError):
        _log.error(
            "the idempotency store raised %s instead of StoreUnavailableError; treated as down",
            type(error).__name__,
            exc_info=error,
        )
        return StoreDown(f"the store raised {type(error).__name__}: {error}")
    if isinstance(error, StoreFullError):
        return StoreFull(str(error), retry_after=error.retry_after)
    if isinstance(error, CommitFailedError):
        return CommitFailed(str(error))
    if isinstance(error, UndecodableRecordError):
        return StoreDown(str(error), "store_undecodable")
    return StoreDown(str(error))


class DedupInterceptor(DedupBase, _ServerInterceptor):
    """Replays the stored outcome of an idempotency key instead of running the handler again.

    ``store``: where records live (default: a new :class:`MemoryStore`). ``scope(context)``
    returns the caller's identity so tenants never share records (default: :func:`peer_identity`,
    the authenticated peer; see the module docstring for callers without one). ``methods``:
    which methods are deduplicated (``None``: all unary-request methods;
    names, ``"/pkg.Service/*"`` patterns or a predicate). ``require_key_methods``: methods whose
    calls must carry a key (they are deduplicated whatever ``methods`` says). ``ttl``: record
    lifetime (default: the store's). ``lease``: how long a claim outlives a *dead* executor
    (seconds, or a mapping of method names / ``"/pkg.Service/*"`` patterns to seconds); a running
    handler's lease is renewed every third of it, however slow the handler.
    ``max_response_bytes``: larger outcomes are not stored. ``fail_open``: run handlers without
    dedup while the store is down. ``max_wait``: how long a duplicate waits for the in-flight
    attempt when the caller set no deadline; ``max_pushback``: the longest retry delay an ABORTED
    duplicate is told to wait; ``max_waiters``: how many duplicates of one key may wait at once
    in this process (more are answered ABORTED with a pushback at once). See the module
    docstring for the exact rules.
    """

    store: Store

    def _attach(self, store: Store | AsyncStore) -> None:
        if not isinstance(store, Store):
            raise ValueError(
                f"{type(store).__name__} is an asyncio store: use it with "
                "resilient_grpc.aio.DedupInterceptor"
            )
        self.store = store
        self._flights = Flights(threading.Event, self.max_waiters)
        self._heartbeats = Heartbeats()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        if not self.settings.wants(method, handler_call_details.invocation_metadata):
            return handler
        wrapped: grpc.RpcMethodHandler[Any, Any] = self._handlers.get(method, handler)
        return wrapped

    # -- handler wrappers

    def _wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        deserialize = handler.request_deserializer
        serialize = handler.response_serializer or unchanged
        if handler.response_streaming:
            stream = handler.unary_stream
            assert stream is not None

            def unary_stream(raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
                driver, request = self._admit(method, raw, context, deserialize)

                def execute() -> Generator[bytes, None, Execution]:
                    collected = Collector(self.settings.flow_settings.max_response_bytes)
                    handler_context = HandlerContext(context)
                    with driver.scope():
                        try:
                            for message in stream(request, cast(Any, handler_context)):
                                data = serialize(message)
                                collected.add(data)
                                yield data
                        except Exception as error:
                            driver.error = error
                            return Execution(failed_outcome(handler_context, collected))
                    return Execution(returned_outcome(handler_context, collected))

                verdict = yield from self._drive(driver, execute)
                if verdict.action is Action.EXECUTED:
                    driver.reraise()
                    return
                assert verdict.outcome is not None
                self._start(context, verdict.outcome)
                yield from verdict.outcome.responses
                self._finish(context, verdict.outcome)

            return grpc.unary_stream_rpc_method_handler(unary_stream)

        unary = handler.unary_unary
        assert unary is not None

        def unary_unary(raw: bytes, context: grpc.ServicerContext) -> bytes | None:
            driver, request = self._admit(method, raw, context, deserialize)

            def execute() -> Generator[bytes, None, Execution]:
                handler_context = HandlerContext(context)
                with driver.scope():
                    try:
                        response = unary(request, cast(Any, handler_context))
                    except Exception as error:
                        driver.error = error
                        return Execution(failed_outcome(handler_context))
                return Execution(unary_outcome(driver, handler_context, response, serialize))
                yield  # a generator of no messages, like a stream's

            verdict = finished(self._drive(driver, execute))
            if verdict.action is Action.EXECUTED:
                driver.reraise()
                return driver.response
            assert verdict.outcome is not None
            self._start(context, verdict.outcome)
            self._finish(context, verdict.outcome)
            return verdict.outcome.responses[0]

        return grpc.unary_unary_rpc_method_handler(unary_unary)

    def _admit(
        self,
        method: str,
        raw: bytes,
        context: grpc.ServicerContext,
        deserialize: Callable[[bytes], Any] | None,
    ) -> tuple[FlowDriver, Any]:
        """The call's driver and request, or refuse it before anything runs (expired deadline,
        bad or missing key, undecodable request)."""
        handler_executed(False)  # until the flow runs it: waits and replays are no executions
        plan = self.admit(method, context, raw, deserialize)
        if isinstance(plan, tuple):
            context.abort(*plan)
        assert isinstance(plan, CallPlan)
        return self.driver(plan), plan.request

    @staticmethod
    def _start(context: grpc.ServicerContext, outcome: Outcome) -> None:
        """Send a stored outcome's initial metadata (what the handler sent the first time)."""
        if outcome.initial_metadata:
            context.send_initial_metadata(outcome.initial_metadata)

    @staticmethod
    def _finish(context: grpc.ServicerContext, outcome: Outcome) -> None:
        """Send a stored or refusal outcome's trailers and, for an error, its status."""
        context.set_trailing_metadata(outcome.trailing_metadata)
        if outcome.code != "OK":
            context.abort(status_code(outcome.code), outcome.details)

    # -- the effect loop (resilient_grpc.aio.server has the same lines, awaited)

    def _drive(self, driver: FlowDriver, execute: Executor) -> Generator[bytes, None, Verdict]:
        """Perform a call's flow; ``execute`` is a generator of the handler's messages."""
        try:
            run = self._pump(driver, driver.first())
            if run is not None:  # a flow executes the handler at most once
                yield from self._settle(driver, run, execute)
        finally:
            driver.close()
        assert driver.verdict is not None
        return driver.verdict

    def _settle(
        self, driver: FlowDriver, run: Execute, execute: Executor
    ) -> Generator[bytes, None, None]:
        """Run the handler (unless its caller is already gone) and store its outcome."""
        self._beat(driver, run)
        handler_executed(not driver.detached)
        try:
            execution: object = Abandoned() if driver.detached else (yield from execute())
        finally:
            driver.stop_beating()
        self._pump(driver, driver.advance(run, execution))

    def _pump(self, driver: FlowDriver, effect: Effect | None) -> Execute | None:
        """Perform store effects until the flow asks to run the handler (that effect) or decides."""
        while effect is not None:
            if isinstance(effect, Execute):
                return effect
            effect = driver.advance(effect, self._perform(driver.store_key, effect))
        return None

    def _perform(self, key: str, effect: Effect) -> object:
        try:
            if not isinstance(effect, Wait):
                return self.store_call(self.store, key, effect)
            if not self._flights.enter(key):
                return Crowded()
            try:
                event = self._flights.get(key)
                if event is None:
                    return self.store.wait(key, effect.timeout)
                event.wait(effect.timeout)
                return self.store.get(key)
            finally:
                self._flights.leave(key)
        except Exception as error:  # a custom store's own error is a store that is down
            return store_down(error)

    # -- lease renewal

    def _beat(self, driver: FlowDriver, run: Execute) -> None:
        """Renew the claim every third of its lease while the handler runs (this interceptor's
        renewal thread)."""
        if run.token is None:  # failing open: nothing claimed
            return
        driver.beating = True
        self._heartbeats.start(driver, self, driver.lease / RENEWALS_PER_LEASE)

    def renew_due(self, driver: FlowDriver) -> float | None:
        """On the renewal thread: renew ``driver``'s claim; seconds to the next renewal."""
        token = driver.token
        if token is None:
            return None
        try:
            answer: object = self.store.renew(driver.store_key, token, lease=driver.lease)
        except Exception as error:
            answer = store_down(error)
        return driver.renewed(answer)


Executor = Callable[[], Generator[bytes, None, Execution]]


def finished(flow: Generator[bytes, None, Verdict]) -> Verdict:
    """Run a unary call's flow (a generator that yields no messages) to its verdict."""
    try:
        next(flow)
    except StopIteration as stop:
        verdict: Verdict = stop.value
        return verdict
    raise AssertionError("a unary handler's flow yielded a message")


def unchanged(value: Any) -> Any:
    return value


def unary_outcome(
    driver: FlowDriver, context: RecordingContext, response: Any, serialize: Callable[[Any], bytes]
) -> Outcome | None:
    """The outcome of a unary handler that returned ``response`` (kept as the live answer)."""
    if response is None:  # the handler set an error code and returned nothing
        return error_outcome(context)
    data = serialize(response)
    driver.response = data
    return handler_outcome(context, (data,))


def returned_outcome(context: RecordingContext, collected: Collector) -> Outcome:
    """The outcome of a stream handler that returned."""
    return handler_outcome(context, tuple(collected.messages), omitted=collected.omitted)


def failed_outcome(context: RecordingContext, collected: Collector | None = None) -> Outcome | None:
    """After a handler raised: its status if it aborted, ``None`` for an unexpected exception."""
    if not context.aborted:
        return None
    if collected is None:
        return error_outcome(context)
    return error_outcome(context, tuple(collected.messages), omitted=collected.omitted)
