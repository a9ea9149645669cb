"""Adversarial review: one process, two dedup servers, one lease renewal thread.

Every handler's lease in the process is renewed by one shared thread. When one server's store
stalls (its SQLite file locked by another process: each renewal waits ``busy_timeout``), the
renewals of the *other* server's handlers must still come in time: otherwise their claims lapse
while they run, and a duplicate executes a second time beside the live handler.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from resilient_grpc.server import DedupInterceptor
from resilient_grpc.stores import MemoryStore, SQLiteStore
from tests.dedup_fixtures import KEY, sqlite_locked

LEASE = 1.2  # renewed every 0.4 s; it lapses after 1.2 s without a renewal
STALLED_HANDLERS = 4


class Server:
    """A sync server with one DedupInterceptor whose handler counts executions per key and holds
    until ``release`` is set."""

    def __init__(self, interceptor: DedupInterceptor) -> None:
        self.interceptor = interceptor
        self.executions: Counter[str] = Counter()
        self.running = threading.Semaphore(0)
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=STALLED_HANDLERS + 4),
            interceptors=[interceptor],
        )
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "test.Raw", {"Pay": grpc.unary_unary_rpc_method_handler(self._pay)}
                ),
            )
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.pay: Callable[..., Any] = self.channel.unary_unary("/test.Raw/Pay")

    def _pay(self, request: bytes, context: Any) -> bytes:
        key = dict(context.invocation_metadata())[KEY]
        with self._lock:
            self.executions[key] += 1
        self.running.release()
        self.release.wait(30)
        return b"paid"

    def started(self, count: int) -> None:
        for _ in range(count):
            assert self.running.acquire(timeout=10), "a handler did not start"

    def stop(self) -> None:
        self.release.set()
        self.channel.close()
        self.server.stop(None)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[Server, Server, Path]]:
    path = tmp_path / "dedup.sqlite"
    stalled = Server(DedupInterceptor(SQLiteStore(path, busy_timeout=0.5), lease=LEASE))
    healthy = Server(DedupInterceptor(MemoryStore(), lease=LEASE))
    yield stalled, healthy, path
    stalled.stop()
    healthy.stop()


def test_a_stalled_store_does_not_let_another_servers_live_claim_lapse(
    servers: tuple[Server, Server, Path],
) -> None:
    stalled, healthy, path = servers
    calls = [
        stalled.pay.future(b"s", metadata=[(KEY, f"s{n}")], timeout=20)
        for n in range(STALLED_HANDLERS)
    ]
    stalled.started(STALLED_HANDLERS)
    first = healthy.pay.future(b"h", metadata=[(KEY, "h")], timeout=20)
    healthy.started(1)

    with sqlite_locked(path):  # the stalled server's renewals now wait busy_timeout each
        time.sleep(3 * LEASE)
        threads = [server.interceptor._heartbeats._thread for server in (stalled, healthy)]
        assert threads[0] is not threads[1]  # one renewal thread each
        # A duplicate of the healthy server's live call: it must not execute again.
        duplicate = healthy.pay.future(b"h", metadata=[(KEY, "h")], timeout=1.5)
        with pytest.raises(grpc.RpcError):
            duplicate.result()
        assert healthy.executions["h"] == 1, "the live handler's claim lapsed: it ran twice"

    healthy.release.set()
    stalled.release.set()
    assert first.result(timeout=10) == b"paid"
    for call in calls:
        call.exception(timeout=20)

    # Nothing left to renew: each server's renewal thread ends (no thread kept per server).
    for thread in threads:
        assert thread is not None
        thread.join(timeout=10)
        assert not thread.is_alive()
