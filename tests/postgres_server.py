"""The session's PostgreSQL for tests: a private
:class:`~resilient_grpc.testing.servers.PostgresServer`, or the server ``POSTGRES_URL`` names
(then it cannot be stopped, and outage tests skip). With neither, PostgreSQL tests skip locally
and fail under ``CI=true``.
"""

from __future__ import annotations

import os

import pytest

from resilient_grpc.testing.servers import PostgresServer, ServerUnavailableError

__all__ = ["ExternalPostgres", "PostgresServer", "make_postgres_server", "postgres_unavailable"]


class ExternalPostgres:
    """A server named by ``POSTGRES_URL``: usable, but not ours to stop."""

    def __init__(self, url: str) -> None:
        self.url = url

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pytest.skip("POSTGRES_URL points at a server these tests cannot stop")


def postgres_unavailable(reason: str) -> None:
    """Skip locally, fail under CI=true (CI must exercise the PostgreSQL store)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is required under CI=true: {reason}")
    pytest.skip(reason)


def make_postgres_server() -> PostgresServer | ExternalPostgres | None:
    """``POSTGRES_URL``'s server, a started private one, or ``None`` without the binaries."""
    url = os.environ.get("POSTGRES_URL")
    if url:
        return ExternalPostgres(url)
    try:
        server = PostgresServer()
    except ServerUnavailableError:
        return None
    server.start()
    return server
