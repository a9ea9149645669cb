"""Review 10: the hedged driver records or releases each copy's admission exactly once, and
refunds the withdrawal of a copy granted but never sent exactly once.

:class:`~resilient_grpc.hedged_call.HedgedCall` is driven directly, as the shells drive it.
"""

from __future__ import annotations

import time

import grpc
import pytest

from resilient_grpc import CircuitBreaker, IdempotencyKeys, RetryBudget
from resilient_grpc.breaker import PROBE, REFUSED, TargetBreaker
from resilient_grpc.core.hedging import HedgingPolicy
from resilient_grpc.hedged_call import HedgedCall, begin_hedged
from resilient_grpc.logical_call import ClientStack

TARGET = "127.0.0.1:1"
METHOD = "/ledger.v1.Ledger/GetBalance"
ALLOWANCE = 60.0


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE


def _stack(*, half_open: bool = False) -> tuple[ClientStack, RetryBudget, TargetBreaker]:
    budget = RetryBudget(ratio=0.0, min_retries_per_second=1.0, window=60.0)
    stack = ClientStack.for_channel(
        TARGET,
        hedging=HedgingPolicy(max_attempts=3, delay=0.0),
        budget=budget,
        breaker=CircuitBreaker(
            fail_max=1, reset_timeout=0.05, probe_every=None, success_threshold=5
        ),
        idempotency=IdempotencyKeys(),
    )
    breaker = stack.target_breaker
    assert breaker is not None
    if half_open:
        breaker.circuit.open()
        time.sleep(0.1)
    return stack, budget, breaker


def _begin(stack: ClientStack) -> HedgedCall:
    return begin_hedged(stack, METHOD, 10.0, None, None)


def test_a_hedge_granted_but_never_sent_is_refunded_once_and_its_admission_released() -> None:
    stack, budget, breaker = _stack()
    call = _begin(stack)
    assert [a.number for a in call.start().send] == [1]
    assert [a.number for a in call.on_timer().send] == [2]  # granted: withdrawn
    assert budget.balance == ALLOWANCE - 1
    losers = call.abandon(sent={1})  # the shell was cancelled before sending copy 2
    assert losers == (1, 2)
    assert budget.balance == ALLOWANCE
    assert call.abandon(sent=set()) == ()  # a second abandonment refunds nothing more
    assert budget.balance == ALLOWANCE
    assert breaker.state == "closed"


def test_a_hedge_sent_stays_charged_when_the_call_is_cancelled() -> None:
    stack, budget, _breaker = _stack()
    call = _begin(stack)
    call.start()
    call.on_timer()
    assert call.abandon(sent={1, 2}) == (1, 2)
    assert budget.balance == ALLOWANCE - 1
    call2 = _begin(stack)
    call2.start()
    call2.on_timer()
    call2.abandon()  # None: everything asked for was sent
    assert budget.balance == ALLOWANCE - 2


def _slot_is_free_once(breaker: TargetBreaker) -> None:
    first = breaker.admit()
    assert first is PROBE, "the probe slot was kept"
    assert breaker.admit() is REFUSED, "the probe slot was freed twice"
    breaker.release(first)


@pytest.mark.parametrize("how", ["abandon", "abandon-unsent", "win", "fail", "late-answer"])
def test_the_probe_copys_admission_is_recorded_or_released_once(how: str) -> None:
    stack, _budget, breaker = _stack(half_open=True)
    call = _begin(stack)
    assert [a.number for a in call.start().send] == [1]  # copy 1 is the probe
    hedge = call.on_timer()  # the breaker refuses copy 2 while the probe is out
    assert hedge.send == ()
    if how == "abandon":
        call.abandon(sent={1})
    elif how == "abandon-unsent":
        call.abandon(sent=set())
    elif how == "win":
        assert call.on_done(1, None).done
        assert breaker.state == "half-open"  # one success of five
    elif how == "fail":
        assert call.on_done(1, _Unavailable()).done
        assert breaker.state == "open"
        time.sleep(0.1)
    else:  # the call was abandoned, then its copy answered anyway (a shell's late report)
        call.abandon(sent={1})
        assert call.on_done(1, None).done is False
    _slot_is_free_once(breaker)
    call.abandon()  # after the end: nothing more is released
    _slot_is_free_once(breaker)
