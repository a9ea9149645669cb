"""Hedging (gRFC A6) through the sync stack against real servers: the first attempt of every
call is the slow replica (see :mod:`tests.hedging_fixtures`)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from protos import ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, TRANSFER, Fault, serve
from resilient_grpc import CircuitBreaker, IdempotencyKeys, RetryBudget, RetryPolicy
from resilient_grpc.client import client_interceptors, resilient_channel
from resilient_grpc.core.hedging import HedgingPolicy
from resilient_grpc.core.retry import Reason
from resilient_grpc.errors import BreakerOpenError, attempts_of, reason_of
from resilient_grpc.server import DedupInterceptor
from resilient_grpc.stores import MemoryStore
from tests.hedging_fixtures import PREVIOUS, HedgeLedger, attempt_number
from tests.helpers import BALANCE_REQUEST, RETRIES_OFF, TRANSFER_REQUEST, MakeStub, stub_maker

HEDGE = HedgingPolicy(max_attempts=3, delay=0.1)


@pytest.fixture(params=["channel", "interceptors-future"])
def make_stub(
    request: pytest.FixtureRequest, hedge_ledger: tuple[HedgeLedger, int]
) -> Iterator[MakeStub]:
    """Stubs with the stack as resilient_channel, or as client_interceptors used with
    ``.future()`` (the interceptor path that can have several attempts in flight)."""
    with stub_maker(f"127.0.0.1:{hedge_ledger[1]}", request.param, RETRIES_OFF) as make:
        yield make


def call(stub_method, request, **kwargs):
    """Run a call as a future (what both fixtures' paths hedge) and return its result."""
    return stub_method.future(request, **kwargs).result(timeout=20)


def test_the_fast_copy_wins_and_the_slow_one_is_cancelled_on_the_server(
    make_stub, hedge_ledger
) -> None:
    servicer, _ = hedge_ledger
    stub = make_stub(hedging=HEDGE, idempotency=IdempotencyKeys())

    started = time.monotonic()
    reply = call(stub.GetBalance, BALANCE_REQUEST, timeout=15)

    assert reply.account == "alice"
    assert time.monotonic() - started < servicer.hold  # did not wait for the slow replica
    calls = servicer.state.calls_to(GET_BALANCE)
    assert 2 <= len(calls) <= 3
    assert len({c.key for c in calls}) == 1 and calls[0].key is not None  # one key for all
    numbers = sorted(attempt_number(c.metadata) for c in calls)
    assert numbers == list(range(1, len(calls) + 1))  # grpc-previous-rpc-attempts = n - 1
    assert not any(k == PREVIOUS for k, _ in calls[0].metadata)
    assert servicer.cancellations(1) == 1  # the slow first attempt saw the cancellation


def test_blocking_call_and_with_call_on_the_channel_are_hedged(hedge_ledger) -> None:
    servicer, port = hedge_ledger
    with resilient_channel(f"127.0.0.1:{port}", hedging=HEDGE, idempotency=IdempotencyKeys()) as ch:
        stub = ledger_pb2_grpc.LedgerStub(ch)
        assert stub.GetBalance(BALANCE_REQUEST, timeout=15).account == "alice"
        assert servicer.cancellations(1) == 1
        reply, grpc_call = stub.GetBalance.with_call(BALANCE_REQUEST, timeout=15)
        assert reply.account == "alice" and grpc_call.code() == grpc.StatusCode.OK
        assert servicer.cancellations(2) == 2


def test_keyed_hedged_writes_execute_once_with_dedup_and_twice_without() -> None:
    def run(interceptors: list[object]) -> tuple[int, int]:
        servicer = HedgeLedger(slow=0.6)
        server, port, _ = serve(servicer, interceptors=interceptors)  # type: ignore[arg-type]
        try:
            with resilient_channel(
                f"127.0.0.1:{port}",
                hedging=HedgingPolicy(max_attempts=2, delay=0.1),
                idempotency=IdempotencyKeys(),
            ) as channel:
                ledger_pb2_grpc.LedgerStub(channel).Transfer(TRANSFER_REQUEST, timeout=15)
            # the slow first attempt's handler finishes on its own time
            deadline = time.monotonic() + 10
            while len(servicer.state.calls_to(TRANSFER)) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(servicer.slow)
            executions = sum(servicer.state.executions.values())
            return executions, len(servicer.state.calls_to(TRANSFER))
        finally:
            server.stop(None)

    assert run([]) == (2, 2)  # without dedup the hedge duplicated the transfer
    executions, _ = run([DedupInterceptor(MemoryStore())])
    assert executions == 1  # with dedup the copy waited for the first and got its replay


def test_no_hedges_when_the_budget_is_exhausted(make_stub, hedge_ledger) -> None:
    servicer, _ = hedge_ledger
    servicer.hold = 0.5  # the single attempt answers after half a second
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.0)
    stub = make_stub(hedging=HEDGE, budget=budget, idempotency=IdempotencyKeys())

    assert call(stub.GetBalance, BALANCE_REQUEST, timeout=15).account == "alice"

    assert len(servicer.state.calls_to(GET_BALANCE)) == 1
    assert budget.refused >= 1


