"""RetryState: the retry decision of one logical call, driven with a fake clock and random source."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient_grpc import RetryBudget, RetryPolicy
from resilient_grpc.core.policy import JITTER_KINDS
from resilient_grpc.core.pushback import Pushback, parse_pushback_ms, pushback_from_metadata
from resilient_grpc.core.retry import DelaySource, Reason, RetryState, TimeoutCause
from tests.helpers import FakeClock

TRANSFER = "/ledger.v1.Ledger/Transfer"


def state(policy: RetryPolicy | None = None, **kwargs: object) -> RetryState:
    kwargs.setdefault("has_key", True)
    return RetryState(policy or RetryPolicy(), method=TRANSFER, **kwargs)  # type: ignore[arg-type]


@given(
    jitter=st.sampled_from(JITTER_KINDS),
    initial=st.floats(0.001, 2.0),
    factor=st.floats(1.0, 50.0),
    multiplier=st.floats(1.0, 5.0),
    max_attempts=st.integers(1, 20),
    timeout=st.floats(0.001, 30.0),
    rng=st.randoms(use_true_random=False),
    attempt_durations=st.lists(st.floats(0.0, 2.0), min_size=20, max_size=20),
)
def test_never_schedules_past_the_deadline_nor_beyond_max_attempts(
    jitter: str,
    initial: float,
    factor: float,
    multiplier: float,
    max_attempts: int,
    timeout: float,
    rng: random.Random,
    attempt_durations: list[float],
) -> None:
    clock = FakeClock(50.0)
    policy = RetryPolicy(
        max_attempts=max_attempts,
        initial_backoff=initial,
        max_backoff=initial * factor,
        multiplier=multiplier,
        jitter=jitter,  # type: ignore[arg-type]
    )
    deadline = clock.now + timeout
    retry = state(policy, deadline=deadline, clock=clock, uniform=rng.uniform)
    for duration in attempt_durations:
        attempt_timeout = retry.begin_attempt()
        assert attempt_timeout is not None and 0 <= attempt_timeout <= timeout + 1e-9
        clock.now += min(duration, attempt_timeout)
        decision = retry.on_failure("UNAVAILABLE")
        if not decision.retry:
            assert decision.reason in {Reason.MAX_ATTEMPTS, Reason.DEADLINE}
            break
        assert 0 <= decision.delay <= policy.max_backoff
        assert clock.now + decision.delay < deadline
        clock.now += decision.delay
    assert retry.attempts <= max_attempts


def test_only_retryable_codes_are_retried() -> None:
    for code in ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "DEADLINE_EXCEEDED"):
        retry = state()
        retry.begin_attempt()
        assert retry.on_failure(code).reason is Reason.NOT_RETRYABLE_CODE
    retry = state(RetryPolicy(retryable_codes={"UNAVAILABLE", "RESOURCE_EXHAUSTED"}))
    retry.begin_attempt()
    assert retry.on_failure("RESOURCE_EXHAUSTED").retry


def test_non_idempotent_call_without_key_is_not_retried() -> None:
    retry = state(has_key=False)
    retry.begin_attempt()
    assert retry.on_failure("UNAVAILABLE").reason is Reason.NOT_IDEMPOTENT
    idempotent = state(RetryPolicy(idempotent_methods={TRANSFER}), has_key=False)
    idempotent.begin_attempt()
    assert idempotent.on_failure("UNAVAILABLE").retry


def test_pushback_overrides_backoff_and_negative_or_malformed_stops() -> None:
    retry = state()
    retry.begin_attempt()
    decision = retry.on_failure("UNAVAILABLE", pushback=parse_pushback_ms("1500"))
    assert (decision.retry, decision.delay, decision.source) == (True, 1.5, DelaySource.PUSHBACK)
    for bad in ("-1", "soon", "", "1.5", b"\xff"):
        retry = state()
        retry.begin_attempt()
        assert retry.on_failure("UNAVAILABLE", pushback=parse_pushback_ms(bad)).reason is (
            Reason.PUSHBACK_STOP
        )


def test_retry_info_overrides_backoff() -> None:
    retry = state()
    retry.begin_attempt()
    decision = retry.on_failure("UNAVAILABLE", retry_info_delay=0.75)
    assert (decision.delay, decision.source) == (0.75, DelaySource.RETRY_INFO)
    retry = state()
    retry.begin_attempt()
    assert retry.on_failure("UNAVAILABLE", retry_info_delay=-1.0).reason is Reason.PUSHBACK_STOP


def test_pushback_past_the_deadline_gives_up() -> None:
    clock = FakeClock(50.0)
    retry = state(deadline=clock.now + 0.3, clock=clock)
    retry.begin_attempt()
    decision = retry.on_failure("UNAVAILABLE", pushback=Pushback(1.0, "pushback"))
    assert decision.reason is Reason.DEADLINE


def test_budget_deposit_per_call_and_withdraw_per_retry() -> None:
    clock = FakeClock(50.0)
    budget = RetryBudget(ratio=0.5, min_retries_per_second=0.0, window=10.0, clock=clock)
    first = state(budget=budget, clock=clock, uniform=lambda a, b: 0.0)
    first.begin_attempt()
    assert first.on_failure("UNAVAILABLE").reason is Reason.BUDGET_EXHAUSTED  # 0.5 < 1
    second = state(budget=budget, clock=clock, uniform=lambda a, b: 0.0)
    second.begin_attempt()
    assert second.on_failure("UNAVAILABLE").retry  # 1.0 >= 1
    second.begin_attempt()
    assert second.on_failure("UNAVAILABLE").reason is Reason.BUDGET_EXHAUSTED
    assert budget.refused == 2


def test_refusals_that_are_not_about_the_budget_do_not_spend_it() -> None:
    budget = RetryBudget(ratio=1.0, min_retries_per_second=0.0, window=10.0)
    retry = state(RetryPolicy(max_attempts=1), budget=budget)
    retry.begin_attempt()
    assert retry.on_failure("UNAVAILABLE").reason is Reason.MAX_ATTEMPTS
    assert budget.balance == 1.0


def test_per_attempt_timeout_is_bounded_by_the_deadline() -> None:
    clock = FakeClock(50.0)
    retry = state(RetryPolicy(per_attempt_timeout=0.5), deadline=clock.now + 0.2, clock=clock)
    assert retry.begin_attempt() == pytest.approx(0.2)
    assert state(RetryPolicy(per_attempt_timeout=0.5)).begin_attempt() == 0.5
    assert state().begin_attempt() is None


def test_pushback_is_read_from_trailing_metadata() -> None:
    assert pushback_from_metadata(None) is None
    assert pushback_from_metadata([("other", "1")]) is None
    found = pushback_from_metadata([("grpc-retry-pushback-ms", "20")])
    assert found is not None and found.delay == 0.02


def test_aborted_with_pushback_is_retried_for_keyed_calls_only() -> None:
    """The dedup server's "same key in flight, come back in N ms" answer."""
    keyed = state()
    keyed.begin_attempt()
    decision = keyed.on_failure("ABORTED", pushback=parse_pushback_ms("40"))
    assert (decision.retry, decision.delay, decision.source) == (True, 0.04, DelaySource.PUSHBACK)
    keyless = state(RetryPolicy(idempotent_methods={TRANSFER}), has_key=False)
    keyless.begin_attempt()
    assert keyless.on_failure("ABORTED", pushback=parse_pushback_ms("40")).reason is (
        Reason.NOT_RETRYABLE_CODE
    )
    bare = state()
    bare.begin_attempt()
    assert bare.on_failure("ABORTED").reason is Reason.NOT_RETRYABLE_CODE
    stop = state()
    stop.begin_attempt()
    assert stop.on_failure("ABORTED", pushback=parse_pushback_ms("-1")).reason is (
        Reason.NOT_RETRYABLE_CODE
    )


