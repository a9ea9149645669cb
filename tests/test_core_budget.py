"""RetryBudget never lets retries exceed ratio x recent requests + minimum x window."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_grpc import RetryBudget
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
