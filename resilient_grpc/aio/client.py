"""``grpc.aio`` client stack: the same as :mod:`resilient_grpc.client`, never blocking the loop.

Two ways to attach it, with the same behaviour:

* ``client_interceptors(...)``: interceptors for ``grpc.aio.insecure_channel(interceptors=...)``
  (to compose with other interceptors);
* ``resilient_channel(...)``: a channel that runs the stack in the task that awaits the call,
  around the underlying channel's calls. gRPC's interceptor machinery runs every intercepted
  call in an extra task, and a retrying interceptor must await the outcome inside it: one more
  task hop per call. The channel avoids both (the fast path).

Every decision is taken by the shared driver (:mod:`resilient_grpc.logical_call`); this module
runs its steps with ``await``: attempts, pauses with ``asyncio.sleep``, and breaker operations
that do I/O (Redis storage) in a worker thread.

* unary-unary calls are retried as a whole. With ``resilient_channel`` the call starts when it
  is first awaited (or when its ``code()``, metadata or ``details()`` is awaited); the key and
  the deadline are fixed when the stub is called.
* unary-stream calls are retried until they commit (response headers with metadata, or the
  first message: gRFC A6); the attempts start on the first read (or ``code()``/metadata).
* ``cancel()`` stops a call at once in every state (attempt in flight, backoff, waiting for a
  reconnect, breaker I/O in a worker thread, not started yet): the awaiting task gets
  ``CancelledError``, nothing more is sent, and neither the retry budget nor the breaker is
  charged for it (what a stalled breaker round trip took is given back once it returns).
  A call started by awaiting its ``code()``/metadata runs in a task of its own that is
  cancelled when the last such awaiter is (e.g. by ``asyncio.wait_for``).
* stream-unary and stream-stream calls pass through.
* with ``hedging=``, a hedged method's unary-unary calls run as a :class:`HedgedAioCall` (one
  owned task per attempt, the first good answer wins, the others are cancelled); its
  unary-stream calls are sent once.

Giving up raises the last ``grpc.aio.AioRpcError`` with ``attempts``/``retry_reason`` set (see
:mod:`resilient_grpc.errors`); an open breaker raises
:class:`~resilient_grpc.errors.BreakerOpenError`, itself an ``AioRpcError`` with code UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from functools import partial
from typing import Any, TypeVar

import grpc
import grpc.aio

from resilient_grpc.breaker import CircuitBreaker
from resilient_grpc.core.budget import RetryBudget
from resilient_grpc.core.hedging import HedgingPolicy
from resilient_grpc.core.keys import IdempotencyKeys
from resilient_grpc.core.policy import RetryPolicy
from resilient_grpc.core.throttle import AdaptiveThrottle
from resilient_grpc.hedged_call import Actions, HedgedCall, begin_hedged
from resilient_grpc.logical_call import (
    DEFAULT_RECONNECT_WAIT,
    END_OF_STREAM,
    NO_MESSAGE,
    Attempt,
    BreakerIO,
    CallArguments,
    ClientStack,
    LogicalCall,
    Pause,
    Steps,
    StubMethod,
    WaitReady,
    open_channel,
)

__all__ = [
    "HedgedAioCall",
    "ResilientUnaryCall",
    "RetryingAioStream",
    "client_interceptors",
    "resilient_channel",
]

#: Starts one attempt and returns its ``grpc.aio`` call (or an awaitable of it).
Send = Callable[[Attempt], Any]

_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


_T = TypeVar("_T")
_log = logging.getLogger(__name__)

#: The details gRPC gives a call the application cancelled.
CANCELLED_DETAILS = "Locally cancelled by application!"


class _Interruptible:
    """What both call types share: running the steps so that ``cancel()`` stops any of them.

    The steps run in the task that awaits the call. An attempt in flight is stopped by
    cancelling its ``grpc.aio`` call; a pause, a reconnect wait or breaker I/O in a worker
    thread awaits a future that ``cancel()`` cancels. Either way the awaiting task gets
    ``CancelledError`` (without being cancelled itself), and closing the driver frees the
    breaker slot and refunds the budget: at once, or, when the call was cancelled during
    breaker I/O, from the event loop once the worker thread has run it (see :func:`_off_loop`).
    """

    _logical: LogicalCall
    _send: Send
    _send_is_async: bool
    _channel: Any
    _cancelled: bool
    _call: Any
    _waker: asyncio.Future[None] | None
    #: Set when the call was cancelled during breaker I/O: the driver is closed once it is over.
    _handed_over = False

    async def _drive(self, attempt: Callable[[Attempt], Awaitable[BaseException | None]]) -> None:
        """Run the logical call's steps in this task: return after success, raise when giving up."""
        if self._cancelled:
            raise asyncio.CancelledError
        steps = self._logical.steps()
        try:
            step: Any = next(steps)  # one of the Step classes, told apart by their exact class
            while True:
                if self._cancelled:
                    raise asyncio.CancelledError
                kind = step.__class__
                if kind is Attempt:
                    result: Any = await attempt(step)
                elif kind is Pause:
                    await self._sleep(step.seconds)
                    result = None
                elif kind is WaitReady:
                    await self._wait_ready(step.seconds)
                    result = None
                else:  # breaker storage I/O (Redis): off the event loop
                    result = await self._breaker_io(step, steps)
                step = steps.send(result)
        except StopIteration:
            return
        except BaseException:
            if not self._handed_over:
                steps.close()  # cancelled or a failing step: frees, refunds, ends the span
            raise

    async def _breaker_io(self, step: BreakerIO, steps: Steps) -> Any:
        """Run ``step`` in a worker thread; if the call is cancelled first, stop waiting at once.

        Then the driver is closed from the event loop once the thread is done (so it gives back
        what the step took, exactly once), and the call's span stops being current here now.
        """
        loop = asyncio.get_running_loop()
        waker = self._waker = loop.create_future()
        logical = self._logical

        def hand_over(work: asyncio.Future[Any]) -> None:
            self._handed_over = True
            logical.leave()
            work.add_done_callback(partial(_after_thread, steps.close))

        try:
            return await _off_loop(step.run, waker, hand_over)
        finally:
            self._waker = None

    async def _sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        waker = self._waker = loop.create_future()
        handle = loop.call_later(seconds, _wake, waker)
        try:
            await waker
        finally:
            handle.cancel()
            self._waker = None

    async def _wait_ready(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the channel to be READY (asking an idle one to connect)."""
        channel = self._channel
        if channel is None:
            return
        state = channel.get_state(try_to_connect=True)
        if state is grpc.ChannelConnectivity.READY:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        waker = self._waker = loop.create_future()
        try:
            while state is not grpc.ChannelConnectivity.READY:
                left = deadline - loop.time()
                if left <= 0:
                    return
                change = asyncio.ensure_future(channel.wait_for_state_change(state))
                try:
                    await asyncio.wait((change, waker), timeout=left, return_when="FIRST_COMPLETED")
                finally:
                    if not change.done():
                        change.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await change
                if waker.done():
                    raise asyncio.CancelledError
                state = channel.get_state(try_to_connect=True)
        finally:
            self._waker = None

    def _interrupt(self) -> None:
        """Stop what the call is doing now (see :meth:`cancel`)."""
        self._cancelled = True
        waker = self._waker
        if waker is not None and not waker.done():
            waker.cancel()
        call = self._call
        if call is not None:
            call.cancel()


async def _off_loop(
    function: Callable[[], _T],
    waker: asyncio.Future[None],
    hand_over: Callable[[asyncio.Future[Any]], None],
) -> _T:
    """Run blocking breaker I/O in a worker thread (in a copy of this context); return its result.

    A thread cannot be stopped, and a stalled store (redis-py waits forever by default) must
    not hold a cancelled caller. When the task is cancelled, or ``waker`` is (the call's
    ``cancel()``), before the thread is done, this raises ``CancelledError`` at once, after
    ``hand_over(work)``: the caller makes ``work``'s done-callback (run on the event loop once
    the operation is over) give back what it took, so the events of one call never overlap
    and nothing is given back before it was taken. No task is left behind: ``work`` is the
    executor's future.
    """
    loop = asyncio.get_running_loop()
    work = loop.run_in_executor(None, contextvars.copy_context().run, function)
    try:
        await asyncio.wait((work, waker), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        if not work.done():
            hand_over(work)
        raise
    if not work.done():  # cancel() was called
        hand_over(work)
        raise asyncio.CancelledError
    return work.result()


def _after_thread(abandon: Callable[[], object], work: asyncio.Future[Any]) -> None:
    """Done-callback of breaker I/O whose caller left: it is over, give back what it took.

    Nobody awaits ``work`` any more, so an error it raised (it took nothing then) is logged
    here rather than lost.
    """
    if not work.cancelled():
        error = work.exception()
        if error is not None:
            _log.error("resilient_grpc: breaker I/O of a cancelled call failed", exc_info=error)
    abandon()


def _wake(waker: asyncio.Future[None]) -> None:
    if not waker.done():
        waker.set_result(None)


class _FinishedCall:
    """What both call types answer once settled: the last attempt's status, or the refusal's."""

    _call: Any
    _error: BaseException | None

    async def _settled(self) -> None:
        raise NotImplementedError

    async def _final(self, name: str) -> Any:
        await self._settled()
        if self._call is not None:
            return await getattr(self._call, name)()
        error = self._error
        if isinstance(error, grpc.aio.AioRpcError):  # refused by the breaker: nothing was sent
            return getattr(error, name)()
        if name == "code":
            return grpc.StatusCode.CANCELLED
        return None

    async def initial_metadata(self) -> Any:
        return await self._final("initial_metadata")

    async def trailing_metadata(self) -> Any:
        return await self._final("trailing_metadata")

    async def code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = await self._final("code")
        return code

    async def details(self) -> str:
        return str(await self._final("details") or "")

    async def debug_error_string(self) -> str:
        return str(await self._final("debug_error_string") or "")


class ResilientUnaryCall(_Interruptible, _FinishedCall, grpc.aio.UnaryUnaryCall):  # type: ignore[type-arg]
    """A unary-unary call of :func:`resilient_channel`: its attempts run in the awaiting task."""

    def __init__(
        self, call: LogicalCall, send: Send, send_is_async: bool = True, channel: Any = None
    ) -> None:
        self._logical = call
        self._send = send
        self._send_is_async = send_is_async
        self._channel = channel
        self._started = False
        self._finished = False
        self._cancelled = False
        self._call: Any = None
        self._waker = None
        self._response: Any = None
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Future[None] | None = None
        self._status_readers = 0
        self._callbacks: list[Callable[[Any], None]] = []

    @property
    def last_call(self) -> Any:
        """The ``grpc.aio`` call of the last attempt (``None`` if nothing was sent)."""
        return self._call

    async def _attempt(self, step: Attempt) -> BaseException | None:
        call = self._send(step)
        if self._send_is_async:
            call = await call
        self._call = call  # the call cancel() reaches
        if self._cancelled:  # cancelled while the interceptor chain started it
            call.cancel()
        try:
            self._response = await call
        except grpc.aio.AioRpcError as error:
            return error
        except asyncio.CancelledError:
            call.cancel()  # the caller's task was cancelled: cancel the RPC too
            raise
        return None

    async def _run(self) -> Any:
        self._started = True
        try:
            await self._drive(self._attempt)
        except BaseException as error:
            self._error = error
            raise
        finally:
            self._end()
        return self._response

    def _end(self) -> None:
        self._finished = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def _abandon_unstarted(self) -> None:
        """Cancelled before anything awaited it: nothing was sent, nothing is charged."""

    async def _run_quietly(self) -> None:
        with contextlib.suppress(BaseException):  # the outcome is kept on self
            await self._run()

    async def _settled(self) -> None:
        """Wait for the outcome, starting the call in a task if nobody has awaited it yet.

        That task serves the status readers: when the last of them is cancelled (say by
        ``asyncio.wait_for``), nobody waits for the call any more and it is cancelled too.
        """
        if not self._started:
            self._started = True
            self._task = asyncio.ensure_future(self._run_quietly())
        if self._finished:
            return
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        self._status_readers += 1
        try:
            await asyncio.shield(self._waiter)
        except asyncio.CancelledError:
            task = self._task
            if self._status_readers == 1 and task is not None and not self._finished:
                self._interrupt()
                with contextlib.suppress(asyncio.CancelledError):
                    await task  # owned: it ends at once now
            raise
        finally:
            self._status_readers -= 1

    def __await__(self) -> Generator[Any, None, Any]:
        if not self._started:
            return (yield from self._run().__await__())
        yield from self._settled().__await__()
        if self._error is not None:
            raise self._error
        return self._response

    async def _final(self, name: str) -> Any:
        await self._settled()
        if isinstance(self._error, asyncio.CancelledError):
            if name == "code":
                return grpc.StatusCode.CANCELLED
            return CANCELLED_DETAILS if name == "details" else None
        return await super()._final(name)

    async def wait_for_connection(self) -> None:
        await self._settled()

    def cancel(self) -> bool:
        """Cancel the call now, whatever it is doing; ``False`` if it has already ended.

        A call nothing has awaited yet ends here (done, its callbacks run), as a ``grpc.aio``
        call does when cancelled: nothing was sent.
        """
        if self._finished:
            return False
        if not self._started:
            self._started = True
            self._cancelled = True
            self._error = asyncio.CancelledError()
            self._abandon_unstarted()
            self._end()
            return True
        self._interrupt()
        return True

    def cancelled(self) -> bool:
        return self._cancelled or isinstance(self._error, asyncio.CancelledError)

    def done(self) -> bool:
        return self._finished

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._finished:
            callback(self)
        else:
            self._callbacks.append(callback)

    def time_remaining(self) -> float | None:
        return self._logical.state.remaining()


class HedgedAioCall(ResilientUnaryCall):
    """A hedged unary-unary call (see :class:`~resilient_grpc.core.hedging.HedgingPolicy`).

    Each attempt runs in a task of its own, owned by the task that awaits the call: it waits
    for the first attempt to answer or for the next hedge to be due, hands the event to the
    shared driver (:class:`~resilient_grpc.hedged_call.HedgedCall`; in a worker thread when the
    breaker's storage does I/O) and applies what it says. Losing attempts are cancelled (the
    server sees it) and awaited; ``cancel()`` cancels every attempt in flight.
    """

    def __init__(
        self, call: HedgedCall, send: Send, send_is_async: bool = True, channel: Any = None
    ) -> None:
        super().__init__(call, send, send_is_async, channel)  # type: ignore[arg-type]
        self._hedged = call

    def _abandon_unstarted(self) -> None:
        self._hedged.abandon()  # ends its span; nothing was sent or taken

    async def _event(
        self,
        hand_over: Callable[[asyncio.Future[Any]], None],
        waker: asyncio.Future[None],
        handler: Callable[..., Actions],
        *args: Any,
    ) -> Actions:
        """Run one event of the driver (off the loop if it does breaker I/O: :func:`_off_loop`)."""
        if self._hedged.blocking:
            return await _off_loop(partial(handler, *args), waker, hand_over)
        return handler(*args)

    async def _one(self, step: Attempt, calls: dict[int, Any], sent: set[int]) -> Any:
        """Make one attempt: return ``(response, None)`` or ``(None, error)``."""
        sent.add(step.number)
        call = self._send(step)
        if self._send_is_async:
            call = await call
        calls[step.number] = call
        try:
            return await call, None
        except grpc.aio.AioRpcError as error:
            return None, error
        except asyncio.CancelledError:
            call.cancel()  # a loser, or the caller gave up: the server sees the cancellation
            raise

    async def _drive(self, attempt: Callable[[Attempt], Awaitable[BaseException | None]]) -> None:
        """Run the hedged call in this task (``attempt`` is not used: attempts are tasks)."""
        hedged = self._hedged
        if self._cancelled:
            hedged.abandon()
            raise asyncio.CancelledError
        waker = self._waker = asyncio.get_running_loop().create_future()
        tasks: dict[int, asyncio.Task[Any]] = {}
        calls: dict[int, Any] = {}
        sent: set[int] = set()  # the attempts whose send began (a task may never start)
        over = False

        def hand_over(work: asyncio.Future[Any]) -> None:
            # cancelled while an event runs in a worker thread: the call is abandoned (what
            # the event took given back, a copy it granted refunded) once the event is over
            nonlocal over
            over = True
            work.add_done_callback(partial(_after_thread, partial(hedged.abandon, sent)))

        event = partial(self._event, hand_over, waker)
        try:
            actions = await event(hedged.start)
            while True:
                if waker.done():  # cancelled while the event ran (in a worker thread)
                    raise asyncio.CancelledError
                for number in actions.cancel:
                    tasks.pop(number).cancel()
                if actions.done:
                    over = True
                    if actions.winner is not None:
                        self._call = calls.get(actions.winner)
                    if actions.error is not None:
                        raise actions.error
                    return
                with hedged.telemetry.use():
                    for step in actions.send:
                        tasks[step.number] = asyncio.ensure_future(self._one(step, calls, sent))
                wake = hedged.wake_at()
                timeout = None if wake is None else max(wake - time.monotonic(), 0.0)
                done, _ = await asyncio.wait(
                    (*tasks.values(), waker), timeout=timeout, return_when="FIRST_COMPLETED"
                )
                if waker.done():
                    raise asyncio.CancelledError
                finished = [n for n, task in tasks.items() if task in done]
                if not finished:
                    actions = await event(hedged.on_timer)
                    continue
                number = min(finished)
                response, error = tasks.pop(number).result()
                if error is None:
                    self._response = response
                actions = await event(hedged.on_done, number, error)
        except BaseException:
            if not over:
                hedged.abandon(sent)  # refunds a copy granted but never sent (else handed over)
            raise
        finally:
            self._waker = None
            for task in tasks.values():
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks.values(), return_exceptions=True)


class RetryingAioStream(_Interruptible, _FinishedCall, grpc.aio.UnaryStreamCall):  # type: ignore[type-arg]
    """A ``grpc.aio`` unary-stream call retried until it commits.

    It commits when response headers carrying metadata arrive, or its first message (gRFC A6;
    grpcio reports empty headers exactly like the empty headers of a trailers-only error).
    """

    def __init__(
        self, call: LogicalCall, send: Send, send_is_async: bool = True, channel: Any = None
    ) -> None:
        self._logical = call
        self._send = send
        self._send_is_async = send_is_async
        self._channel = channel
        self._lock = asyncio.Lock()
        self._started = False
        self._cancelled = False
        self._waker = None
        self._call: Any = None
        self._messages: Any = None
        self._error: BaseException | None = None
        self._done_callbacks: list[Callable[[Any], None]] = []

    # The retry phase ---------------------------------------------------------------------------

    async def _attempt(self, step: Attempt) -> BaseException | None:
        try:
            call = self._send(step)
            if self._send_is_async:
                call = await call
            self._call = call  # the call cancel() reaches
            if self._cancelled:
                call.cancel()
            self._messages = call.__aiter__()
            if not await call.initial_metadata():  # headers with metadata commit at once
                self._logical.first = await self._messages.__anext__()
        except StopAsyncIteration:
            self._logical.first = END_OF_STREAM
        except grpc.aio.AioRpcError as error:
            return error
        except asyncio.CancelledError:
            if self._call is not None:
                self._call.cancel()
            raise
        return None

    async def _start(self) -> None:
        async with self._lock:
            if self._started:
                if self._error is not None:
                    raise self._error
                return
            self._started = True
            try:
                await self._drive(self._attempt)
            except (grpc.aio.AioRpcError, asyncio.CancelledError) as error:
                self._error = error
                raise
            finally:
                callbacks, self._done_callbacks = self._done_callbacks, []
                for callback in callbacks:
                    self._add_done_callback_now(callback)

    async def _settled(self) -> None:
        try:
            await self._start()
        except grpc.aio.AioRpcError:
            pass
        except asyncio.CancelledError as error:
            if error is not self._error:  # this task is being cancelled, not the call
                raise

    async def _final(self, name: str) -> Any:
        await self._settled()
        if isinstance(self._error, asyncio.CancelledError):
            if name == "code":
                return grpc.StatusCode.CANCELLED
            return CANCELLED_DETAILS if name == "details" else None
        return await super()._final(name)

    def _add_done_callback_now(self, callback: Callable[[Any], None]) -> None:
        if self._call is None or self._error is not None:
            callback(self)
        else:
            self._call.add_done_callback(lambda _call: callback(self))

    # Reading -----------------------------------------------------------------------------------

    async def read(self) -> Any:
        if not self._started or self._error is not None:
            await self._start()
        first = self._logical.take_first()
        if first is END_OF_STREAM:
            return _EOF
        if first is not NO_MESSAGE:
            return first
        try:
            return await self._messages.__anext__()
        except StopAsyncIteration:
            self._logical.stream_ended(None)
            return _EOF
        except grpc.aio.AioRpcError as error:  # committed: not retried
            self._logical.stream_ended(error)
            raise

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            message = await self.read()
            if message is _EOF:
                return
            yield message

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # garbage collection, maybe at interpreter exit
            self._logical.finish_stream(GeneratorExit())

    # grpc.aio.Call -----------------------------------------------------------------------------

    async def wait_for_connection(self) -> None:
        await self._start()
        await self._call.wait_for_connection()

    def cancel(self) -> bool:
        """Cancel the call now, whatever it is doing; ``False`` if it has already ended.

        A stream nothing has read yet ends here (done, its callbacks run): nothing was sent.
        """
        if self.done():
            return False
        if not self._started:
            self._started = True
            self._cancelled = True
            self._error = asyncio.CancelledError()
            callbacks, self._done_callbacks = self._done_callbacks, []
            for callback in callbacks:
                callback(self)
            return True
        self._interrupt()
        return True

    def cancelled(self) -> bool:
        return self._cancelled or isinstance(self._error, asyncio.CancelledError)

    def done(self) -> bool:
        if self._error is not None:
            return True
        if not self._started or self._lock.locked():  # not started, or still retrying
            return False
        return self._call is not None and bool(self._call.done())

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._started and not self._lock.locked():
            self._add_done_callback_now(callback)
        else:
            self._done_callbacks.append(callback)

    def time_remaining(self) -> float | None:
        return self._logical.state.remaining()


# Interceptors (for grpc.aio channels) ----------------------------------------------------------

_method_names: dict[bytes, str] = {}


def _method_name(method: str | bytes) -> str:
    """The full method name as text (``grpc.aio`` passes it to interceptors as bytes)."""
    if isinstance(method, str):
        return method
    name = _method_names.get(method)
    if name is None:
        name = _method_names[method] = method.decode("utf-8")
    return name


class _Interceptor:
    """What both aio interceptors share: the stack, and how they start a logical call."""

    def __init__(self, stack: ClientStack) -> None:
        self._stack = stack

    def _start(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        details: grpc.aio.ClientCallDetails,
        request: Any,
        *,
        stream: bool,
    ) -> tuple[LogicalCall, Send]:
        call = self._stack.begin_intercepted(details, _method_name(details.method), stream=stream)
        return call, self._sender(continuation, details, request, call.metadata)

    @staticmethod
    def _sender(
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        details: grpc.aio.ClientCallDetails,
        request: Any,
        call_metadata: Sequence[tuple[str, Any]],
    ) -> Send:
        """How one attempt is sent through the rest of the interceptor chain."""
        metadata = grpc.aio.Metadata(*call_metadata)

        def send(step: Attempt) -> Awaitable[Any]:
            # a retry's metadata also says how many attempts came before
            sent = metadata if step.number == 1 else grpc.aio.Metadata(*step.metadata)
            return continuation(
                grpc.aio.ClientCallDetails(
                    details.method, step.timeout, sent, details.credentials, step.wait_for_ready
                ),
                request,
            )

        return send


class _UnaryUnaryInterceptor(_Interceptor, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Retries whole unary-unary calls."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        stack = self._stack
        method = _method_name(client_call_details.method)
        unary: ResilientUnaryCall
        if stack.hedging is not None and stack.hedges(method):
            details: Any = client_call_details  # its metadata is a grpc.aio.Metadata
            hedged = begin_hedged(
                stack, method, details.timeout, details.metadata, details.wait_for_ready
            )
            unary = HedgedAioCall(
                hedged, self._sender(continuation, details, request, hedged.metadata)
            )
        else:
            unary = ResilientUnaryCall(
                *self._start(continuation, client_call_details, request, stream=False)
            )
        await unary
        return unary.last_call


class _UnaryStreamInterceptor(_Interceptor, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    """Retries unary-stream calls until their first response message."""

    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> RetryingAioStream:
        return RetryingAioStream(
            *self._start(continuation, client_call_details, request, stream=True)
        )


# The channel (resilient_channel) -------------------------------------------------------------


class _UnaryUnaryCallable(StubMethod, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[type-arg]
    """A unary-unary method of :class:`_Channel`: the call runs in the task that awaits it."""

    def __init__(self, stack: ClientStack, method: str, inner: Any, channel: Any = None) -> None:
        super().__init__(stack, method, inner, channel)
        self._hedging = stack.hedges(method)

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> ResilientUnaryCall:
        # the underlying call starts as soon as it is made: nothing to await in send
        if self._hedging:
            arguments = CallArguments(request, *args, **kwargs)
            hedged = begin_hedged(
                self._stack,
                self._method,
                arguments.timeout,
                arguments.metadata,
                arguments.wait_for_ready,
            )
            return HedgedAioCall(hedged, partial(arguments.send, self._inner), False, self._channel)
        return ResilientUnaryCall(
            *self._start(request, args, kwargs, stream=False), False, self._channel
        )


class _UnaryStreamCallable(StubMethod, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[type-arg]
    """A unary-stream method of :class:`_Channel`."""

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> RetryingAioStream:
        return RetryingAioStream(
            *self._start(request, args, kwargs, stream=True), False, self._channel
        )


class _Channel(grpc.aio.Channel):
    """A ``grpc.aio`` channel running the stack around another channel's unary-request calls."""

    def __init__(self, channel: grpc.aio.Channel, stack: ClientStack) -> None:
        self._channel = channel
        self._stack = stack

    async def __aenter__(self) -> _Channel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._channel.close(None)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        inner = self._channel.unary_unary(method, *args, **kwargs)
        return _UnaryUnaryCallable(self._stack, _method_name(method), inner, self._channel)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        inner = self._channel.unary_stream(method, *args, **kwargs)
        return _UnaryStreamCallable(self._stack, _method_name(method), inner, self._channel)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_unary(method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_stream(method, *args, **kwargs)


# Public API ------------------------------------------------------------------------------------


def client_interceptors(
    retry: RetryPolicy | None = None,
    budget: RetryBudget | None = None,
    breaker: CircuitBreaker | None = None,
    idempotency: IdempotencyKeys | None = None,
    *,
    target: str | None = None,
    reconnect_wait: float | None = DEFAULT_RECONNECT_WAIT,
    throttle: AdaptiveThrottle | None = None,
    hedging: HedgingPolicy | None = None,
    hedging_budget: RetryBudget | None = None,
) -> list[Any]:
    """Interceptors for ``grpc.aio.insecure_channel(target, interceptors=...)``.

    Same arguments and meaning as :func:`resilient_grpc.client.client_interceptors`.
    """
    stack = ClientStack(
        retry,
        budget,
        breaker,
        idempotency,
        target,
        reconnect_wait,
        "aio",
        throttle=throttle,
        hedging=hedging,
        hedging_budget=hedging_budget,
    )
    return [_UnaryUnaryInterceptor(stack), _UnaryStreamInterceptor(stack)]


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
    throttle: AdaptiveThrottle | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    hedging: HedgingPolicy | None = None,
    hedging_budget: RetryBudget | None = None,
) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to ``target`` with the stack attached (outside ``interceptors``).

    Same arguments as :func:`resilient_grpc.client.resilient_channel`; ``interceptors`` go on
    the underlying channel, so they see every attempt.
    """
    stack = ClientStack.for_channel(
        target,
        retry,
        budget,
        breaker,
        idempotency,
        reconnect_wait,
        "aio",
        throttle=throttle,
        hedging=hedging,
        hedging_budget=hedging_budget,
    )
    channel = open_channel(
        grpc.aio, target, credentials, options, interceptors=list(interceptors) or None
    )
    return _Channel(channel, stack)
