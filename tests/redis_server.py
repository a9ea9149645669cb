"""A real ``redis-server`` per test session, on a free loopback port, that tests may stop and restart.

``REDIS_URL`` points the tests at an existing server instead (then it cannot be stopped, and
outage tests skip). With neither, Redis tests skip locally and fail under ``CI=true``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A ``redis-server`` process we own: ``stop()`` kills it, ``start()`` brings it back on the same port."""

    def __init__(
        self,
        binary: str,
        directory: Path,
        settings: dict[str, str | tuple[str, ...]] | None = None,
    ) -> None:
        self.binary = binary
        self.directory = directory
        #: ``--name value...`` arguments; the defaults keep nothing on disk
        self.settings: dict[str, str | tuple[str, ...]] = {
            "save": "",
            "appendonly": "no",
            **(settings or {}),
        }
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def can_stop(self) -> bool:
        return True

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.directory),
                *_arguments(self.settings),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port} within 10 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


def _arguments(settings: dict[str, str | tuple[str, ...]]) -> list[str]:
    arguments = []
    for name, value in settings.items():
        arguments += [f"--{name}", *((value,) if isinstance(value, str) else value)]
    return arguments


class ExternalRedis:
    """A server named by ``REDIS_URL``: usable, but not ours to stop."""

    def __init__(self, url: str) -> None:
        self.url = url

    @property
    def can_stop(self) -> bool:
        return False

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
    url = os.environ.get("REDIS_URL")
    if url:
        return ExternalRedis(url)
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    server = RedisServer(binary, Path(tempfile.mkdtemp(prefix="resilient-grpc-redis-")))
    server.start()
    return server