def test_no_hedges_while_the_breaker_probes_and_none_at_all_when_open(
    make_stub, hedge_ledger
) -> None:
    servicer, port = hedge_ledger
    servicer.hold = 0.5
    breaker = CircuitBreaker(fail_max=1, reset_timeout=0.2, failure_rate=0)
    stub = make_stub(hedging=HEDGE, breaker=breaker, idempotency=IdempotencyKeys())
    servicer.slow_first = False
    servicer.state.faults.add(GET_BALANCE, Fault(code=grpc.StatusCode.INTERNAL))
    with pytest.raises(grpc.RpcError) as failed:
        call(stub.GetBalance, BALANCE_REQUEST, timeout=15)
    assert failed.value.code() == grpc.StatusCode.INTERNAL  # fatal: no hedge after it
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1

    with pytest.raises(BreakerOpenError):  # open: nothing is sent, not even a first attempt
        call(stub.GetBalance, BALANCE_REQUEST, timeout=15)
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1

    time.sleep(0.3)  # half-open: the first attempt is the probe and no hedge may join it
    servicer.slow_first = True
    assert call(stub.GetBalance, BALANCE_REQUEST, timeout=15).account == "alice"
    assert len(servicer.state.calls_to(GET_BALANCE)) == 2
    assert breaker.for_target(f"127.0.0.1:{port}").state == "closed"


def test_non_fatal_failures_send_the_next_copy_at_once_and_give_up_at_max_attempts(
    make_stub, hedge_ledger
) -> None:
    servicer, _ = hedge_ledger
    servicer.slow_first = False
    stub = make_stub(
        hedging=HedgingPolicy(max_attempts=3, delay=5.0), idempotency=IdempotencyKeys()
    )
    servicer.state.faults.fail_times(GET_BALANCE, 3)

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        call(stub.GetBalance, BALANCE_REQUEST, timeout=15)

    assert time.monotonic() - started < 5.0  # never waited for the 5 s hedge delay
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert attempts_of(caught.value) == 3
    assert reason_of(caught.value) is Reason.MAX_ATTEMPTS
    assert len(servicer.state.calls_to(GET_BALANCE)) == 3


def test_a_negative_pushback_stops_hedging(make_stub, hedge_ledger) -> None:
    servicer, _ = hedge_ledger
    servicer.slow_first = False
    stub = make_stub(hedging=HEDGE, idempotency=IdempotencyKeys())
    servicer.state.faults.add(GET_BALANCE, Fault(pushback_ms="-1"))

    with pytest.raises(grpc.RpcError) as caught:
        call(stub.GetBalance, BALANCE_REQUEST, timeout=15)

    assert reason_of(caught.value) is Reason.PUSHBACK_STOP
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1


def test_a_call_without_key_to_a_method_not_marked_idempotent_is_sent_once(
    make_stub, hedge_ledger
) -> None:
    servicer, _ = hedge_ledger
    servicer.hold = 0.4
    stub = make_stub(hedging=HEDGE)  # no idempotency keys

    assert call(stub.GetBalance, BALANCE_REQUEST, timeout=15).account == "alice"
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1


def test_retry_and_hedging_on_the_same_methods_is_refused() -> None:
    with pytest.raises(ValueError, match="retry= and hedging= both apply to every method"):
        resilient_channel("127.0.0.1:1", retry=RetryPolicy(), hedging=HEDGE)
    with pytest.raises(ValueError, match="retry= and hedging= both apply"):
        client_interceptors(retry=RetryPolicy(), hedging=HEDGE)
    with pytest.raises(ValueError, match="hedging must be a HedgingPolicy"):
        client_interceptors(hedging=RetryPolicy())  # type: ignore[arg-type]
    # hedged methods listed: the retry policy serves the others
    client_interceptors(retry=RetryPolicy(), hedging=HEDGE.with_changes(methods=[GET_BALANCE]))


