"""Adversarial review 9: cancelling ``grpc.aio`` calls at every await point (issue 9, item 1).

Each attack counts effects, not answers: the attempts the server received (and whether it saw
a cancellation), the retry budget's balance, the breaker's failure counter, and the throttle's
``(requests, accepts)`` counts, which move whenever the driver records an attempt's outcome:
a cancelled call must leave all of them as its last real attempt left them. Calls go through
``resilient_channel`` and through ``client_interceptors`` on a real loopback server.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, WATCH, AioLedger, Fault, serve_aio
from resilient_grpc import (
    CircuitBreaker,
    HedgingPolicy,
    RetryPolicy,
)
from resilient_grpc.aio.client import client_interceptors, resilient_channel
from tests.counted_stack import WATCH_REQUEST, Stack
from tests.helpers import BALANCE_REQUEST


class Setup:
    def __init__(self, servicer: AioLedger, target: str, how: str) -> None:
        self.servicer = servicer
        self.target = target
        self.how = how
        self.channels: list[grpc.aio.Channel] = []

    def stub(self, stack: Stack) -> ledger_pb2_grpc.LedgerStub:
        if self.how == "channel":
            channel = resilient_channel(self.target, **stack.kwargs())
        else:
            channel = grpc.aio.insecure_channel(
                self.target,
                options=[("grpc.enable_retries", 0)],
                interceptors=client_interceptors(target=self.target, **stack.kwargs()),
            )
        self.channels.append(channel)
        return ledger_pb2_grpc.LedgerStub(channel)

    def calls(self, method: str = GET_BALANCE) -> int:
        return len(self.servicer.state.calls_to(method))


@pytest.fixture(params=["channel", "interceptors"])
async def setup(request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    server, port, servicer = await serve_aio()
    it = Setup(servicer, f"127.0.0.1:{port}", request.param)
    yield it
    for channel in it.channels:
        await channel.close()
    await server.stop(None)


@pytest.fixture
async def channel_setup() -> AsyncIterator[Setup]:
    server, port, servicer = await serve_aio()
    it = Setup(servicer, f"127.0.0.1:{port}", "channel")
    yield it
    for channel in it.channels:
        await channel.close()
    await server.stop(None)


async def _until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def _await(call: Any) -> Any:
    return await call


class LoopErrors:
    """Collects what the loop reports: destroyed pending tasks, never-retrieved exceptions."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.seen.append(context)

    async def check(self) -> None:
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0)
        messages = [str(context.get("message")) for context in self.seen]
        assert messages == []


@pytest.fixture
async def loop_errors() -> LoopErrors:
    errors = LoopErrors()
    asyncio.get_running_loop().set_exception_handler(errors)
    return errors


