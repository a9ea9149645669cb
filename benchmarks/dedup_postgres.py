"""The PostgresStore rows of ``benchmarks.dedup_overhead``: lease mode and transactional mode.

Variants (``Transfer`` on loopback, one call at a time, medians of every call; round trips counted
exactly from libpq's protocol trace, see :mod:`resilient_grpc.testing.postgres_round_trips`):

* ``pg write, no dedup``: no interceptor; the handler writes one row in its own transaction
  (``BEGIN``, ``INSERT``, ``COMMIT``): the baseline for transactional mode;
* ``pg transactional first``: ``DedupInterceptor(PostgresStore)``; the same handler writes the
  row through ``transaction(context)``; the record commits with it;
* ``pg transactional replay``: the same key again (the stored outcome is replayed);
* ``pg lease first`` / ``pg lease replay``: ``DedupInterceptor(PostgresStore)`` around a handler
  that does not touch the database (claim, run, complete / claim finds the outcome).

Target (issue 10): transactional mode costs at most one round trip more than the handler's own
transaction; a replay is one round trip. Round trips are counted per round; the reported figure
is the call's own path (the fewest per call in any round), and the mean over all calls is
reported too: it adds the amortized purge of expired records (one statement every 1024 claims)
and psycopg's one-off prepares on connections the pool opens mid-run (about +0.002). PostgreSQL is ``POSTGRES_URL`` or a private server
started here (Debian's ``postgresql`` binaries). psycopg prepares a statement on its 5th run
(one extra round trip, once per statement and connection): the warm-up does that before counting.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc
import grpc.aio
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from benchmarks.report import environment, write_json
from protos import ledger_pb2, ledger_pb2_grpc
from resilient_grpc import transaction
from resilient_grpc.aio import DedupInterceptor as AioDedupInterceptor
from resilient_grpc.aio import transaction as async_transaction
from resilient_grpc.server import DedupInterceptor
from resilient_grpc.stores import PostgresStore
from resilient_grpc.testing.postgres_round_trips import PostgresRoundTrips
from resilient_grpc.testing.servers import PostgresServer, ServerUnavailableError

VARIANTS = (
    "pg write, no dedup",
    "pg transactional first",
    "pg transactional replay",
    "pg lease first",
    "pg lease replay",
)
_SERVER = {  # which server a variant calls
    "pg write, no dedup": "plain",
    "pg transactional first": "transactional",
    "pg transactional replay": "transactional",
    "pg lease first": "lease",
    "pg lease replay": "lease",
}
REQUEST = ledger_pb2.TransferRequest(from_account="a", to_account="b", amount=1)
REPLY = ledger_pb2.TransferReply(transfer_id="t", from_balance=0, to_balance=0)
_INSERT = "INSERT INTO bench_effects (memo) VALUES (%s)"
_KWARGS: dict[str, Any] = {}  # psycopg's defaults: statements prepared from their 5th run


@contextmanager
def postgres_url() -> Iterator[str]:
    """``POSTGRES_URL``, or a private PostgreSQL on a free loopback port (stopped afterwards)."""
    if os.environ.get("POSTGRES_URL"):
        yield os.environ["POSTGRES_URL"]
        return
    try:
        server = PostgresServer()
    except ServerUnavailableError as error:
        raise SystemExit(f"{error} and POSTGRES_URL is not set") from None
    with server:
        yield server.url


class _WriteOne(ledger_pb2_grpc.LedgerServicer):
    """Writes one row per call: in its own transaction, or through ``transaction(context)``."""

    def __init__(self, pool: ConnectionPool[Any] | None) -> None:
        self.pool = pool

    def Transfer(self, request: Any, context: Any) -> Any:
        opened = self.pool.connection() if self.pool is not None else transaction(context)
        with opened as connection:
            connection.execute(_INSERT, (request.memo,))
        return REPLY


class _AioWriteOne(ledger_pb2_grpc.LedgerServicer):
    def __init__(self, pool: AsyncConnectionPool[Any] | None) -> None:
        self.pool = pool

    async def Transfer(self, request: Any, context: Any) -> Any:
        opened = self.pool.connection() if self.pool is not None else async_transaction(context)
        async with opened as connection:
            await connection.execute(_INSERT, (request.memo,))
        return REPLY


class _Trivial(ledger_pb2_grpc.LedgerServicer):
    def Transfer(self, request: Any, context: Any) -> Any:
        return REPLY


class _AioTrivial(ledger_pb2_grpc.LedgerServicer):
    async def Transfer(self, request: Any, context: Any) -> Any:
        return REPLY


def _schema(url: str) -> str:
    """A fresh schema with the effects table; the URL that uses it."""
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {name}")
        connection.execute(
            f"CREATE TABLE {name}.bench_effects (id bigserial PRIMARY KEY, memo text)"
        )
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{name}"


async def _measure(
    call: Callable[[str, list[tuple[str, str]]], Awaitable[Any]],
    times: dict[str, Any],
    trips: PostgresRoundTrips,
    rounds: int,
    per_round: int,
) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    counter = (f"pg-bench-{run}-{n}" for n in itertools.count())
    replay = {
        "pg transactional replay": f"pg-replay-t-{run}",
        "pg lease replay": f"pg-replay-l-{run}",
    }

    def metadata(variant: str) -> list[tuple[str, str]]:
        return [("idempotency-key", replay.get(variant) or next(counter))]

    e2e: dict[str, list[int]] = {v: [] for v in VARIANTS}
    server: dict[str, list[int]] = {v: [] for v in VARIANTS}
    round_trips: dict[str, list[float]] = {v: [] for v in VARIANTS}  # per call, each round
    for variant in VARIANTS:  # warm-up: pools, schema, the stored replay outcomes
        for _ in range(20):
            await call(variant, metadata(variant))
        times[_SERVER[variant]].take()
    for _ in range(rounds):
        order = list(VARIANTS)
        random.shuffle(order)
        for variant in order:
            trips.reset()
            for _ in range(per_round):
                data = metadata(variant)
                started = time.perf_counter_ns()
                await call(variant, data)
                e2e[variant].append(time.perf_counter_ns() - started)
            round_trips[variant].append(trips.count() / per_round)
            server[variant].extend(times[_SERVER[variant]].take())
    return {
        v: {
            "calls": len(e2e[v]),
            "e2e_median_us": statistics.median(e2e[v]) / 1000,
            "server_median_us": statistics.median(server[v]) / 1000,
            # the call's own path (rounds without a purge or a one-off prepare), and the mean
            "postgres_round_trips_per_call": min(round_trips[v]),
            "postgres_round_trips_mean": statistics.fmean(round_trips[v]),
        }
        for v in VARIANTS
    }


def run_sync(
    url: str,
    rounds: int,
    per_round: int,
    timing: Callable[[Any], Any],
    make_times: Callable[[], Any],
) -> dict[str, Any]:
    url = _schema(url)
    trips = PostgresRoundTrips()
    store_pool: ConnectionPool[Any] = ConnectionPool(
        url,
        min_size=1,
        max_size=4,
        configure=trips.attach,
        kwargs={"autocommit": True, **_KWARGS},
        open=True,
    )
    own_pool: ConnectionPool[Any] = ConnectionPool(
        url, min_size=1, max_size=4, configure=trips.attach, kwargs=_KWARGS, open=True
    )
    store = PostgresStore.from_pool(store_pool)
    times = {name: make_times() for name in ("plain", "transactional", "lease")}
    servicers = {
        "plain": _WriteOne(own_pool),
        "transactional": _WriteOne(None),
        "lease": _Trivial(),
    }
    servers: list[grpc.Server] = []
    stubs: dict[str, Any] = {}
    channels: list[grpc.Channel] = []
    for name, servicer in servicers.items():
        interceptors = [timing(times[name])]
        if name != "plain":
            interceptors.append(DedupInterceptor(store))
        server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=interceptors)
        ledger_pb2_grpc.add_LedgerServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        stubs[name] = ledger_pb2_grpc.LedgerStub(channel)

    async def call(variant: str, metadata: list[tuple[str, str]]) -> None:
        stubs[_SERVER[variant]].Transfer(REQUEST, metadata=metadata, timeout=10)

    try:
        return asyncio.run(_measure(call, times, trips, rounds, per_round))
    finally:
        for channel in channels:
            channel.close()
        for server in servers:
            server.stop(None)
        store.close()
        store_pool.close()
        own_pool.close()
        trips.close()


def run_aio(
    url: str,
    rounds: int,
    per_round: int,
    timing: Callable[[Any], Any],
    make_times: Callable[[], Any],
) -> dict[str, Any]:
    url = _schema(url)

    async def main() -> dict[str, Any]:
        trips = PostgresRoundTrips()
        store_pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=4,
            configure=trips.attach_async,
            kwargs={"autocommit": True, **_KWARGS},
            open=False,
        )
        own_pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            url, min_size=1, max_size=4, configure=trips.attach_async, kwargs=_KWARGS, open=False
        )
        await store_pool.open()
        await own_pool.open()
        store = PostgresStore.from_pool(store_pool)
        times = {name: make_times() for name in ("plain", "transactional", "lease")}
        servicers = {
            "plain": _AioWriteOne(own_pool),
            "transactional": _AioWriteOne(None),
            "lease": _AioTrivial(),
        }
        servers: list[grpc.aio.Server] = []
        channels: list[grpc.aio.Channel] = []
        stubs: dict[str, Any] = {}
        for name, servicer in servicers.items():
            interceptors = [timing(times[name])]
            if name != "plain":
                interceptors.append(AioDedupInterceptor(store))
            server = grpc.aio.server(interceptors=interceptors)
            ledger_pb2_grpc.add_LedgerServicer_to_server(servicer, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers.append(server)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            channels.append(channel)
            stubs[name] = ledger_pb2_grpc.LedgerStub(channel)

        async def call(variant: str, metadata: list[tuple[str, str]]) -> None:
            await stubs[_SERVER[variant]].Transfer(REQUEST, metadata=metadata, timeout=10)

        try:
            return await _measure(call, times, trips, rounds, per_round)
        finally:
            for channel in channels:
                await channel.close(None)
            for server in servers:
                await server.stop(None)
            await store.aclose()
            await store_pool.close()
            await own_pool.close()
            trips.close()

    return asyncio.run(main())


def targets(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Issue 10's round-trip targets, on one flavour's results."""
    trips = {v: results[v]["postgres_round_trips_per_call"] for v in VARIANTS}
    extra = trips["pg transactional first"] - trips["pg write, no dedup"]
    return {
        "transactional_extra_round_trips": extra,
        "transactional_at_most_one_extra_round_trip": extra <= 1.0,
        "transactional_replay_round_trips": trips["pg transactional replay"],
        "lease_first_round_trips": trips["pg lease first"],
        "lease_replay_round_trips": trips["pg lease replay"],
        "replay_is_one_round_trip": trips["pg lease replay"] <= 1.0
        and trips["pg transactional replay"] <= 1.0,
    }


