"""AdaptiveThrottle: the SRE book's client-side throttling, driven with a fake clock and random source."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient_grpc import AdaptiveThrottle


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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

    throttle = AdaptiveThrottle(k=k, window=60.0, clock=clock, uniform=uniform)
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
    assert throttle.rejection_probability == pytest.approx(failures / (failures + 1))
    clock.now += 10.0  # a whole window later, the outage is history
    assert throttle.rejection_probability == 0.0
    assert throttle.counts == (0, 0)


def test_after_an_outage_the_probability_falls_back_to_zero() -> None:
    """Accepts coming back and the outage's requests leaving the window bring it down.

    Requests rejected locally count as requests (the SRE book's definition), so after a total
    outage the admitted share roughly doubles per window (k = 2): a few windows, not one.
    """
    clock = FakeClock()
    throttle = AdaptiveThrottle(k=2.0, window=10.0, clock=clock, uniform=random.Random(7).random)

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
    assert seen.index(0.0) <= 40  # within 4 windows
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
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AdaptiveThrottle(**kwargs)  # type: ignore[arg-type]


def test_business_errors_are_accepts() -> None:
    throttle = AdaptiveThrottle()
    assert throttle.accepts("NOT_FOUND") and throttle.accepts("OK")
    assert not throttle.accepts("UNAVAILABLE") and not throttle.accepts("RESOURCE_EXHAUSTED")