def test_blocking_calls_through_sync_interceptors_send_copies_one_after_another(
    hedge_ledger,
) -> None:
    """grpc's sync interceptor API runs a blocking call's continuation to its end: the copies
    of a blocking call cannot overlap there, a non-fatal failure still moves to the next."""
    servicer, port = hedge_ledger
    servicer.slow_first = False
    target = f"127.0.0.1:{port}"
    servicer.state.faults.fail_times(GET_BALANCE, 2)
    with grpc.intercept_channel(
        grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)]),
        *client_interceptors(target=target, hedging=HEDGE, idempotency=IdempotencyKeys()),
    ) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        assert stub.GetBalance(BALANCE_REQUEST, timeout=15).account == "alice"
        reply, grpc_call = stub.GetBalance.with_call(BALANCE_REQUEST, timeout=15)
        assert reply.account == "alice" and grpc_call.code() == grpc.StatusCode.OK
    calls = servicer.state.calls_to(GET_BALANCE)
    assert [attempt_number(c.metadata) for c in calls] == [1, 2, 3, 1]


class _ThreadRecorder(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Records which thread sends each attempt (placed inside the resilient interceptor)."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        import threading

        self.threads.append(threading.current_thread().name)
        return continuation(client_call_details, request)


def test_a_delayed_copy_of_a_blocking_intercepted_call_is_sent_by_the_caller(
    hedge_ledger,
) -> None:
    """After a pushback the next copy waits on the timer; a blocking continuation must then run
    in the caller's thread, never on the timer thread every future shares."""
    servicer, port = hedge_ledger
    servicer.slow_first = False
    target = f"127.0.0.1:{port}"
    servicer.state.faults.add(GET_BALANCE, Fault(pushback_ms="200"))
    recorder = _ThreadRecorder()
    with grpc.intercept_channel(
        grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)]),
        *client_interceptors(target=target, hedging=HEDGE, idempotency=IdempotencyKeys()),
        recorder,
    ) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        assert stub.GetBalance(BALANCE_REQUEST, timeout=15).account == "alice"
    assert len(recorder.threads) == 2
    assert "resilient-grpc-timers" not in recorder.threads


