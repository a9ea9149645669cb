"""Telemetry end to end: real ledger servers with scripted faults, the real client stacks (sync and
aio), the real OpenTelemetry SDK in memory, and caplog. No key may appear in anything exported."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from opentelemetry.trace import SpanKind, StatusCode

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import TRANSFER, AioLedger, SyncLedger
from resilient_grpc import (
    CircuitBreaker,
    IdempotencyKeys,
    RetryBudget,
    idempotency_key,
    telemetry,
)
from resilient_grpc import aio as rg_aio
from resilient_grpc import otel as otel_hook
from resilient_grpc.client import resilient_channel
from resilient_grpc.errors import BreakerOpenError
from tests.helpers import FAST, aio_stub_maker, stub_maker
from tests.telemetry_fixtures import Otel

REQUEST = ledger_pb2.TransferRequest(from_account="alice", to_account="bob", amount=5)
SPAN = "ledger.v1.Ledger/Transfer"
SECRET_KEY = "k-5ecret-7f3a9c1e-do-not-export"


def attempt_codes(span: Any) -> list[object]:
    return [e.attributes["rpc.grpc.status_code"] for e in span.events if e.name == "attempt"]


def assert_no_key_anywhere(otel: Otel, caplog: pytest.LogCaptureFixture, key: str) -> None:
    assert key not in otel.everything()
    for record in caplog.records:
        assert key not in record.getMessage()
        assert all(key not in str(value) for value in vars(record).values())


@pytest.fixture
def sync_stub(ledger: tuple[SyncLedger, int]) -> Iterator[Any]:
    with stub_maker(f"127.0.0.1:{ledger[1]}") as make:
        yield make


@pytest.fixture
async def aio_stub(aio_ledger: tuple[AioLedger, int]) -> AsyncIterator[Any]:
    async with aio_stub_maker(f"127.0.0.1:{aio_ledger[1]}") as make:
        yield make


def check_fail_twice_then_succeed(otel: Otel, port: int, parent: Any) -> None:
    (span,) = otel.spans(SPAN)
    assert span.kind is SpanKind.CLIENT
    assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id
    assert attempt_codes(span) == [14, 14, 0]
    events = [e.attributes for e in span.events if e.name == "attempt"]
    assert [e["resilient_grpc.attempt"] for e in events] == [1, 2, 3]
    assert [e.get("resilient_grpc.backoff_source") for e in events] == [
        "computed",
        "computed",
        None,
    ]
    assert all(0 <= e["resilient_grpc.backoff_s"] <= 0.05 for e in events[:2])
    attributes = span.attributes
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == "ledger.v1.Ledger"
    assert attributes["rpc.method"] == "Transfer"
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["resilient_grpc.attempts"] == 3
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["server.port"] == port
    assert span.status.status_code is StatusCode.UNSET
    assert otel.total("resilient_grpc.client.attempts", rpc__grpc__status_code=14) == 2
    assert otel.total("resilient_grpc.client.attempts", rpc__grpc__status_code=0) == 1
    assert otel.total("resilient_grpc.client.retries", rpc__method="Transfer") == 2
    (backoff,) = otel.points("resilient_grpc.client.backoff")
    assert backoff.count == 2
    assert otel.total("resilient_grpc.client.calls", resilient_grpc__outcome="success") == 1


def test_sync_fail_twice_then_succeed_is_one_span_with_three_attempt_events(
    otel: Otel, sync_stub: Any, ledger: tuple[SyncLedger, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_grpc")
    servicer, port = ledger
    stub = sync_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(TRANSFER, 2)
    with otel.tracer_provider.get_tracer("app").start_as_current_span("checkout") as parent:
        stub.Transfer(REQUEST, timeout=5)
    check_fail_twice_then_succeed(otel, port, parent)
    # the generated key reached the server, and nowhere else
    (key,) = {call.key for call in servicer.state.calls_to(TRANSFER)}
    assert key
    assert_no_key_anywhere(otel, caplog, key)


async def test_aio_fail_twice_then_succeed_is_one_span_with_three_attempt_events(
    otel: Otel, aio_stub: Any, aio_ledger: tuple[AioLedger, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_grpc")
    servicer, port = aio_ledger
    stub = aio_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(TRANSFER, 2)
    with otel.tracer_provider.get_tracer("app").start_as_current_span("checkout") as parent:
        await stub.Transfer(REQUEST, timeout=5)
    check_fail_twice_then_succeed(otel, port, parent)
    (key,) = {call.key for call in servicer.state.calls_to(TRANSFER)}
    assert_no_key_anywhere(otel, caplog, key)


def test_sync_explicit_key_never_reaches_spans_metrics_or_logs(
    otel: Otel, sync_stub: Any, ledger: tuple[SyncLedger, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_grpc")
    servicer, _ = ledger
    stub = sync_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(TRANSFER, 3)
    with idempotency_key(SECRET_KEY), pytest.raises(grpc.RpcError):
        stub.Transfer(REQUEST, timeout=5)
    assert {call.key for call in servicer.state.calls_to(TRANSFER)} == {SECRET_KEY}
    assert otel.spans(SPAN)
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    assert_no_key_anywhere(otel, caplog, SECRET_KEY)


async def test_aio_explicit_key_never_reaches_spans_metrics_or_logs(
    otel: Otel, aio_stub: Any, aio_ledger: tuple[AioLedger, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_grpc")
    servicer, _ = aio_ledger
    stub = aio_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(TRANSFER, 3)
    with idempotency_key(SECRET_KEY), pytest.raises(grpc.RpcError):
        await stub.Transfer(REQUEST, timeout=5)
    assert {call.key for call in servicer.state.calls_to(TRANSFER)} == {SECRET_KEY}
    assert_no_key_anywhere(otel, caplog, SECRET_KEY)


def check_budget_refusal(otel: Otel) -> None:
    (span,) = otel.spans(SPAN)
    assert [e.name for e in span.events] == ["attempt", "retry_budget_exhausted"]
    assert span.attributes["resilient_grpc.outcome"] == "budget_exhausted"
    assert span.attributes["rpc.grpc.status_code"] == 14
    assert span.status.status_code is StatusCode.ERROR
    assert otel.total("resilient_grpc.client.budget_refusals", rpc__method="Transfer") == 1
    assert otel.total("resilient_grpc.client.retries") == 0


def test_sync_budget_refusal_is_visible(
    otel: Otel, sync_stub: Any, ledger: tuple[SyncLedger, int]
) -> None:
    empty = RetryBudget(ratio=0.0, min_retries_per_second=0.0)
    stub = sync_stub(retry=FAST, budget=empty, idempotency=IdempotencyKeys())
    ledger[0].state.faults.fail_times(TRANSFER, 1)
    with pytest.raises(grpc.RpcError):
        stub.Transfer(REQUEST, timeout=5)
    check_budget_refusal(otel)


async def test_aio_budget_refusal_is_visible(
    otel: Otel, aio_stub: Any, aio_ledger: tuple[AioLedger, int]
) -> None:
    empty = RetryBudget(ratio=0.0, min_retries_per_second=0.0)
    stub = aio_stub(retry=FAST, budget=empty, idempotency=IdempotencyKeys())
    aio_ledger[0].state.faults.fail_times(TRANSFER, 1)
    with pytest.raises(grpc.RpcError):
        await stub.Transfer(REQUEST, timeout=5)
    check_budget_refusal(otel)


def breaker_gauge(otel: Otel) -> dict[str, int]:
    return {
        p.attributes["resilient_grpc.breaker.state"]: p.value
        for p in otel.points("resilient_grpc.breaker.state")
    }


def check_breaker_open(otel: Otel, breaker: CircuitBreaker) -> None:
    tripped, rejected = otel.spans(SPAN)
    # the call whose failure opened the breaker shows the transition and why it stopped
    assert any(
        e.name == "breaker_state_change" and e.attributes["resilient_grpc.breaker.to"] == "open"
        for e in tripped.events
    )
    assert tripped.attributes["resilient_grpc.outcome"] == "breaker_open"
    # the next call failed fast: no attempt, one breaker_open event
    assert [e.name for e in rejected.events] == ["breaker_open"]
    assert rejected.attributes["resilient_grpc.attempts"] == 0
    assert rejected.attributes["rpc.grpc.status_code"] == 14
    assert otel.total("resilient_grpc.client.breaker_rejections", rpc__method="Transfer") == 1
    assert (
        otel.total(
            "resilient_grpc.breaker.transitions",
            resilient_grpc__breaker__from="closed",
            resilient_grpc__breaker__to="open",
        )
        == 1
    )
    if not otel_hook._registered_breakers():  # until the breaker registers itself
        for target_breaker in breaker._targets.values():
            telemetry.register_breaker(target_breaker)
    assert breaker_gauge(otel) == {"closed": 0, "open": 1, "half-open": 0}


def test_sync_breaker_open_is_visible(
    otel: Otel, sync_stub: Any, ledger: tuple[SyncLedger, int], caplog: pytest.LogCaptureFixture
) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=30)
    stub = sync_stub(retry=FAST, breaker=breaker, idempotency=IdempotencyKeys())
    ledger[0].state.faults.fail_times(TRANSFER, 1)
    with pytest.raises(grpc.RpcError):
        stub.Transfer(REQUEST, timeout=5)
    with pytest.raises(BreakerOpenError):
        stub.Transfer(REQUEST, timeout=5)
    check_breaker_open(otel, breaker)
    opened = [r for r in caplog.records if r.name == "resilient_grpc.breaker"]
    assert [r.levelno for r in opened] == [logging.WARNING]
    assert "opened" in opened[0].getMessage()


async def test_aio_breaker_open_is_visible(
    otel: Otel, aio_stub: Any, aio_ledger: tuple[AioLedger, int]
) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=30)
    stub = aio_stub(retry=FAST, breaker=breaker, idempotency=IdempotencyKeys())
    aio_ledger[0].state.faults.fail_times(TRANSFER, 1)
    with pytest.raises(grpc.RpcError):
        await stub.Transfer(REQUEST, timeout=5)
    with pytest.raises(BreakerOpenError):
        await stub.Transfer(REQUEST, timeout=5)
    check_breaker_open(otel, breaker)


# --- beside opentelemetry-instrumentation-grpc --------------------------------------------


def _instrumentation_installed() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.instrumentation.grpc") is not None
    except ModuleNotFoundError:  # not even opentelemetry-instrumentation
        return False


INSTRUMENTATION = _instrumentation_installed()

BESIDE_SCRIPT = textwrap.dedent(
    """
    import asyncio, json
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.instrumentation.grpc import (
        GrpcAioInstrumentorClient, GrpcInstrumentorClient, GrpcInstrumentorServer,
    )
    from protos import ledger_pb2, ledger_pb2_grpc
    from protos.ledger_service import TRANSFER, serve, serve_aio
    import resilient_grpc.aio
    from resilient_grpc import IdempotencyKeys, RetryPolicy, idempotency_key
    from resilient_grpc.client import resilient_channel
    from resilient_grpc.server import DedupInterceptor

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
    request = ledger_pb2.TransferRequest(from_account="a", to_account="b", amount=1)

    def dump():
        spans = [
            {"name": s.name, "kind": s.kind.name, "id": s.context.span_id,
             "parent": s.parent.span_id if s.parent else None,
             "code": (s.attributes or {}).get("rpc.grpc.status_code"),
             "events": [[e.name, dict(e.attributes or {})] for e in s.events]}
            for s in exporter.get_finished_spans()
        ]
        exporter.clear()
        return spans

    out = {}
    GrpcInstrumentorClient().instrument()
    server, port, servicer = serve()
    servicer.state.faults.fail_times(TRANSFER, 2)
    with resilient_channel(f"127.0.0.1:{port}", retry=policy, idempotency=IdempotencyKeys()) as ch:
        ledger_pb2_grpc.LedgerStub(ch).Transfer(request, timeout=5)
    server.stop(None)
    out["sync"] = dump()
    GrpcInstrumentorClient().uninstrument()

    GrpcInstrumentorServer().instrument()
    server, port, servicer = serve(interceptors=[DedupInterceptor()])
    with resilient_channel(f"127.0.0.1:{port}", retry=policy, idempotency=IdempotencyKeys()) as ch:
        with idempotency_key("k-beside-1"):
            ledger_pb2_grpc.LedgerStub(ch).Transfer(request, timeout=5)
            ledger_pb2_grpc.LedgerStub(ch).Transfer(request, timeout=5)
    server.stop(None)
    GrpcInstrumentorServer().uninstrument()
    out["server"] = dump()

    async def aio_call():
        GrpcAioInstrumentorClient().instrument()
        server, port, servicer = await serve_aio()
        servicer.state.faults.fail_times(TRANSFER, 2)
        channel = resilient_grpc.aio.resilient_channel(
            f"127.0.0.1:{port}", retry=policy, idempotency=IdempotencyKeys()
        )
        await ledger_pb2_grpc.LedgerStub(channel).Transfer(request, timeout=5)
        await channel.close()
        await server.stop(None)
        GrpcAioInstrumentorClient().uninstrument()

    asyncio.run(aio_call())
    out["aio"] = dump()
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(
    not INSTRUMENTATION, reason="opentelemetry-instrumentation-grpc is not installed"
)
def test_beside_opentelemetry_instrumentation_grpc_there_is_one_client_span_per_rpc() -> None:
    """Our logical span turns INTERNAL; the instrumentation's CLIENT spans are the RPCs."""
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", BESIDE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
        cwd=root,
        env=env,
    )
    out = json.loads(result.stdout.strip().splitlines()[-1])

    # sync: the instrumentation's interceptor sits under ours: one CLIENT span per attempt,
    # children of our INTERNAL logical-call span
    (ours,) = [s for s in out["sync"] if s["name"] == SPAN]
    assert ours["kind"] == "INTERNAL"
    attempts = [s for s in out["sync"] if s["kind"] == "CLIENT"]
    assert [s["code"] for s in attempts] == [14, 14, 0]
    assert {s["parent"] for s in attempts} == {ours["id"]}

    # aio: resilient_channel wraps the (instrumented) grpc.aio channel, so the layout is the
    # same as sync: one CLIENT span per attempt under our INTERNAL logical-call span
    (ours,) = [s for s in out["aio"] if s["name"] == SPAN]
    assert ours["kind"] == "INTERNAL"
    attempts = [s for s in out["aio"] if s["kind"] == "CLIENT"]
    assert [s["code"] for s in attempts] == [14, 14, 0]
    assert {s["parent"] for s in attempts} == {ours["id"]}

    # server: the dedup outcome is an event on the instrumentation's SERVER span of each call
    server_spans = [s for s in out["server"] if s["kind"] == "SERVER"]
    outcomes = [
        [e[1]["resilient_grpc.dedup.outcome"] for e in s["events"] if e[0] == "dedup"]
        for s in server_spans
    ]
    assert outcomes == [["executed"], ["replayed"]]


