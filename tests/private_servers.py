"""The session's Redis and PostgreSQL for tests: private servers
(:mod:`resilient_grpc.testing.servers`), or the servers ``REDIS_URL`` / ``POSTGRES_URL`` name
(then they cannot be stopped, and outage tests skip). With neither, those tests skip locally and
fail under ``CI=true`` (CI must exercise every store).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

import pytest

from resilient_grpc.testing.servers import PostgresServer, RedisServer, ServerUnavailableError

Private = TypeVar("Private", RedisServer, PostgresServer)


class ExternalServer:
    """A server an environment variable names: usable, but not ours to stop."""

    def __init__(self, variable: str, url: str) -> None:
        self.variable = variable
        self.url = url

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pytest.skip(f"{self.variable} points at a server these tests cannot stop")


def unavailable(what: str, reason: str) -> NoReturn:
    """Skip locally, fail under CI=true."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is required under CI=true: {reason}")
    pytest.skip(reason)


def private_or_external(
    variable: str, make: Callable[[], Private]
) -> Private | ExternalServer | None:
    """The server ``variable`` names, else ``make()`` started, else ``None`` (no binaries)."""
    url = os.environ.get(variable)
    if url:
        return ExternalServer(variable, url)
    try:
        server = make()
    except ServerUnavailableError:
        return None
    server.start()
    return server


def session_server(
    variable: str, make: Callable[[], Private], what: str, missing: str
) -> Iterator[Private | ExternalServer]:
    """The body of a session fixture: the server (or a skip saying ``missing``), closed after."""
    server = private_or_external(variable, make)
    if server is None:
        unavailable(what, missing)
    try:
        yield server
    finally:
        if not isinstance(server, ExternalServer):
            server.close()


def ensure_running(server: RedisServer | PostgresServer | ExternalServer) -> str:
    """Start again a private server that a test stopped (crashed); its URL."""
    if not isinstance(server, ExternalServer) and not server.running:
        server.start()
    return server.url
