"""``grpc.aio`` client interceptors: the same stack as :mod:`resilient_grpc.client`, never blocking the loop.

Every decision is taken by the shared driver (:mod:`resilient_grpc.logical_call`); this module
runs its steps with ``await``: attempts through the continuation, pauses with ``asyncio.sleep``,
and breaker operations that do I/O (Redis storage) in a worker thread.

* unary-unary calls are retried as a whole;
* unary-stream calls are retried until the first response message arrives, then committed;
  the attempts start on the first read (or the first ``code()``/metadata access), with the key
  and deadline fixed when the stub was called;
* stream-unary and stream-stream calls are not intercepted.

Giving up raises the last ``grpc.aio.AioRpcError`` with ``attempts``/``retry_reason`` set (see
:mod:`resilient_grpc.errors`); an open breaker raises
:class:`~resilient_grpc.errors.BreakerOpenError`, itself an ``AioRpcError`` with code UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import grpc.aio

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

_method_names: dict[bytes, str] = {}


def _method_name(method: str | bytes) -> str:
    """The full method name as text (``grpc.aio`` passes it as bytes)."""
    if isinstance(method, str):
        return method
    name = _method_names.get(method)
    if name is None:
        name = _method_names[method] = method.decode("utf-8")
    return name


def _begin(stack: ClientStack, details: grpc.aio.ClientCallDetails) -> LogicalCall:
    return stack.begin(
        _method_name(details.method), details.timeout, details.metadata, details.wait_for_ready
    )


def _attempt_details(
    base: grpc.aio.ClientCallDetails, attempt: Attempt, metadata: grpc.aio.Metadata
) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        base.method, attempt.timeout, metadata, base.credentials, attempt.wait_for_ready
    )


async def _drive(
    steps: Steps, attempt: Callable[[Attempt], Awaitable[BaseException | None]]
) -> None:
    """Run a logical call's steps in this task: return after success, raise when giving up."""
    try:
        step = next(steps)
        while True:
            if step.__class__ is Attempt:
                result: Any = await attempt(step)  # type: ignore[arg-type]
            elif step.__class__ is Pause:
                await asyncio.sleep(step.seconds)  # type: ignore[union-attr]
                result = None
            else:  # breaker storage I/O (Redis): off the event loop
                result = await asyncio.to_thread(step.run)  # type: ignore[union-attr]
            step = steps.send(result)
    except StopIteration:
        return
    except BaseException:
        steps.close()  # ends the telemetry span on cancellation or a failing step
        raise


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    """Retries whole unary-unary calls."""

    def __init__(self, stack: ClientStack) -> None:
        self._stack = stack

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        call = _begin(self._stack, client_call_details)
        metadata = grpc.aio.Metadata.from_tuple(call.metadata)
        last: Any = None

        async def attempt(step: Attempt) -> BaseException | None:
            nonlocal last
            try:
                last = await continuation(
                    _attempt_details(client_call_details, step, metadata), request
                )
                await last
            except grpc.aio.AioRpcError as error:
                return error
            return None

        await _drive(call.steps(), attempt)
        return last


_END: Any = object()
_NOTHING: Any = object()


