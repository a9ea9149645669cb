"""OpenTelemetry spans and metrics, and log lines, for client calls, breakers and dedup.

The interceptors call this module and nothing else for telemetry (it also writes the log lines,
through :mod:`resilient_grpc.logs`), so the sync and aio shells report identically. Only
``opentelemetry-api`` is used: without an SDK every call here is a cheap no-op.

**Spans.** One span per *logical* client call (all its attempts), named
``"pkg.Service/Method"``, started as a child of the application's current span and made
current while the call runs (so spans started below it, e.g. by
``opentelemetry-instrumentation-grpc``, nest under it). Attributes follow the RPC semantic
conventions that ``opentelemetry-instrumentation-grpc`` emits on its spans: ``rpc.system`` =
``"grpc"``, ``rpc.service``, ``rpc.method`` (the short name), ``server.address`` /
``server.port`` (from the channel target) and, at the end, ``rpc.grpc.status_code`` as the
*numeric* code (the conventions type it ``int``: 0 = OK, 14 = UNAVAILABLE); plus
``resilient_grpc.attempts`` and ``resilient_grpc.outcome`` (a :class:`Reason` value). The span
status is ERROR for any code other than OK. (Newer, still experimental conventions rename these
to ``rpc.system.name``, a fully qualified ``rpc.method`` and a string
``rpc.response.status_code``; we keep the names the gRPC instrumentation still puts on its spans,
so both kinds of spans agree.) Events:

* ``attempt`` per attempt: ``resilient_grpc.attempt`` (1-based), ``rpc.grpc.status_code``,
  ``resilient_grpc.status`` (the code's name), ``resilient_grpc.retry`` (bool),
  ``resilient_grpc.reason``, and when a backoff was chosen ``resilient_grpc.backoff_s`` with
  ``resilient_grpc.backoff_source`` = ``computed`` / ``pushback`` / ``retry_info``;
* ``retry_budget_exhausted`` when the budget refused a retry;
* ``breaker_open`` when an open breaker failed the call fast (or stopped its retries);
* ``breaker_state_change`` on the current span when a call's outcome moved a breaker;
* ``dedup`` (server side, on the current span, e.g. the SERVER span of the gRPC
  instrumentation) with ``resilient_grpc.dedup.outcome``.

**Span kind, beside opentelemetry-instrumentation-grpc.** That instrumentation starts one
CLIENT span per call it sees. Its sync instrumentor wraps ``grpc.insecure_channel`` /
``secure_channel``, so its interceptor sits *under* ours and sees every attempt: one CLIENT
span per attempt, nested in our logical-call span. Two nested CLIENT spans for one RPC would
double-count it in every backend (service maps, RPC latency), so our span is a CLIENT span only
when nothing below it makes one: with ``span_kind="auto"`` (the default) it is INTERNAL while
``GrpcInstrumentorClient`` or ``GrpcAioInstrumentorClient`` is instrumenting, CLIENT otherwise.
The result is the layout OpenTelemetry recommends for retries (one span for the logical
operation, one CLIENT span per try). The aio instrumentor instead *prepends* its interceptors,
so its CLIENT span wraps the whole logical call and ours (INTERNAL) nests inside it. If you add
the instrumentation's interceptors by hand (``client_interceptor()`` /
``aio_client_interceptors()``) below the stack, the stack can say so with
``client_call(..., attempt_spans=True)`` (see :func:`makes_attempt_spans`); otherwise call
``configure(span_kind="internal")``.

**Metrics** (meter ``resilient_grpc``; attributes are method, status code and outcome only):

==========================================  =========  =========================================
instrument                                   kind       attributes
==========================================  =========  =========================================
``resilient_grpc.client.calls``              counter    rpc.service, rpc.method,
                                                        rpc.grpc.status_code,
                                                        resilient_grpc.outcome
``resilient_grpc.client.attempts``           counter    rpc.service, rpc.method,
                                                        rpc.grpc.status_code
``resilient_grpc.client.retries``            counter    rpc.service, rpc.method,
                                                        rpc.grpc.status_code (that was retried),
                                                        resilient_grpc.backoff_source
``resilient_grpc.client.budget_refusals``    counter    rpc.service, rpc.method
``resilient_grpc.client.breaker_rejections`` counter    rpc.service, rpc.method
``resilient_grpc.client.backoff``            histogram  rpc.service, rpc.method,
                                                        resilient_grpc.backoff_source (unit s)
``resilient_grpc.breaker.transitions``       counter    resilient_grpc.breaker.name,
                                                        resilient_grpc.breaker.from,
                                                        resilient_grpc.breaker.to
``resilient_grpc.breaker.state``             gauge      resilient_grpc.breaker.name,
                                                        resilient_grpc.breaker.state: 1 for the
                                                        current state, 0 for the other two
``resilient_grpc.server.dedup``              counter    rpc.service, rpc.method,
                                                        resilient_grpc.dedup.outcome
==========================================  =========  =========================================

Dedup outcomes: ``executed``, ``replayed``, ``conflict``, ``waited``, ``store_error``,
``fail_open`` (plus whatever short outcome names the server interceptors report, such as
``invalid_key``). Breakers appear in the state gauge once registered with
:func:`register_breaker`.

**Providers.** The tracer and meter are looked up on first use, from the global providers
unless :func:`configure` was given explicit ones. ``opentelemetry-api`` hands out proxy
tracers, meters and instruments before an SDK is installed and redirects them once it is, so an
SDK installed after ``import resilient_grpc`` still receives everything.

Nothing here ever receives an idempotency key, metadata or a message: keys cannot leak into
spans, metrics or logs.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import weakref
from collections.abc import Iterable, Iterator
from contextvars import Token
from typing import Any, Literal, Protocol

import grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.util.types import AttributeValue

from resilient_grpc import logs
from resilient_grpc.core.codes import code_number, name_and_number
from resilient_grpc.core.methods import split_method
from resilient_grpc.core.retry import Reason, RetryDecision

SCOPE = "resilient_grpc"

SpanKindSetting = Literal["auto", "client", "internal"]

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

#: Breaker states as pybreaker names them.
BREAKER_STATES: tuple[str, ...] = ("closed", "open", "half-open")

#: Bucket boundaries (seconds) suggested for the backoff histogram.
BACKOFF_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

_OUTCOME_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_TARGET_SCHEME = re.compile(r"^(?:dns|ipv4|ipv6|xds|google-c2p):(?://[^/]*/)?")


class _Settings:
    """Where telemetry goes: explicit providers (``None``: the global ones) and the span kind."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tracer_provider: trace.TracerProvider | None = None
        self.meter_provider: metrics.MeterProvider | None = None
        self.span_kind: SpanKindSetting = "auto"
        self.tracer: trace.Tracer | None = None
        self.instruments: _Instruments | None = None


