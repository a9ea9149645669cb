"""The session's Redis for tests: a private :class:`~resilient_grpc.testing.servers.RedisServer`,
or the server ``REDIS_URL`` names (then it cannot be stopped, and outage tests skip). With
neither, Redis tests skip locally and fail under ``CI=true``.
"""

from __future__ import annotations

import os

import pytest

from resilient_grpc.testing.servers import RedisServer, ServerUnavailableError, free_port

__all__ = ["ExternalRedis", "RedisServer", "free_port", "make_redis_server", "redis_unavailable"]


class ExternalRedis:
    """A server named by ``REDIS_URL``: usable, but not ours to stop."""

    def __init__(self, url: str) -> None:
        self.url = url

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pytest.skip("REDIS_URL points at a server these tests cannot stop")


def redis_unavailable(reason: str) -> None:
    """Skip locally, fail under CI=true (CI must exercise the Redis store)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Redis is required under CI=true: {reason}")
    pytest.skip(reason)


def make_redis_server() -> RedisServer | ExternalRedis | None:
    """``REDIS_URL``'s server, a started private one, or ``None`` without ``redis-server``."""
    url = os.environ.get("REDIS_URL")
    if url:
        return ExternalRedis(url)
    try:
        server = RedisServer()
    except ServerUnavailableError:
        return None
    server.start()
    return server