# --- server side: dedup outcomes ----------------------------------------------------------


def check_dedup(otel: Otel, caplog: pytest.LogCaptureFixture) -> None:
    def count(outcome: str) -> float:
        return otel.total(
            "resilient_grpc.server.dedup",
            rpc__method="Transfer",
            resilient_grpc__dedup__outcome=outcome,
        )

    assert (count("executed"), count("replayed")) == (1, 1)
    for point in otel.points("resilient_grpc.server.dedup"):
        assert set(point.attributes) == {
            "rpc.service",
            "rpc.method",
            "resilient_grpc.dedup.outcome",
        }
    assert_no_key_anywhere(otel, caplog, SECRET_KEY)


def test_sync_dedup_replay_increments_the_replay_counter(
    otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    from protos.ledger_service import serve
    from resilient_grpc.server import DedupInterceptor

    caplog.set_level(logging.DEBUG, logger="resilient_grpc")
    server, port, servicer = serve(interceptors=[DedupInterceptor()])
    try:
        with resilient_channel(
            f"127.0.0.1:{port}", retry=FAST, idempotency=IdempotencyKeys()
        ) as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            with idempotency_key(SECRET_KEY):
                first = stub.Transfer(REQUEST, timeout=5)
                second = stub.Transfer(REQUEST, timeout=5)
    finally:
        server.stop(None)
    assert first == second
    assert servicer.state.executions[SECRET_KEY] == 1
    check_dedup(otel, caplog)


async def test_aio_dedup_replay_increments_the_replay_counter(
    otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    from protos.ledger_service import serve_aio
    from resilient_grpc.aio.server import DedupInterceptor

    caplog.set_level(logging.DEBUG, logger="resilient_grpc")
    server, port, servicer = await serve_aio(interceptors=[DedupInterceptor()])
    channel = rg_aio.resilient_channel(
        f"127.0.0.1:{port}", retry=FAST, idempotency=IdempotencyKeys()
    )
    try:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        with idempotency_key(SECRET_KEY):
            first = await stub.Transfer(REQUEST, timeout=5)
            second = await stub.Transfer(REQUEST, timeout=5)
    finally:
        await channel.close()
        await server.stop(None)
    assert first == second
    assert servicer.state.executions[SECRET_KEY] == 1
    check_dedup(otel, caplog)


# --- unary-stream: the span covers the stream until it is read to the end ----------------

WATCH_SPAN = "ledger.v1.Ledger/Watch"
WATCH_REQUEST = ledger_pb2.WatchRequest(account="alice", count=3)


def check_stream_span(otel: Otel) -> None:
    (span,) = otel.spans(WATCH_SPAN)
    assert attempt_codes(span) == [14, 0]  # failed before its first message, then streamed
    assert span.attributes["rpc.grpc.status_code"] == 0
    assert span.attributes["resilient_grpc.attempts"] == 2
    assert span.attributes["resilient_grpc.outcome"] == "success"


def test_sync_stream_span_ends_after_the_last_message(
    otel: Otel, sync_stub: Any, ledger: tuple[SyncLedger, int]
) -> None:
    from protos.ledger_service import WATCH

    stub = sync_stub(retry=FAST, idempotency=IdempotencyKeys())
    ledger[0].state.faults.fail_times(WATCH, 1)
    stream = stub.Watch(WATCH_REQUEST, timeout=5)
    first = next(stream)
    assert otel.spans(WATCH_SPAN) == []  # still open: the caller is reading
    assert len([first, *stream]) == 3
    check_stream_span(otel)


async def test_aio_stream_span_ends_after_the_last_message(
    otel: Otel, aio_stub: Any, aio_ledger: tuple[AioLedger, int]
) -> None:
    from protos.ledger_service import WATCH

    stub = aio_stub(retry=FAST, idempotency=IdempotencyKeys())
    aio_ledger[0].state.faults.fail_times(WATCH, 1)
    replies = [reply async for reply in stub.Watch(WATCH_REQUEST, timeout=5)]
    assert len(replies) == 3
    check_stream_span(otel)
