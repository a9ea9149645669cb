"""Server overload protection for ``grpc.server``: :class:`OverloadInterceptor`, :func:`resilient_server`.

Each call is admitted or refused just before its handler runs, by
:class:`~resilient_grpc.core.admission.AdmissionController` (rules: the caller's deadline against
the method's service-time estimate, CoDel on the time the call waited to start, an adaptive
concurrency limit). A refused call is answered ``RESOURCE_EXHAUSTED`` with a
``grpc-retry-pushback-ms`` trailer scaled to the overload; its handler and every interceptor
after this one (put it before :class:`~resilient_grpc.DedupInterceptor`: a refused call then
claims no key) never run.

How long a call waited: ``grpc.server`` runs each call's handler on its thread pool, so the wait is
the time between the pool's ``submit`` and the task starting. :class:`OverloadExecutor` is a
``ThreadPoolExecutor`` that stamps that time; with any other pool the queue rule is off (the
deadline and concurrency rules still apply). :func:`resilient_server` builds a server with both.
The ``grpc.aio`` flavour is :class:`resilient_grpc.aio.OverloadInterceptor`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from resilient_grpc import telemetry
from resilient_grpc.core.admission import AdmissionController, Admit, Shed, record_call
from resilient_grpc.core.methods import method_matches, method_patterns
from resilient_grpc.core.pushback import PUSHBACK_HEADER
from resilient_grpc.handlers import WrappedHandlers

__all__ = [
    "SHED_DETAILS",
    "OverloadBase",
    "OverloadExecutor",
    "OverloadInterceptor",
    "resilient_server",
]

#: The status details of a refused call (nothing internal: the reason is in the server's metrics).
SHED_DETAILS = "server overloaded: retry after the pushback"

if TYPE_CHECKING:  # generic only in grpc-stubs
    _ServerInterceptor = grpc.ServerInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
else:
    _ServerInterceptor = grpc.ServerInterceptor
    _Handler = grpc.RpcMethodHandler

T = TypeVar("T")

_started = threading.local()


def _run_stamped(submitted: float, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    previous = getattr(_started, "submitted", None)
    _started.submitted = submitted
    try:
        return fn(*args, **kwargs)
    finally:
        _started.submitted = previous


def submitted_at() -> float | None:
    """When the :class:`OverloadExecutor` task running on this thread was submitted (monotonic)."""
    submitted: float | None = getattr(_started, "submitted", None)
    return submitted


class OverloadExecutor(futures.ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` that remembers when each task was submitted.

    Give it to ``grpc.server`` (or use :func:`resilient_server`): the :class:`OverloadInterceptor`
    then knows how long each call queued for a worker, which is what its CoDel rule needs.
    """

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> futures.Future[T]:
        return super().submit(_run_stamped, time.monotonic(), fn, *args, **kwargs)


class OverloadBase:
    """What the sync and aio interceptors share: the controller, method selection, the decision."""

    def __init__(
        self,
        controller: AdmissionController | None = None,
        *,
        name: str = "server",
        exempt_methods: Iterable[str] = (),
    ) -> None:
        if controller is not None and not isinstance(controller, AdmissionController):
            raise ValueError(
                f"controller must be an AdmissionController, got {type(controller).__name__}"
            )
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.controller = controller if controller is not None else AdmissionController()
        self.name = name
        self.exempt_methods = method_patterns(exempt_methods, field="exempt_methods")
        self._handlers = WrappedHandlers(self._wrap)
        telemetry.register_limit(self)

    def _wrap(self, method: str, handler: Any) -> Any:
        """The handler that admits calls of ``method`` before ``handler`` runs (per shell)."""
        raise NotImplementedError

    @property
    def limit(self) -> int:
        """The controller's current concurrency limit (reported by the limit gauge)."""
        return self.controller.limit

    def protects(self, method: str) -> bool:
        """Whether calls of ``method`` go through admission (not listed in ``exempt_methods``)."""
        return not method_matches(self.exempt_methods, method)

    def decide(self, method: str, context: Any, queued_for: float | None) -> Admit | Shed:
        """Ask the controller; count the outcome; on a refusal set the pushback trailer."""
        decision = self.controller.decide(
            method, queued_for=queued_for, deadline_remaining=context.time_remaining()
        )
        if isinstance(decision, Shed):
            telemetry.call_shed(method, decision.reason.value)
            context.set_trailing_metadata(((PUSHBACK_HEADER, str(decision.pushback_ms)),))
        else:
            telemetry.call_admitted(method)
        return decision


