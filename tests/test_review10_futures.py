"""Review 10: the sync futures' cancel/result/callback ordering, against a real ledger server.

Each test counts effects (sends handed to gRPC after ``cancel()`` returned, server-side calls,
budget balance, the breaker's probe slot, callbacks run), not answers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pybreaker
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, WATCH, SyncLedger, serve
from resilient_grpc import CircuitBreaker, IdempotencyKeys, RetryBudget, RetryPolicy
from resilient_grpc.breaker import PROBE, REFUSED
from resilient_grpc.client import HedgedFuture, RetryingFuture, resilient_channel
from resilient_grpc.core.hedging import HedgingPolicy
from resilient_grpc.hedged_call import begin_hedged
from resilient_grpc.logical_call import Attempt, CallArguments, ClientStack
from tests.hedging_fixtures import attempt_number
from tests.helpers import BALANCE_REQUEST, GatedStorage, wait_for

WAIT = 5.0  # the bound of every wait on the server or a gate


class _Scripted(SyncLedger):
    """GetBalance: attempt 1 waits for ``release_first`` then fails UNAVAILABLE (or answers OK
    with ``first_ok``); later attempts hold until the client cancels them (bounded)."""

    def __init__(self) -> None:
        super().__init__()
        self.release_first = threading.Event()
        self.first_ok = False
        self.cancelled = 0
        self._lock = threading.Lock()

    def GetBalance(
        self, request: ledger_pb2.BalanceRequest, context: grpc.ServicerContext
    ) -> ledger_pb2.BalanceReply:
        self.state.record(GET_BALANCE, context.invocation_metadata())
        if attempt_number(context.invocation_metadata()) == 1:
            assert self.release_first.wait(WAIT)
            if self.first_ok:
                return self.state.balance(request.account)
            context.abort(grpc.StatusCode.UNAVAILABLE, "first replica down")
        gone = threading.Event()
        context.add_callback(gone.set)
        if gone.wait(WAIT) and not context.is_active():
            with self._lock:
                self.cancelled += 1
        return self.state.balance(request.account)

    def calls(self) -> int:
        return len(self.state.calls_to(GET_BALANCE))


@pytest.fixture
def scripted() -> Iterator[tuple[_Scripted, grpc.Channel]]:
    servicer = _Scripted()
    server, port, _ = serve(servicer)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield servicer, channel
    finally:
        servicer.release_first.set()
        channel.close()
        server.stop(None)


class _GatedSend:
    """Sends attempts through a real channel; the send of attempt ``gated`` waits for
    ``gate`` (``entered`` is set first). Counts the sends handed to gRPC after ``cancel()``."""

    def __init__(self, channel: grpc.Channel, gated: int | None) -> None:
        method = channel.unary_unary(
            GET_BALANCE,
            request_serializer=ledger_pb2.BalanceRequest.SerializeToString,
            response_deserializer=ledger_pb2.BalanceReply.FromString,
        )
        self._arguments = CallArguments(BALANCE_REQUEST)
        self._future = method.future
        self.gated = gated
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.cancel_returned = False
        self.sent_after_cancel: list[int] = []
        self.outcomes: dict[int, Any] = {}

    def __call__(self, step: Attempt) -> Any:
        if step.number == self.gated:
            self.entered.set()
            assert self.gate.wait(WAIT)
        if self.cancel_returned:
            self.sent_after_cancel.append(step.number)
        outcome = self._arguments.send(self._future, step)
        self.outcomes[step.number] = outcome
        return outcome


def _budget() -> RetryBudget:
    return RetryBudget(ratio=1.0, min_retries_per_second=1.0, window=60.0)


def test_a_hedged_future_cancelled_while_an_event_is_handled_sends_nothing_after(
    scripted: tuple[_Scripted, grpc.Channel],
) -> None:
    """cancel() returns while another thread handles an event (it sends a latency hedge);
    the answer of copy 1 (a non-fatal failure) is queued behind it. Handling that answer
    after the cancel must not send a failure copy: cancel() said the call is over."""
    servicer, channel = scripted
    budget = _budget()
    stack = ClientStack.for_channel(
        "127.0.0.1:1",
        hedging=HedgingPolicy(max_attempts=3, delay=0.05),
        budget=budget,
        idempotency=IdempotencyKeys(),
    )
    send = _GatedSend(channel, gated=2)
    future = HedgedFuture(begin_hedged(stack, GET_BALANCE, 10.0, None, None), send)._begin()
    assert send.entered.wait(WAIT)  # the timer thread is sending the latency hedge (copy 2)
    balance = budget.balance
    servicer.release_first.set()  # copy 1 fails: its answer is queued behind the send
    wait_for(lambda: 1 in send.outcomes and send.outcomes[1].done(), "copy 1 answered")
    wait_for(lambda: len(future._events) == 1, "copy 1's answer queued")
    assert future.cancel()
    send.cancel_returned = True
    send.gate.set()  # the hedge in progress goes out (then is cancelled)
    with pytest.raises(grpc.FutureCancelledError):
        future.result(timeout=WAIT)
    wait_for(lambda: not future._pumping, "the events handled")
    assert send.sent_after_cancel == [2]  # only the send that was under way
    assert budget.balance == balance  # no failure copy withdrew after the cancel
    wait_for(lambda: send.outcomes[2].done(), "copy 2 ended")
    assert send.outcomes[2].cancelled()
    time.sleep(0.1)
    assert servicer.calls() <= 2


def test_a_hedged_future_cancelled_while_a_hedge_timer_is_queued_sends_nothing_after(
    scripted: tuple[_Scripted, grpc.Channel],
) -> None:
    """The same with the hedge timer's event queued behind the event being handled."""
    servicer, channel = scripted
    budget = _budget()
    stack = ClientStack.for_channel(
        "127.0.0.1:1",
        hedging=HedgingPolicy(max_attempts=3, delay=0.05),
        budget=budget,
        idempotency=IdempotencyKeys(),
    )
    send = _GatedSend(channel, gated=2)
    future = HedgedFuture(begin_hedged(stack, GET_BALANCE, 10.0, None, None), send)._begin()
    assert send.entered.wait(WAIT)  # the timer thread sends copy 2, in _apply
    future._on_timer()  # the next hedge timer fires meanwhile (what the timer thread does)
    assert len(future._events) == 1
    time.sleep(0.1)  # past copy 3's hedge delay: it is due when the timer event is handled
    assert future.cancel()
    send.cancel_returned = True
    balance = budget.balance
    send.gate.set()
    with pytest.raises(grpc.FutureCancelledError):
        future.result(timeout=WAIT)
    wait_for(lambda: not future._pumping, "the events handled")
    assert send.sent_after_cancel == [2]
    assert budget.balance == balance
    wait_for(lambda: send.outcomes[2].done(), "copy 2 ended")
    assert send.outcomes[2].cancelled()
    time.sleep(0.1)
    assert servicer.calls() <= 2