class RetryingAioStream(grpc.aio.UnaryStreamCall):  # type: ignore[misc]
    """A ``grpc.aio`` unary-stream call retried until its first message arrives."""

    def __init__(
        self,
        call: LogicalCall,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> None:
        self._logical = call
        self._continuation = continuation
        self._details = details
        self._metadata = grpc.aio.Metadata.from_tuple(call.metadata)
        self._request = request
        self._lock = asyncio.Lock()
        self._started = False
        self._cancelled = False
        self._call: Any = None
        self._messages: Any = None
        self._error: grpc.aio.AioRpcError | None = None
        self._first: Any = _NOTHING
        self._done_callbacks: list[Callable[[Any], None]] = []

    # The retry phase ---------------------------------------------------------------------------

    async def _attempt(self, step: Attempt) -> BaseException | None:
        try:
            call = await self._continuation(
                _attempt_details(self._details, step, self._metadata), self._request
            )
            self._call = call
            self._messages = call.__aiter__()
            if self._cancelled:
                call.cancel()
            self._first = await self._messages.__anext__()
        except StopAsyncIteration:
            self._first = _END
        except grpc.aio.AioRpcError as error:
            return error
        return None

    async def _start(self) -> None:
        async with self._lock:
            if self._started:
                if self._error is not None:
                    raise self._error
                return
            self._started = True
            try:
                await _drive(self._logical.steps(), self._attempt)
            except grpc.aio.AioRpcError as error:
                self._error = error
                raise
            finally:
                self._attach_done_callbacks()

    def _attach_done_callbacks(self) -> None:
        callbacks, self._done_callbacks = self._done_callbacks, []
        for callback in callbacks:
            self._add_done_callback_now(callback)

    def _add_done_callback_now(self, callback: Callable[[Any], None]) -> None:
        if self._call is None:
            callback(self)
        else:
            self._call.add_done_callback(lambda _call: callback(self))

    async def _final_call(self) -> Any:
        """The attempt the caller sees (``None`` if the breaker refused the call)."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._start()
        return self._call

    # Reading -----------------------------------------------------------------------------------

    async def read(self) -> Any:
        if not self._started or self._error is not None:
            await self._start()
        first = self._first
        if first is not _NOTHING:
            if first is _END:
                return grpc.aio.EOF
            self._first = _NOTHING
            return first
        try:
            return await self._messages.__anext__()
        except StopAsyncIteration:
            self._first = _END
            return grpc.aio.EOF

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            message = await self.read()
            if message is grpc.aio.EOF:
                return
            yield message

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    # grpc.aio.Call -----------------------------------------------------------------------------

    async def initial_metadata(self) -> Any:
        call = await self._final_call()
        return await call.initial_metadata() if call is not None else self._error.initial_metadata()  # type: ignore[union-attr]

    async def trailing_metadata(self) -> Any:
        call = await self._final_call()
        return (
            await call.trailing_metadata() if call is not None else self._error.trailing_metadata()
        )  # type: ignore[union-attr]

    async def code(self) -> grpc.StatusCode:
        call = await self._final_call()
        code: grpc.StatusCode = await call.code() if call is not None else self._error.code()  # type: ignore[union-attr]
        return code

    async def details(self) -> str:
        call = await self._final_call()
        details: str = await call.details() if call is not None else self._error.details()  # type: ignore[union-attr]
        return details

    async def debug_error_string(self) -> str:
        call = await self._final_call()
        text: str | None = (
            await call.debug_error_string()
            if call is not None
            else self._error.debug_error_string()  # type: ignore[union-attr]
        )
        return text or ""

    async def wait_for_connection(self) -> None:
        await self._start()
        await self._call.wait_for_connection()

    def cancel(self) -> bool:
        self._cancelled = True
        return bool(self._call.cancel()) if self._call is not None else True

    def cancelled(self) -> bool:
        return bool(self._call.cancelled()) if self._call is not None else self._cancelled

    def done(self) -> bool:
        if self._call is not None:
            return bool(self._call.done())
        return self._error is not None

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._started and not self._lock.locked():
            self._add_done_callback_now(callback)
        else:
            self._done_callbacks.append(callback)

    def time_remaining(self) -> float | None:
        return self._logical.state.remaining()


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    """Retries unary-stream calls until their first response message."""

    def __init__(self, stack: ClientStack) -> None:
        self._stack = stack

    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> RetryingAioStream:
        call = _begin(self._stack, client_call_details)
        return RetryingAioStream(call, continuation, client_call_details, request)


def client_interceptors(
    retry: RetryPolicy | None = None,
    budget: RetryBudget | None = None,
    breaker: CircuitBreaker | None = None,
    idempotency: IdempotencyKeys | None = None,
    *,
    target: str | None = None,
    reconnect_wait: float | None = DEFAULT_RECONNECT_WAIT,
) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for ``grpc.aio.insecure_channel(target, interceptors=...)``.

    Same arguments and meaning as :func:`resilient_grpc.client.client_interceptors`.
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
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to ``target`` with the stack attached (outermost), then ``interceptors``."""
    if not isinstance(target, str) or not target:
        raise ValueError(f"target must be a non-empty string, got {target!r}")
    stack = client_interceptors(
        retry, budget, breaker, idempotency, target=target, reconnect_wait=reconnect_wait
    )
    all_interceptors = [*stack, *interceptors]
    if credentials is not None:
        return grpc.aio.secure_channel(
            target, credentials, options=list(options), interceptors=all_interceptors
        )
    return grpc.aio.insecure_channel(target, options=list(options), interceptors=all_interceptors)
