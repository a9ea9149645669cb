"""Adversarial review 9: sync ``.future()`` and streams cancelled in every state (issue 9, items 1, 4).

Each attack counts effects: attempts the server received (and whether it saw a cancellation),
the retry budget's balance, the breaker's failures and the throttle's ``(requests, accepts)``
(which move whenever the driver records an attempt's outcome), and how often done callbacks
ran. Calls go through ``resilient_channel`` and ``client_interceptors`` to a real server.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pybreaker
import pytest

from protos import ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, WATCH, Fault, SyncLedger, serve
from resilient_grpc import (
    CircuitBreaker,
    HedgingPolicy,
    RetryPolicy,
)
from resilient_grpc.client import client_interceptors, resilient_channel
from tests.counted_stack import WATCH_REQUEST, Stack
from tests.helpers import BALANCE_REQUEST

FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)


class Setup:
    def __init__(self, servicer: SyncLedger, target: str, how: str) -> None:
        self.servicer = servicer
        self.target = target
        self.how = how
        self.channels: list[grpc.Channel] = []

    def stub(self, stack: Stack, **extra: Any) -> ledger_pb2_grpc.LedgerStub:
        if self.how == "channel":
            channel = resilient_channel(self.target, **stack.kwargs(), **extra)
        else:
            channel = grpc.intercept_channel(
                grpc.insecure_channel(self.target, options=[("grpc.enable_retries", 0)]),
                *client_interceptors(target=self.target, **stack.kwargs(), **extra),
            )
        self.channels.append(channel)
        return ledger_pb2_grpc.LedgerStub(channel)

    def calls(self, method: str = GET_BALANCE) -> int:
        return len(self.servicer.state.calls_to(method))


def _setup(servicer: SyncLedger, how: str) -> Iterator[Setup]:
    server, port, _ = serve(servicer)
    it = Setup(servicer, f"127.0.0.1:{port}", how)
    try:
        yield it
    finally:
        for channel in it.channels:
            channel.close()
        server.stop(None)


@pytest.fixture(params=["channel", "interceptors"])
def setup(request: pytest.FixtureRequest) -> Iterator[Setup]:
    yield from _setup(SyncLedger(), request.param)


def _wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


class Hold(SyncLedger):
    """GetBalance and Watch hold each attempt (before any header) until it is cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = 0
        self._lock = threading.Lock()

    def _hold(self, context: grpc.ServicerContext) -> None:
        gone = threading.Event()
        if not context.add_callback(gone.set):
            gone.set()  # the attempt ended (cut or cancelled) before this handler ran
        if gone.wait(3.0) and not context.is_active():
            with self._lock:
                self.cancelled += 1

    def GetBalance(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.state.record(GET_BALANCE, context.invocation_metadata())
        self._hold(context)
        return self.state.balance(request.account)

    def Watch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.state.record(WATCH, context.invocation_metadata())
        self._hold(context)
        yield self.state.balance(request.account)


@pytest.fixture(params=["channel", "interceptors"])
def hold_setup(request: pytest.FixtureRequest) -> Iterator[Setup]:
    yield from _setup(Hold(), request.param)


# Futures ---------------------------------------------------------------------------------------


def test_a_future_cancelled_in_flight_charges_nothing_and_calls_back_once(
    hold_setup: Setup,
) -> None:
    stack = Stack()
    stub = hold_setup.stub(stack)
    servicer = hold_setup.servicer
    assert isinstance(servicer, Hold)
    seen: list[object] = []
    future = stub.GetBalance.future(BALANCE_REQUEST)
    future.add_done_callback(seen.append)
    _wait_until(lambda: hold_setup.calls() == 1)
    assert future.cancel() is True
    assert future.cancel() is False  # once
    _wait_until(lambda: servicer.cancelled == 1)  # the server saw it
    time.sleep(0.1)
    assert seen == [future]
    assert future.cancelled() and future.done() and not future.running()
    with pytest.raises(grpc.FutureCancelledError):
        future.result(timeout=1)
    with pytest.raises(grpc.FutureCancelledError):
        future.exception(timeout=1)
    assert future.code() == grpc.StatusCode.CANCELLED
    assert stack.throttle.counts == (0, 0)
    assert stack.failures(hold_setup.target) == 0
    assert stack.budget.balance == 1.0
    assert hold_setup.calls() == 1


def test_a_future_cancelled_during_backoff_calls_back_once_and_sends_nothing_more(
    setup: Setup,
) -> None:
    stack = Stack()
    stub = setup.stub(stack)
    setup.servicer.state.faults.fail_times(GET_BALANCE, 10)
    seen: list[object] = []
    future = stub.GetBalance.future(BALANCE_REQUEST)
    future.add_done_callback(seen.append)
    _wait_until(lambda: setup.calls() == 1)
    time.sleep(0.1)  # in the 0.6 s backoff
    assert future.cancel() is True
    time.sleep(0.7)
    assert seen == [future]
    assert setup.calls() == 1
    assert stack.throttle.counts == (1, 0)
    assert stack.failures(setup.target) == 1
    assert stack.budget.balance == 1.0  # the call's deposit; the unsent retry refunded


def test_cancel_racing_completion_calls_back_exactly_once(setup: Setup) -> None:
    """Cancel at random moments around the answer: one callback, and a consistent outcome."""
    stack = Stack(retry=FAST)
    stub = setup.stub(stack)
    rng = random.Random(9)
    for _ in range(40):
        seen: list[object] = []
        setup.servicer.state.faults.fail_times(GET_BALANCE, rng.choice([0, 1]))
        future = stub.GetBalance.future(BALANCE_REQUEST, timeout=5)
        future.add_done_callback(seen.append)
        time.sleep(rng.uniform(0.0, 0.02))
        cancelled = future.cancel()
        future.add_done_callback(seen.append)  # added after the end: runs at once
        _wait_until(lambda: len(seen) >= 2)  # noqa: B023
        time.sleep(0.005)
        assert seen == [future, future]
        assert future.done()
        assert future.cancelled() is cancelled
        if cancelled:
            with pytest.raises(grpc.FutureCancelledError):
                future.result(timeout=1)
        else:
            assert future.result(timeout=1).account == "alice"
    setup.servicer.state.faults.clear()


def test_a_future_cancelled_while_waiting_for_a_reconnect_stops_at_once() -> None:
    server, port, _ = serve()
    target = f"127.0.0.1:{port}"
    stack = Stack(retry=RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=0.01))
    channel = resilient_channel(
        target,
        **stack.kwargs(),
        reconnect_wait=30.0,
        options=[
            ("grpc.initial_reconnect_backoff_ms", 20_000),
            ("grpc.min_reconnect_backoff_ms", 20_000),
        ],
    )
    try:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        stub.GetBalance(BALANCE_REQUEST, timeout=5)
        server.stop(None).wait()  # the connection drops; nothing listens any more
        seen: list[object] = []
        future = stub.GetBalance.future(BALANCE_REQUEST)
        future.add_done_callback(seen.append)
        time.sleep(0.4)  # the attempt failed; the retry waits for a reconnect
        assert not future.done()
        started = time.monotonic()
        assert future.cancel() is True
        with pytest.raises(grpc.FutureCancelledError):
            future.result(timeout=1)
        assert time.monotonic() - started < 0.5
        assert seen == [future]
        assert stack.budget.balance == 2.0  # two calls sent; the waiting retry refunded
        assert stack.failures(target) == 1
        assert stack.throttle.counts == (2, 1)
    finally:
        channel.close()


