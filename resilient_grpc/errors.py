"""Errors the client stack raises, and how a caller learns how many attempts a failed call made.

When a call gives up, the interceptors raise the *last real error* the channel produced (an
``_InactiveRpcError`` for sync stubs, a ``grpc.aio.AioRpcError`` for aio stubs), so existing
``except grpc.RpcError`` code keeps working unchanged. They set two attributes on it:

* ``attempts`` (int): how many attempts the logical call made (0: none, the breaker was open);
* ``retry_reason`` (:class:`resilient_grpc.core.retry.Reason`): why the stack stopped.

:func:`attempts_of` reads the first one from any exception (``None`` for an error that did not go
through the stack). A call refused by an open circuit breaker raises :class:`BreakerOpenError`.

There is no separate ``RetryError`` type on purpose: wrapping the real error would break code
that inspects ``code()``/``details()``/``trailing_metadata()`` of the error gRPC raised.
"""

from __future__ import annotations

import datetime
import types
from typing import Any

import grpc
import grpc.aio

from resilient_grpc.core.retry import Reason
from resilient_grpc.finished_call import FinishedCallFuture

#: Attribute set on a raised error: the number of attempts of the logical call.
ATTEMPTS_ATTRIBUTE = "attempts"
#: Attribute set on a raised error: the :class:`Reason` the stack stopped with.
REASON_ATTRIBUTE = "retry_reason"


def attempts_of(error: BaseException) -> int | None:
    """How many attempts the logical call behind ``error`` made (``None``: not from this stack)."""
    value = getattr(error, ATTEMPTS_ATTRIBUTE, None)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def reason_of(error: BaseException) -> Reason | None:
    """Why the stack gave up on the call behind ``error`` (``None``: not from this stack)."""
    value = getattr(error, REASON_ATTRIBUTE, None)
    return value if isinstance(value, Reason) else None


def mark_gave_up(error: BaseException, attempts: int, reason: Reason) -> None:
    """Record the attempt count and the reason on an error about to reach the caller."""
    try:
        setattr(error, ATTEMPTS_ATTRIBUTE, attempts)
        setattr(error, REASON_ATTRIBUTE, reason)
    except AttributeError:  # an exception type with __slots__: nothing we can attach
        pass


class BreakerOpenError(grpc.aio.AioRpcError, FinishedCallFuture):  # type: ignore[misc]
    """The circuit breaker of ``target`` is open: the call failed fast, nothing was sent.

    It is a ``grpc.RpcError`` with ``code()`` UNAVAILABLE, a ``grpc.Call`` and a ``grpc.Future``
    (like the errors sync stubs raise), and a ``grpc.aio.AioRpcError`` (like the errors aio
    stubs raise), so every existing ``except`` clause catches it. ``retry_at`` is the wall-clock
    time (UTC) after which the breaker lets one probe call through.
    """

    def __init__(
        self,
        target: str,
        retry_at: datetime.datetime | None,
        *,
        attempts: int = 0,
        reason: Reason = Reason.BREAKER_OPEN,
    ) -> None:
        self.target = target
        self.retry_at = retry_at
        self.attempts = attempts
        self.retry_reason = reason
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            initial_metadata=grpc.aio.Metadata(),
            trailing_metadata=grpc.aio.Metadata(),
            details=self._describe(target, retry_at),
            debug_error_string=None,
        )

    @staticmethod
    def _describe(target: str, retry_at: datetime.datetime | None) -> str:
        if retry_at is None:
            when = "a probe call is already in flight"
        else:
            now = datetime.datetime.now(datetime.timezone.utc)
            left = max((retry_at - now).total_seconds(), 0.0)
            when = (
                f"next probe after {retry_at.isoformat(timespec='milliseconds')} (in {left:.2f} s)"
            )
        return f"circuit breaker for {target} is open: failing fast without calling; {when}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.target, self.retry_at), {"attempts": self.attempts})

    def time_remaining(self) -> float | None:  # type: ignore[override]
        return None

    # grpc.Future: a finished future whose exception is this error.
    def result(self, timeout: float | None = None) -> Any:
        raise self

    def exception(self, timeout: float | None = None) -> BreakerOpenError:
        return self

    def traceback(self, timeout: float | None = None) -> types.TracebackType | None:
        return self.__traceback__


class ThrottledError(grpc.aio.AioRpcError, FinishedCallFuture):  # type: ignore[misc]
    """The adaptive throttle of ``target`` rejected the call locally: nothing was sent.

    Like :class:`BreakerOpenError`: a ``grpc.RpcError`` with ``code()`` UNAVAILABLE, a
    ``grpc.Call``, a ``grpc.Future`` and a ``grpc.aio.AioRpcError``. ``probability`` is the
    rejection probability the throttle had when it rejected the call.
    """

    def __init__(self, target: str, probability: float, *, attempts: int = 0) -> None:
        self.target = target
        self.probability = probability
        self.attempts = attempts
        self.retry_reason = Reason.THROTTLED
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            initial_metadata=grpc.aio.Metadata(),
            trailing_metadata=grpc.aio.Metadata(),
            details=(
                f"adaptive throttle for {target} rejected the call locally (rejecting "
                f"{probability:.0%} of calls while the backend refuses most of them)"
            ),
            debug_error_string=None,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.target, self.probability), {"attempts": self.attempts})

    def time_remaining(self) -> float | None:  # type: ignore[override]
        return None

    # grpc.Future: a finished future whose exception is this error.
    def result(self, timeout: float | None = None) -> Any:
        raise self

    def exception(self, timeout: float | None = None) -> ThrottledError:
        return self

    def traceback(self, timeout: float | None = None) -> types.TracebackType | None:
        return self.__traceback__
