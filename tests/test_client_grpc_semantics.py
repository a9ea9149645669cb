"""Where the stack meets gRPC's own retry rules (issue 9, items 2, 5, 7 and 8).

* ``resilient_channel`` turns gRPC's native retries off: attempts never multiply;
* an attempt cut by ``per_attempt_timeout`` is retried, a server's DEADLINE_EXCEEDED is not;
* a unary-stream call commits once its response headers arrive (gRFC A6);
* retries carry ``grpc-previous-rpc-attempts``;
* calls refused by an open breaker are not traffic: they do not feed the retry budget.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import (
    GET_BALANCE,
    WATCH,
    AioLedger,
    Fault,
    SyncLedger,
    serve,
    serve_aio,
)
from resilient_grpc import CircuitBreaker, IdempotencyKeys, RetryBudget, RetryPolicy
from resilient_grpc.aio.client import resilient_channel as aio_resilient_channel
from resilient_grpc.client import resilient_channel
from resilient_grpc.core.retry import Reason
from resilient_grpc.errors import BreakerOpenError, attempts_of, reason_of
from tests.helpers import (
    BALANCE_REQUEST,
    RETRIES_OFF,
    aio_stub_maker,
    native_retry_options,
    stub_maker,
)

WATCH_REQUEST = ledger_pb2.WatchRequest(account="alice", count=2)
FAST = RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=0.02)
NATIVE_OPTIONS = native_retry_options(
    max_attempts=5, initial="0.01s", maximum="0.01s", multiplier=1, codes=["UNAVAILABLE"]
)


def _target(port: int) -> str:
    return f"127.0.0.1:{port}"


# Item 2: native retries ---------------------------------------------------------------------------


def test_native_retries_do_not_multiply_ours(ledger) -> None:
    servicer, port = ledger
    servicer.state.faults.fail_times(GET_BALANCE, 50)
    with pytest.warns(RuntimeWarning, match="native retries"):
        channel = resilient_channel(
            _target(port), retry=FAST, idempotency=IdempotencyKeys(), options=NATIVE_OPTIONS
        )
    with channel, pytest.raises(grpc.RpcError) as caught:
        ledger_pb2_grpc.LedgerStub(channel).GetBalance(BALANCE_REQUEST, timeout=10)
    assert attempts_of(caught.value) == 5
    assert len(servicer.state.calls_to(GET_BALANCE)) == 5  # not 25


async def test_aio_native_retries_do_not_multiply_ours(aio_ledger) -> None:
    servicer, port = aio_ledger
    servicer.state.faults.fail_times(GET_BALANCE, 50)
    with pytest.warns(RuntimeWarning, match="native retries"):
        channel = aio_resilient_channel(
            _target(port), retry=FAST, idempotency=IdempotencyKeys(), options=NATIVE_OPTIONS
        )
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ledger_pb2_grpc.LedgerStub(channel).GetBalance(BALANCE_REQUEST, timeout=10)
    assert attempts_of(caught.value) == 5
    assert len(servicer.state.calls_to(GET_BALANCE)) == 5


# Item 5: per-attempt timeouts ---------------------------------------------------------------------

CUT = RetryPolicy(
    max_attempts=3, initial_backoff=0.01, max_backoff=0.02, per_attempt_timeout=0.2
)  # DEADLINE_EXCEEDED is not in retryable_codes


@pytest.fixture(params=["channel", "interceptors"])
def sync_stub(request: pytest.FixtureRequest, ledger) -> Iterator[Any]:
    with stub_maker(_target(ledger[1]), request.param, RETRIES_OFF) as make:
        yield make


@pytest.fixture(params=["channel", "interceptors"])
async def aio_stub(request: pytest.FixtureRequest, aio_ledger) -> AsyncIterator[Any]:
    async with aio_stub_maker(_target(aio_ledger[1]), request.param, RETRIES_OFF) as make:
        yield make


def test_an_attempt_cut_by_per_attempt_timeout_is_retried(sync_stub, ledger) -> None:
    servicer = ledger[0]
    stub = sync_stub(retry=CUT, idempotency=IdempotencyKeys())
    servicer.state.faults.add(GET_BALANCE, Fault(code=None, delay=1.0))
    assert stub.GetBalance(BALANCE_REQUEST, timeout=5).account == "alice"
    assert len(servicer.state.calls_to(GET_BALANCE)) == 2


def test_a_servers_deadline_exceeded_is_not_retried(sync_stub, ledger) -> None:
    servicer = ledger[0]
    stub = sync_stub(retry=CUT, idempotency=IdempotencyKeys())
    servicer.state.faults.add(GET_BALANCE, Fault(code=grpc.StatusCode.DEADLINE_EXCEEDED))
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetBalance(BALANCE_REQUEST, timeout=5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert reason_of(caught.value) is Reason.NOT_RETRYABLE_CODE
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1


async def test_aio_an_attempt_cut_by_per_attempt_timeout_is_retried(aio_stub, aio_ledger) -> None:
    servicer = aio_ledger[0]
    stub = aio_stub(retry=CUT, idempotency=IdempotencyKeys())
    servicer.state.faults.add(GET_BALANCE, Fault(code=None, delay=1.0))
    assert (await stub.GetBalance(BALANCE_REQUEST, timeout=5)).account == "alice"
    assert len(servicer.state.calls_to(GET_BALANCE)) == 2


async def test_aio_a_servers_deadline_exceeded_is_not_retried(aio_stub, aio_ledger) -> None:
    servicer = aio_ledger[0]
    stub = aio_stub(retry=CUT, idempotency=IdempotencyKeys())
    servicer.state.faults.add(GET_BALANCE, Fault(code=grpc.StatusCode.DEADLINE_EXCEEDED))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBalance(BALANCE_REQUEST, timeout=5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1


# Item 7: streams commit on headers; the previous-attempts header ---------------------------------


class _HeadersThenFail(SyncLedger):
    """Watch sends its response headers, then fails before any message."""

    def Watch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.state.record(WATCH, context.invocation_metadata())
        context.send_initial_metadata((("x-started", "1"),))
        time.sleep(0.05)
        context.abort(grpc.StatusCode.UNAVAILABLE, "after the headers")
        yield from ()


class _AioHeadersThenFail(AioLedger):
    async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.state.record(WATCH, context.invocation_metadata() or ())
        await context.send_initial_metadata((("x-started", "1"),))
        await asyncio.sleep(0.05)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "after the headers")
        yield ledger_pb2.BalanceReply()  # never reached


def test_a_stream_is_committed_once_its_headers_arrive() -> None:
    server, port, servicer = serve(_HeadersThenFail())
    try:
        with resilient_channel(_target(port), retry=FAST, idempotency=IdempotencyKeys()) as ch:
            call = ledger_pb2_grpc.LedgerStub(ch).Watch(WATCH_REQUEST, timeout=5)
            with pytest.raises(grpc.RpcError) as caught:
                list(call)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert caught.value.details() == "after the headers"
        assert len(servicer.state.calls_to(WATCH)) == 1  # as native gRPC: committed, not retried
    finally:
        server.stop(None)


async def test_aio_a_stream_is_committed_once_its_headers_arrive() -> None:
    server, port, servicer = await serve_aio(_AioHeadersThenFail())
    try:
        async with aio_resilient_channel(
            _target(port), retry=FAST, idempotency=IdempotencyKeys()
        ) as channel:
            call = ledger_pb2_grpc.LedgerStub(channel).Watch(WATCH_REQUEST, timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call:
                    pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(servicer.state.calls_to(WATCH)) == 1
    finally:
        await server.stop(None)


def _previous_attempts(servicer: Any, method: str) -> list[str | None]:
    return [
        next((str(v) for k, v in call.metadata if k == "grpc-previous-rpc-attempts"), None)
        for call in servicer.state.calls_to(method)
    ]


def test_retries_carry_the_previous_attempts_header(sync_stub, ledger) -> None:
    servicer = ledger[0]
    stub = sync_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(GET_BALANCE, 2)
    servicer.state.faults.fail_times(WATCH, 1)
    stub.GetBalance(BALANCE_REQUEST, timeout=5)
    assert len(list(stub.Watch(WATCH_REQUEST, timeout=5))) == 2
    assert _previous_attempts(servicer, GET_BALANCE) == [None, "1", "2"]
    assert _previous_attempts(servicer, WATCH) == [None, "1"]


async def test_aio_retries_carry_the_previous_attempts_header(aio_stub, aio_ledger) -> None:
    servicer = aio_ledger[0]
    stub = aio_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(GET_BALANCE, 2)
    await stub.GetBalance(BALANCE_REQUEST, timeout=5)
    assert _previous_attempts(servicer, GET_BALANCE) == [None, "1", "2"]


# Item 8: accounting ------------------------------------------------------------------------------


def test_calls_refused_by_an_open_breaker_do_not_feed_the_budget(sync_stub, ledger) -> None:
    servicer = ledger[0]
    budget = RetryBudget(ratio=0.1, min_retries_per_second=1.0, window=10.0)
    breaker = CircuitBreaker(fail_max=1, reset_timeout=60, failure_rate=0.0, probe_every=None)
    stub = sync_stub(retry=FAST, budget=budget, breaker=breaker, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(GET_BALANCE, 1)
    with pytest.raises(grpc.RpcError):
        stub.GetBalance(BALANCE_REQUEST, timeout=5)  # one call sent: opens the breaker
    balance = budget.balance
    for _ in range(500):
        with pytest.raises(BreakerOpenError):
            stub.GetBalance(BALANCE_REQUEST, timeout=5)
    assert budget.balance == balance  # 500 refused calls were not traffic


async def test_aio_calls_refused_by_an_open_breaker_do_not_feed_the_budget(
    aio_stub, aio_ledger
) -> None:
    servicer = aio_ledger[0]
    budget = RetryBudget(ratio=0.1, min_retries_per_second=1.0, window=10.0)
    breaker = CircuitBreaker(fail_max=1, reset_timeout=60, failure_rate=0.0, probe_every=None)
    stub = aio_stub(retry=FAST, budget=budget, breaker=breaker, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(GET_BALANCE, 1)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetBalance(BALANCE_REQUEST, timeout=5)
    balance = budget.balance
    for _ in range(500):
        with pytest.raises(BreakerOpenError):
            await stub.GetBalance(BALANCE_REQUEST, timeout=5)
    assert budget.balance == balance


async def test_aio_the_callers_own_short_deadline_does_not_count(aio_stub, aio_ledger) -> None:
    servicer = aio_ledger[0]
    breaker = CircuitBreaker(fail_max=2, reset_timeout=30, failure_rate=0.0)
    stub = aio_stub(breaker=breaker, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(GET_BALANCE, 5, Fault(code=None, delay=0.2))
    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetBalance(BALANCE_REQUEST, timeout=0.05)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    target = breaker.for_target(_target(aio_ledger[1]))
    assert target.state == "closed" and target.circuit.fail_counter == 0


# Item 6: a bounded pushback ------------------------------------------------------------------------

BOUNDED = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02, max_pushback=0.3)


def test_an_hour_of_pushback_waits_only_max_pushback(sync_stub, ledger) -> None:
    servicer = ledger[0]
    stub = sync_stub(retry=BOUNDED, idempotency=IdempotencyKeys())
    servicer.state.faults.add(GET_BALANCE, Fault(pushback_ms="3600000"))
    started = time.monotonic()
    stub.GetBalance(BALANCE_REQUEST)  # no deadline: only max_pushback bounds the wait
    assert time.monotonic() - started < 5.0
    first, second = servicer.state.calls_to(GET_BALANCE)
    assert second.at - first.at >= 0.29


async def test_aio_an_hour_of_pushback_waits_only_max_pushback(aio_stub, aio_ledger) -> None:
    servicer = aio_ledger[0]
    stub = aio_stub(retry=BOUNDED, idempotency=IdempotencyKeys())
    servicer.state.faults.add(GET_BALANCE, Fault(pushback_ms="3600000"))
    await asyncio.wait_for(stub.GetBalance(BALANCE_REQUEST), 5.0)
    first, second = servicer.state.calls_to(GET_BALANCE)
    assert second.at - first.at >= 0.29