class StalledStorage(pybreaker.CircuitMemoryStorage):
    """Breaker state whose reads hang, once armed, in the library's own threads (the retry's
    admission after the backoff), until the test opens the gate: a Redis round trip that
    waits out its socket timeout."""

    def __init__(self) -> None:
        super().__init__(pybreaker.STATE_CLOSED)
        self.armed = False
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.ends_at = 0.0

    @property
    def state(self) -> str:
        if self.armed and threading.current_thread().name.startswith("resilient-grpc-"):
            if not self.entered.is_set():
                self.ends_at = time.monotonic() + 1.0  # one 1 s stall, however many reads
                self.entered.set()
            self.gate.wait(max(self.ends_at - time.monotonic(), 0.0))
        return str(super().state)

    @state.setter
    def state(self, value: str) -> None:
        pybreaker.CircuitMemoryStorage.state.fset(self, value)  # type: ignore[attr-defined]


def test_result_timeout_and_cancel_are_honoured_while_a_breaker_round_trip_stalls(
    setup: Setup,
) -> None:
    storage = StalledStorage()
    stack = Stack(
        retry=RetryPolicy(max_attempts=3, initial_backoff=0.05, max_backoff=0.05, jitter="none"),
        breaker=CircuitBreaker(storage=lambda _target: storage, failure_rate=0.0),
    )
    stub = setup.stub(stack)
    setup.servicer.state.faults.fail_times(GET_BALANCE, 1)
    future = stub.GetBalance.future(BALANCE_REQUEST, timeout=20)
    storage.armed = True  # the retry's admission, after the backoff, will hang
    try:
        assert storage.entered.wait(5)
        started = time.monotonic()
        with contextlib.suppress(grpc.FutureTimeoutError):  # what it must raise, in time
            future.result(timeout=0.2)
        waited = time.monotonic() - started
        cancelled = future.cancel()
        took = time.monotonic() - started - waited
    finally:
        storage.armed = False
        storage.gate.set()
    assert waited < 0.6, f"result(timeout=0.2) returned after {waited:.2f} s"
    assert cancelled and took < 0.5, f"cancel() took {took:.2f} s"


