"""One logical client call as a generator driver shared by the sync and ``grpc.aio`` shells.

The driver makes no attempt and never sleeps itself (the shells do, as it tells them), but it is
not sans-IO like :mod:`resilient_grpc.core`: it reads gRPC errors, drives the pybreaker-backed
breaker and reports through OpenTelemetry. Its decisions come from the core's state machines.

:meth:`ClientStack.begin` fixes what belongs to the logical call when the stub is invoked (the
idempotency key, the metadata carrying it, the absolute deadline, the :class:`RetryState`).
:meth:`LogicalCall.steps` is a generator that yields what the shell must do next:

* :class:`Attempt`: make one attempt with this timeout/metadata/wait_for_ready and send back
  ``None`` (it succeeded: the response arrived, or a stream committed: response headers with
  metadata or its first message arrived, gRFC A6) or the error it failed with;
* :class:`Pause`: sleep this long (``time.sleep`` or ``asyncio.sleep``), send back ``None``;
* :class:`WaitReady`: before a retry on a channel the library owns, wait at most this long for
  the channel to be READY (a reconnect), send back ``None``;
* :class:`BreakerIO`: run this breaker operation and send back its result (only for breakers whose
  storage does I/O, so the aio shell can run it off the event loop; memory breakers are inline).

Closing the generator (the caller cancelled the call) is an abandonment: the breaker's probe slot
is freed and a retry granted by the budget but never sent is refunded.

The generator returns after a success and raises the error to give the caller when it gives up:
the last real error (with :func:`~resilient_grpc.errors.attempts_of` set) or
:class:`~resilient_grpc.errors.BreakerOpenError`. Every retry decision comes from
:class:`~resilient_grpc.core.retry.RetryState`; telemetry goes through :mod:`resilient_grpc.telemetry`
(nothing is built for it when no hook watches the call).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Generator, Sequence
from functools import partial
from typing import Any, Literal, NoReturn

from resilient_grpc import telemetry
from resilient_grpc.breaker import ADMITTED, REFUSED, CircuitBreaker, TargetBreaker
from resilient_grpc.core.budget import RetryBudget
from resilient_grpc.core.hedging import HedgingPolicy
from resilient_grpc.core.keys import IdempotencyKeys, key_for_call
from resilient_grpc.core.policy import RetryPolicy
from resilient_grpc.core.retry import Reason, RetryDecision, RetryState, TimeoutCause
from resilient_grpc.core.throttle import AdaptiveThrottle
from resilient_grpc.core.validation import finite_number
from resilient_grpc.errors import BreakerOpenError, ThrottledError, mark_gave_up
from resilient_grpc.finished_call import (
    deadline_from_timeout,
    metadata_value,
    pushback_of,
    retry_info_delay,
    status_name,
)

Metadata = tuple[tuple[str, Any], ...]
Transport = Literal["sync", "aio"]

#: Used when the stack has no retry policy: one attempt, no retries.
_SINGLE_ATTEMPT = RetryPolicy(max_attempts=1)

#: Default bound of the wait for a reconnect before a retry attempt (seconds).
DEFAULT_RECONNECT_WAIT = 5.0

#: gRFC A6: how many attempts of this call came before (sent on retries only).
PREVIOUS_ATTEMPTS_HEADER = "grpc-previous-rpc-attempts"


class Attempt:
    """Make attempt ``number`` with these call parameters; send back ``None`` or its error."""

    __slots__ = ("metadata", "number", "timeout", "wait_for_ready")

    def __init__(
        self, number: int, timeout: float | None, metadata: Metadata, wait_for_ready: bool | None
    ) -> None:
        self.number = number
        self.timeout = timeout
        self.metadata = metadata
        self.wait_for_ready = wait_for_ready


class Pause:
    """Sleep ``seconds`` before the next attempt (never past the call's deadline)."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


class WaitReady:
    """Wait at most ``seconds`` for the channel to be READY (then send the attempt regardless)."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


class BreakerIO:
    """Run a breaker operation that does I/O (Redis storage); send back its result.

    ``result`` keeps what it returned, so a driver closed after the caller left during the
    operation can give back what it took: the aio shell stops waiting at once when its task is
    cancelled and closes the driver only once the worker thread has run the operation.
    """

    __slots__ = ("args", "function", "result")

    def __init__(self, function: Callable[..., Any], *args: Any) -> None:
        self.function = function
        self.args = args
        self.result: Any = None

    def run(self) -> Any:
        self.result = self.function(*self.args)
        return self.result


Step = Attempt | Pause | WaitReady | BreakerIO

#: :attr:`LogicalCall.first` when no message is buffered, and once the stream has ended.
NO_MESSAGE: Any = object()
END_OF_STREAM: Any = object()

Steps = Generator[Step, Any, None]


def _check_instance(field: str, value: object, kind: type, name: str) -> None:
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"{field} must be a {name} or None, got {value!r}")


class ClientStack:
    """What every call through one set of client interceptors shares (validated once).

    ``reconnect_wait``: after a dropped connection a gRPC channel fails new RPCs at once while
    it waits to reconnect (TRANSIENT_FAILURE), which would burn every retry in that window.
    On a channel the library owns (``owns_channel``: ``resilient_channel``), a retry first
    waits up to ``reconnect_wait`` seconds (never past the call's deadline) for the channel to
    be READY, then is sent as the caller sent the first attempt: the wait bounds only the
    reconnect, never the attempt, so no call gets a deadline its caller did not ask for.
    Interceptors cannot see their channel: there a retry of a call that has a deadline (or a
    ``per_attempt_timeout``) uses gRPC's ``wait_for_ready`` bounded by that time, and a retry
    of a call with neither is sent like the first attempt. ``None`` turns the wait off
    (retries fail fast like the first attempt). A ``wait_for_ready`` the caller set
    explicitly is always respected.
    """

    def __init__(
        self,
        retry: RetryPolicy | None = None,
        budget: RetryBudget | None = None,
        breaker: CircuitBreaker | None = None,
        idempotency: IdempotencyKeys | None = None,
        target: str | None = None,
        reconnect_wait: float | None = DEFAULT_RECONNECT_WAIT,
        transport: Transport = "sync",
        *,
        owns_channel: bool = False,
        throttle: AdaptiveThrottle | None = None,
        hedging: HedgingPolicy | None = None,
        hedging_budget: RetryBudget | None = None,
    ) -> None:
        _check_instance("retry", retry, RetryPolicy, "RetryPolicy")
        _check_instance("hedging", hedging, HedgingPolicy, "HedgingPolicy")
        if retry is not None and hedging is not None and not hedging.methods:
            raise ValueError(
                "retry= and hedging= both apply to every method (gRFC A6: a method is retried "
                "or hedged, not both); list the hedged methods in HedgingPolicy(methods=...) "
                "and retry= serves the others"
            )
        _check_instance("throttle", throttle, AdaptiveThrottle, "AdaptiveThrottle")
        _check_instance("budget", budget, RetryBudget, "RetryBudget")
        _check_instance("hedging_budget", hedging_budget, RetryBudget, "RetryBudget")
        _check_instance("breaker", breaker, CircuitBreaker, "CircuitBreaker")
        _check_instance("idempotency", idempotency, IdempotencyKeys, "IdempotencyKeys")
        if target is not None and (not isinstance(target, str) or not target):
            raise ValueError(f"target must be a non-empty string or None, got {target!r}")
        if reconnect_wait is not None:
            finite_number("reconnect_wait", reconnect_wait, above=0.0, unit=" of seconds")
        self.policy = retry if retry is not None else _SINGLE_ATTEMPT
        self.budget = budget if retry is not None else None
        self.hedging = hedging
        #: The budget a hedged call's failure copies withdraw from (the retry budget), and
        #: the one its latency hedges withdraw from (``hedging_budget``, else the same).
        self.hedge_failure_budget = budget if hedging is not None else None
        self.hedging_budget = (
            (hedging_budget if hedging_budget is not None else budget)
            if hedging is not None
            else None
        )
        self.breaker = breaker
        self.idempotency = idempotency
        self.target = target
        self.reconnect_wait = None if reconnect_wait is None else float(reconnect_wait)
        self.transport: Transport = transport
        self.owns_channel = owns_channel
        self.throttle = throttle
        self.target_breaker: TargetBreaker | None = (
            breaker.for_target(target) if breaker is not None else None
        )
        self.breaker_codes: frozenset[str] = breaker.codes if breaker is not None else frozenset()

    @classmethod
    def for_channel(
        cls,
        target: str,
        retry: RetryPolicy | None = None,
        budget: RetryBudget | None = None,
        breaker: CircuitBreaker | None = None,
        idempotency: IdempotencyKeys | None = None,
        reconnect_wait: float | None = DEFAULT_RECONNECT_WAIT,
        transport: Transport = "sync",
        *,
        throttle: AdaptiveThrottle | None = None,
        hedging: HedgingPolicy | None = None,
        hedging_budget: RetryBudget | None = None,
    ) -> ClientStack:
        """The stack of a channel the library builds: ``target`` is required."""
        if not isinstance(target, str) or not target:
            raise ValueError(f"target must be a non-empty string, got {target!r}")
        return cls(
            retry,
            budget,
            breaker,
            idempotency,
            target,
            reconnect_wait,
            transport,
            owns_channel=True,
            throttle=throttle,
            hedging=hedging,
            hedging_budget=hedging_budget,
        )

    def hedges(self, method: str, *, stream: bool = False) -> bool:
        """Whether calls of ``method`` are hedged (unary-unary only; see :meth:`begin`)."""
        hedging = self.hedging
        return hedging is not None and not stream and hedging.applies_to(method)

    def key_and_metadata(
        self, method: str, metadata: Sequence[tuple[str, Any]] | None
    ) -> tuple[str | None, Metadata]:
        """The call's idempotency key (``None``: none) and its metadata carrying it."""
        key: str | None = None
        call_metadata: Metadata = tuple(metadata) if metadata else ()
        idempotency = self.idempotency
        if idempotency is not None:
            header = idempotency.header
            present = metadata_value(call_metadata, header) if call_metadata else None
            key = key_for_call(method, present, generate=idempotency.applies_to(method))
            if key is not None and present is None:
                call_metadata = (*call_metadata, (header, key))
        return key, call_metadata

    def begin(
        self,
        method: str,
        timeout: float | None,
        metadata: Sequence[tuple[str, Any]] | None,
        wait_for_ready: bool | None,
        *,
        stream: bool = False,
    ) -> LogicalCall:
        """Fix the key, metadata, deadline and retry state of a call made now.

        ``stream``: a unary-stream call, whose span stays open after it committed until
        the shell reports the end of the stream (:meth:`LogicalCall.finish_stream`). A
        unary-stream call of a hedged method is sent once, neither hedged nor retried: gRFC A6
        commits a stream on its response headers, and copies of a stream would have to be
        buffered until then; a retry policy does not serve a hedged method either.
        """
        key, call_metadata = self.key_and_metadata(method, metadata)
        hedging = self.hedging
        policy = self.policy
        if hedging is not None and hedging.applies_to(method):
            policy = _SINGLE_ATTEMPT
        state = RetryState(
            policy,
            method=method,
            has_key=key is not None,
            deadline=deadline_from_timeout(timeout),
            budget=self.budget if policy is self.policy else None,
        )
        return LogicalCall(self, method, key, call_metadata, wait_for_ready, state, stream)

    def begin_intercepted(self, details: Any, method: str, *, stream: bool) -> LogicalCall:
        """:meth:`begin` for an interceptor: the per-call arguments come in its call details."""
        return self.begin(
            method,
            details.timeout,
            details.metadata,
            getattr(details, "wait_for_ready", None),
            stream=stream,
        )


class LogicalCall:
    """One logical call: its fixed parts and the driver of its attempts (:meth:`steps`)."""

    __slots__ = (
        "_restore",
        "first",
        "key",
        "metadata",
        "method",
        "stack",
        "state",
        "stream",
        "telemetry",
        "wait_for_ready",
    )

    def __init__(
        self,
        stack: ClientStack,
        method: str,
        key: str | None,
        metadata: Metadata,
        wait_for_ready: bool | None,
        state: RetryState,
        stream: bool = False,
    ) -> None:
        self.stack = stack
        self.stream = stream
        self.telemetry: telemetry.CallTelemetry | None = None
        self.method = method
        self.key = key
        self.metadata = metadata
        self.wait_for_ready = wait_for_ready
        self.state = state
        #: A unary-stream call's first message, read by the attempt that committed the call
        #: (the shell sets it; :data:`END_OF_STREAM` if the stream had none).
        self.first: Any = NO_MESSAGE
        #: Undoes what :meth:`steps` made current (``None``: nothing, or undone already).
        self._restore: Callable[[], None] | None = None

    def leave(self) -> None:
        """Undo now what :meth:`steps` made current (the call's span), in the caller's context.

        For a shell that stops driving without closing the driver yet (an aio task cancelled
        while breaker I/O runs in a thread: the driver is closed when the thread is done, from
        the event loop): the caller's context must not keep the call's span meanwhile, and
        closing the driver later does not undo it again.
        """
        restore, self._restore = self._restore, None
        if restore is not None:
            restore()

    def steps(self) -> Steps:
        """Drive the attempts (see the module docstring for the protocol).

        The call's span is current while the attempts run. A unary call's span ends here; a
        stream's outlives this driver: it ends when the shell reports the stream's end.
        """
        stack = self.stack
        stream = self.stream
        # None when no telemetry hook watches the call: then it reports nothing but a failure.
        tel = telemetry.start_call(self.method, target=stack.target, transport=stack.transport)
        if stream:
            self.telemetry = tel
        if tel is not None:
            self._restore = partial(tel.restore, tel.make_current())
        try:
            breaker = stack.target_breaker
            throttle = stack.throttle
            state = self.state
            last_error: BaseException | None = None
            while True:
                if state.attempts:  # a retry: let a dropped connection come back first
                    wait = self._reconnect_wait()
                    if wait is not None:
                        yield WaitReady(wait)
                if throttle is not None and not throttle.admit():
                    self._throttled(tel, throttle, last_error)
                admission = ADMITTED
                if breaker is not None:
                    if breaker.blocking:
                        admit = BreakerIO(breaker.admit)
                        try:
                            admission = yield admit
                        except GeneratorExit:  # cancelled while it ran: free what it took
                            breaker.release(admit.result)
                            raise
                    else:
                        admission = breaker.admit()
                    if admission is REFUSED:
                        self._refused(tel, breaker, last_error)
                timeout = state.begin_attempt()
                wait_for_ready = self.wait_for_ready
                metadata = self.metadata
                if state.attempts > 1:
                    metadata = (*metadata, (PREVIOUS_ATTEMPTS_HEADER, str(state.attempts - 1)))
                    if (
                        wait_for_ready is None
                        and timeout is not None
                        and stack.reconnect_wait is not None
                        and not stack.owns_channel
                    ):
                        wait_for_ready = True  # bounded by the caller's own deadline
                recording: BreakerIO | None = None
                try:
                    error = yield Attempt(state.attempts, timeout, metadata, wait_for_ready)
                    code = "OK" if error is None else status_name(error)
                    opened = False
                    # The caller's own deadline running out says how patient the caller is,
                    # not how healthy the backend is: neither the breaker nor the throttle
                    # counts it.
                    impatient = (
                        code == "DEADLINE_EXCEEDED" and state.timeout_cause() is TimeoutCause.CALL
                    )
                    if throttle is not None and not impatient:
                        throttle.record(code not in throttle.codes)
                    if breaker is not None:
                        if impatient:
                            breaker.release(admission)
                        else:
                            failed = code in stack.breaker_codes
                            if breaker.blocking:
                                recording = BreakerIO(breaker.record, admission, failed)
                                opened = yield recording
                            else:
                                opened = breaker.record(admission, failed)
                except GeneratorExit:  # abandoned mid-attempt: free the probe slot
                    # ... unless the outcome was recorded (that freed it): a second release
                    # could free the slot of another call's probe, letting two probes out.
                    if breaker is not None and (recording is None or recording.result is None):
                        breaker.release(admission)
                    raise
                if error is None:
                    if tel is not None:
                        tel.attempt(state.attempts, code, None)
                        if not stream:
                            tel.end(code, attempts=state.attempts, reason=Reason.SUCCESS)
                    return
                last_error = error
                decision = state.breaker_open() if opened else self._decide(code, error)
                if tel is not None:
                    tel.attempt(state.attempts, code, decision)
                if not decision.retry:
                    self._give_up(tel, error, decision)
                yield Pause(decision.delay)
        except BaseException as failure:
            # A retry the budget granted but that was never sent (the caller cancelled, or the
            # breaker refused it after its backoff) is refunded: only what was sent is traffic.
            self.state.abandon()
            if tel is not None:
                tel.abandon(failure)
            raise
        finally:
            if tel is not None:
                self.leave()
                if not stream:
                    tel.close()

    def _reconnect_wait(self) -> float | None:
        """How long a retry may wait for a reconnect (``None``: do not wait)."""
        stack = self.stack
        wait = stack.reconnect_wait
        if wait is None or not stack.owns_channel or self.wait_for_ready is not None:
            return None
        remaining = self.state.remaining()
        if remaining is not None:
            wait = min(wait, max(remaining, 0.0))
        return wait

    def take_first(self) -> Any:
        """The committed stream's buffered first message, once; then :data:`NO_MESSAGE`.

        :data:`END_OF_STREAM` when the stream is over (its span is ended then).
        """
        first = self.first
        if first is END_OF_STREAM:
            self.finish_stream(None)
        elif first is not NO_MESSAGE:
            self.first = NO_MESSAGE
        return first

    def stream_ended(self, error: BaseException | None) -> None:
        """The committed stream ended: cleanly (``None``) or with ``error``."""
        if error is None:
            self.first = END_OF_STREAM
        self.finish_stream(error)

    def finish_stream(self, error: BaseException | None) -> None:
        """A committed stream ended: cleanly (``None``), with an error, or abandoned (GeneratorExit)."""
        tel = self.telemetry
        if tel is None:
            if error is not None and not isinstance(error, GeneratorExit):
                self._end(None, status_name(error), self.state.attempts, Reason.NOT_RETRYABLE_CODE)
            return
        if tel.ended:
            return
        if isinstance(error, GeneratorExit):
            tel.abandon(error)
        elif error is None:
            tel.end("OK", attempts=self.state.attempts, reason=Reason.SUCCESS)
        else:  # a committed call (headers received) is not retried
            self._end(tel, status_name(error), self.state.attempts, Reason.NOT_RETRYABLE_CODE)

    def _refused(
        self,
        tel: telemetry.CallTelemetry | None,
        breaker: TargetBreaker,
        last_error: BaseException | None,
    ) -> NoReturn:
        """The breaker refused an attempt: fail fast, or give up with the last real error."""
        if tel is not None:
            tel.breaker_rejected()
        if last_error is not None:
            self._give_up(tel, last_error, self.state.breaker_open())
        rejected = BreakerOpenError(self.stack.target or "default", breaker.rejected_until)
        self._end(tel, "UNAVAILABLE", 0, Reason.BREAKER_OPEN)
        raise rejected

    def _throttled(
        self,
        tel: telemetry.CallTelemetry | None,
        throttle: AdaptiveThrottle,
        last_error: BaseException | None,
    ) -> NoReturn:
        """The throttle rejected an attempt: fail fast, or give up with the last real error."""
        if last_error is not None:
            self._give_up(tel, last_error, self.state.throttled())
        rejected = ThrottledError(self.stack.target or "default", throttle.rejection_probability)
        self._end(tel, "UNAVAILABLE", 0, Reason.THROTTLED)
        raise rejected

    def _decide(self, code: str, error: BaseException) -> RetryDecision:
        if (
            code not in self.state.policy.retryable_codes
            and code != "ABORTED"
            and code != "DEADLINE_EXCEEDED"
        ):
            return self.state.on_failure(code)  # no trailer parsing on the common business error
        return self.state.on_failure(
            code, pushback=pushback_of(error), retry_info_delay=retry_info_delay(error)
        )

    def _give_up(
        self, tel: telemetry.CallTelemetry | None, error: BaseException, decision: RetryDecision
    ) -> NoReturn:
        self._end(tel, status_name(error), self.state.attempts, decision.reason)
        mark_gave_up(error, self.state.attempts, decision.reason)
        raise error

    def _end(
        self, tel: telemetry.CallTelemetry | None, code: str, attempts: int, reason: Reason
    ) -> None:
        """Report the failed end of the call, watched (``tel``) or not."""
        if tel is not None:
            tel.end(code, attempts=attempts, reason=reason)
        else:
            telemetry.call_failed(self.method, self.stack.target, code, attempts, reason)


class CallArguments:
    """The per-call arguments of a stub method (sync or aio), in gRPC's order and defaults."""

    __slots__ = ("compression", "credentials", "metadata", "request", "timeout", "wait_for_ready")

    def __init__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> None:
        self.request = request
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression

    def send(self, inner: Callable[..., Any], step: Attempt) -> Any:
        """Make one attempt through ``inner`` with the attempt's timeout/metadata/wait_for_ready."""
        return inner(
            self.request,
            timeout=step.timeout,
            metadata=step.metadata,
            credentials=self.credentials,
            wait_for_ready=step.wait_for_ready,
            compression=self.compression,
        )


class StubMethod:
    """A unary-request method of a resilient channel: the stack around the underlying callable.

    The sync and aio channels subclass it together with gRPC's multi-callable type.
    """

    def __init__(self, stack: ClientStack, method: str, inner: Any, channel: Any = None) -> None:
        self._stack = stack
        self._method = method
        self._inner = inner
        #: The underlying channel (``grpc`` or ``grpc.aio``), watched for reconnects.
        self._channel = channel

    def _start(
        self,
        request: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        stream: bool,
        via: Callable[..., Any] | None = None,
    ) -> tuple[LogicalCall, Callable[[Attempt], Any]]:
        """Begin a logical call from a stub invocation; return it and how to send one attempt.

        ``via`` is the underlying callable to send through (default: the method itself).
        """
        arguments = CallArguments(request, *args, **kwargs)
        call = self._stack.begin(
            self._method,
            arguments.timeout,
            arguments.metadata,
            arguments.wait_for_ready,
            stream=stream,
        )
        return call, partial(arguments.send, self._inner if via is None else via)


#: gRFC A6's switch for libraries that retry themselves: gRPC's own retries stay off.
NATIVE_RETRIES_OFF = ("grpc.enable_retries", 0)


def native_retries_requested(options: Sequence[tuple[str, Any]]) -> str | None:
    """What in channel ``options`` asks for gRPC's native retries (``None``: nothing)."""
    for key, value in options:
        if key == "grpc.enable_retries" and value:
            return "grpc.enable_retries=1"
        if key == "grpc.service_config":
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            for policy in ("retryPolicy", "hedgingPolicy"):
                if f'"{policy}"' in text:
                    return f"a service config with a {policy}"
    return None


def open_channel(
    grpc_module: Any,
    target: str,
    credentials: Any,
    options: Sequence[tuple[str, Any]],
    **extra: Any,
) -> Any:
    """The underlying channel of a resilient channel: ``grpc`` or ``grpc.aio``, secure or not.

    gRPC's native retries are turned off (``grpc.enable_retries=0``): they would run inside
    every attempt of ours and multiply them (5 x 5 = 25 attempts), and a service config that
    asks for them may come from name resolution without the caller knowing. Options asking for
    them are overridden, with a warning.
    """
    requested = native_retries_requested(options)
    if requested is not None:
        warnings.warn(
            f"resilient_channel({target!r}): the options ask for gRPC's native retries "
            f"({requested}); they are turned off (grpc.enable_retries=0) so that attempts do "
            "not multiply: configure retries with RetryPolicy (RetryPolicy.from_service_config "
            "reads a service config)",
            RuntimeWarning,
            stacklevel=3,
        )
    merged = [option for option in options if option[0] != "grpc.enable_retries"]
    merged.append(NATIVE_RETRIES_OFF)
    if credentials is not None:
        return grpc_module.secure_channel(target, credentials, options=merged, **extra)
    return grpc_module.insecure_channel(target, options=merged, **extra)
