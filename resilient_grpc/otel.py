"""The OpenTelemetry subscriber: spans and metrics from the stack's telemetry events.

:class:`OtelHook` is one of the two default hooks of :mod:`resilient_grpc.telemetry` (the other
writes log lines). Only ``opentelemetry-api`` is used. What it records (span names and
attributes, events, instruments) is documented in the README's telemetry section.

**Span model.** One span per *logical* client call (all its attempts), a child of the
application's current span, current while the attempts run so spans started below it (by
``opentelemetry-instrumentation-grpc``) nest under it, with an ``attempt`` event per attempt.
It is a CLIENT span unless something below it makes a CLIENT span per attempt: under
``span_kind="auto"`` it is INTERNAL while ``GrpcInstrumentorClient`` or
``GrpcAioInstrumentorClient`` is instrumenting (two nested CLIENT spans for one RPC would count
it twice in every backend).

**When it watches a call.** Only while a provider that records is reachable: a tracer provider
or a meter provider other than the API's proxy (no SDK installed yet) or its no-op one, looked
up on every call, so an SDK installed after a channel was made is used by that channel's next
call. ``opentelemetry-api`` redirects the proxy tracer and instruments made earlier once an SDK
is installed.

Nothing here ever receives an idempotency key, metadata or a message.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import weakref
from collections.abc import Iterable
from typing import Any, Literal, Protocol

import grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import _internal as _metrics_api
from opentelemetry.util.types import AttributeValue

from resilient_grpc.core.codes import code_number, name_and_number
from resilient_grpc.core.methods import split_method
from resilient_grpc.core.retry import Reason, RetryDecision
from resilient_grpc.events import (
    AttemptFinished,
    BreakerRejected,
    BreakerStateChanged,
    CallAbandoned,
    CallAdmitted,
    CallEvent,
    CallFinished,
    CallShed,
    CallStarted,
    DedupOutcome,
    Event,
    Transport,
)

SCOPE = "resilient_grpc"

SpanKindSetting = Literal["auto", "client", "internal"]

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
    garbage collected), otherwise strongly until :func:`_unregister_breaker`.
    """
    with _breakers_lock:
        try:
            _weak_breakers.add(breaker)
        except TypeError:
            _strong_breakers[id(breaker)] = breaker


def _unregister_breaker(breaker: ObservableBreaker) -> None:
    """Remove ``breaker`` from the state gauge (a no-op if it is not there)."""
    with _breakers_lock:
        if _strong_breakers.pop(id(breaker), None) is None:
            _weak_breakers.discard(breaker)


def _registered_breakers() -> list[ObservableBreaker]:
    """The breakers the state gauge currently reports."""
    with _breakers_lock:
        return [*_weak_breakers, *_strong_breakers.values()]


