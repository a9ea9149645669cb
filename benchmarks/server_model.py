"""The benchmark's server: the demo ledger behind a capacity model, in its own process.

Capacity model: ``workers`` workers (a thread pool) take calls in FIFO order from a queue of
at most ``queue`` calls; a worker spends ``service_time`` seconds (a sleep, so the capacity does
not depend on how busy the shared CPU is) and then applies the transfer. A call that finds the queue full is
answered ``UNAVAILABLE`` at once. Server interceptors and the handler run on the worker, as in
``grpc.server``; unlike ``grpc.server``'s own executor (which skips calls cancelled while
queued), the model never looks at cancellation: a call whose client has given up is still
executed. That is what real servers with an internal work queue do, and it is the condition for
a metastable failure. Capacity = ``workers / service_time`` calls per second.

Every attempt that reaches the server is logged with its arrival time and status, every executed
``Transfer`` with its time and the logical request id (the request's ``memo``, identical on every
attempt of one logical request), so amplification and duplicates are measured, not guessed.

The process is driven over stdin/stdout with one JSON object per line (see :class:`ServerProcess`
for the client side): ``start`` a fresh server (optionally with the server ``DedupInterceptor``, on a
``MemoryStore`` or, for replicas of one service, on a ``RedisStore`` they share,
with overload protection: ``OverloadInterceptor`` on an ``OverloadExecutor`` pool, and an
outage window), ``go`` (fix the time origin of the outage window), ``stop`` (drain, return the
logs), ``exit``. The same program in a second process runs the response-cutting
:class:`~resilient_grpc.testing.proxy.FaultProxy` (``proxy`` / ``proxy_stop``), so neither the
proxy's threads nor the client distort the server's capacity.
Run it with ``python -m benchmarks.server_model``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import TRANSFER, LedgerState

REPO_ROOT = Path(__file__).resolve().parent.parent
PROXY_COUNTERS = (
    "connections",
    "responses_forwarded",
    "responses_cut",
    "collateral_calls",
    "connections_cut",
)


@dataclass(frozen=True)
class CapacityConfig:
    """Workers, queue bound and per-call service time of the model server."""

    workers: int = 8
    queue: int = 128
    service_time: float = 0.028
    #: Seconds every call spends before it reaches the queue (a slow host or link: a slow
    #: replica), on the server's own threads, so it costs latency and no worker.
    delay: float = 0.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers!r}")
        if self.queue < 0:
            raise ValueError(f"queue must be >= 0, got {self.queue!r}")
        if not self.service_time > 0:
            raise ValueError(f"service_time must be > 0, got {self.service_time!r}")
        if not self.delay >= 0:
            raise ValueError(f"delay must be >= 0, got {self.delay!r}")

    @property
    def capacity(self) -> float:
        """Executions per second the workers sustain."""
        return self.workers / self.service_time


class ServerLog:
    """What the server saw: attempts (arrival time, status) and executions (time, id, late)."""

    def __init__(self) -> None:
        self.attempts: list[tuple[float, str]] = []
        self.executions: list[tuple[float, str, bool]] = []

    def snapshot(self) -> dict[str, Any]:
        return {"attempts": list(self.attempts), "executions": list(self.executions)}


class CapacityInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """The outermost interceptor: logs each ``Transfer`` attempt, plays the outage, admits
    it into the bounded queue, and runs everything inside (overload protection, dedup,
    handler) on a worker of ``workers``: a FIFO pool of ``config.workers`` threads (an
    :class:`~resilient_grpc.OverloadExecutor` for a protected server, so the
    ``OverloadInterceptor`` knows how long each call queued)."""

    def __init__(
        self, config: CapacityConfig, log: ServerLog, workers: futures.ThreadPoolExecutor
    ) -> None:
        self.config = config
        self.log = log
        self.outage: tuple[float, float] | None = None
        self._workers = workers
        self._lock = threading.Lock()
        self._in_system = 0

    @property
    def in_system(self) -> int:
        """Calls queued or being served right now."""
        with self._lock:
            return self._in_system

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method != TRANSFER:
            return handler
        inner = handler.unary_unary
        assert inner is not None

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            arrived = time.monotonic()
            code = "OK"
            try:
                if self.config.delay:
                    time.sleep(self.config.delay)
                outage = self.outage
                if outage is not None and outage[0] <= arrived < outage[1]:
                    code = "UNAVAILABLE"
                    context.abort(grpc.StatusCode.UNAVAILABLE, "outage: server unavailable")
                with self._lock:
                    admitted = self._in_system < self.config.workers + self.config.queue
                    if admitted:
                        self._in_system += 1
                if not admitted:
                    code = "UNAVAILABLE"
                    context.abort(grpc.StatusCode.UNAVAILABLE, "overloaded: queue full")
                try:
                    reply = self._workers.submit(inner, request, context).result()
                finally:
                    with self._lock:
                        self._in_system -= 1
                answered = context.code()  # type: ignore[attr-defined]
                code = answered.name if answered is not None else "OK"
                return reply
            except Exception:
                if code == "OK":
                    answered = context.code()  # type: ignore[attr-defined]
                    code = answered.name if answered is not None else "UNKNOWN"
                raise
            finally:
                self.log.attempts.append((arrived, code))

        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class AdmissionLog:
    """What a protected server's admission did, for the benchmark's JSON: every decision (time,
    outcome: ``admit`` or the shed reason, the limit and the calls in flight then, the expected
    service time) and how late a 10 ms timer thread woke up (the server process's own stalls:
    GIL contention, garbage collection, a busy machine)."""

    TICK = 0.01

    def __init__(self) -> None:
        self.decisions: list[tuple[float, str, int, int, float]] = []
        self.lags: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lag-watch", daemon=True)
        self._thread.start()

    def controller(self) -> Any:
        """An ``AdmissionController`` whose decisions land in this log: the defaults, or the
        arguments in the ``BENCHMARK_ADMISSION`` environment variable (a JSON object, e.g.
        ``{"deadline_share": 0}`` for CoDel alone), to compare settings."""
        from resilient_grpc.core.admission import AdmissionController, Shed

        log = self.decisions

        class Recording(AdmissionController):
            def decide(
                self, method: str, *, queued_for: float | None, deadline_remaining: float | None
            ) -> Any:
                decision = super().decide(
                    method, queued_for=queued_for, deadline_remaining=deadline_remaining
                )
                outcome = decision.reason.value if isinstance(decision, Shed) else "admit"
                expected = self.expected_time(method) or 0.0
                log.append((time.monotonic(), outcome, self.limit, self.in_flight, expected))
                return decision

        return Recording(**json.loads(os.environ.get("BENCHMARK_ADMISSION") or "{}"))

    def _watch(self) -> None:
        while not self._stop.is_set():
            before = time.monotonic()
            time.sleep(self.TICK)
            now = time.monotonic()
            self.lags.append((now, now - before - self.TICK))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1.0)


class ModelLedger(ledger_pb2_grpc.LedgerServicer):
    """The ledger's ``Transfer`` with a service time, ignoring cancellation, logging executions."""

    def __init__(self, service_time: float, log: ServerLog) -> None:
        self.state = LedgerState()
        self.service_time = service_time
        self.log = log

    def Transfer(
        self, request: ledger_pb2.TransferRequest, context: grpc.ServicerContext
    ) -> ledger_pb2.TransferReply:
        time.sleep(self.service_time)  # the work; runs to the end even if the caller left
        reply = self.state.transfer(request, request.memo)
        remaining = context.time_remaining()
        late = remaining is not None and remaining <= 0
        self.log.executions.append((time.monotonic(), request.memo, late))
        return reply

    def GetBalance(
        self, request: ledger_pb2.BalanceRequest, context: grpc.ServicerContext
    ) -> ledger_pb2.BalanceReply:
        return self.state.balance(request.account)


