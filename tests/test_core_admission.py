"""The admission core (:mod:`resilient_grpc.core.admission`): its rules on a fake clock, and
``hypothesis`` properties over arbitrary sequences of calls."""

from __future__ import annotations

import contextvars
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_grpc.core.admission import (
    DEADLINE_MARGIN,
    WARM_SAMPLES,
    WINDOW,
    AdmissionController,
    Admit,
    Shed,
    ShedReason,
    handler_executed,
    record_call,
)
from tests.helpers import FakeClock

M = "/ledger.v1.Ledger/Transfer"
OTHER = "/ledger.v1.Ledger/GetBalance"


def controller(clock: FakeClock, **options: Any) -> AdmissionController:
    return AdmissionController(clock=clock, uniform=lambda: 0.5, **options)


def run(c: AdmissionController, clock: FakeClock, seconds: float, method: str = M) -> None:
    """One call that is admitted and takes ``seconds``."""
    ticket = c.decide(method, queued_for=0.0, deadline_remaining=None)
    assert isinstance(ticket, Admit)
    clock.now += seconds
    c.finish(ticket)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"queue_target": 0}, "queue_target must be a finite number of seconds > 0"),
        ({"queue_target": 0.2, "queue_interval": 0.1}, "queue_interval must be"),
        ({"min_limit": 0}, "min_limit must be an integer >= 1"),
        ({"min_limit": 10, "max_limit": 5}, "max_limit must be an integer >= 10"),
        ({"initial_limit": 5000}, "initial_limit must be <= max_limit"),
        ({"tolerance": 0.5}, "tolerance must be a finite number >= 1"),
        ({"min_pushback": -1}, "min_pushback must be"),
        ({"min_pushback": 1.0, "max_pushback": 0.5}, "max_pushback must be"),
        ({"queue_interval": float("nan")}, "queue_interval must be"),
        ({"deadline_share": -0.1}, "deadline_share must be"),
        ({"deadline_share": 1.5}, "deadline_share must be <= 1"),
        ({"initial_limit": True}, "initial_limit must be an integer"),
    ],
)
def test_bad_arguments_fail_at_construction(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdmissionController(**options)


def test_deadline_rule_refuses_work_that_cannot_finish_in_time() -> None:
    clock = FakeClock(100.0)
    c = controller(clock)
    # no estimate yet: only an expired deadline is refused
    shed = c.decide(M, queued_for=0.0, deadline_remaining=0.0)
    assert isinstance(shed, Shed) and shed.reason is ShedReason.DEADLINE
    assert isinstance(c.decide(M, queued_for=0.0, deadline_remaining=0.001), Admit)
    c = controller(clock)
    run(c, clock, 0.030)
    assert c.service_time(M) == pytest.approx(0.030)
    busy = c.decide(M, queued_for=0.0, deadline_remaining=None)  # the rule is for a busy server
    assert isinstance(busy, Admit)
    # 30 ms usually: a call needs 1.5 x that left
    shed = c.decide(M, queued_for=0.0, deadline_remaining=0.040)
    assert isinstance(shed, Shed) and shed.reason is ShedReason.DEADLINE
    assert isinstance(c.decide(M, queued_for=0.0, deadline_remaining=0.050), Admit)
    # the estimate is per method: another method has none yet
    assert isinstance(c.decide(OTHER, queued_for=0.0, deadline_remaining=0.020), Admit)


def test_deadline_rule_scales_the_estimate_with_the_concurrency_now() -> None:
    """30 ms measured with 1-2 calls executing; with 8 executing, a call expects ~6x longer."""
    clock = FakeClock(100.0)
    c = controller(clock, initial_limit=100)
    for _ in range(20):
        pair = [c.decide(M, queued_for=0.0, deadline_remaining=None) for _ in range(2)]
        clock.now += 0.030
        for ticket in pair:
            c.finish(ticket)  # type: ignore[arg-type]
    assert c.expected_time(M) == pytest.approx(0.030)
    assert isinstance(c.decide(M, queued_for=0.0, deadline_remaining=0.1), Admit)
    for _ in range(7):
        c.decide(M, queued_for=0.0, deadline_remaining=None)
    # it ran with 1-2 calls executing (1.5 on average); now it would be the 9th
    assert c.expected_time(M) == pytest.approx(0.030 * 9 / 1.5, rel=0.05)
    shed = c.decide(M, queued_for=0.0, deadline_remaining=0.1)
    assert isinstance(shed, Shed) and shed.reason is ShedReason.DEADLINE


def test_a_stall_caught_by_a_few_executions_does_not_move_the_expected_time() -> None:
    """Eight executions caught in a 250 ms stall (a GC, a starved CPU) among 28 ms ones: the
    expected time is the median of the last WINDOW executions, so it stays 28 ms (an average
    would jump to ~200 ms and refuse callers with 240 ms to go)."""
    clock = FakeClock(100.0)
    c = controller(clock, initial_limit=100)
    for _ in range(WARM_SAMPLES):
        run(c, clock, 0.028)
    stalled = [c.decide(M, queued_for=0.0, deadline_remaining=None) for _ in range(8)]
    clock.now += 0.28
    for ticket in stalled:
        c.finish(ticket)  # type: ignore[arg-type]
    assert c.service_time(M) > 0.2  # type: ignore[operator]  # the average did jump
    assert c.expected_time(M) == pytest.approx(0.028)
    busy = c.decide(M, queued_for=0.0, deadline_remaining=None)
    assert isinstance(busy, Admit)
    assert isinstance(c.decide(M, queued_for=0.0, deadline_remaining=0.24), Admit)


def test_an_idle_server_admits_what_a_stale_estimate_would_refuse() -> None:
    """A stall caught a whole window of executions: the estimate is 280 ms; callers have 240 ms.
    Were every call refused, nothing would run and the estimate would never come down: an idle
    server judges by the baseline, the executions teach the estimate its real time again, and
    calls are admitted as before."""
    clock = FakeClock(100.0)
    c = controller(clock, initial_limit=100)
    for _ in range(WARM_SAMPLES):
        run(c, clock, 0.028)
    stalled = [c.decide(M, queued_for=0.0, deadline_remaining=None) for _ in range(WINDOW)]
    clock.now += 0.28  # a window of executions caught in a 250 ms stall
    for ticket in stalled:
        c.finish(ticket)  # type: ignore[arg-type]
    assert c.expected_time(M) is not None and c.expected_time(M) > 0.2  # type: ignore[operator]
    assert c.baseline_time(M) == pytest.approx(0.028, abs=0.01)  # the stall hardly moved it
    # nothing in flight: judged by the baseline, so too little time for it is still refused
    shed = c.decide(M, queued_for=0.0, deadline_remaining=0.04)
    assert isinstance(shed, Shed) and shed.reason is ShedReason.DEADLINE
    probe = c.decide(M, queued_for=0.0, deadline_remaining=0.24)
    assert isinstance(probe, Admit)  # admitted despite the stalled estimate
    shed = c.decide(M, queued_for=0.0, deadline_remaining=0.24)  # busy: the rule applies
    assert isinstance(shed, Shed) and shed.reason is ShedReason.DEADLINE
    clock.now += 0.028
    c.finish(probe)
    for _ in range(WINDOW // 2 - 1):  # idle-time admissions until half the window is real
        ticket = c.decide(M, queued_for=0.0, deadline_remaining=0.24)
        assert isinstance(ticket, Admit)
        clock.now += 0.028
        c.finish(ticket)
    first = c.decide(M, queued_for=0.0, deadline_remaining=0.24)
    assert isinstance(first, Admit)
    assert isinstance(c.decide(M, queued_for=0.0, deadline_remaining=0.24), Admit)  # busy, fine


def test_concurrency_scaling_waits_for_a_warm_estimate() -> None:
    """The first executions ran alone while the server warmed up: their concurrency (1) says
    nothing about later load, so the estimate is not scaled until WARM_SAMPLES executions."""
    clock = FakeClock(100.0)
    c = controller(clock, initial_limit=100)
    run(c, clock, 0.030)
    held = [c.decide(M, queued_for=0.0, deadline_remaining=None) for _ in range(5)]
    assert all(isinstance(ticket, Admit) for ticket in held)
    assert c.expected_time(M) == pytest.approx(0.030)  # not 6 x 30 ms
    assert isinstance(c.decide(M, queued_for=0.0, deadline_remaining=0.050), Admit)
    for _ in range(WARM_SAMPLES):
        run(c, clock, 0.030)
    assert c.expected_time(M) > 0.030  # type: ignore[operator]


def test_a_call_with_time_to_spare_may_wait_its_deadline_share() -> None:
    """CoDel's allowance is 50 ms while overloaded; a call with a deadline may still wait up to
    half its whole time (waited + remaining), so a pause in the arrivals followed by a burst
    costs callers with time to spare nothing; deadline_share=0 is CoDel alone."""
    for share, admitted in ((0.5, True), (0.0, False)):
        clock = FakeClock(100.0)
        c = controller(
            clock, queue_target=0.05, queue_interval=0.2, deadline_share=share, initial_limit=1000
        )
        assert isinstance(c.decide(M, queued_for=0.0, deadline_remaining=None), Admit)
        clock.now += 0.3
        assert isinstance(c.decide(M, queued_for=0.06, deadline_remaining=None), Shed)
        assert c.overloaded()
        # waited 300 ms of its 1 s: within half of it
        decision = c.decide(M, queued_for=0.3, deadline_remaining=0.7)
        assert isinstance(decision, Admit) is admitted
        # waited 300 ms of 500 ms: more than half, refused either way
        shed = c.decide(M, queued_for=0.3, deadline_remaining=0.2)
        assert isinstance(shed, Shed) and shed.reason is ShedReason.QUEUE


def test_queue_rule_allows_a_burst_but_not_a_standing_queue() -> None:
    clock = FakeClock(100.0)
    c = controller(clock, queue_target=0.05, queue_interval=0.2, initial_limit=1000)
    assert isinstance(c.decide(M, queued_for=0.0, deadline_remaining=None), Admit)
    # a burst: the queue drained a moment ago, so a wait up to the interval is fine
    clock.now += 0.05
    assert isinstance(c.decide(M, queued_for=0.15, deadline_remaining=None), Admit)
    shed = c.decide(M, queued_for=0.25, deadline_remaining=None)
    assert isinstance(shed, Shed) and shed.reason is ShedReason.QUEUE
    # no call found the queue empty for longer than the interval: overloaded, allowance = target
    clock.now += 0.2
    assert c.overloaded()
    shed = c.decide(M, queued_for=0.06, deadline_remaining=None)
    assert isinstance(shed, Shed) and shed.reason is ShedReason.QUEUE
    assert isinstance(c.decide(M, queued_for=0.04, deadline_remaining=None), Admit)
    # a call that waited (almost) nothing shows the queue drained: the burst allowance is back
    assert isinstance(c.decide(M, queued_for=0.001, deadline_remaining=None), Admit)
    assert not c.overloaded()
    assert isinstance(c.decide(M, queued_for=0.15, deadline_remaining=None), Admit)
    # without a measured wait the queue rule is off
    assert isinstance(c.decide(M, queued_for=None, deadline_remaining=None), Admit)


def test_limit_rule_refuses_beyond_the_concurrency_limit() -> None:
    clock = FakeClock(100.0)
    c = controller(clock, initial_limit=2, min_limit=1, max_limit=2)
    first = c.decide(M, queued_for=0.0, deadline_remaining=None)
    second = c.decide(M, queued_for=0.0, deadline_remaining=None)
    assert isinstance(first, Admit) and isinstance(second, Admit)
    shed = c.decide(M, queued_for=0.0, deadline_remaining=None)
    assert isinstance(shed, Shed) and shed.reason is ShedReason.LIMIT
    assert c.in_flight == 2
    clock.now += 0.01
    c.finish(first)
    assert c.in_flight == 1
    assert isinstance(c.decide(M, queued_for=0.0, deadline_remaining=None), Admit)


def test_limit_shrinks_when_latency_climbs_and_grows_back_when_it_is_used() -> None:
    clock = FakeClock(100.0)
    c = controller(clock, initial_limit=40, min_limit=2, max_limit=200, tolerance=2.0)
    for _ in range(600):
        run(c, clock, 0.010)  # baseline 10 ms
    start = c.limit
    # executions slow to 50 ms (5x the baseline, beyond the 2x tolerance): the limit comes down
    for _ in range(40):
        run(c, clock, 0.050)
    assert c.limit < start / 2
    low = c.limit
    # back to 10 ms with the limit in use (many calls at once): it grows again
    for _ in range(60):
        tickets = [c.decide(M, queued_for=0.0, deadline_remaining=None) for _ in range(c.limit)]
        clock.now += 0.010
        for ticket in tickets:
            assert isinstance(ticket, Admit)
            c.finish(ticket)
    assert c.limit > low * 2


def test_fast_replays_mixed_in_do_not_shrink_the_limit() -> None:
    """A dedup replay takes 0.1 ms, an execution 28 ms: the mix is the method's normal cost."""
    clock = FakeClock(100.0)
    c = controller(clock, initial_limit=16, min_limit=2, max_limit=16)
    for _ in range(400):
        tickets = [c.decide(M, queued_for=0.0, deadline_remaining=None) for _ in range(8)]
        assert all(isinstance(ticket, Admit) for ticket in tickets)
        clock.now += 0.028
        for ticket in tickets[:6]:
            c.finish(ticket)  # type: ignore[arg-type]
        replays = [c.decide(M, queued_for=0.0, deadline_remaining=None) for _ in range(2)]
        clock.now += 0.0001
        for ticket in replays:  # a quarter of the calls are replays
            c.finish(ticket)  # type: ignore[arg-type]
        for ticket in tickets[6:]:
            c.finish(ticket)  # type: ignore[arg-type]
    assert c.limit == 16


def test_a_call_that_did_not_execute_is_in_flight_but_no_sample() -> None:
    """A dedup wait or replay (``executed=False``) holds a slot while it lasts, but its duration
    (its twin's execution, or nothing) neither moves the service time nor the limit."""
    clock = FakeClock(100.0)
    c = controller(clock, initial_limit=16, min_limit=2, max_limit=16)
    for _ in range(20):
        run(c, clock, 0.010)
    limit, service = c.limit, c.service_time(M)
    waiters = [c.decide(M, queued_for=0.0, deadline_remaining=None) for _ in range(10)]
    assert c.in_flight == 10
    clock.now += 1.0  # a hundred times the method's time
    for ticket in waiters:
        assert isinstance(ticket, Admit)
        c.finish(ticket, executed=False)
    assert (c.in_flight, c.limit, c.service_time(M)) == (0, limit, service)
    run(c, clock, 1.0)  # the same duration, executed: a sample that shrinks the limit
    assert c.limit < limit


def test_call_record_reaches_the_shell_only_inside_its_context() -> None:
    def inside() -> tuple[bool, bool]:
        handler_executed(False)  # no record yet: nobody to tell, no error
        record = record_call()
        assert record.executed
        handler_executed(False)
        skipped = record.executed
        handler_executed(True)
        return skipped, record.executed

    assert contextvars.Context().run(inside) == (False, True)


def test_limit_does_not_grow_while_unused() -> None:
    clock = FakeClock(100.0)
    c = controller(clock, initial_limit=10, max_limit=1000)
    for _ in range(200):
        run(c, clock, 0.010)  # one call at a time: the limit is not what holds anything back
    assert c.limit == 10


def test_pushback_grows_with_the_shed_fraction_and_stays_in_bounds() -> None:
    clock = FakeClock(100.0)
    c = controller(clock, initial_limit=1, min_limit=1, max_limit=1, min_pushback=0.01)
    for _ in range(WARM_SAMPLES):
        run(c, clock, 0.040)
    held = c.decide(M, queued_for=0.0, deadline_remaining=None)
    assert isinstance(held, Admit)
    pushbacks = []
    for _ in range(60):
        shed = c.decide(M, queued_for=0.0, deadline_remaining=None)
        assert isinstance(shed, Shed)
        pushbacks.append(shed.pushback)
    # based on the expected time (40 ms measured alone, x2 with the held call running), scaled up
    # as refusals pile up, never past max_pushback
    assert c.expected_time(M) == pytest.approx(0.080)
    assert pushbacks[0] == pytest.approx(0.080, rel=0.05)
    assert pushbacks[-1] > 1.5 * pushbacks[0]
    assert all(0.01 <= p <= 2.0 for p in pushbacks)
    assert Shed(ShedReason.LIMIT, 0.1234).pushback_ms == 123


def test_pushback_leaves_the_caller_time_to_retry() -> None:
    """A call refused after a 300 ms wait with 200 ms to go, the method taking 30 ms: a pushback
    of 300 ms or more (the wait, times the pressure) would outlast its deadline; it gets one
    that leaves its retry twice the expected time. With no room for that, no cap: the caller
    had better not retry."""
    clock = FakeClock(100.0)
    c = controller(clock, queue_target=0.05, queue_interval=0.2, deadline_share=0.5)
    run(c, clock, 0.030)
    shed = c.decide(M, queued_for=0.3, deadline_remaining=0.2)
    assert isinstance(shed, Shed) and shed.reason is ShedReason.QUEUE
    assert shed.pushback == pytest.approx(0.2 - 2 * 0.030)
    shed = c.decide(M, queued_for=0.3, deadline_remaining=0.07)  # 70 ms: no room for a retry
    assert isinstance(shed, Shed) and shed.pushback >= 0.3
    shed = c.decide(M, queued_for=0.3, deadline_remaining=None)  # no deadline: the wait decides
    assert isinstance(shed, Shed) and shed.pushback >= 0.3


OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("call"),
            st.sampled_from([M, OTHER]),
            st.one_of(st.none(), st.floats(0, 1)),  # queued_for
            st.one_of(st.none(), st.floats(-0.1, 2)),  # deadline_remaining
        ),
        st.tuples(st.just("finish"), st.integers(0, 50)),
        st.tuples(st.just("tick"), st.floats(0, 0.5)),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(OPS, st.floats(0, 0.999))
def test_invariants_over_any_sequence(ops: list[tuple[Any, ...]], jitter: float) -> None:
    clock = FakeClock(100.0)
    c = AdmissionController(
        clock=clock, uniform=lambda: jitter, initial_limit=4, min_limit=1, max_limit=8
    )
    running: list[Admit] = []
    for op in ops:
        if op[0] == "tick":
            clock.now += op[1]
        elif op[0] == "finish" and running:
            c.finish(running.pop(op[1] % len(running)))
        elif op[0] == "call":
            _, method, queued_for, remaining = op
            estimate = c.expected_time(method)
            baseline = c.baseline_time(method)
            in_flight, limit = c.in_flight, c.limit
            decision = c.decide(method, queued_for=queued_for, deadline_remaining=remaining)
            if isinstance(decision, Admit):
                running.append(decision)
                # never admitted: expired, slower than the estimate allows, beyond the limit
                # or after a wait longer than the longest allowance
                assert remaining is None or remaining > 0
                # (an idle server judges by the baseline: its estimate may be a stall's)
                judged = estimate if in_flight else baseline
                assert remaining is None or judged is None or remaining >= DEADLINE_MARGIN * judged
                assert in_flight < limit
                assert (
                    queued_for is None
                    or queued_for <= c.queue_interval
                    or (remaining is not None and queued_for <= 0.5 * (queued_for + remaining))
                )
            else:
                assert c.min_pushback <= decision.pushback <= c.max_pushback
        assert c.in_flight == len(running)
        assert c.min_limit <= c.limit <= c.max_limit
