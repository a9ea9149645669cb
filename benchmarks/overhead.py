"""Per-call overhead of the client stack on a loopback unary call (GetBalance), sync and aio.

Eight clients call the same in-process ledger server, side by side in alternating rounds (in a
new random order every round, so drift in machine load hits them all alike): a bare channel, the
bare channel with a fresh idempotency key passed by the caller (the floor of any client that
sends keys), a no-op interceptor, a no-op interceptor that only adds a fresh key (the floor of
any key-sending interceptor: gRPC's interceptor machinery plus one metadata entry), our full stack
(retry + budget + breaker + idempotency key, no faults) as ``resilient_channel`` and as
``client_interceptors`` on a plain channel, gRPC's native retry (service config) and tenacity
around the stub. Prints a table of median per-call latencies and their ratio to the bare
channel, and writes ``benchmarks/results/overhead.json``.

Run: ``python -m benchmarks.overhead`` (about 30-40 s) or ``python -m benchmarks.overhead --quick``
(a few seconds). Numbers are medians of every call; ratios are to the bare channel of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
import tenacity
from rich.console import Console
from rich.table import Table

from benchmarks.metrics import percentile
from benchmarks.report import environment, write_json
from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, serve, serve_aio
from resilient_grpc import CircuitBreaker, IdempotencyKeys, RetryBudget, RetryPolicy
from resilient_grpc.aio.client import client_interceptors as aio_client_interceptors
from resilient_grpc.aio.client import resilient_channel as aio_resilient_channel
from resilient_grpc.client import client_interceptors, resilient_channel
from resilient_grpc.core.keys import DEFAULT_HEADER, new_key

RESULTS = Path(__file__).resolve().parent / "results" / "overhead.json"
REQUEST = ledger_pb2.BalanceRequest(account="alice")
VARIANTS = (
    "bare",
    "bare_with_key",
    "noop_interceptor",
    "key_interceptor",
    "resilient_grpc",
    "resilient_grpc_interceptors",
    "native_retry",
    "tenacity",
)

#: gRPC's own retry for GetBalance, the same shape as the default RetryPolicy.
NATIVE_RETRY_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "ledger.v1.Ledger", "method": "GetBalance"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }
)


def _unavailable(error: BaseException) -> bool:
    return isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAVAILABLE


def _stack() -> dict[str, Any]:
    """The full resilient stack: every feature on, as a user would configure it."""
    return {
        "retry": RetryPolicy(),
        "budget": RetryBudget(),
        "breaker": CircuitBreaker(),
        "idempotency": IdempotencyKeys(),
    }


class _NoOpInterceptor(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(details, request)


class _AioNoOpInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(details, request)


class _KeyDetails(
    collections.namedtuple(
        "_KeyDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _KeyInterceptor(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """The least an interceptor that sends idempotency keys does: add a fresh one, call on.

    A reference row, not a product: what gRPC's interceptor machinery plus one new metadata
    entry cost (the client sends it, the server parses it), before any retry logic.
    """

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = (*(details.metadata or ()), (DEFAULT_HEADER, new_key()))
        return continuation(
            _KeyDetails(
                details.method,
                details.timeout,
                metadata,
                details.credentials,
                details.wait_for_ready,
                details.compression,
            ),
            request,
        )


class _AioKeyInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """:class:`_KeyInterceptor` for ``grpc.aio``."""

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), (DEFAULT_HEADER, new_key()))
        return await continuation(
            grpc.aio.ClientCallDetails(
                details.method,
                details.timeout,
                metadata,
                details.credentials,
                details.wait_for_ready,
            ),
            request,
        )


Samples = dict[str, list[list[float]]]  # variant -> rounds -> per-call seconds


def _summary(samples: Samples) -> dict[str, dict[str, float]]:
    """Median and p90 of every call, and the ratio to bare.

    The ratio is the median over rounds of (this client's median / bare's median in the same
    round): each round compares clients measured within a fraction of a second of each other,
    so slow drifts in machine load (other processes) cancel out.
    """
    bare_rounds = [statistics.median(r) for r in samples["bare"]]
    out = {}
    for name in VARIANTS:
        values = [v for r in samples[name] for v in r]
        ratios = [
            statistics.median(r) / bare for r, bare in zip(samples[name], bare_rounds, strict=True)
        ]
        out[name] = {
            "median_us": round(statistics.median(values) * 1e6, 1),
            "p90_us": round((percentile(values, 0.9) or 0.0) * 1e6, 1),
            "ratio_to_bare": round(statistics.median(ratios), 3),
            "calls": len(values),
        }
    return out


#: The same retry shape for tenacity as the default RetryPolicy (only the no-fault path runs).
TENACITY_SETTINGS: dict[str, Any] = {
    "stop": tenacity.stop_after_attempt(3),
    "wait": tenacity.wait_random_exponential(multiplier=0.1, max=5),
    "retry": tenacity.retry_if_exception(_unavailable),
    "reraise": True,
}

#: gRPC's native retry, switched on with the service config above.
NATIVE_RETRY_OPTIONS = [("grpc.enable_retries", 1), ("grpc.service_config", NATIVE_RETRY_CONFIG)]


def _rounds(rounds: int, samples: Samples) -> Iterator[tuple[str, list[float]]]:
    """Each client once per round, in a new random order: (name, the round's sample list)."""
    order = list(VARIANTS)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            bucket: list[float] = []
            samples[name].append(bucket)
            yield name, bucket


# Sync ------------------------------------------------------------------------------------------


def run_sync(rounds: int, calls: int) -> dict[str, dict[str, float]]:
    server, port, _ = serve()
    target = f"127.0.0.1:{port}"
    channels = {
        "bare": grpc.insecure_channel(target),
        "bare_with_key": grpc.insecure_channel(target),
        "noop_interceptor": grpc.intercept_channel(
            grpc.insecure_channel(target), _NoOpInterceptor()
        ),
        "key_interceptor": grpc.intercept_channel(grpc.insecure_channel(target), _KeyInterceptor()),
        "resilient_grpc": resilient_channel(target, **_stack()),
        "resilient_grpc_interceptors": grpc.intercept_channel(
            grpc.insecure_channel(target), *client_interceptors(target=target, **_stack())
        ),
        "native_retry": grpc.insecure_channel(target, options=NATIVE_RETRY_OPTIONS),
        "tenacity": grpc.insecure_channel(target),
    }
    stubs = {name: ledger_pb2_grpc.LedgerStub(channel) for name, channel in channels.items()}
    retrying = tenacity.Retrying(**TENACITY_SETTINGS)
    tenacity_stub = stubs["tenacity"]
    calls_by_name: dict[str, Callable[..., Any]] = {
        name: (lambda stub=stub: stub.GetBalance(REQUEST, timeout=5))
        for name, stub in stubs.items()
    }
    calls_by_name["tenacity"] = lambda: retrying(tenacity_stub.GetBalance, REQUEST, timeout=5)
    keyed_stub = stubs["bare_with_key"]
    calls_by_name["bare_with_key"] = lambda: keyed_stub.GetBalance(
        REQUEST, timeout=5, metadata=((DEFAULT_HEADER, new_key()),)
    )
    samples: Samples = {name: [] for name in VARIANTS}
    try:
        for call in calls_by_name.values():  # warm up connections and code paths
            for _ in range(50):
                call()
        for name, bucket in _rounds(rounds, samples):
            call = calls_by_name[name]
            for _ in range(calls):
                started = time.perf_counter()
                call()
                bucket.append(time.perf_counter() - started)
    finally:
        for channel in channels.values():
            channel.close()
        server.stop(None)
    return _summary(samples)


# Aio -------------------------------------------------------------------------------------------


async def run_aio(rounds: int, calls: int) -> dict[str, dict[str, float]]:
    server, port, _ = await serve_aio()
    target = f"127.0.0.1:{port}"
    channels = {
        "bare": grpc.aio.insecure_channel(target),
        "bare_with_key": grpc.aio.insecure_channel(target),
        "noop_interceptor": grpc.aio.insecure_channel(
            target, interceptors=[cast(grpc.aio.ClientInterceptor, _AioNoOpInterceptor())]
        ),
        "key_interceptor": grpc.aio.insecure_channel(
            target, interceptors=[cast(grpc.aio.ClientInterceptor, _AioKeyInterceptor())]
        ),
        "resilient_grpc": aio_resilient_channel(target, **_stack()),
        "resilient_grpc_interceptors": grpc.aio.insecure_channel(
            target, interceptors=aio_client_interceptors(target=target, **_stack())
        ),
        "native_retry": grpc.aio.insecure_channel(target, options=NATIVE_RETRY_OPTIONS),
        "tenacity": grpc.aio.insecure_channel(target),
    }
    stubs = {name: ledger_pb2_grpc.LedgerStub(channel) for name, channel in channels.items()}
    retrying = tenacity.AsyncRetrying(**TENACITY_SETTINGS)
    tenacity_stub = stubs["tenacity"]

    async def one_call() -> Any:
        return await tenacity_stub.GetBalance(REQUEST, timeout=5)

    async def with_tenacity() -> Any:
        return await retrying(one_call)

    calls_by_name: dict[str, Callable[..., Awaitable[Any]]] = {
        name: (lambda stub=stub: stub.GetBalance(REQUEST, timeout=5))
        for name, stub in stubs.items()
    }
    calls_by_name["tenacity"] = with_tenacity
    keyed_stub = stubs["bare_with_key"]
    calls_by_name["bare_with_key"] = lambda: keyed_stub.GetBalance(
        REQUEST, timeout=5, metadata=((DEFAULT_HEADER, new_key()),)
    )
    samples: Samples = {name: [] for name in VARIANTS}
    try:
        for call in calls_by_name.values():
            for _ in range(50):
                await call()
        for name, bucket in _rounds(rounds, samples):
            call = calls_by_name[name]
            for _ in range(calls):
                started = time.perf_counter()
                await call()
                bucket.append(time.perf_counter() - started)
    finally:
        for channel in channels.values():
            await channel.close(None)
        await server.stop(None)
    return _summary(samples)


# Report ----------------------------------------------------------------------------------------


def render(results: dict[str, dict[str, dict[str, float]]], console: Console) -> None:
    table = Table(title="Per-call latency, loopback unary GetBalance (median of all calls)")
    table.add_column("client", no_wrap=True)
    for flavour in results:
        table.add_column(f"{flavour} median us", justify="right", no_wrap=True)
        table.add_column(f"{flavour} p90 us", justify="right", no_wrap=True)
        table.add_column(f"{flavour} x bare", justify="right", no_wrap=True)
    for name in VARIANTS:
        row = [name]
        for measured in results.values():
            row += [
                f"{measured[name]['median_us']:.0f}",
                f"{measured[name]['p90_us']:.0f}",
                f"{measured[name]['ratio_to_bare']:.2f}",
            ]
        table.add_row(*row)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds instead of ~30 s")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per flavour")
    parser.add_argument("--calls", type=int, default=None, help="calls per client per round")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    rounds = args.rounds or (8 if args.quick else 60)
    calls = args.calls or 50
    if rounds < 1 or calls < 1:
        parser.error("--rounds and --calls must be >= 1")

    started = time.monotonic()
    results = {"sync": run_sync(rounds, calls), "aio": asyncio.run(run_aio(rounds, calls))}
    elapsed = time.monotonic() - started

    console = Console(width=max(Console().width, 120))
    render(results, console)
    console.print(f"{rounds} rounds x {calls} calls per client and flavour, {elapsed:.1f} s")
    document = {
        "benchmark": "overhead",
        "method": GET_BALANCE,
        "rounds": rounds,
        "calls_per_round": calls,
        "elapsed_s": round(elapsed, 1),
        **environment(),
        "results": results,
    }
    write_json(args.output, document)
    console.print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
