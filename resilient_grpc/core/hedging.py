"""Hedging (gRFC A6): several copies of one call in flight, the first good answer wins.

:class:`HedgingPolicy` says how many copies and how far apart; :class:`HedgingState` is the
sans-IO state machine of one hedged call. The shell reports events (the call started, a timer
fired, an attempt answered) and gets back what to do: send attempts, cancel the others, finish.
It never sleeps, sends or cancels anything itself, and its clock is injectable.

A6 semantics: the first attempt goes at once, another every ``delay`` while none has answered;
an attempt that fails with a *non-fatal* code makes the next one go at once; the first answer
that is OK or a fatal code (any code not in ``non_fatal_codes``) commits the call and the other
attempts are cancelled. A server pushback on a non-fatal failure sets when the next hedge may
go (``grpc-retry-pushback-ms``), a negative one stops hedging (attempts in flight go on).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from resilient_grpc.core.budget import RetryBudget
from resilient_grpc.core.codes import DEFAULT_RETRYABLE_CODES, code_names
from resilient_grpc.core.methods import method_matches, method_patterns
from resilient_grpc.core.policy import DEFAULT_MAX_PUSHBACK, RetryPolicy, StatusCodeLike
from resilient_grpc.core.pushback import Pushback
from resilient_grpc.core.retry import Reason
from resilient_grpc.core.service_config import (
    MAX_ATTEMPTS_CAP,
    build,
    format_duration,
    hedging_spec,
)
from resilient_grpc.core.validation import finite_number, whole_number

Clock = Callable[[], float]
#: The longest failure backoff, as a multiple of ``HedgingPolicy.failure_backoff``.
MAX_BACKOFF_MULTIPLE = 16.0


@dataclass(frozen=True, init=False)
class HedgingPolicy:
    """Send up to ``max_attempts`` copies of a call, ``delay`` seconds apart (gRFC A6 hedging).

    ``non_fatal_codes`` (default: UNAVAILABLE): a copy failing with one of them lets the next
    copy go at once and the others go on; any other code (and OK) is the call's answer. A6's
    own default is no non-fatal code at all; UNAVAILABLE is what a replica that is down or
    draining answers, and moving on to another replica is what hedging is for.

    ``methods``: the full method names or ``"/pkg.Service/*"`` patterns that are hedged (empty,
    the default: every method). A method that is hedged is not retried: give ``retry=`` and
    ``hedging=`` to one stack only with ``methods`` set, and the retry policy serves the others.

    A call is hedged only when it carries an idempotency key (the copies share it, so a server
    ``DedupInterceptor`` runs the handler once and replays its outcome to the other copies) or
    its method is listed in ``idempotent_methods``; any other call is sent once.
    ``max_pushback`` caps a delay the server asks for. Bad values raise ``ValueError`` naming
    the field.

    ``failure_backoff`` (seconds; default 0, gRFC A6): after the ``n``-th non-fatal failure of
    a call the next copy waits ``failure_backoff * 2**(n-1)`` (at most 16 times
    ``failure_backoff``), half of it fixed and half random (equal jitter), instead of going at
    once. A deviation from A6 for what A6's "at once" costs: a copy sent at once after a cut
    connection goes out on the channel that is still reconnecting and fails too, and a backend
    that is down gets every copy of every call within milliseconds, before a breaker could
    see the outage. With it, a failure copy that finds the call's breaker not closed is held
    back (for the next backoff) rather than dropped, and goes out if a probe closes the breaker
    before the call's deadline: a call that failed in the last moments of an outage is
    answered after it, as a retry with backoff would be. It is not part of the service config.

    ``refund_wins`` (default False): a latency hedge that wins the call (its OK is the first
    answer) gives its budget withdrawal back. It did what hedging is for: the replica the
    earlier copies went to was slow and another one was not. The budget then bounds only the
    hedges that did not help, which is what an overloaded backend gets (every copy waits in
    the same queue, and the earliest answers first), so a small hedging budget serves a slow
    replica, where a third of the calls need a hedge, without letting the copies feed an
    overload. The winners add at most ``max_attempts - 1`` copies per call. Neither this nor
    ``failure_backoff`` is part of the service config (``to_service_config`` leaves them out).
    """

    max_attempts: int
    delay: float
    non_fatal_codes: frozenset[str]
    methods: frozenset[str]
    idempotent_methods: frozenset[str]
    max_pushback: float
    failure_backoff: float
    refund_wins: bool

    def __init__(
        self,
        max_attempts: int = 3,
        delay: float = 0.05,
        non_fatal_codes: Iterable[StatusCodeLike] = DEFAULT_RETRYABLE_CODES,
        *,
        methods: Iterable[str] = frozenset(),
        idempotent_methods: Iterable[str] = frozenset(),
        max_pushback: float = DEFAULT_MAX_PUSHBACK,
        failure_backoff: float = 0.0,
        refund_wins: bool = False,
    ) -> None:
        whole_number("max_attempts", max_attempts, at_least=1)
        object.__setattr__(self, "max_attempts", max_attempts)
        object.__setattr__(
            self, "delay", finite_number("delay", delay, at_least=0.0, unit=" of seconds")
        )
        codes = code_names(non_fatal_codes, field="non_fatal_codes")
        if "OK" in codes:
            raise ValueError("non_fatal_codes: OK is an answer and cannot be non-fatal")
        object.__setattr__(self, "non_fatal_codes", codes)
        object.__setattr__(self, "methods", method_patterns(methods, field="methods"))
        object.__setattr__(
            self,
            "idempotent_methods",
            method_patterns(idempotent_methods, field="idempotent_methods"),
        )
        object.__setattr__(
            self,
            "max_pushback",
            finite_number("max_pushback", max_pushback, above=0.0, unit=" of seconds"),
        )
        object.__setattr__(
            self,
            "failure_backoff",
            finite_number("failure_backoff", failure_backoff, at_least=0.0, unit=" of seconds"),
        )

        if not isinstance(refund_wins, bool):
            raise ValueError(f"refund_wins must be True or False, got {refund_wins!r}")
        object.__setattr__(self, "refund_wins", refund_wins)

    def backoff_after(self, failures: int, draw: float) -> float:
        """The wait before the copy that follows the ``failures``-th non-fatal failure.

        ``draw`` is uniform in [0, 1): the random half of the wait (equal jitter).
        """
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures!r}")
        base = self.failure_backoff * min(2.0 ** (failures - 1), MAX_BACKOFF_MULTIPLE)
        return base / 2 + base / 2 * draw

    def applies_to(self, method: str) -> bool:
        """Whether calls of ``method`` are hedged by this policy."""
        return not self.methods or method_matches(self.methods, method)

    def is_idempotent(self, method: str) -> bool:
        """Whether ``method`` may be hedged without an idempotency key."""
        return method_matches(self.idempotent_methods, method)

    def with_changes(self, **changes: Any) -> HedgingPolicy:
        """A copy with some fields replaced (validated like the constructor)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_service_config(
        cls,
        config: str | bytes | Mapping[str, Any],
        *,
        method: str | None = None,
        max_attempts_cap: int | None = MAX_ATTEMPTS_CAP,
    ) -> HedgingPolicy:
        """Build a policy from gRPC service-config JSON (gRFC A6 ``hedgingPolicy``).

        ``method`` picks the ``methodConfig`` entry that applies to it; without it the config
        must have exactly one ``hedgingPolicy``. ``methods`` is set to the entry's names.
        """
        return build(cls, hedging_spec(config, method=method, max_attempts_cap=max_attempts_cap))

    def to_service_config(
        self,
        methods: Iterable[str] | None = None,
        *,
        budget: RetryBudget | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """The gRPC service config (a dict) with this ``hedgingPolicy`` for ``methods``.

        ``methods`` defaults to the policy's own ``methods`` (``"*"``, every method, when it
        lists none).
        """
        if methods is None:
            methods = self.methods or {"*"}
        config = RetryPolicy(max_attempts=1).to_service_config(
            methods, budget=budget, timeout=timeout
        )
        if self.max_attempts >= 2:
            config["methodConfig"][0]["hedgingPolicy"] = {
                "maxAttempts": min(self.max_attempts, MAX_ATTEMPTS_CAP),
                "hedgingDelay": "0s" if self.delay == 0 else format_duration(self.delay),
                "nonFatalStatusCodes": sorted(self.non_fatal_codes),
            }
        return config


class Verdict(str, Enum):
    """What an answer means for the whole call."""

    #: Nothing decided yet: wait for the other attempts (and the hedge timer).
    WAIT = "wait"
    #: This attempt's answer (OK or a fatal code) is the call's: cancel the others.
    COMMIT = "commit"
    #: Every attempt failed and no more will be sent: the call fails with this answer.
    GIVE_UP = "give_up"


@dataclass(frozen=True)
class Answer:
    """The state machine's reply to an attempt's answer."""

    verdict: Verdict
    #: Why the call gave up (``GIVE_UP``), or ``SUCCESS``/``NOT_RETRYABLE_CODE`` (``COMMIT``).
    reason: Reason | None = None


class HedgingState:
    """The hedging bookkeeping of one logical call.

    ``deadline`` is absolute on ``clock`` (``None``: no deadline). The first attempt deposits
    into ``budget``; every copy after it is a withdrawal, and a refused withdrawal stops
    hedging (the attempts in flight go on). ``hedgeable=False`` (a call without key to a method
    not marked idempotent) makes a single-attempt call. Not thread-safe: the shell serializes
    the events of one call.

    Two kinds of copies: a *latency hedge*, sent because ``delay`` passed while the copies in
    flight have not answered, and a *failure copy*, sent because a copy failed with a non-fatal
    code (a retry, in effect). With ``hedge_budget`` set, latency hedges withdraw from it and
    failure copies from ``budget`` (the first attempt deposits into both): a slow replica needs
    a latency hedge for a third of the calls, while a backend that is down needs no copy at all,
    and one shared budget cannot allow the first without allowing the second
    (:attr:`after_failure` says which kind the next copy is).
    """

    def __init__(
        self,
        policy: HedgingPolicy,
        *,
        hedgeable: bool,
        deadline: float | None = None,
        budget: RetryBudget | None = None,
        hedge_budget: RetryBudget | None = None,
        clock: Clock = time.monotonic,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self.deadline = deadline
        self.budget = budget
        self.hedge_budget = hedge_budget
        #: Whether the next copy, when it goes, follows a non-fatal failure (a failure copy)
        #: rather than the hedge delay (a latency hedge).
        self.after_failure = False
        #: Non-fatal failures so far (they set the failure backoff).
        self.failures = 0
        #: The latency hedges sent, by number, with the budget each withdrew from and when.
        self._latency_hedges: dict[int, tuple[RetryBudget, float] | None] = {}
        #: Every copy after the first, by number, with the budget it withdrew from and when.
        self._withdrawals: dict[int, tuple[RetryBudget, float] | None] = {}
        #: Whether the winner was a latency hedge whose withdrawal was given back.
        self.refunded = False
        self._clock = clock
        self._draw = draw
        self._limit = policy.max_attempts if hedgeable else 1
        #: How many attempts have been sent.
        self.sent = 0
        #: Numbers (1-based) of the attempts in flight.
        self.in_flight: set[int] = set()
        #: When the next hedge is due (absolute on ``clock``; ``None``: none planned).
        self.next_at: float | None = None
        #: Why hedging stopped early (``None``: it has not).
        self.stopped: Reason | None = None
        self.committed = False

    def remaining(self) -> float | None:
        """Seconds left before the call's deadline (``None``: no deadline)."""
        return None if self.deadline is None else self.deadline - self._clock()

    def _can_send_more(self) -> bool:
        return self.stopped is None and not self.committed and self.sent < self._limit

    def begin(self) -> int:
        """Send the first attempt now; return its number (1)."""
        if self.sent:
            raise RuntimeError("begin() is called once per call")
        if self.budget is not None:
            self.budget.deposit()
        if self.hedge_budget is not None and self.hedge_budget is not self.budget:
            self.hedge_budget.deposit()
        return self._send(self._clock())

    def _send(self, now: float) -> int:
        self.sent += 1
        self.in_flight.add(self.sent)
        self.next_at = now + self.policy.delay if self.sent < self._limit else None
        self.after_failure = False
        return self.sent

    def _budget_of_next(self) -> RetryBudget | None:
        """The budget the next copy withdraws from (see the class docstring)."""
        if self.after_failure or self.hedge_budget is None:
            return self.budget
        return self.hedge_budget

    def attempt_timeout(self) -> float | None:
        """The timeout of an attempt sent now: the time left to the deadline."""
        remaining = self.remaining()
        return None if remaining is None else max(remaining, 0.0)

    def due(self) -> bool:
        """Whether a hedge should be sent now (its time has come and it may be sent)."""
        return self._can_send_more() and self.next_at is not None and self._clock() >= self.next_at

    def hedge(self) -> int | None:
        """Send the hedge that is due; return its number, or ``None`` when it may not go.

        Asks the deadline and the budget (one withdrawal per hedge: from ``hedge_budget`` for
        a latency hedge when it is set, else from ``budget``); a refusal stops hedging and is
        remembered in :attr:`stopped`.
        """
        if not self.due():
            return None
        now = self._clock()
        if self.deadline is not None and now >= self.deadline:
            self.stop(Reason.DEADLINE)
            return None
        budget = self._budget_of_next()
        withdrawal: tuple[RetryBudget, float] | None = None
        if budget is not None:
            taken = budget.withdraw()
            if taken is None:
                self.stop(Reason.BUDGET_EXHAUSTED)
                return None
            withdrawal = (budget, taken)
        latency = not self.after_failure
        number = self._send(now)
        self._withdrawals[number] = withdrawal
        if latency:
            self._latency_hedges[number] = withdrawal
        return number

    def _failure_wait(self) -> float:
        if not self.policy.failure_backoff:
            return 0.0
        return self.policy.backoff_after(self.failures, self._draw())

    def hold(self) -> None:
        """The failure copy that is due may not go yet (the breaker is not closed): plan it
        one failure backoff later (a longer one each time). Only with ``failure_backoff``."""
        if not (self.policy.failure_backoff and self.after_failure and self._can_send_more()):
            raise RuntimeError("hold() is for a due failure copy with failure_backoff set")
        self.failures += 1
        self.next_at = self._clock() + self._failure_wait()

    def stop(self, reason: Reason) -> None:
        """Send no more hedges (budget, breaker, throttle or a negative pushback said so)."""
        if self.stopped is None:
            self.stopped = reason
        self.next_at = None

    def cancelled(self, number: int) -> None:
        """Attempt ``number`` was cancelled by the shell (it lost, or the caller gave up)."""
        self.in_flight.discard(number)

    def unsent(self, number: int) -> None:
        """Copy ``number`` was granted but never sent (the caller cancelled the call first):
        its withdrawal is given back, once (the shell still reports it :meth:`cancelled`).
        Only what was sent is traffic."""
        withdrawal = self._withdrawals.pop(number, None)
        self._latency_hedges.pop(number, None)
        if withdrawal is not None:
            budget, taken = withdrawal
            budget.refund(taken)  # this copy's withdrawal, not the latest one

    def on_answer(self, number: int, code: str, *, pushback: Pushback | None = None) -> Answer:
        """Attempt ``number`` answered with status ``code`` (its name): what now?"""
        self.in_flight.discard(number)
        if self.committed:
            return Answer(Verdict.WAIT)  # a late answer of a cancelled attempt: ignored
        if code == "OK" or code not in self.policy.non_fatal_codes:
            self.committed = True
            self.next_at = None
            if code == "OK" and self.policy.refund_wins and number in self._latency_hedges:
                withdrawal = self._latency_hedges[number]
                if withdrawal is not None:
                    budget, taken = withdrawal
                    budget.refund(taken)  # this hedge's withdrawal, not the latest one
                    self.refunded = True
            reason = Reason.SUCCESS if code == "OK" else Reason.NOT_RETRYABLE_CODE
            return Answer(Verdict.COMMIT, reason)
        if pushback is not None:
            if pushback.stop:
                self.stop(Reason.PUSHBACK_STOP)
            elif self._can_send_more() and pushback.delay is not None:
                self.next_at = self._clock() + min(pushback.delay, self.policy.max_pushback)
        elif self._can_send_more():
            # A6: a non-fatal failure sends the next hedge at once (unless failure_backoff)
            self.failures += 1
            self.next_at = self._clock() + self._failure_wait()
        if self._can_send_more() and self.next_at is not None:
            self.after_failure = True
        return self.settle()

    def exhausted(self) -> bool:
        """Nothing in flight and nothing more will be sent: the call has failed."""
        if self.committed or self.in_flight:
            return False
        if self._can_send_more() and self.next_at is not None:
            if self.deadline is None or self.next_at < self.deadline:
                return False
            self.stop(Reason.DEADLINE)
        return True

    def settle(self) -> Answer:
        """``GIVE_UP`` (and why) if :meth:`exhausted`, else ``WAIT``."""
        if not self.exhausted():
            return Answer(Verdict.WAIT)
        self.committed = True
        self.next_at = None
        return Answer(Verdict.GIVE_UP, self.stopped or Reason.MAX_ATTEMPTS)