_settings = _Settings()


def configure(
    *,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
    span_kind: SpanKindSetting = "auto",
) -> None:
    """Choose where spans and metrics go and which kind the logical-call span has.

    ``None`` providers mean the global ones (``trace.set_tracer_provider`` /
    ``metrics.set_meter_provider``). ``span_kind``: ``"auto"`` (CLIENT unless
    ``opentelemetry-instrumentation-grpc``'s client instrumentor is active, then INTERNAL),
    ``"client"`` or ``"internal"``. Calling it again replaces the previous settings.
    """
    if span_kind not in ("auto", "client", "internal"):
        raise ValueError(f"span_kind must be 'auto', 'client' or 'internal', got {span_kind!r}")
    with _settings.lock:
        _settings.tracer_provider = tracer_provider
        _settings.meter_provider = meter_provider
        _settings.span_kind = span_kind
        _settings.tracer = None
        _settings.instruments = None


def _tracer() -> trace.Tracer:
    tracer = _settings.tracer
    if tracer is None:
        with _settings.lock:
            if _settings.tracer is None:
                _settings.tracer = trace.get_tracer(
                    SCOPE, tracer_provider=_settings.tracer_provider
                )
            tracer = _settings.tracer
    return tracer


class _Instruments:
    """Every instrument of the meter, made once per provider."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.calls = meter.create_counter(
            "resilient_grpc.client.calls",
            unit="{call}",
            description="Logical client calls, by final status and outcome.",
        )
        self.attempts = meter.create_counter(
            "resilient_grpc.client.attempts",
            unit="{attempt}",
            description="Attempts sent, by status.",
        )
        self.retries = meter.create_counter(
            "resilient_grpc.client.retries",
            unit="{retry}",
            description="Retries granted, by the status retried and the backoff source.",
        )
        self.budget_refusals = meter.create_counter(
            "resilient_grpc.client.budget_refusals",
            unit="{retry}",
            description="Retries refused because the retry budget was exhausted.",
        )
        self.breaker_rejections = meter.create_counter(
            "resilient_grpc.client.breaker_rejections",
            unit="{call}",
            description="Calls failed fast by an open circuit breaker.",
        )
        self.backoff = meter.create_histogram(
            "resilient_grpc.client.backoff",
            unit="s",
            description="Backoff delays chosen before retries.",
            explicit_bucket_boundaries_advisory=BACKOFF_BUCKETS,
        )
        self.breaker_transitions = meter.create_counter(
            "resilient_grpc.breaker.transitions",
            unit="{transition}",
            description="Circuit breaker state changes.",
        )
        self.breaker_state = meter.create_observable_gauge(
            "resilient_grpc.breaker.state",
            callbacks=[_observe_breakers],
            unit="1",
            description="1 for the current state of each registered circuit breaker, 0 for the others.",
        )
        self.dedup = meter.create_counter(
            "resilient_grpc.server.dedup", unit="{call}", description="Server-side dedup outcomes."
        )


def _instruments() -> _Instruments:
    instruments = _settings.instruments
    if instruments is None:
        with _settings.lock:
            if _settings.instruments is None:
                _settings.instruments = _Instruments(
                    metrics.get_meter(SCOPE, meter_provider=_settings.meter_provider)
                )
            instruments = _settings.instruments
    return instruments


# --- breakers registry (for the state gauge) ---------------------------------------------


class ObservableBreaker(Protocol):
    """What the state gauge needs of a breaker: its name and current state."""

    @property
    def name(self) -> str: ...

    @property
    def state(self) -> str: ...


_breakers_lock = threading.Lock()
_weak_breakers: weakref.WeakSet[Any] = weakref.WeakSet()
_strong_breakers: dict[int, ObservableBreaker] = {}


def register_breaker(breaker: ObservableBreaker) -> None:
    """Report ``breaker`` (``.name``, ``.state`` in closed/open/half-open) in the state gauge.

    Held by a weak reference when the object supports one (it then leaves the gauge when it is
    garbage collected), otherwise strongly until :func:`unregister_breaker`.
    """
    with _breakers_lock:
        try:
            _weak_breakers.add(breaker)
        except TypeError:
            _strong_breakers[id(breaker)] = breaker


def unregister_breaker(breaker: ObservableBreaker) -> None:
    """Remove ``breaker`` from the state gauge (a no-op if it is not there)."""
    with _breakers_lock:
        if _strong_breakers.pop(id(breaker), None) is None:
            _weak_breakers.discard(breaker)


def registered_breakers() -> list[ObservableBreaker]:
    """The breakers the state gauge currently reports."""
    with _breakers_lock:
        return [*_weak_breakers, *_strong_breakers.values()]


def _observe_breakers(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
    observations: list[metrics.Observation] = []
    for breaker in registered_breakers():
        try:
            name, current = str(breaker.name), str(breaker.state)
        except Exception:  # a storage outage (Redis) must not break the metric export
            continue
        for state in BREAKER_STATES:
            observations.append(
                metrics.Observation(
                    1 if state == current else 0,
                    {"resilient_grpc.breaker.name": name, "resilient_grpc.breaker.state": state},
                )
            )
    return observations


# --- helpers --------------------------------------------------------------------------------


_CACHE_LIMIT = 4096  # methods and targets are few; past this, compute instead of caching


_server_cache: dict[str, dict[str, AttributeValue]] = {}


def _server_attributes(target: str | None) -> dict[str, AttributeValue]:
    """``server.address`` / ``server.port`` from a channel target (``host:port``, ``dns:///...``)."""
    if not target:
        return {}
    cached = _server_cache.get(target)
    if cached is not None:
        return dict(cached)
    rest = _TARGET_SCHEME.sub("", target, count=1)
    attributes: dict[str, AttributeValue]
    if rest.startswith(("unix:", "unix-abstract:", "vsock:")):
        attributes = {"server.address": rest}
    else:
        host, port = rest, ""
        if rest.startswith("["):
            host, _, after = rest[1:].partition("]")
            port = after[1:] if after.startswith(":") else ""
        elif rest.count(":") == 1:
            host, port = rest.split(":")
        attributes = {"server.address": host}
        if port.isdigit():
            attributes["server.port"] = int(port)
    if len(_server_cache) < _CACHE_LIMIT:
        _server_cache[target] = attributes
    return dict(attributes)


#: ``Reason.value`` without the enum descriptor (a hot-path lookup).
_REASON_VALUES: dict[Reason, str] = {reason: reason.value for reason in Reason}


class _Method:
    """What telemetry derives from a full method name, computed once per method.

    The attribute dicts handed to spans and instruments are cached here too (per target, per
    status code, per outcome) and never mutated after they are built: the SDK copies them.
    """

    __slots__ = (
        "_call_attributes",
        "_code_attributes",
        "_target_attributes",
        "attributes",
        "span_attributes",
        "span_name",
    )

    def __init__(self, method: str) -> None:
        service, name = split_method(method)
        self.span_name = f"{service}/{name}"
        self.attributes: dict[str, AttributeValue] = {"rpc.service": service, "rpc.method": name}
        self.span_attributes: dict[str, AttributeValue] = {"rpc.system": "grpc", **self.attributes}
        self._target_attributes: dict[str, dict[str, AttributeValue]] = {}
        self._code_attributes: dict[int, dict[str, AttributeValue]] = {}
        self._call_attributes: dict[tuple[int, Reason], dict[str, AttributeValue]] = {}

    def span_attributes_for(self, target: str | None) -> dict[str, AttributeValue]:
        """The span's start attributes for a call to ``target`` (read-only)."""
        if not target:
            return self.span_attributes
        attributes = self._target_attributes.get(target)
        if attributes is None:
            attributes = {**self.span_attributes, **_server_attributes(target)}
            if len(self._target_attributes) < _CACHE_LIMIT:
                self._target_attributes[target] = attributes
        return attributes

    def code_attributes(self, number: int) -> dict[str, AttributeValue]:
        """Method attributes plus ``rpc.grpc.status_code`` (read-only)."""
        attributes = self._code_attributes.get(number)
        if attributes is None:
            attributes = self._code_attributes[number] = {
                **self.attributes,
                "rpc.grpc.status_code": number,
            }
        return attributes

    def call_attributes(self, number: int, reason: Reason) -> dict[str, AttributeValue]:
        """Method attributes plus the final status code and outcome (read-only)."""
        attributes = self._call_attributes.get((number, reason))
        if attributes is None:
            attributes = self._call_attributes[(number, reason)] = {
                **self.attributes,
                "rpc.grpc.status_code": number,
                "resilient_grpc.outcome": _REASON_VALUES[reason],
            }
        return attributes


_method_cache: dict[str, _Method] = {}


def _method_info(method: str) -> _Method:
    info = _method_cache.get(method)
    if info is None:
        info = _Method(method)
        if len(_method_cache) < _CACHE_LIMIT:
            _method_cache[method] = info
    return info


def _instrumentation_active(transport: Literal["sync", "aio"] | None) -> bool:
    """Whether ``opentelemetry-instrumentation-grpc`` instruments client channels right now."""
    module = sys.modules.get("opentelemetry.instrumentation.grpc")
    if module is None:
        return False
    names = {
        "sync": ("GrpcInstrumentorClient",),
        "aio": ("GrpcAioInstrumentorClient",),
        None: ("GrpcInstrumentorClient", "GrpcAioInstrumentorClient"),
    }[transport]
    for name in names:
        # BaseInstrumentor is a singleton kept in ``_instance``; calling the class again would
        # re-run __init__ and reset the user's filter and hooks, so read the instance instead.
        instance = getattr(getattr(module, name, None), "_instance", None)
        if instance is not None and getattr(instance, "is_instrumented_by_opentelemetry", False):
            return True
    return False


def _span_kind(transport: Literal["sync", "aio"] | None, attempt_spans: bool) -> trace.SpanKind:
    setting = _settings.span_kind
    if setting == "client":
        return trace.SpanKind.CLIENT
    if setting == "internal" or attempt_spans or _instrumentation_active(transport):
        return trace.SpanKind.INTERNAL
    return trace.SpanKind.CLIENT


def makes_attempt_spans(interceptors: Iterable[object]) -> bool:
    """Whether ``interceptors`` include ``opentelemetry-instrumentation-grpc``'s client ones.

    A channel that puts them *after* the resilience stack gets one CLIENT span per attempt from
    them; pass the answer as ``attempt_spans`` to :func:`client_call` so the logical-call span
    is INTERNAL (under ``span_kind="auto"``).
    """
    return any(
        type(interceptor).__module__.startswith("opentelemetry.instrumentation.grpc")
        for interceptor in interceptors
    )


def _current_span_event(name: str, attributes: dict[str, AttributeValue]) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(name, attributes)


# --- client calls ---------------------------------------------------------------------------


def _attempt_event(
    attempt: int, name: str, number: int, decision: RetryDecision | None
) -> dict[str, AttributeValue]:
    """The attributes of an ``attempt`` span event."""
    event: dict[str, AttributeValue] = {
        "resilient_grpc.attempt": attempt,
        "rpc.grpc.status_code": number,
        "resilient_grpc.status": name,
    }
    if decision is None:
        if number == 0:
            event["resilient_grpc.retry"] = False
            event["resilient_grpc.reason"] = "success"
    else:
        event["resilient_grpc.retry"] = decision.retry
        event["resilient_grpc.reason"] = _REASON_VALUES[decision.reason]
        if decision.source is not None:
            event["resilient_grpc.backoff_s"] = decision.delay
            event["resilient_grpc.backoff_source"] = decision.source.value
    return event


class CallTelemetry:
    """The telemetry of one logical client call: its span, attempt events, counters and logs."""

    def __init__(
        self,
        method: str,
        span: trace.Span,
        *,
        target: str | None = None,
        info: _Method | None = None,
    ) -> None:
        self.method = method
        self.span = span
        self.target = target
        self.ended = False
        # A non-recording span (no SDK) ignores attributes and events: skip building them.
        # Fixed per span, so an SDK installed later is seen by the next call's span.
        self.recording = span.is_recording()
        self._info = info if info is not None else _method_info(method)
        self._attributes = self._info.attributes

    def attempt(self, attempt: int, code: str, decision: RetryDecision | None) -> None:
        """Record one finished attempt: its status ``code`` and what was decided after it."""
        name, number = name_and_number(code)
        instruments = _instruments()
        instruments.attempts.add(1, self._info.code_attributes(number))
        if self.recording:
            self.span.add_event("attempt", _attempt_event(attempt, name, number, decision))
        if decision is not None:
            if decision.retry:
                source = decision.source.value if decision.source is not None else "computed"
                instruments.retries.add(
                    1,
                    {
                        **self._attributes,
                        "rpc.grpc.status_code": number,
                        "resilient_grpc.backoff_source": source,
                    },
                )
                instruments.backoff.record(
                    decision.delay, {**self._attributes, "resilient_grpc.backoff_source": source}
                )
            if decision.reason is Reason.BUDGET_EXHAUSTED:
                self.budget_refused(attempt)
            elif decision.reason is Reason.BREAKER_OPEN:
                self.span.add_event("breaker_open", {"resilient_grpc.attempt": attempt})
        logs.attempt_finished(self.method, attempt, name, decision)

    def budget_refused(self, attempt: int) -> None:
        """The retry budget refused the retry after ``attempt`` (called by :meth:`attempt`)."""
        _instruments().budget_refusals.add(1, self._attributes)
        self.span.add_event("retry_budget_exhausted", {"resilient_grpc.attempt": attempt})

    def breaker_rejected(self) -> None:
        """The breaker was open: the call failed fast without touching the network."""
        _instruments().breaker_rejections.add(1, self._attributes)
        self.span.add_event("breaker_open")
        logs.breaker_rejected(self.method, self.target)

    def end(self, code: str, *, attempts: int, reason: Reason) -> None:
        """Finish the call with its final status; ends the span (later calls are ignored)."""
        if self.ended:
            return
        self.ended = True
        name, number = name_and_number(code)
        span = self.span
        if self.recording:
            span.set_attributes(
                {
                    "rpc.grpc.status_code": number,
                    "resilient_grpc.attempts": attempts,
                    "resilient_grpc.outcome": _REASON_VALUES[reason],
                }
            )
            if number != 0:
                span.set_status(trace.Status(trace.StatusCode.ERROR, name))
        _instruments().calls.add(1, self._info.call_attributes(number, reason))
        logs.call_finished(self.method, name, attempts=attempts, reason=reason, target=self.target)
        span.end()

    def close(self) -> None:
        """End the span if neither :meth:`end` nor :meth:`abandon` did."""
        if not self.ended:
            self.ended = True
            self.span.end()

    def abandon(self, error: BaseException) -> None:
        """End the span of a call that stopped by an exception before :meth:`end` was called.

        ``GeneratorExit`` (the driver of the call was closed or dropped, e.g. a response
        stream the caller stopped reading) ends it as ``abandoned``, not as an error.
        """
        if self.ended:
            return
        self.ended = True
        if isinstance(error, GeneratorExit):
            self.span.set_attribute("resilient_grpc.outcome", "abandoned")
            self.span.end()
            return
        code = getattr(error, "code", None)
        if isinstance(error, grpc.RpcError) and callable(code):
            with contextlib.suppress(Exception):
                self.span.set_attribute("rpc.grpc.status_code", code_number(code()))
        self.span.set_attribute("error.type", type(error).__qualname__)
        self.span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__qualname__))
        self.span.end()

    def make_current(self) -> Token[otel_context.Context] | None:
        """Make the call's span current; return the token for :meth:`restore` (``None``: no-op).

        When the span already is the current one (without an SDK the no-op tracer hands back
        the current non-recording span), the context would not change: nothing is attached.
        """
        span = self.span
        if span is trace.get_current_span():
            return None
        return otel_context.attach(trace.set_span_in_context(span))

    def restore(self, token: Token[otel_context.Context] | None) -> None:
        """Undo :meth:`make_current` (given its token)."""
        if token is not None:
            otel_context.detach(token)

    @contextlib.contextmanager
    def use(self) -> Iterator[CallTelemetry]:
        """Make the call's span current inside the block (for spans of its attempts)."""
        with trace.use_span(
            self.span, end_on_exit=False, record_exception=False, set_status_on_exception=False
        ):
            yield self


