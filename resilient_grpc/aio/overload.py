"""Server overload protection for ``grpc.aio.server``: :class:`OverloadInterceptor`.

The same rules and arguments as :class:`resilient_grpc.overload.OverloadInterceptor`. A
``grpc.aio`` server has no worker queue: its queue is the event loop's, so the time a call
"waited to start" is the event-loop lag measured when it arrives (one ``asyncio.sleep(0)``:
how long the callbacks already ready to run took before this call ran again). The adaptive
concurrency limit and the deadline rule do the rest. Handlers that are not coroutine functions
(or async generator functions, for response streams) pass through unchanged.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from resilient_grpc.core.admission import Admit, Shed, record_call
from resilient_grpc.overload import SHED_DETAILS, OverloadBase, behavior_of, rebuild

__all__ = ["OverloadInterceptor"]

if TYPE_CHECKING:  # generic only in grpc-stubs
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _Context = grpc.aio.ServicerContext[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor
    _Handler = grpc.RpcMethodHandler
    _Context = grpc.aio.ServicerContext


class OverloadInterceptor(OverloadBase, _ServerInterceptor):
    """Refuses calls the server cannot serve in time, before their handler runs (``grpc.aio``).

    Put it first in ``interceptors``; arguments as :class:`resilient_grpc.OverloadInterceptor`.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.protects(method):
            return handler
        wrapped: _Handler = self._handlers.get(method, handler)
        return wrapped

    def _wrap(self, method: str, handler: _Handler) -> _Handler:
        inner = behavior_of(handler)
        controller = self.controller

        async def admit(context: _Context) -> Admit:
            arrived = time.monotonic()
            await asyncio.sleep(0)  # the event-loop lag: this call's wait to start
            decision = self.decide(method, context, time.monotonic() - arrived)
            if isinstance(decision, Shed):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, SHED_DETAILS)
            assert isinstance(decision, Admit)
            return decision

        if handler.response_streaming:
            if not inspect.isasyncgenfunction(inner):
                return handler

            async def streaming(request: Any, context: _Context) -> AsyncIterator[Any]:
                ticket = await admit(context)
                record = record_call()
                try:
                    async for message in inner(request, context):
                        yield message
                finally:
                    controller.finish(ticket, executed=record.executed)

            return rebuild(handler, unary_stream=streaming, stream_stream=streaming)

        if not inspect.iscoroutinefunction(inner):
            return handler

        async def unary(request: Any, context: _Context) -> Any:
            ticket = await admit(context)
            record = record_call()
            try:
                return await inner(request, context)
            finally:
                controller.finish(ticket, executed=record.executed)

        return rebuild(handler, unary_unary=unary, stream_unary=unary)