def test_a_future_cancelled_during_a_stalled_breaker_round_trip_stops_after_it(
    setup: Setup,
) -> None:
    """The thread stuck in the retry's admission stops the call once the round trip is over:
    the retry is not sent, the budget gets it back, the done callback runs once."""
    storage = StalledStorage()
    stack = Stack(
        retry=RetryPolicy(max_attempts=3, initial_backoff=0.05, max_backoff=0.05, jitter="none"),
        breaker=CircuitBreaker(storage=lambda _target: storage, failure_rate=0.0),
    )
    stub = setup.stub(stack)
    setup.servicer.state.faults.fail_times(GET_BALANCE, 1)
    seen: list[object] = []
    future = stub.GetBalance.future(BALANCE_REQUEST, timeout=20)
    future.add_done_callback(seen.append)
    storage.armed = True
    try:
        assert storage.entered.wait(5)
        assert future.cancel() is True
        assert future.cancelled() and future.done() and seen == [future]  # at once
        with pytest.raises(grpc.FutureCancelledError):
            future.result(timeout=0.1)
        assert future.code() == grpc.StatusCode.CANCELLED
    finally:
        storage.armed = False
        storage.gate.set()
    _wait_until(lambda: stack.budget.balance == 1.0)  # the retry granted, then refunded
    time.sleep(0.1)
    assert seen == [future]
    assert setup.calls() == 1
    assert stack.throttle.counts == (1, 0)
    assert stack.failures(setup.target) == 1


class FailThenHold(Hold):
    """GetBalance answers a fault when one is queued, else holds the attempt like Hold."""

    def GetBalance(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.state.record(GET_BALANCE, context.invocation_metadata())
        self._fault(GET_BALANCE, context)
        self._hold(context)
        return self.state.balance(request.account)


class StalledSend(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Below the stack: once armed, an attempt's send hangs until the gate opens, then goes
    out; ``sent`` keeps what it returned."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.sent: list[Any] = []

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if self.armed:
            self.entered.set()
            self.gate.wait(3.0)
        outcome = continuation(details, request)
        self.sent.append(outcome)
        return outcome


def test_a_future_cancelled_while_its_retry_is_being_sent_cancels_that_attempt() -> None:
    servicer = FailThenHold()
    server, port, _ = serve(servicer)
    target = f"127.0.0.1:{port}"
    stack = Stack(retry=FAST)
    stall = StalledSend()
    channel = grpc.intercept_channel(
        grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)]),
        *client_interceptors(target=target, **stack.kwargs()),
        stall,
    )
    try:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        servicer.state.faults.fail_times(GET_BALANCE, 1)
        seen: list[object] = []
        future = stub.GetBalance.future(BALANCE_REQUEST, timeout=20)
        future.add_done_callback(seen.append)
        stall.armed = True  # the retry's send hangs
        try:
            assert stall.entered.wait(5)
            started = time.monotonic()
            with pytest.raises(grpc.FutureTimeoutError):
                future.result(timeout=0.2)
            assert time.monotonic() - started < 0.6
            assert future.cancel() is True
            assert future.cancelled() and seen == [future]
        finally:
            stall.gate.set()
        _wait_until(lambda: len(stall.sent) == 2 and stall.sent[1].done())
        assert stall.sent[1].cancelled()  # the retry sent meanwhile was cancelled at once
        assert stall.sent[1].code() == grpc.StatusCode.CANCELLED
        time.sleep(0.1)
        assert seen == [future]
        assert len(servicer.state.calls_to(GET_BALANCE)) <= 2
        assert stack.throttle.counts == (1, 0)  # only the first attempt's failure recorded
        assert stack.failures(target) == 1
        assert stack.budget.balance == 0.0  # the retry went out: it was traffic
    finally:
        channel.close()
        server.stop(None)


