"""An in-memory OpenTelemetry SDK for the telemetry tests, fresh for every test.

The facade is pointed at per-test providers with :func:`resilient_grpc.telemetry.configure`, so
no test touches the process-wide providers (which OpenTelemetry lets a process set only once).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from resilient_grpc import telemetry
from resilient_grpc.events import Transport
from resilient_grpc.telemetry import CallTelemetry


@dataclass
class Otel:
    """The exporters of one test: finished spans and collected metrics."""

    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        found = list(self.exporter.get_finished_spans())
        return [s for s in found if name is None or s.name == name]

    def points(self, metric: str) -> list[Any]:
        """Every data point of ``metric`` in one collection (empty if it recorded nothing)."""
        data = self.reader.get_metrics_data()
        points: list[Any] = []
        if data is None:
            return points
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for item in scope.metrics:
                    if item.name == metric:
                        points.extend(item.data.data_points)
        return points

    def total(self, metric: str, **attributes: object) -> float:
        """The sum of a counter's points whose attributes include ``attributes``.

        Attribute names use ``__`` for dots: ``rpc__method="Transfer"``.
        """
        wanted = {k.replace("__", "."): v for k, v in attributes.items()}
        return sum(
            p.value
            for p in self.points(metric)
            if all(p.attributes.get(k) == v for k, v in wanted.items())
        )

    def everything(self) -> str:
        """Every span, event, attribute and metric point as one string (to search for leaks)."""
        parts: list[str] = [s.to_json() for s in self.spans()]
        data = self.reader.get_metrics_data()
        if data is not None:
            parts.append(data.to_json())
        return "\n".join(parts)


@contextmanager
def client_call(
    method: str, *, target: str | None = None, transport: Transport | None = None
) -> Iterator[CallTelemetry]:
    """Report one logical call the way the client driver does, current while the block runs.

    A block that leaves by an exception abandons the call (its span ends with the exception's
    type); a block that reported no end closes it.
    """
    call = telemetry.start_client_call(method, target=target, transport=transport)
    token = call.make_current()
    try:
        yield call
    except BaseException as error:
        call.abandon(error)
        raise
    finally:
        call.restore(token)
        call.close()


@contextmanager
def fresh_otel() -> Iterator[Otel]:
    """Per-test SDK providers the facade reports to, reset afterwards (the ``otel`` fixture)."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    telemetry.configure(tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        yield Otel(exporter, reader, tracer_provider, meter_provider)
    finally:
        telemetry._reset_for_tests()
        tracer_provider.shutdown()
        meter_provider.shutdown()