def _retrying(
    channel: grpc.Channel, stack: ClientStack, gated: int | None = None
) -> tuple[RetryingFuture, _GatedSend]:
    send = _GatedSend(channel, gated)
    call = stack.begin(GET_BALANCE, 10.0, None, None)
    return RetryingFuture(call, send)._start(), send


def test_callbacks_run_once_whatever_ends_the_future(
    scripted: tuple[_Scripted, grpc.Channel],
) -> None:
    """A success racing cancel(): every done callback runs exactly once, a callback added
    after the end runs at once, and result()/cancelled() agree with what cancel() returned."""
    servicer, channel = scripted
    servicer.first_ok = True
    stack = ClientStack.for_channel("127.0.0.1:1", retry=RetryPolicy(max_attempts=2))
    for spin in range(10):
        _race_success_and_cancel(servicer, channel, stack, spin)


def _race_success_and_cancel(
    servicer: _Scripted, channel: grpc.Channel, stack: ClientStack, spin: int
) -> None:
    future, _send = _retrying(channel, stack)
    runs: list[str] = []
    future.add_done_callback(lambda _f: runs.append("a"))
    assert future.add_callback(lambda: runs.append("b"))
    servicer.release_first.set()
    time.sleep(spin * 0.001)  # from cancel winning to the answer winning
    cancelled = future.cancel()
    if cancelled:
        with pytest.raises(grpc.FutureCancelledError):
            future.result(timeout=WAIT)
        assert future.code() is grpc.StatusCode.CANCELLED
    else:
        assert future.result(timeout=WAIT).balance >= 0
        assert future.code() is grpc.StatusCode.OK
    assert future.cancelled() is cancelled
    wait_for(lambda: len(runs) >= 2, "the callbacks ran")
    future.add_done_callback(lambda _f: runs.append("late"))
    assert not future.add_callback(lambda: runs.append("never"))
    assert not future.cancel()
    time.sleep(0.02)
    assert sorted(runs) == ["a", "b", "late"]
    servicer.release_first.clear()


