"""Sync client interceptors: retries with backoff, budget, circuit breaker and idempotency keys.

``client_interceptors(...)`` returns interceptors for ``grpc.intercept_channel``;
``resilient_channel(...)`` builds a channel with them attached. Every decision is taken by the
shared driver (:mod:`resilient_grpc.logical_call`); this module only runs its steps with
blocking calls (``continuation``, ``time.sleep``).

* unary-unary calls are retried as a whole. ``stub.Method.future(...)`` works but runs the
  retry loop in the calling thread (the returned future is already done).
* unary-stream calls are retried until the first response message arrives; after that the call
  is committed (gRFC A6) and a later error reaches the caller as is. The attempts start on the
  first ``next()`` (or the first ``code()``/metadata access), with the key and deadline fixed
  when the stub was called.
* stream-unary and stream-stream calls are not intercepted (a request iterator cannot be replayed).

When the stack gives up it raises the last real error gRPC produced, with ``attempts`` and
``retry_reason`` attributes (see :mod:`resilient_grpc.errors`); an open breaker raises
:class:`~resilient_grpc.errors.BreakerOpenError` before anything is sent.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from resilient_grpc.breaker import CircuitBreaker
from resilient_grpc.core.budget import RetryBudget
from resilient_grpc.core.keys import IdempotencyKeys
from resilient_grpc.core.policy import RetryPolicy
from resilient_grpc.logical_call import (
    DEFAULT_RECONNECT_WAIT,
    Attempt,
    ClientStack,
    LogicalCall,
    Pause,
    Steps,
)

__all__ = ["client_interceptors", "resilient_channel"]


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,  # type: ignore[misc]
):
    """The call details of one attempt."""


def _attempt_details(base: grpc.ClientCallDetails, attempt: Attempt) -> _CallDetails:
    return _CallDetails(
        base.method,
        attempt.timeout,
        attempt.metadata,
        getattr(base, "credentials", None),
        attempt.wait_for_ready,
        getattr(base, "compression", None),
    )


def _drive(steps: Steps, attempt: Callable[[Attempt], BaseException | None]) -> None:
    """Run a logical call's steps in this thread: return after success, raise when giving up."""
    try:
        step = next(steps)
        while True:
            if step.__class__ is Attempt:
                result: Any = attempt(step)  # type: ignore[arg-type]
            elif step.__class__ is Pause:
                time.sleep(step.seconds)  # type: ignore[union-attr]
                result = None
            else:
                result = step.run()  # type: ignore[union-attr]
            step = steps.send(result)
    except StopIteration:
        return
    except BaseException:
        steps.close()  # ends the telemetry span if a step itself blew up
        raise


