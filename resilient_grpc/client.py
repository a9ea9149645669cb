"""Sync client stack: retries with backoff, budget, circuit breaker and idempotency keys.

Two ways to attach it, with the same behaviour:

* ``client_interceptors(...)``: interceptors for ``grpc.intercept_channel`` (to compose with
  other interceptors);
* ``resilient_channel(...)``: a channel that runs the stack directly around the underlying
  channel's calls, skipping the per-call work of ``grpc.intercept_channel`` (the fast path).

Every decision is taken by the shared driver (:mod:`resilient_grpc.logical_call`); this module
only runs its steps with blocking calls (the RPC, ``time.sleep``).

* unary-unary calls are retried as a whole. ``stub.Method.future(...)`` works but runs the
  retry loop in the calling thread (the returned future is already done).
* unary-stream calls are retried until the first response message arrives; after that the call
  is committed (gRFC A6) and a later error reaches the caller as is. The attempts start on the
  first ``next()`` (or the first ``code()``/metadata access), with the key and deadline fixed
  when the stub was called.
* stream-unary and stream-stream calls pass through (a request iterator cannot be replayed).

When the stack gives up it raises the last real error gRPC produced, with ``attempts`` and
``retry_reason`` attributes (see :mod:`resilient_grpc.errors`); an open breaker raises
:class:`~resilient_grpc.errors.BreakerOpenError` before anything is sent::

    channel = resilient_channel(
        "ledger.internal:443",
        credentials=grpc.ssl_channel_credentials(),
        retry=RetryPolicy(max_attempts=4, initial_backoff=0.05, per_attempt_timeout=1.0),
        budget=RetryBudget(ratio=0.1),          # share one budget per backend
        breaker=CircuitBreaker(fail_max=5, reset_timeout=10),
        idempotency=IdempotencyKeys(),          # a key per logical call, same on every attempt
    )
    stub = LedgerStub(channel)
    try:
        stub.Transfer(request, timeout=3.0)     # the overall deadline of all attempts
    except grpc.RpcError as error:
        log.warning("transfer failed: %s after %s attempts", error.code(), attempts_of(error))
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import grpc

from resilient_grpc.breaker import CircuitBreaker
from resilient_grpc.call_outcome import FinishedCallFuture
from resilient_grpc.core.budget import RetryBudget
from resilient_grpc.core.keys import IdempotencyKeys
from resilient_grpc.core.policy import RetryPolicy
from resilient_grpc.logical_call import (
    DEFAULT_RECONNECT_WAIT,
    END_OF_STREAM,
    NO_MESSAGE,
    Attempt,
    BreakerIO,
    ClientStack,
    LogicalCall,
    Pause,
    Steps,
    StubMethod,
    open_channel,
)

__all__ = ["RetryingStream", "client_interceptors", "resilient_channel"]

#: Sends one attempt: returns what the transport returned for it.
Send = Callable[[Attempt], Any]


def _drive(steps: Steps, attempt: Callable[[Attempt], BaseException | None]) -> None:
    """Run a logical call's steps in this thread: return after success, raise when giving up."""
    try:
        step = next(steps)
        while True:
            if step.__class__ is Attempt:
                result: Any = attempt(step)
            elif step.__class__ is Pause:
                time.sleep(step.seconds)
                result = None
            else:
                result = cast(BreakerIO, step).run()
            step = steps.send(result)
    except StopIteration:
        return
    except BaseException:
        steps.close()  # ends the telemetry span if a step itself blew up
        raise


def _run_unary(call: LogicalCall, send: Send) -> Any:
    """Run a unary-unary logical call; return the last attempt's outcome (a Call-Future).

    ``send`` returns a finished Call-Future whose ``exception()`` is ``None`` on success (what
    an interceptor's continuation returns, and what :class:`_Channel` builds). When the stack
    gives up, the outcome returned is the failed one (its ``result()`` raises the error).
    """
    outcome: Any = None

    def attempt(step: Attempt) -> BaseException | None:
        nonlocal outcome
        outcome = send(step)
        error: BaseException | None = outcome.exception()
        return error

    try:
        _drive(call.steps(), attempt)
    except grpc.RpcError as error:
        if isinstance(error, grpc.Future):
            return error  # a finished Call-Future: result() raises it, exception() returns it
        raise
    return outcome


