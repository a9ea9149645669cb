"""Review 10: the ``grpc.aio`` calls' cancel paths, against a real ledger server.

Counted: sends handed to gRPC after ``cancel()`` returned, server-side calls, the budget's
balance and the breaker's probe slot; and that what ``cancel()`` returned agrees with what the
awaiting task, ``cancelled()`` and ``code()`` say.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, serve_aio
from resilient_grpc import CircuitBreaker, IdempotencyKeys, RetryBudget, RetryPolicy, telemetry
from resilient_grpc.aio.client import HedgedAioCall, ResilientUnaryCall, resilient_channel
from resilient_grpc.breaker import PROBE, REFUSED
from resilient_grpc.core.hedging import HedgingPolicy
from resilient_grpc.events import CallAbandoned
from resilient_grpc.hedged_call import begin_hedged
from resilient_grpc.logical_call import Attempt, CallArguments, ClientStack
from tests.hedging_fixtures import AioHedgeLedger
from tests.helpers import BALANCE_REQUEST, GatedStorage, until

WAIT = 5.0


@pytest.fixture
async def server() -> AsyncIterator[tuple[AioHedgeLedger, grpc.aio.Channel]]:
    """A ledger whose first attempt of a GetBalance holds (until cancelled); a plain channel."""
    servicer = AioHedgeLedger(hold=WAIT)
    aio_server, port, _ = await serve_aio(servicer)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    servicer.port = port  # type: ignore[attr-defined]
    try:
        yield servicer, channel
    finally:
        await channel.close()
        await aio_server.stop(None)


class _Send:
    """Sends attempts through a real aio channel, counting those sent after ``cancel()``."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._method = channel.unary_unary(
            GET_BALANCE,
            request_serializer=ledger_pb2.BalanceRequest.SerializeToString,
            response_deserializer=ledger_pb2.BalanceReply.FromString,
        )
        self._arguments = CallArguments(BALANCE_REQUEST)
        self.cancel_returned = False
        self.sent: list[int] = []
        self.sent_after_cancel: list[int] = []
        self.calls: dict[int, Any] = {}

    def __call__(self, step: Attempt) -> Any:
        self.sent.append(step.number)
        if self.cancel_returned:
            self.sent_after_cancel.append(step.number)
        call = self._arguments.send(self._method, step)
        self.calls[step.number] = call
        return call


def _calls(servicer: AioHedgeLedger) -> int:
    return len(servicer.state.calls_to(GET_BALANCE))


async def test_a_hedged_aio_call_cancelled_during_a_breaker_round_trip_sends_no_copy(
    server: tuple[AioHedgeLedger, grpc.aio.Channel],
) -> None:
    """cancel() while the hedge timer's event runs in a worker thread (a stalled breaker
    store): the copy that event grants is neither sent nor charged (budget refunded, probe
    slot given back)."""
    servicer, channel = server
    storage = GatedStorage()
    budget = RetryBudget(ratio=1.0, min_retries_per_second=1.0, window=60.0)
    stack = _hedged_stack(storage, budget)
    send = _Send(channel)
    call = HedgedAioCall(begin_hedged(stack, GET_BALANCE, 10.0, None, None), send, False)
    task = asyncio.ensure_future(call._run())
    await until(lambda: _calls(servicer) == 1, "copy 1 on the server")
    balance = budget.balance
    storage.armed = True  # the hedge's admission stalls in the store
    assert await asyncio.to_thread(storage.entered.wait, WAIT)
    assert call.cancel()
    send.cancel_returned = True
    storage.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)
    assert call.cancelled()
    assert await call.code() is grpc.StatusCode.CANCELLED
    assert send.sent_after_cancel == []
    # The task ended at once; the stalled event's thread finishes after the gate opened, and
    # its done-callback then abandons the call, refunding the copy that event granted.
    await until(lambda: budget.balance == balance, "the never-sent copy refunded")
    assert await servicer.cancellations(1) == 1  # copy 1 saw the cancellation
    await asyncio.sleep(0.05)
    assert _calls(servicer) == 1