def rebuild(handler: _Handler, **behaviors: Any) -> _Handler:
    """A handler like ``handler`` (same kind and (de)serializers) with its behavior replaced."""
    kind = (
        ("stream" if handler.request_streaming else "unary")
        + "_"
        + ("stream" if handler.response_streaming else "unary")
    )
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    rebuilt: _Handler = factory(
        behaviors[kind],
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    return rebuilt


def behavior_of(handler: _Handler) -> Any:
    """The handler's one behavior function, whatever its kind."""
    return (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )


class OverloadInterceptor(OverloadBase, _ServerInterceptor):
    """Refuses calls the server cannot serve in time, before their handler runs (``grpc.server``).

    Put it first in ``interceptors``. ``controller``: the :class:`AdmissionController` (its
    arguments tune the rules; a default one otherwise); ``name``: how the limit gauge labels this
    server; ``exempt_methods``: ``"/pkg.Service/Method"`` or ``"/pkg.Service/*"`` entries that are
    never refused (health checks, say). The queue rule needs the server's pool to be an
    :class:`OverloadExecutor`.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], _Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.protects(method):
            return handler
        wrapped: _Handler = self._handlers.get(method, handler)
        return wrapped

    def _wrap(self, method: str, handler: _Handler) -> _Handler:
        inner = behavior_of(handler)
        controller = self.controller

        def admit(context: grpc.ServicerContext) -> Admit:
            submitted = submitted_at()
            queued_for = None if submitted is None else time.monotonic() - submitted
            decision = self.decide(method, context, queued_for)
            if isinstance(decision, Shed):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, SHED_DETAILS)
            assert isinstance(decision, Admit)
            return decision

        if handler.response_streaming:

            def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                ticket = admit(context)
                record = record_call()
                try:
                    yield from inner(request, context)
                finally:
                    controller.finish(ticket, executed=record.executed)

            return rebuild(handler, unary_stream=streaming, stream_stream=streaming)

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            ticket = admit(context)
            record = record_call()
            try:
                return inner(request, context)
            finally:
                controller.finish(ticket, executed=record.executed)

        return rebuild(handler, unary_unary=unary, stream_unary=unary)


def resilient_server(
    max_workers: int = 16,
    *,
    interceptors: Sequence[_ServerInterceptor] = (),
    overload: OverloadInterceptor | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
    maximum_concurrent_rpcs: int | None = None,
    compression: grpc.Compression | None = None,
) -> grpc.Server:
    """A ``grpc.server`` on an :class:`OverloadExecutor` of ``max_workers`` threads, protected.

    ``overload`` (default: ``OverloadInterceptor()``) goes first, then ``interceptors`` (e.g. a
    ``DedupInterceptor``). The other arguments are ``grpc.server``'s.
    """
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(f"max_workers must be an integer >= 1, got {max_workers!r}")
    if overload is not None and not isinstance(overload, OverloadInterceptor):
        raise ValueError(
            "overload must be a resilient_grpc.OverloadInterceptor (the sync one), got "
            f"{type(overload).__name__}"
        )
    chain: list[_ServerInterceptor] = [overload or OverloadInterceptor(), *interceptors]
    return grpc.server(
        OverloadExecutor(max_workers=max_workers),
        interceptors=chain,
        options=list(options) if options is not None else None,
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
        compression=compression,
    )
