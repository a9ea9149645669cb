"""Count the round trips psycopg connections make to PostgreSQL, from libpq's protocol trace
(tests and benchmarks).

A round trip is a message after which the client waits for the server: a simple ``Query`` (one or
more statements; ``BEGIN`` and ``COMMIT`` are sent this way) or the ``Sync`` that ends an
extended-protocol statement (Parse/Bind/Execute). Counting those messages is exact whatever the
statements are, unlike counting statements (a message may hold several).
"""

from __future__ import annotations

import tempfile
import threading
from typing import IO, Any

from psycopg import pq


class PostgresRoundTrips:
    """Attach to connections (e.g. as a pool's ``configure`` callback); :meth:`count` gives the
    round trips they made since the last :meth:`reset`. Each connection traces to a file of its
    own, so concurrent connections never interleave lines."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: list[IO[bytes]] = []
        self._before = 0

    def attach(self, connection: Any) -> None:
        """Trace ``connection`` (a psycopg ``Connection`` or ``AsyncConnection``)."""
        trace = tempfile.TemporaryFile()  # noqa: SIM115 (kept open while the connection traces)
        connection.pgconn.trace(trace.fileno())
        connection.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        with self._lock:
            self._files.append(trace)

    async def attach_async(self, connection: Any) -> None:
        """:meth:`attach` as a coroutine (for an ``AsyncConnectionPool``'s ``configure``)."""
        self.attach(connection)

    def _total(self) -> int:
        total = 0
        with self._lock:
            files = list(self._files)
        for trace in files:
            trace.flush()
            with open(trace.fileno(), "rb", closefd=False) as reader:
                reader.seek(0)
                for line in reader:
                    fields = line.split(b"\t")
                    if len(fields) > 2 and fields[0] == b"F" and fields[2].strip() in _WAITS:
                        total += 1
        return total

    def reset(self) -> None:
        """Start counting from now."""
        self._before = self._total()

    def count(self) -> int:
        """Round trips since the last :meth:`reset` (or construction)."""
        return self._total() - self._before

    def close(self) -> None:
        with self._lock:
            files, self._files = self._files, []
        for trace in files:
            trace.close()


_WAITS = frozenset({b"Query", b"Sync"})
