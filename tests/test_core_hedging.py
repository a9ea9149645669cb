"""The sans-IO hedging state machine (gRFC A6) and HedgingPolicy validation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_grpc import RetryBudget
from resilient_grpc.core.hedging import HedgingPolicy, HedgingState, Verdict
from resilient_grpc.core.pushback import Pushback
from resilient_grpc.core.retry import Reason
from tests.helpers import FakeClock


def make(policy: HedgingPolicy, **kwargs: object) -> tuple[HedgingState, FakeClock]:
    clock = FakeClock(100.0)
    kwargs.setdefault("hedgeable", True)
    return HedgingState(policy, clock=clock, **kwargs), clock  # type: ignore[arg-type]


def test_first_at_once_then_one_every_delay_while_none_answered() -> None:
    state, clock = make(HedgingPolicy(max_attempts=3, delay=0.5))
    assert state.begin() == 1
    assert not state.due() and state.hedge() is None
    clock.now += 0.49
    assert not state.due()
    clock.now += 0.01
    assert state.hedge() == 2
    clock.now += 0.5
    assert state.hedge() == 3
    clock.now += 10
    assert state.hedge() is None  # max_attempts reached
    assert state.in_flight == {1, 2, 3}


def test_first_ok_or_fatal_answer_commits_and_late_answers_are_ignored() -> None:
    state, clock = make(HedgingPolicy(max_attempts=3, delay=0.1))
    state.begin()
    clock.now += 0.1
    state.hedge()
    answer = state.on_answer(2, "NOT_FOUND")  # fatal: the call's answer
    assert answer.verdict is Verdict.COMMIT and answer.reason is Reason.NOT_RETRYABLE_CODE
    assert state.in_flight == {1}  # the shell cancels it
    clock.now += 1
    assert not state.due()
    assert state.on_answer(1, "OK").verdict is Verdict.WAIT


def test_a_non_fatal_failure_sends_the_next_copy_at_once() -> None:
    state, _ = make(HedgingPolicy(max_attempts=3, delay=10.0))
    state.begin()
    assert state.on_answer(1, "UNAVAILABLE").verdict is Verdict.WAIT
    assert state.hedge() == 2  # no 10 s wait
    assert state.on_answer(2, "UNAVAILABLE").verdict is Verdict.WAIT
    assert state.hedge() == 3
    answer = state.on_answer(3, "UNAVAILABLE")
    assert answer.verdict is Verdict.GIVE_UP and answer.reason is Reason.MAX_ATTEMPTS


def test_pushback_sets_the_next_hedge_and_a_negative_one_stops_hedging() -> None:
    state, clock = make(HedgingPolicy(max_attempts=4, delay=0.1))
    state.begin()
    clock.now += 0.1
    state.hedge()
    assert state.on_answer(1, "UNAVAILABLE", pushback=Pushback(2.0, "pushback")).verdict is (
        Verdict.WAIT
    )
    clock.now += 1.9
    assert not state.due()
    clock.now += 0.1
    assert state.hedge() == 3
    answer = state.on_answer(3, "UNAVAILABLE", pushback=Pushback(None, "pushback"))
    assert answer.verdict is Verdict.WAIT  # attempt 2 is still in flight
    clock.now += 5
    assert state.hedge() is None and state.stopped is Reason.PUSHBACK_STOP
    answer = state.on_answer(2, "UNAVAILABLE")
    assert answer.verdict is Verdict.GIVE_UP and answer.reason is Reason.PUSHBACK_STOP


def test_pushback_is_capped_by_max_pushback() -> None:
    state, clock = make(HedgingPolicy(max_attempts=2, delay=0.1, max_pushback=1.0))
    state.begin()
    state.on_answer(1, "UNAVAILABLE", pushback=Pushback(3600.0, "pushback"))
    clock.now += 1.0
    assert state.hedge() == 2


def test_each_hedge_withdraws_from_the_budget_and_a_refusal_stops_hedging() -> None:
    clock = FakeClock(100.0)
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.1, window=10.0, clock=clock)
    state = HedgingState(
        HedgingPolicy(max_attempts=3, delay=0.1), hedgeable=True, budget=budget, clock=clock
    )
    state.begin()
    clock.now += 0.1
    assert state.hedge() == 2  # the budget's one retry
    clock.now += 0.1
    assert state.hedge() is None and state.stopped is Reason.BUDGET_EXHAUSTED
    assert budget.refused == 1


def test_no_hedge_past_the_deadline() -> None:
    clock = FakeClock(100.0)
    state = HedgingState(
        HedgingPolicy(max_attempts=3, delay=1.0), hedgeable=True, deadline=100.5, clock=clock
    )
    state.begin()
    assert state.attempt_timeout() == pytest.approx(0.5)
    answer = state.on_answer(1, "UNAVAILABLE", pushback=Pushback(2.0, "pushback"))
    assert answer.verdict is Verdict.GIVE_UP and answer.reason is Reason.DEADLINE


def test_a_call_that_may_not_be_hedged_is_sent_once() -> None:
    state, clock = make(HedgingPolicy(max_attempts=3, delay=0.1), hedgeable=False)
    state.begin()
    clock.now += 1
    assert state.hedge() is None
    assert state.on_answer(1, "UNAVAILABLE").verdict is Verdict.GIVE_UP


@given(
    max_attempts=st.integers(1, 5),
    delay=st.sampled_from([0.0, 0.05, 0.3]),
    events=st.lists(
        st.tuples(
            st.sampled_from(["tick", "answer"]),
            st.floats(0.0, 0.5),
            st.sampled_from(["OK", "UNAVAILABLE", "UNAVAILABLE", "INTERNAL"]),
            st.sampled_from([None, 0.2, -1]),
            st.integers(0, 10),
        ),
        max_size=40,
    ),
    budget_retries=st.integers(0, 5),
)
@settings(max_examples=300, deadline=None)
def test_hedging_invariants(max_attempts, delay, events, budget_retries) -> None:
    """Whatever happens: never more than max_attempts sent, one budget withdrawal per hedge, no
    hedge before its time, nothing sent after the call is decided, a verdict only when due."""
    clock = FakeClock(100.0)
    budget = RetryBudget(
        ratio=0.0, min_retries_per_second=budget_retries / 10.0, window=10.0, clock=clock
    )
    state = HedgingState(
        HedgingPolicy(max_attempts=max_attempts, delay=delay),
        hedgeable=True,
        budget=budget,
        clock=clock,
    )
    state.begin()
    sent_at = [clock.now]
    decided: Verdict | None = None
    for kind, dt, code, pushback_value, pick in events:
        clock.now += dt
        if kind == "tick":
            earliest = state.next_at
            number = state.hedge()
            if number is not None:
                assert decided is None
                assert earliest is not None and clock.now >= earliest
                sent_at.append(clock.now)
                assert number == len(sent_at)
            elif decided is None and state.exhausted():
                decided = state.settle().verdict
                assert decided is Verdict.GIVE_UP
            continue
        if not state.in_flight:
            continue
        number = sorted(state.in_flight)[pick % len(state.in_flight)]
        pushback = None
        if pushback_value is not None:
            pushback = Pushback(None if pushback_value < 0 else pushback_value, "pushback")
        answer = state.on_answer(number, code, pushback=pushback)
        if decided is not None:
            assert answer.verdict is Verdict.WAIT  # late answers change nothing
            continue
        if code in ("OK", "INTERNAL"):
            assert answer.verdict is Verdict.COMMIT
            decided = answer.verdict
            for loser in list(state.in_flight):
                state.cancelled(loser)
        elif answer.verdict is Verdict.GIVE_UP:
            assert not state.in_flight
            decided = answer.verdict
    assert state.sent == len(sent_at) <= max_attempts
    assert len(state.in_flight) <= state.sent
    assert budget.balance == pytest.approx(budget_retries - (state.sent - 1))
    if decided is not None:
        assert not state.due() and state.hedge() is None


def test_policy_validation_names_the_field() -> None:
    cases: list[tuple[dict[str, object], str]] = [
        ({"max_attempts": 0}, "max_attempts must be an integer >= 1"),
        ({"delay": -1}, "delay must be a finite number of seconds >= 0"),
        ({"delay": float("nan")}, "delay must be a finite number"),
        ({"non_fatal_codes": ["NOPE"]}, "non_fatal_codes"),
        ({"non_fatal_codes": ["OK"]}, "non_fatal_codes: OK"),
        ({"methods": "/a.B/C"}, "methods: expected a collection"),
        ({"idempotent_methods": ["C"]}, "idempotent_methods: each entry"),
        ({"max_pushback": 0}, "max_pushback must be a finite number of seconds > 0"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            HedgingPolicy(**options)  # type: ignore[arg-type]


def test_methods_select_what_is_hedged() -> None:
    every = HedgingPolicy()
    assert every.applies_to("/a.B/C")
    some = HedgingPolicy(methods=["/a.B/C", "/x.Y/*"])
    assert some.applies_to("/a.B/C") and some.applies_to("/x.Y/Z")
    assert not some.applies_to("/a.B/D")
    assert some.with_changes(delay=1.0).delay == 1.0


# A hedging budget apart from the retry budget, and the failure backoff (issue 11) ---------------


def test_latency_hedges_use_the_hedging_budget_and_failure_copies_the_retry_budget() -> None:
    clock = FakeClock(100.0)
    retry_budget = RetryBudget(ratio=0.0, min_retries_per_second=0.0, clock=clock)
    hedge_budget = RetryBudget(ratio=1.0, min_retries_per_second=0.0, clock=clock)
    state = HedgingState(
        HedgingPolicy(max_attempts=3, delay=0.1),
        hedgeable=True,
        budget=retry_budget,
        hedge_budget=hedge_budget,
        clock=clock,
    )
    state.begin()  # deposits into both
    clock.now += 0.1
    assert not state.after_failure
    assert state.hedge() == 2  # a latency hedge: from the hedging budget (ratio 1)
    assert hedge_budget.balance == pytest.approx(0.0)
    state.on_answer(2, "UNAVAILABLE")
    assert state.after_failure
    assert state.hedge() is None  # a failure copy: the empty retry budget refuses it
    assert state.stopped is Reason.BUDGET_EXHAUSTED
    assert retry_budget.refused == 1 and hedge_budget.refused == 0


def test_without_a_hedging_budget_every_copy_uses_the_retry_budget() -> None:
    clock = FakeClock(100.0)
    budget = RetryBudget(ratio=1.0, min_retries_per_second=0.0, clock=clock)
    state = HedgingState(
        HedgingPolicy(max_attempts=3, delay=0.1), hedgeable=True, budget=budget, clock=clock
    )
    state.begin()
    clock.now += 0.1
    assert state.hedge() == 2
    state.on_answer(2, "UNAVAILABLE")
    assert state.hedge() is None  # the one deposit allowed one copy
    assert budget.refused == 1


@settings(max_examples=200, deadline=None)
@given(
    backoff=st.floats(min_value=0.001, max_value=5.0),
    failures=st.integers(min_value=1, max_value=40),
    draw=st.floats(min_value=0.0, max_value=0.999999),
)
def test_failure_backoff_doubles_with_equal_jitter_and_a_cap(
    backoff: float, failures: int, draw: float
) -> None:
    policy = HedgingPolicy(failure_backoff=backoff)
    base = backoff * min(2.0 ** (failures - 1), 16.0)
    wait = policy.backoff_after(failures, draw)
    assert base / 2 - 1e-12 <= wait <= base + 1e-12
    assert wait <= 16 * backoff + 1e-12


@settings(max_examples=100, deadline=None)
@given(draws=st.lists(st.floats(min_value=0.0, max_value=0.999999), min_size=3, max_size=3))
def test_a_non_fatal_failure_plans_the_next_copy_one_backoff_later(draws: list[float]) -> None:
    clock = FakeClock(100.0)
    values = iter(draws)
    policy = HedgingPolicy(max_attempts=3, delay=5.0, failure_backoff=0.2)
    state = HedgingState(policy, hedgeable=True, clock=clock, draw=lambda: next(values))
    state.begin()
    clock.now += 0.01
    assert state.on_answer(1, "UNAVAILABLE").verdict is Verdict.WAIT
    first = policy.backoff_after(1, draws[0])
    assert state.next_at == pytest.approx(clock.now + first)
    assert not state.due()
    clock.now += first
    state.hold()  # the breaker is not closed: held one longer backoff
    assert state.next_at == pytest.approx(clock.now + policy.backoff_after(2, draws[1]))
    clock.now = state.next_at
    assert state.hedge() == 2
    assert not state.after_failure  # sent: the next one is a latency hedge again


def test_a_held_copy_past_the_deadline_gives_the_call_up() -> None:
    clock = FakeClock(100.0)
    policy = HedgingPolicy(max_attempts=3, delay=5.0, failure_backoff=0.2)
    state = HedgingState(policy, hedgeable=True, clock=clock, deadline=100.5, draw=lambda: 0.999)
    state.begin()
    state.on_answer(1, "UNAVAILABLE")
    while not state.exhausted():
        assert state.next_at is not None
        clock.now = state.next_at
        state.hold()
    assert state.settle().verdict is Verdict.GIVE_UP
    assert state.stopped is Reason.DEADLINE
    assert state.sent == 1


def test_hold_is_only_for_a_due_failure_copy_with_a_backoff() -> None:
    state, _ = make(HedgingPolicy(max_attempts=3, delay=0.1))
    state.begin()
    with pytest.raises(RuntimeError):
        state.hold()
    with pytest.raises(ValueError, match="failure_backoff"):
        HedgingPolicy(failure_backoff=-1.0)


@settings(max_examples=100, deadline=None)
@given(winner=st.integers(min_value=1, max_value=3), refund=st.booleans())
def test_a_winning_latency_hedge_is_refunded_only_with_refund_wins(
    winner: int, refund: bool
) -> None:
    clock = FakeClock(100.0)
    budget = RetryBudget(ratio=1.0, min_retries_per_second=0.0, window=10.0, clock=clock)
    for _ in range(10):
        budget.deposit()
    state = HedgingState(
        HedgingPolicy(max_attempts=3, delay=0.1, refund_wins=refund),
        hedgeable=True,
        budget=budget,
        clock=clock,
    )
    state.begin()  # 11 deposits: 11 withdrawals allowed
    for _ in range(2):
        clock.now += 0.1
        assert state.hedge() is not None
    assert budget.balance == pytest.approx(9.0)
    assert state.on_answer(winner, "OK").verdict is Verdict.COMMIT
    refunded = refund and winner > 1  # the first attempt withdrew nothing
    assert state.refunded is refunded
    assert budget.balance == pytest.approx(10.0 if refunded else 9.0)


def test_a_failure_copy_that_wins_is_not_refunded() -> None:
    clock = FakeClock(100.0)
    budget = RetryBudget(ratio=1.0, min_retries_per_second=0.0, clock=clock)
    state = HedgingState(
        HedgingPolicy(max_attempts=3, delay=0.1, refund_wins=True),
        hedgeable=True,
        budget=budget,
        clock=clock,
    )
    state.begin()
    state.on_answer(1, "UNAVAILABLE")
    assert state.hedge() == 2  # a failure copy: a retry, whatever it answers
    state.on_answer(2, "OK")
    assert not state.refunded
    assert budget.balance == pytest.approx(0.0)
    with pytest.raises(ValueError, match="refund_wins"):
        HedgingPolicy(refund_wins=1)  # type: ignore[arg-type]


def test_a_winning_hedge_refunds_its_own_withdrawal_not_a_later_hedge_s() -> None:
    clock = FakeClock(100.0)
    budget = RetryBudget(ratio=1.0, min_retries_per_second=0.0, window=10.0, clock=clock)
    state = HedgingState(
        HedgingPolicy(max_attempts=3, delay=0.1, refund_wins=True),
        hedgeable=True,
        budget=budget,
        clock=clock,
    )
    budget.deposit()
    state.begin()  # 2 calls: 2 hedges allowed
    clock.now = 100.1
    assert state.hedge() == 2
    clock.now = 100.2
    assert state.hedge() == 3
    assert state.on_answer(2, "OK").verdict is Verdict.COMMIT
    assert state.refunded
    clock.now = 110.15  # the calls and hedge 2's withdrawal have left the window, not hedge 3's
    budget.deposit()
    budget.deposit()
    assert budget.balance == pytest.approx(1.0)  # 2 calls - hedge 3, which was sent
    clock.now = 110.25
    assert budget.balance == pytest.approx(2.0)


def test_an_unsent_copy_refunds_its_own_withdrawal_not_a_later_copy_s() -> None:
    clock = FakeClock(100.0)
    budget = RetryBudget(ratio=1.0, min_retries_per_second=0.0, window=10.0, clock=clock)
    state = HedgingState(
        HedgingPolicy(max_attempts=3, delay=0.1),
        hedgeable=True,
        budget=budget,
        clock=clock,
    )
    budget.deposit()
    state.begin()  # 2 calls: 2 hedges allowed
    clock.now = 100.1
    assert state.hedge() == 2  # granted, then the caller cancels before it is sent
    clock.now = 100.2
    assert state.hedge() == 3  # sent
    state.unsent(2)
    state.unsent(2)  # once only
    clock.now = 110.15  # the calls have left the window; hedge 3's withdrawal has not
    budget.deposit()
    budget.deposit()
    assert budget.balance == pytest.approx(1.0)  # 2 calls - hedge 3, which was sent
    clock.now = 110.25
    assert budget.balance == pytest.approx(2.0)
