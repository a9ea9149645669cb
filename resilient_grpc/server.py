"""Server-side replay deduplication for ``grpc.server``: :class:`DedupInterceptor`.

A call that carries an idempotency key executes at most once per (method, caller identity, key)
while its record lives; every repeat gets the stored answer (exact response bytes, or the stored
status code, details and trailing metadata) plus the trailer ``idempotency-replayed: true``.
The decisions are taken by :func:`resilient_grpc.core.dedup.dedup_flow`; this module only
performs its effects with blocking calls. The ``grpc.aio`` flavour is
:class:`resilient_grpc.aio.DedupInterceptor`; both share :class:`DedupSettings`.

Rules the design leaves open, chosen here:

* Methods: ``methods=None`` dedups every unary-request method (unary-unary and unary-stream)
  whose call carries a key; stream-request methods always pass through. A call without a key
  passes through unless its method is in ``require_key_methods`` (then INVALID_ARGUMENT).
* The request is read as raw bytes (the handler's deserializer runs inside the interceptor), so
  the fingerprint is the SHA-256 of the exact bytes on the wire, and the response is serialized
  by the interceptor, so a replay sends the exact stored bytes.
* unary-stream: messages go to the client as they are produced and are also collected; the
  whole stream (messages and final status) is stored when it fits in ``max_response_bytes``.
* An outcome larger than ``max_response_bytes`` is not stored, but the key stays completed: a
  repeat gets FAILED_PRECONDITION saying so, never a second execution.
* A concurrent duplicate waits for the in-flight attempt (in-process: on an event; across
  processes: by polling the store) until shortly before the caller's deadline (``max_wait`` s
  without one), then gets ABORTED with a ``grpc-retry-pushback-ms`` trailer: the in-flight
  attempt's remaining lease, capped at ``max_pushback`` (default 1 s). The client stack retries
  a keyed call that gets ABORTED with a pushback after that delay, whatever its ``retryable_codes``.
* A call cancelled or interrupted between its claim and its outcome (an aio deadline, a client
  gone mid-stream) releases the claim at once, as a retryable failure does.
* An expired deadline on arrival is answered DEADLINE_EXCEEDED before any claim. (In
  ``grpc.aio`` the server usually cancels such a call before any interceptor runs.)
* Store down: ``fail_open=False`` answers UNAVAILABLE without running the handler; with
  ``fail_open=True`` the handler runs without dedup. If the store fails *after* the handler ran,
  the live answer is still returned (the record stays claimed until its lease lapses).
* Initial metadata sent by a handler is not stored; only the trailing metadata is replayed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import grpc

from resilient_grpc import telemetry
from resilient_grpc.core.dedup import (
    Action,
    Claim,
    ClaimResult,
    Complete,
    DedupFlow,
    Effect,
    Execute,
    Execution,
    FlowSettings,
    Outcome,
    Release,
    StoreDown,
    Verdict,
    Wait,
    admission_problem,
    fingerprint,
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
from resilient_grpc.stores.base import AsyncStore, Store, StoreUnavailableError
from resilient_grpc.stores.memory import MemoryStore
from resilient_grpc.transactional import call_scope

__all__ = ["DedupBase", "DedupInterceptor", "DedupSettings", "FlowDriver", "ScopeFunction"]

ScopeFunction = Callable[[Any], str]
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
_NO_DEADLINE = 1e8


@dataclass(slots=True)
class CallPlan:
    """An admitted call: its method, its (valid) idempotency key, its store key and how long a
    duplicate of it may wait (``wait_until`` on ``time.monotonic``)."""

    method: str
    key: str
    store_key: str
    wait_until: float


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
        if ttl is not None:
            finite_number("ttl", ttl, above=0.0, unit=" of seconds")
        finite_number("lease", lease, above=0.0, unit=" of seconds")
        whole_number("max_response_bytes", max_response_bytes, at_least=1)
        finite_number("max_wait", max_wait, above=0.0, unit=" of seconds")
        finite_number("max_pushback", max_pushback, above=0.0, unit=" of seconds")
        if not isinstance(fail_open, bool):
            raise ValueError(f"fail_open must be True or False, got {fail_open!r}")
        self.header = IdempotencyKeys(header=header).header  # validates the header name
        self.scope = scope
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
        identity = self.scope(context) if self.scope is not None else ""
        if not isinstance(identity, str):
            raise TypeError(f"scope() must return a string, got {type(identity).__name__}")
        budget = self.max_wait
        if remaining is not None and remaining < _NO_DEADLINE:
            budget = min(budget, remaining - min(0.1, 0.2 * remaining))
        return CallPlan(method, key, scoped_key(method, identity, key), time.monotonic() + budget)


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
        telemetry.dedup_outcome(method, event)


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
    return Outcome(code.name, text(context.details()), trailers, responses)


def handler_outcome(context: Any, responses: tuple[bytes, ...], *, omitted: int = 0) -> Outcome:
    """The outcome of a handler that returned: the status it set (OK if none), its trailers."""
    code = context.code()
    name = "OK" if code is None or code == grpc.StatusCode.OK else code.name
    if omitted:
        return Outcome(name, omitted_bytes=omitted)
    metadata = context.trailing_metadata()
    trailers = tuple(metadata) if metadata else ()
    if name == "OK":
        return Outcome("OK", "", trailers, responses)
    return Outcome(name, text(context.details()), trailers, responses)


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


class Flights(Generic[E]):
    """In-process single flight: the keys this process is executing, each with an event to wait on.

    ``make_event`` is ``threading.Event`` (sync) or ``asyncio.Event`` (aio); an event is made only
    when a duplicate actually waits. A call opens its flight when it wins a claim and ends it when
    it completes or releases the claim.
    """

    def __init__(self, make_event: Callable[[], E]) -> None:
        self._make_event = make_event
        self._lock = threading.Lock()
        self._events: dict[str, E | None] = {}

    def get(self, key: str) -> E | None:
        """The event of ``key``'s flight in this process (``None``: not executing here)."""
        with self._lock:
            if key not in self._events:
                return None
            event = self._events[key]
            if event is None:
                event = self._events[key] = self._make_event()
            return event

    def open(self, key: str) -> None:
        """Start the flight of a key this process just claimed."""
        with self._lock:
            self._events[key] = None

    def end(self, key: str) -> None:
        with self._lock:
            event = self._events.pop(key, None)
        if event is not None:
            event.set()