def _client_tasks(before: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    current = asyncio.current_task()
    return {
        task
        for task in asyncio.all_tasks() - before
        if task is not current and "AioServer" not in repr(task) and "_handle_" not in repr(task)
    }


# Before the call starts -----------------------------------------------------------------------


async def test_a_call_cancelled_before_it_starts_is_not_traffic(channel_setup: Setup) -> None:
    stack = Stack()
    stub = channel_setup.stub(stack)
    before = stack.budget.balance
    call = stub.GetBalance(BALANCE_REQUEST)
    assert call.cancel() is True
    with pytest.raises(asyncio.CancelledError):
        await call
    assert channel_setup.calls() == 0
    assert stack.budget.balance == before  # nothing was sent: no deposit


async def test_a_stream_cancelled_before_its_first_read_is_not_traffic(
    channel_setup: Setup,
) -> None:
    stack = Stack()
    stub = channel_setup.stub(stack)
    call = stub.Watch(WATCH_REQUEST)
    assert call.cancel() is True
    with pytest.raises(asyncio.CancelledError):
        await call.read()
    assert channel_setup.calls(WATCH) == 0
    assert stack.budget.balance == 0.0


async def test_a_call_cancelled_before_it_starts_does_not_take_the_probe_slot(
    channel_setup: Setup,
) -> None:
    stack = Stack()
    stack.breaker = CircuitBreaker(
        fail_max=1, reset_timeout=0.2, failure_rate=0.0, probe_every=None
    )
    stub = channel_setup.stub(stack)
    channel_setup.servicer.state.faults.fail_times(GET_BALANCE, 1)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetBalance(BALANCE_REQUEST, timeout=5)  # opens the breaker
    await asyncio.sleep(0.3)  # past reset_timeout: the next admission is the probe
    call = stub.GetBalance(BALANCE_REQUEST)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # the probe slot was given back: the next call is the probe, and it closes the breaker
    assert (await stub.GetBalance(BALANCE_REQUEST, timeout=5)).account == "alice"
    assert stack.breaker.for_target(channel_setup.target).state == "closed"
    assert channel_setup.calls() == 2


# During a backoff pause ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reader", ["await", "code", "initial_metadata", "trailing_metadata", "details"]
)
async def test_a_wait_for_timeout_during_backoff_stops_the_call(
    setup: Setup, reader: str, loop_errors: LoopErrors
) -> None:
    stack = Stack()
    stub = setup.stub(stack)
    setup.servicer.state.faults.fail_times(GET_BALANCE, 10)
    before_tasks = asyncio.all_tasks()
    call = stub.GetBalance(BALANCE_REQUEST)
    awaitable = call if reader == "await" else getattr(call, reader)()
    balance = stack.budget.balance
    try:
        await asyncio.wait_for(_await(awaitable), 0.3)  # lands in the 0.6 s backoff
    except asyncio.TimeoutError:
        pass
    else:  # grpc.aio's intercepted call answers a cancelled status read instead of raising
        assert setup.how == "interceptors" and reader != "await"
    await asyncio.sleep(0.7)  # past the backoff: a retry would have reached the server

    assert setup.calls() == 1
    assert stack.budget.balance == balance + 1  # the call's deposit; the unsent retry refunded
    assert stack.failures(setup.target) == 1
    assert stack.throttle.counts == (1, 0)  # one refusal recorded, nothing for the cancellation
    assert _client_tasks(before_tasks) == set()
    await loop_errors.check()


async def test_cancel_in_every_state_records_nothing_for_the_cancellation(
    setup: Setup, loop_errors: LoopErrors
) -> None:
    """In flight (the server holds the attempt), the server sees the cancellation."""
    stack = Stack()
    stub = setup.stub(stack)
    setup.servicer.state.faults.add(GET_BALANCE, Fault(code=None, delay=1.0))
    call = stub.GetBalance(BALANCE_REQUEST)
    task = asyncio.ensure_future(_await(call))
    await _until(lambda: setup.calls() == 1)
    assert call.cancel() is True
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 0.5)
    await asyncio.sleep(0.2)
    assert setup.calls() == 1
    assert stack.throttle.counts == (0, 0)  # the cancelled attempt's outcome is not recorded
    assert stack.failures(setup.target) == 0
    assert stack.budget.balance == 1.0
    assert call.cancel() is False  # over
    await loop_errors.check()


async def test_a_status_reader_timing_out_does_not_cancel_a_call_another_task_awaits(
    channel_setup: Setup,
) -> None:
    stack = Stack(
        retry=RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=0.2, jitter="none")
    )
    stub = channel_setup.stub(stack)
    channel_setup.servicer.state.faults.fail_times(GET_BALANCE, 1)
    call = stub.GetBalance(BALANCE_REQUEST)
    code = asyncio.ensure_future(call.code())  # starts the call in a task of its own
    await asyncio.sleep(0)
    waiter = asyncio.ensure_future(_await(call))  # a second task waits for the answer
    await asyncio.sleep(0.05)
    code.cancel()  # the status reader goes away (say, its wait_for timed out)
    with pytest.raises(asyncio.CancelledError):
        await code
    reply = await asyncio.wait_for(waiter, 2.0)
    assert reply.account == "alice"
    assert channel_setup.calls() == 2