def start_client_call(
    method: str,
    *,
    target: str | None = None,
    transport: Literal["sync", "aio"] | None = None,
    attempt_spans: bool = False,
) -> CallTelemetry:
    """Start the span of a logical call without making it current; :meth:`CallTelemetry.end` ends it.

    For calls whose life outlasts one block (a response stream consumed later): wrap each
    attempt in :meth:`CallTelemetry.use`. Most callers want :func:`client_call`.
    ``transport`` (``"sync"``/``"aio"``) narrows the instrumentor check to that flavour;
    ``attempt_spans=True`` says something below makes a CLIENT span per attempt (see
    :func:`makes_attempt_spans`), so under ``span_kind="auto"`` this span is INTERNAL.
    """
    info = _method_info(method)
    span = _tracer().start_span(
        info.span_name,
        kind=_span_kind(transport, attempt_spans),
        attributes=info.span_attributes_for(target),
        record_exception=False,
        set_status_on_exception=False,
    )
    return CallTelemetry(method, span, target=target, info=info)


@contextlib.contextmanager
def client_call(
    method: str,
    *,
    target: str | None = None,
    transport: Literal["sync", "aio"] | None = None,
    attempt_spans: bool = False,
) -> Iterator[CallTelemetry]:
    """The span of one logical call, current while the block runs (a child of the current span).

    The block should call :meth:`CallTelemetry.end`; if it leaves by an exception first, the
    span ends with ERROR and the exception's type (never its message).
    """
    call = start_client_call(
        method, target=target, transport=transport, attempt_spans=attempt_spans
    )
    token = call.make_current()
    try:
        yield call
    except BaseException as error:
        call.abandon(error)
        raise
    finally:
        call.restore(token)
        call.close()