# Streams -----------------------------------------------------------------------------------------


def test_a_stream_cancelled_before_it_commits_is_cancelled_on_the_server(
    hold_setup: Setup,
) -> None:
    stack = Stack()
    stub = hold_setup.stub(stack)
    servicer = hold_setup.servicer
    assert isinstance(servicer, Hold)
    call = stub.Watch(WATCH_REQUEST)
    caught: list[BaseException] = []

    def read() -> None:
        try:
            list(call)
        except grpc.RpcError as error:
            caught.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    _wait_until(lambda: hold_setup.calls(WATCH) == 1)
    assert call.cancel() is True
    reader.join(1.0)
    assert not reader.is_alive()
    _wait_until(lambda: servicer.cancelled == 1)
    time.sleep(0.1)
    assert caught and caught[0].code() == grpc.StatusCode.CANCELLED
    assert call.code() == grpc.StatusCode.CANCELLED
    assert hold_setup.calls(WATCH) == 1
    assert stack.throttle.counts == (0, 0)
    assert stack.failures(hold_setup.target) == 0
    assert stack.budget.balance == 1.0


def test_a_stream_cancelled_before_its_first_read_sends_nothing(setup: Setup) -> None:
    stack = Stack()
    stub = setup.stub(stack)
    call = stub.Watch(WATCH_REQUEST)
    assert call.cancel() is True
    with pytest.raises(grpc.RpcError) as caught:
        next(call)
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert setup.calls(WATCH) == 0
    assert stack.budget.balance == 0.0  # nothing sent: no deposit
    assert stack.throttle.counts == (0, 0)


# Hedged futures ----------------------------------------------------------------------------------

HEDGE = HedgingPolicy(max_attempts=3, delay=0.3)


@pytest.mark.parametrize("copies", [1, 2])
def test_a_hedged_future_cancelled_during_the_hedge_delay_sends_nothing_more(
    hold_setup: Setup, copies: int
) -> None:
    stack = Stack(retry=None, hedging=HEDGE)
    stub = hold_setup.stub(stack)
    servicer = hold_setup.servicer
    assert isinstance(servicer, Hold)
    seen: list[object] = []
    future = stub.GetBalance.future(BALANCE_REQUEST)
    future.add_done_callback(seen.append)
    _wait_until(lambda: hold_setup.calls() == copies)
    time.sleep(0.1)  # inside the next hedge delay
    assert future.cancel() is True
    _wait_until(lambda: servicer.cancelled == copies)
    time.sleep(0.4)  # past the next hedge delay
    assert seen == [future]
    assert hold_setup.calls() == copies
    assert stack.throttle.counts == (0, 0)
    assert stack.failures(hold_setup.target) == 0
    assert stack.budget.balance == 1.0 - (copies - 1)


def test_a_hedged_future_whose_next_copy_cannot_be_sent_still_finishes(setup: Setup) -> None:
    stub = setup.stub(Stack(retry=None, hedging=HedgingPolicy(max_attempts=3, delay=5.0)))
    setup.servicer.state.faults.add(GET_BALANCE, Fault(pushback_ms="200"))
    future = stub.GetBalance.future(BALANCE_REQUEST)
    _wait_until(lambda: setup.calls() == 1)
    time.sleep(0.05)  # the first copy failed; the next one waits for the 200 ms pushback
    setup.channels[-1].close()  # shutting down: the next send raises
    with contextlib.suppress(ValueError, grpc.RpcError):  # either is an end
        future.result(timeout=1.0)
    assert future.done()


def test_a_retrying_future_whose_next_attempt_cannot_be_sent_ends_with_the_error(
    setup: Setup,
) -> None:
    stub = setup.stub(Stack(retry=FAST))
    setup.servicer.state.faults.add(GET_BALANCE, Fault(pushback_ms="200"))
    future = stub.GetBalance.future(BALANCE_REQUEST)
    _wait_until(lambda: setup.calls() == 1)
    time.sleep(0.05)
    setup.channels[-1].close()
    with pytest.raises((ValueError, grpc.RpcError)):
        future.result(timeout=1.0)
    assert future.done()