class _Outcome(FinishedCallFuture):
    """A finished successful unary call: its response and the gRPC call it came from."""

    __slots__ = ("_call", "_response")

    def __init__(self, response: Any, call: grpc.Call) -> None:
        self._response = response
        self._call = call

    def initial_metadata(self) -> Any:
        return self._call.initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._call.trailing_metadata()

    def code(self) -> grpc.StatusCode:
        return self._call.code()

    def details(self) -> Any:
        return self._call.details()

    def time_remaining(self) -> Any:
        return self._call.time_remaining()

    def result(self, timeout: float | None = None) -> Any:
        return self._response

    def exception(self, timeout: float | None = None) -> Exception | None:
        return None

    def traceback(self, timeout: float | None = None) -> types.TracebackType | None:
        return None


class RetryingStream(grpc.Call):
    """A unary-stream call retried until its first message arrives (a Call and an iterator)."""

    def __init__(self, call: LogicalCall, send: Send) -> None:
        self._logical = call
        self._send = send
        self._lock = threading.Lock()
        self._started = False
        self._cancelled = False
        self._call: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[], None]] = []

    # The retry phase ---------------------------------------------------------------------------

    def _attempt(self, step: Attempt) -> BaseException | None:
        call = self._call = self._send(step)
        if self._cancelled:
            call.cancel()
        try:
            self._logical.first = next(call)
        except StopIteration:
            self._logical.first = END_OF_STREAM
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
        first = self._logical.take_first()
        if first is END_OF_STREAM:
            raise StopIteration
        if first is not NO_MESSAGE:
            return first
        try:
            return next(self._call)
        except StopIteration:
            self._logical.stream_ended(None)
            raise
        except grpc.RpcError as error:  # committed: not retried
            self._logical.stream_ended(error)
            raise

    def next(self) -> Any:
        return self.__next__()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # garbage collection, maybe at interpreter exit
            self._logical.finish_stream(GeneratorExit())

    # grpc.Call -----------------------------------------------------------------------------------

    def initial_metadata(self) -> Any:
        return self._final().initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._final().trailing_metadata()

    def code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = self._final().code()
        return code

    def details(self) -> Any:
        return self._final().details()

    def is_active(self) -> bool:
        if not self._started:
            return not self._cancelled
        return self._call is not None and self._error is None and bool(self._call.is_active())

    def time_remaining(self) -> Any:
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


# Interceptors (for grpc.intercept_channel) -------------------------------------------------------


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    """The call details of one attempt."""


def _continuation_sender(
    continuation: Callable[[grpc.ClientCallDetails, Any], Any],
    details: grpc.ClientCallDetails,
    request: Any,
) -> Send:
    credentials = getattr(details, "credentials", None)
    compression = getattr(details, "compression", None)

    def send(step: Attempt) -> Any:
        return continuation(
            _CallDetails(
                details.method,
                step.timeout,
                step.metadata,
                credentials,
                step.wait_for_ready,
                compression,
            ),
            request,
        )

    return send