# Streams ---------------------------------------------------------------------------------------


class _HoldBeforeHeaders(AioLedger):
    """Watch holds its first attempt before any header until the client cancels it."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = 0

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.state.record(WATCH, context.invocation_metadata() or ())
        try:
            await asyncio.sleep(3.0)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        yield ledger_pb2.BalanceReply(account="alice")


@pytest.fixture(params=["channel", "interceptors"])
async def hold_setup(request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    servicer = _HoldBeforeHeaders()
    server, port, _ = await serve_aio(servicer)
    it = Setup(servicer, f"127.0.0.1:{port}", request.param)
    yield it
    for channel in it.channels:
        await channel.close()
    await server.stop(None)


async def _first(call: Any) -> Any:
    async for message in call:
        return message
    return None


@pytest.mark.parametrize(
    "how",
    [
        "cancel",
        "wait_for",
    ],
)
async def test_a_stream_stopped_before_it_commits_is_cancelled_on_the_server(
    hold_setup: Setup, how: str, loop_errors: LoopErrors
) -> None:
    stack = Stack()
    stub = hold_setup.stub(stack)
    servicer = hold_setup.servicer
    assert isinstance(servicer, _HoldBeforeHeaders)
    call = stub.Watch(WATCH_REQUEST)
    task = asyncio.ensure_future(_first(call))
    await _until(lambda: hold_setup.calls(WATCH) == 1)
    if how == "cancel":
        assert call.cancel() is True
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 0.5)
    else:
        task.cancel()  # what asyncio.wait_for does to the reading task when it times out
        with pytest.raises(asyncio.CancelledError):
            await task
    await _until(lambda: servicer.cancelled == 1, 1.0)  # the server saw the cancellation
    await asyncio.sleep(0.1)
    assert hold_setup.calls(WATCH) == 1
    assert stack.throttle.counts == (0, 0)
    assert stack.failures(hold_setup.target) == 0
    assert stack.budget.balance == 1.0
    await loop_errors.check()


async def test_the_throttle_probe_sees_stream_attempts(setup: Setup) -> None:
    """The probe the stream tests rely on: a stream's attempts are recorded in the throttle."""
    stack = Stack()
    stub = setup.stub(stack)
    setup.servicer.state.faults.fail_times(WATCH, 1)
    call = stub.Watch(WATCH_REQUEST)
    messages = [message async for message in call]
    assert len(messages) == 2  # sanity: one failure, then the retry committed
    assert stack.throttle.counts == (2, 1)


# Hedged calls ------------------------------------------------------------------------------------

HEDGE = HedgingPolicy(max_attempts=3, delay=0.3)


