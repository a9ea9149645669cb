"""The SQL ledger behind DedupInterceptor in a server *process* (for crash loops), and its controller.

Run: ``python -m tests.sql_ledger_process --database postgres|sqlite --where URL|PATH --port N
[--flavour sync|aio] [--mode transactional|lease] [--store same|memory] [--lease S]
[--pause-file PATH] [--standby]``. The process prints ``PORT <n>`` once serving, and ``WROTE
<key>`` when a Transfer handler has done its writes; while ``PATH`` exists the handler then pauses
2 s before returning (in transactional mode its writes are not committed yet, in lease mode they
are), so a kill lands in that window. With ``--standby`` it waits for a line on stdin before
serving: a spare process that takes over a killed one's port at once. It exits when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import queue
import sys
import time

from tests.child_process import ChildProcess, say


class LedgerProcess(ChildProcess):
    """Starts the script in a child process; ``wrote`` queues the ``WROTE`` lines as they come."""

    def __init__(self, arguments: list[str]) -> None:
        self.wrote: queue.Queue[str] = queue.Queue()
        self._port: queue.Queue[int] = queue.Queue()
        super().__init__("tests.sql_ledger_process", arguments)

    def on_line(self, line: str) -> None:
        if line.startswith("WROTE "):
            self.wrote.put(line.split()[1])
        elif line.startswith("PORT "):
            self._port.put(int(line.split()[1]))

    def go(self) -> None:
        """Let a process started with ``--standby`` (imports done, port not bound yet) serve."""
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def wait_ready(self, timeout: float = 60.0) -> int:
        try:
            return self._port.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise AssertionError(
                f"ledger process did not start: {''.join(self.errors)[-3000:]}"
            ) from None


def _main() -> None:
    from tests.sql_ledger_servers import LedgerSpec, start_ledger

    parser = argparse.ArgumentParser()
    parser.add_argument("--database", required=True, choices=["postgres", "sqlite"])
    parser.add_argument("--where", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--flavour", default="sync", choices=["sync", "aio"])
    parser.add_argument("--mode", default="transactional", choices=["transactional", "lease"])
    parser.add_argument("--store", default="same", choices=["same", "memory"])
    parser.add_argument("--lease", type=float, default=1.0)
    parser.add_argument("--pause-file", default="")
    parser.add_argument("--standby", action="store_true", help="serve after a line on stdin")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.standby:  # everything is imported: a restart after a kill takes milliseconds
        import psycopg_pool  # noqa: F401

        sys.stdin.readline()

    def pause() -> float:
        return 2.0 if args.pause_file and os.path.exists(args.pause_file) else 0.0

    def after_write_sync(key: str) -> None:
        say(f"WROTE {key}")
        time.sleep(pause())

    async def after_write_aio(key: str) -> None:
        say(f"WROTE {key}")
        await asyncio.sleep(pause())

    ledger = start_ledger(
        LedgerSpec(
            args.database,
            args.where,
            flavour=args.flavour,
            transactional=args.mode == "transactional",
            store=args.store,
            lease=args.lease,
            after_write=after_write_sync if args.flavour == "sync" else after_write_aio,
            port=args.port,
        )
    )
    say(f"PORT {ledger.port}")
    sys.stdin.read()
    ledger.stop()


if __name__ == "__main__":
    _main()