class _Interceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Retries whole unary-unary calls, and unary-stream calls until their first message."""

    def __init__(self, stack: ClientStack) -> None:
        self._stack = stack

    def _begin(self, details: grpc.ClientCallDetails, *, stream: bool) -> LogicalCall:
        return self._stack.begin_intercepted(details, details.method, stream=stream)

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        call = self._begin(client_call_details, stream=False)
        return _run_unary(call, _continuation_sender(continuation, client_call_details, request))

    def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        call = self._begin(client_call_details, stream=True)
        return RetryingStream(
            call, _continuation_sender(continuation, client_call_details, request)
        )


# The channel (resilient_channel) -------------------------------------------------------------


class _UnaryUnaryCallable(StubMethod, grpc.UnaryUnaryMultiCallable):  # type: ignore[type-arg]
    """A unary-unary method of :class:`_Channel`: the stack around the underlying callable."""

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        call, send = self._start(request, args, kwargs, stream=False)
        response: Any = None

        def attempt(step: Attempt) -> BaseException | None:
            # A plain call needs only the response: no Call object is built for it.
            nonlocal response
            try:
                response = send(step)
            except grpc.RpcError as error:
                return error
            return None

        _drive(call.steps(), attempt)  # raises the last error when the stack gives up
        return response

    def _invoke(self, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run a call for ``with_call``/``future``: return the last attempt's Call-Future."""
        call, send = self._start(request, args, kwargs, stream=False, via=self._inner.with_call)

        def attempt(step: Attempt) -> Any:
            try:
                return _Outcome(*send(step))
            except grpc.RpcError as error:
                return error  # a finished Call-Future whose exception() is itself

        return _run_unary(call, attempt)

    def with_call(self, request: Any, *args: Any, **kwargs: Any) -> tuple[Any, grpc.Call]:
        outcome = self._invoke(request, args, kwargs)
        return outcome.result(), outcome

    def future(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self._invoke(request, args, kwargs)


class _UnaryStreamCallable(StubMethod, grpc.UnaryStreamMultiCallable):  # type: ignore[type-arg]
    """A unary-stream method of :class:`_Channel`."""

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return RetryingStream(*self._start(request, args, kwargs, stream=True))


class _Channel(grpc.Channel):
    """A channel running the stack around another channel's unary-request calls."""

    def __init__(self, channel: grpc.Channel, stack: ClientStack) -> None:
        self._channel = channel
        self._stack = stack

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False
    ) -> None:
        self._channel.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._channel.unsubscribe(callback)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        inner = self._channel.unary_unary(method, *args, **kwargs)
        return _UnaryUnaryCallable(self._stack, method, inner)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        inner = self._channel.unary_stream(method, *args, **kwargs)
        return _UnaryStreamCallable(self._stack, method, inner)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_unary(method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_stream(method, *args, **kwargs)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> _Channel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# Public API ------------------------------------------------------------------------------------


def client_interceptors(
    retry: RetryPolicy | None = None,
    budget: RetryBudget | None = None,
    breaker: CircuitBreaker | None = None,
    idempotency: IdempotencyKeys | None = None,
    *,
    target: str | None = None,
    reconnect_wait: float | None = DEFAULT_RECONNECT_WAIT,
) -> list[Any]:
    """Interceptors for ``grpc.intercept_channel(channel, *client_interceptors(...))``.

    ``retry``: the :class:`RetryPolicy` (``None``: one attempt, no retries). ``budget``: a
    :class:`RetryBudget` shared by every call that should share it. ``breaker``: a
    :class:`CircuitBreaker`; ``target`` names the breaker to use (pass the channel's target:
    one breaker per target; ``None`` uses a breaker named ``"default"``). ``idempotency``: which
    calls carry an idempotency key (``None``: no keys, so only methods the policy marks
    idempotent are retried). ``reconnect_wait``: see :class:`~resilient_grpc.logical_call.ClientStack`.
    Bad arguments raise ``ValueError`` naming the argument.
    """
    stack = ClientStack(retry, budget, breaker, idempotency, target, reconnect_wait, "sync")
    return [_Interceptor(stack)]


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

    Same arguments as :func:`client_interceptors`; the breaker (if any) is the one of
    ``target``. Closing the returned channel closes the underlying one.
    """
    stack = ClientStack.for_channel(
        target, retry, budget, breaker, idempotency, reconnect_wait, "sync"
    )
    return _Channel(open_channel(grpc, target, credentials, options), stack)