async def test_a_hedged_aio_call_cancelled_during_its_start_round_trip_sends_nothing(
    server: tuple[AioHedgeLedger, grpc.aio.Channel],
) -> None:
    servicer, channel = server
    storage = GatedStorage()
    stack = _hedged_stack(storage)
    send = _Send(channel)
    call = HedgedAioCall(begin_hedged(stack, GET_BALANCE, 10.0, None, None), send, False)
    storage.armed = True
    task = asyncio.ensure_future(call._run())
    assert await asyncio.to_thread(storage.entered.wait, WAIT)
    assert call.cancel()
    send.cancel_returned = True
    storage.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)
    assert send.sent == []
    await asyncio.sleep(0.05)
    assert _calls(servicer) == 0


def _hedged_stack(storage: GatedStorage, budget: RetryBudget | None = None) -> ClientStack:
    """Two copies 50 ms apart, a breaker kept in ``storage`` (which may stall), keys."""
    return ClientStack.for_channel(
        "127.0.0.1:1",
        hedging=HedgingPolicy(max_attempts=2, delay=0.05),
        budget=budget,
        breaker=CircuitBreaker(storage=lambda _t: storage),
        idempotency=IdempotencyKeys(),
        transport="aio",
    )


def _retry_stack(**kwargs: Any) -> ClientStack:
    return ClientStack.for_channel(
        "127.0.0.1:1",
        retry=RetryPolicy(max_attempts=3, initial_backoff=0.01, jitter="none"),
        idempotency=IdempotencyKeys(),
        transport="aio",
        reconnect_wait=None,
        **kwargs,
    )


async def test_cancel_racing_the_last_answer_agrees_with_what_cancel_returned(
    server: tuple[AioHedgeLedger, grpc.aio.Channel],
) -> None:
    """cancel() as soon as the attempt's call is done: the answer has arrived but the awaiting
    task has not seen it yet. cancel() returned True, so the call is cancelled (as
    RetryingFuture and asyncio do): the awaiting task gets CancelledError, code() is CANCELLED,
    and the breaker records nothing (its probe slot is given back, once)."""
    servicer, channel = server
    servicer.slow_first = False  # every attempt answers at once
    breaker = CircuitBreaker(fail_max=1, reset_timeout=0.05, probe_every=None)
    stack = _retry_stack(breaker=breaker)
    target = stack.target_breaker
    assert target is not None
    target.circuit.open()
    await asyncio.sleep(0.1)  # half-open: the call is the probe
    send = _Send(channel)
    call = ResilientUnaryCall(stack.begin(GET_BALANCE, 10.0, None, None), send, False)
    task = asyncio.ensure_future(call._run())
    await until(lambda: 1 in send.calls, "attempt 1 sent")
    returned: list[bool] = []
    for _ in range(100_000):  # spin on the loop: cancel as soon as the answer is in
        if send.calls[1].done():
            returned.append(call.cancel())
            break
        await asyncio.sleep(0)
    outcome: Any
    try:
        outcome = await asyncio.wait_for(task, WAIT)
    except asyncio.CancelledError as error:
        outcome = error
    assert returned, "the answer arrived"
    if returned[0]:
        assert isinstance(outcome, asyncio.CancelledError), "cancel() returned True"
        assert call.cancelled()
        assert await call.code() is grpc.StatusCode.CANCELLED
        assert target.state == "half-open"  # nothing recorded...
        other = target.admit()
        assert other is PROBE  # ... and the slot given back
        assert target.admit() is REFUSED  # once
        target.release(other)
    else:
        assert isinstance(outcome, ledger_pb2.BalanceReply)
        assert not call.cancelled()
        assert await call.code() is grpc.StatusCode.OK
        assert target.state == "closed"


