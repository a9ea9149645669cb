"""Server-side replay deduplication for ``grpc.aio.server``: :class:`DedupInterceptor`.

The same rules, arguments and decisions as :class:`resilient_grpc.server.DedupInterceptor`
(see that module's docstring); this shell performs the flow's effects with ``await``: store calls
through an :class:`~resilient_grpc.stores.base.AsyncStore` (blocking stores are offloaded to
worker threads, Redis uses ``redis.asyncio``), in-process waits on ``asyncio.Event``. Its effect
loop reads line for line like the sync one, plus what only asyncio needs:

* A unary handler runs shielded from the call's cancellation (a client cancel, a deadline), as
  a sync handler runs on whatever the client does: it finishes and its outcome is stored and
  replayed. A stream is stopped at the cancellation and its claim kept until the lease lapses.
  The interceptor owns these tasks; :meth:`DedupInterceptor.aclose` waits for them.
* A claim sent to a store that may still write it after a cancellation (a worker thread, a
  Redis command on the wire) is shielded; if the call was cancelled before the handler
  started, the claim is released once written (a known "not executed").
* Unary-stream handlers are deduplicated whether they are async generators or coroutines that
  send with ``context.write``. A handler that is not a coroutine function cannot be run under
  the interceptor: its keyed calls (and calls to ``require_key_methods``) are refused with
  UNIMPLEMENTED and an ERROR is logged once per method, never passed through silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import sys
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import grpc.aio

from resilient_grpc.core.admission import handler_executed
from resilient_grpc.core.dedup import (
    RENEWALS_PER_LEASE,
    Abandoned,
    Action,
    Claim,
    ClaimResult,
    Crowded,
    Effect,
    Execute,
    Execution,
    Outcome,
    Verdict,
    Wait,
)
from resilient_grpc.logs import server_logger
from resilient_grpc.server import (
    HEARTBEATS,
    CallPlan,
    Collector,
    DedupBase,
    Flights,
    FlowDriver,
    RecordingContext,
    failed_outcome,
    returned_outcome,
    status_code,
    store_down,
    unary_outcome,
    unchanged,
)
from resilient_grpc.stores.base import AsyncStore, DirectAsyncStore, Store

__all__ = ["DedupInterceptor"]

#: Whether a task can run in a given context (``create_task(..., context=)``, Python >= 3.11).
_EAGER = sys.version_info >= (3, 11)

if TYPE_CHECKING:  # generic only in grpc-stubs
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _AioContext = grpc.aio.ServicerContext[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor
    _Handler = grpc.RpcMethodHandler
    _AioContext = grpc.aio.ServicerContext


class AioHandlerContext(RecordingContext, _AioContext):
    """The servicer context a deduplicated aio handler sees: a ``grpc.aio.ServicerContext``
    (for ``isinstance`` checks) that delegates to the real one and records what it sent; its
    ``write`` serializes and collects each message of a stream before sending it."""

    __slots__ = ("_collected", "_serialize")

    def __init__(
        self,
        context: Any,
        serialize: Callable[[Any], bytes] = unchanged,
        collected: Collector | None = None,
    ) -> None:
        super().__init__(context)
        self._serialize = serialize
        self._collected = collected

    async def send_initial_metadata(self, initial_metadata: Any) -> None:
        self.initial_metadata = tuple(initial_metadata)
        await self._context.send_initial_metadata(initial_metadata)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> NoReturn:
        self.aborted = True
        await self._context.abort(code, details, trailing_metadata)
        raise AssertionError("grpc.aio ServicerContext.abort returned")

    async def abort_with_status(self, status: Any) -> None:
        self.aborted = True
        await self._context.abort_with_status(status)

    async def write(self, message: Any) -> None:
        data = self._serialize(message)
        if self._collected is not None:
            self._collected.add(data)
        await self._context.write(data)

    async def read(self) -> Any:
        return await self._context.read()

    def cancelled(self) -> bool:
        return bool(self._context.cancelled())

    def done(self) -> bool:
        return bool(self._context.done())

    def add_done_callback(self, callback: Any) -> None:
        self._context.add_done_callback(callback)


class DedupInterceptor(DedupBase, _ServerInterceptor):
    """Replays the stored outcome of an idempotency key instead of running the handler again (aio).

    Takes the same arguments as :class:`resilient_grpc.server.DedupInterceptor`; ``store`` may be
    a blocking :class:`~resilient_grpc.stores.base.Store` (its async view is used) or an
    :class:`~resilient_grpc.stores.base.AsyncStore`. Await :meth:`aclose` after stopping the
    server: handler executions that outlived their calls finish (or are cancelled) there.
    """

    store: AsyncStore

    def _attach(self, store: Store | AsyncStore) -> None:
        self.store = store.as_async() if isinstance(store, Store) else store
        self._flights: Flights[asyncio.Event] = Flights(asyncio.Event, self.max_waiters)
        self._direct = _direct_store(self.store)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refused: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def aclose(self, grace: float | None = None) -> None:
        """Wait for the tasks this interceptor owns (executions that outlived their calls,
        renewals, orphan-claim releases), up to ``grace`` s; then cancel the rest and wait."""
        tasks = set(self._tasks)
        if tasks and grace != 0:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        if not self.settings.wants(method, handler_call_details.invocation_metadata):
            return handler
        wrapped: _Handler = self._handlers.get(method, handler)
        return wrapped

    # -- handler wrappers

    def _wrap(self, method: str, handler: _Handler) -> _Handler:
        deserialize = handler.request_deserializer
        serialize = handler.response_serializer or unchanged
        if handler.response_streaming:
            stream: Any = handler.unary_stream
            generator = inspect.isasyncgenfunction(stream)
            if not generator and not inspect.iscoroutinefunction(stream):
                return self._refusal(method, streaming=True)

            async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
                driver, request = await self._admit(method, raw, context, deserialize)

                async def execute() -> Execution:
                    collected = Collector(self.settings.flow_settings.max_response_bytes)
                    handler_context = AioHandlerContext(context, serialize, collected)
                    with driver.scope():
                        try:
                            if generator:
                                async for message in stream(request, handler_context):
                                    await handler_context.write(message)
                            else:  # a coroutine sending with context.write
                                await stream(request, handler_context)
                        except Exception as error:
                            driver.error = error
                            return Execution(failed_outcome(handler_context, collected))
                    return Execution(returned_outcome(handler_context, collected))

                verdict = await self._drive(driver, execute, shield=False)
                if verdict.action is Action.EXECUTED:
                    driver.reraise()
                    return
                assert verdict.outcome is not None
                await self._start(context, verdict.outcome)
                for data in verdict.outcome.responses:
                    await context.write(data)
                await self._finish(context, verdict.outcome)

            return grpc.unary_stream_rpc_method_handler(unary_stream)

        unary: Any = handler.unary_unary
        if not inspect.iscoroutinefunction(unary):
            return self._refusal(method, streaming=False)

        async def unary_unary(
            raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
        ) -> bytes | None:
            driver, request = await self._admit(method, raw, context, deserialize)

            async def execute() -> Execution:
                handler_context = AioHandlerContext(context)
                with driver.scope():
                    try:
                        response = await unary(request, handler_context)
                    except Exception as error:
                        driver.error = error
                        return Execution(failed_outcome(handler_context))
                return Execution(unary_outcome(driver, handler_context, response, serialize))

            verdict = await self._drive(driver, execute, shield=True)
            if verdict.action is Action.EXECUTED:
                driver.reraise()
                return driver.response
            assert verdict.outcome is not None
            await self._start(context, verdict.outcome)
            await self._finish(context, verdict.outcome)
            return verdict.outcome.responses[0]

        return grpc.unary_unary_rpc_method_handler(unary_unary)

    def _refusal(self, method: str, *, streaming: bool) -> _Handler:
        """A handler refusing the calls of a method whose handler is not a coroutine function.

        grpc.aio runs such handlers in a thread pool, outside anything this interceptor could
        await; passing them through would silently drop deduplication (and
        ``require_key_methods``), so their keyed calls are refused, loudly.
        """
        if method not in self._refused:
            self._refused.add(method)
            server_logger.error(
                "%s: its handler is not a coroutine function (or async generator), so the grpc.aio "
                "DedupInterceptor cannot deduplicate it; its keyed calls are refused with "
                "UNIMPLEMENTED. Make the handler 'async def'.",
                method,
                extra={"rpc_method": method},
            )
        details = (
            f"{method} cannot be deduplicated by this server (its handler is not a coroutine "
            "function); the call was not executed"
        )

        async def refuse(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, details)

        if streaming:
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)

    async def _admit(
        self,
        method: str,
        raw: bytes,
        context: grpc.aio.ServicerContext[Any, Any],
        deserialize: Callable[[bytes], Any] | None,
    ) -> tuple[FlowDriver, Any]:
        """The call's driver and request, or refuse it before anything runs (expired deadline,
        bad or missing key, undecodable request)."""
        handler_executed(False)  # until the flow runs it: waits and replays are no executions
        plan = self.admit(method, context, raw, deserialize)
        if isinstance(plan, tuple):
            await context.abort(*plan)
        assert isinstance(plan, CallPlan)
        return self.driver(plan), plan.request

    @staticmethod
    async def _start(context: grpc.aio.ServicerContext[Any, Any], outcome: Outcome) -> None:
        """Send a stored outcome's initial metadata (what the handler sent the first time)."""
        if outcome.initial_metadata:
            await context.send_initial_metadata(outcome.initial_metadata)

    @staticmethod
    async def _finish(context: grpc.aio.ServicerContext[Any, Any], outcome: Outcome) -> None:
        """Send a stored or refusal outcome's trailers and, for an error, its status."""
        context.set_trailing_metadata(outcome.trailing_metadata)
        if outcome.code != "OK":
            await context.abort(
                status_code(outcome.code), outcome.details, outcome.trailing_metadata
            )

    # -- the effect loop (resilient_grpc.server has the same lines, without await)

    async def _drive(
        self,
        driver: FlowDriver,
        execute: Callable[[], Awaitable[Execution]],
        *,
        shield: bool,
    ) -> Verdict:
        """Perform a call's flow; a ``shield``-ed execution outlives the call's cancellation."""
        try:
            run = await self._pump(driver, driver.first())
            if run is not None:  # a flow executes the handler at most once
                settle = self._settle(driver, run, execute)
                await (self._shielded(driver, settle) if shield else settle)
        finally:
            driver.close()
        assert driver.verdict is not None
        return driver.verdict

    async def _settle(
        self, driver: FlowDriver, run: Execute, execute: Callable[[], Awaitable[Execution]]
    ) -> None:
        """Run the handler (unless its caller is already gone) and store its outcome."""
        self._beat(driver, run)
        handler_executed(not driver.detached)
        try:
            execution: object = Abandoned() if driver.detached else await execute()
        finally:
            driver.stop_beating()
        await self._pump(driver, driver.advance(run, execution))

    async def _pump(self, driver: FlowDriver, effect: Effect | None) -> Execute | None:
        """Perform store effects until the flow asks to run the handler (that effect) or decides."""
        direct = self._direct
        while effect is not None:
            if isinstance(effect, Execute):
                return effect
            if direct is not None and not isinstance(effect, Wait):
                answer = self._perform_now(direct, driver.store_key, effect)
            else:
                answer = await self._perform(driver.store_key, effect)
            effect = driver.advance(effect, answer)
        return None

    def _perform_now(self, store: Store, key: str, effect: Effect) -> object:
        """A claim, completion or release on a store that never blocks, without a coroutine."""
        try:
            return self.store_call(store, key, effect)
        except Exception as error:  # a custom store's own error is a store that is down
            return store_down(error)

    async def _perform(self, key: str, effect: Effect) -> object:
        try:
            if isinstance(effect, Claim):
                return await self._claim(key, effect)
            if not isinstance(effect, Wait):
                return await self.store_call(self.store, key, effect)
            if not self._flights.enter(key):
                return Crowded()
            try:
                event = self._flights.get(key)
                if event is None:
                    return await self.store.wait(key, effect.timeout)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(event.wait(), effect.timeout)
                return await self.store.get(key)
            finally:
                self._flights.leave(key)
        except Exception as error:  # a custom store's own error is a store that is down
            return store_down(error)

    # -- owned tasks: shielded work, orphan claims, lease renewal

    def _spawn(
        self, work: Coroutine[Any, Any, Any], context: contextvars.Context | None = None
    ) -> asyncio.Task[Any]:
        loop = asyncio.get_running_loop()
        if context is None:
            task = loop.create_task(work)
        else:
            create: Any = loop.create_task  # ``context=``: Python >= 3.11
            task = create(work, context=context)
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        return task

    def _eager(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[Any] | None:
        """Start ``work`` at once in a context of its own, as Python 3.12's eager tasks do:
        ``None`` if it finished without waiting (the common case: no task, no extra loop turn),
        else the owned task that runs the rest of it in the same context."""
        if not _EAGER:  # Python 3.10: a task cannot be given the context the first step ran in
            return self._spawn(work)
        context = contextvars.copy_context()
        try:
            pending = context.run(work.send, None)
        except StopIteration:
            return None
        return self._spawn(_rest(work, pending), context)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            server_logger.error("dedup background task failed", exc_info=task.exception())

    async def _shielded(self, driver: FlowDriver, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` so that a cancellation of this call does not stop it (an owned task,
        started eagerly)."""
        task = self._eager(work)
        if task is None:
            return
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            driver.detached = True  # the task goes on; it ends the flight when it is done
            task.add_done_callback(lambda _: _reattach(driver))
            raise

    async def _claim(self, key: str, effect: Claim) -> object:
        """A claim that, if this call is cancelled while it is written, is released once written."""
        task = self._spawn(self.store_call(self.store, key, effect))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._spawn(self._release_orphan(key, task))
            raise

    async def _release_orphan(self, key: str, claim: asyncio.Task[Any]) -> None:
        """Release a claim written for a call cancelled before its handler started."""
        try:
            result = await claim
        except Exception:  # nothing was claimed
            return
        if isinstance(result, ClaimResult) and result.token is not None:
            with contextlib.suppress(Exception):  # else its lease lapses
                await self.store.release(key, result.token)

    def _beat(self, driver: FlowDriver, run: Execute) -> None:
        """Renew the claim every third of its lease while the handler runs: timed by the shared
        renewal thread, run on this loop (an owned task) when due."""
        if run.token is None:  # failing open: nothing claimed
            return
        driver.beating = True
        self._loop = asyncio.get_running_loop()
        HEARTBEATS.start(driver, self, driver.lease / RENEWALS_PER_LEASE)

    def renew_due(self, driver: FlowDriver) -> float | None:
        """On the renewal thread: start ``driver``'s renewal on the loop (it schedules the next)."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to renew
                loop.call_soon_threadsafe(self._renew, driver)
        return None

    def _renew(self, driver: FlowDriver) -> None:
        if driver.beating:
            driver.beat = self._spawn(self._renewal(driver))

    async def _renewal(self, driver: FlowDriver) -> None:
        token = driver.token
        if token is None:
            return
        try:
            answer: object = await self.store.renew(driver.store_key, token, lease=driver.lease)
        except Exception as error:
            answer = store_down(error)
        delay = driver.renewed(answer)
        if delay is not None and driver.beating:
            HEARTBEATS.start(driver, self, delay)


async def _rest(work: Coroutine[Any, Any, None], pending: Any) -> None:
    """The rest of a coroutine started by hand and suspended on ``pending`` (see ``_eager``)."""
    await _Resume(work, pending)


class _Resume:
    """Awaitable relaying a started coroutine to the task that awaits it (``yield from``
    semantics: what it waits on goes up, results and exceptions come back down)."""

    def __init__(self, work: Coroutine[Any, Any, None], pending: Any) -> None:
        self.work = work
        self.pending = pending

    def __await__(self) -> Generator[Any, Any, None]:
        work, pending = self.work, self.pending
        while True:
            try:
                sent = yield pending
            except BaseException as error:  # cancellation included: the work sees it
                try:
                    pending = work.throw(error)
                except StopIteration:
                    return
                continue
            try:
                pending = work.send(sent)
            except StopIteration:
                return


def _reattach(driver: FlowDriver) -> None:
    """A detached execution ended: end its flight if the flow did not (keeping the claim)."""
    driver.detached = False
    driver.close()


def _direct_store(store: AsyncStore) -> Store | None:
    """The blocking store behind a :class:`DirectAsyncStore` whose claim, complete and release
    only call it (never blocking: safe on the loop), else ``None``."""
    if not isinstance(store, DirectAsyncStore):
        return None
    kind = type(store)
    for name in ("claim", "complete", "release"):
        if getattr(kind, name) is not getattr(DirectAsyncStore, name):
            return None
    return store.store
