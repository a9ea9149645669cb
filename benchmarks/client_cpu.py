"""CPU instructions per client call (callgrind), stack vs bare, on in-process loopback calls.

Wall-clock ratios (``benchmarks.overhead``) move with machine load; instruction counts do not.
Each variant runs in its own process under ``valgrind --tool=callgrind``: a warm-up, then
``--calls`` unary calls (GetBalance) to an in-process ledger server over loopback. Counting
starts when the loop starts and stops when it ends (callgrind's ``--zero-before`` /
``--dump-before`` on two libc functions the loop is wrapped in: ``getppid``, ``getpgrp``), so
interpreter start-up, imports and the warm-up are left out. Only the main thread is counted,
the one making the calls: for sync calls that is the client side of the call (gRPC's server
and polling threads are left out: their work varies with timing), for aio the event loop
that runs both the client and the in-process server (the same server work in every variant).
The difference between a variant and ``bare`` is what the client-side stack costs.

Variants (each with every feature on: retry, budget, breaker, idempotency key):
``bare``, ``noop_interceptor`` (gRPC's interceptor machinery alone), ``key_interceptor`` (that
machinery plus a fresh idempotency key in the metadata), ``resilient_channel``,
``client_interceptors`` (on ``grpc.intercept_channel``), sync or ``--aio``.

Run: ``python -m benchmarks.client_cpu`` (all variants, sync and aio: a few minutes) or
``python -m benchmarks.client_cpu --variants bare resilient_channel --sync-only``.
``--run VARIANT`` is the child mode valgrind runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

VARIANTS = (
    "bare",
    "noop_interceptor",
    "key_interceptor",
    "resilient_channel",
    "client_interceptors",
)


def _run_sync(variant: str, calls: int, warmup: int) -> None:
    import grpc

    from benchmarks.overhead import _KeyInterceptor, _NoOpInterceptor, _stack
    from protos import ledger_pb2, ledger_pb2_grpc
    from protos.ledger_service import serve
    from resilient_grpc.client import client_interceptors, resilient_channel

    server, port, _ = serve()
    target = f"127.0.0.1:{port}"
    if variant == "bare":
        channel = grpc.insecure_channel(target)
    elif variant == "noop_interceptor":
        channel = grpc.intercept_channel(grpc.insecure_channel(target), _NoOpInterceptor())
    elif variant == "key_interceptor":
        channel = grpc.intercept_channel(grpc.insecure_channel(target), _KeyInterceptor())
    elif variant == "resilient_channel":
        channel = resilient_channel(target, **_stack())
    else:
        channel = grpc.intercept_channel(
            grpc.insecure_channel(target), *client_interceptors(target=target, **_stack())
        )
    stub = ledger_pb2_grpc.LedgerStub(channel)
    request = ledger_pb2.BalanceRequest(account="alice")
    for _ in range(warmup):
        stub.GetBalance(request, timeout=60)
    os.getppid()  # callgrind: zero the counters here
    for _ in range(calls):
        stub.GetBalance(request, timeout=60)
    os.getpgrp()  # callgrind: dump the counters here
    channel.close()
    server.stop(None)


async def _run_aio(variant: str, calls: int, warmup: int) -> None:
    import grpc.aio

    from benchmarks.overhead import _AioKeyInterceptor, _AioNoOpInterceptor, _stack
    from protos import ledger_pb2, ledger_pb2_grpc
    from protos.ledger_service import serve_aio
    from resilient_grpc.aio.client import client_interceptors, resilient_channel

    server, port, _ = await serve_aio()
    target = f"127.0.0.1:{port}"
    channel: Any
    if variant == "bare":
        channel = grpc.aio.insecure_channel(target)
    elif variant == "noop_interceptor":
        channel = grpc.aio.insecure_channel(
            target, interceptors=[cast(grpc.aio.ClientInterceptor, _AioNoOpInterceptor())]
        )
    elif variant == "key_interceptor":
        channel = grpc.aio.insecure_channel(
            target, interceptors=[cast(grpc.aio.ClientInterceptor, _AioKeyInterceptor())]
        )
    elif variant == "resilient_channel":
        channel = resilient_channel(target, **_stack())
    else:
        channel = grpc.aio.insecure_channel(
            target, interceptors=client_interceptors(target=target, **_stack())
        )
    stub = ledger_pb2_grpc.LedgerStub(channel)
    request = ledger_pb2.BalanceRequest(account="alice")
    for _ in range(warmup):
        await stub.GetBalance(request, timeout=60)
    os.getppid()
    for _ in range(calls):
        await stub.GetBalance(request, timeout=60)
    os.getpgrp()
    await channel.close()
    await server.stop(None)


def _measure(variant: str, aio: bool, calls: int, warmup: int) -> int:
    """Instructions (Ir) of ``calls`` calls of ``variant`` under callgrind."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "callgrind.out"
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}.%p",
            "--zero-before=getppid",
            "--dump-before=getpgrp",
            "--dump-instr=no",
            "--separate-threads=yes",
            sys.executable,
            "-m",
            "benchmarks.client_cpu",
            "--run",
            variant,
            "--calls",
            str(calls),
            "--warmup",
            str(warmup),
            *(["--aio"] if aio else []),
        ]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"{variant} failed under callgrind:\n{done.stderr[-3000:]}")
        # The first dump (.1) holds the loop: counters zeroed at getppid, dumped at getpgrp;
        # thread 01 is the main thread, the one making the calls.
        dumps = sorted(Path(folder).glob("callgrind.out.*.1-01"))
        if not dumps:
            raise RuntimeError("callgrind wrote no dump for the loop")
        text = dumps[0].read_text()
        found = re.search(r"^summary:\s*(\d+)", text, re.MULTILINE) or re.search(
            r"^totals:\s*(\d+)", text, re.MULTILINE
        )
        if found is None:
            raise RuntimeError("no summary line in the callgrind dump")
        return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", choices=VARIANTS, help="child mode: run one variant's loop")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--aio", action="store_true")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--sync-only", action="store_true")
    parser.add_argument("--aio-only", action="store_true")
    args = parser.parse_args()
    if args.run:
        if args.aio:
            asyncio.run(_run_aio(args.run, args.calls, args.warmup))
        else:
            _run_sync(args.run, args.calls, args.warmup)
        return
    flavours = [False] if args.sync_only else [True] if args.aio_only else [False, True]
    for aio in flavours:
        counts = {v: _measure(v, aio, args.calls, args.warmup) / args.calls for v in args.variants}
        bare = counts.get("bare")
        print(f"{'aio' if aio else 'sync'} ({args.calls} calls, Ir per call):")
        for variant, count in counts.items():
            extra = ""
            if bare is not None and variant != "bare":
                extra = f"  {count / bare:.3f}x bare  (+{count - bare:,.0f} Ir)"
            print(f"  {variant:20s} {count:12,.0f}{extra}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