def table(flavour: str, results: dict[str, dict[str, Any]]) -> Any:
    """The PostgresStore rows as a rich table."""
    from rich.table import Table

    base = results["pg write, no dedup"]
    out = Table(title=f"PostgresStore cost per call ({flavour}, Transfer on loopback)")
    for column in ("variant", "e2e µs", "vs write", "server µs", "PG RT/call"):
        out.add_column(column, justify="left" if column == "variant" else "right")
    for variant in VARIANTS:
        row = results[variant]
        out.add_row(
            variant,
            f"{row['e2e_median_us']:.0f}",
            f"{row['e2e_median_us'] / base['e2e_median_us']:.2f}x",
            f"{row['server_median_us']:.1f}",
            f"{row['postgres_round_trips_per_call']:.2f}",
        )
    return out


def run(
    rounds: int, per_round: int, timing: tuple[Any, Any], make_times: Callable[[], Any]
) -> dict[str, Any]:
    """Both flavours on one PostgreSQL; ``timing`` is the (sync, aio) timing interceptor classes."""
    with postgres_url() as url:
        sync = run_sync(url, rounds, per_round, timing[0], make_times)
        aio = run_aio(url, rounds, per_round, timing[1], make_times)
    return {"sync": sync, "aio": aio, "targets": {"sync": targets(sync), "aio": targets(aio)}}


def main(argv: list[str] | None = None) -> None:
    """Only the PostgresStore rows: ``python -m benchmarks.dedup_postgres [--quick]`` writes
    ``benchmarks/results/dedup_postgres.json`` (``benchmarks.dedup_overhead`` includes them too)."""
    import argparse
    from pathlib import Path

    from rich.console import Console

    from benchmarks.dedup_overhead import ServerTimes, _AioTiming, _Timing

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "dedup_postgres.json"
    )
    args = parser.parse_args(argv)
    rounds, per_round = (2, 20) if args.quick else (12, 120)
    started = time.monotonic()
    results = run(rounds, per_round, (_Timing, _AioTiming), ServerTimes)
    results["meta"] = {
        **environment(),
        "rounds": rounds,
        "calls_per_round": per_round,
        "seconds": round(time.monotonic() - started, 1),
        "statistic": "median of every call; round trips per call: fewest in any round, and mean",
    }
    write_json(args.output, results)
    console = Console()
    console.print(table("grpc.server", results["sync"]))
    console.print(table("grpc.aio", results["aio"]))
    console.print(results["targets"])


if __name__ == "__main__":
    main()
