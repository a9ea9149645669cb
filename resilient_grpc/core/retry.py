"""The retry decision for one logical call: retry or give up, after how long, and why.

:class:`RetryState` is a small sans-IO state machine: the shell reports each attempt's
outcome and gets back a :class:`RetryDecision`; it never sleeps or touches the network.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from resilient_grpc.core.backoff import Uniform, default_uniform, jittered_backoff
from resilient_grpc.core.budget import RetryBudget
from resilient_grpc.core.policy import RetryPolicy
from resilient_grpc.core.pushback import Pushback

Clock = Callable[[], float]


class Reason(str, Enum):
    """Why a decision was taken; shows up in telemetry and logs."""

    RETRY = "retry"
    SUCCESS = "success"
    NOT_RETRYABLE_CODE = "not_retryable_code"
    NOT_IDEMPOTENT = "not_idempotent"
    MAX_ATTEMPTS = "max_attempts"
    PUSHBACK_STOP = "pushback_stop"
    DEADLINE = "deadline"
    BUDGET_EXHAUSTED = "budget_exhausted"
    BREAKER_OPEN = "breaker_open"
    THROTTLED = "throttled"


class TimeoutCause(str, Enum):
    """Which deadline ended an attempt that failed with DEADLINE_EXCEEDED."""

    #: The policy's ``per_attempt_timeout`` cut it while the call's deadline was still alive.
    ATTEMPT = "attempt"
    #: The caller's own deadline for the whole call expired.
    CALL = "call"


class DelaySource(str, Enum):
    """Where the chosen delay came from."""

    COMPUTED = "computed"
    PUSHBACK = "pushback"
    RETRY_INFO = "retry_info"


@dataclass(frozen=True)
class RetryDecision:
    """The answer to "an attempt failed with this code: what now?"."""

    retry: bool
    reason: Reason
    delay: float = 0.0
    source: DelaySource | None = None
    attempt: int = 0


class RetryState:
    """Retry bookkeeping for one logical call (all its attempts).

    ``deadline`` is an absolute time on ``clock`` (``None``: no deadline). The first attempt
    deposits once into ``budget`` (a call refused before anything was sent is not traffic); each
    retry it grants withdraws once, and :meth:`abandon` refunds a granted retry that was never
    sent (the call was cancelled meanwhile). Not thread-safe: one logical call is driven by one
    thread or task.
    """

    __slots__ = (
        "_attempt_bound",
        "_attempt_deadline",
        "_backoff_retries",
        "_clock",
        "_previous_delay",
        "_uniform",
        "_unsent_retry",
        "attempts",
        "budget",
        "deadline",
        "has_key",
        "method",
        "policy",
    )

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        method: str,
        has_key: bool,
        deadline: float | None = None,
        budget: RetryBudget | None = None,
        clock: Clock = time.monotonic,
        uniform: Uniform | None = None,
    ) -> None:
        self.policy = policy
        self.method = method
        self.has_key = has_key
        self.deadline = deadline
        self.budget = budget
        self._clock = clock
        self._uniform = uniform  # None: the process-wide source, looked up when needed
        self.attempts = 0
        self._previous_delay: float | None = None
        #: Computed backoffs since the start or since the last server-requested delay.
        self._backoff_retries = 0
        #: When the budget granted the retry not sent yet (``None``: there is none).
        self._unsent_retry: float | None = None
        self._attempt_deadline: float | None = None
        self._attempt_bound: TimeoutCause | None = None

    def begin_attempt(self) -> float | None:
        """Start the next attempt; return its timeout in seconds (``None``: unbounded).

        The timeout is the smaller of ``per_attempt_timeout`` and the time left to the deadline.
        """
        attempts = self.attempts
        if attempts == 0:
            if self.budget is not None:
                self.budget.deposit()
        else:
            self._unsent_retry = None
        self.attempts = attempts + 1
        timeout = self.policy.per_attempt_timeout
        deadline = self.deadline
        if deadline is None:
            if timeout is None:
                self._attempt_deadline = None
                return None
            self._attempt_bound = TimeoutCause.ATTEMPT
            self._attempt_deadline = self._clock() + timeout
            return timeout
        now = self._clock()
        remaining = max(deadline - now, 0.0)
        if timeout is None or remaining <= timeout:
            self._attempt_bound = TimeoutCause.CALL
            self._attempt_deadline = now + remaining
            return remaining
        self._attempt_bound = TimeoutCause.ATTEMPT
        self._attempt_deadline = now + timeout
        return timeout

    def timeout_cause(self) -> TimeoutCause | None:
        """Which deadline the last attempt ran into, if it has passed (``None``: neither).

        Asked about an attempt that failed with DEADLINE_EXCEEDED: ``None`` then means the
        server itself returned that status before the attempt's time was up.
        """
        if self._attempt_deadline is None or self._clock() < self._attempt_deadline:
            return None
        return self._attempt_bound

    def abandon(self) -> None:
        """The call ended before its granted retry was sent (cancelled, or refused by the
        breaker or throttle after its backoff): refund that retry."""
        taken = self._unsent_retry
        if taken is not None and self.budget is not None:
            self._unsent_retry = None
            self.budget.refund(taken)  # this call's withdrawal, not the latest one

    def remaining(self) -> float | None:
        """Seconds left before the call's deadline (``None``: no deadline)."""
        if self.deadline is None:
            return None
        return self.deadline - self._clock()

    def on_failure(
        self,
        code: str,
        *,
        pushback: Pushback | None = None,
        retry_info_delay: float | None = None,
    ) -> RetryDecision:
        """Decide what follows a failed attempt with status ``code`` (its name).

        ``pushback`` is the parsed ``grpc-retry-pushback-ms`` trailer and ``retry_info_delay``
        the delay from a ``google.rpc.RetryInfo`` detail; either overrides the computed backoff
        (capped at ``max_pushback``), and the computed backoff restarts from
        ``initial_backoff`` after it (gRFC A6). A DEADLINE_EXCEEDED caused by the policy's
        ``per_attempt_timeout`` is retried whatever ``retryable_codes`` says.
        """
        attempt = self.attempts
        policy = self.policy
        if (
            code not in policy.retryable_codes
            and not (code == "DEADLINE_EXCEEDED" and self.timeout_cause() is TimeoutCause.ATTEMPT)
            and not (
                # A dedup server answers a duplicate of a call still running elsewhere with ABORTED
                # and a pushback: "the same key is in flight, ask again in N ms". Retrying a keyed
                # call then cannot duplicate anything, so it is honoured whatever the policy lists.
                code == "ABORTED" and self.has_key and pushback is not None and not pushback.stop
            )
        ):
            return RetryDecision(False, Reason.NOT_RETRYABLE_CODE, attempt=attempt)
        if not self.has_key and not self.policy.is_idempotent(self.method):
            return RetryDecision(False, Reason.NOT_IDEMPOTENT, attempt=attempt)
        if attempt >= self.policy.max_attempts:
            return RetryDecision(False, Reason.MAX_ATTEMPTS, attempt=attempt)
        if pushback is not None and pushback.stop:
            return RetryDecision(False, Reason.PUSHBACK_STOP, attempt=attempt)
        if pushback is not None and pushback.delay is not None:
            delay, source = min(pushback.delay, policy.max_pushback), DelaySource.PUSHBACK
        elif retry_info_delay is not None:
            if retry_info_delay < 0:
                return RetryDecision(False, Reason.PUSHBACK_STOP, attempt=attempt)
            delay, source = min(retry_info_delay, policy.max_pushback), DelaySource.RETRY_INFO
        else:
            retry_number = self._backoff_retries + 1
            delay = jittered_backoff(
                policy, retry_number, self._previous_delay, self._uniform or default_uniform()
            )
            source = DelaySource.COMPUTED
        if self.deadline is not None and self._clock() + delay >= self.deadline:
            return RetryDecision(False, Reason.DEADLINE, delay, source, attempt)
        if self.budget is not None:
            taken = self.budget.withdraw()
            if taken is None:
                return RetryDecision(False, Reason.BUDGET_EXHAUSTED, delay, source, attempt)
            self._unsent_retry = taken
        if source is DelaySource.COMPUTED:
            self._backoff_retries += 1
            self._previous_delay = delay
        else:  # gRFC A6: after a server-chosen delay the backoff starts again
            self._backoff_retries = 0
            self._previous_delay = None
        return RetryDecision(True, Reason.RETRY, delay, source, attempt)

    def breaker_open(self) -> RetryDecision:
        """The decision when the circuit breaker is (or just went) open: stop now."""
        return RetryDecision(False, Reason.BREAKER_OPEN, attempt=self.attempts)

    def throttled(self) -> RetryDecision:
        """The decision when the adaptive throttle rejected the next attempt: stop now."""
        return RetryDecision(False, Reason.THROTTLED, attempt=self.attempts)
