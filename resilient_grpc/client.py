"""Sync client stack: retries with backoff, budget, circuit breaker and idempotency keys.

Two ways to attach it, with the same behaviour:

* ``client_interceptors(...)``: interceptors for ``grpc.intercept_channel`` (to compose with
  other interceptors);
* ``resilient_channel(...)``: a channel that runs the stack directly around the underlying
  channel's calls, skipping the per-call work of ``grpc.intercept_channel`` (the fast path).

Every decision is taken by the shared driver (:mod:`resilient_grpc.logical_call`); this module
only runs its steps with blocking calls (the RPC, ``time.sleep``).

* unary-unary calls are retried as a whole. ``stub.Method.future(...)`` returns at once a
  :class:`RetryingFuture` (a ``grpc.Future`` and ``grpc.Call``): its attempts are driven by
  gRPC's completion callbacks and its backoff pauses by one shared timer thread, so no thread
  is held per call and ``cancel()`` stops it in any state.
* unary-stream calls are retried until the call commits: its response headers arrive (gRFC A6);
  after that an error reaches the caller as is. The attempts start on the first ``next()`` (or
  the first ``code()``/metadata access), with the key and deadline fixed when the stub was
  called; ``cancel()`` from another thread also stops a backoff pause.
* stream-unary and stream-stream calls pass through (a request iterator cannot be replayed).
* with ``hedging=`` (:class:`~resilient_grpc.core.hedging.HedgingPolicy`), a hedged method's
  unary-unary calls run as a :class:`HedgedFuture` (several attempts in flight, the first good
  answer wins, the others are cancelled); its unary-stream calls are sent once.

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
import concurrent.futures
import contextlib
import heapq
import itertools
import logging
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, cast

import grpc

from resilient_grpc.breaker import CircuitBreaker
from resilient_grpc.core.budget import RetryBudget
from resilient_grpc.core.hedging import HedgingPolicy
from resilient_grpc.core.keys import IdempotencyKeys
from resilient_grpc.core.policy import RetryPolicy
from resilient_grpc.core.throttle import AdaptiveThrottle
from resilient_grpc.finished_call import FinishedCallFuture
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
    "HedgedFuture",
    "RetryingFuture",
    "RetryingStream",
    "client_interceptors",
    "resilient_channel",
]

_log = logging.getLogger(__name__)

#: Sends one attempt: returns what the transport returned for it.
Send = Callable[[Attempt], Any]

#: The details gRPC gives a call the application cancelled.
CANCELLED_DETAILS = "Locally cancelled by application!"


class LocallyCancelled(grpc.RpcError, FinishedCallFuture):
    """The status of a call cancelled by the application between attempts (code CANCELLED)."""

    def initial_metadata(self) -> Any:
        return None

    def trailing_metadata(self) -> Any:
        return None

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return CANCELLED_DETAILS

    def time_remaining(self) -> float:
        return 0.0

    def cancelled(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:
        raise grpc.FutureCancelledError

    def exception(self, timeout: float | None = None) -> Exception | None:
        raise grpc.FutureCancelledError

    def traceback(self, timeout: float | None = None) -> types.TracebackType | None:
        raise grpc.FutureCancelledError


#: How often a reconnect wait looks at the channel's state (seconds).
READY_POLL_INTERVAL = 0.02

_READY_STATE = grpc.ChannelConnectivity.READY.value[0]


def _is_ready(channel: grpc.Channel) -> bool:
    """Whether ``channel`` is READY (an idle channel is asked to connect).

    Reads the state without ``channel.subscribe``: a subscription starts a gRPC polling thread
    that outlives it and fails noisily if the channel is closed soon after. ``True`` when the
    channel cannot tell (not a grpcio channel, or closed): the attempt then says what is wrong.
    """
    check = getattr(getattr(channel, "_channel", None), "check_connectivity_state", None)
    if check is None:
        return True
    try:
        return bool(check(True) == _READY_STATE)
    except ValueError:  # closed
        return True


def _wait_ready(
    channel: grpc.Channel, seconds: float, sleep: Callable[[float], Any] = time.sleep
) -> None:
    """Return once ``channel`` is READY or ``seconds`` have passed (``sleep`` may raise)."""
    deadline = time.monotonic() + seconds
    while not _is_ready(channel):
        left = deadline - time.monotonic()
        if left <= 0:
            return
        sleep(min(READY_POLL_INTERVAL, left))


def _drive(
    steps: Steps,
    attempt: Callable[[Attempt], BaseException | None],
    wait_ready: Callable[[float], None] | None = None,
    pause: Callable[[float], None] = time.sleep,
) -> None:
    """Run a logical call's steps in this thread: return after success, raise when giving up."""
    try:
        step: Any = next(steps)  # one of the Step classes, told apart by their exact class
        while True:
            kind = step.__class__
            if kind is Attempt:
                result: Any = attempt(step)
            elif kind is Pause:
                pause(step.seconds)
                result = None
            elif kind is WaitReady:
                if wait_ready is not None:
                    wait_ready(step.seconds)
                result = None
            else:
                result = step.run()
            step = steps.send(result)
    except StopIteration:
        return
    except BaseException:
        steps.close()  # ends the telemetry span if a step itself blew up
        raise


