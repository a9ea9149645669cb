"""FailureWindow: a failure counts exactly when the failure rate over the last calls is high."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient_grpc.core.failure_window import FailureWindow


@given(
    size=st.integers(1, 50),
    threshold=st.floats(0.0, 1.0),
    outcomes=st.lists(st.booleans(), max_size=200),
)
def test_a_failure_counts_iff_the_rate_over_the_window_reaches_the_threshold(
    size: int, threshold: float, outcomes: list[bool]
) -> None:
    window = FailureWindow(size, threshold)
    history: list[bool] = []
    for failed in outcomes:
        history.append(failed)
        recent = history[-size:]
        if failed:
            assert window.failure() == (sum(recent) >= threshold * len(recent))
        else:
            window.success()
        assert window.failure_rate == pytest.approx(sum(recent) / len(recent))


def test_threshold_zero_counts_every_failure_and_clear_forgets() -> None:
    window = FailureWindow(4, 0.0)
    for _ in range(10):
        window.success()
    assert window.failure()
    window.clear()
    assert window.failure_rate == 0.0


@pytest.mark.parametrize(
    ("size", "threshold", "field"),
    [(0, 0.5, "window"), (2.5, 0.5, "window"), (10, -0.1, "failure_rate"), (10, 2, "failure_rate")],
)
def test_bad_values_name_the_field(size: int, threshold: float, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FailureWindow(size, threshold)  # type: ignore[arg-type]
