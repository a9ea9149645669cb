"""Cancelling a ``grpc.aio`` call stops it at once in every state (issue 9, item 1).

Each test counts what the server received and what the budget and the breaker were charged:
the call is cancelled in flight, during a backoff pause, while waiting for a reconnect, and when
it was started by ``await call.code()`` under ``asyncio.wait_for``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, WATCH, AioLedger, Fault, serve_aio
from resilient_grpc import CircuitBreaker, IdempotencyKeys, RetryBudget, RetryPolicy
from resilient_grpc.aio.client import resilient_channel
from tests.helpers import BALANCE_REQUEST, RETRIES_OFF, aio_stub_maker, until

#: A long, fixed backoff: a cancellation lands inside it; a retry after it would be seen.
SLOW_RETRIES = RetryPolicy(
    max_attempts=5, initial_backoff=0.6, max_backoff=0.6, multiplier=1.0, jitter="none"
)


class Stack:
    """A budget that starts empty but for the calls made, and a breaker counting every failure."""

    def __init__(self) -> None:
        self.budget = RetryBudget(ratio=1.0, min_retries_per_second=0.0, window=60.0)
        self.breaker = CircuitBreaker(fail_max=100, reset_timeout=30, failure_rate=0.0)

    def kwargs(self) -> dict[str, object]:
        return {
            "retry": SLOW_RETRIES,
            "budget": self.budget,
            "breaker": self.breaker,
            "idempotency": IdempotencyKeys(),
        }

    def failures(self, target: str) -> int:
        return int(self.breaker.for_target(target).circuit.fail_counter)


@pytest.fixture(params=["channel", "interceptors"])
async def stub_and_stack(
    request: pytest.FixtureRequest, aio_ledger: tuple[AioLedger, int]
) -> AsyncIterator[tuple[ledger_pb2_grpc.LedgerStub, Stack, str]]:
    target = f"127.0.0.1:{aio_ledger[1]}"
    stack = Stack()
    async with aio_stub_maker(target, request.param, RETRIES_OFF) as make:
        yield make(**stack.kwargs()), stack, target


async def _await(call: object) -> object:
    return await call  # type: ignore[misc]


async def test_cancel_during_backoff(stub_and_stack, aio_ledger) -> None:
    stub, stack, target = stub_and_stack
    servicer = aio_ledger[0]
    servicer.state.faults.fail_times(GET_BALANCE, 10)
    call = stub.GetBalance(BALANCE_REQUEST)
    task = asyncio.ensure_future(_await(call))
    await until(lambda: len(servicer.state.calls_to(GET_BALANCE)) == 1)
    await asyncio.sleep(0.1)  # the first attempt failed: the call is in its 0.6 s backoff

    assert call.cancel() is True
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 0.3)  # at once, not after the backoff
    await asyncio.sleep(0.8)  # past the backoff: a retry would have reached the server

    assert len(servicer.state.calls_to(GET_BALANCE)) == 1
    assert stack.budget.balance == 1.0  # one call deposited; the unsent retry was refunded
    assert stack.failures(target) == 1  # the one real failure, nothing for the cancellation
    assert call.cancelled() and call.done()
    assert await call.code() == grpc.StatusCode.CANCELLED


async def test_cancel_in_flight(stub_and_stack, aio_ledger) -> None:
    stub, stack, target = stub_and_stack
    servicer = aio_ledger[0]
    servicer.state.faults.add(GET_BALANCE, Fault(code=None, delay=2.0))
    call = stub.GetBalance(BALANCE_REQUEST)
    task = asyncio.ensure_future(_await(call))
    await until(lambda: len(servicer.state.calls_to(GET_BALANCE)) == 1)

    assert call.cancel() is True
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1.0)
    await asyncio.sleep(0.8)

    assert len(servicer.state.calls_to(GET_BALANCE)) == 1
    assert stack.failures(target) == 0  # a cancellation is not a backend failure
    assert stack.breaker.for_target(target).state == "closed"
    assert stack.budget.balance == 1.0


async def test_a_wait_for_timeout_on_code_leaves_no_task_and_sends_nothing_more(
    stub_and_stack, aio_ledger
) -> None:
    stub, stack, target = stub_and_stack
    servicer = aio_ledger[0]
    servicer.state.faults.fail_times(GET_BALANCE, 10)
    before = asyncio.all_tasks()
    call = stub.GetBalance(BALANCE_REQUEST)

    try:  # starts the call; gives up during its backoff
        code = await asyncio.wait_for(call.code(), 0.3)
    except asyncio.TimeoutError:
        code = None
    # grpc.aio's own intercepted call answers a cancelled code() with CANCELLED instead
    assert code in (None, grpc.StatusCode.CANCELLED)
    await asyncio.sleep(0.8)

    client_tasks = {t for t in asyncio.all_tasks() - before if "AioServer" not in repr(t)}
    assert client_tasks == set()  # nothing of the call survived (the server's tasks aside)
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1
    assert stack.budget.balance == 1.0
    assert stack.failures(target) == 1


async def test_cancel_while_waiting_for_a_reconnect() -> None:
    server, port, _ = await serve_aio()
    target = f"127.0.0.1:{port}"
    stack = Stack()
    fast = RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=0.01, jitter="none")
    channel = resilient_channel(
        target,
        retry=fast,
        budget=stack.budget,
        breaker=stack.breaker,
        idempotency=IdempotencyKeys(),
        reconnect_wait=30.0,
        options=[
            ("grpc.initial_reconnect_backoff_ms", 20_000),
            ("grpc.min_reconnect_backoff_ms", 20_000),
        ],
    )
    try:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        await stub.GetBalance(BALANCE_REQUEST, timeout=5)
        await server.stop(None)  # the connection drops; nothing listens any more
        call = stub.GetBalance(BALANCE_REQUEST)
        task = asyncio.ensure_future(_await(call))
        await asyncio.sleep(0.5)  # the attempt failed; the retry waits for a reconnect
        assert not task.done()

        assert call.cancel() is True
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 1.0)
        assert call.cancelled()
        assert stack.budget.balance == 2.0  # two calls sent; the waiting retry was refunded
        assert stack.failures(target) == 1  # the attempt that met the dropped connection
    finally:
        await channel.close()


async def test_a_stream_cancelled_during_backoff_stops_at_once(stub_and_stack, aio_ledger) -> None:
    stub, stack, _ = stub_and_stack
    servicer = aio_ledger[0]
    servicer.state.faults.fail_times(WATCH, 10)
    call = stub.Watch(ledger_pb2.WatchRequest(account="alice", count=2))

    async def read() -> list[object]:
        return [message async for message in call]

    task = asyncio.ensure_future(read())
    await until(lambda: len(servicer.state.calls_to(WATCH)) == 1)
    await asyncio.sleep(0.1)

    assert call.cancel() is True
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 0.3)
    await asyncio.sleep(0.8)
    assert len(servicer.state.calls_to(WATCH)) == 1
    assert stack.budget.balance == 1.0
    assert call.cancelled()
    assert await call.code() == grpc.StatusCode.CANCELLED
