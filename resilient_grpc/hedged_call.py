"""One hedged logical call as an event-driven driver shared by the sync and ``grpc.aio`` shells.

A hedged call has several attempts in flight at once, so it cannot be a generator of one step
after another like :class:`~resilient_grpc.logical_call.LogicalCall`. The shell reports events
and applies the :class:`Actions` it gets back:

* :meth:`HedgedCall.start` when the call starts;
* :meth:`HedgedCall.on_timer` when :meth:`HedgedCall.wake_at` has come (the next hedge is due);
* :meth:`HedgedCall.on_done` when attempt ``n`` answered (``None``: OK, or its error);
* :meth:`HedgedCall.abandon` when the caller cancelled the call.

Actions say which attempts to send (:class:`~resilient_grpc.logical_call.Attempt`, with the
call's idempotency key and ``grpc-previous-rpc-attempts``), which to cancel (the losers, so the
server sees the cancellation), and whether the call is over: with which attempt's outcome, or
with which error. Every hedge asks the throttle, the breaker and the retry budget first; all
decisions come from :class:`~resilient_grpc.core.hedging.HedgingState`. The shell serializes
the events of one call (one task, or one thread at a time).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from resilient_grpc import telemetry
from resilient_grpc.breaker import ADMITTED, REFUSED, Admission, TargetBreaker
from resilient_grpc.core.hedging import HedgingState, Verdict
from resilient_grpc.core.retry import Reason
from resilient_grpc.errors import BreakerOpenError, ThrottledError, mark_gave_up
from resilient_grpc.finished_call import deadline_from_timeout, pushback_of, status_name
from resilient_grpc.logical_call import PREVIOUS_ATTEMPTS_HEADER, Attempt, ClientStack, Metadata


class Actions:
    """What the shell must do after an event."""

    __slots__ = ("cancel", "done", "error", "send", "winner")

    def __init__(
        self,
        send: tuple[Attempt, ...] = (),
        cancel: tuple[int, ...] = (),
        *,
        done: bool = False,
        winner: int | None = None,
        error: BaseException | None = None,
    ) -> None:
        #: Attempts to send now.
        self.send = send
        #: Numbers of the attempts in flight to cancel.
        self.cancel = cancel
        #: The call is over: its outcome is attempt ``winner``'s, or ``error`` when that is set.
        self.done = done
        self.winner = winner
        self.error = error


_NOTHING = Actions()


class HedgedCall:
    """One hedged logical call: its fixed parts and its hedging state."""

    def __init__(
        self,
        stack: ClientStack,
        method: str,
        key: str | None,
        metadata: Metadata,
        wait_for_ready: bool | None,
        state: HedgingState,
    ) -> None:
        self.stack = stack
        self.method = method
        self.key = key
        self.metadata = metadata
        self.wait_for_ready = wait_for_ready
        self.state = state
        tel = telemetry.start_call(method, target=stack.target, transport=stack.transport)
        #: The call's telemetry; :data:`telemetry.UNWATCHED` (its reports are no-ops that build
        #: nothing) when no hook watches the call: then only a failed end is reported (:meth:`_end`).
        self.telemetry = telemetry.UNWATCHED if tel is None else tel
        #: Breaker admissions of the attempts in flight (to record or release each).
        self._admissions: dict[int, Admission] = {}
        self._last_error: BaseException | None = None
        self.over = False

    @property
    def blocking(self) -> bool:
        """Whether events do breaker I/O (Redis storage): aio shells run them off the loop."""
        breaker = self.stack.target_breaker
        return breaker is not None and breaker.blocking

    def wake_at(self) -> float | None:
        """When (``time.monotonic()``) the shell should call :meth:`on_timer` (``None``: never)."""
        state = self.state
        if self.over or state.committed or state.stopped is not None:
            return None
        return state.next_at

    # Events ----------------------------------------------------------------------------------

    def start(self) -> Actions:
        """The call starts: send the first attempt (or fail fast: breaker open, throttled)."""
        refusal = self._admit()
        if refusal is not None:
            return self._refused(refusal)
        self._admissions[self.state.begin()] = self._admission
        return Actions((self._attempt(1),))

    def on_timer(self) -> Actions:
        """The hedge timer fired: send the hedge that is due, if it may go."""
        if self.over:
            return _NOTHING
        return self._hedge()

    def on_done(self, number: int, error: BaseException | None) -> Actions:
        """Attempt ``number`` answered: ``None`` (OK) or the error it failed with."""
        state = self.state
        admission = self._admissions.pop(number, REFUSED)
        if self.over:
            self._release(admission)
            return _NOTHING
        code = "OK" if error is None else status_name(error)
        tel = self.telemetry
        tel.attempt(number, code, None)
        self._record_throttle(code)
        answer = state.on_answer(
            number, code, pushback=pushback_of(error) if error is not None else None
        )
        if error is not None:
            self._last_error = error
        if answer.verdict is Verdict.COMMIT:
            self._record(code, admission)
            losers = self._cancel_others()
            self.over = True
            if error is None:
                tel.end(code, attempts=state.sent, reason=Reason.SUCCESS)
                return Actions(cancel=losers, done=True, winner=number)
            return Actions(cancel=losers, done=True, winner=number, error=self._give_up(error))
        if answer.verdict is Verdict.GIVE_UP:
            self._count_failure(code, admission)
            return self._fail(number, answer.reason)
        if self._count_failure(code, admission) and not self._may_hold():
            state.stop(Reason.BREAKER_OPEN)  # else the next copy is held until it closes
        return self._hedge()

    def abandon(self, sent: Collection[int] | None = None) -> tuple[int, ...]:
        """The caller cancelled the call: return the attempts to cancel; nothing is charged.

        ``sent``: the numbers of the attempts the shell sent (``None``: every one it was
        asked to). A copy granted but never sent (the caller cancelled first) has its budget
        withdrawal refunded: only what was sent is traffic.
        """
        if self.over:
            return ()
        self.over = True
        if sent is not None:
            for number in sorted(self.state.in_flight):
                if number not in sent:
                    self.state.unsent(number)
        losers = self._cancel_others()
        self.telemetry.abandon(GeneratorExit())
        return losers

    # Internals -------------------------------------------------------------------------------

    _admission = REFUSED
    #: Whether the breaker has been told of a failure of this call (see :meth:`_count_failure`).
    _failure_counted = False

    def _admit(self) -> Reason | None:
        """Ask the throttle and the breaker for one more attempt (``None``: it may go)."""
        stack = self.stack
        throttle = stack.throttle
        if throttle is not None and not throttle.admit():
            return Reason.THROTTLED
        breaker = stack.target_breaker
        self._admission = ADMITTED
        if breaker is not None:
            self._admission = breaker.admit()
            if self._admission is REFUSED:
                return Reason.BREAKER_OPEN
        return None

    def _hedge(self) -> Actions:
        state = self.state
        if not state.due():
            return self._settle()
        if self._held_back():
            state.hold()
            return self._settle()
        refusal = self._admit()
        if refusal is not None:
            state.stop(refusal)
        else:
            number = state.hedge()
            if number is not None:
                self._admissions[number] = self._admission
                return Actions((self._attempt(number),))
            self._release(self._admission)
        return self._settle()

    def _held_back(self) -> bool:
        """Whether the failure copy that is due waits for the breaker to close.

        Only with ``failure_backoff``: the breaker's state is read, not asked for an
        admission, so a held copy never becomes one of an open breaker's probes (those are
        for fresh calls) and adds no load while the backend is down.
        """
        breaker = self.stack.target_breaker
        return (
            breaker is not None
            and self._may_hold()
            and self.state.after_failure
            and breaker.state != "closed"
        )

    def _may_hold(self) -> bool:
        """Failure copies wait for a breaker to close only with ``failure_backoff`` and a
        deadline (a call without one would wait as long as the outage lasts)."""
        state = self.state
        return bool(state.policy.failure_backoff) and state.deadline is not None

    def _settle(self) -> Actions:
        """Nothing to send now: wait, or fail if nothing is in flight and nothing will be."""
        answer = self.state.settle()
        if answer.verdict is Verdict.GIVE_UP:
            return self._fail(None, answer.reason)
        return _NOTHING

    def _attempt(self, number: int) -> Attempt:
        metadata = self.metadata
        timeout = self.state.attempt_timeout()
        wait_for_ready = self.wait_for_ready
        if number > 1:
            metadata = (*metadata, (PREVIOUS_ATTEMPTS_HEADER, str(number - 1)))
            if (
                wait_for_ready is None
                and timeout is not None
                and self.stack.reconnect_wait is not None
            ):
                # A copy after a cut connection would fail at once while the channel
                # reconnects (and a failure copy follows a failure): like a retry, it waits
                # for the channel, bounded by the caller's own deadline.
                wait_for_ready = True
        return Attempt(number, timeout, metadata, wait_for_ready)

    def _impatient(self, code: str) -> bool:
        """The caller's own deadline says how patient it is, not how healthy the backend is."""
        remaining = self.state.remaining()
        return code == "DEADLINE_EXCEEDED" and remaining is not None and remaining <= 0

    def _record_throttle(self, code: str) -> None:
        """Feed a copy's answer to the throttle (it counts requests: every copy is one)."""
        throttle = self.stack.throttle
        if throttle is not None and not self._impatient(code):
            throttle.record(code not in throttle.codes)

    def _record(self, code: str, admission: Admission) -> bool:
        """Feed an answer to the breaker; True if the breaker is open now."""
        breaker = self.stack.target_breaker
        if breaker is None:
            return False
        if self._impatient(code):
            breaker.release(admission)
            return False
        return breaker.record(admission, code in self.stack.breaker_codes)

    def _count_failure(self, code: str, admission: Admission) -> bool:
        """A copy failed with a non-fatal code: the breaker counts it if it is the call's first.

        The breaker counts calls, not copies: one failure at most per call, when its first
        copy fails (so a backend that is down opens the breaker as fast as with single
        attempts), and the call's success if another copy then succeeds. One replica in three
        answering UNAVAILABLE fails a third of the copies while every call succeeds on another
        replica; counting every failed copy opened the breaker on a service that served every
        call (issue 11's partial outage). A probe of an open or half-open breaker is always
        recorded (the breaker waits for it). True if the breaker is open now.
        """
        breaker = self.stack.target_breaker
        if breaker is None:
            return False
        failed = code in self.stack.breaker_codes
        if failed and admission is ADMITTED:
            if self._failure_counted:
                return False  # counted already: a repeat is the same call failing
            self._failure_counted = True
        return self._record(code, admission)

    def _release(self, admission: Admission) -> None:
        breaker = self.stack.target_breaker
        if breaker is not None:
            breaker.release(admission)

    def _cancel_others(self) -> tuple[int, ...]:
        state = self.state
        losers = tuple(sorted(state.in_flight))
        for number in losers:
            state.cancelled(number)
            self._release(self._admissions.pop(number, REFUSED))
            self.telemetry.attempt(number, "CANCELLED", None)
        return losers

    def _give_up(self, error: BaseException) -> BaseException:
        reason = Reason.NOT_RETRYABLE_CODE  # a fatal code: the call's answer
        self._end(status_name(error), self.state.sent, reason)
        mark_gave_up(error, self.state.sent, reason)
        return error

    def _fail(self, number: int | None, reason: Reason | None) -> Actions:
        """Every attempt failed and none will follow: the call ends with the last error."""
        self.over = True
        error = self._last_error
        if error is None:  # nothing answered (refused before the first attempt): impossible
            raise RuntimeError("a hedged call failed without any answer")
        reason = reason or Reason.MAX_ATTEMPTS
        self._end(status_name(error), self.state.sent, reason)
        mark_gave_up(error, self.state.sent, reason)
        return Actions(done=True, winner=number, error=error)

    def _refused(self, refusal: Reason) -> Actions:
        """The first attempt was refused locally: fail fast, nothing was sent."""
        self.over = True
        stack = self.stack
        tel = self.telemetry
        target = stack.target or "default"
        error: BaseException
        if refusal is Reason.BREAKER_OPEN:
            tel.breaker_rejected()
            breaker: TargetBreaker | None = stack.target_breaker
            error = BreakerOpenError(target, breaker.rejected_until if breaker else None)
        else:
            throttle = stack.throttle
            error = ThrottledError(target, throttle.rejection_probability if throttle else 1.0)
        self._end("UNAVAILABLE", 0, refusal)
        return Actions(done=True, error=error)

    def _end(self, code: str, attempts: int, reason: Reason) -> None:
        """Report the failed end of the call, watched or not (like a plain call)."""
        tel = self.telemetry
        if tel is not telemetry.UNWATCHED:
            tel.end(code, attempts=attempts, reason=reason)
        else:
            telemetry.call_failed(self.method, self.stack.target, code, attempts, reason)


def begin_hedged(
    stack: ClientStack,
    method: str,
    timeout: float | None,
    metadata: Sequence[tuple[str, Any]] | None,
    wait_for_ready: bool | None,
) -> HedgedCall:
    """Fix the key, metadata, deadline and hedging state of a hedged call made now."""
    policy = stack.hedging
    if policy is None:
        raise RuntimeError("begin_hedged() on a stack without a hedging policy")
    key, call_metadata = stack.key_and_metadata(method, metadata)
    state = HedgingState(
        policy,
        hedgeable=key is not None or policy.is_idempotent(method),
        deadline=deadline_from_timeout(timeout),
        budget=stack.hedge_failure_budget,
        hedge_budget=stack.hedging_budget,
    )
    return HedgedCall(stack, method, key, call_metadata, wait_for_ready, state)


__all__ = ["Actions", "HedgedCall", "begin_hedged"]
