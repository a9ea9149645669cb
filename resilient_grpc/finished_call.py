"""Read what a finished attempt says: status code, server pushback, ``RetryInfo``; and deadlines.

Works on anything shaped like a finished gRPC call: a sync ``grpc.RpcError``/``grpc.Call`` and a
``grpc.aio.AioRpcError`` alike (both answer ``code()``, ``details()`` and ``trailing_metadata()``
without blocking once the call has ended), so the sync and aio shells share it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from resilient_grpc.core.pushback import Pushback, pushback_from_metadata

_RETRY_INFO = error_details_pb2.RetryInfo.DESCRIPTOR


class FinishedCallFuture(grpc.Call, grpc.Future):  # type: ignore[type-arg]
    """What every ``grpc.Call`` + ``grpc.Future`` that has already ended answers the same way.

    Subclasses add the status (``code``, ``details``, metadata, ``time_remaining``) and the
    outcome (``result``, ``exception``, ``traceback``).
    """

    __slots__ = ()

    def is_active(self) -> bool:
        return False

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)


def status_name(error: BaseException | Any) -> str:
    """The status code name of a failed attempt (``"UNKNOWN"`` if it carries none)."""
    code_method = getattr(error, "code", None)
    if code_method is None:
        return "UNKNOWN"
    try:
        code = code_method()
    except Exception:  # a half-built or foreign error object: treat it as unknown
        return "UNKNOWN"
    name = getattr(code, "name", None)
    return name if isinstance(name, str) else "UNKNOWN"


def trailers_of(error: BaseException | Any) -> tuple[tuple[str, str | bytes], ...]:
    """The trailing metadata of a failed attempt, as ``(key, value)`` pairs (possibly empty)."""
    method = getattr(error, "trailing_metadata", None)
    if method is None:
        return ()
    try:
        trailers = method()
    except Exception:
        return ()
    return tuple(trailers) if trailers else ()


def retry_info_delay(error: BaseException | Any) -> float | None:
    """The delay of a ``google.rpc.RetryInfo`` in the error's rich status, in seconds.

    Read with grpcio-status (``rpc_status.from_call``, which checks that the rich status matches
    the call's code and message); ``None`` when there is none or it is inconsistent. A negative
    delay is returned as is: the retry decision treats it as "do not retry".
    """
    try:
        status = rpc_status.from_call(cast(grpc.Call, error))  # any finished call or error
    except (ValueError, AttributeError, TypeError):
        return None
    except Exception:  # a corrupt grpc-status-details-bin trailer (protobuf DecodeError)
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(_RETRY_INFO):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delay = info.retry_delay
            return float(delay.seconds) + float(delay.nanos) / 1e9
    return None


def pushback_of(error: BaseException | Any) -> Pushback | None:
    """The parsed ``grpc-retry-pushback-ms`` trailer of a failed attempt, if the server sent one."""
    return pushback_from_metadata(trailers_of(error))


def deadline_from_timeout(timeout: float | None, now: float | None = None) -> float | None:
    """The absolute deadline (``time.monotonic()`` clock) of a call made with ``timeout`` seconds."""
    if timeout is None:
        return None
    return (time.monotonic() if now is None else now) + timeout


def metadata_value(metadata: Iterable[tuple[str, Any]] | None, header: str) -> str | None:
    """The first value of ``header`` in call metadata (``None`` if absent); bytes are decoded."""
    if not metadata:
        return None
    for key, value in metadata:
        if key == header:
            if isinstance(value, bytes):
                return value.decode("ascii", errors="replace")
            return str(value)
    return None