def test_cancelling_a_hedged_future_cancels_every_copy(make_stub, hedge_ledger) -> None:
    servicer, _ = hedge_ledger
    stub = make_stub(
        hedging=HedgingPolicy(max_attempts=2, delay=0.05), idempotency=IdempotencyKeys()
    )
    servicer.state.faults.add(GET_BALANCE, Fault(code=None, delay=3.0))  # the copy is slow too

    future = stub.GetBalance.future(BALANCE_REQUEST, timeout=15)
    deadline = time.monotonic() + 10
    while len(servicer.state.calls_to(GET_BALANCE)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(servicer.state.calls_to(GET_BALANCE)) == 2
    assert future.cancel()
    with pytest.raises(grpc.FutureCancelledError):
        future.result(timeout=5)
    assert future.cancelled() and future.done()
    assert servicer.cancellations(1) == 1  # the first copy saw the cancellation
    time.sleep(0.2)
    assert len(servicer.state.calls_to(GET_BALANCE)) == 2  # nothing sent after the cancel


class _SlowReplica(HedgeLedger):
    """A replica on which every GetBalance holds until the client cancels it."""

    def GetBalance(self, request, context):  # type: ignore[no-untyped-def]
        self.state.record(GET_BALANCE, context.invocation_metadata())
        gone = __import__("threading").Event()
        context.add_callback(gone.set)
        if gone.wait(self.hold) and not context.is_active():
            with self._lock:
                self.cancelled.append(attempt_number(context.invocation_metadata()))
        return self.state.balance(request.account)


def test_a_slow_replica_and_a_fast_one_behind_one_round_robin_channel() -> None:
    """Two servers behind one ``round_robin`` channel, one of them hanging: every call is
    answered by the fast replica, and every copy the slow one received was cancelled."""
    slow, fast = _SlowReplica(), HedgeLedger()
    fast.slow_first = False
    slow_server, slow_port, _ = serve(slow)
    fast_server, fast_port, _ = serve(fast)
    try:
        with resilient_channel(
            f"ipv4:127.0.0.1:{slow_port},127.0.0.1:{fast_port}",
            hedging=HedgingPolicy(max_attempts=2, delay=0.1),
            idempotency=IdempotencyKeys(),
            options=[("grpc.lb_policy_name", "round_robin")],
        ) as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            # round_robin picks only READY replicas: let both connect before timing calls
            slow.hold = 0.2
            deadline = time.monotonic() + 10
            while not fast.state.calls_to(GET_BALANCE) and time.monotonic() < deadline:
                stub.GetBalance(BALANCE_REQUEST, timeout=15)
            slow.hold = 10.0
            slow_before = len(slow.state.calls_to(GET_BALANCE))
            cancelled_before = slow.cancellations(0)
            fast_before = len(fast.state.calls_to(GET_BALANCE))
            for _ in range(6):
                started = time.monotonic()
                assert stub.GetBalance(BALANCE_REQUEST, timeout=15).account == "alice"
                assert time.monotonic() - started < slow.hold
        reached_slow = len(slow.state.calls_to(GET_BALANCE)) - slow_before
        assert reached_slow >= 1  # round robin sent it some copies
        assert len(fast.state.calls_to(GET_BALANCE)) - fast_before == 6  # it answered each call
        expected = cancelled_before + reached_slow
        assert slow.cancellations(expected) >= expected  # every slow copy was cancelled
    finally:
        slow_server.stop(None)
        fast_server.stop(None)


def test_no_hedges_when_the_throttle_rejects_them(hedge_ledger) -> None:
    from resilient_grpc import AdaptiveThrottle

    servicer, port = hedge_ledger
    servicer.hold = 0.5
    draws = iter([0.99, 0.0, 0.0, 0.0])  # admit the first copy, reject every hedge
    throttle = AdaptiveThrottle(uniform=lambda: next(draws))
    for _ in range(10):
        throttle.record(False)  # a backend that has been refusing: p = 0.9
    with resilient_channel(
        f"127.0.0.1:{port}", hedging=HEDGE, throttle=throttle, idempotency=IdempotencyKeys()
    ) as channel:
        reply = ledger_pb2_grpc.LedgerStub(channel).GetBalance(BALANCE_REQUEST, timeout=15)
    assert reply.account == "alice"
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1
    assert throttle.rejected == 1


# Issue 11: the breaker counts calls, a hedging budget, failure copies held for the breaker ------


def test_the_breaker_counts_one_failure_per_call_not_one_per_copy(make_stub, hedge_ledger) -> None:
    servicer, port = hedge_ledger
    servicer.slow_first = False
    breaker = CircuitBreaker(fail_max=2, reset_timeout=30, failure_rate=0)
    stub = make_stub(
        hedging=HedgingPolicy(max_attempts=3, delay=5.0),
        breaker=breaker,
        idempotency=IdempotencyKeys(),
    )
    target = breaker.for_target(f"127.0.0.1:{port}")
    servicer.state.faults.fail_times(GET_BALANCE, 2)
    # two copies fail, the third succeeds: counting copies would have opened the breaker
    # (fail_max=2) and refused the third copy
    assert call(stub.GetBalance, BALANCE_REQUEST, timeout=15).account == "alice"
    assert target.state == "closed"

    servicer.state.faults.fail_times(GET_BALANCE, 3)
    with pytest.raises(grpc.RpcError) as caught:
        call(stub.GetBalance, BALANCE_REQUEST, timeout=15)
    assert attempts_of(caught.value) == 3
    assert target.state == "closed"  # three failed copies, one failed call: counted once
    servicer.state.faults.fail_times(GET_BALANCE, 3)
    with pytest.raises(grpc.RpcError):
        call(stub.GetBalance, BALANCE_REQUEST, timeout=15)
    assert target.state == "open"  # the second failed call
    # its first copy's failure was the call's one failure: it opened the breaker at once,
    # which refused the other copies
    assert len(servicer.state.calls_to(GET_BALANCE)) == 3 + 3 + 1
    servicer.state.faults.clear()


def test_latency_hedges_draw_on_the_hedging_budget_failure_copies_on_the_retry_budget(
    make_stub, hedge_ledger
) -> None:
    servicer, _ = hedge_ledger
    servicer.hold = 0.5  # the first copy is slow: a latency hedge goes after 0.1 s
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.0)
    hedging_budget = RetryBudget(ratio=1.0, min_retries_per_second=0.0)
    stub = make_stub(
        hedging=HEDGE, budget=budget, hedging_budget=hedging_budget, idempotency=IdempotencyKeys()
    )
    assert call(stub.GetBalance, BALANCE_REQUEST, timeout=15).account == "alice"
    assert len(servicer.state.calls_to(GET_BALANCE)) == 2
    assert budget.refused == 0

    servicer.slow_first = False
    servicer.state.faults.fail_times(GET_BALANCE, 1)
    with pytest.raises(grpc.RpcError) as caught:  # a failure copy: the retry budget is empty
        call(stub.GetBalance, BALANCE_REQUEST, timeout=15)
    assert reason_of(caught.value) is Reason.BUDGET_EXHAUSTED
    assert budget.refused == 1
    assert len(servicer.state.calls_to(GET_BALANCE)) == 3


