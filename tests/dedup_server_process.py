"""A ledger server *process* behind DedupInterceptor, and a controller for it (multi-process tests).

Run: ``python -m tests.dedup_server_process --store sqlite:/path/db | redis:redis://... | redis-cluster:redis://... [--delay S]
[--lease S] [--hang-first]``. The process prints ``PORT <n>``, then ``START <key>`` when a Transfer
handler begins and ``EXEC <key> <transfer_id>`` when it applied one, ``BALANCE`` per GetBalance, and exits when stdin closes.
``--hang-once FILE`` makes the first handler of any process sharing FILE hang (to be killed
mid-handler): the one that creates FILE; with ``--hang-after-effect`` it hangs after applying
the transfer (killed between the effect and the stored outcome).
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import time
from typing import Any

from tests.child_process import ChildProcess, say


class ServerProcess(ChildProcess):
    """Starts the script in a child process and collects its output lines."""

    def __init__(
        self,
        store: str,
        *,
        delay: float = 0.0,
        lease: float = 30.0,
        hang_once: str = "",
        hang_after_effect: bool = False,
    ) -> None:
        arguments = ["--store", store, "--delay", str(delay), "--lease", str(lease)]
        if hang_once:
            arguments += ["--hang-once", hang_once]
        if hang_after_effect:
            arguments.append("--hang-after-effect")
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        super().__init__("tests.dedup_server_process", arguments)
        self.port = int(self.wait_for("PORT ").split()[1])

    def on_line(self, line: str) -> None:
        self.lines.append(line)
        self._queue.put(line)

    def wait_for(self, prefix: str, timeout: float = 60.0) -> str:
        """The first output line starting with ``prefix`` (waits up to ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        for line in list(self.lines):
            if line.startswith(prefix):
                return line
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (self.process.poll() is not None and self._queue.empty()):
                time.sleep(0.1)  # let the stderr reader catch up
                raise AssertionError(
                    f"server process printed no {prefix!r} line (exit code "
                    f"{self.process.poll()}): stdout {self.lines}, stderr {''.join(self.errors)}"
                )
            try:
                line = self._queue.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line

    def executions(self) -> list[str]:
        """The keys of the transfers this process applied, in order."""
        return [line.split()[1] for line in self.lines if line.startswith("EXEC ")]


def _main() -> None:
    import grpc

    from protos import ledger_pb2
    from protos.ledger_service import SyncLedger, serve
    from resilient_grpc.server import DedupInterceptor
    from resilient_grpc.stores import RedisStore, SQLiteStore

    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--hang-once", default="")
    parser.add_argument("--hang-after-effect", action="store_true")
    args = parser.parse_args()
    kind, _, where = args.store.partition(":")
    if kind == "sqlite":
        store: Any = SQLiteStore(where)
    else:
        store = RedisStore.from_url(where, cluster=kind == "redis-cluster")

    def first_to_hang() -> bool:
        if not args.hang_once:
            return False
        try:
            os.close(os.open(args.hang_once, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return False
        return True

    class Ledger(SyncLedger):
        def Transfer(self, request: ledger_pb2.TransferRequest, context: Any) -> Any:
            key = dict(context.invocation_metadata()).get("idempotency-key")
            say(f"START {key}")
            hang = first_to_hang()
            if hang and not args.hang_after_effect:
                time.sleep(600)  # killed by the test long before
            if args.delay:
                time.sleep(args.delay)
            reply = super().Transfer(request, context)
            say(f"EXEC {key} {reply.transfer_id}")
            if hang:
                time.sleep(600)  # killed after the effect, before the outcome is stored
            return reply

        def GetBalance(self, request: ledger_pb2.BalanceRequest, context: Any) -> Any:
            say("BALANCE")
            return super().GetBalance(request, context)

    server: grpc.Server
    server, port, _ = serve(
        Ledger(), interceptors=[DedupInterceptor(store, lease=args.lease)], max_workers=64
    )
    say(f"PORT {port}")
    sys.stdin.read()
    server.stop(None)


if __name__ == "__main__":
    _main()
