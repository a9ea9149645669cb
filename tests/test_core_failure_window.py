"""FailureWindow: a failure counts exactly when the failure rate over the last seconds is high."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient_grpc.core.failure_window import SLOTS, FailureWindow
from tests.helpers import FakeClock


@given(
    seconds=st.sampled_from([0.5, 1.0, 10.0]),
    threshold=st.floats(0.0, 1.0),
    events=st.lists(st.tuples(st.booleans(), st.floats(0.0, 0.3)), max_size=200),
)
def test_a_failure_counts_iff_the_rate_over_the_window_reaches_the_threshold(
    seconds: float, threshold: float, events: list[tuple[bool, float]]
) -> None:
    clock = FakeClock(100.0)
    window = FailureWindow(seconds, threshold, clock=clock)
    width = seconds / SLOTS
    history: list[tuple[int, bool]] = []  # (slot number, failed)
    for failed, advance in events:
        clock.now += advance
        slot = int(clock.now // width)
        history.append((slot, failed))
        # The reference: every outcome whose slot is one of the last SLOTS slots.
        recent = [f for s, f in history if s > slot - SLOTS]
        rate = sum(recent) / len(recent)
        if failed:
            assert window.failure() == (sum(recent) >= threshold * len(recent))
        else:
            window.success()
        assert window.failure_rate == pytest.approx(rate)


def test_a_burst_among_many_successes_does_not_count_but_a_run_of_failures_does() -> None:
    clock = FakeClock(100.0)
    window = FailureWindow(1.0, 0.5, clock=clock)
    for _ in range(90):
        window.success()
        clock.now += 0.005
    assert not any(window.failure() for _ in range(10))  # 10 of 100: 10 %
    clock.now += 1.0  # the successes age out
    assert window.failure()


def test_threshold_zero_counts_every_failure_and_clear_forgets() -> None:
    window = FailureWindow(1.0, 0.0)
    for _ in range(10):
        window.success()
    assert window.failure()
    window.clear()
    assert window.failure_rate == 0.0


@pytest.mark.parametrize(
    ("seconds", "threshold", "field"),
    [
        (0, 0.5, "window"),
        (float("inf"), 0.5, "window"),
        (True, 0.5, "window"),
        (1.0, -0.1, "failure_rate"),
        (1.0, 2, "failure_rate"),
    ],
)
def test_bad_values_name_the_field(seconds: float, threshold: float, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FailureWindow(seconds, threshold)