def _observe_breakers(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
    observations: list[metrics.Observation] = []
    for breaker in _registered_breakers():
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


def _instrumentation_active(transport: Transport | None) -> bool:
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


def _span_kind(transport: Transport | None) -> trace.SpanKind:
    setting = _settings.span_kind
    if setting == "client":
        return trace.SpanKind.CLIENT
    if setting == "internal" or _instrumentation_active(transport):
        return trace.SpanKind.INTERNAL
    return trace.SpanKind.CLIENT


def _current_span_event(name: str, attributes: dict[str, AttributeValue]) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(name, attributes)


# --- server admission (OverloadInterceptor) ---------------------------------------------------
#
# Counters ``resilient_grpc.server.admitted`` and ``resilient_grpc.server.shed`` and the gauge
# ``resilient_grpc.server.concurrency_limit``, made beside the instruments above and remade
# whenever :func:`configure` replaces those.


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


#: Provider classes that record nothing (``NoneType``: no global provider set yet): with one of
#: each, a call is not watched. The API's meter provider before an SDK is installed has a
#: private class: it is read off the API.
_INERT_PROVIDERS: frozenset[type] = frozenset(
    {
        type(None),
        trace.ProxyTracerProvider,
        trace.NoOpTracerProvider,
        metrics.NoOpMeterProvider,
        type(getattr(_metrics_api, "_PROXY_METER_PROVIDER", None)),
    }
)


#: ``trace.get_tracer_provider()`` and ``metrics.get_meter_provider()`` look up an environment
#: variable on every call until a provider is set (about a third of the stack's per-call cost
#: without an SDK). The API keeps the global providers in module globals that are set once:
#: the hook reads those, unless the environment names a provider for the API to load, or the
#: API moved them.
_READ_GLOBALS = (
    "OTEL_PYTHON_TRACER_PROVIDER" not in os.environ
    and "OTEL_PYTHON_METER_PROVIDER" not in os.environ
    and hasattr(trace, "_TRACER_PROVIDER")
    and hasattr(_metrics_api, "_METER_PROVIDER")
)


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


class _OtelCall:
    """The span and metrics of one watched logical call."""

    __slots__ = ("_attributes", "_info", "ended", "recording", "span")

    def __init__(self, started: CallStarted) -> None:
        info = self._info = _method_info(started.method)
        self._attributes = info.attributes
        self.span = _tracer().start_span(
            info.span_name,
            kind=_span_kind(started.transport),
            attributes=info.span_attributes_for(started.target),
            record_exception=False,
            set_status_on_exception=False,
        )
        self.ended = False
        # A non-recording span (no tracer SDK, metrics only) ignores attributes and events.
        self.recording = self.span.is_recording()

    def on_call_event(self, event: CallEvent) -> None:
        if isinstance(event, AttemptFinished):
            self._attempt(event)
        elif isinstance(event, CallFinished):
            self._end(event)
        elif isinstance(event, CallAbandoned):
            self._abandon(event.error)
        elif isinstance(event, BreakerRejected):
            _instruments().breaker_rejections.add(1, self._attributes)
            self.span.add_event("breaker_open")

    def _attempt(self, event: AttemptFinished) -> None:
        attempt, decision = event.attempt, event.decision
        name, number = name_and_number(event.code)
        instruments = _instruments()
        instruments.attempts.add(1, self._info.code_attributes(number))
        if self.recording:
            self.span.add_event("attempt", _attempt_event(attempt, name, number, decision))
        if decision is None:
            return
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
            instruments.budget_refusals.add(1, self._attributes)
            self.span.add_event("retry_budget_exhausted", {"resilient_grpc.attempt": attempt})
        elif decision.reason is Reason.BREAKER_OPEN:
            self.span.add_event("breaker_open", {"resilient_grpc.attempt": attempt})

    def _end(self, event: CallFinished) -> None:
        if self.ended:
            return
        self.ended = True
        name, number = name_and_number(event.code)
        span = self.span
        if self.recording:
            span.set_attributes(
                {
                    "rpc.grpc.status_code": number,
                    "resilient_grpc.attempts": event.attempts,
                    "resilient_grpc.outcome": _REASON_VALUES[event.reason],
                }
            )
            if number != 0:
                span.set_status(trace.Status(trace.StatusCode.ERROR, name))
        _instruments().calls.add(1, self._info.call_attributes(number, event.reason))
        span.end()

    def _abandon(self, error: BaseException) -> None:
        """End the span of a call stopped by ``error``; ``GeneratorExit`` (the caller left, e.g.
        a response stream it stopped reading) ends it as ``abandoned``, not as an error."""
        if self.ended:
            return
        self.ended = True
        span = self.span
        if isinstance(error, GeneratorExit):
            span.set_attribute("resilient_grpc.outcome", "abandoned")
            span.end()
            return
        code = getattr(error, "code", None)
        if isinstance(error, grpc.RpcError) and callable(code):
            with contextlib.suppress(Exception):
                span.set_attribute("rpc.grpc.status_code", code_number(code()))
        span.set_attribute("error.type", type(error).__qualname__)
        span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__qualname__))
        span.end()

    def attach(self) -> object:
        """Make the span current; ``None`` when it already is (a no-op tracer hands back the
        current non-recording span: the context would not change, so nothing is attached)."""
        span = self.span
        if span is trace.get_current_span():
            return None
        return otel_context.attach(trace.set_span_in_context(span))

    def detach(self, token: object) -> None:
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]

    def close(self) -> None:
        if not self.ended:
            self.ended = True
            self.span.end()


class OtelHook:
    """Spans and metrics through ``opentelemetry-api`` (see the module docstring)."""

    def watching(self) -> bool:
        settings = _settings
        tracers: object = settings.tracer_provider
        if tracers is None:
            tracers = trace._TRACER_PROVIDER if _READ_GLOBALS else trace.get_tracer_provider()
        if tracers.__class__ not in _INERT_PROVIDERS:
            return True
        meters: object = settings.meter_provider
        if meters is None:
            meters = _metrics_api._METER_PROVIDER if _READ_GLOBALS else metrics.get_meter_provider()
        return meters.__class__ not in _INERT_PROVIDERS

    def start_call(self, event: CallStarted) -> _OtelCall:
        return _OtelCall(event)

    def on_event(self, event: Event) -> None:
        if isinstance(event, BreakerStateChanged):
            name, old, new = event
            attributes: dict[str, AttributeValue] = {
                "resilient_grpc.breaker.name": name,
                "resilient_grpc.breaker.from": old,
                "resilient_grpc.breaker.to": new,
            }
            _instruments().breaker_transitions.add(1, attributes)
            _current_span_event("breaker_state_change", attributes)
        elif isinstance(event, DedupOutcome):
            method, outcome, _ = event
            _instruments().dedup.add(
                1, {**_method_info(method).attributes, "resilient_grpc.dedup.outcome": outcome}
            )
            _current_span_event("dedup", {"resilient_grpc.dedup.outcome": outcome})
        elif isinstance(event, CallAdmitted):
            _admission_instruments()[0].add(1, _method_info(event.method).attributes)
        elif isinstance(event, CallShed):
            method, reason = event
            _admission_instruments()[1].add(
                1, {**_method_info(method).attributes, "resilient_grpc.shed.reason": reason}
            )
            _current_span_event("shed", {"resilient_grpc.shed.reason": reason})
        # CallFinished of a call it did not watch: nothing records it (no provider did then)


def _reset_for_tests() -> None:
    """Forget providers, instruments and registered breakers (tests only)."""
    configure()
    with _breakers_lock:
        _weak_breakers.clear()
        _strong_breakers.clear()


__all__ = [
    "BACKOFF_BUCKETS",
    "ObservableBreaker",
    "ObservableLimit",
    "OtelHook",
    "configure",
    "register_breaker",
    "register_limit",
]