# --- breakers and dedup ---------------------------------------------------------------------


def breaker_state_changed(name: str, old: str, new: str) -> None:
    """Record a circuit breaker transition (``closed``/``open``/``half-open``)."""
    _instruments().breaker_transitions.add(
        1,
        {
            "resilient_grpc.breaker.name": name,
            "resilient_grpc.breaker.from": old,
            "resilient_grpc.breaker.to": new,
        },
    )
    _current_span_event(
        "breaker_state_change",
        {
            "resilient_grpc.breaker.name": name,
            "resilient_grpc.breaker.from": old,
            "resilient_grpc.breaker.to": new,
        },
    )
    logs.breaker_changed(name, old, new)


def dedup_outcome(method: str, outcome: str, detail: str = "") -> None:
    """Record one server-side dedup outcome (see :data:`DEDUP_OUTCOMES`) for ``method``.

    Call it only for methods the server implements: ``method`` becomes a metric attribute.
    An outcome that is not a short lower-case identifier is recorded as ``other``. ``detail``
    (e.g. a store's error message) goes to the server log only, never to a metric or span.
    """
    if outcome not in DEDUP_OUTCOMES and not _OUTCOME_NAME.match(outcome):
        outcome = "other"
    _instruments().dedup.add(
        1, {**_method_info(method).attributes, "resilient_grpc.dedup.outcome": outcome}
    )
    _current_span_event("dedup", {"resilient_grpc.dedup.outcome": outcome})
    logs.dedup_outcome(method, outcome, detail)


