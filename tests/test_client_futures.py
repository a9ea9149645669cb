"""Sync ``stub.Method.future(...)``: returns at once, retries block nobody, cancel works (issue 9, item 4)."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from protos import ledger_pb2
from protos.ledger_service import GET_BALANCE, WATCH, Fault, SyncLedger
from resilient_grpc import (
    CircuitBreaker,
    HedgingPolicy,
    IdempotencyKeys,
    RetryBudget,
    RetryPolicy,
)
from resilient_grpc.client import _Timer, _Timers
from resilient_grpc.errors import attempts_of
from tests.helpers import BALANCE_REQUEST, FAST, RETRIES_OFF, MakeStub, stub_maker, wait_for

SLOW_RETRIES = RetryPolicy(
    max_attempts=5, initial_backoff=0.6, max_backoff=0.6, multiplier=1.0, jitter="none"
)


@pytest.fixture(params=["channel", "interceptors"])
def make_stub(request: pytest.FixtureRequest, ledger: tuple[SyncLedger, int]) -> Iterator[MakeStub]:
    with stub_maker(f"127.0.0.1:{ledger[1]}", request.param, RETRIES_OFF) as make:
        yield make


def test_four_parallel_futures_overlap_on_the_server(make_stub, ledger) -> None:
    servicer = ledger[0]
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    # each call fails once, then its retry takes 1 s: four of them must run side by side
    servicer.state.faults.add(GET_BALANCE, *[Fault()] * 4, *[Fault(code=None, delay=1.0)] * 4)

    futures = [stub.GetBalance.future(BALANCE_REQUEST, timeout=30) for _ in range(4)]
    assert not any(future.done() for future in futures)  # .future() returned at once
    replies = [future.result(timeout=30) for future in futures]

    assert [reply.account for reply in replies] == ["alice"] * 4
    calls = servicer.state.calls_to(GET_BALANCE)
    assert len(calls) == 8
    slow_starts = sorted(call.at for call in calls)[4:]
    # all four slow attempts started before the first of them (1 s) was over: they overlapped
    assert slow_starts[-1] - slow_starts[0] < 1.0
    assert all(future.code() == grpc.StatusCode.OK for future in futures)


def test_future_callbacks_status_and_error_like_grpc(make_stub, ledger) -> None:
    servicer = ledger[0]
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.add(
        GET_BALANCE, Fault(details="one"), Fault(details="two"), Fault(details="three")
    )
    done = threading.Event()
    seen: list[object] = []

    future = stub.GetBalance.future(BALANCE_REQUEST, timeout=5)
    future.add_done_callback(lambda f: (seen.append(f), done.set()))
    assert done.wait(5)

    assert seen == [future]
    error = future.exception()
    assert isinstance(error, grpc.RpcError) and attempts_of(error) == 3
    with pytest.raises(grpc.RpcError):
        future.result()
    assert future.code() == grpc.StatusCode.UNAVAILABLE
    assert future.details() == "three"
    assert future.done() and not future.running() and not future.cancelled()
    assert future.cancel() is False  # already over
    late: list[object] = []
    future.add_done_callback(late.append)
    assert late == [future]


def test_cancel_during_backoff_stops_the_call(make_stub, ledger) -> None:
    servicer = ledger[0]
    budget = RetryBudget(ratio=1.0, min_retries_per_second=0.0, window=60.0)
    breaker = CircuitBreaker(fail_max=100, reset_timeout=30, failure_rate=0.0)
    stub = make_stub(
        retry=SLOW_RETRIES, budget=budget, breaker=breaker, idempotency=IdempotencyKeys()
    )
    servicer.state.faults.fail_times(GET_BALANCE, 10)
    called = threading.Event()

    future = stub.GetBalance.future(BALANCE_REQUEST)
    future.add_done_callback(lambda _f: called.set())
    wait_for(lambda: len(servicer.state.calls_to(GET_BALANCE)) == 1, "the call on the server", 5.0)
    time.sleep(0.1)  # inside the 0.6 s backoff

    assert future.cancel() is True
    assert called.wait(1.0)
    assert future.cancelled() and future.done()
    with pytest.raises(grpc.FutureCancelledError):
        future.result(timeout=1)
    assert future.code() == grpc.StatusCode.CANCELLED
    time.sleep(0.8)  # past the backoff: a retry would have reached the server
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1
    assert budget.balance == 1.0  # the granted retry was never sent: refunded
    target = next(iter(breaker._targets.values()))
    assert target.circuit.fail_counter == 1


def test_cancel_in_flight_cancels_the_rpc(make_stub, ledger) -> None:
    servicer = ledger[0]
    breaker = CircuitBreaker(fail_max=1, reset_timeout=30, failure_rate=0.0)
    stub = make_stub(retry=FAST, breaker=breaker, idempotency=IdempotencyKeys())
    servicer.state.faults.add(GET_BALANCE, Fault(code=None, delay=2.0))

    future = stub.GetBalance.future(BALANCE_REQUEST, timeout=10)
    wait_for(lambda: len(servicer.state.calls_to(GET_BALANCE)) == 1, "the call on the server", 5.0)
    assert future.cancel() is True
    with pytest.raises(grpc.FutureCancelledError):
        future.result(timeout=2)
    time.sleep(0.2)
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1
    target = next(iter(breaker._targets.values()))
    assert target.state == "closed"  # a cancellation is not a failure


def test_result_timeout_raises_future_timeout_error(make_stub, ledger) -> None:
    servicer = ledger[0]
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.add(GET_BALANCE, Fault(code=None, delay=1.0))
    future = stub.GetBalance.future(BALANCE_REQUEST, timeout=10)
    with pytest.raises(grpc.FutureTimeoutError):
        future.result(timeout=0.05)
    assert future.result(timeout=10).account == "alice"


def test_a_stream_cancelled_during_backoff_stops_at_once(make_stub, ledger) -> None:
    servicer = ledger[0]
    stub = make_stub(retry=SLOW_RETRIES, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(WATCH, 10)
    call = stub.Watch(ledger_pb2.WatchRequest(account="alice", count=2))
    caught: list[BaseException] = []

    def read() -> None:
        try:
            list(call)
        except grpc.RpcError as error:
            caught.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    wait_for(lambda: len(servicer.state.calls_to(WATCH)) == 1, "the stream on the server", 5.0)
    time.sleep(0.1)  # inside the 0.6 s backoff

    assert call.cancel() is True
    reader.join(1.0)
    assert not reader.is_alive()
    assert caught and caught[0].code() == grpc.StatusCode.CANCELLED
    assert call.code() == grpc.StatusCode.CANCELLED
    time.sleep(0.8)
    assert len(servicer.state.calls_to(WATCH)) == 1


def _collected(ref: weakref.ref[Any]) -> bool:
    for _ in range(3):  # a cycle through a gRPC callback may need more than one pass
        gc.collect()
        if ref() is None:
            return True
    return False


def _backing_off(ref: weakref.ref[Any]) -> bool:
    future = ref()
    return future is not None and future._waiting.__class__ is _Timer


def test_a_future_cancelled_during_a_long_backoff_is_collectable_at_once(make_stub, ledger) -> None:
    servicer = ledger[0]
    stub = make_stub(
        retry=RetryPolicy(max_attempts=3, initial_backoff=30.0, max_backoff=30.0, jitter="none"),
        idempotency=IdempotencyKeys(),
    )
    servicer.state.faults.fail_times(GET_BALANCE, 10)
    future = stub.GetBalance.future(BALANCE_REQUEST, timeout=60)
    wait_for(lambda: len(servicer.state.calls_to(GET_BALANCE)) == 1, "the call on the server", 5.0)
    ref = weakref.ref(future)
    wait_for(lambda: _backing_off(ref), "the future backing off", 5.0)
    assert future.cancel() is True
    del future
    assert _collected(ref)  # not held by its timer for the 30 s backoff


def test_a_hedged_future_done_before_its_next_hedge_is_collectable_at_once(
    make_stub, ledger
) -> None:
    stub = make_stub(
        hedging=HedgingPolicy(max_attempts=2, delay=30.0), idempotency=IdempotencyKeys()
    )
    future = stub.GetBalance.future(BALANCE_REQUEST, timeout=60)
    assert future.result(timeout=5).balance >= 0
    ref = weakref.ref(future)
    del future
    assert _collected(ref)  # not held by the 30 s hedge timer it no longer needs


def test_cancelled_timers_are_swept_from_the_heap_when_they_are_most_of_it() -> None:
    timers = _Timers()
    fired = threading.Event()
    far = [timers.call_later(60.0, fired.set) for _ in range(200)]
    soon = timers.call_later(0.05, fired.set)
    for timer in far[:150]:
        timer.cancel()
        timer.cancel()  # counted once
    live = [entry[2] for entry in timers._heap if not entry[2].cancelled]
    assert len(live) == 51 and soon in live
    assert timers._stale == len(timers._heap) - 51  # every cancelled one left is counted
    assert len(timers._heap) < 151  # swept: the 101st cancellation was most of the heap
    assert all(timer.callback is not fired.set for timer in far[:150])  # dropped at once
    assert fired.wait(5.0)  # the live timer still fires after the sweep
    wait_for(lambda: soon not in [entry[2] for entry in timers._heap], "the timer popped", 5.0)
    assert timers._stale == len(timers._heap) - 50
    for timer in far[150:]:
        timer.cancel()