def _run_unary(
    call: LogicalCall, send: Send, wait_ready: Callable[[float], None] | None = None
) -> Any:
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
        _drive(call.steps(), attempt, wait_ready)
    except grpc.RpcError as error:
        if isinstance(error, grpc.Future):
            return error  # a finished Call-Future: result() raises it, exception() returns it
        raise
    return outcome


class _SucceededCall(FinishedCallFuture):
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


# Futures -----------------------------------------------------------------------------------------


class _Timer:
    """A callback :class:`_Timers` runs later, unless cancelled first.

    Cancelling drops the callback at once (with it the future its closure holds: a cancelled
    future waiting out a long backoff is not kept alive by the timer heap until its time).
    """

    __slots__ = ("_timers", "blocking", "callback", "cancelled")

    def __init__(self, callback: Callable[[], None], blocking: bool) -> None:
        self.callback = callback
        self.blocking = blocking
        self.cancelled = False
        #: The timers whose heap holds this one (``None`` once it is out of the heap).
        self._timers: _Timers | None = None

    @staticmethod
    def _nothing() -> None:
        """The callback of a cancelled timer (for a thread that read it just before)."""

    def cancel(self) -> None:
        self.cancelled = True
        self.callback = _Timer._nothing
        timers = self._timers
        if timers is not None:
            timers._forget(self)


class _Timers:
    """One daemon thread that runs the delayed steps (backoff pauses) of every sync future.

    A pause holds no thread: thousands of futures backing off at once cost one heap entry
    each. Callbacks run on this thread must not block (they start the next attempt, which only
    enqueues it). A ``blocking`` callback (a call whose breaker keeps its state in Redis does a
    round trip in it) runs on a worker of a pool instead: a stalled store must not hold up
    every other future's retries and hedges past their deadlines. Cancelled timers leave the
    heap when they are due, or all at once when they are most of it.
    """

    #: Fewer cancelled entries than this are never swept (popping them when due is cheaper).
    _SWEEP_AT = 64

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, _Timer]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._workers: concurrent.futures.ThreadPoolExecutor | None = None
        #: Cancelled timers still in the heap.
        self._stale = 0

    def call_later(
        self, seconds: float, callback: Callable[[], None], *, blocking: bool = False
    ) -> _Timer:
        timer = _Timer(callback, blocking)
        with self._condition:
            timer._timers = self
            heapq.heappush(self._heap, (time.monotonic() + seconds, next(self._order), timer))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="resilient-grpc-timers", daemon=True
                )
                self._thread.start()
            self._condition.notify()
        return timer

    def _forget(self, timer: _Timer) -> None:
        """``timer`` was cancelled: count it, and sweep the heap when most of it is cancelled."""
        with self._condition:
            if timer._timers is None:
                return  # out of the heap already (running, or counted)
            timer._timers = None
            self._stale += 1
            heap = self._heap
            if self._stale >= self._SWEEP_AT and self._stale * 2 > len(heap):
                # Drop the counted ones (one whose cancel() is on its way here is counted later).
                heap[:] = [entry for entry in heap if entry[2]._timers is not None]
                heapq.heapify(heap)
                self._stale = 0

    def _run(self) -> None:
        while True:
            with self._condition:
                while True:
                    if not self._heap:
                        self._condition.wait()
                        continue
                    wait = self._heap[0][0] - time.monotonic()
                    if wait > 0:
                        self._condition.wait(wait)
                        continue
                    timer = heapq.heappop(self._heap)[2]
                    if timer._timers is None:
                        self._stale -= 1  # cancelled, and counted by _forget
                    timer._timers = None
                    break
            if timer.cancelled:
                continue
            if timer.blocking:
                self._pool().submit(self._fire, timer)
            else:
                self._fire(timer)

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._condition:
            if self._workers is None:
                self._workers = concurrent.futures.ThreadPoolExecutor(
                    thread_name_prefix="resilient-grpc-blocking-steps"
                )
            return self._workers

    @staticmethod
    def _fire(timer: _Timer) -> None:
        if timer.cancelled:
            return
        try:
            timer.callback()
        except Exception:  # never lose a timer thread to one bad callback
            _log.exception("resilient_grpc: a delayed call step failed")


_TIMERS = _Timers()


