"""RetryBudget never lets retries exceed ratio x recent requests + minimum x window."""

from __future__ import annotations

import threading

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from resilient_grpc import RetryBudget, RetryPolicy
from resilient_grpc.core.retry import RetryState
from tests.helpers import FakeClock, run_threads

events = st.lists(
    st.tuples(
        st.sampled_from(["deposit", "withdraw"]),
        st.floats(min_value=0.0, max_value=3.0, allow_nan=False),
    ),
    max_size=300,
)


@settings(max_examples=300)
@given(
    ratio=st.floats(min_value=0.0, max_value=1.0),
    min_per_second=st.floats(min_value=0.0, max_value=5.0),
    window=st.floats(min_value=0.5, max_value=20.0),
    script=events,
)
def test_admitted_retries_never_exceed_the_budget(
    ratio: float, min_per_second: float, window: float, script: list[tuple[str, float]]
) -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio, min_per_second, window, clock=clock)
    deposits: list[float] = []
    admitted: list[float] = []
    for action, advance in script:
        clock.now += advance
        if action == "deposit":
            budget.deposit()
            deposits.append(clock.now)
        elif budget.try_withdraw():
            admitted.append(clock.now)
            # The invariant, checked from the outside at every admission, over the trailing window.
            recent_requests = sum(1 for t in deposits if t > clock.now - window)
            recent_retries = sum(1 for t in admitted if t > clock.now - window)
            assert recent_retries <= ratio * recent_requests + min_per_second * window + 1e-6


@given(n=st.integers(0, 2000))
def test_ratio_only_budget_admits_exactly_floor_of_ratio(n: int) -> None:
    clock = FakeClock()
    budget = RetryBudget(0.1, 0.0, 10.0, clock=clock)
    for _ in range(n):
        budget.deposit()
    admitted = sum(budget.try_withdraw() for _ in range(n))
    assert admitted == n // 10
    assert budget.refused == n - n // 10


def test_budget_refills_as_the_window_slides() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.5, 0.0, 1.0, clock=clock)
    for _ in range(4):
        budget.deposit()
    assert [budget.try_withdraw() for _ in range(3)] == [True, True, False]
    clock.now += 1.01  # deposits and withdrawals both expire
    assert budget.balance == 0
    budget.deposit()
    budget.deposit()
    assert budget.try_withdraw()


def test_minimum_allows_retries_at_low_traffic() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.1, 1.0, 2.0, clock=clock)
    assert [budget.try_withdraw() for _ in range(3)] == [True, True, False]


def test_concurrent_threads_never_overdraw() -> None:
    budget = RetryBudget(0.2, 0.0, 60.0)
    for _ in range(1000):
        budget.deposit()
    admitted: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        local = [budget.try_withdraw() for _ in range(200)]
        with lock:
            admitted.extend(local)

    run_threads(worker, 8)
    assert sum(admitted) == 200
    assert budget.refused == 8 * 200 - 200


# Refunds give back the refunding call's own withdrawal -----------------------------------------


def test_refund_at_removes_that_withdrawal_and_refund_without_it_the_latest() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(1.0, 0.0, 10.0, clock=clock)
    for _ in range(3):
        budget.deposit()
    first = budget.withdraw()
    assert first == 0.0  # a withdrawal at time 0 is still a withdrawal, not a refusal
    clock.now = 5.0
    assert budget.withdraw() == 5.0
    budget.refund(first)  # the call that withdrew at 0 gives its retry back
    clock.now = 10.5  # the deposits (and a withdrawal at 0) have left the window
    budget.deposit()
    budget.deposit()
    assert budget.balance == pytest.approx(1.0)  # 2 deposits - the retry of 5.0, still counted
    budget.refund(first)  # gone already: nothing else is given back
    assert budget.balance == pytest.approx(1.0)
    budget.refund()  # documented: the latest
    assert budget.balance == pytest.approx(2.0)
    budget.refund()  # none left: no-op
    assert budget.balance == pytest.approx(2.0)


def _retries_within_budget(
    ratio: float,
    reserve: float,
    window: float,
    deposits: list[float],
    retries: list[float],
    now: float,
) -> bool:
    recent_requests = sum(1 for t in deposits if t > now - window)
    recent_retries = sum(1 for t in retries if t > now - window)
    return recent_retries <= ratio * recent_requests + reserve + 1e-6


