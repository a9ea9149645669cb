"""How dedup scales across server processes: several ledger server processes share one store, several
client processes send keyed Transfers (a share of them duplicates of a recent call), per store.

Each configuration starts ``servers`` server processes (``grpc.server`` + ``DedupInterceptor``) on
one store, and ``clients`` client processes; each client runs ``concurrency`` asyncio workers
sending keyed calls on one round-robin channel over every server for ``seconds``. A duplicate
reuses the key and request of a call made a moment ago by the same process (its retry after a
lost answer), sent concurrently with or after the first. Reported per configuration: calls/s
(client-observed, every answer counted), p50/p99 latency, and duplicate executions: the server
processes report how many times each key executed, and every execution of a key beyond its
first is a duplicate (the number dedup must keep at 0).

Stores: MemoryStore (one process only: it is not shared), SQLiteStore (one file), RedisStore on
one redis-server, and on a 3-master Redis Cluster without and with ``replica_acks=1``,
PostgresStore (lease mode) on one PostgreSQL (``POSTGRES_URL``, or a private server); SQLite,
Redis and PostgreSQL also with 1, 2 and 4 server processes. The machine has 2 cores shared by every process
here, so more server processes mostly compete for the same CPU: read the scaling rows as what
the store costs under contention, not as a speed-up.

Run: ``python -m benchmarks.dedup_scale`` (a few minutes) or ``--quick`` (under 60 s);
``--only memory,sqlite`` picks stores. Writes ``benchmarks/results/dedup_scale.json``. Internal
modes ``serve`` and ``load`` are the child processes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.report import environment, write_json

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "dedup_scale.json"


# ---------------------------------------------------------------------------- child: a server


def serve(store_spec: str) -> None:
    """A ledger server process: prints ``PORT n``; when stdin closes, prints the executions per
    key as JSON and exits."""
    from protos.ledger_service import SyncLedger
    from protos.ledger_service import serve as start
    from resilient_grpc.server import SHARED_SCOPE, DedupInterceptor
    from resilient_grpc.stores import MemoryStore, PostgresStore, RedisStore, SQLiteStore

    kind, _, where = store_spec.partition(":")
    store: Any
    if kind == "memory":
        store = MemoryStore()
    elif kind == "sqlite":
        store = SQLiteStore(where)
    elif kind == "redis":
        store = RedisStore.from_url(where, check_config=False)
    elif kind == "postgres":  # "<table>|<url>": the server processes of a configuration share it
        table, _, url = where.partition("|")
        store = PostgresStore(url, table=table)
    else:  # cluster or cluster-acks
        acks = 1 if kind == "cluster-acks" else 0
        store = RedisStore.from_url(where, cluster=True, check_config=False, replica_acks=acks)
    ledger = SyncLedger()
    server, port, _ = start(
        ledger, interceptors=[DedupInterceptor(store, scope=SHARED_SCOPE)], max_workers=32
    )
    print(f"PORT {port}", flush=True)
    sys.stdin.read()
    server.stop(None)
    executions = {key: n for key, n in ledger.state.executions.items() if key is not None}
    print(json.dumps(executions), flush=True)


# ---------------------------------------------------------------------------- child: a client


def load(target: str, seconds: float, concurrency: int, duplicate_share: float) -> None:
    """A client process: keyed calls for ``seconds``; prints ``{"latencies_us": [...], ...}``."""
    import grpc.aio

    from protos import ledger_pb2, ledger_pb2_grpc
    from protos.ledger_service import KEY_HEADER

    async def main() -> dict[str, Any]:
        channel = grpc.aio.insecure_channel(
            target, options=[("grpc.lb_policy_name", "round_robin")]
        )
        stub = ledger_pb2_grpc.LedgerStub(channel)
        await channel.channel_ready()
        latencies: list[float] = []
        errors: collections.Counter[str] = collections.Counter()
        recent: collections.deque[tuple[str, int]] = collections.deque(maxlen=64)
        tag = uuid.uuid4().hex[:8]
        counter = iter(range(10**9))
        end = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < end:
                if recent and random.random() < duplicate_share:
                    key, amount = random.choice(recent)
                else:
                    key, amount = f"{tag}-{next(counter)}", random.randint(1, 100)
                    recent.append((key, amount))
                request = ledger_pb2.TransferRequest(
                    from_account="a", to_account="b", amount=amount
                )
                started = time.perf_counter()
                try:
                    await stub.Transfer(request, metadata=[(KEY_HEADER, key)], timeout=10)
                except grpc.aio.AioRpcError as error:
                    errors[error.code().name] += 1
                    continue
                latencies.append((time.perf_counter() - started) * 1e6)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await channel.close(None)
        return {"latencies_us": latencies, "errors": dict(errors)}

    print(json.dumps(asyncio.run(main())), flush=True)


# ---------------------------------------------------------------------------- the parent


def _child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.dedup_scale", *args],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def run_configuration(
    store_spec: str, servers: int, clients: int, concurrency: int, seconds: float
) -> dict[str, Any]:
    """Start the servers and clients of one configuration; their merged measurements."""
    processes = [_child("serve", store_spec) for _ in range(servers)]
    try:
        ports = []
        for process in processes:
            assert process.stdout is not None
            line = process.stdout.readline()
            if not line.startswith("PORT "):
                raise RuntimeError(f"a server for {store_spec} did not start")
            ports.append(int(line.split()[1]))
        target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
        loaders = [
            _child("load", target, str(seconds), str(concurrency), "0.2") for _ in range(clients)
        ]
        outputs = [json.loads(loader.communicate(timeout=seconds + 60)[0]) for loader in loaders]
    finally:
        executions: collections.Counter[str] = collections.Counter()
        for process in processes:
            out, _ = process.communicate("", timeout=60)
            last = out.strip().splitlines()[-1] if out.strip() else "{}"
            executions.update(json.loads(last))
    latencies = sorted(x for output in outputs for x in output["latencies_us"])
    errors: collections.Counter[str] = collections.Counter()
    for output in outputs:
        errors.update(output["errors"])
    return {
        "servers": servers,
        "calls": len(latencies),
        "calls_per_s": round(len(latencies) / seconds, 1),
        "p50_us": round(statistics.median(latencies), 1) if latencies else None,
        "p99_us": round(latencies[int(len(latencies) * 0.99)], 1) if latencies else None,
        "errors": dict(errors),
        "keys_executed": len(executions),
        "duplicate_executions": sum(n - 1 for n in executions.values() if n > 1),
    }


@contextmanager
def _cluster() -> Iterator[str]:
    from resilient_grpc.testing.cluster import make_redis_cluster

    cluster = make_redis_cluster()
    if cluster is None:
        raise SystemExit("redis-server and redis-cli must be on PATH for the cluster rows")
    try:
        yield cluster.startup_url
    finally:
        cluster.close()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        serve(argv[1])
        return
    if argv and argv[0] == "load":
        load(argv[1], float(argv[2]), int(argv[3]), float(argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="under 60 s")
    parser.add_argument("--only", default="memory,sqlite,redis,postgres,cluster,cluster-acks")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    wanted = args.only.split(",")
    seconds, scaling = (1.5, (1, 2)) if args.quick else (6.0, (1, 2, 4))
    clients, concurrency = 2, 16
    started = time.monotonic()
    rows: dict[str, list[dict[str, Any]]] = {}

    from benchmarks.dedup_overhead import redis_url
    from benchmarks.dedup_postgres import postgres_url

    with tempfile.TemporaryDirectory(prefix="dedup-scale-") as tmp:
        if "memory" in wanted:
            rows["memory"] = [run_configuration("memory:", 1, clients, concurrency, seconds)]
        if "sqlite" in wanted:
            rows["sqlite"] = [
                run_configuration(
                    f"sqlite:{tmp}/scale-{n}.sqlite3", n, clients, concurrency, seconds
                )
                for n in scaling
            ]
        if "redis" in wanted:
            with redis_url() as url:
                rows["redis"] = [
                    run_configuration(f"redis:{url}", n, clients, concurrency, seconds)
                    for n in scaling
                ]
        if "postgres" in wanted:
            with postgres_url() as url:
                rows["postgres"] = [
                    run_configuration(
                        f"postgres:scale_{uuid.uuid4().hex[:12]}|{url}",
                        n,
                        clients,
                        concurrency,
                        seconds,
                    )
                    for n in scaling
                ]
        if "cluster" in wanted or "cluster-acks" in wanted:
            with _cluster() as url:
                for kind in ("cluster", "cluster-acks"):
                    if kind in wanted:
                        rows[kind] = [
                            run_configuration(f"{kind}:{url}", 2, clients, concurrency, seconds)
                        ]
    report: dict[str, Any] = {
        "meta": {
            **environment(),
            "cpus": os.cpu_count(),
            "seconds_per_configuration": seconds,
            "client_processes": clients,
            "concurrency_per_client": concurrency,
            "duplicate_share": 0.2,
            "total_seconds": round(time.monotonic() - started, 1),
        },
        "stores": rows,
    }
    write_json(args.output, report)
    for store, configurations in rows.items():
        for row in configurations:
            print(
                f"{store:13s} servers={row['servers']} calls/s={row['calls_per_s']:8.1f} "
                f"p50={row['p50_us']} us p99={row['p99_us']} us "
                f"duplicates={row['duplicate_executions']} errors={row['errors']}"
            )
    print(f"wrote {args.output} in {report['meta']['total_seconds']} s")


if __name__ == "__main__":
    main()
