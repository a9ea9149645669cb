"""Server-side replay deduplication for ``grpc.aio.server``: :class:`DedupInterceptor`.

The same rules, arguments and decisions as :class:`resilient_grpc.server.DedupInterceptor`
(see that module's docstring); this shell performs the flow's effects with ``await``: store calls
through an :class:`~resilient_grpc.stores.base.AsyncStore` (blocking stores are offloaded to
worker threads, Redis uses ``redis.asyncio``), in-process waits on ``asyncio.Event``.

aio specifics: unary-stream handlers are deduplicated when they are async generators (their
messages are sent with ``context.write`` as they come); unary-stream handlers written against
``context.write`` themselves, and handlers that are not coroutines, pass through unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from resilient_grpc.core.dedup import (
    Action,
    Effect,
    Execute,
    Execution,
    Outcome,
    Release,
    StoreDown,
    Verdict,
    Wait,
)
from resilient_grpc.server import (
    CallPlan,
    Collector,
    DedupBase,
    Flights,
    FlowDriver,
    error_outcome,
    handler_outcome,
    status_code,
    unchanged,
)
from resilient_grpc.stores.base import AsyncStore, DirectAsyncStore, Store, StoreUnavailableError

__all__ = ["DedupInterceptor"]

if TYPE_CHECKING:  # generic only in grpc-stubs
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor
    _Handler = grpc.RpcMethodHandler

Execute_ = Callable[[int | None], Awaitable[Execution]]


class DedupInterceptor(DedupBase, _ServerInterceptor):
    """Replays the stored outcome of an idempotency key instead of running the handler again (aio).

    Takes the same arguments as :class:`resilient_grpc.server.DedupInterceptor`; ``store`` may be
    a blocking :class:`~resilient_grpc.stores.base.Store` (its async view is used) or an
    :class:`~resilient_grpc.stores.base.AsyncStore`.
    """

    store: AsyncStore

    def _attach(self, store: Store | AsyncStore) -> None:
        self.store = store.as_async() if isinstance(store, Store) else store
        self._flights: Flights[asyncio.Event] = Flights(asyncio.Event)
        self._direct = _direct_store(self.store)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        if handler.response_streaming:
            if not inspect.isasyncgenfunction(handler.unary_stream):
                return handler
        elif not inspect.iscoroutinefunction(handler.unary_unary):
            return handler
        method = handler_call_details.method
        if not self.settings.wants(method, handler_call_details.invocation_metadata):
            return handler
        wrapped: _Handler = self._cached(method, handler, self._wrap)
        return wrapped

    # -- handler wrappers

    def _wrap(self, method: str, handler: _Handler) -> _Handler:
        deserialize = handler.request_deserializer
        serialize = handler.response_serializer or unchanged
        if handler.response_streaming:
            stream: Any = handler.unary_stream  # an async generator function (checked above)

            async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
                driver, request = await self._admit(method, raw, context, deserialize)

                async def execute(_: int | None) -> Execution:
                    collected = Collector(self.settings.flow_settings.max_response_bytes)
                    with driver.scope():
                        try:
                            async for message in stream(request, context):
                                data = serialize(message)
                                collected.add(data)
                                await context.write(data)
                        except Exception as error:
                            driver.error = error
                            return Execution(
                                _aborted_outcome(
                                    error, context, tuple(collected.messages), collected.omitted
                                )
                            )
                    messages = tuple(collected.messages)
                    omitted = collected.omitted
                    return Execution(handler_outcome(context, messages, omitted=omitted))

                verdict = await self._drive(driver, execute)
                if verdict.action is Action.EXECUTED:
                    driver.reraise()
                    return
                assert verdict.outcome is not None
                for data in verdict.outcome.responses:
                    await context.write(data)
                await self._finish(context, verdict.outcome)

            return grpc.unary_stream_rpc_method_handler(unary_stream)

        unary: Any = handler.unary_unary  # a coroutine function (checked above)

        async def unary_unary(
            raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
        ) -> bytes | None:
            driver, request = await self._admit(method, raw, context, deserialize)

            async def execute(_: int | None) -> Execution:
                with driver.scope():
                    try:
                        response = await unary(request, context)
                    except Exception as error:
                        driver.error = error
                        return Execution(_aborted_outcome(error, context, (), 0))
                if response is None:  # the handler set an error code and returned nothing
                    return Execution(error_outcome(context))
                data = serialize(response)
                driver.response = data
                return Execution(handler_outcome(context, (data,)))

            verdict = await self._drive(driver, execute)
            if verdict.action is Action.EXECUTED:
                driver.reraise()
                return driver.response
            assert verdict.outcome is not None
            await self._finish(context, verdict.outcome)
            return verdict.outcome.responses[0]

        return grpc.unary_unary_rpc_method_handler(unary_unary)

    async def _admit(
        self,
        method: str,
        raw: bytes,
        context: grpc.aio.ServicerContext[Any, Any],
        deserialize: Callable[[bytes], Any] | None,
    ) -> tuple[FlowDriver[Any], Any]:
        plan = self.admit(method, context, raw, deserialize)
        if isinstance(plan, tuple):
            await context.abort(*plan)
        assert isinstance(plan, CallPlan)
        return self.driver(plan), plan.request

    @staticmethod
    async def _finish(context: grpc.aio.ServicerContext[Any, Any], outcome: Outcome) -> None:
        context.set_trailing_metadata(outcome.trailing_metadata)
        if outcome.code != "OK":
            await context.abort(
                status_code(outcome.code), outcome.details, outcome.trailing_metadata
            )

    # -- the effect loop

    async def _drive(
        self,
        driver: FlowDriver[Any],
        execute: Execute_,
    ) -> Verdict:
        key = driver.key
        direct = self._direct
        try:
            effect: Effect | None = driver.first()
            while effect is not None:
                if isinstance(effect, Execute):
                    answer: object = await execute(effect.token)
                elif direct is not None and not isinstance(effect, Wait):
                    answer = self._perform_now(direct, key, effect)
                else:
                    answer = await self._perform(key, effect)
                effect = driver.advance(effect, answer)
        finally:
            abandoned = driver.close()
            if abandoned is not None:  # cancelled (deadline, client gone) before the outcome
                await asyncio.shield(self._perform(key, Release(abandoned)))
        assert driver.verdict is not None
        return driver.verdict

    def _perform_now(self, store: Store, key: str, effect: Effect) -> object:
        """A claim, completion or release on a store that never blocks, without a coroutine."""
        try:
            return self.store_call(store, key, effect)
        except StoreUnavailableError as error:
            return StoreDown(str(error))

    async def _perform(self, key: str, effect: Effect) -> object:
        try:
            if not isinstance(effect, Wait):
                return await self.store_call(self.store, key, effect)
            event = self._flights.get(key)
            if event is None:
                return await self.store.wait(key, effect.timeout)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), effect.timeout)
            return await self.store.get(key)
        except StoreUnavailableError as error:
            return StoreDown(str(error))


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


def _aborted_outcome(
    error: Exception, context: Any, responses: tuple[bytes, ...], omitted: int
) -> Outcome | None:
    """After a handler raised: its status if it aborted, ``None`` for an unexpected exception."""
    if not isinstance(error, grpc.aio.AbortError):
        return None
    return error_outcome(context, responses, omitted=omitted)