def test_a_call_refunding_its_older_retry_does_not_free_a_newer_one_early() -> None:
    """Call A is granted a retry at 0, call B one at 5; A is cancelled during its backoff and B
    sends its retry. Refunding the latest withdrawal (B's) left A's in the budget, which
    expired at 10: from then until 15 the budget allowed a retry more than the ratio."""
    clock = FakeClock(0.0)
    budget = RetryBudget(1.0, 0.0, 10.0, clock=clock)
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.1, max_backoff=0.1)
    deposits: list[float] = []
    granted: list[float] = []

    def call() -> RetryState:
        retry = RetryState(policy, method="/m/M", has_key=True, budget=budget, clock=clock)
        retry.begin_attempt()
        deposits.append(clock.now)
        return retry

    a, b = call(), call()  # 2 calls: 2 retries allowed in any 10 s
    assert a.on_failure("UNAVAILABLE").retry
    clock.now = 5.0
    assert b.on_failure("UNAVAILABLE").retry
    granted.append(clock.now)
    clock.now = 6.0
    a.abandon()  # A is cancelled during its backoff: its retry is given back
    b.begin_attempt()  # B's retry is sent: it counts until 15
    clock.now = 10.5  # the calls at 0 have left the window
    c, d = call(), call()  # 2 calls: 2 retries, B's among them
    assert c.on_failure("UNAVAILABLE").retry
    granted.append(clock.now)
    assert _retries_within_budget(1.0, 0.0, 10.0, deposits, granted, clock.now)
    assert not d.on_failure("UNAVAILABLE").retry
    assert budget.refused == 1
    clock.now = 15.5  # B's retry has left the window too
    assert d.on_failure("UNAVAILABLE").retry


refund_scripts = st.lists(
    st.tuples(
        st.sampled_from(["call", "fail", "send", "cancel"]),
        st.integers(min_value=0, max_value=7),
        st.sampled_from([0.0, 0.0, 0.25, 1.0, 2.5]),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(
    ratio=st.sampled_from([0.0, 0.1, 0.5, 1.0]) | st.floats(min_value=0.0, max_value=1.0),
    min_per_second=st.sampled_from([0.0, 0.2]),
    window=st.sampled_from([1.0, 2.0, 5.0]) | st.floats(min_value=0.5, max_value=10.0),
    script=refund_scripts,
)
@example(  # A granted, B granted, A cancelled: B's withdrawal must outlive A's (found by hand)
    ratio=1.0,
    min_per_second=0.0,
    window=5.0,
    script=[
        ("call", 0, 0.0),
        ("call", 0, 0.0),
        ("fail", 0, 0.0),
        ("fail", 1, 2.5),
        ("cancel", 0, 0.0),
        ("send", 1, 0.0),
        ("call", 0, 2.5),
        ("fail", 2, 0.25),
    ],
)
def test_retries_granted_never_exceed_the_budget_when_calls_refund(
    ratio: float,
    min_per_second: float,
    window: float,
    script: list[tuple[str, int, float]],
) -> None:
    """Calls (RetryState) sharing a budget are granted retries, send some and are cancelled
    during the backoff of others (a refund). At every grant, the retries granted in the
    trailing window and not refunded stay within ratio x calls + reserve, whichever call's
    withdrawal was refunded before."""
    clock = FakeClock()
    budget = RetryBudget(ratio, min_per_second, window, clock=clock)
    policy = RetryPolicy(max_attempts=1000, initial_backoff=0.01, max_backoff=0.01)
    calls: list[RetryState] = []
    waiting: dict[int, float] = {}  # call -> when its retry (not sent yet) was granted
    deposits: list[float] = []
    sent: list[float] = []  # when each retry sent was granted
    reserve = min_per_second * window
    for action, pick, advance in script:
        clock.now += advance
        if action == "call" or not calls:
            retry = RetryState(policy, method="/m/M", has_key=True, budget=budget, clock=clock)
            retry.begin_attempt()
            deposits.append(clock.now)
            calls.append(retry)
            continue
        index = pick % len(calls)
        retry = calls[index]
        if action == "fail" and index not in waiting:
            if retry.on_failure("UNAVAILABLE").retry:
                waiting[index] = clock.now
                granted = sent + list(waiting.values())
                assert _retries_within_budget(ratio, reserve, window, deposits, granted, clock.now)
        elif action == "send" and index in waiting:
            sent.append(waiting.pop(index))
            retry.begin_attempt()
        elif action == "cancel" and index in waiting:
            del waiting[index]
            retry.abandon()