class FlowDriver(DedupFlow, Generic[E]):
    """One call's flow (a :class:`DedupFlow`) plus the bookkeeping both shells share.

    The shell loops ``effect = driver.advance(effect, answer)`` until it returns ``None``, then
    reads :attr:`verdict`; :meth:`close` (in a ``finally``) ends a flight left open by an
    exception and returns the token of a claim that must be released (the call was cancelled
    or interrupted between claim and completion). Single flight and telemetry live here, and
    the live result of this call's execution (``response``, or the handler's ``error``). One
    object per call: the flow's decisions stay in :class:`DedupFlow`.
    """

    __slots__ = (
        "_flights",
        "_flying",
        "_owned",
        "call_key",
        "error",
        "key",
        "method",
        "response",
        "store",
        "verdict",
    )

    def __init__(
        self, plan: CallPlan, fingerprint: bytes, settings: FlowSettings, flights: Flights[E]
    ) -> None:
        DedupFlow.__init__(
            self, fingerprint, settings, clock=time.monotonic, wait_until=plan.wait_until
        )
        self.method = plan.method
        self.key = plan.store_key
        self.call_key = plan.key
        self._flights = flights
        self._flying = False
        self._owned: int | None = None
        self.verdict: Verdict | None = None
        self.response: bytes | None = None
        self.error: Exception | None = None
        self.store: object = None

    def first(self) -> Effect:
        return self.start()

    def scope(self) -> call_scope:
        """The derivation scope the handler runs in (the call's key, validated on admission),
        with the call bound for :func:`resilient_grpc.transaction`."""
        inner = derivation_scope.of(DerivationScope.trusted(self.call_key))
        return call_scope(self.store, self.key, self._owned, inner)

    def advance(self, effect: Effect, answer: object) -> Effect | None:
        """Send ``answer`` (to ``effect``) to the flow; ``None`` when the flow has decided."""
        if isinstance(answer, ClaimResult):
            token = answer.token
            if token is not None:  # we own the key: duplicates in this process wait on us
                self._flights.open(self.key)
                self._flying = True
                self._owned = token
        elif isinstance(effect, (Complete, Release)):
            self._flights.end(self.key)
            self._flying = False
            self._owned = None
        step = self.send(answer)
        if isinstance(step, Verdict):
            self.verdict = step
            report(self.method, step)
            return None
        return step

    def reraise(self) -> None:
        """Raise the handler's exception again, if it raised one (an EXECUTED verdict)."""
        if self.error is not None:
            raise self.error

    def close(self) -> int | None:
        """End an open flight; the claim token to release if the call stopped half-way."""
        if not self._flying:
            return None
        self._flying = False
        self._flights.end(self.key)
        return self._owned


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
        lease: float = 30.0,
        max_response_bytes: int = 256 * 1024,
        fail_open: bool = False,
        header: str = DEFAULT_HEADER,
        max_wait: float = DEFAULT_MAX_WAIT,
        max_pushback: float = 1.0,
    ) -> None:
        if store is None:
            store = MemoryStore()
        if not isinstance(store, (Store, AsyncStore)):
            raise ValueError(f"store must be a resilient_grpc.stores.Store, got {store!r}")
        self.settings = DedupSettings(
            scope=scope,
            methods=methods,
            require_key_methods=require_key_methods,
            ttl=ttl,
            lease=lease,
            max_response_bytes=max_response_bytes,
            fail_open=fail_open,
            header=header,
            max_wait=max_wait,
            store_ttl=store.ttl,
            max_pushback=max_pushback,
        )
        self._attach(store)
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def _attach(self, store: Store | AsyncStore) -> None:
        raise NotImplementedError

    def _cached(self, method: str, handler: Any, wrap: Callable[[str, Any], Any]) -> Any:
        """The wrapped handler of ``method`` (built once per handler object)."""
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, wrap(method, handler))
            self._wrapped[method] = cached
        return cached[1]

    def store_call(self, store: Store | AsyncStore, key: str, effect: Effect) -> Any:
        """The store call an effect asks for (a value, or a coroutine for an :class:`AsyncStore`)."""
        if isinstance(effect, Claim):
            return store.claim(key, effect.fingerprint, lease=self.settings.lease)
        if isinstance(effect, Complete):
            return store.complete(key, effect.token, effect.outcome, ttl=self.settings.ttl)
        if isinstance(effect, Release):
            return store.release(key, effect.token)
        raise TypeError(f"not a store effect: {effect!r}")

    def admit(self, method: str, context: Any) -> CallPlan | tuple[grpc.StatusCode, str]:
        """The plan of a call, or the status refusing it before anything runs."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the deadline expired before the call could start; nothing was executed",
            )
        return self.settings.plan(method, context, remaining)

    def driver(self, plan: CallPlan, request: bytes) -> FlowDriver[Any]:
        """The driver of an admitted call's flow."""
        driver = FlowDriver(plan, fingerprint(request), self.settings.flow_settings, self._flights)
        driver.store = self.store  # type: ignore[attr-defined]  # set by both subclasses
        return driver