def _reset_for_tests() -> None:
    """Forget providers, instruments, registered breakers and log throttling (tests only)."""
    configure()
    with _breakers_lock:
        _weak_breakers.clear()
        _strong_breakers.clear()
    logs._server_throttle.reset()


__all__ = [
    "BACKOFF_BUCKETS",
    "BREAKER_STATES",
    "DEDUP_OUTCOMES",
    "CallTelemetry",
    "ObservableBreaker",
    "breaker_state_changed",
    "client_call",
    "configure",
    "dedup_outcome",
    "makes_attempt_spans",
    "register_breaker",
    "registered_breakers",
    "start_client_call",
    "unregister_breaker",
]


# --- server admission (OverloadInterceptor) ---------------------------------------------------
#
# ``resilient_grpc.server.admitted`` (counter: rpc.service, rpc.method), ``resilient_grpc.server.shed``
# (counter: rpc.service, rpc.method, resilient_grpc.shed.reason = deadline / queue / limit) and
# ``resilient_grpc.server.concurrency_limit`` (gauge: resilient_grpc.admission.name), made beside
# the instruments above and remade whenever :func:`configure` replaces those.


class ObservableLimit(Protocol):
    """What the limit gauge needs of an overload interceptor: its name and current limit."""

    @property
    def name(self) -> str: ...

    @property
    def limit(self) -> int: ...


