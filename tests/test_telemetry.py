"""The telemetry facade on its own: spans, events, metrics and the breaker gauge, with the real SDK."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from resilient_grpc import otel as otel_hook
from resilient_grpc import telemetry
from resilient_grpc.core.retry import DelaySource, Reason, RetryDecision
from tests.telemetry_fixtures import Otel, client_call

TRANSFER = "/ledger.v1.Ledger/Transfer"


def attempt_events(span: object) -> list[dict[str, object]]:
    return [dict(e.attributes or {}) for e in span.events if e.name == "attempt"]  # type: ignore[attr-defined]


def test_logical_call_span_has_rpc_attributes_and_nests_under_the_current_span(otel: Otel) -> None:
    app = otel.tracer_provider.get_tracer("app")
    with (
        app.start_as_current_span("checkout") as parent,
        client_call(TRANSFER, target="127.0.0.1:5051") as call,
    ):
        call.attempt(1, "OK", None)
        call.end("OK", attempts=1, reason=Reason.SUCCESS)

    (span,) = otel.spans("ledger.v1.Ledger/Transfer")
    assert span.kind is SpanKind.CLIENT
    assert span.parent is not None
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.context.trace_id == parent.get_span_context().trace_id
    attributes = dict(span.attributes or {})
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == "ledger.v1.Ledger"
    assert attributes["rpc.method"] == "Transfer"
    assert attributes["rpc.grpc.status_code"] == 0  # an int, as the conventions type it
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["server.port"] == 5051
    assert attributes["resilient_grpc.attempts"] == 1
    assert attributes["resilient_grpc.outcome"] == "success"
    assert span.status.status_code is StatusCode.UNSET
    assert attempt_events(span) == [
        {
            "resilient_grpc.attempt": 1,
            "rpc.grpc.status_code": 0,
            "resilient_grpc.status": "OK",
            "resilient_grpc.retry": False,
            "resilient_grpc.reason": "success",
        }
    ]


def test_attempt_events_say_which_backoff_was_chosen_and_why(otel: Otel) -> None:
    decisions = [
        RetryDecision(True, Reason.RETRY, 0.25, DelaySource.COMPUTED, 1),
        RetryDecision(True, Reason.RETRY, 1.5, DelaySource.PUSHBACK, 2),
        RetryDecision(True, Reason.RETRY, 0.75, DelaySource.RETRY_INFO, 3),
        RetryDecision(False, Reason.MAX_ATTEMPTS, attempt=4),
    ]
    with client_call(TRANSFER) as call:
        for number, decision in enumerate(decisions, start=1):
            call.attempt(number, "UNAVAILABLE", decision)
        call.end("UNAVAILABLE", attempts=4, reason=Reason.MAX_ATTEMPTS)

    (span,) = otel.spans()
    events = attempt_events(span)
    assert [e["resilient_grpc.attempt"] for e in events] == [1, 2, 3, 4]
    assert {e["rpc.grpc.status_code"] for e in events} == {14}
    assert [e.get("resilient_grpc.backoff_source") for e in events] == [
        "computed",
        "pushback",
        "retry_info",
        None,
    ]
    assert [e.get("resilient_grpc.backoff_s") for e in events] == [0.25, 1.5, 0.75, None]
    assert [e["resilient_grpc.retry"] for e in events] == [True, True, True, False]
    assert events[-1]["resilient_grpc.reason"] == "max_attempts"
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["rpc.grpc.status_code"] == 14

    assert otel.total("resilient_grpc.client.attempts", rpc__grpc__status_code=14) == 4
    assert otel.total("resilient_grpc.client.retries", rpc__method="Transfer") == 3
    assert (
        otel.total("resilient_grpc.client.retries", resilient_grpc__backoff_source="pushback") == 1
    )
    by_source = {
        p.attributes["resilient_grpc.backoff_source"]: (p.count, p.sum)
        for p in otel.points("resilient_grpc.client.backoff")
    }
    assert by_source == {"computed": (1, 0.25), "pushback": (1, 1.5), "retry_info": (1, 0.75)}


def test_backoff_histogram_records_each_granted_delay(otel: Otel) -> None:
    with client_call(TRANSFER) as call:
        call.attempt(
            1, "UNAVAILABLE", RetryDecision(True, Reason.RETRY, 0.2, DelaySource.COMPUTED, 1)
        )
        call.attempt(
            2, "UNAVAILABLE", RetryDecision(True, Reason.RETRY, 0.4, DelaySource.COMPUTED, 2)
        )
        call.attempt(3, "OK", None)
        call.end("OK", attempts=3, reason=Reason.SUCCESS)

    (point,) = otel.points("resilient_grpc.client.backoff")
    assert point.count == 2
    assert point.sum == pytest.approx(0.6)
    assert point.attributes == {
        "rpc.service": "ledger.v1.Ledger",
        "rpc.method": "Transfer",
        "resilient_grpc.backoff_source": "computed",
    }
    assert tuple(point.explicit_bounds) == otel_hook.BACKOFF_BUCKETS
    assert otel.total("resilient_grpc.client.calls", resilient_grpc__outcome="success") == 1


def test_budget_refusal_is_an_event_and_a_counter(otel: Otel) -> None:
    refused = RetryDecision(False, Reason.BUDGET_EXHAUSTED, 0.1, DelaySource.COMPUTED, 1)
    with client_call(TRANSFER) as call:
        call.attempt(1, "UNAVAILABLE", refused)
        call.end("UNAVAILABLE", attempts=1, reason=Reason.BUDGET_EXHAUSTED)

    (span,) = otel.spans()
    names = [e.name for e in span.events]
    assert names == ["attempt", "retry_budget_exhausted"]
    assert otel.total("resilient_grpc.client.budget_refusals", rpc__method="Transfer") == 1
    assert otel.total("resilient_grpc.client.retries") == 0
    assert (
        otel.total("resilient_grpc.client.calls", resilient_grpc__outcome="budget_exhausted") == 1
    )


def test_breaker_fast_failure_is_an_event_and_a_counter(otel: Otel) -> None:
    with client_call(TRANSFER) as call:
        call.breaker_rejected()
        call.end("UNAVAILABLE", attempts=0, reason=Reason.BREAKER_OPEN)

    (span,) = otel.spans()
    assert [e.name for e in span.events] == ["breaker_open"]
    assert span.attributes["resilient_grpc.attempts"] == 0
    assert span.attributes["resilient_grpc.outcome"] == "breaker_open"
    assert span.status.status_code is StatusCode.ERROR
    assert otel.total("resilient_grpc.client.breaker_rejections") == 1
    assert otel.total("resilient_grpc.client.attempts") == 0


def test_span_that_leaves_by_an_exception_records_only_its_type(otel: Otel) -> None:
    class Secret(Exception):
        pass

    with pytest.raises(Secret), client_call(TRANSFER):
        raise Secret("key-123 must not leak")

    (span,) = otel.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"].endswith("Secret")
    assert "key-123" not in otel.everything()


def test_end_then_exception_keeps_the_reported_status(otel: Otel) -> None:
    with pytest.raises(RuntimeError), client_call(TRANSFER) as call:
        call.end("NOT_FOUND", attempts=1, reason=Reason.NOT_RETRYABLE_CODE)
        raise RuntimeError("the final error, raised after end()")

    (span,) = otel.spans()
    assert span.attributes["rpc.grpc.status_code"] == 5
    assert "error.type" not in span.attributes


def test_driver_closed_early_ends_the_span_as_abandoned(otel: Otel) -> None:
    def steps():  # the shape of the client's step generator
        with client_call(TRANSFER) as call:
            yield call

    generator = steps()
    next(generator)
    generator.close()

    (span,) = otel.spans()
    assert span.attributes["resilient_grpc.outcome"] == "abandoned"
    assert span.status.status_code is StatusCode.UNSET


def test_started_call_ends_once_and_use_makes_it_current(otel: Otel) -> None:
    call = telemetry.start_client_call(TRANSFER, target="dns:///ledger.example:443")
    with call.use():
        assert trace.get_current_span().name == "ledger.v1.Ledger/Transfer"  # type: ignore[attr-defined]
    call.end("OK", attempts=1, reason=Reason.SUCCESS)
    call.end("UNAVAILABLE", attempts=2, reason=Reason.MAX_ATTEMPTS)  # ignored

    (span,) = otel.spans()
    assert span.attributes["rpc.grpc.status_code"] == 0
    assert span.attributes["server.address"] == "ledger.example"
    assert span.attributes["server.port"] == 443


def test_span_kind_settings(otel: Otel) -> None:
    telemetry.configure(
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
        span_kind="internal",
    )
    with client_call(TRANSFER) as call:
        call.end("OK", attempts=1, reason=Reason.SUCCESS)
    telemetry.configure(tracer_provider=otel.tracer_provider, span_kind="client")
    with client_call(TRANSFER) as call:
        call.end("OK", attempts=1, reason=Reason.SUCCESS)

    assert [s.kind for s in otel.spans()] == [SpanKind.INTERNAL, SpanKind.CLIENT]
    with pytest.raises(ValueError, match="span_kind"):
        telemetry.configure(span_kind="server")  # type: ignore[arg-type]


def test_breaker_transitions_counter_and_event_on_the_current_span(otel: Otel) -> None:
    with client_call(TRANSFER) as call:
        telemetry.breaker_state_changed("resilient_grpc:127.0.0.1:1", "closed", "open")
        call.end("UNAVAILABLE", attempts=1, reason=Reason.BREAKER_OPEN)
    telemetry.breaker_state_changed("resilient_grpc:127.0.0.1:1", "open", "half-open")

    (span,) = otel.spans()
    (event,) = [e for e in span.events if e.name == "breaker_state_change"]
    assert event.attributes["resilient_grpc.breaker.to"] == "open"
    assert otel.total("resilient_grpc.breaker.transitions", resilient_grpc__breaker__to="open") == 1
    assert otel.total("resilient_grpc.breaker.transitions") == 2


class _Breaker:
    def __init__(self, name: str, state: str) -> None:
        self.name = name
        self.state = state


class _SlottedBreaker:
    __slots__ = ("name", "state")

    def __init__(self, name: str, state: str) -> None:
        self.name = name
        self.state = state


def gauge(otel: Otel) -> dict[tuple[str, str], int]:
    return {
        (
            p.attributes["resilient_grpc.breaker.name"],
            p.attributes["resilient_grpc.breaker.state"],
        ): p.value
        for p in otel.points("resilient_grpc.breaker.state")
    }


def test_breaker_state_gauge_follows_registered_breakers(otel: Otel) -> None:
    weak = _Breaker("a", "closed")
    strong = _SlottedBreaker("b", "open")  # no weak references: held until unregistered
    telemetry.register_breaker(weak)
    telemetry.register_breaker(strong)
    otel_hook._instruments()  # the gauge exists once the facade has been used

    assert gauge(otel) == {
        ("a", "closed"): 1,
        ("a", "open"): 0,
        ("a", "half-open"): 0,
        ("b", "closed"): 0,
        ("b", "open"): 1,
        ("b", "half-open"): 0,
    }
    weak.state = "half-open"
    assert gauge(otel)[("a", "half-open")] == 1

    del weak
    gc.collect()
    otel_hook._unregister_breaker(strong)
    assert otel_hook._registered_breakers() == []


def test_a_breaker_whose_state_cannot_be_read_is_skipped(otel: Otel) -> None:
    class Broken:
        name = "redis-backed"

        @property
        def state(self) -> str:
            raise ConnectionError("redis is down")

    broken = Broken()
    telemetry.register_breaker(broken)
    telemetry.register_breaker(ok := _Breaker("ok", "closed"))
    otel_hook._instruments()
    assert {name for name, _ in gauge(otel)} == {"ok"}
    del broken, ok


def test_dedup_outcomes_are_counted_with_small_attributes(otel: Otel) -> None:
    server_span = otel.tracer_provider.get_tracer("grpc-server").start_span(
        "ledger.v1.Ledger/Transfer", kind=SpanKind.SERVER
    )
    with trace.use_span(server_span, end_on_exit=True):
        telemetry.dedup_outcome(TRANSFER, "replayed")
    telemetry.dedup_outcome(TRANSFER, "executed")
    telemetry.dedup_outcome(TRANSFER, "replayed")
    telemetry.dedup_outcome(TRANSFER, "Some Key-Like Value 0123456789 with spaces")

    assert otel.total("resilient_grpc.server.dedup", resilient_grpc__dedup__outcome="replayed") == 2
    assert otel.total("resilient_grpc.server.dedup", resilient_grpc__dedup__outcome="executed") == 1
    assert otel.total("resilient_grpc.server.dedup", resilient_grpc__dedup__outcome="other") == 1
    for point in otel.points("resilient_grpc.server.dedup"):
        assert set(point.attributes) == {
            "rpc.service",
            "rpc.method",
            "resilient_grpc.dedup.outcome",
        }
    (span,) = otel.spans()
    assert [(e.name, dict(e.attributes)) for e in span.events] == [
        ("dedup", {"resilient_grpc.dedup.outcome": "replayed"})
    ]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("127.0.0.1:50051", {"server.address": "127.0.0.1", "server.port": 50051}),
        ("dns:///ledger.internal:443", {"server.address": "ledger.internal", "server.port": 443}),
        ("ipv6:[::1]:8080", {"server.address": "::1", "server.port": 8080}),
        ("[::1]:8080", {"server.address": "::1", "server.port": 8080}),
        ("localhost", {"server.address": "localhost"}),
        ("unix:/tmp/ledger.sock", {"server.address": "unix:/tmp/ledger.sock"}),
        (None, {}),
    ],
)
def test_server_attributes_from_targets(target: str | None, expected: dict[str, object]) -> None:
    assert otel_hook._server_attributes(target) == expected


def test_sdk_installed_after_import_still_receives_spans_and_metrics() -> None:
    """The global providers may be set after ``resilient_grpc`` was imported and used."""
    script = textwrap.dedent(
        """
        import json
        from resilient_grpc import telemetry
        from resilient_grpc.core.retry import Reason
        assert telemetry.start_call("/a.B/C") is None  # before any SDK: not watched

        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

        call = telemetry.start_call("/a.B/C")
        call.attempt(1, "OK", None)
        call.end("OK", attempts=1, reason=Reason.SUCCESS)
        names = [m.name for rm in reader.get_metrics_data().resource_metrics
                 for sm in rm.scope_metrics for m in sm.metrics]
        print(json.dumps({"spans": [s.name for s in exporter.get_finished_spans()],
                          "metrics": sorted(names)}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["spans"] == ["a.B/C"]
    assert "resilient_grpc.client.attempts" in out["metrics"]
    assert "resilient_grpc.client.calls" in out["metrics"]