class RetryingFuture(grpc.Call, grpc.Future):  # type: ignore[type-arg]
    """A unary-unary call started with ``.future()``: a ``grpc.Future`` and ``grpc.Call``.

    It returns at once; each attempt is an underlying ``.future()`` whose completion callback
    (run by gRPC) takes the next step, and backoff pauses run on a shared timer thread, so the
    retries block nobody and hold no thread. ``result``/``exception``/``traceback`` and the
    ``grpc.Call`` methods (``code``, ``details``, metadata) block until the call is over, like
    gRPC's own futures, and honour their ``timeout``. ``cancel()`` stops it in every state
    (attempt in flight, backoff, waiting for a reconnect): nothing more is sent and neither the
    retry budget nor the breaker is charged for it.

    Like :class:`HedgedFuture`, the events that move the call on (its start, an attempt's
    answer, a timer) are handled one at a time, outside the lock, by whichever thread posts one
    while none is being handled: the caller's for the first attempt, gRPC's callback thread,
    the timer thread or, with a Redis-backed breaker, a worker of a small pool (so a stalled
    store holds up no other future). The breaker's round trips and the sends run there too,
    never under the lock, so a stalled store delays neither ``result(timeout)`` nor
    ``cancel()``: the future is cancelled and done when ``cancel()`` returns, and the thread
    taking a step stops the call after it (cancels an attempt it sent meanwhile, closes the
    driver, which gives back what it took).
    """

    def __init__(
        self,
        call: LogicalCall,
        send: Send,
        channel: grpc.Channel | None = None,
        *,
        steps: Steps | None = None,
    ) -> None:
        self._logical = call
        self._send = send
        self._channel = channel
        self._steps = call.steps() if steps is None else steps
        breaker = call.stack.target_breaker
        #: Its steps do breaker storage I/O: its delayed steps run off the shared timer thread.
        self._blocking = breaker is not None and breaker.blocking
        self._lock = threading.RLock()  # held only to read or change the state below, briefly
        self._finished = threading.Condition(self._lock)
        #: What the call is waiting for now: an attempt's future or a timer (backoff, reconnect).
        self._waiting: Any = None
        #: Events not handled yet; ``_pumping`` while a thread handles them (and so owns the
        #: driver: no two threads are ever in its generator at once).
        self._events: collections.deque[tuple[int, Any]] = collections.deque()
        self._pumping = False
        self._last: Any = None  # the last attempt's Call-Future
        self._error: BaseException | None = None
        self._done = False
        self._cancelled = False
        self._callbacks: list[Callable[[Any], None]] = []
        self._pending: list[Callable[[Any], None]] = []

    # Driving --------------------------------------------------------------------------------

    def _start(self, in_flight: Any = None) -> RetryingFuture:
        """Take the first step (or wait for ``in_flight``, an attempt already sent)."""
        self._post(_START, in_flight)
        return self

    def _post(self, kind: int, value: Any) -> None:
        """Queue one event; handle the queue unless another thread is handling it.

        An attempt's answer or a timer arriving once the future is over (say, the answer of
        the attempt ``cancel()`` just cancelled) can change nothing and is dropped here, not
        queued: the thread bringing it must not take the queue from ``cancel()``, whose
        ``_CANCEL`` would then close the driver, and give back what it holds (the breaker's
        probe slot), only after ``cancel()`` returned.
        """
        with self._lock:
            if self._done and kind in (_DONE, _TIMER, _POLL):
                return
            self._events.append((kind, value))
            if self._pumping:
                return
            self._pumping = True
        self._pump()

    def _pump(self) -> None:
        """Handle the queued events in this thread, the lock released while each one runs."""
        while True:
            with self._lock:
                if not self._events:
                    self._pumping = False
                    break
                kind, value = self._events.popleft()
                if kind in (_DONE, _TIMER, _POLL):
                    waiting = self._waiting
                    if self._done or (
                        waiting is not value if kind == _DONE else waiting.__class__ is not _Timer
                    ):
                        continue  # cancelled meanwhile
                    self._waiting = None
            if kind == _START:
                if value is None:
                    self._advance(None, first=True)
                else:
                    self._await_attempt(value)
            elif kind == _DONE:
                if value.cancelled():
                    self._abandon()
                else:
                    self._advance(value.exception())
            elif kind == _TIMER:
                self._advance(None)
            elif kind == _POLL:
                self._poll(value)
            else:  # _CANCEL: cancel() has finished the future; close the driver
                self._steps.close()
        self._run_callbacks()

    def _advance(self, value: Any, *, first: bool = False) -> None:
        """Run steps until one has to wait; finish the call if it ended.

        Runs in the pumping thread, without the lock. A call cancelled while a step ran (a
        send, a breaker round trip) is stopped right after it, as the aio shell does: what the
        step returned is not fed to the driver, and the ``_CANCEL`` event that ``cancel()``
        queued closes the driver at that step (it gives back an admission the step took and
        refunds a retry not sent).
        """
        steps = self._steps
        try:
            step = next(steps) if first else steps.send(value)
            while not self._cancelled:
                kind = step.__class__
                if kind is Attempt:
                    outcome = self._send(cast(Attempt, step))
                    if not outcome.done():
                        self._await_attempt(outcome)
                        return
                    self._last = outcome
                    value = outcome.exception()
                elif kind is Pause:
                    self._arm(cast(Pause, step).seconds, _TIMER, None)
                    return
                elif kind is WaitReady:
                    seconds = cast(WaitReady, step).seconds
                    if self._channel is not None and not _is_ready(self._channel):
                        deadline = time.monotonic() + seconds
                        self._arm(min(READY_POLL_INTERVAL, seconds), _POLL, deadline)
                        return
                    value = None
                else:
                    value = cast(BreakerIO, step).run()
                if self._cancelled:
                    return
                step = steps.send(value)
        except StopIteration:
            with self._lock:
                self._finish(None)
        except BaseException as error:  # the error the stack gave up with, or a failing step
            steps.close()  # a no-op if the driver raised it; else ends its span
            with self._lock:
                self._finish(error)

    def _await_attempt(self, outcome: Any) -> None:
        """Wait for an attempt in flight; cancel it instead if the call was cancelled."""
        with self._lock:
            self._last = outcome
            cancelled = self._cancelled
            if not cancelled:
                self._waiting = outcome
        if cancelled:
            outcome.cancel()  # sent while cancel() ran: the server sees it cancelled
            return
        outcome.add_done_callback(partial(self._post, _DONE))  # maybe inline: then queued

    def _arm(self, seconds: float, kind: int, value: Any) -> None:
        """Post ``(kind, value)`` in ``seconds`` (unless the call is cancelled first)."""
        with self._lock:
            if not self._cancelled:
                self._waiting = _TIMERS.call_later(
                    seconds, partial(self._post, kind, value), blocking=self._blocking
                )

    def _poll(self, deadline: float) -> None:
        """Waiting for a reconnect: poll again, or send the attempt if READY or out of time."""
        left = deadline - time.monotonic()
        if left > 0 and not _is_ready(cast(grpc.Channel, self._channel)):
            self._arm(min(READY_POLL_INTERVAL, left), _POLL, deadline)
        else:
            self._advance(None)

    def _abandon(self) -> None:
        """The attempt was cancelled under us: close the driver (it refunds what it held)."""
        with self._lock:
            self._cancelled = True
        self._steps.close()
        with self._lock:
            self._finish(None)

    def _finish(self, error: BaseException | None) -> None:
        """End the future (holding the lock); the first end wins."""
        if self._done:
            return
        self._error = error
        self._done = True
        self._waiting = None
        self._pending, self._callbacks = self._callbacks, []
        self._finished.notify_all()

    def _run_callbacks(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for callback in pending:
            try:
                callback(self)
            except Exception:  # as grpc does: a failing callback is logged, not raised
                _log.exception("resilient_grpc: a done callback of a future failed")

    # grpc.Future ----------------------------------------------------------------------------

    def cancel(self) -> bool:
        """Stop the call now, whatever it is doing; ``False`` if it has already ended.

        The future is cancelled and done when this returns, even if another thread is taking
        a step (a breaker round trip, a send): that thread stops the call after it.
        """
        with self._lock:
            if self._done:
                return False
            self._cancelled = True
            waiting = self._waiting
            self._finish(None)
        if waiting is not None:
            waiting.cancel()  # an attempt (the server sees it cancelled) or a timer
        self._post(_CANCEL, None)
        self._run_callbacks()
        return True

    def cancelled(self) -> bool:
        return self._done and self._cancelled

    def running(self) -> bool:
        return not self._done

    def done(self) -> bool:
        return self._done

    def _wait(self, timeout: float | None) -> None:
        with self._lock:
            if not self._finished.wait_for(lambda: self._done, timeout):
                raise grpc.FutureTimeoutError
            if self._cancelled:
                raise grpc.FutureCancelledError

    def result(self, timeout: float | None = None) -> Any:
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._last.result()

    def exception(self, timeout: float | None = None) -> Exception | None:
        self._wait(timeout)
        return cast(Exception | None, self._error)

    def traceback(self, timeout: float | None = None) -> types.TracebackType | None:
        self._wait(timeout)
        return None if self._error is None else self._error.__traceback__

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        with self._lock:
            if not self._done:
                self._callbacks.append(fn)
                return
        fn(self)

    # grpc.Call ------------------------------------------------------------------------------

    def _status(self) -> Any:
        """The finished call whose status the caller sees (blocks until the call is over)."""
        with self._lock:
            self._finished.wait_for(lambda: self._done)
        if self._cancelled:
            return LocallyCancelled()
        return self._error if isinstance(self._error, grpc.Call) else self._last

    def initial_metadata(self) -> Any:
        return self._status().initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._status().trailing_metadata()

    def code(self) -> grpc.StatusCode:
        return cast(grpc.StatusCode, self._status().code())

    def details(self) -> Any:
        return self._status().details()

    def is_active(self) -> bool:
        return not self._done

    def time_remaining(self) -> float | None:  # type: ignore[override]  # None: no deadline
        return self._logical.state.remaining()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if self._done:
                return False
            self._callbacks.append(lambda _future: callback())
            return True


# Streams -----------------------------------------------------------------------------------------


class RetryingStream(grpc.Call):
    """A unary-stream call retried until it commits (a Call and an iterator).

    The call commits when its response headers arrive (gRFC A6), or its first message: from
    then on its messages and its error, if any, reach the caller as they are. grpcio reports
    empty response headers exactly like the empty headers of a trailers-only error, so headers
    without metadata commit the call only with its first message.
    """

    def __init__(self, call: LogicalCall, send: Send, channel: grpc.Channel | None = None) -> None:
        self._logical = call
        self._send = send
        self._channel = channel
        self._lock = threading.Lock()
        self._started = False
        self._cancelled = threading.Event()
        self._call: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[], None]] = []

    # The retry phase ---------------------------------------------------------------------------

    def _attempt(self, step: Attempt) -> BaseException | None:
        if self._cancelled.is_set():
            raise LocallyCancelled
        call = self._call = self._send(step)
        if self._cancelled.is_set():
            call.cancel()
        try:
            if not call.initial_metadata():  # headers with metadata commit the call at once
                self._logical.first = next(call)
        except StopIteration:
            self._logical.first = END_OF_STREAM
        except grpc.RpcError as error:
            if self._cancelled.is_set():
                raise LocallyCancelled from None
            return error
        return None

    def _pause(self, seconds: float) -> None:
        if self._cancelled.wait(seconds):
            raise LocallyCancelled

    def _wait_ready(self, seconds: float) -> None:
        if self._channel is not None:
            _wait_ready(self._channel, seconds, self._pause)

    def _start(self) -> None:
        with self._lock:
            if self._started:
                if self._error is not None:
                    raise self._error
                return
            self._started = True
            try:
                if self._cancelled.is_set():
                    raise LocallyCancelled
                _drive(self._logical.steps(), self._attempt, self._wait_ready, self._pause)
            except grpc.RpcError as error:
                self._error = error
                raise
            finally:
                self._run_pending_callbacks()

    def _run_pending_callbacks(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            if (
                self._call is None
                or self._error is not None
                or not self._call.add_callback(callback)
            ):
                callback()

    def _final(self) -> Any:
        """The attempt the caller sees: the committed one, or the error it ended with."""
        with contextlib.suppress(grpc.RpcError):
            self._start()
        return self._error if self._error is not None else self._call

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
            return not self._cancelled.is_set()
        return self._call is not None and self._error is None and bool(self._call.is_active())

    def time_remaining(self) -> Any:
        return self._logical.state.remaining()

    def cancel(self) -> bool:
        """Cancel the call: the attempt in flight, a backoff pause, or the attempts to come.

        Once the call has committed, this is the committed call's own ``cancel()``. A call
        nothing has read yet ends here (its callbacks run), as a cancelled gRPC call does.
        """
        if self._error is not None:
            return False
        if not self._started and self._lock.acquire(blocking=False):
            try:
                if not self._started:  # nothing sent: it ends now
                    self._started = True
                    self._cancelled.set()
                    self._error = LocallyCancelled()
                    self._run_pending_callbacks()
                    return True
            finally:
                self._lock.release()
        call = self._call
        if self._started and call is not None and not self._lock.locked():
            return bool(call.cancel())  # committed (or over): gRPC's own answer
        self._cancelled.set()
        if call is not None:
            call.cancel()
        return True

    def add_callback(self, callback: Callable[[], None]) -> bool:
        if self._started and not self._lock.locked():
            if self._error is not None:
                return False
            return bool(self._call.add_callback(callback))
        self._callbacks.append(callback)
        return True


class HedgedFuture(RetryingFuture):
    """A hedged unary-unary call (see :class:`~resilient_grpc.core.hedging.HedgingPolicy`).

    The same ``grpc.Future`` and ``grpc.Call`` as :class:`RetryingFuture`, driven by events:
    each attempt is an underlying ``.future()`` whose completion callback reports its answer,
    and the hedge delay runs on the shared timer thread. The events of the call are handled
    one at a time, outside the lock, by whichever thread posts one while none is being
    handled (so no thread waits on another's RPC). The losers are cancelled at once, which
    the server sees as a cancellation. A blocking call is this future's ``result()``.
    """

    def __init__(self, call: HedgedCall, send: Send) -> None:
        self._hedged = call
        self._logical = call  # type: ignore[assignment]  # state.remaining() is all it reads
        self._send = send
        self._lock = threading.RLock()
        self._finished = threading.Condition(self._lock)
        self._attempts: dict[int, Any] = {}
        #: The attempts handed to ``send`` (a copy granted after cancel() is never sent).
        self._sent: set[int] = set()
        self._events: collections.deque[tuple[int, Any]] = collections.deque()
        self._pumping = False
        #: Set once an attempt came back already finished (a blocking interceptor
        #: continuation): from then on the waiting caller, not the timer thread, runs events.
        self._caller_pumps = False
        self._timer: _Timer | None = None
        self._last: Any = None
        self._error: BaseException | None = None
        self._done = False
        self._cancelled = False
        self._callbacks: list[Callable[[Any], None]] = []
        self._pending: list[Callable[[Any], None]] = []

    def _begin(self) -> HedgedFuture:
        """Start the call (its first attempt goes out from this thread)."""
        self._post(_START, None)
        return self

    def _tracks(self, number: int, outcome: Any) -> bool:
        """Whether ``outcome`` is attempt ``number`` still in play (not a cancelled loser)."""
        return not outcome.cancelled() and self._attempts.get(number) is outcome

    def _pump(self) -> None:
        call = self._hedged
        while True:
            with self._lock:
                if not self._events:
                    self._pumping = False
                    break
                kind, value = self._events.popleft()
                if self._cancelled and kind != _CANCEL:
                    # cancel() has ended the call: an answer or a hedge timer queued before
                    # its _CANCEL must not send a copy (the _CANCEL event gives back the
                    # admissions of the attempts in flight, answered or not).
                    continue
            if kind == _START:
                actions = call.start()
            elif kind == _TIMER:
                actions = call.on_timer()
            elif kind == _CANCEL:
                for number in call.abandon(self._sent):  # refunds a copy never sent
                    self._cancel_attempt(number)
                self._complete(None, cancelled=True)
                continue
            else:
                number, outcome = value
                if not self._tracks(number, outcome):
                    continue  # a loser we cancelled
                actions = call.on_done(number, outcome.exception())
                if actions.done and actions.winner == number:
                    self._last = outcome
            try:
                self._apply(actions)
            except Exception as error:  # a copy could not be sent (say, the channel closed)
                for number in call.abandon():
                    self._cancel_attempt(number)
                self._complete(error)
        self._run_callbacks()

    def _apply(self, actions: Actions) -> None:
        for number in actions.cancel:
            self._cancel_attempt(number)
        if actions.done:
            self._complete(actions.error)
            return
        with self._hedged.telemetry.use():
            for attempt in actions.send:
                if self._cancelled:  # cancel() returned meanwhile: its _CANCEL event refunds it
                    return
                self._sent.add(attempt.number)
                self._track(attempt.number, self._send(attempt))
        self._arm_timer()

    def _track(self, number: int, outcome: Any) -> None:
        if _is_finished_outcome(outcome):
            self._caller_pumps = True  # sending blocks: keep it off the shared timer thread
        self._attempts[number] = outcome
        outcome.add_done_callback(lambda done: self._post(_DONE, (number, done)))

    def _cancel_attempt(self, number: int) -> None:
        outcome = self._attempts.pop(number, None)
        if outcome is not None:
            outcome.cancel()

    def _arm_timer(self) -> None:
        wake = self._hedged.wake_at()
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if wake is not None and not self._done:
                self._timer = _TIMERS.call_later(
                    max(wake - time.monotonic(), 0.0),
                    self._on_timer,
                    blocking=self._hedged.blocking,
                )

    def _on_timer(self) -> None:
        if not self._caller_pumps:
            self._post(_TIMER, None)
            return
        with self._lock:  # the caller waiting in result() sends it (see _wait)
            self._events.append((_TIMER, None))
            self._finished.notify_all()

    def _wait(self, timeout: float | None) -> None:
        """Wait for the end of the call; a caller whose attempts block runs the due events."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self._done:
                    break
                if not (self._caller_pumps and self._events and not self._pumping):
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        raise grpc.FutureTimeoutError
                    self._finished.wait(left)
                    continue
                self._pumping = True
            self._pump()
        if self._cancelled:
            raise grpc.FutureCancelledError

    def _complete(self, error: BaseException | None, *, cancelled: bool = False) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._cancelled = self._cancelled or cancelled
            self._attempts.clear()
            self._finish(error)

    def cancel(self) -> bool:
        """Stop the call now: every attempt in flight is cancelled; ``False`` if it has ended.

        The future is cancelled and done when this returns, even if another thread is handling
        an event (sending a copy): that thread cancels the attempts once its send is over.
        """
        with self._lock:
            if self._done:
                return False
            self._cancelled = True
            self._finish(None)
        self._post(_CANCEL, None)
        self._run_callbacks()
        return True


_START, _TIMER, _DONE, _CANCEL = range(4)
_POLL = 4  # RetryingFuture: poll the channel while waiting for a reconnect


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


def _finished_outcome_types() -> tuple[type, ...]:
    """What a continuation returns for a blocking call (``__call__``/``with_call``).

    For ``.future()`` it returns a live Call-Future instead. The names are grpcio internals
    (stable since 1.x); if they move, a finished outcome is recognised by ``done()``.
    """
    import grpc._channel as channel_module
    import grpc._interceptor as interceptor_module

    names = (
        (interceptor_module, "_UnaryOutcome"),
        (interceptor_module, "_FailureOutcome"),
        (channel_module, "_InactiveRpcError"),
    )
    return tuple(t for module, name in names if isinstance(t := getattr(module, name, None), type))


_FINISHED_OUTCOME_TYPES = _finished_outcome_types()
_FINISHED_OUTCOMES = (*_FINISHED_OUTCOME_TYPES, FinishedCallFuture)


def _is_finished_outcome(outcome: Any) -> bool:
    if _FINISHED_OUTCOME_TYPES:
        return isinstance(outcome, _FINISHED_OUTCOMES)
    return bool(outcome.done())


class _Interceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Retries whole unary-unary calls, and unary-stream calls until they commit."""

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
        """Blocking calls retry in the caller's thread; ``.future()`` returns a RetryingFuture.

        The interceptor learns which one it serves from what the continuation returns for the
        first attempt: a finished outcome (blocking) or a live future.
        """
        stack = self._stack
        if stack.hedging is not None and stack.hedges(client_call_details.method):
            # A blocking call's continuation returns only when its attempt is over, so its
            # copies go one after another (on non-fatal failures); .future() is truly hedged.
            return HedgedFuture(
                begin_hedged(
                    stack,
                    client_call_details.method,
                    client_call_details.timeout,
                    client_call_details.metadata,
                    getattr(client_call_details, "wait_for_ready", None),
                ),
                _continuation_sender(continuation, client_call_details, request),
            )._begin()
        call = self._begin(client_call_details, stream=False)
        send = _continuation_sender(continuation, client_call_details, request)
        steps = call.steps()
        outcome: Any = None
        try:
            step: Any = next(steps)
            while True:
                kind = step.__class__
                if kind is Attempt:
                    outcome = send(step)
                    if not _is_finished_outcome(outcome):  # .future(): do not block
                        future = RetryingFuture(call, send, steps=steps)
                        return future._start(outcome)
                    result: Any = outcome.exception()
                elif kind is Pause:
                    time.sleep(step.seconds)
                    result = None
                elif kind is WaitReady:  # only channels the library owns wait for a reconnect
                    result = None
                else:
                    result = step.run()
                step = steps.send(result)
        except StopIteration:
            return outcome
        except grpc.RpcError as error:
            if isinstance(error, grpc.Future):
                return error  # a finished Call-Future: result() raises it
            raise
        except BaseException:
            steps.close()
            raise

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


def _result(future: HedgedFuture) -> Any:
    """Wait for a hedged call in the caller's thread; if the wait is interrupted, cancel it."""
    try:
        return future.result()
    except BaseException:
        future.cancel()  # a no-op once it is over
        raise


class _UnaryUnaryCallable(StubMethod, grpc.UnaryUnaryMultiCallable):  # type: ignore[type-arg]
    """A unary-unary method of :class:`_Channel`: the stack around the underlying callable."""

    def __init__(self, stack: ClientStack, method: str, inner: Any, channel: Any = None) -> None:
        super().__init__(stack, method, inner, channel)
        self._hedging = stack.hedges(method)

    def _hedged(self, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> HedgedFuture:
        """Start a hedged call; its attempts are the underlying method's futures."""
        arguments = CallArguments(request, *args, **kwargs)
        call = begin_hedged(
            self._stack,
            self._method,
            arguments.timeout,
            arguments.metadata,
            arguments.wait_for_ready,
        )
        return HedgedFuture(call, partial(arguments.send, self._inner.future))._begin()

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        if self._hedging:
            return _result(self._hedged(request, args, kwargs))
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

        # raises the last error when the stack gives up
        _drive(call.steps(), attempt, self._wait_ready)
        return response

    def _wait_ready(self, seconds: float) -> None:
        _wait_ready(self._channel, seconds)

    def with_call(self, request: Any, *args: Any, **kwargs: Any) -> tuple[Any, grpc.Call]:
        """Run the call; return the response and the last attempt's Call."""
        if self._hedging:
            future = self._hedged(request, args, kwargs)
            return _result(future), future
        call, send = self._start(request, args, kwargs, stream=False, via=self._inner.with_call)

        def attempt(step: Attempt) -> Any:
            try:
                return _SucceededCall(*send(step))
            except grpc.RpcError as error:
                return error  # a finished Call-Future whose exception() is itself

        outcome = _run_unary(call, attempt, self._wait_ready)
        return outcome.result(), outcome

    def future(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        """Start the call and return at once (see :class:`RetryingFuture`)."""
        if self._hedging:
            return self._hedged(request, args, kwargs)
        call, send = self._start(request, args, kwargs, stream=False, via=self._inner.future)
        return RetryingFuture(call, send, self._channel)._start()


class _UnaryStreamCallable(StubMethod, grpc.UnaryStreamMultiCallable):  # type: ignore[type-arg]
    """A unary-stream method of :class:`_Channel`."""

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return RetryingStream(*self._start(request, args, kwargs, stream=True), self._channel)


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
        return _UnaryUnaryCallable(self._stack, method, inner, self._channel)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        inner = self._channel.unary_stream(method, *args, **kwargs)
        return _UnaryStreamCallable(self._stack, method, inner, self._channel)

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
    throttle: AdaptiveThrottle | None = None,
    hedging: HedgingPolicy | None = None,
    hedging_budget: RetryBudget | None = None,
) -> list[Any]:
    """Interceptors for ``grpc.intercept_channel(channel, *client_interceptors(...))``.

    ``retry``: the :class:`RetryPolicy` (``None``: one attempt, no retries). ``budget``: a
    :class:`RetryBudget` shared by every call that should share it. ``breaker``: a
    :class:`CircuitBreaker`; ``target`` names the breaker to use (pass the channel's target:
    one breaker per target; ``None`` uses a breaker named ``"default"``). ``idempotency``: which
    calls carry an idempotency key (``None``: no keys, so only methods the policy marks
    idempotent are retried). ``reconnect_wait``: see :class:`~resilient_grpc.logical_call.ClientStack`.
    ``throttle``: an :class:`AdaptiveThrottle` (share one per backend) that rejects attempts
    locally, with :class:`~resilient_grpc.errors.ThrottledError` or the last real error, while
    the backend refuses most of them; usable instead of the breaker or with it (it is asked
    first). ``hedging``: a :class:`~resilient_grpc.core.hedging.HedgingPolicy` for the methods it
    lists (every method if it lists none; then ``retry`` must be ``None``). With interceptors a
    blocking call's continuation returns only when its attempt is over, so a blocking hedged
    call sends its copies one after another (on non-fatal failures); ``.future()`` calls and
    :func:`resilient_channel` hedge for real. ``hedging_budget``: a :class:`RetryBudget` for
    the latency hedges (copies sent because ``delay`` passed without an answer); copies sent
    after a non-fatal failure are retries and withdraw from ``budget``. Without it every copy
    withdraws from ``budget``. Bad arguments raise ``ValueError`` naming the argument.

    Turn gRPC's native retries off on the channel you intercept: create it with the option
    ``("grpc.enable_retries", 0)``. Otherwise a service config with a ``retryPolicy`` (yours,
    or one delivered by name resolution) makes gRPC retry inside every attempt of ours, and the
    attempts multiply (5 x 5 = 25). The option also lets gRPC send the
    ``grpc-previous-rpc-attempts`` header this stack sets on retries. An interceptor cannot see
    its channel's options; :func:`resilient_channel` sets the option itself.
    """
    stack = ClientStack(
        retry,
        budget,
        breaker,
        idempotency,
        target,
        reconnect_wait,
        "sync",
        throttle=throttle,
        hedging=hedging,
        hedging_budget=hedging_budget,
    )
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
    throttle: AdaptiveThrottle | None = None,
    hedging: HedgingPolicy | None = None,
    hedging_budget: RetryBudget | None = None,
) -> grpc.Channel:
    """A channel to ``target`` (secure if ``credentials`` is given) with the stack attached.

    Same arguments as :func:`client_interceptors`; the breaker (if any) is the one of
    ``target``. Closing the returned channel closes the underlying one. gRPC's native retries
    are off on it (``grpc.enable_retries=0``, whatever ``options`` say; options asking for them
    get a ``RuntimeWarning``), so one attempt of ours is one attempt on the wire.
    """
    stack = ClientStack.for_channel(
        target,
        retry,
        budget,
        breaker,
        idempotency,
        reconnect_wait,
        "sync",
        throttle=throttle,
        hedging=hedging,
        hedging_budget=hedging_budget,
    )
    return _Channel(open_channel(grpc, target, credentials, options), stack)