def test_a_probe_cancelled_in_flight_gives_the_probe_slot_back(hold_setup: Setup) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=0.2, failure_rate=0.0, probe_every=None)
    stub = hold_setup.stub(Stack(retry=None, breaker=breaker))
    servicer = hold_setup.servicer
    assert isinstance(servicer, Hold)
    target = breaker.for_target(hold_setup.target)
    # Opened by hand, not by a cut call: on a loaded machine the server may see a call cut
    # after 50 ms late or not at all, and the counts below would include it or not.
    target.record(target.admit(), failed=True)
    assert target.state == "open"
    time.sleep(0.25)  # past reset_timeout: the next call is the probe
    probe = stub.GetBalance.future(BALANCE_REQUEST)
    _wait_until(lambda: hold_setup.calls() == 1)
    assert probe.cancel() is True
    _wait_until(lambda: servicer.cancelled == 1)  # the server saw the probe cancelled
    # the slot is free: the next call is the probe again (it goes out, it is not refused)
    again = stub.GetBalance.future(BALANCE_REQUEST)
    assert not again.done(), f"refused: {again.exception()!r}"
    _wait_until(lambda: hold_setup.calls() == 2)
    again.cancel()


class SlowCancel(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Below the stack: each attempt's ``cancel()`` returns only once gRPC's callback thread
    has brought the cancelled attempt's answer to the future (``answered``) or is stuck
    handling it (``stuck``, set by the test): the order a loaded machine produces now and then,
    made certain."""

    def __init__(self) -> None:
        self.answered = threading.Event()
        self.stuck = threading.Event()

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return _SlowCancelAttempt(continuation(details, request), self)


class _SlowCancelAttempt:
    def __init__(self, inner: Any, owner: SlowCancel) -> None:
        self._inner = inner
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        def answer(_inner: Any) -> None:
            fn(self)
            self._owner.answered.set()

        self._inner.add_done_callback(answer)

    def cancel(self) -> bool:
        cancelled = bool(self._inner.cancel())
        owner = self._owner
        _wait_until(lambda: owner.answered.is_set() or owner.stuck.is_set())
        return cancelled


def test_the_slot_of_a_cancelled_probe_is_free_when_cancel_returns() -> None:
    """The answer of the attempt ``cancel()`` cancels reaches the future on gRPC's callback
    thread, which may get there first and be descheduled: it must not take over the closing of
    the driver (which gives the probe slot back) from ``cancel()``; the slot is free when
    ``cancel()`` returns, or the next call is refused by a breaker with no probe in flight."""
    servicer = Hold()
    server, port, _ = serve(servicer)
    target = f"127.0.0.1:{port}"
    breaker = CircuitBreaker(fail_max=1, reset_timeout=0.2, failure_rate=0.0, probe_every=None)
    slow = SlowCancel()
    channel = grpc.intercept_channel(
        grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)]),
        *client_interceptors(target=target, **Stack(retry=None, breaker=breaker).kwargs()),
        slow,
    )
    gate = threading.Event()
    try:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        breaker.for_target(target).record(breaker.for_target(target).admit(), failed=True)
        assert breaker.for_target(target).state == "open"
        time.sleep(0.25)  # past reset_timeout: the next call is the probe
        probe = stub.GetBalance.future(BALANCE_REQUEST)
        _wait_until(lambda: len(servicer.state.calls_to(GET_BALANCE)) == 1)
        pump = probe._pump

        def descheduled() -> None:  # gRPC's callback thread, stalled while it holds the queue
            if threading.current_thread() is not threading.main_thread():
                slow.stuck.set()
                gate.wait(3.0)
            pump()

        probe._pump = descheduled  # type: ignore[method-assign]
        assert probe.cancel() is True
        again = stub.GetBalance.future(BALANCE_REQUEST)
        assert not again.done(), f"refused: {again.exception()!r}"  # it is the probe
        _wait_until(lambda: len(servicer.state.calls_to(GET_BALANCE)) == 2)
        again.cancel()
    finally:
        gate.set()
        channel.close()
        server.stop(None)