class _UnaryUnary(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Retries whole unary-unary calls."""

    def __init__(self, stack: ClientStack) -> None:
        self._stack = stack

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        call = self._stack.begin(
            client_call_details.method,
            client_call_details.timeout,
            client_call_details.metadata,
            getattr(client_call_details, "wait_for_ready", None),
        )
        outcome: Any = None

        def attempt(step: Attempt) -> BaseException | None:
            nonlocal outcome
            outcome = continuation(_attempt_details(client_call_details, step), request)
            error: BaseException | None = outcome.exception()
            return error

        try:
            _drive(call.steps(), attempt)
        except grpc.RpcError as error:
            if isinstance(error, grpc.Future):
                return error  # a finished Call-Future: result() raises it, exception() returns it
            raise
        return outcome


_NOTHING: Any = object()
_END: Any = object()


class RetryingStream(grpc.Call):  # type: ignore[misc]
    """A unary-stream call that is retried until its first message arrives (a Call and an iterator)."""

    def __init__(
        self,
        call: LogicalCall,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        details: grpc.ClientCallDetails,
        request: Any,
    ) -> None:
        self._logical = call
        self._continuation = continuation
        self._details = details
        self._request = request
        self._lock = threading.Lock()
        self._started = False
        self._cancelled = False
        self._call: Any = None
        self._error: BaseException | None = None
        self._first: Any = _NOTHING
        self._callbacks: list[Callable[[], None]] = []

    # The retry phase ---------------------------------------------------------------------------

    def _attempt(self, step: Attempt) -> BaseException | None:
        call = self._continuation(_attempt_details(self._details, step), self._request)
        self._call = call
        if self._cancelled:
            call.cancel()
        try:
            self._first = next(call)
        except StopIteration:
            self._first = _END
        except grpc.RpcError as error:
            return error
        return None

    def _start(self) -> None:
        with self._lock:
            if self._started:
                if self._error is not None:
                    raise self._error
                return
            self._started = True
            try:
                _drive(self._logical.steps(), self._attempt)
            except grpc.RpcError as error:
                self._error = error
                raise
            finally:
                self._run_pending_callbacks()

    def _run_pending_callbacks(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            if self._call is None or not self._call.add_callback(callback):
                callback()

    def _final(self) -> Any:
        """The attempt the caller sees: the committed one, or the error it ended with."""
        with contextlib.suppress(grpc.RpcError):
            self._start()
        return self._call if self._call is not None else self._error

    # Iterator ------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if not self._started or self._error is not None:
            self._start()
        first = self._first
        if first is not _NOTHING:
            if first is _END:
                raise StopIteration
            self._first = _NOTHING
            return first
        return next(self._call)

    def next(self) -> Any:
        return self.__next__()

    # grpc.Call -----------------------------------------------------------------------------------

    def initial_metadata(self) -> Any:
        return self._final().initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._final().trailing_metadata()

    def code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = self._final().code()
        return code

    def details(self) -> str | None:
        details: str | None = self._final().details()
        return details

    def is_active(self) -> bool:
        if not self._started:
            return not self._cancelled
        return self._call is not None and self._error is None and bool(self._call.is_active())

    def time_remaining(self) -> float | None:
        return self._logical.state.remaining()

    def cancel(self) -> bool:
        self._cancelled = True
        call = self._call
        return bool(call.cancel()) if call is not None else True

    def add_callback(self, callback: Callable[[], None]) -> bool:
        if self._started and not self._lock.locked():
            if self._call is None:
                return False
            return bool(self._call.add_callback(callback))
        self._callbacks.append(callback)
        return True


class _UnaryStream(grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Retries unary-stream calls until their first response message."""

    def __init__(self, stack: ClientStack) -> None:
        self._stack = stack

    def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> RetryingStream:
        call = self._stack.begin(
            client_call_details.method,
            client_call_details.timeout,
            client_call_details.metadata,
            getattr(client_call_details, "wait_for_ready", None),
        )
        return RetryingStream(call, continuation, client_call_details, request)


def client_interceptors(
    retry: RetryPolicy | None = None,
    budget: RetryBudget | None = None,
    breaker: CircuitBreaker | None = None,
    idempotency: IdempotencyKeys | None = None,
    *,
    target: str | None = None,
    reconnect_wait: float | None = DEFAULT_RECONNECT_WAIT,
) -> list[grpc.UnaryUnaryClientInterceptor | grpc.UnaryStreamClientInterceptor]:
    """Interceptors for ``grpc.intercept_channel(channel, *client_interceptors(...))``.

    ``retry``: the :class:`RetryPolicy` (``None``: one attempt, no retries). ``budget``: a
    :class:`RetryBudget` shared by every call that should share it. ``breaker``: a
    :class:`CircuitBreaker`; ``target`` names the breaker to use (pass the channel's target:
    one breaker per target; ``None`` uses a breaker named ``"default"``). ``idempotency``: which
    calls carry an idempotency key (``None``: no keys, so only methods the policy marks
    idempotent are retried). ``reconnect_wait``: see :class:`~resilient_grpc.logical_call.ClientStack`.
    Bad arguments raise ``ValueError`` naming the argument.
    """
    stack = ClientStack(
        retry=retry,
        budget=budget,
        breaker=breaker,
        idempotency=idempotency,
        target=target,
        reconnect_wait=reconnect_wait,
    )
    return [_UnaryUnary(stack), _UnaryStream(stack)]


def resilient_channel(
    target: str,
    *,
    retry: RetryPolicy | None = None,
    budget: RetryBudget | None = None,
    breaker: CircuitBreaker | None = None,
    idempotency: IdempotencyKeys | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
    reconnect_wait: float | None = DEFAULT_RECONNECT_WAIT,
) -> grpc.Channel:
    """A channel to ``target`` (secure if ``credentials`` is given) with the stack attached.

    The breaker (if any) is the one of ``target``. Closing the returned channel closes the
    underlying one.
    """
    if not isinstance(target, str) or not target:
        raise ValueError(f"target must be a non-empty string, got {target!r}")
    interceptors = client_interceptors(
        retry,
        budget,
        breaker,
        idempotency,
        target=target,
        reconnect_wait=reconnect_wait,
    )
    options = list(options)
    channel = (
        grpc.secure_channel(target, credentials, options=options)
        if credentials is not None
        else grpc.insecure_channel(target, options=options)
    )
    return grpc.intercept_channel(channel, *interceptors)