def test_a_retrying_future_cancelled_mid_send_frees_its_probe_once(
    scripted: tuple[_Scripted, grpc.Channel],
) -> None:
    """cancel() while the retry's send is under way: that send goes out and is cancelled; the
    breaker's probe slot it took is given back once (not twice: another call's probe stays)."""
    servicer, channel = scripted
    breaker = CircuitBreaker(
        fail_max=1,
        reset_timeout=0.05,
        probe_every=None,
        success_threshold=5,
        codes=("INTERNAL",),
        storage=lambda _t: _Shared(pybreaker.STATE_CLOSED),
    )
    budget = _budget()
    stack = ClientStack.for_channel(
        "127.0.0.1:1",
        retry=RetryPolicy(max_attempts=3, initial_backoff=0.01, jitter="none"),
        budget=budget,
        breaker=breaker,
        idempotency=IdempotencyKeys(),
        reconnect_wait=None,
    )
    target = stack.target_breaker
    assert target is not None
    target.circuit.open()
    time.sleep(0.1)
    servicer.release_first.set()  # attempt 1 fails at once; the retry (attempt 2) is gated
    future, send = _retrying(channel, stack, gated=2)
    assert send.entered.wait(WAIT)
    assert future.cancel()
    send.cancel_returned = True
    # While the gated send holds the probe, nobody else is a probe.
    assert target.admit() is REFUSED
    send.gate.set()
    wait_for(lambda: not future._pumping, "the events handled")
    assert send.sent_after_cancel == [2]  # the send under way, then cancelled
    wait_for(lambda: send.outcomes[2].done(), "the retry's call ended")
    assert send.outcomes[2].cancelled()
    assert budget.balance == 60.0 + 1.0 - 1  # the retry was sent: its withdrawal stays
    other = target.admit()
    assert other is PROBE  # the slot came back...
    assert target.admit() is REFUSED  # ... once
    target.release(other)


class _Shared(pybreaker.CircuitMemoryStorage):
    """Memory storage posing as shared storage (the breaker runs it as BreakerIO steps)."""


def test_a_hedged_future_cancelled_during_a_hedges_breaker_round_trip_sends_and_charges_nothing(
    scripted: tuple[_Scripted, grpc.Channel],
) -> None:
    """cancel() while the hedge timer's event waits on a stalled breaker store: the copy that
    event then grants is not sent, its budget withdrawal is refunded and its admission given
    back (as RetryingFuture does for a retry)."""
    servicer, channel = scripted
    storage = GatedStorage()
    budget = _budget()
    stack = ClientStack.for_channel(
        "127.0.0.1:1",
        hedging=HedgingPolicy(max_attempts=2, delay=0.05),
        budget=budget,
        breaker=CircuitBreaker(storage=lambda _t: storage),
        idempotency=IdempotencyKeys(),
    )
    send = _GatedSend(channel, gated=None)
    future = HedgedFuture(begin_hedged(stack, GET_BALANCE, 10.0, None, None), send)._begin()
    wait_for(lambda: servicer.calls() == 1, "copy 1 on the server")
    balance = budget.balance
    storage.armed = True  # the hedge's admission stalls in the store
    assert storage.entered.wait(WAIT)
    assert future.cancel()
    send.cancel_returned = True
    storage.gate.set()
    with pytest.raises(grpc.FutureCancelledError):
        future.result(timeout=WAIT)
    wait_for(lambda: not future._pumping, "the events handled")
    assert send.sent_after_cancel == []
    assert budget.balance == balance, "the copy never sent was charged to the budget"
    servicer.release_first.set()
    time.sleep(0.05)
    assert servicer.calls() == 1


def test_a_stream_cancelled_before_its_first_read_ends_and_runs_its_callbacks() -> None:
    """gRPC's own stream, cancelled before anything read it, runs its callbacks at once and
    says it cannot be cancelled again. The resilient stream did neither until someone read it."""
    server, port, servicer = serve()
    channel = resilient_channel(
        f"127.0.0.1:{port}", retry=RetryPolicy(max_attempts=3), idempotency=IdempotencyKeys()
    )
    try:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        call = stub.Watch(ledger_pb2.WatchRequest(account="alice", count=2))
        seen: list[int] = []
        assert call.add_callback(lambda: seen.append(1))
        assert call.cancel() is True
        assert seen == [1]
        assert not call.is_active()
        assert call.cancel() is False
        assert call.code() is grpc.StatusCode.CANCELLED
        with pytest.raises(grpc.RpcError) as raised:
            next(call)
        assert raised.value.code() is grpc.StatusCode.CANCELLED
        assert not call.add_callback(lambda: seen.append(2))
        assert seen == [1]
        time.sleep(0.05)
        assert len(servicer.state.calls_to(WATCH)) == 0
    finally:
        channel.close()
        server.stop(None)
