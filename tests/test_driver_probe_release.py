"""The call driver gives a breaker's probe slot back exactly once.

A breaker whose state lives in shared storage (Redis) runs its admission and its record as
:class:`~resilient_grpc.logical_call.BreakerIO` steps, which the shells run where blocking I/O
may run. A call abandoned (cancelled) while its record step ran had its probe slot freed twice:
once by the record, once more by the abandonment. By then another call may hold the slot as its
own probe, and the second release let a third call out as a probe as well: two probes against a
backend the breaker believes is down. These tests drive the generator the way the shells do.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import pybreaker
import pytest

from resilient_grpc import CircuitBreaker, RetryPolicy
from resilient_grpc.breaker import PROBE, REFUSED
from resilient_grpc.logical_call import Attempt, BreakerIO, ClientStack, LogicalCall

TARGET = "127.0.0.1:1"
METHOD = "/ledger.v1.Ledger/GetBalance"
RESET = 0.05


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE


class _SharedStorage(pybreaker.CircuitMemoryStorage):
    """Memory storage posing as shared storage (a subclass, so the breaker treats it as I/O)."""


def _stack() -> ClientStack:
    breaker = CircuitBreaker(
        fail_max=1,
        reset_timeout=RESET,
        probe_every=None,
        storage=lambda _target: _SharedStorage(pybreaker.STATE_CLOSED),
    )
    return ClientStack(RetryPolicy(max_attempts=1), breaker=breaker, target=TARGET)


def _admit(call: LogicalCall) -> tuple[Any, Any]:
    """Start ``call`` and run its admission step; return the driver and the admission."""
    steps = call.steps()
    admit = next(steps)
    assert isinstance(admit, BreakerIO)
    admission = admit.run()
    return steps, admission


def _open_then_half_open(stack: ClientStack) -> None:
    assert stack.target_breaker is not None and stack.target_breaker.blocking
    stack.target_breaker.circuit.open()
    time.sleep(RESET * 2)  # the next admission is the half-open probe


def _begin(stack: ClientStack) -> LogicalCall:
    return stack.begin(METHOD, 10.0, None, None)


@pytest.mark.parametrize("probe_succeeds", [False, True])
def test_a_call_abandoned_after_its_record_ran_does_not_free_another_calls_probe(
    probe_succeeds: bool,
) -> None:
    stack = _stack()
    breaker = stack.target_breaker
    assert breaker is not None
    _open_then_half_open(stack)

    # Call A is the probe; its attempt fails, and the shell runs the record step...
    a_steps, a_admission = _admit(_begin(stack))
    assert a_admission is PROBE
    attempt = a_steps.send(a_admission)
    assert isinstance(attempt, Attempt)
    record = a_steps.send(None if probe_succeeds else _Unavailable())
    assert isinstance(record, BreakerIO)
    record.run()  # the record frees A's probe slot (and opens or closes the breaker)

    if not probe_succeeds:
        # ... the breaker is open again; once reset_timeout passes, call B is the next probe.
        time.sleep(RESET * 2)
        b_steps, b_admission = _admit(_begin(stack))
        assert b_admission is PROBE

    # A is abandoned before the shell sent the record's result back (the caller cancelled).
    a_steps.close()

    if probe_succeeds:
        assert breaker.state == "closed"
    else:
        # B's probe is still out: a third call is refused, not let out as a second probe.
        c_steps, c_admission = _admit(_begin(stack))
        assert c_admission is REFUSED
        with pytest.raises(Exception, match="circuit breaker"):
            c_steps.send(c_admission)
        b_steps.close()  # B abandoned before its attempt: its slot comes back
        d_steps, d_admission = _admit(_begin(stack))
        assert d_admission is PROBE
        d_steps.close()


def test_a_call_abandoned_before_its_record_ran_gives_the_probe_slot_back() -> None:
    stack = _stack()
    _open_then_half_open(stack)
    a_steps, a_admission = _admit(_begin(stack))
    assert a_admission is PROBE
    a_steps.send(a_admission)
    record = a_steps.send(_Unavailable())
    assert isinstance(record, BreakerIO)

    a_steps.close()  # abandoned with the record step never run: A's slot comes back

    b_steps, b_admission = _admit(_begin(stack))
    assert b_admission is PROBE
    b_steps.close()