# Pushback bounds (issue 9, item 6) ---------------------------------------------------------------


@given(ms=st.integers(0, 2**40))
def test_pushback_beyond_int32_is_malformed(ms: int) -> None:
    parsed = parse_pushback_ms(str(ms))
    if ms <= 2**31 - 1:
        assert parsed.delay == ms / 1000.0
    else:
        assert parsed.stop


@given(
    max_pushback=st.floats(0.001, 120.0),
    pushback_ms=st.integers(0, 2**31 - 1),
    retry_info=st.one_of(st.none(), st.floats(0.0, 1e7)),
)
def test_a_server_requested_delay_never_exceeds_max_pushback(
    max_pushback: float, pushback_ms: int, retry_info: float | None
) -> None:
    retry = state(RetryPolicy(max_attempts=3, max_pushback=max_pushback))
    retry.begin_attempt()
    with_pushback = retry.on_failure("UNAVAILABLE", pushback=parse_pushback_ms(str(pushback_ms)))
    assert with_pushback.retry and with_pushback.delay <= max_pushback
    assert with_pushback.delay == min(pushback_ms / 1000.0, max_pushback)
    if retry_info is not None:
        retry.begin_attempt()
        with_info = retry.on_failure("UNAVAILABLE", retry_info_delay=retry_info)
        assert with_info.retry and with_info.delay == min(retry_info, max_pushback)


def test_an_hour_of_pushback_on_a_call_without_deadline_waits_only_max_pushback() -> None:
    retry = state(RetryPolicy())
    retry.begin_attempt()
    decision = retry.on_failure("UNAVAILABLE", pushback=parse_pushback_ms("3600000"))
    assert decision.retry and decision.delay == 60.0  # the documented default


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, "60"])
def test_max_pushback_is_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="max_pushback"):
        RetryPolicy(max_pushback=bad)  # type: ignore[arg-type]