class _Slow(AioLedger):
    """GetBalance holds every attempt until it is cancelled (counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = 0

    async def GetBalance(self, request: Any, context: Any) -> Any:
        self.state.record(GET_BALANCE, context.invocation_metadata() or ())
        try:
            await asyncio.sleep(3.0)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return ledger_pb2.BalanceReply(account=request.account)


@pytest.fixture(params=["channel", "interceptors"])
async def slow_setup(request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    servicer = _Slow()
    server, port, _ = await serve_aio(servicer)
    it = Setup(servicer, f"127.0.0.1:{port}", request.param)
    yield it
    for channel in it.channels:
        await channel.close()
    await server.stop(None)


@pytest.mark.parametrize("copies", [1, 2])
async def test_a_hedged_call_cancelled_during_the_hedge_delay_sends_nothing_more(
    slow_setup: Setup, copies: int, loop_errors: LoopErrors
) -> None:
    stack = Stack(retry=None, hedging=HEDGE)
    stub = slow_setup.stub(stack)
    servicer = slow_setup.servicer
    assert isinstance(servicer, _Slow)
    before_tasks = asyncio.all_tasks()
    call = stub.GetBalance(BALANCE_REQUEST)
    task = asyncio.ensure_future(_await(call))
    await _until(lambda: slow_setup.calls() == copies)
    await asyncio.sleep(0.1)  # inside the next hedge delay
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _until(lambda: servicer.cancelled == copies, 1.0)  # every copy cancelled
    await asyncio.sleep(0.4)  # past the next hedge delay
    assert slow_setup.calls() == copies
    assert stack.throttle.counts == (0, 0)
    assert stack.failures(slow_setup.target) == 0
    # one deposit for the call; each copy after the first was a (sent) withdrawal
    assert stack.budget.balance == 1.0 - (copies - 1)
    assert _client_tasks(before_tasks) == set()
    await loop_errors.check()


async def test_a_hedged_call_cancelled_before_it_starts_sends_nothing(
    channel_setup: Setup,
) -> None:
    stack = Stack(retry=None, hedging=HedgingPolicy(max_attempts=2, delay=0.05))
    stub = channel_setup.stub(stack)
    call = stub.GetBalance(BALANCE_REQUEST)
    assert call.cancel() is True
    with contextlib.suppress(asyncio.CancelledError):  # what it must raise
        await asyncio.wait_for(_await(call), 2.0)
    assert channel_setup.calls() == 0
    assert call.cancelled()


async def test_a_hedged_call_whose_status_reader_times_out_is_cancelled_everywhere(
    slow_setup: Setup, loop_errors: LoopErrors
) -> None:
    stack = Stack(retry=None, hedging=HedgingPolicy(max_attempts=3, delay=0.1))
    stub = slow_setup.stub(stack)
    servicer = slow_setup.servicer
    assert isinstance(servicer, _Slow)
    before_tasks = asyncio.all_tasks()
    call = stub.GetBalance(BALANCE_REQUEST)
    with contextlib.suppress(asyncio.TimeoutError):  # two copies are out when it gives up
        await asyncio.wait_for(call.code(), 0.15)
    await _until(lambda: servicer.cancelled == 2, 1.0)
    await asyncio.sleep(0.2)  # past the third copy's time
    assert slow_setup.calls() == 2
    assert stack.throttle.counts == (0, 0)
    assert _client_tasks(before_tasks) == set()
    await loop_errors.check()


async def test_done_callbacks_run_once_when_a_call_is_cancelled_in_backoff(
    channel_setup: Setup,
) -> None:
    stack = Stack()
    stub = channel_setup.stub(stack)
    channel_setup.servicer.state.faults.fail_times(GET_BALANCE, 10)
    seen: list[object] = []
    call = stub.GetBalance(BALANCE_REQUEST)
    call.add_done_callback(seen.append)
    task = asyncio.ensure_future(_await(call))
    await _until(lambda: channel_setup.calls() == 1)
    assert call.cancel() is True
    assert call.cancel() is False or not call.done()
    with pytest.raises(asyncio.CancelledError):
        await task
    call.add_done_callback(seen.append)  # after the end: at once
    assert seen == [call, call]
    assert call.done() and call.cancelled()


async def test_an_intercepted_call_cancelled_before_it_starts_is_not_traffic() -> None:
    """Through ``client_interceptors`` grpc.aio cancels the interceptor task before it runs
    (the ``resilient_channel`` version is above)."""
    server, port, servicer = await serve_aio()
    setup = Setup(servicer, f"127.0.0.1:{port}", "interceptors")
    try:
        await _cancelled_before_start(setup)
    finally:
        for channel in setup.channels:
            await channel.close()
        await server.stop(None)


async def _cancelled_before_start(setup: Setup) -> None:
    stack = Stack()
    stub = setup.stub(stack)
    call = stub.GetBalance(BALANCE_REQUEST)
    assert call.cancel() is True
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.sleep(0.1)
    assert setup.calls() == 0
    assert stack.budget.balance == 0.0
