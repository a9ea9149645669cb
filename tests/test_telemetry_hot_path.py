"""The telemetry fast paths (cached attribute dicts, no context switch for a no-op span) stay correct.

Before any SDK the tracer hands back the current non-recording span, so the stack does not
attach a context for it; once an SDK is installed (later, in the same process) every call must
still get a recording span that is current during its attempts, with per-call attributes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from resilient_grpc import telemetry
from resilient_grpc.core.retry import Reason
from tests.telemetry_fixtures import client_call

ROOT = Path(__file__).resolve().parent.parent

SDK_LATER_SCRIPT = textwrap.dedent(
    """
    import asyncio, json
    import grpc
    from opentelemetry import metrics, trace
    from protos import ledger_pb2, ledger_pb2_grpc
    from protos.ledger_service import GET_BALANCE, Fault, serve, serve_aio
    from resilient_grpc import IdempotencyKeys, RetryPolicy
    from resilient_grpc.aio.client import resilient_channel as aio_resilient_channel
    from resilient_grpc.client import client_interceptors, resilient_channel

    request = ledger_pb2.BalanceRequest(account="alice")
    policy = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.02)
    server, port, servicer = serve()
    target = f"127.0.0.1:{port}"
    channel = resilient_channel(target, retry=policy, idempotency=IdempotencyKeys())
    stub = ledger_pb2_grpc.LedgerStub(channel)
    intercepted = ledger_pb2_grpc.LedgerStub(grpc.intercept_channel(
        grpc.insecure_channel(target),
        *client_interceptors(target=target, retry=policy, idempotency=IdempotencyKeys())))

    for s in (stub, intercepted):  # before any SDK: no-op spans, nothing current
        s.GetBalance(request, timeout=5)

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
    app = trace.get_tracer("app")

    attempt_parents = []
    class Spy(grpc.UnaryUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            attempt_parents.append(trace.get_current_span().get_span_context().span_id)
            return continuation(details, request)
    spied = ledger_pb2_grpc.LedgerStub(grpc.intercept_channel(
        grpc.intercept_channel(grpc.insecure_channel(target), Spy()),
        *client_interceptors(target=target, retry=policy)))

    with app.start_as_current_span("checkout") as parent:
        stub.GetBalance(request, timeout=5)
        servicer.state.faults.fail_times(GET_BALANCE, 1)
        intercepted.GetBalance(request, timeout=5)  # UNAVAILABLE, then OK
        servicer.state.faults.add(GET_BALANCE, Fault(code=grpc.StatusCode.NOT_FOUND))
        try:
            stub.GetBalance(request, timeout=5)
        except grpc.RpcError as error:
            not_found = error.code().name
        spied.GetBalance(request, timeout=5)
        still_current = trace.get_current_span() is parent
    server.stop(None)

    async def aio_call():
        aserver, aport, _ = await serve_aio()
        async with aio_resilient_channel(f"127.0.0.1:{aport}", retry=policy) as achannel:
            with app.start_as_current_span("aio-parent"):
                await ledger_pb2_grpc.LedgerStub(achannel).GetBalance(request, timeout=5)
        await aserver.stop(None)
    asyncio.run(aio_call())

    spans = [
        {"name": s.name, "id": s.context.span_id,
         "parent": s.parent.span_id if s.parent else None,
         "attributes": dict(s.attributes or {})}
        for s in exporter.get_finished_spans()
    ]
    calls = [
        {"attributes": dict(p.attributes), "value": p.value}
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics for m in sm.metrics if m.name == "resilient_grpc.client.calls"
        for p in m.data.data_points
    ]
    print(json.dumps({"spans": spans, "calls": calls, "not_found": not_found,
                      "still_current": still_current, "attempt_parents": attempt_parents,
                      "parent": parent.get_span_context().span_id}))
    """
)


def test_sdk_installed_later_gets_recording_current_spans_and_per_call_attributes() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SDK_LATER_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    )
    out = json.loads(result.stdout.strip().splitlines()[-1])
    ours = [s for s in out["spans"] if s["name"] == "ledger.v1.Ledger/GetBalance"]
    assert len(ours) == 5  # only the calls made after the SDK was installed
    by_parent = {s["parent"] for s in ours[:4]}
    assert by_parent == {out["parent"]}
    codes = [
        (s["attributes"]["rpc.grpc.status_code"], s["attributes"]["resilient_grpc.attempts"])
        for s in ours
    ]
    assert codes == [(0, 1), (0, 2), (5, 1), (0, 1), (0, 1)]
    assert out["not_found"] == "NOT_FOUND"
    assert out["still_current"] is True
    # The attempt ran with our logical-call span current (not the app's span).
    assert out["attempt_parents"] == [ours[3]["id"]]
    aio_parent = next(s for s in out["spans"] if s["name"] == "aio-parent")
    assert ours[4]["parent"] == aio_parent["id"]
    assert ours[4]["attributes"]["server.port"] != ours[0]["attributes"]["server.port"]
    totals = {
        (c["attributes"]["rpc.grpc.status_code"], c["attributes"]["resilient_grpc.outcome"]): c[
            "value"
        ]
        for c in out["calls"]
    }
    assert totals == {(0, "success"): 4, (5, "not_retryable_code"): 1}
    for point in out["calls"]:
        assert point["attributes"]["rpc.method"] == "GetBalance"


def test_without_a_recording_provider_the_propagated_parent_stays_current() -> None:
    """No SDK: the call is not watched. Metrics only: our span is the current non-recording
    span, so the context stays as it was and the parent is still current."""
    remote = NonRecordingSpan(
        SpanContext(trace_id=0x1234, span_id=0x5678, is_remote=True, trace_flags=TraceFlags(1))
    )
    telemetry.configure(tracer_provider=trace.NoOpTracerProvider())
    meters = MeterProvider(metric_readers=[reader := InMemoryMetricReader()])
    try:
        assert telemetry.start_call("/a.B/C", target="h:1") is None
        telemetry.configure(tracer_provider=trace.NoOpTracerProvider(), meter_provider=meters)
        with trace.use_span(remote):
            with client_call("/a.B/C", target="h:1") as call:
                assert trace.get_current_span() is remote
                call.attempt(1, "OK", None)
                call.end("OK", attempts=1, reason=Reason.SUCCESS)
            assert trace.get_current_span() is remote
        assert not trace.get_current_span().get_span_context().is_valid
        data = reader.get_metrics_data()
        assert data is not None
        names = {
            m.name for r in data.resource_metrics for sm in r.scope_metrics for m in sm.metrics
        }
        assert "resilient_grpc.client.calls" in names
    finally:
        telemetry.configure()
        meters.shutdown()