@given(pushbacks=st.lists(st.booleans(), min_size=1, max_size=12))
def test_backoff_restarts_from_initial_backoff_after_a_server_delay(pushbacks: list[bool]) -> None:
    """gRFC A6: after a pushback the next computed backoff is ``initial_backoff`` again."""
    policy = RetryPolicy(
        max_attempts=20, initial_backoff=0.1, max_backoff=100.0, multiplier=2.0, jitter="none"
    )
    retry = state(policy)
    since_pushback = 0
    for use_pushback in pushbacks:
        retry.begin_attempt()
        if use_pushback:
            decision = retry.on_failure("UNAVAILABLE", pushback=parse_pushback_ms("7"))
            assert decision.delay == 0.007
            since_pushback = 0
        else:
            decision = retry.on_failure("UNAVAILABLE")
            since_pushback += 1
            assert decision.delay == pytest.approx(policy.base_backoff(since_pushback))
        assert decision.retry


# Per-attempt timeouts vs the caller's deadline (item 5) ---------------------------------------


def test_an_attempt_cut_by_per_attempt_timeout_is_retried_whatever_the_codes() -> None:
    clock = FakeClock(50.0)
    retry = state(RetryPolicy(per_attempt_timeout=0.5), deadline=clock.now + 10.0, clock=clock)
    assert retry.begin_attempt() == 0.5
    clock.now += 0.5
    assert retry.timeout_cause() is TimeoutCause.ATTEMPT
    assert retry.on_failure("DEADLINE_EXCEEDED").retry
    no_deadline = state(RetryPolicy(per_attempt_timeout=0.5), clock=clock)
    no_deadline.begin_attempt()
    clock.now += 0.6
    assert no_deadline.on_failure("DEADLINE_EXCEEDED").retry


def test_a_server_deadline_exceeded_follows_retryable_codes() -> None:
    clock = FakeClock(50.0)
    retry = state(RetryPolicy(per_attempt_timeout=0.5), deadline=clock.now + 10.0, clock=clock)
    retry.begin_attempt()
    clock.now += 0.1  # the server answered DEADLINE_EXCEEDED long before the attempt's time
    assert retry.timeout_cause() is None
    assert retry.on_failure("DEADLINE_EXCEEDED").reason is Reason.NOT_RETRYABLE_CODE
    listed = state(
        RetryPolicy(per_attempt_timeout=0.5, retryable_codes={"UNAVAILABLE", "DEADLINE_EXCEEDED"}),
        clock=clock,
    )
    listed.begin_attempt()
    clock.now += 0.1
    assert listed.on_failure("DEADLINE_EXCEEDED").retry


def test_the_callers_own_deadline_is_not_retried() -> None:
    clock = FakeClock(50.0)
    retry = state(RetryPolicy(per_attempt_timeout=5.0), deadline=clock.now + 0.3, clock=clock)
    assert retry.begin_attempt() == pytest.approx(0.3)
    clock.now += 0.3
    assert retry.timeout_cause() is TimeoutCause.CALL
    assert not retry.on_failure("DEADLINE_EXCEEDED").retry


@given(
    per_attempt=st.one_of(st.none(), st.floats(0.01, 5.0)),
    timeout=st.one_of(st.none(), st.floats(0.01, 5.0)),
    elapsed=st.floats(0.0, 6.0),
)
def test_timeout_cause_names_the_deadline_that_bound_the_attempt(
    per_attempt: float | None, timeout: float | None, elapsed: float
) -> None:
    clock = FakeClock(50.0)
    deadline = None if timeout is None else clock.now + timeout
    retry = state(RetryPolicy(per_attempt_timeout=per_attempt), deadline=deadline, clock=clock)
    started = clock.now
    attempt_timeout = retry.begin_attempt()
    clock.now += elapsed
    cause = retry.timeout_cause()
    if attempt_timeout is None or clock.now < started + attempt_timeout:
        assert cause is None
    elif deadline is not None and (per_attempt is None or deadline - started <= per_attempt):
        assert cause is TimeoutCause.CALL
    else:
        assert cause is TimeoutCause.ATTEMPT


# Budget accounting (items 1 and 8) ------------------------------------------------------------


def test_a_call_deposits_only_when_its_first_attempt_starts() -> None:
    budget = RetryBudget(ratio=1.0, min_retries_per_second=0.0, window=10.0)
    for _ in range(100):
        state(budget=budget)  # refused before sending (breaker open): not traffic
    assert budget.balance == 0.0
    state(budget=budget).begin_attempt()
    assert budget.balance == 1.0


def test_abandoning_a_call_refunds_a_retry_that_was_never_sent() -> None:
    budget = RetryBudget(ratio=1.0, min_retries_per_second=0.0, window=10.0)
    retry = state(budget=budget)
    retry.begin_attempt()
    assert retry.on_failure("UNAVAILABLE").retry
    assert budget.balance == 0.0
    retry.abandon()  # cancelled during the backoff
    assert budget.balance == 1.0
    retry.abandon()  # idempotent
    assert budget.balance == 1.0
    sent = state(budget=budget)
    sent.begin_attempt()
    assert sent.on_failure("UNAVAILABLE").retry
    sent.begin_attempt()  # the retry went out: cancelling now refunds nothing
    sent.abandon()
    assert budget.balance == 1.0  # 2 deposits - 1 retry sent