_limits: weakref.WeakSet[Any] = weakref.WeakSet()
_admission_cache: list[Any] = []  # [(base instruments, admitted, shed, gauge)] at most one


def register_limit(owner: ObservableLimit) -> None:
    """Report ``owner.limit`` in the concurrency-limit gauge while ``owner`` lives (weakly held)."""
    with _breakers_lock:
        _limits.add(owner)


def _observe_limits(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
    with _breakers_lock:
        owners = list(_limits)
    return [
        metrics.Observation(owner.limit, {"resilient_grpc.admission.name": owner.name})
        for owner in owners
    ]


def _admission_instruments() -> tuple[Any, Any]:
    base = _instruments()
    cached = _admission_cache[0] if _admission_cache else None
    if cached is None or cached[0] is not base:
        with _settings.lock:
            meter = metrics.get_meter(SCOPE, meter_provider=_settings.meter_provider)
            cached = (
                base,
                meter.create_counter(
                    "resilient_grpc.server.admitted",
                    unit="{call}",
                    description="Calls the overload interceptor let start.",
                ),
                meter.create_counter(
                    "resilient_grpc.server.shed",
                    unit="{call}",
                    description="Calls refused with RESOURCE_EXHAUSTED before their handler, by reason.",
                ),
                meter.create_observable_gauge(
                    "resilient_grpc.server.concurrency_limit",
                    callbacks=[_observe_limits],
                    unit="{call}",
                    description="The adaptive concurrency limit of each overload interceptor.",
                ),
            )
            _admission_cache[:] = [cached]
    return cached[1], cached[2]


def call_admitted(method: str) -> None:
    """Count one call the overload interceptor admitted (``method``: one the server implements)."""
    _admission_instruments()[0].add(1, _method_info(method).attributes)


def call_shed(method: str, reason: str) -> None:
    """Count one call refused before its handler, ``reason`` being deadline, queue or limit."""
    _admission_instruments()[1].add(
        1, {**_method_info(method).attributes, "resilient_grpc.shed.reason": reason}
    )
    _current_span_event("shed", {"resilient_grpc.shed.reason": reason})


__all__ += ["ObservableLimit", "call_admitted", "call_shed", "register_limit"]
