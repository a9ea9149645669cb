"""Properties of the jittered backoff: always within its bounds, exactly as the design defines it."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient_grpc.core.backoff import jittered_backoff
from resilient_grpc.core.policy import JITTER_KINDS, RetryPolicy

positive = st.floats(min_value=1e-4, max_value=100.0, allow_nan=False, allow_infinity=False)


@st.composite
def policies(draw: st.DrawFn) -> RetryPolicy:
    initial = draw(positive)
    maximum = draw(st.floats(min_value=initial, max_value=initial * 1e4))
    return RetryPolicy(
        max_attempts=draw(st.integers(1, 50)),
        initial_backoff=initial,
        max_backoff=maximum,
        multiplier=draw(st.floats(min_value=1.0, max_value=10.0)),
        jitter=draw(st.sampled_from(JITTER_KINDS)),
    )


@given(policies(), st.integers(1, 10_000), st.randoms(use_true_random=False))
def test_delay_within_bounds_for_every_jitter(
    policy: RetryPolicy, retry_number: int, rng: random.Random
) -> None:
    base = policy.base_backoff(retry_number)
    assert policy.initial_backoff <= base <= policy.max_backoff
    previous = None
    for n in range(retry_number, retry_number + 5):
        base = policy.base_backoff(n)
        delay = jittered_backoff(policy, n, previous, rng.uniform)
        assert 0.0 <= delay <= policy.max_backoff
        if policy.jitter == "none":
            assert delay == base
        elif policy.jitter == "full":
            assert delay <= base
        elif policy.jitter == "equal":
            assert base / 2 <= delay <= base
        else:
            assert policy.initial_backoff <= delay <= policy.max_backoff
            bound = 3 * max(previous or policy.initial_backoff, policy.initial_backoff)
            assert delay <= bound
        previous = delay


@given(policies())
def test_base_backoff_is_monotonic_and_capped(policy: RetryPolicy) -> None:
    delays = [policy.base_backoff(n) for n in range(1, 60)]
    assert delays == sorted(delays)
    assert delays[0] == pytest.approx(policy.initial_backoff)
    assert max(delays) <= policy.max_backoff


def test_base_backoff_matches_the_design_formula() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter="none")
    assert [policy.base_backoff(n) for n in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])


def test_huge_retry_numbers_do_not_overflow() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=3.0, multiplier=10.0)
    assert policy.base_backoff(10**6) == 3.0


def test_jitter_shapes_use_the_random_source() -> None:
    low = lambda a, b: a  # noqa: E731 - scripted random source
    high = lambda a, b: b  # noqa: E731
    policy = RetryPolicy(initial_backoff=0.2, max_backoff=10.0, multiplier=2.0, jitter="full")
    assert jittered_backoff(policy, 2, None, low) == 0.0
    assert jittered_backoff(policy, 2, None, high) == pytest.approx(0.4)
    equal = policy.with_changes(jitter="equal")
    assert jittered_backoff(equal, 2, None, low) == pytest.approx(0.2)
    decorrelated = policy.with_changes(jitter="decorrelated")
    assert jittered_backoff(decorrelated, 1, None, high) == pytest.approx(0.6)
    assert jittered_backoff(decorrelated, 2, 0.6, high) == pytest.approx(1.8)
    assert jittered_backoff(decorrelated, 9, 9.0, high) == 10.0
