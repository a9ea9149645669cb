"""The telemetry seam: typed events to hooks, and nothing built for a call no hook watches."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from opentelemetry import metrics, trace

from protos import ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, AioLedger, Fault, SyncLedger
from resilient_grpc import HedgingPolicy, IdempotencyKeys, idempotency_key, otel, telemetry
from resilient_grpc import aio as rg_aio
from resilient_grpc.client import client_interceptors, resilient_channel
from resilient_grpc.core.retry import Reason
from resilient_grpc.events import (
    AttemptFinished,
    CallFinished,
    CallHook,
    CallStarted,
    Event,
)
from tests.helpers import BALANCE_REQUEST, FAST

KEY = "idem-hooks-secret-key-0001"


class Spy:
    """A hook that watches calls only while ``on`` is set, and keeps what it was given."""

    def __init__(self, on: bool = False) -> None:
        self.on = on
        self.started: list[CallStarted] = []
        self.events: list[Event] = []
        self.recorder = telemetry.Recorder()

    def watching(self) -> bool:
        return self.on

    def start_call(self, event: CallStarted) -> CallHook:
        self.started.append(event)
        return self.recorder.start_call(event)

    def on_event(self, event: Event) -> None:
        self.events.append(event)


@pytest.fixture(autouse=True)
def default_hooks() -> Iterator[None]:
    telemetry._reset_for_tests()
    yield
    telemetry._reset_for_tests()


def _not_found_next(servicer: SyncLedger | AioLedger) -> None:
    servicer.state.faults.add(GET_BALANCE, Fault(code=grpc.StatusCode.NOT_FOUND))


def test_unwatched_calls_build_no_event_and_report_only_a_failure(
    ledger: tuple[SyncLedger, int],
) -> None:
    servicer, port = ledger
    spy = Spy()
    telemetry.set_hooks(spy)
    target = f"127.0.0.1:{port}"
    with resilient_channel(target, retry=FAST, idempotency=IdempotencyKeys()) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        servicer.state.faults.fail_times(GET_BALANCE, 1)
        stub.GetBalance(BALANCE_REQUEST, timeout=5)  # retried once, then OK
        _not_found_next(servicer)
        with pytest.raises(grpc.RpcError):
            stub.GetBalance(BALANCE_REQUEST, timeout=5)
    assert spy.started == []
    assert spy.events == [
        CallFinished(GET_BALANCE, target, "NOT_FOUND", 1, Reason.NOT_RETRYABLE_CODE)
    ]
    assert spy.recorder.events == []


def test_without_sdk_or_debug_log_no_span_is_started_and_no_instrument_touched(
    ledger: tuple[SyncLedger, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    servicer, port = ledger
    telemetry.configure(
        tracer_provider=trace.NoOpTracerProvider(), meter_provider=metrics.NoOpMeterProvider()
    )
    logging.getLogger("resilient_grpc.client").setLevel(logging.INFO)

    def boom(*args: Any) -> Any:
        raise AssertionError("telemetry touched for an unwatched call")

    monkeypatch.setattr(otel, "_tracer", boom)
    monkeypatch.setattr(otel, "_instruments", boom)
    target = f"127.0.0.1:{port}"
    try:
        for channel in (
            resilient_channel(target, retry=FAST, idempotency=IdempotencyKeys()),
            grpc.intercept_channel(
                grpc.insecure_channel(target),
                *client_interceptors(target=target, retry=FAST, idempotency=IdempotencyKeys()),
            ),
        ):
            with channel:
                stub = ledger_pb2_grpc.LedgerStub(channel)
                servicer.state.faults.fail_times(GET_BALANCE, 1)
                stub.GetBalance(BALANCE_REQUEST, timeout=5)
                stub.GetBalance.future(BALANCE_REQUEST, timeout=5).result()
    finally:
        logging.getLogger("resilient_grpc.client").setLevel(logging.NOTSET)


def test_a_hook_that_starts_watching_later_sees_the_next_call_of_the_same_channel(
    ledger: tuple[SyncLedger, int],
) -> None:
    _, port = ledger
    spy = Spy()
    telemetry.set_hooks(spy)
    target = f"127.0.0.1:{port}"
    with resilient_channel(target, retry=FAST) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        stub.GetBalance(BALANCE_REQUEST, timeout=5)
        spy.on = True
        stub.GetBalance(BALANCE_REQUEST, timeout=5)
    assert spy.started == [CallStarted(GET_BALANCE, target, "sync")]
    assert spy.recorder.events == [
        CallStarted(GET_BALANCE, target, "sync"),
        AttemptFinished(1, "OK", None),
        CallFinished(GET_BALANCE, target, "OK", 1, Reason.SUCCESS),
    ]


async def test_capture_records_a_retried_aio_call_in_order_without_its_key(
    aio_ledger: tuple[AioLedger, int],
) -> None:
    servicer, port = aio_ledger
    target = f"127.0.0.1:{port}"
    with telemetry.capture() as recorder:
        async with rg_aio.resilient_channel(
            target, retry=FAST, idempotency=IdempotencyKeys()
        ) as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            servicer.state.faults.fail_times(GET_BALANCE, 1)
            with idempotency_key(KEY):
                await stub.GetBalance(BALANCE_REQUEST, timeout=5)
    assert telemetry.get_hooks() != (recorder,)  # restored
    kinds = [type(event).__name__ for event in recorder.events]
    assert kinds == ["CallStarted", "AttemptFinished", "AttemptFinished", "CallFinished"]
    first, second = recorder.events[1], recorder.events[2]
    assert isinstance(first, AttemptFinished) and isinstance(second, AttemptFinished)
    assert (first.attempt, first.code) == (1, "UNAVAILABLE")
    assert first.decision is not None and first.decision.retry
    assert (second.attempt, second.code, second.decision) == (2, "OK", None)
    assert recorder.events[3] == CallFinished(GET_BALANCE, target, "OK", 2, Reason.SUCCESS)
    assert KEY not in repr(recorder.events)


def test_a_call_the_breaker_failed_fast_is_logged_on_the_breaker_logger_when_unwatched(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_grpc.breaker")
    logging.getLogger("resilient_grpc.client").setLevel(logging.INFO)
    try:
        assert telemetry.start_call(GET_BALANCE) is None or otel.OtelHook().watching()
        telemetry.call_failed(GET_BALANCE, "h:1", "UNAVAILABLE", 0, Reason.BREAKER_OPEN)
    finally:
        logging.getLogger("resilient_grpc.client").setLevel(logging.NOTSET)
    messages = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert messages == [
        (
            "resilient_grpc.breaker",
            logging.DEBUG,
            f"{GET_BALANCE} to h:1: circuit breaker open, failing fast",
        )
    ]


class _Counted:
    """Counts the telemetry objects made while it is installed (see ``counting``)."""

    def __init__(self) -> None:
        self.made: list[str] = []


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> _Counted:
    counted = _Counted()
    for name in ("AttemptFinished", "CallFinished", "CallAbandoned", "CallStarted"):
        original = getattr(telemetry, name)

        def make(*args: Any, _original: Any = original, _name: str = name) -> Any:
            counted.made.append(_name)
            return _original(*args)

        monkeypatch.setattr(telemetry, name, make)
    original_init = telemetry.CallTelemetry.__init__

    def init(self: telemetry.CallTelemetry, *args: Any) -> None:
        counted.made.append("CallTelemetry")
        original_init(self, *args)

    monkeypatch.setattr(telemetry.CallTelemetry, "__init__", init)
    return counted


@pytest.mark.parametrize("how", ["channel", "interceptors"])
def test_an_unwatched_hedged_call_builds_nothing_and_reports_only_a_failure(
    ledger: tuple[SyncLedger, int], counting: _Counted, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    servicer, port = ledger
    spy = Spy()
    telemetry.set_hooks(spy)

    def boom(*args: Any) -> Any:
        raise AssertionError("telemetry touched for an unwatched call")

    monkeypatch.setattr(otel, "_tracer", boom)
    monkeypatch.setattr(otel, "_instruments", boom)
    target = f"127.0.0.1:{port}"
    hedging = HedgingPolicy(max_attempts=3, delay=30.0)  # only failure copies
    channel = (
        resilient_channel(target, hedging=hedging, idempotency=IdempotencyKeys())
        if how == "channel"
        else grpc.intercept_channel(
            grpc.insecure_channel(target),
            *client_interceptors(target=target, hedging=hedging, idempotency=IdempotencyKeys()),
        )
    )
    with channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        servicer.state.faults.fail_times(GET_BALANCE, 1)  # a failure copy, then OK
        stub.GetBalance.future(BALANCE_REQUEST, timeout=5).result(timeout=5)
        assert counting.made == []  # no event, no CallTelemetry: nothing for nobody
        _not_found_next(servicer)
        with pytest.raises(grpc.RpcError):
            stub.GetBalance.future(BALANCE_REQUEST, timeout=5).result(timeout=5)
    assert spy.started == []
    assert spy.recorder.events == []
    assert counting.made == ["CallFinished"]  # the failed end, for the hooks' on_event
    assert spy.events == [
        CallFinished(GET_BALANCE, target, "NOT_FOUND", 1, Reason.NOT_RETRYABLE_CODE)
    ]


def test_a_watched_hedged_call_reports_every_attempt_and_its_end(
    ledger: tuple[SyncLedger, int],
) -> None:
    servicer, port = ledger
    spy = Spy(on=True)
    telemetry.set_hooks(spy)
    target = f"127.0.0.1:{port}"
    hedging = HedgingPolicy(max_attempts=3, delay=30.0)  # only failure copies
    with resilient_channel(target, hedging=hedging, idempotency=IdempotencyKeys()) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        servicer.state.faults.fail_times(GET_BALANCE, 1)
        stub.GetBalance.future(BALANCE_REQUEST, timeout=5).result(timeout=5)
        _not_found_next(servicer)
        with pytest.raises(grpc.RpcError):
            stub.GetBalance.future(BALANCE_REQUEST, timeout=5).result(timeout=5)
    started = CallStarted(GET_BALANCE, target, "sync")
    assert spy.started == [started, started]
    assert spy.recorder.events == [
        started,
        AttemptFinished(1, "UNAVAILABLE", None),
        AttemptFinished(2, "OK", None),
        CallFinished(GET_BALANCE, target, "OK", 2, Reason.SUCCESS),
        started,
        AttemptFinished(1, "NOT_FOUND", None),
        CallFinished(GET_BALANCE, target, "NOT_FOUND", 1, Reason.NOT_RETRYABLE_CODE),
    ]
    assert spy.events == []  # a watching hook gets the failed end once, as a call event