class DedupInterceptor(DedupBase, _ServerInterceptor):
    """Replays the stored outcome of an idempotency key instead of running the handler again.

    ``store``: where records live (default: a new :class:`MemoryStore`). ``scope(context)``
    returns the caller's identity (e.g. the authenticated principal) so tenants never share
    records. ``methods``: which methods are deduplicated (``None``: all unary-request methods;
    names, ``"/pkg.Service/*"`` patterns or a predicate). ``require_key_methods``: methods whose
    calls must carry a key (they are deduplicated whatever ``methods`` says). ``ttl``: record lifetime (default: the store's). ``lease``: how long
    a claim lasts if its executor dies (make it longer than your slowest handler).
    ``max_response_bytes``: larger outcomes are not stored. ``fail_open``: run handlers without
    dedup while the store is down. ``max_wait``: how long a duplicate waits for the in-flight
    attempt when the caller set no deadline; ``max_pushback``: the longest retry delay an ABORTED
    duplicate is told to wait. See the module docstring for the exact rules.
    """

    store: Store

    def _attach(self, store: Store | AsyncStore) -> None:
        if not isinstance(store, Store):
            raise ValueError(
                f"{type(store).__name__} is an asyncio store: use it with "
                "resilient_grpc.aio.DedupInterceptor"
            )
        self.store = store
        self._flights = Flights(threading.Event)

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
        wrapped: grpc.RpcMethodHandler[Any, Any] = self._cached(method, handler, self._wrap)
        return wrapped

    # -- handler wrappers

    def _wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        deserialize = handler.request_deserializer or unchanged
        serialize = handler.response_serializer or unchanged
        if handler.response_streaming:
            stream = handler.unary_stream
            assert stream is not None

            def unary_stream(raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
                driver = self._admit(method, raw, context)

                def execute(_: int | None) -> Generator[bytes, None, Execution]:
                    collected = Collector(self.settings.flow_settings.max_response_bytes)
                    with driver.scope():
                        try:
                            for message in stream(deserialize(raw), context):
                                data = serialize(message)
                                collected.add(data)
                                yield data
                        except Exception as error:
                            driver.error = error
                            return Execution(
                                _aborted_outcome(
                                    context, tuple(collected.messages), collected.omitted
                                )
                            )
                    return Execution(
                        handler_outcome(
                            context, tuple(collected.messages), omitted=collected.omitted
                        )
                    )

                verdict = yield from self._drive(driver, execute)
                if verdict.action is Action.EXECUTED:
                    driver.reraise()
                    return
                assert verdict.outcome is not None
                yield from verdict.outcome.responses
                self._finish(context, verdict.outcome)

            return grpc.unary_stream_rpc_method_handler(unary_stream)

        unary = handler.unary_unary
        assert unary is not None

        def unary_unary(raw: bytes, context: grpc.ServicerContext) -> bytes | None:
            driver = self._admit(method, raw, context)

            def execute(_: int | None) -> Execution:
                with driver.scope():
                    try:
                        response = unary(deserialize(raw), context)
                    except Exception as error:
                        driver.error = error
                        return Execution(_aborted_outcome(context, (), 0))
                if response is None:  # the handler set an error code and returned nothing
                    return Execution(error_outcome(context))
                data = serialize(response)
                driver.response = data
                return Execution(handler_outcome(context, (data,)))

            verdict = self._run(driver, execute)
            if verdict.action is Action.EXECUTED:
                driver.reraise()
                return driver.response
            assert verdict.outcome is not None
            self._finish(context, verdict.outcome)
            return verdict.outcome.responses[0]

        return grpc.unary_unary_rpc_method_handler(unary_unary)

    def _admit(self, method: str, raw: bytes, context: grpc.ServicerContext) -> FlowDriver[Any]:
        """Refuse a call before anything runs (expired deadline, bad or missing key)."""
        plan = self.admit(method, context)
        if isinstance(plan, tuple):
            context.abort(*plan)
        assert isinstance(plan, CallPlan)
        return self.driver(plan, raw)

    @staticmethod
    def _finish(context: grpc.ServicerContext, outcome: Outcome) -> None:
        """Send a stored or refusal outcome's trailers and, for an error, its status."""
        context.set_trailing_metadata(outcome.trailing_metadata)
        if outcome.code != "OK":
            context.abort(status_code(outcome.code), outcome.details)

    # -- the effect loop

    def _drive(
        self,
        driver: FlowDriver[Any],
        execute: Callable[[int | None], Generator[bytes, None, Execution]],
    ) -> Generator[bytes, None, Verdict]:
        """Perform a stream's flow effects; ``execute`` is a generator of its messages."""
        try:
            run = self._pump(driver, driver.first())
            if run is not None:  # a flow executes the handler at most once
                execution = yield from execute(run.token)
                self._pump(driver, driver.advance(run, execution))
        finally:
            self._close(driver)
        assert driver.verdict is not None
        return driver.verdict

    def _run(self, driver: FlowDriver[Any], execute: Callable[[int | None], Execution]) -> Verdict:
        """Perform a unary call's flow effects (:meth:`_drive` without a generator)."""
        try:
            run = self._pump(driver, driver.first())
            if run is not None:
                self._pump(driver, driver.advance(run, execute(run.token)))
        finally:
            self._close(driver)
        assert driver.verdict is not None
        return driver.verdict

    def _pump(self, driver: FlowDriver[Any], effect: Effect | None) -> Execute | None:
        """Perform store effects until the flow asks to run the handler (that effect) or decides."""
        while effect is not None:
            if isinstance(effect, Execute):
                return effect
            effect = driver.advance(effect, self._perform(driver.key, effect))
        return None

    def _close(self, driver: FlowDriver[Any]) -> None:
        abandoned = driver.close()
        if abandoned is not None:  # cancelled or interrupted between claim and outcome
            self._perform(driver.key, Release(abandoned))

    def _perform(self, key: str, effect: Effect) -> object:
        try:
            if not isinstance(effect, Wait):
                return self.store_call(self.store, key, effect)
            event = self._flights.get(key)
            if event is None:
                return self.store.wait(key, effect.timeout)
            event.wait(effect.timeout)
            return self.store.get(key)
        except StoreUnavailableError as error:
            return StoreDown(str(error))


def unchanged(value: Any) -> Any:
    return value


def _aborted_outcome(context: Any, responses: tuple[bytes, ...], omitted: int) -> Outcome | None:
    """After a handler raised: its status if it aborted, ``None`` for an unexpected exception."""
    state = getattr(context, "_state", None)
    if state is not None and not getattr(state, "aborted", False):
        return None
    return error_outcome(context, responses, omitted=omitted)
