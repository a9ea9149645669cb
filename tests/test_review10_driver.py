"""Review 10: the call driver frees the breaker's probe slot exactly once, and refunds a
granted but unsent retry exactly once, wherever the call ends.

The generator is driven directly, as the shells drive it, and abandoned (closed) at every step
it yields: the admission BreakerIO (before and after it ran), the Attempt, the record BreakerIO
(before and after it ran), the Pause and the WaitReady. The effects are counted: the retry
budget's balance and the probe slot, which must be free after the call (a new call becomes the
probe) and must not be freed twice (a slot another call took meanwhile stays taken: a third
call is refused, not let out as a second probe).
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import pybreaker
import pytest

from resilient_grpc import (
    AdaptiveThrottle,
    CircuitBreaker,
    IdempotencyKeys,
    RetryBudget,
    RetryPolicy,
)
from resilient_grpc.breaker import PROBE, REFUSED
from resilient_grpc.client import _drive
from resilient_grpc.errors import BreakerOpenError, ThrottledError, attempts_of
from resilient_grpc.logical_call import (
    Attempt,
    BreakerIO,
    ClientStack,
    LogicalCall,
    Pause,
    Steps,
    WaitReady,
)

TARGET = "127.0.0.1:1"
METHOD = "/ledger.v1.Ledger/GetBalance"
RESET = 0.05
ALLOWANCE = 60.0  # min_retries_per_second * window: the budget's balance before any retry


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE


class _SharedStorage(pybreaker.CircuitMemoryStorage):
    """Memory storage posing as shared storage (a subclass: the breaker treats it as I/O)."""


class _SwitchedThrottle(AdaptiveThrottle):
    """A throttle that admits until the test says otherwise."""

    rejecting = False

    def admit(self) -> bool:
        return not self.rejecting


def _stack(*, throttle: AdaptiveThrottle | None = None, min_rate: float = 1.0) -> ClientStack:
    # UNAVAILABLE is retried but is no breaker failure (codes=INTERNAL): each attempt is a
    # success for the breaker, and with success_threshold=5 it stays half-open, so every
    # attempt of the call is admitted as the probe.
    breaker = CircuitBreaker(
        fail_max=1,
        reset_timeout=RESET,
        probe_every=None,
        success_threshold=5,
        codes=("INTERNAL",),
        storage=lambda _target: _SharedStorage(pybreaker.STATE_CLOSED),
    )
    return ClientStack.for_channel(
        TARGET,
        retry=RetryPolicy(max_attempts=3, initial_backoff=0.01, jitter="none"),
        budget=RetryBudget(ratio=0.0, min_retries_per_second=min_rate, window=60.0),
        breaker=breaker,
        reconnect_wait=1.0,
        throttle=throttle,
        idempotency=IdempotencyKeys(),
    )


def _half_open(stack: ClientStack) -> None:
    breaker = stack.target_breaker
    assert breaker is not None and breaker.blocking
    breaker.circuit.open()
    time.sleep(RESET * 2)


def _admission(stack: ClientStack) -> tuple[Steps, Any]:
    """Start a fresh call and run its admission; return its driver and what it was given."""
    steps = stack.begin(METHOD, 10.0, None, None).steps()
    admit = next(steps)
    assert isinstance(admit, BreakerIO)
    return steps, admit.run()


def _balance(stack: ClientStack) -> float:
    assert stack.budget is not None
    return stack.budget.balance


class _Run:
    """Drive a call whose attempts all fail with UNAVAILABLE, step by step."""

    def __init__(self, stack: ClientStack) -> None:
        self.stack = stack
        self.call: LogicalCall = stack.begin(METHOD, 10.0, None, None)
        self.steps = self.call.steps()
        self.step: Any = next(self.steps)
        self.attempts_sent = 0
        self.holds_probe = False  # an admission PROBE taken and not yet recorded

    def advance(self) -> None:
        """Perform the current step and move to the next one."""
        step = self.step
        if isinstance(step, BreakerIO):
            result = step.run()
            if step.function == self.stack.target_breaker.admit:  # type: ignore[union-attr]
                self.holds_probe = result is PROBE
            else:
                self.holds_probe = False
        elif isinstance(step, Attempt):
            self.attempts_sent += 1
            result = _Unavailable()
        else:
            assert isinstance(step, (Pause, WaitReady))
            result = None
        self.step = self.steps.send(result)


def _kinds(stack: ClientStack) -> list[str]:
    """The steps of a call run to its end (the sequence the parametrized tests cut into)."""
    run = _Run(stack)
    kinds = []
    try:
        while True:
            kinds.append(run.step.__class__.__name__)
            run.advance()
    except grpc.RpcError:
        pass
    return kinds


def test_the_steps_of_a_retried_call_with_a_shared_breaker() -> None:
    stack = _stack()
    _half_open(stack)
    one = ["BreakerIO", "Attempt", "BreakerIO"]
    assert _kinds(stack) == [*one, "Pause", "WaitReady", *one, "Pause", "WaitReady", *one]
    assert _balance(stack) == ALLOWANCE - 2  # two retries sent


STEPS = 13  # see the test above
# (index of the step, whether that step (a BreakerIO) has run when the call is abandoned)
CUTS = [(i, False) for i in range(STEPS)] + [(i, True) for i in (0, 2, 5, 7, 10, 12)]


def _abandon_and_check(stack: ClientStack, run: _Run, abandon: Any) -> None:
    """Abandon ``run`` through ``abandon()``, checking the slot is freed once."""
    retries_sent = max(run.attempts_sent - 1, 0)
    if run.holds_probe:
        abandon()
        b_steps, b_admission = _admission(stack)
        assert b_admission is PROBE, "the abandoned call kept the probe slot"
    else:
        b_steps, b_admission = _admission(stack)  # B takes the free slot...
        assert b_admission is PROBE
        abandon()  # ... which the abandonment must not free
    c_steps, c_admission = _admission(stack)
    assert c_admission is REFUSED, "the abandoned call freed another call's probe slot"
    with pytest.raises(BreakerOpenError):
        c_steps.send(c_admission)
    assert _balance(stack) == ALLOWANCE - retries_sent, "an unsent retry was not refunded"
    b_steps.close()
    d_steps, d_admission = _admission(stack)
    assert d_admission is PROBE
    d_steps.close()
    assert _balance(stack) == ALLOWANCE - retries_sent


@pytest.mark.parametrize(("index", "ran"), CUTS)
def test_closing_the_driver_at_any_step_frees_the_probe_once_and_refunds_once(
    index: int, ran: bool
) -> None:
    stack = _stack()
    _half_open(stack)
    run = _Run(stack)
    for _ in range(index):
        run.advance()
    if ran:
        assert isinstance(run.step, BreakerIO)
        result = run.step.run()  # ran, but the shell was cancelled before it sent it back
        if run.step.function == stack.target_breaker.admit:  # type: ignore[union-attr]
            run.holds_probe = result is PROBE
        else:
            run.holds_probe = False
    if isinstance(run.step, Attempt):
        run.attempts_sent += 1  # abandoned while this attempt was in flight: it was sent
    _abandon_and_check(stack, run, run.steps.close)
    run.steps.close()  # a second close is harmless
    assert _balance(stack) == ALLOWANCE - max(run.attempts_sent - 1, 0)


class _Boom(BaseException):
    """What a failing step raises (a BaseException: the breaker's fail-open does not catch it)."""


class _ExplodingStorage(_SharedStorage):
    """Shared storage whose next state read raises once ``explode`` is set."""

    explode = False

    @property
    def state(self) -> str:
        if self.explode:
            self.explode = False
            raise _Boom
        return str(super().state)

    @state.setter
    def state(self, value: str) -> None:
        pybreaker.CircuitMemoryStorage.state.fset(self, value)  # type: ignore[attr-defined]


@pytest.mark.parametrize("index", range(STEPS))
def test_a_step_that_raises_frees_the_probe_once_and_refunds_once(index: int) -> None:
    """The sync shell's runner (client._drive) with the step at ``index`` raising."""
    storages: list[_ExplodingStorage] = []

    def storage(_target: str) -> _ExplodingStorage:
        storages.append(_ExplodingStorage(pybreaker.STATE_CLOSED))
        return storages[-1]

    stack = _stack()
    breaker = CircuitBreaker(
        fail_max=1,
        reset_timeout=RESET,
        probe_every=None,
        success_threshold=5,
        codes=("INTERNAL",),
        storage=storage,
    )
    stack.target_breaker = breaker.for_target(TARGET)
    _half_open(stack)
    call = stack.begin(METHOD, 10.0, None, None)
    done = {"steps": 0, "attempts": 0}

    def tick() -> None:
        if done["steps"] == index:
            raise _Boom
        done["steps"] += 1

    def attempt(step: Attempt) -> BaseException | None:
        done["attempts"] += 1  # handed to the transport (even if sending it raises)
        tick()
        return _Unavailable()

    def pause(seconds: float) -> None:
        tick()

    def wait_ready(seconds: float) -> None:
        tick()

    steps = call.steps()

    def watched() -> Any:  # arms the storage when the BreakerIO at ``index`` comes up
        result = None
        while True:
            step = steps.send(result)
            if isinstance(step, BreakerIO):
                if done["steps"] == index:
                    storages[0].explode = True
                else:
                    done["steps"] += 1
            result = yield step

    outer = watched()
    with pytest.raises(_Boom):
        _drive(outer, attempt, wait_ready, pause)  # type: ignore[arg-type]
    steps.close()
    b_steps, b_admission = _admission(stack)
    assert b_admission is PROBE, "the failed step kept the probe slot"
    c_steps, c_admission = _admission(stack)
    assert c_admission is REFUSED
    c_steps.close()
    b_steps.close()
    assert _balance(stack) == ALLOWANCE - max(done["attempts"] - 1, 0)


def test_a_retry_refused_by_the_budget_gives_up_with_the_slot_freed_and_nothing_refunded() -> None:
    stack = _stack(min_rate=1 / 60)  # one retry in the window
    _half_open(stack)
    run = _Run(stack)
    with pytest.raises(_Unavailable) as raised:
        while True:
            run.advance()
    assert attempts_of(raised.value) == 2
    assert _balance(stack) == pytest.approx(0.0)  # the one retry was sent: not refunded
    b_steps, b_admission = _admission(stack)
    assert b_admission is PROBE
    c_steps, c_admission = _admission(stack)
    assert c_admission is REFUSED
    c_steps.close()
    b_steps.close()


def test_a_retry_refused_by_the_breaker_after_its_backoff_is_refunded_once() -> None:
    stack = _stack()
    _half_open(stack)
    run = _Run(stack)
    for _ in range(3):  # admit, attempt, record: the retry is granted (Pause next)
        run.advance()
    assert isinstance(run.step, Pause)
    assert _balance(stack) == ALLOWANCE - 1
    b_steps, b_admission = _admission(stack)  # another call takes the probe meanwhile
    assert b_admission is PROBE
    run.advance()  # the pause
    assert isinstance(run.step, WaitReady)
    run.advance()
    assert isinstance(run.step, BreakerIO)
    admission = run.step.run()
    assert admission is REFUSED
    with pytest.raises(_Unavailable) as raised:
        run.steps.send(admission)
    assert attempts_of(raised.value) == 1
    assert _balance(stack) == ALLOWANCE  # refunded...
    run.steps.close()
    assert _balance(stack) == ALLOWANCE  # ... once
    c_steps, c_admission = _admission(stack)
    assert c_admission is REFUSED  # B still holds the slot: the refused call freed nothing
    c_steps.close()
    b_steps.close()


def test_a_retry_refused_by_the_throttle_after_its_backoff_is_refunded_once() -> None:
    throttle = _SwitchedThrottle()
    stack = _stack(throttle=throttle)
    _half_open(stack)
    run = _Run(stack)
    for _ in range(4):  # admit, attempt, record, pause
        run.advance()
    assert isinstance(run.step, WaitReady)
    assert _balance(stack) == ALLOWANCE - 1
    throttle.rejecting = True
    with pytest.raises(_Unavailable):
        run.advance()
    assert _balance(stack) == ALLOWANCE
    run.steps.close()
    assert _balance(stack) == ALLOWANCE
    throttle.rejecting = False
    b_steps, b_admission = _admission(stack)
    assert b_admission is PROBE  # the throttled call holds no slot
    b_steps.close()


def test_a_first_attempt_refused_by_the_throttle_takes_nothing() -> None:
    throttle = _SwitchedThrottle()
    throttle.rejecting = True
    stack = _stack(throttle=throttle)
    _half_open(stack)
    steps = stack.begin(METHOD, 10.0, None, None).steps()
    with pytest.raises(ThrottledError):
        next(steps)
    assert _balance(stack) == ALLOWANCE
    throttle.rejecting = False
    b_steps, b_admission = _admission(stack)
    assert b_admission is PROBE
    b_steps.close()