def test_a_failure_copy_waits_its_backoff_and_for_an_open_breaker_to_close(
    make_stub, hedge_ledger
) -> None:
    servicer, port = hedge_ledger
    servicer.slow_first = False
    breaker = CircuitBreaker(fail_max=1, reset_timeout=0.3, failure_rate=0, probe_every=None)
    stub = make_stub(
        hedging=HedgingPolicy(max_attempts=3, delay=5.0, failure_backoff=0.2),
        breaker=breaker,
        idempotency=IdempotencyKeys(),
    )
    servicer.state.faults.fail_times(GET_BALANCE, 1)
    started = time.monotonic()
    held = stub.GetBalance.future(BALANCE_REQUEST, timeout=15)
    time.sleep(0.5)  # the first copy failed and opened the breaker; the next one is held
    assert not held.done()
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1
    assert breaker.for_target(f"127.0.0.1:{port}").state == "open"
    # another call after reset_timeout is the probe; its success closes the breaker
    assert call(stub.GetBalance, BALANCE_REQUEST, timeout=15).account == "alice"
    assert held.result(timeout=15).account == "alice"  # the held copy went out then
    assert time.monotonic() - started >= 0.5
    assert len(servicer.state.calls_to(GET_BALANCE)) == 3


def test_without_a_failure_backoff_an_open_breaker_ends_the_call(make_stub, hedge_ledger) -> None:
    servicer, _ = hedge_ledger
    servicer.slow_first = False
    breaker = CircuitBreaker(fail_max=1, reset_timeout=30, failure_rate=0, probe_every=None)
    stub = make_stub(
        hedging=HedgingPolicy(max_attempts=3, delay=5.0),
        breaker=breaker,
        idempotency=IdempotencyKeys(),
    )
    servicer.state.faults.fail_times(GET_BALANCE, 1)
    with pytest.raises(grpc.RpcError) as caught:
        call(stub.GetBalance, BALANCE_REQUEST, timeout=15)
    assert reason_of(caught.value) is Reason.BREAKER_OPEN
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1


def test_a_winning_latency_hedge_gives_its_withdrawal_back(make_stub, hedge_ledger) -> None:
    servicer, _ = hedge_ledger
    servicer.hold = 0.5  # every first copy is slow: the hedge wins every call
    hedging_budget = RetryBudget(ratio=0.0, min_retries_per_second=0.1, window=10.0)  # one hedge
    stub = make_stub(
        hedging=HedgingPolicy(max_attempts=2, delay=0.05, refund_wins=True),
        hedging_budget=hedging_budget,
        idempotency=IdempotencyKeys(),
    )
    for _ in range(3):  # the budget allows one hedge; refunded, it serves every call
        assert call(stub.GetBalance, BALANCE_REQUEST, timeout=15).account == "alice"
    assert len(servicer.state.calls_to(GET_BALANCE)) == 6
    assert hedging_budget.refused == 0
    assert hedging_budget.balance == pytest.approx(1.0)


def test_without_refund_wins_the_same_budget_allows_one_hedge(make_stub, hedge_ledger) -> None:
    servicer, _ = hedge_ledger
    servicer.hold = 0.3
    hedging_budget = RetryBudget(ratio=0.0, min_retries_per_second=0.1, window=10.0)
    stub = make_stub(
        hedging=HedgingPolicy(max_attempts=2, delay=0.05),
        hedging_budget=hedging_budget,
        idempotency=IdempotencyKeys(),
    )
    for _ in range(3):
        assert call(stub.GetBalance, BALANCE_REQUEST, timeout=15).account == "alice"
    assert len(servicer.state.calls_to(GET_BALANCE)) == 4  # 3 first copies + 1 hedge
    assert hedging_budget.refused == 2
