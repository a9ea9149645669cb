"""AdaptiveThrottle: the SRE book's client-side throttling, driven with a fake clock and random source."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient_grpc import AdaptiveThrottle
from tests.helpers import FakeClock


def formula(requests: int, accepts: int, k: float) -> float:
    return max(0.0, (requests - k * accepts) / (requests + 1))


@given(
    k=st.floats(1.0, 10.0),
    outcomes=st.lists(st.booleans(), max_size=200),
    draws=st.lists(st.floats(0.0, 0.999999), min_size=200, max_size=200),
)
def test_rejects_exactly_with_the_formulas_probability(
    k: float, outcomes: list[bool], draws: list[float]
) -> None:
    """An admission draws once while max(0, (requests - k accepts)/(requests + 1)) > 0 and
    rejects when the draw is below it; a rejected request counts as a request too."""
    clock = FakeClock()
    values = iter(draws)
    taken: list[float] = []

    def uniform() -> float:
        taken.append(next(values))
        return taken[-1]

    throttle = AdaptiveThrottle(
        k=k, window=60.0, clock=clock, uniform=uniform, max_rejection=1.0, recovery=None
    )
    accepts = 0
    for requests, accepted in enumerate(outcomes):
        probability = formula(requests, accepts, k)
        assert throttle.rejection_probability == pytest.approx(probability)
        assert 0.0 <= probability < 1.0
        drawn = len(taken)
        admitted = throttle.admit()
        if probability > 0.0:
            assert len(taken) == drawn + 1
            assert admitted == (taken[-1] >= probability)
        else:
            assert admitted and len(taken) == drawn
        if admitted:
            throttle.record(accepted)
            accepts += accepted
        assert throttle.counts == (requests + 1, accepts)


@given(calls=st.integers(0, 500), draws=st.lists(st.floats(0.0, 1.0), min_size=1))
def test_never_rejects_while_the_backend_accepts_everything(calls: int, draws: list[float]) -> None:
    clock = FakeClock()
    values = iter(draws * (calls // len(draws) + 1))
    throttle = AdaptiveThrottle(clock=clock, uniform=lambda: next(values))
    for _ in range(calls):
        assert throttle.admit()
        throttle.record(True)
        clock.now += 0.01
    assert throttle.rejection_probability == 0.0
    assert throttle.rejected == 0


@given(failures=st.integers(1, 300), k=st.floats(1.0, 4.0))
def test_an_outage_drives_the_probability_up_and_it_is_forgotten_after_the_window(
    failures: int, k: float
) -> None:
    clock = FakeClock()
    throttle = AdaptiveThrottle(k=k, window=10.0, clock=clock, uniform=lambda: 0.999999)
    for _ in range(failures):
        if throttle.admit():
            throttle.record(False)
    assert throttle.rejection_probability == pytest.approx(min(0.9, failures / (failures + 1)))
    clock.now += 10.0  # a whole window later, the outage is history
    assert throttle.rejection_probability == 0.0
    assert throttle.counts == (0, 0)


def test_with_the_books_formula_alone_an_outage_is_forgotten_only_after_windows() -> None:
    """Accepts coming back and the outage's requests leaving the window bring it down.

    Requests rejected locally count as requests (the SRE book's definition), so after a total
    outage the admitted share roughly doubles per window (k = 2): a few windows, not one. This
    is the behaviour ``max_rejection`` and ``recovery`` (turned off here) exist to bound.
    """
    clock = FakeClock()
    throttle = AdaptiveThrottle(
        k=2.0,
        window=10.0,
        clock=clock,
        uniform=random.Random(7).random,
        max_rejection=1.0,
        recovery=None,
    )

    def second(healthy: bool) -> None:  # 100 calls in one second
        for _ in range(100):
            if throttle.admit():
                throttle.record(healthy)
            clock.now += 0.01

    for _ in range(5):
        second(healthy=False)
    seen = [throttle.rejection_probability]
    assert seen[0] > 0.9
    sent_during_outage = throttle.counts[0] - throttle.rejected
    assert sent_during_outage < 0.2 * 500  # the backend was spared most of the outage's calls
    for _ in range(50):
        second(healthy=True)
        seen.append(throttle.rejection_probability)
    assert seen[-1] == 0.0
    assert 10 < seen.index(0.0) <= 40  # more than a window, within 4 windows
    # it only falls (a little noise from the random draws aside)
    assert all(later <= earlier + 0.02 for earlier, later in itertools.pairwise(seen))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"k": 0.5}, "k"),
        ({"k": math.nan}, "k"),
        ({"k": "2"}, "k"),
        ({"window": 0}, "window"),
        ({"window": math.inf}, "window"),
        ({"codes": ["NOPE"]}, "codes"),
        ({"codes": ["OK"]}, "codes"),
        ({"codes": "UNAVAILABLE"}, "codes"),
        ({"max_rejection": 0}, "max_rejection"),
        ({"max_rejection": 1.5}, "max_rejection"),
        ({"recovery": 0}, "recovery"),
        ({"recovery": 2.5}, "recovery"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AdaptiveThrottle(**kwargs)  # type: ignore[arg-type]


def test_business_errors_are_accepts() -> None:
    throttle = AdaptiveThrottle()
    assert throttle.accepts("NOT_FOUND") and throttle.accepts("OK")
    assert not throttle.accepts("UNAVAILABLE") and not throttle.accepts("RESOURCE_EXHAUSTED")


@given(
    outcomes=st.lists(st.booleans(), max_size=300),
    cap=st.floats(0.05, 1.0),
)
def test_the_probability_never_exceeds_max_rejection(outcomes: list[bool], cap: float) -> None:
    clock = FakeClock()
    throttle = AdaptiveThrottle(clock=clock, uniform=random.Random(1).random, max_rejection=cap)
    for accepted in outcomes:
        assert 0.0 <= throttle.rejection_probability <= cap
        if throttle.admit():
            throttle.record(accepted)
        clock.now += 0.01


def test_accepts_in_a_row_while_rejecting_clear_the_window() -> None:
    clock = FakeClock()
    throttle = AdaptiveThrottle(clock=clock, uniform=lambda: 0.999999, recovery=5)
    for _ in range(50):
        throttle.record(False)
    assert throttle.rejection_probability == 0.9
    for _ in range(4):
        throttle.record(True)
    assert throttle.rejection_probability > 0.0
    throttle.record(False)  # a refusal breaks the run
    for _ in range(4):
        throttle.record(True)
    assert throttle.rejection_probability > 0.0
    throttle.record(True)  # the fifth in a row
    assert throttle.rejection_probability == 0.0 and throttle.counts == (0, 0)


def simulate_outage(
    throttle_options: dict[str, object],
    *,
    rate: int = 100,
    outage: tuple[float, float] = (2, 7),
    seconds: int = 20,
) -> tuple[float, float, int]:
    """100 logical calls a second through the sans-IO stack (RetryState with a shared budget and
    throttle, three attempts, no waiting between them) to a backend that refuses everything
    (UNAVAILABLE) during ``outage``. Returns (attempts sent per logical call during the outage,
    seconds after the outage until the last failed call, calls that failed after it)."""
    from resilient_grpc import RetryBudget, RetryPolicy
    from resilient_grpc.core.retry import RetryState

    clock = FakeClock()
    start = clock.now
    budget = RetryBudget(clock=clock)
    throttle = AdaptiveThrottle(clock=clock, uniform=random.Random(11).random, **throttle_options)  # type: ignore[arg-type]
    policy = RetryPolicy(max_attempts=3)
    calls_during = sent_during = failed_after = 0
    last_failure = 0.0
    for tick in range(rate * seconds):
        clock.now = start + tick / rate
        elapsed = clock.now - start
        down = outage[0] <= elapsed < outage[1]
        state = RetryState(policy, method="/a.B/C", has_key=True, budget=budget, clock=clock)
        calls_during += down
        ok = False
        while True:
            if not throttle.admit():
                break
            state.begin_attempt()
            sent_during += down
            throttle.record(not down)
            if not down:
                ok = True
                break
            if not state.on_failure("UNAVAILABLE").retry:
                break
        if not ok and elapsed >= outage[1]:
            failed_after += 1
            last_failure = elapsed - outage[1]
    return sent_during / calls_during, last_failure, failed_after


def test_recovery_after_a_total_outage_is_bounded_and_the_outage_is_not_amplified() -> None:
    """The deterministic proof for issue 11's third bullet, on a fake clock: with the defaults,
    calls succeed again within half a second of the backend's return (the book's formula alone:
    more than 5 s), while the outage itself gets at most 1.1 attempts per logical call."""
    amplification, recovered, failed = simulate_outage({})
    assert amplification <= 1.1
    assert recovered <= 0.5 and failed <= 50
    book_amplification, book_recovered, book_failed = simulate_outage(
        {"max_rejection": 1.0, "recovery": None}
    )
    assert book_amplification <= 1.1
    assert book_recovered > 5.0 and book_failed > 10 * failed


def test_recovery_after_an_outage_longer_than_the_window_is_bounded() -> None:
    """A 13 s outage empties the 10 s window of accepts: the capped probability still lets one
    call in ten out, and 20 accepts in a row (2 s at 100 calls/s) clear the window; the book's
    formula alone takes more than 10 s."""
    amplification, recovered, failed_calls = simulate_outage({}, outage=(2, 15), seconds=30)
    assert amplification <= 1.1
    assert recovered <= 3.0 and failed_calls < 300
    _, book_recovered, _ = simulate_outage(
        {"max_rejection": 1.0, "recovery": None}, outage=(2, 15), seconds=30
    )
    assert book_recovered > 10.0