class _Running:
    """One started server (and proxy) inside the server process."""

    def __init__(self, command: dict[str, Any]) -> None:
        self.config = CapacityConfig(
            workers=int(command["workers"]),
            queue=int(command["queue"]),
            service_time=float(command["service_time"]),
            delay=float(command.get("delay", 0.0)),
        )
        self.log = ServerLog()
        self.admission = AdmissionLog()
        protected = bool(command.get("protected"))
        if protected:
            from resilient_grpc import OverloadExecutor

            self.workers: futures.ThreadPoolExecutor = OverloadExecutor(self.config.workers)
        else:
            self.workers = futures.ThreadPoolExecutor(self.config.workers)
        self.capacity = CapacityInterceptor(self.config, self.log, self.workers)
        self.outage_offsets: tuple[float, float] | None = (
            (float(command["outage"][0]), float(command["outage"][1]))
            if command.get("outage")
            else None
        )
        interceptors: list[grpc.ServerInterceptor[Any, Any]] = [self.capacity]
        self.redis: Any = None
        self.store: Any = None
        if protected:
            from resilient_grpc import OverloadInterceptor

            interceptors.append(OverloadInterceptor(self.admission.controller()))
        if command.get("dedup"):
            from resilient_grpc import DedupInterceptor, MemoryStore

            shared = command.get("dedup_shared")
            if shared and str(shared).startswith("redis://"):
                # replicas of one service share one store, so any replica dedups
                import redis

                from resilient_grpc import RedisStore

                self.redis = redis.Redis.from_url(str(shared))
                store: Any = RedisStore(self.redis, prefix=str(command["dedup_prefix"]))
            elif shared:  # an embedded SQLite file the replica processes share
                from resilient_grpc import SQLiteStore

                store = SQLiteStore(str(shared))
            else:
                store = MemoryStore()
            self.store = store
            interceptors.append(DedupInterceptor(store))
        threads = self.config.workers + self.config.queue + 32
        # grpc.server does not shut its pool down on stop: stop() does, so that trial after
        # trial the process does not collect idle threads
        self.pool = futures.ThreadPoolExecutor(max_workers=threads)
        self.server = grpc.server(self.pool, interceptors=interceptors)
        ledger_pb2_grpc.add_LedgerServicer_to_server(
            ModelLedger(self.config.service_time, self.log), self.server
        )
        # a replica started again after a kill takes its old port back
        self.port = self.server.add_insecure_port(f"127.0.0.1:{int(command.get('port', 0))}")
        self.server.start()

    def go(self, origin: float) -> None:
        if self.outage_offsets is not None:
            start, end = self.outage_offsets
            self.capacity.outage = (origin + start, origin + end)

    def stop(self, drain_timeout: float) -> dict[str, Any]:
        give_up = time.monotonic() + drain_timeout
        while self.capacity.in_system and time.monotonic() < give_up:
            time.sleep(0.01)
        result = self.log.snapshot()
        result["undrained"] = self.capacity.in_system
        self.admission.close()
        result["admission"] = list(self.admission.decisions)
        result["lags"] = list(self.admission.lags)
        self.server.stop(0).wait(5)
        self.workers.shutdown(wait=False, cancel_futures=True)
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.store is not None:
            self.store.close()
        if self.redis is not None:
            self.redis.close()
        return result


