"""A reference Ledger servicer with scripted faults, used by the tests, examples and benchmarks.

:class:`LedgerState` holds balances and counts every executed ``Transfer`` per idempotency key,
so duplicates are measured rather than guessed. :class:`FaultScript` makes the next calls fail
in chosen ways (status code, trailers, ``RetryInfo``, delay). :class:`SyncLedger` and
:class:`AioLedger` are thin servicers over them; :func:`serve` / :func:`serve_aio` start a real
server on a free loopback port.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from protos import ledger_pb2, ledger_pb2_grpc

KEY_HEADER = "idempotency-key"
TRANSFER = "/ledger.v1.Ledger/Transfer"
GET_BALANCE = "/ledger.v1.Ledger/GetBalance"
WATCH = "/ledger.v1.Ledger/Watch"


@dataclass(frozen=True)
class Fault:
    """One scripted failure: abort with ``code``, optionally after ``delay`` seconds.

    ``code=None`` only delays the call, then answers it normally (a slow call to cut under).

    ``pushback_ms`` adds a ``grpc-retry-pushback-ms`` trailer; ``retry_info`` (seconds) adds a
    ``google.rpc.RetryInfo`` detail; ``after_messages`` (Watch only) fails mid-stream.
    ``commit`` applies the transfer before failing (a lost response, seen from the client).
    """

    code: grpc.StatusCode | None = grpc.StatusCode.UNAVAILABLE
    details: str = "scripted fault"
    delay: float = 0.0
    pushback_ms: str | None = None
    retry_info: float | None = None
    after_messages: int = 0
    commit: bool = False


@dataclass(frozen=True)
class CallRecord:
    """What the server saw of one call."""

    method: str
    key: str | None
    metadata: tuple[tuple[str, Any], ...]
    at: float


class FaultScript:
    """A thread-safe queue of faults per method; an empty queue means "answer normally"."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, collections.deque[Fault]] = collections.defaultdict(
            collections.deque
        )

    def add(self, method: str, *faults: Fault) -> None:
        """Make the next ``len(faults)`` calls of ``method`` fail, in order."""
        with self._lock:
            self._queues[method].extend(faults)

    def fail_times(self, method: str, times: int, fault: Fault | None = None) -> None:
        """Make the next ``times`` calls of ``method`` fail with ``fault`` (default UNAVAILABLE)."""
        self.add(method, *([fault or Fault()] * times))

    def next(self, method: str) -> Fault | None:
        with self._lock:
            queue = self._queues.get(method)
            return queue.popleft() if queue else None

    def clear(self) -> None:
        with self._lock:
            self._queues.clear()


class LedgerState:
    """Balances, the executed transfers per key, and a log of every call seen. Thread-safe."""

    def __init__(self, initial_balance: int = 1_000_000) -> None:
        self._lock = threading.Lock()
        self.initial_balance = initial_balance
        self.balances: dict[str, int] = collections.defaultdict(lambda: initial_balance)
        self.executions: collections.Counter[str | None] = collections.Counter()
        self.calls: list[CallRecord] = []
        self.faults = FaultScript()
        self._ids = itertools.count(1)
        self._sequence = itertools.count(1)

    def record(self, method: str, metadata: Sequence[tuple[str, Any]]) -> str | None:
        key = next((str(v) for k, v in metadata if k == KEY_HEADER), None)
        with self._lock:
            self.calls.append(CallRecord(method, key, tuple(metadata), time.monotonic()))
        return key

    def calls_to(self, method: str) -> list[CallRecord]:
        with self._lock:
            return [c for c in self.calls if c.method == method]

    def transfer(
        self, request: ledger_pb2.TransferRequest, key: str | None
    ) -> ledger_pb2.TransferReply:
        with self._lock:
            self.balances[request.from_account] -= request.amount
            self.balances[request.to_account] += request.amount
            self.executions[key] += 1
            return ledger_pb2.TransferReply(
                transfer_id=f"t{next(self._ids)}",
                from_balance=self.balances[request.from_account],
                to_balance=self.balances[request.to_account],
            )

    def balance(self, account: str) -> ledger_pb2.BalanceReply:
        with self._lock:
            return ledger_pb2.BalanceReply(
                account=account, balance=self.balances[account], sequence=next(self._sequence)
            )

    @property
    def duplicate_executions(self) -> int:
        """Executions beyond the first for every key (keyless calls are not counted)."""
        with self._lock:
            return sum(n - 1 for k, n in self.executions.items() if k is not None and n > 1)


def fault_status(fault: Fault) -> tuple[grpc.Status | None, tuple[tuple[str, str | bytes], ...]]:
    """The rich status (if ``retry_info``) and the trailers a fault answers with."""
    trailers: list[tuple[str, str | bytes]] = []
    if fault.pushback_ms is not None:
        trailers.append(("grpc-retry-pushback-ms", fault.pushback_ms))
    if fault.retry_info is None or fault.code is None:
        return None, tuple(trailers)
    info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration())
    info.retry_delay.FromNanoseconds(int(fault.retry_info * 1e9))
    detail = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=fault.details)
    detail.details.add().Pack(info)
    detail.code = fault.code.value[0]
    status = rpc_status.to_status(detail)
    return status, tuple(trailers) + tuple(status.trailing_metadata)