async def test_wait_for_on_code_cancels_the_call_it_started_and_charges_nothing(
    server: tuple[AioHedgeLedger, grpc.aio.Channel],
) -> None:
    """A status reader (await call.code()) under asyncio.wait_for: when it times out, the call
    it started is cancelled (the server sees it), its task ends, nothing more is sent, and a
    second reader then reads CANCELLED at once."""
    servicer, channel = server
    budget = RetryBudget(ratio=1.0, min_retries_per_second=1.0, window=60.0)
    stack = _retry_stack(budget=budget)
    send = _Send(channel)
    call = ResilientUnaryCall(stack.begin(GET_BALANCE, 10.0, None, None), send, False)
    balance = budget.balance
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(call.code(), 0.2)
    assert call.done() and call.cancelled()
    assert call._task is not None and call._task.done()
    assert await asyncio.wait_for(call.code(), WAIT) is grpc.StatusCode.CANCELLED
    assert await servicer.cancellations(1) == 1
    send.cancel_returned = True
    await asyncio.sleep(0.1)
    assert send.sent == [1] and _calls(servicer) == 1
    assert budget.balance == balance + 1.0  # the call's deposit only


async def test_a_hedged_aio_call_whose_task_is_cancelled_during_a_hedges_round_trip_refunds_it(
    server: tuple[AioHedgeLedger, grpc.aio.Channel],
) -> None:
    """The awaiting task itself is cancelled (asyncio.wait_for) while the hedge timer's event
    runs in a worker thread: the task ends at once (the store stalls), the copy that event
    grants is lost with the cancellation, never sent, and once the event is over (the store
    answered) its withdrawal is refunded and its admission given back."""
    servicer, channel = server
    storage = GatedStorage()
    budget = RetryBudget(ratio=1.0, min_retries_per_second=1.0, window=60.0)
    stack = _hedged_stack(storage, budget)
    send = _Send(channel)
    with telemetry.capture() as recorder:
        call = HedgedAioCall(begin_hedged(stack, GET_BALANCE, 10.0, None, None), send, False)
    task = asyncio.ensure_future(call._run())
    await until(lambda: _calls(servicer) == 1, "copy 1 on the server")
    balance = budget.balance
    storage.armed = True
    assert await asyncio.to_thread(storage.entered.wait, WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1.0)  # at once: it does not wait for the stalled store
    assert not any(isinstance(e, CallAbandoned) for e in recorder.events)  # not yet
    storage.gate.set()  # the event runs on: it grants copy 2 (a withdrawal), then is abandoned
    await until(lambda: any(isinstance(e, CallAbandoned) for e in recorder.events), "abandoned")
    assert send.sent == [1]
    assert budget.balance == balance, "the copy never sent was charged to the budget"
    assert await servicer.cancellations(1) == 1


@pytest.mark.parametrize("kind", ["unary", "hedged", "stream"])
async def test_a_call_cancelled_before_it_starts_is_done_and_runs_its_callbacks(
    server: tuple[AioHedgeLedger, grpc.aio.Channel], kind: str
) -> None:
    """grpc.aio: a cancelled call is done and its done callbacks run, awaited or not. A call
    of the resilient channel cancelled before anything awaited it must be too (else a
    callback waiting for its end never runs, and cancel() keeps returning True)."""
    servicer, _channel = server
    port = servicer.port  # type: ignore[attr-defined]
    budget = RetryBudget(ratio=1.0, min_retries_per_second=1.0, window=60.0)
    stack: dict[str, Any] = {"budget": budget, "idempotency": IdempotencyKeys()}
    if kind == "hedged":
        stack["hedging"] = HedgingPolicy(max_attempts=2, delay=0.05)
    else:
        stack["retry"] = RetryPolicy(max_attempts=3)
    async with resilient_channel(f"127.0.0.1:{port}", **stack) as resilient:
        stub = ledger_pb2_grpc.LedgerStub(resilient)
        if kind == "stream":
            call: Any = stub.Watch(ledger_pb2.WatchRequest(account="alice", count=2))
        else:
            call = stub.GetBalance(BALANCE_REQUEST)
        seen: list[object] = []
        call.add_done_callback(seen.append)
        assert call.cancel() is True
        await asyncio.sleep(0.05)
        assert call.done() and call.cancelled()
        assert seen == [call]
        assert call.cancel() is False
        assert await asyncio.wait_for(call.code(), WAIT) is grpc.StatusCode.CANCELLED
        call.add_done_callback(seen.append)  # after the end: at once
        assert seen == [call, call]
    assert _calls(servicer) == 0 and len(servicer.state.calls_to("/ledger.v1.Ledger/Watch")) == 0
    assert budget.balance == 60.0  # no deposit: nothing was sent