def serve_forever() -> None:
    """The server process: obey JSON commands on stdin, answer one JSON line each on stdout."""
    running: _Running | None = None
    proxy: Any = None
    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        name = command.get("cmd")
        try:
            if name == "start":
                if running is not None:
                    running.stop(0.0)
                running = _Running(command)
                reply: dict[str, Any] = {"ok": True, "port": running.port}
            elif name == "proxy":
                from resilient_grpc.testing.proxy import FaultProxy

                if proxy is not None:
                    proxy.stop()
                proxy = FaultProxy(
                    int(command["upstream"]),
                    cut_response_probability=float(command["cut_probability"]),
                    seed=command.get("seed"),
                ).start()
                reply = {"ok": True, "port": proxy.port}
            elif name == "proxy_stop" and proxy is not None:
                counters = proxy.counters
                proxy.stop()
                proxy = None
                reply = {"ok": True, **{name: getattr(counters, name) for name in PROXY_COUNTERS}}
            elif name == "go" and running is not None:
                running.go(float(command["origin"]))
                reply = {"ok": True}
            elif name == "logs" and running is not None:  # what it saw so far (before a kill)
                reply = {"ok": True, **running.log.snapshot()}
            elif name == "stop" and running is not None:
                reply = {"ok": True, **running.stop(float(command.get("drain_timeout", 3.0)))}
                running = None
            elif name == "exit":
                break
            else:
                reply = {"ok": False, "error": f"unexpected command {name!r}"}
        except Exception as error:  # report, keep serving: the driver decides what to do
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    if running is not None:
        running.stop(0.0)
    if proxy is not None:
        proxy.stop()


class ServerProcess:
    """The driver's handle on the server process (one per benchmark run, reused by every trial)."""

    def __init__(self) -> None:
        self._spawn()

    def _spawn(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        self._process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.server_model"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=str(REPO_ROOT),
            env=env,
            text=True,
            bufsize=1,
        )

    def request(self, **command: Any) -> dict[str, Any]:
        """Send one command and wait for its answer; raises ``RuntimeError`` on failure."""
        stdin, stdout = self._process.stdin, self._process.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError(
                f"benchmark server process exited (code {self._process.poll()}) "
                f"while handling {command.get('cmd')!r}"
            )
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"benchmark server: {reply.get('error')}")
        return reply

    def kill(self) -> None:
        """SIGKILL the process (a crash: no drain, no goodbye) and start a fresh, idle one."""
        self._process.kill()
        self._process.wait(timeout=5)
        for pipe in (self._process.stdin, self._process.stdout):
            if pipe is not None:
                pipe.close()
        self._spawn()

    def close(self) -> None:
        """Ask the process to exit; kill it if it does not within a few seconds."""
        if self._process.poll() is None:
            try:
                assert self._process.stdin is not None
                self._process.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self._process.stdin.close()
                self._process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait(timeout=5)
        if self._process.stdout is not None:
            self._process.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


if __name__ == "__main__":
    serve_forever()