class SyncLedger(ledger_pb2_grpc.LedgerServicer):
    """The ledger for ``grpc.server``; faults come from ``state.faults``."""

    def __init__(self, state: LedgerState | None = None) -> None:
        self.state = state or LedgerState()

    def _fault(self, method: str, context: grpc.ServicerContext, *, applied: Any = None) -> None:
        fault = self.state.faults.next(method)
        if fault is None:
            return
        if fault.delay:
            time.sleep(fault.delay)
        if fault.code is None:
            return
        if fault.commit and applied is not None:
            applied()
        status, trailers = fault_status(fault)
        if status is not None:
            context.abort_with_status(_with_trailers(status, trailers))
        context.set_trailing_metadata(trailers)
        context.abort(fault.code, fault.details)

    def Transfer(
        self, request: ledger_pb2.TransferRequest, context: grpc.ServicerContext
    ) -> ledger_pb2.TransferReply:
        key = self.state.record(TRANSFER, context.invocation_metadata())
        self._fault(TRANSFER, context, applied=lambda: self.state.transfer(request, key))
        return self.state.transfer(request, key)

    def GetBalance(
        self, request: ledger_pb2.BalanceRequest, context: grpc.ServicerContext
    ) -> ledger_pb2.BalanceReply:
        self.state.record(GET_BALANCE, context.invocation_metadata())
        self._fault(GET_BALANCE, context)
        return self.state.balance(request.account)

    def Watch(
        self, request: ledger_pb2.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[ledger_pb2.BalanceReply]:
        self.state.record(WATCH, context.invocation_metadata())
        fault = self.state.faults.next(WATCH)
        for index in range(max(request.count, 1)):
            if fault is not None and fault.code is not None and index == fault.after_messages:
                context.abort(fault.code, fault.details)
            yield self.state.balance(request.account)


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> Sequence[tuple[str, Any]]:
    """The call's metadata: (key, value) pairs at run time (grpc-stubs declares a Mapping)."""
    return cast("Sequence[tuple[str, Any]]", context.invocation_metadata() or ())


class AioLedger(ledger_pb2_grpc.LedgerServicer):
    """The ledger for ``grpc.aio.server``; same state and faults as :class:`SyncLedger`."""

    def __init__(self, state: LedgerState | None = None) -> None:
        self.state = state or LedgerState()

    async def _fault(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], *, applied: Any = None
    ) -> None:
        fault = self.state.faults.next(method)
        if fault is None:
            return
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.code is None:
            return
        if fault.commit and applied is not None:
            applied()
        status, trailers = fault_status(fault)
        context.set_trailing_metadata(trailers)
        if status is not None:
            await context.abort(status.code, status.details, trailers)
        await context.abort(fault.code, fault.details, trailers)

    async def Transfer(
        self, request: ledger_pb2.TransferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ledger_pb2.TransferReply:
        key = self.state.record(TRANSFER, _metadata(context))
        await self._fault(TRANSFER, context, applied=lambda: self.state.transfer(request, key))
        return self.state.transfer(request, key)

    async def GetBalance(
        self, request: ledger_pb2.BalanceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ledger_pb2.BalanceReply:
        self.state.record(GET_BALANCE, _metadata(context))
        await self._fault(GET_BALANCE, context)
        return self.state.balance(request.account)

    async def Watch(
        self, request: ledger_pb2.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[ledger_pb2.BalanceReply]:
        self.state.record(WATCH, _metadata(context))
        fault = self.state.faults.next(WATCH)
        for index in range(max(request.count, 1)):
            if fault is not None and fault.code is not None and index == fault.after_messages:
                await context.abort(fault.code, fault.details)
            yield self.state.balance(request.account)


@dataclass
class _StatusWithTrailers(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...] = field(default_factory=tuple)


def _with_trailers(
    status: grpc.Status, trailers: tuple[tuple[str, str | bytes], ...]
) -> grpc.Status:
    return _StatusWithTrailers(status.code, status.details, trailers)


def serve(
    servicer: SyncLedger | None = None,
    *,
    interceptors: Sequence[grpc.ServerInterceptor[Any, Any]] = (),
    max_workers: int = 16,
    port: int = 0,
) -> tuple[grpc.Server, int, SyncLedger]:
    """Start a sync server on ``127.0.0.1`` (a free port unless given); returns it, its port, the servicer."""
    servicer = servicer or SyncLedger()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=list(interceptors)
    )
    ledger_pb2_grpc.add_LedgerServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, bound, servicer


async def serve_aio(
    servicer: AioLedger | None = None,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
    port: int = 0,
) -> tuple[grpc.aio.Server, int, AioLedger]:
    """Start a ``grpc.aio`` server on ``127.0.0.1``; returns it, its port and the servicer."""
    servicer = servicer or AioLedger()
    server = grpc.aio.server(interceptors=list(interceptors))
    ledger_pb2_grpc.add_LedgerServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound, servicer
